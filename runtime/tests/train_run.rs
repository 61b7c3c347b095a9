//! Whole training runs on the tiny fixture model: what a run writes, and that stopping and
//! resuming gives exactly the losses of an uninterrupted run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{fixtures, tiny_run_toml, write_synth_data};
use gristmill::model::{BasePrecision, LlamaModel};
use gristmill::train::config::TrainConfig;
use gristmill::train::metrics::{Record, read_metrics};
use gristmill::train::trainer::{Hooks, train};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gristmill-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(data: &Path, out: &Path, extra: &str) -> TrainConfig {
    let text = format!(
        r#"{head}dropout = 0.1
[optim]
lr = 3e-3
warmup_steps = 2
[train]
max_steps = 12
batch_size = 3
grad_accum = 2
save_every = 5
eval_every = 6
seed = 11
[output]
dir = "{out}"
{extra}
"#,
        head = tiny_run_toml(data),
        out = out.display(),
    );
    TrainConfig::from_toml_str(&text).unwrap()
}

fn losses(records: &[Record]) -> Vec<(usize, f64)> {
    records.iter().filter_map(|r| r.loss.map(|l| (r.step, l))).collect()
}

#[test]
fn a_run_writes_its_outputs_and_the_adapter_loads() {
    let dir = tmp("outputs");
    let data = write_synth_data(&dir);
    let run = dir.join("run");
    let out = train(&config(&data, &run, ""), Hooks::default()).unwrap();
    assert_eq!((out.steps, out.total_steps), (12, 12));
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.json",
        "metrics.jsonl",
        "config.toml",
        "loss.png",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    assert!(
        std::fs::read_dir(&run).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("events.out.tfevents."))
    );
    let records = read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(losses(&records).len(), 12);
    assert!(records.iter().any(|r| r.eval_loss.is_some()), "evaluations are logged");
    // The written config reproduces the run's configuration.
    let again = TrainConfig::from_toml_str(&std::fs::read_to_string(run.join("config.toml")).unwrap()).unwrap();
    assert_eq!(again, config(&data, &run, ""));
    // The adapter loads for generation and changes the model's output.
    let base = LlamaModel::load(&fixtures().join("tiny_llama"), BasePrecision::Nf4).unwrap();
    let mut adapted = base.clone();
    assert_eq!(gristmill::adapter::load_peft_adapter(&mut adapted, &run).unwrap(), 14);
    let ids = [5u32, 17, 42, 99];
    let a = base.forward(&ids, &mut base.new_cache(), false).unwrap();
    let b = adapted.forward(&ids, &mut adapted.new_cache(), false).unwrap();
    assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-4), "the trained adapter changes the logits");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn stopping_and_resuming_gives_the_same_losses() {
    let dir = tmp("resume");
    let data = write_synth_data(&dir);
    let full = train(&config(&data, &dir.join("full"), ""), Hooks::default()).unwrap();
    assert_eq!(full.steps, 12);
    let want = losses(&read_metrics(&dir.join("full/metrics.jsonl")).unwrap());

    // Stop after step 7 (as Ctrl-C would: a checkpoint is written), then resume.
    let part_dir = dir.join("part");
    let mut stop_at_7 = |r: &Record| r.step < 7;
    let hooks = Hooks { on_step: Some(&mut stop_at_7), ..Default::default() };
    let part = train(&config(&data, &part_dir, ""), hooks).unwrap();
    assert!(part.interrupted);
    assert_eq!(part.steps, 7);
    let resumed = train(&config(&data, &part_dir, "resume = \"latest\""), Hooks::default()).unwrap();
    assert_eq!(resumed.steps, 12);
    let got = losses(&read_metrics(&part_dir.join("metrics.jsonl")).unwrap());
    assert_eq!(got.len(), 12, "each step logged once: {got:?}");
    for ((s1, l1), (s2, l2)) in want.iter().zip(&got) {
        assert_eq!(s1, s2);
        assert!((l1 - l2).abs() <= 1e-6 * l1.abs(), "step {s1}: uninterrupted {l1} vs resumed {l2}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn example_recipes_parse_and_validate() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            TrainConfig::from_toml_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 4, "examples/ holds the recipes");
}

#[test]
fn packing_trains_and_a_diverging_run_stops_with_its_last_checkpoint_named() {
    let dir = tmp("packing");
    let data = write_synth_data(&dir);
    // Packing: several examples per row, attention kept inside each.
    let packed = train(&config(&data, &dir.join("packed"), "").with_packing(), Hooks::default()).unwrap();
    assert_eq!(packed.steps, 12);
    assert!(packed.last_loss.is_finite());

    // A learning rate that blows the adapter up: the run stops on the first non-finite loss and
    // says which checkpoint is the last good one.
    let mut cfg = config(&data, &dir.join("diverge"), "");
    cfg.optim.lr = 1e30;
    cfg.optim.warmup_steps = 0;
    cfg.optim.max_grad_norm = 0.0;
    cfg.train.save_every = 1;
    let err = train(&cfg, Hooks::default()).unwrap_err().to_string();
    assert!(err.contains("the loss became") && err.contains("checkpoint-"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

trait WithPacking {
    fn with_packing(self) -> Self;
}

impl WithPacking for TrainConfig {
    fn with_packing(mut self) -> Self {
        self.data.packing = true;
        self
    }
}
