//! QLoRA training: the trainable model, the loop, and what a run writes.

pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod grit;
#[cfg(feature = "cuda")]
pub mod grit_gpu;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod schedule;
pub mod step;
pub mod tfevents;
pub mod trainer;
