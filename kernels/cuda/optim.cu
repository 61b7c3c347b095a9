// optim: kernels land here.
#include "common.cuh"
