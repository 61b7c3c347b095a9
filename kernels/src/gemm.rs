//! Launchers of kernels/cuda/gemm.cu.
