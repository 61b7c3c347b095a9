// gemm: kernels land here.
#include "common.cuh"
