//! Launchers of kernels/cuda/elementwise.cu.
