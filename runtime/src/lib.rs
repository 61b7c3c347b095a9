//! gristmill: fine-tune and run Llama-family models with QLoRA on one GPU, or on the CPU.
//!
//! This crate will hold the device runtime, model loading, the model, training and generation.
//! Today it re-exports the core (the specification every backend is tested against) and reports
//! what this build can do.

pub use gristmill_core as core;

/// The version of this build, as `gristmill --version` prints it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where computation runs. Only the CPU reference exists so far; CUDA comes with its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
        }
    }
}

pub mod selfcheck;
