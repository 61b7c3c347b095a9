//! Launchers of kernels/cuda/optim.cu.
