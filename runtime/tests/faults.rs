//! Faults during training: a NaN or infinite loss or gradient (stop with the last good checkpoint
//! intact, or skip the step when asked), and a full disk while saving (the previous checkpoint
//! stays usable). The SIGKILL-and-resume test is the CLI's (cli/tests/kill_resume.rs).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{fixtures, tmp, write_synth_data};
use gristmill::core::DType;
use gristmill::core::bnb::RawTensor;
use gristmill::model::{BasePrecision, LlamaModel};
use gristmill::safetensors::{Checkpoint, write_safetensors};
use gristmill::train::checkpoint::{CheckpointManager, list_checkpoints};
use gristmill::train::config::TrainConfig;
use gristmill::train::trainer::{Hooks, train};
use gristmill::util::{tmp_path, write_atomic};
use std::path::Path;

/// A run that diverges: a learning rate that blows the adapter up within a few steps.
fn diverging(data: &Path, out: &Path, extra: &str) -> TrainConfig {
    let text = format!(
        "[model]\npath = {:?}\n[data]\npaths = [{:?}]\nmax_seq_len = 96\n[lora]\nr = 4\nalpha = 8\n\
         [optim]\nlr = 1e30\nmax_grad_norm = 0.0\n[train]\nmax_steps = 8\nbatch_size = 2\nsave_every = 1\n\
         keep_last = 0\nseed = 3\n{extra}\n[output]\ndir = {:?}\n",
        fixtures().join("tiny_llama"),
        data,
        out
    );
    TrainConfig::from_toml_str(&text).unwrap()
}

#[test]
fn a_nonfinite_loss_stops_the_run_and_the_last_checkpoint_loads() {
    let dir = tmp("faults-nan");
    let data = write_synth_data(&dir);
    let run = dir.join("run");
    let msg = train(&diverging(&data, &run, ""), Hooks::default()).unwrap_err().to_string();
    // "step N: the loss is NaN: stopping, ... The last good checkpoint is checkpoint-(N-1) (...)"
    let step: usize = msg.strip_prefix("step ").and_then(|r| r.split(':').next()).unwrap().parse().unwrap();
    assert!(step >= 2, "{msg}");
    let what = msg.split(": ").nth(1).unwrap();
    assert!(what.starts_with("the loss is ") || what.starts_with("the gradient norm is "), "{msg}");
    let last = run.join(format!("checkpoint-{}", step - 1));
    assert!(
        msg.contains(&format!("The last good checkpoint is checkpoint-{} ({})", step - 1, last.display())),
        "{msg}"
    );
    assert!(msg.contains("train.skip_nonfinite = true"), "{msg}");
    // Nothing of the bad step was saved, and the last checkpoint is whole: it loads onto the base.
    let steps: Vec<usize> = list_checkpoints(&run).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, (1..step).collect::<Vec<_>>());
    let mut model = LlamaModel::load(&fixtures().join("tiny_llama"), BasePrecision::F32).unwrap();
    assert_eq!(gristmill::adapter::load_peft_adapter(&mut model, &last).unwrap(), 14);
    Checkpoint::open(last.join("optimizer.safetensors")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn skip_nonfinite_skips_the_bad_steps_and_finishes() {
    let dir = tmp("faults-skip");
    let data = write_synth_data(&dir);
    let run = dir.join("run");
    let out = train(&diverging(&data, &run, "skip_nonfinite = true"), Hooks::default()).unwrap();
    assert_eq!(out.steps, 8);
    let note = out.notes.iter().find(|n| n.contains("skipped for a NaN or infinite loss or gradient"));
    let skipped: usize = note.unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!((1..8).contains(&skipped), "{:?}", out.notes);
    // A skipped step changes nothing: the final adapter is the last finite step's checkpoint.
    let last_good = 8 - skipped;
    let a = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(run.join(format!("checkpoint-{last_good}/adapter_model.safetensors"))).unwrap();
    assert!(a == b, "the final adapter differs from checkpoint-{last_good}'s");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Points the temporary file of a write to `path` at /dev/full, where every write fails with
/// ENOSPC, as on a full disk. `None` (and a note) where there is no /dev/full.
fn full_disk_at(path: &Path) -> Option<()> {
    if !Path::new("/dev/full").exists() {
        eprintln!("skipped: no /dev/full on this system to simulate a full disk");
        return None;
    }
    #[cfg(unix)]
    std::os::unix::fs::symlink("/dev/full", tmp_path(path)).unwrap();
    Some(())
}

#[test]
fn a_full_disk_while_saving_keeps_the_previous_checkpoint() {
    let dir = tmp("faults-full");
    let tensor = |v: f32| RawTensor {
        name: "w".into(),
        dtype: DType::F32,
        shape: vec![4],
        data: [v; 4].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into(),
    };
    // A single file: the old content stays.
    let file = dir.join("state.json");
    write_atomic(&file, b"old").unwrap();
    if full_disk_at(&file).is_none() {
        return;
    }
    let e = write_atomic(&file, b"new").unwrap_err().to_string();
    assert_eq!(e, format!("{}: No space left on device (os error 28)", tmp_path(&file).display()));
    assert_eq!(std::fs::read(&file).unwrap(), b"old");
    assert!(!tmp_path(&file).exists(), "the partial file is removed");

    // A checkpoint written as the trainer writes one (tensors, then its JSON state files): the
    // disk fills up partway, the save fails, checkpoint-1 is whole and no checkpoint-2 appears.
    let run = dir.join("run");
    let mut m = CheckpointManager::new(&run, 0).unwrap();
    let write = |d: &Path, v: f32, full: bool| {
        write_safetensors(&d.join("adapter_model.safetensors"), &[tensor(v)], None)?;
        let state = d.join("trainer_state.json");
        if full {
            full_disk_at(&state);
        }
        write_atomic(&state, format!("{{\"global_step\": {v}}}").as_bytes())
    };
    m.save(1, false, |d| write(d, 1.0, false)).unwrap();
    let e = m.save(2, false, |d| write(d, 2.0, true)).unwrap_err().to_string();
    assert!(e.contains("No space left on device"), "{e}");
    let names: Vec<String> =
        std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["checkpoint-1"]);
    let ck = Checkpoint::open(run.join("checkpoint-1/adapter_model.safetensors")).unwrap();
    assert_eq!(ck.to_f32("w").unwrap(), [1.0; 4]);
    assert_eq!(std::fs::read_to_string(run.join("checkpoint-1/trainer_state.json")).unwrap(), "{\"global_step\": 1}");
    std::fs::remove_dir_all(&dir).unwrap();
}
