// elementwise: kernels land here.
#include "common.cuh"
