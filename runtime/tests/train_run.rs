//! Whole training runs on the tiny fixture model: what a run writes, and that stopping and
//! resuming gives exactly the losses of an uninterrupted run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{fixtures, tiny_run_toml, tmp, write_synth_data};
use gristmill::model::{BasePrecision, LlamaModel};
use gristmill::train::config::TrainConfig;
use gristmill::train::metrics::{Record, read_metrics};
use gristmill::train::trainer::{Hooks, train};
use std::path::{Path, PathBuf};

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
    let dir = tmp("train-outputs");
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
    let dir = tmp("train-resume");
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
    let dir = tmp("train-packing");
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
    assert!(err.contains(": the loss is ") && err.contains("checkpoint-"), "{err}");
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

/// A GRIT run on the tiny model with every part of GRIT acting within a few steps.
fn grit_config(data: &Path, out: &Path, extra: &str) -> TrainConfig {
    let mut c = config(data, out, extra);
    common::quick_grit(&mut c);
    c
}

#[test]
fn a_grit_run_acts_logs_and_resumes_exactly() {
    let dir = tmp("grit");
    let data = write_synth_data(&dir);
    let adamw = train(&config(&data, &dir.join("adamw"), ""), Hooks::default()).unwrap();
    let full = train(&grit_config(&data, &dir.join("grit"), ""), Hooks::default()).unwrap();
    assert_eq!((adamw.steps, full.steps), (12, 12));
    let run = dir.join("grit");
    let records = read_metrics(&run.join("metrics.jsonl")).unwrap();
    // Preconditioning acted: the natural gradient's norm differs from the gradient's.
    let ratios: Vec<f64> = records.iter().filter_map(|r| r.extra.get("grit_ng_ratio")?.as_f64()).collect();
    assert!(ratios.len() >= 10, "every step after the first inversion is preconditioned: {ratios:?}");
    assert!(ratios.iter().all(|r| r.is_finite() && (r - 1.0).abs() > 1e-3), "{ratios:?}");
    assert!(records.iter().any(|r| r.extra.contains_key("grit_lambda_mean")));
    assert!(records.iter().any(|r| r.extra.get("grit_reg_loss").and_then(|v| v.as_f64()).is_some_and(|v| v > 0.0)));
    // grit.jsonl: inversions every 2 steps, reprojections at 4, 8, 12 with k in [2, r].
    let text = std::fs::read_to_string(run.join("grit.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps_of = |kind: &str| -> Vec<u64> {
        events.iter().filter(|e| e["event"] == kind).map(|e| e["step"].as_u64().unwrap()).collect()
    };
    assert_eq!(steps_of("reproject"), vec![4, 8, 12]);
    assert!(steps_of("invert").len() >= 5, "{:?}", steps_of("invert"));
    for e in events.iter().filter(|e| e["event"] == "reproject") {
        let ks: Vec<u64> = e["k"].as_array().unwrap().iter().map(|k| k.as_u64().unwrap()).collect();
        assert_eq!(ks.len(), 14, "two layers × seven modules");
        assert!(ks.iter().all(|&k| (2..=4).contains(&k)), "{ks:?}");
        assert_eq!(e["top_eigs_a"].as_array().unwrap().len(), 14);
    }
    assert!(run.join("grit-eigs-step-4.png").is_file(), "the eigenvalue heat map is drawn");
    // The adapter differs from the AdamW twin's: GRIT changed the updates.
    let a = std::fs::read(dir.join("adamw/adapter_model.safetensors")).unwrap();
    let g = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    assert_ne!(a, g);

    // Stop after step 7 and resume: the same losses and the same final adapter.
    let part_dir = dir.join("grit-part");
    let mut stop_at_7 = |r: &Record| r.step < 7;
    let hooks = Hooks { on_step: Some(&mut stop_at_7), ..Default::default() };
    train(&grit_config(&data, &part_dir, ""), hooks).unwrap();
    assert!(part_dir.join("checkpoint-7/grit_state.json").is_file());
    train(&grit_config(&data, &part_dir, "resume = \"latest\""), Hooks::default()).unwrap();
    assert_eq!(losses(&read_metrics(&part_dir.join("metrics.jsonl")).unwrap()), losses(&records));
    let resumed = std::fs::read(part_dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(resumed, g, "the resumed GRIT run ends with the uninterrupted run's adapter, bit for bit");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_grit_recipe_and_its_adamw_twin_differ_in_the_optimizer_only() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let load = |f: &str| TrainConfig::from_toml_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap();
    let (g, mut a) = (load("grit-conservative.toml"), load("grit-baseline-adamw.toml"));
    assert_eq!(g.optim.optimizer, gristmill::train::config::OptimizerKind::Grit);
    a.optim.optimizer = g.optim.optimizer;
    a.output.dir = g.output.dir.clone();
    assert_eq!(a, g);
    // The seeds' conservative recipe (docs/grit.md §7).
    assert_eq!((g.grit.kfac_update_freq, g.grit.kfac_damping, g.grit.lambda_kfac), (10, 1e-5, 1e-6));
    assert_eq!((g.grit.kfac_min_samples, g.grit.reprojection_warmup_steps), (16, 20));
    assert!(!g.grit.enable_rank_adaptation && g.grit.use_two_sided_reprojection);
    assert_eq!((g.lora.r, g.lora.alpha, g.train.seed, g.train.max_steps), (16, 16.0, 3407, Some(200)));
}

#[test]
fn hidden_state_tracking_feeds_drift_and_survives_a_resume() {
    let dir = tmp("drift");
    let data = write_synth_data(&dir);
    let mut cfg = config(&data, &dir.join("run"), "");
    cfg.train.max_steps = Some(4);
    cfg.train.track_hidden_every = 2;
    cfg.train.track_examples = 3;
    // Stop after step 3 (a checkpoint is written), then resume to the end.
    let mut stop_at_3 = |r: &Record| r.step < 3;
    let part = train(&cfg, Hooks { on_step: Some(&mut stop_at_3), ..Default::default() }).unwrap();
    assert_eq!(part.steps, 3);
    let mut again = cfg.clone();
    again.output.resume = Some("latest".into());
    train(&again, Hooks::default()).unwrap();

    let r = gristmill::drift::drift(&dir.join("run")).unwrap();
    // Step 0 (the base), 2 and 4, each once though the run stopped at 3.
    assert_eq!(r.steps, [0, 2, 4]);
    assert_eq!((r.layers, r.examples), (2, 3));
    let bytes = std::fs::metadata(dir.join("run/hidden_states.f32")).unwrap().len();
    assert_eq!(bytes, 3 * 2 * 3 * 96 * 4);
    for l in 0..2 {
        assert!((r.cka[0][l] - 1.0).abs() < 1e-9 && (r.cosine[0][l] - 1.0).abs() < 1e-9);
        for s in 1..3 {
            assert!(r.cka[s][l] <= 1.0 + 1e-9 && r.cosine[s][l] <= 1.0 + 1e-9);
        }
    }
    // Training moved the states: the last layer's cosine at step 4 is below 1.
    assert!(r.cosine[2][1] < 1.0 - 1e-7, "{:?}", r.cosine);
    assert_eq!(r.table().lines().count(), 1 + 3 * 2);
    let png = dir.join("drift.png");
    r.plot(&png).unwrap();
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    // A run without tracking says how to get it.
    let e = gristmill::drift::drift(&dir).unwrap_err().to_string();
    assert!(e.contains("track_hidden_every"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
