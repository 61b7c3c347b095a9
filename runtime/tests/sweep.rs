//! Sweeps on the tiny fixture model: a 2×2 grid of 2-step runs, and an interrupted sweep that a
//! second invocation finishes (finished runs skipped, the interrupted one resumed from its
//! checkpoint) with the losses of an uninterrupted sweep.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{tiny_run_toml, write_synth_data};
use gristmill::sweep::{Status, SweepHooks, parse_grid, run_sweep};
use gristmill::train::metrics::{Record, read_metrics};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gristmill-sweep-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn base_config(dir: &Path) -> PathBuf {
    let data = write_synth_data(dir);
    let text = format!(
        r#"{head}[optim]
lr = 3e-3
[train]
max_steps = 2
batch_size = 2
eval_every = 2
save_every = 1
[output]
dir = "unused"
"#,
        head = tiny_run_toml(&data),
    );
    let path = dir.join("base.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn losses(run: &Path) -> Vec<(usize, f64)> {
    read_metrics(&run.join("metrics.jsonl")).unwrap().iter().filter_map(|r| r.loss.map(|l| (r.step, l))).collect()
}

const NAMES: [&str; 4] = ["lr1e-3_seed1", "lr1e-3_seed2", "lr5e-3_seed1", "lr5e-3_seed2"];

#[test]
fn a_two_by_two_grid_trains_every_point_and_an_interrupted_sweep_resumes() {
    let dir = tmp("grid");
    let config = base_config(&dir);
    let axes = parse_grid("lr=1e-3,5e-3 seed=1,2").unwrap();

    // Uninterrupted.
    let full = dir.join("full");
    let report = run_sweep(&config, &axes, &[], &full, SweepHooks::default()).unwrap();
    assert!(!report.interrupted);
    let names: Vec<&str> = report.runs.iter().map(|(p, _)| p.name.as_str()).collect();
    assert_eq!(names, NAMES);
    assert!(report.runs.iter().all(|(_, s)| *s == Status::Trained));
    assert_eq!(report.summaries.len(), 4);
    for (name, s) in NAMES.iter().zip(&report.summaries) {
        assert_eq!(s.name, *name);
        assert_eq!(s.steps, 2);
        assert!(s.final_val_loss.is_some());
        let cfg = std::fs::read_to_string(full.join(name).join("config.toml")).unwrap();
        let lr = if name.contains("1e-3") { "lr = 0.001" } else { "lr = 0.005" };
        assert!(cfg.contains(lr), "{name}: {cfg}");
    }
    // Different settings, different runs.
    assert_ne!(losses(&full.join(NAMES[0])), losses(&full.join(NAMES[1])));

    // Interrupted in the third run after its first step.
    let part = dir.join("part");
    let mut stop = |name: &str, r: &Record| !(name == NAMES[2] && r.step == 1);
    let hooks = SweepHooks { on_step: Some(&mut stop), ..Default::default() };
    let report = run_sweep(&config, &axes, &[], &part, hooks).unwrap();
    assert!(report.interrupted);
    let statuses: Vec<Status> = report.runs.iter().map(|(_, s)| *s).collect();
    assert_eq!(statuses, [Status::Trained, Status::Trained, Status::Interrupted, Status::Pending]);
    assert!(part.join(NAMES[2]).join("checkpoint-1").is_dir());
    assert!(!part.join(NAMES[3]).exists());
    let first_log = std::fs::read(part.join(NAMES[0]).join("metrics.jsonl")).unwrap();

    // Again: the finished runs are skipped, the third resumes from its checkpoint, the fourth runs.
    let report = run_sweep(&config, &axes, &[], &part, SweepHooks::default()).unwrap();
    assert!(!report.interrupted);
    let statuses: Vec<Status> = report.runs.iter().map(|(_, s)| *s).collect();
    assert_eq!(statuses, [Status::Skipped, Status::Skipped, Status::Resumed, Status::Trained]);
    assert_eq!(std::fs::read(part.join(NAMES[0]).join("metrics.jsonl")).unwrap(), first_log);
    for name in NAMES {
        let (want, got) = (losses(&full.join(name)), losses(&part.join(name)));
        assert_eq!(got.len(), 2, "{name}: each step logged once: {got:?}");
        for ((s1, l1), (s2, l2)) in want.iter().zip(&got) {
            assert_eq!(s1, s2);
            assert!((l1 - l2).abs() <= 1e-6 * l1.abs(), "{name} step {s1}: {l1} vs {l2}");
        }
    }
    assert_eq!(report.summaries.len(), 4);
    // A third time: nothing left to do.
    let report = run_sweep(&config, &axes, &[], &part, SweepHooks::default()).unwrap();
    assert!(report.runs.iter().all(|(_, s)| *s == Status::Skipped));

    // A bad value fails before anything is trained.
    let e = run_sweep(&config, &parse_grid("batch=0,x").unwrap(), &[], &dir.join("bad"), SweepHooks::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch_size"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
