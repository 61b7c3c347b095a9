//! gristmill-kernels: the CUDA kernels of gristmill as embedded PTX plus safe launchers.
//!
//! Sources live in `kernels/cuda/*.cu`; `scripts/build-ptx` compiles them with the pinned nvcc
//! into `kernels/ptx/*.ptx`, which is committed and embedded (see [`ptx`]), so building never
//! needs a CUDA toolkit and running needs only the NVIDIA driver.
//!
//! With the `cuda` feature (on by default) the crate also holds the device runtime ([`Gpu`]: one
//! context, one stream, a caching allocator, modules loaded once on first use) and one safe
//! launcher per kernel, grouped by source file. A launcher checks every length and shape against
//! the arguments and returns [`KernelError`] rather than launching on bad input. Each kernel has a
//! CPU reference in `gristmill-core` (the specification) and a parity test in `kernels/tests`.
//!
//! Letters in shape comments: B T C H Hkv D V L r, and M N K for matrix products.

pub mod ptx;

#[cfg(feature = "cuda")]
pub mod check;
#[cfg(feature = "cuda")]
pub mod error;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
pub mod launch;

#[cfg(feature = "cuda")]
pub mod attention;
#[cfg(feature = "cuda")]
pub mod convert;
#[cfg(feature = "cuda")]
pub mod elementwise;
#[cfg(feature = "cuda")]
pub mod gemm;
#[cfg(feature = "cuda")]
pub mod grit;
#[cfg(feature = "cuda")]
pub mod loss;
#[cfg(feature = "cuda")]
pub mod nf4;
#[cfg(feature = "cuda")]
pub mod optim;

/// The driver-API types launchers take and return (device buffers and views).
#[cfg(feature = "cuda")]
pub use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
#[cfg(feature = "cuda")]
pub use error::{KernelError, Result};
#[cfg(feature = "cuda")]
pub use gpu::{Gpu, GpuInfo, driver_present};
#[cfg(feature = "cuda")]
pub use half::bf16;
#[cfg(feature = "cuda")]
pub use launch::Float;
