//! Shared by the runtime's integration tests.
#![allow(dead_code, clippy::unwrap_used)] // each test binary uses a part; a failed unwrap is a failed test

use gristmill::data::Batch;
use gristmill::safetensors::Checkpoint;
use gristmill_core::ops::cross_entropy::IGNORE_INDEX;
use std::path::{Path, PathBuf};

/// tests/fixtures of this checkout, or of the working directory when the binary runs elsewhere
/// (the GPU machine runs the tests from a copy of the repository's root).
pub fn fixtures() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    if built.exists() { built } else { PathBuf::from("tests/fixtures") }
}

/// A fresh, empty directory `gristmill-{name}-{pid}` under the system temporary directory.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gristmill-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// 120 synthetic problems as GSM8K-style JSON Lines in `dir/data.jsonl`.
pub fn write_synth_data(dir: &Path) -> PathBuf {
    let path = dir.join("data.jsonl");
    let mut text = String::new();
    for ex in gristmill::data::synth::generate(120, 7) {
        let line = serde_json::json!({"question": ex.field("question").unwrap(), "answer": ex.response().unwrap()});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// The `[model]`, `[data]` and `[lora]` tables of a training run of the tiny fixture model on
/// `data` (rank 4, alpha 8), for tests to complete with their own `[optim]`, `[train]`, `[output]`.
pub fn tiny_run_toml(data: &Path) -> String {
    format!(
        "[model]\npath = \"{}\"\n[data]\npaths = [\"{}\"]\nmax_seq_len = 96\n[lora]\nr = 4\nalpha = 8\n",
        fixtures().join("tiny_llama").display(),
        data.display()
    )
}

/// Micro-batch `a` of step `s` of the golden QLoRA run (tests/fixtures/peft_steps.safetensors),
/// from HF's (input_ids, labels, attention_mask).
pub fn golden_batch(g: &Checkpoint, s: usize, a: usize, accum: usize, b: usize, t: usize) -> Batch {
    let off = ((s * accum + a) * b) * t;
    let ids = g.to_f32("input_ids").unwrap()[off..off + b * t].to_vec();
    let labels = g.to_f32("labels").unwrap()[off..off + b * t].to_vec();
    let mask = g.to_f32("attention_mask").unwrap()[off..off + b * t].to_vec();
    let mut targets = vec![IGNORE_INDEX; b * t];
    for r in 0..b {
        for i in 0..t - 1 {
            // HF shifts inside the model: position i predicts label i + 1.
            targets[r * t + i] = labels[r * t + i + 1] as i64;
        }
    }
    let n_targets = targets.iter().filter(|&&x| x != IGNORE_INDEX).count();
    Batch {
        b,
        t,
        tokens: ids.iter().map(|&v| v as u32).collect(),
        targets,
        positions: (0..b).flat_map(|_| 0..t as u32).collect(),
        // Right padding: the padded keys form their own segment, so no real token attends to them.
        segments: mask.iter().map(|&m| if m > 0.5 { 0 } else { 1 }).collect(),
        n_targets,
        n_tokens: mask.iter().filter(|&&m| m > 0.5).count(),
    }
}

/// Turns `c` into a GRIT run of the tiny model in which every part of GRIT acts within a few
/// steps: statistics on every third micro-batch, inversion every 2 steps, reprojection every 4
/// with rank adaptation, regularizers on.
pub fn quick_grit(c: &mut gristmill::train::config::TrainConfig) {
    c.optim.optimizer = gristmill::train::config::OptimizerKind::Grit;
    c.grit.grit_cov_update_freq = 3; // sampled on every third micro-batch
    c.grit.kfac_update_freq = 2;
    c.grit.kfac_min_samples = 8;
    c.grit.reprojection_freq = 4;
    c.grit.min_lora_rank = 2;
    c.grit.rank_adaptation_threshold = 0.9;
    c.grit.lambda_kfac = 1e-3;
    c.grit.lambda_reproj = 1e-3;
}
