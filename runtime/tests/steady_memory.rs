//! Memory under load: 1,000 consecutive generate calls and a 10,000-step training run on the tiny
//! model, each with a resident set that stops growing (the bound is generous: what it catches is
//! a leak that grows with every call or step, not allocator noise).
//!
//! Everything runs in one test: the resident set is the whole process's, and tests of one binary
//! run in parallel threads, so a second test here would blur the measurement.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::fixtures;
use gristmill::api::{LoadOptions, Model, SamplingConfig};
use gristmill::train::config::TrainConfig;
use gristmill::train::metrics::Record;
use gristmill::train::trainer::{Hooks, train};

const MIB: u64 = 1 << 20;
/// The growth allowed between the warmed-up start and the end of each phase.
const BOUND: u64 = 48 * MIB;

/// Resident set size from /proc/self/statm (Linux); `None` elsewhere.
fn rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[test]
fn memory_stays_flat_over_1000_generations_and_10000_training_steps() {
    if rss().is_none() {
        eprintln!("skipped: no /proc/self/statm on this system to read the resident set from");
        return;
    }
    // 1,000 generate calls on one loaded model.
    let model = Model::load(fixtures().join("tiny_llama"), LoadOptions::default()).unwrap();
    let cfg = SamplingConfig { max_new_tokens: 8, temperature: 0.8, top_k: 20, ..Default::default() };
    let mut generated = 0;
    let mut start = 0;
    for i in 0..1000 {
        if i == 50 {
            start = rss().unwrap();
        }
        let cfg = SamplingConfig { seed: i, ..cfg.clone() };
        let out = model.generate("Question: what is 12 + 30?\nAnswer:", &cfg, |_| true).unwrap();
        generated += out.ids.len();
    }
    let end = rss().unwrap();
    eprintln!(
        "generate: {generated} tokens; resident {} MiB after 50 calls, {} MiB after 1000",
        start / MIB,
        end / MIB
    );
    assert!(generated > 0, "the calls generate");
    assert!(
        end <= start + BOUND,
        "resident set grew from {} to {} MiB over 950 generate calls",
        start / MIB,
        end / MIB
    );
    drop(model);

    // 10,000 training steps: a batch of one short sequence, rank 1, no evaluation, a checkpoint
    // every 2,500 steps, metrics every 100 (the in-memory log history grows with what is logged).
    let dir = std::env::temp_dir().join(format!("gristmill-steady-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Short records: the test is about steps, not tokens.
    let data = dir.join("short.jsonl");
    let rows: Vec<String> = (0..40)
        .map(|i| serde_json::json!({"instruction": format!("{i}+1"), "output": format!("{}", i + 1)}).to_string())
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let text = format!(
        "[model]\npath = {:?}\n[data]\npaths = [{:?}]\nmax_seq_len = 16\ntemplate = \"{{instruction}}={{output}}\"\n\
         split = [1.0, 0.0, 0.0]\n\
         [lora]\nr = 1\nalpha = 2\ndropout = 0.0\ntarget_modules = [\"v_proj\"]\n[optim]\nlr = 1e-4\n\
         [train]\nmax_steps = 10000\nbatch_size = 1\nsave_every = 2500\nlog_every = 100\nkeep_last = 1\n\
         [output]\ndir = {:?}\n",
        fixtures().join("tiny_llama"),
        data,
        dir.join("run")
    );
    let cfg = TrainConfig::from_toml_str(&text).unwrap();
    let (mut first, mut last, mut peak) = (0u64, 0u64, 0u64);
    let mut watch = |r: &Record| {
        if r.step == 500 {
            first = rss().unwrap();
        }
        if r.step > 500 {
            let now = rss().unwrap();
            peak = peak.max(now);
            last = now;
        }
        true
    };
    let out = train(&cfg, Hooks { on_step: Some(&mut watch), ..Default::default() }).unwrap();
    assert_eq!(out.steps, 10_000);
    assert!(out.last_loss.is_finite());
    eprintln!(
        "train: {} steps in {:.1} s; resident {} MiB at step 500, {} MiB at the end, peak {} MiB",
        out.steps,
        out.seconds,
        first / MIB,
        last / MIB,
        peak / MIB
    );
    assert!(
        peak <= first + BOUND,
        "resident set grew from {} MiB at step 500 to a peak of {} MiB",
        first / MIB,
        peak / MIB
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
