//! gristmill: fine-tune and run Llama-family models with QLoRA on one GPU, or on the CPU.
//!
//! - [`safetensors`]: memory-mapped checkpoints (single files and shards), bf16/f16/f32 and
//!   bitsandbytes pre-quantized NF4 tensors, and writing them;
//! - [`config`]: the HF `config.json` of the Llama family;
//! - [`tokenizer`]: `tokenizer.json`, special tokens, chat templates, streaming decode;
//! - [`gguf`]: reading GGUF files and importing them as HF-layout checkpoints;
//! - [`cpu`]: fast CPU kernels (GEMM, GEMV) checked against the core's references;
//! - [`model`]: the Llama-family model with a KV cache; [`generate`]: sampling and generation;
//! - [`compare`]: training runs side by side (summary table, loss curves on one chart);
//! - [`selfcheck`]: the reference path end to end on an embedded default;
//! - [`doctor`]: the GPU, its PTX modules and every kernel against its reference; kernel benchmarks.

pub use gristmill_core as core;

pub mod adapter;
pub mod api;
pub mod backend;
pub mod compare;
pub mod config;
pub mod cpu;
pub mod data;
pub mod device;
pub mod doctor;
pub mod drift;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod gguf_export;
pub mod inspect;
pub mod merge;
pub mod model;
pub mod safetensors;
pub mod scores;
pub mod selfcheck;
pub mod sweep;
pub mod textmetrics;
pub mod tokenizer;
pub mod train;
pub mod util;

pub use error::{Error, Result};

/// The version of this build, as `gristmill --version` prints it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub use device::Device;
