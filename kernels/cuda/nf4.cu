// nf4: the fused NF4 kernels land here.
#include "common.cuh"
