//! gristmill: fine-tune and run Llama-family models with QLoRA on one GPU, or on the CPU.
//!
//! - [`safetensors`]: memory-mapped checkpoints (single files and shards), bf16/f16/f32 and
//!   bitsandbytes pre-quantized NF4 tensors, and writing them;
//! - [`config`]: the HF `config.json` of the Llama family;
//! - [`tokenizer`]: `tokenizer.json`, special tokens, chat templates, streaming decode;
//! - [`gguf`]: reading GGUF files and importing them as HF-layout checkpoints;
//! - [`cpu`]: fast CPU kernels (GEMM, GEMV) checked against the core's references;
//! - [`model`]: the Llama-family model with a KV cache; [`generate`]: sampling and generation;
//! - [`selfcheck`]: the reference path end to end on an embedded default.

pub use gristmill_core as core;

pub mod adapter;
pub mod config;
pub mod cpu;
pub mod data;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod inspect;
pub mod merge;
pub mod model;
pub mod safetensors;
pub mod selfcheck;
pub mod textmetrics;
pub mod tokenizer;
pub mod train;
pub mod util;

pub use error::{Error, Result};

/// The version of this build, as `gristmill --version` prints it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where computation runs. Only the CPU exists so far; CUDA comes with its backend.
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
