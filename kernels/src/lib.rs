//! gristmill-kernels: the CUDA kernels of gristmill as embedded PTX plus safe launchers.
//!
//! Sources live in `kernels/cuda/*.cu`; `scripts/build-ptx` compiles them with the pinned nvcc
//! into `kernels/ptx/*.ptx`, which is committed and embedded so that building never needs a CUDA
//! toolkit. The CUDA backend (device runtime, launchers) lands with the "CUDA backend" work; until
//! then this crate only names the PTX modules it will carry.

/// The PTX modules this crate embeds, by name. Empty until the first kernel lands.
pub const PTX_MODULES: &[(&str, &str)] = &[];
