//! A training run killed with SIGKILL at an arbitrary moment resumes from its last complete
//! checkpoint and ends with exactly the adapter of an uninterrupted run (CPU, byte for byte).
//!
//! The kill moments come from a fixed seed, spread over the span of the run after its first
//! checkpoint: some land between steps, some inside a checkpoint being written. Whatever the
//! moment, the outcome must be the same, so the test is deterministic in what it asserts even
//! though the moments are not exact.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 60;
const SAVE_EVERY: usize = 4;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gristmill-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_llama")
}

fn gristmill() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gristmill"));
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// `gristmill train` on the tiny model; `--resume latest` when `resume`.
fn train_cmd(data: &Path, run: &Path, resume: bool) -> Command {
    let mut c = gristmill();
    c.args(["--device", "cpu", "train", "--model"]).arg(model_dir()).arg("--data").arg(data).arg("--out").arg(run);
    c.args(["--max-steps", &STEPS.to_string(), "--batch-size", "2", "--max-seq-len", "96", "--lora-r", "4"]);
    c.args(["--lora-dropout", "0.1", "--seed", "5", "--lr", "3e-3"]);
    c.args(["--set", &format!("train.save_every={SAVE_EVERY}"), "--set", "train.keep_last=2"]);
    c.args(["--set", "train.eval_every=0"]);
    if resume {
        c.args(["--resume", "latest"]);
    }
    c
}

fn run_ok(mut c: Command) {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{:?} failed: {}", c, String::from_utf8_lossy(&out.stderr));
}

fn has_checkpoint(run: &Path) -> bool {
    std::fs::read_dir(run)
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))))
}

/// xorshift64*: the kill moments, reproducible from the seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[test]
fn sigkill_then_resume_gives_the_uninterrupted_adapter() {
    let dir = tmp("kill");
    let data = dir.join("data.jsonl");
    let mut synth = gristmill();
    synth.args(["synth", "--n", "80", "--out"]).arg(&data);
    run_ok(synth);

    // The reference: one uninterrupted run. Its duration only spreads the kill moments.
    let full = dir.join("full");
    let t0 = Instant::now();
    run_ok(train_cmd(&data, &full, false));
    let span = t0.elapsed();
    let reference = std::fs::read(full.join("adapter_model.safetensors")).unwrap();

    let run = dir.join("killed");
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut kills = 0;
    let mut started = false;
    for attempt in 0..6 {
        let mut child = train_cmd(&data, &run, started).spawn().unwrap();
        started = true;
        // The first kill waits for a checkpoint to exist; later ones resume from one already.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !has_checkpoint(&run) && child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let frac = (next(&mut rng) % 1000) as f64 / 1000.0;
        std::thread::sleep(span.mul_f64(0.6 * frac));
        if child.try_wait().unwrap().is_some() {
            // Finished before the kill: start over from scratch with the moments that follow.
            std::fs::remove_dir_all(&run).unwrap();
            started = false;
            eprintln!("attempt {attempt}: the run ended before the kill");
            continue;
        }
        child.kill().unwrap(); // SIGKILL on Unix: no handler runs, nothing is flushed
        if child.wait().unwrap().success() {
            // It ended between the check and the kill.
            std::fs::remove_dir_all(&run).unwrap();
            started = false;
            continue;
        }
        kills += 1;
        eprintln!("attempt {attempt}: killed at {:.0}% of the span", 60.0 * frac);
        if kills == 3 {
            break;
        }
    }
    assert!(kills > 0, "every run ended before its kill: the run is too short to test this");
    assert!(!run.join("adapter_model.safetensors").exists(), "a killed run must not have a final adapter yet");
    run_ok(train_cmd(&data, &run, true));
    let resumed = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    assert!(resumed == reference, "the resumed run's adapter differs from the uninterrupted run's");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["global_step"].as_u64(), Some(STEPS as u64), "{state}");
    std::fs::remove_dir_all(&dir).unwrap();
}
