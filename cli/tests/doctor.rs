//! `gristmill doctor` and `gristmill bench kernels` as a user runs them. On a machine without a
//! GPU (CI) both must say so plainly and succeed; with one, the doctor's JSON must still parse
//! and agree with its exit status (the GPU suite itself runs through scripts/gpu-test).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::process::{Command, Output};

fn gristmill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gristmill")).args(args).output().unwrap()
}

fn doctor_json() -> (serde_json::Value, bool) {
    let out = gristmill(&["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (v, out.status.success())
}

#[test]
fn doctor_json_agrees_with_its_exit_status() {
    let (v, success) = doctor_json();
    assert_eq!(v["ok"].as_bool(), Some(success), "{v}");
    assert_eq!(v["no_gpu"].is_null(), !v["device"].is_null(), "{v}");
}

#[test]
fn without_a_gpu_both_commands_say_so_and_succeed() {
    let (v, _) = doctor_json();
    let Some(why) = v["no_gpu"].as_str() else {
        eprintln!("a GPU is present ({}): the CPU path is not checked here", v["device"]["name"]);
        return;
    };
    for args in [&["doctor"][..], &["bench", "kernels"]] {
        let out = gristmill(args);
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "gristmill {args:?} failed:\n{text}");
        assert!(text.contains(&format!("no usable CUDA GPU: {why}")), "{text}");
        assert!(text.contains("runs on the CPU"), "{text}");
    }
    let out = gristmill(&["bench", "kernels", "--json"]);
    assert!(out.status.success());
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(b["no_gpu"].as_str(), Some(why));
    assert_eq!(b["rows"].as_array().map(Vec::len), Some(0));
}
