// loss: kernels land here.
#include "common.cuh"
