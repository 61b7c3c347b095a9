//! Launchers of kernels/cuda/attention.cu.
