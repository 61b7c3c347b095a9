//! Launchers of kernels/cuda/loss.cu.
