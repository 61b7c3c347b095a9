//! GGUF export round trip on the tiny fixture model: export, import with our own importer, and
//! compare the configuration, the tokenizer's ids and the logits.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::fixtures;
use gristmill::config::ModelConfig;
use gristmill::core::DType;
use gristmill::gguf::{GgufFile, ImportOptions, import_gguf};
use gristmill::gguf_export::{ExportType, export_gguf};
use gristmill::model::{BasePrecision, LlamaModel};
use gristmill::safetensors::Checkpoint;
use gristmill::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gristmill-export-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn logits(dir: &Path) -> Vec<f32> {
    let m = LlamaModel::load(dir, BasePrecision::F32).unwrap();
    m.forward(&[5, 17, 42, 99, 296, 3], &mut m.new_cache(), false).unwrap()
}

/// Exports as `ty`, imports as f32, checks config and tokenizer; returns the imported directory.
fn round_trip(root: &Path, ty: ExportType, name: &str) -> PathBuf {
    let src = fixtures().join("tiny_llama");
    let gguf = root.join(format!("{name}.gguf"));
    let summary = export_gguf(&src, &gguf, ty).unwrap();
    // 2 layers × 9 + embeddings, final norm, lm_head, rope_freqs.
    assert_eq!(summary.tensors, 22);
    let f = GgufFile::open(&gguf).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), "gpt-2");
    assert_eq!(f.tensor("blk.1.ffn_norm.weight").unwrap().ty.name(), "F32");
    let out = root.join(name);
    import_gguf(&gguf, &out, &ImportOptions { dtype: DType::F32 }, &mut |_, _| {}).unwrap();

    let a = ModelConfig::from_file(src.join("config.json")).unwrap();
    let b = ModelConfig::from_file(out.join("config.json")).unwrap();
    assert_eq!(
        (a.vocab_size, a.hidden_size, a.intermediate_size, a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim),
        (b.vocab_size, b.hidden_size, b.intermediate_size, b.num_layers, b.num_heads, b.num_kv_heads, b.head_dim)
    );
    assert_eq!(
        (a.rms_norm_eps, a.rope, a.max_position_embeddings),
        (b.rms_norm_eps, b.rope, b.max_position_embeddings)
    );
    assert_eq!(a.tie_word_embeddings, b.tie_word_embeddings);

    let (ta, tb) = (Tokenizer::from_dir(&src).unwrap(), Tokenizer::from_dir(&out).unwrap());
    for s in
        ["Hello world", "The quick brown fox: 12 + 30 = 42.", "<|im_start|>user\nhi<|im_end|>", " ünïcode  spaces "]
    {
        assert_eq!(ta.encode(s, true).unwrap(), tb.encode(s, true).unwrap(), "{s:?}");
    }
    assert_eq!(ta.eos_ids().first(), tb.eos_ids().first());
    assert_eq!(ta.chat_template(), tb.chat_template());
    out
}

#[test]
fn bf16_export_is_lossless_and_f16_rounds_each_value_once() {
    let root = tmp("exact");
    let want = logits(&fixtures().join("tiny_llama"));
    // The fixture is stored in bf16: a bf16 export is lossless.
    let dir = round_trip(&root, ExportType::Bf16, "bf16");
    assert_eq!(logits(&dir), want);
    // f16: every matrix value comes back as its f16 rounding (exact where f16 holds it; the
    // fixture's smallest weights are below f16's normal range), norms exactly.
    let dir = round_trip(&root, ExportType::F16, "f16");
    let (src, back) = (Checkpoint::open(fixtures().join("tiny_llama")).unwrap(), Checkpoint::open(&dir).unwrap());
    let mut inexact = 0;
    for name in src.names() {
        let (x, y) = (src.to_f32(name).unwrap(), back.to_f32(name).unwrap());
        let matrix = src.get(name).unwrap().shape.len() == 2;
        for (u, v) in x.iter().zip(&y) {
            let want = if matrix { half::f16::from_f32(*u).to_f32() } else { *u };
            assert_eq!(*v, want, "{name}: {u}");
            inexact += usize::from(v != u);
        }
    }
    assert!(inexact > 0, "the fixture has values f16 cannot hold: the comparison above is not vacuous");
    let got = logits(&dir);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = want.iter().zip(&got).fold(0f32, |m, (u, v)| m.max((u - v).abs()));
    assert!(err <= 1e-3 * scale, "f16 logits off by {err} at scale {scale}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn q8_0_export_is_within_its_rounding() {
    let root = tmp("q8");
    let src_dir = fixtures().join("tiny_llama");
    let dir = round_trip(&root, ExportType::Q8_0, "q8");
    let f = GgufFile::open(root.join("q8.gguf")).unwrap();
    assert_eq!(f.tensor("blk.0.attn_v.weight").unwrap().ty.name(), "Q8_0");
    // ffn_down rows hold 200 values, not a whole number of 32-value blocks: F16.
    assert_eq!(f.tensor("blk.0.ffn_down.weight").unwrap().ty.name(), "F16");
    // Every weight within half a quantization step of its block, plus the rounding of the step to
    // f16 (relative 2^-11) times the largest quant, 127.
    let (a, b) = (Checkpoint::open(&src_dir).unwrap(), Checkpoint::open(&dir).unwrap());
    let name = "model.layers.0.self_attn.v_proj.weight";
    let (x, y) = (a.to_f32(name).unwrap(), b.to_f32(name).unwrap());
    assert_eq!(x.len(), y.len());
    for (bx, by) in x.chunks(32).zip(y.chunks(32)) {
        let step = bx.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        for (u, v) in bx.iter().zip(by) {
            assert!((u - v).abs() <= (0.5 + 127.0 / 2048.0) * step * 1.001, "{u} vs {v}, step {step}");
        }
    }
    // Logits: close, not equal. Each weight carries up to 0.4% of its block's largest as error; over
    // two layers of random weights (measured: RMS error 2.9% of the logits' RMS) that stays within
    // 5%, with the same greedy token at every position.
    let (want, got) = (logits(&src_dir), logits(&dir));
    let rms = |v: &mut dyn Iterator<Item = f32>| {
        let (s, n) = v.fold((0f64, 0usize), |(s, n), x| (s + f64::from(x) * f64::from(x), n + 1));
        (s / n.max(1) as f64).sqrt()
    };
    let err = rms(&mut want.iter().zip(&got).map(|(u, v)| u - v));
    let spread = rms(&mut want.iter().copied());
    assert!(err > 0.0 && err <= 0.05 * spread, "RMS logit error {err} against RMS {spread}");
    let argmax = |v: &[f32]| -> Vec<usize> {
        v.chunks(300).map(|r| r.iter().enumerate().fold(0, |b, (i, x)| if *x > r[b] { i } else { b })).collect()
    };
    assert_eq!(argmax(&want), argmax(&got));
    std::fs::remove_dir_all(&root).ok();
}
