// attention: kernels land here.
#include "common.cuh"
