//! Golden tests against fixtures written by the reference stack (transformers 5.17 +
//! bitsandbytes 0.50.2 on an H200; `tests/golden/make_tiny_llama.py` makes them).
//!
//! Tolerances, one place:
//! - NF4 quantization: bit-exact (packed codes, 8-bit absmax codes, nested absmax, offset, code
//!   books, dequantized values).
//! - f32 forward vs transformers' float32 CPU forward: |Δlogit| ≤ 2e-4 (both accumulate in f32,
//!   in different orders, through 2 layers; logits are O(5)).
//! - 4-bit forward vs transformers + bitsandbytes with the whole model in float32: the same
//!   bound as the f32 forward, 2e-4.
//! - 4-bit forward vs transformers + bitsandbytes with a bf16 model: the reference runs the
//!   non-quantized parts in bf16 (embeddings, norms, attention, residual stream) while gristmill
//!   runs them in f32 on the same bf16-rounded dequantized weights, so the bound is bf16's: the
//!   two reference runs (bf16 vs f32) differ by 0.19 at most on these logits (range ±8); we allow
//!   0.3 and require the argmax to agree at ≥ 90% of positions.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::fixtures;
use gristmill::model::{BasePrecision, LlamaModel};
use gristmill::safetensors::{Checkpoint, LoadAs, LoadedWeight};
use gristmill_core::nf4::{Absmax, Nf4Tensor, block_absmax, dynamic_map_signed};
use gristmill_core::{DType, Shape};

fn bytes(ck: &Checkpoint, name: &str) -> Vec<u8> {
    ck.get(name).unwrap().data.to_vec()
}

fn check_quantization(ck: &Checkpoint, prefix: &str, input: &str, dtype: DType) {
    let x = ck.to_f32(input).unwrap();
    let shape = ck.get(input).unwrap().shape.to_vec();
    let ours = Nf4Tensor::quantize(&x, Shape::new(shape).unwrap(), dtype, true).unwrap();

    assert_eq!(block_absmax(&x, 64), ck.to_f32(&format!("{prefix}.absmax_f32")).unwrap(), "{prefix}: block absmax");
    assert_eq!(ours.packed, bytes(ck, &format!("{prefix}.packed")), "{prefix}: packed NF4 codes");
    let Absmax::Double(d) = &ours.absmax else { panic!("double quantization expected") };
    let map = ck.to_f32(&format!("{prefix}.nested_code")).unwrap();
    let ours_map = dynamic_map_signed();
    for (i, (a, b)) in ours_map.iter().zip(&map).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{prefix}: dynamic map entry {i}: ours {a} vs {b}");
    }
    assert_eq!(d.offset.to_bits(), ck.to_f32(&format!("{prefix}.offset")).unwrap()[0].to_bits(), "{prefix}: offset");
    assert_eq!(d.q, bytes(ck, &format!("{prefix}.absmax_q8")), "{prefix}: 8-bit absmax codes");
    assert_eq!(d.nested_absmax, ck.to_f32(&format!("{prefix}.nested_absmax")).unwrap(), "{prefix}: nested absmax");
    let deq = ours.dequantize_rounded().unwrap();
    let want = ck.to_f32(&format!("{prefix}.dequant")).unwrap();
    let bad = deq.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(bad, 0, "{prefix}: {bad} dequantized values differ");
}

#[test]
fn nf4_quantization_is_bit_identical_to_bitsandbytes() {
    let ck = Checkpoint::open(fixtures().join("nf4_golden.safetensors")).unwrap();
    // A bf16 weight with a zero block, an outlier and a ragged last block (257 × 513).
    check_quantization(&ck, "w", "w_bf16", DType::BF16);
    // f32 values exactly on the decision thresholds and one ulp either side.
    check_quantization(&ck, "ties", "ties_f32", DType::F32);
}

/// (input ids per sequence, logits (B, T, V)) of a golden file.
fn golden(dir: &str) -> (Vec<Vec<u32>>, Vec<f32>, usize) {
    golden_file(&fixtures().join(dir).join("golden.safetensors"))
}

/// (input ids per sequence, logits (B, T, V), V) of a logits fixture file.
fn golden_file(path: &std::path::Path) -> (Vec<Vec<u32>>, Vec<f32>, usize) {
    let ck = Checkpoint::open(path).unwrap();
    let ids = ck.to_f32("input_ids").unwrap();
    let shape = ck.get("input_ids").unwrap().shape.to_vec();
    let (b, t) = (shape[0], shape[1]);
    let seqs = (0..b).map(|i| ids[i * t..(i + 1) * t].iter().map(|&v| v as u32).collect()).collect();
    let v = *ck.get("logits").unwrap().shape.last().unwrap();
    (seqs, ck.to_f32("logits").unwrap(), v)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

#[test]
fn f32_forward_matches_transformers() {
    let model = LlamaModel::load(&fixtures().join("tiny_llama"), BasePrecision::F32).unwrap();
    let (seqs, logits, v) = golden("tiny_llama");
    let t = seqs[0].len();
    for (b, ids) in seqs.iter().enumerate() {
        let mut cache = model.new_cache();
        let ours = model.forward(ids, &mut cache, true).unwrap();
        let want = &logits[b * t * v..(b + 1) * t * v];
        let d = max_diff(&ours, want);
        assert!(d <= 2e-4, "sequence {b}: max |Δlogit| {d}");
    }
}

#[test]
fn kv_cache_decoding_matches_the_full_forward() {
    let model = LlamaModel::load(&fixtures().join("tiny_llama"), BasePrecision::F32).unwrap();
    let (seqs, logits, v) = golden("tiny_llama");
    let ids = &seqs[1];
    let t = ids.len();
    let mut cache = model.new_cache();
    // A 5-token prefill, then one token at a time: every step's logits are the full forward's.
    let mut got = model.forward(&ids[..5], &mut cache, true).unwrap();
    for &id in &ids[5..] {
        got.extend(model.forward(&[id], &mut cache, false).unwrap());
    }
    assert_eq!(cache.len(), t);
    let d = max_diff(&got, &logits[t * v..2 * t * v]);
    assert!(d <= 2e-4, "max |Δlogit| {d}");
}

#[test]
fn our_nf4_of_the_bf16_model_equals_the_bitsandbytes_checkpoint() {
    let dense = Checkpoint::open(fixtures().join("tiny_llama")).unwrap();
    let bnb = Checkpoint::open(fixtures().join("tiny_llama_bnb4")).unwrap();
    let mut n = 0;
    for name in dense.names() {
        if !name.contains("_proj.weight") {
            continue;
        }
        let LoadedWeight::Nf4(ours) = dense.load_weight(name, LoadAs::Nf4).unwrap() else { panic!("nf4 asked") };
        let LoadedWeight::Nf4(theirs) = bnb.load_weight(name, LoadAs::Nf4).unwrap() else { panic!("bnb is 4-bit") };
        assert_eq!(ours, theirs, "{name}");
        n += 1;
    }
    assert_eq!(n, 14, "2 layers × 7 projections");
}

fn check_bnb_logits(dir: &str, tol: f32) {
    let model = LlamaModel::load(&fixtures().join(dir), BasePrecision::AsStored).unwrap();
    assert!(model.layers.iter().all(|l| matches!(l.q.weight, gristmill::model::Weight::Nf4(_))));
    let (seqs, logits, v) = golden(dir);
    let t = seqs[0].len();
    let (mut agree, mut total) = (0, 0);
    for (b, ids) in seqs.iter().enumerate() {
        let ours = model.forward(ids, &mut model.new_cache(), true).unwrap();
        let want = &logits[b * t * v..(b + 1) * t * v];
        let d = max_diff(&ours, want);
        assert!(d <= tol, "{dir} sequence {b}: max |Δlogit| {d} > {tol}");
        for p in 0..t {
            total += 1;
            agree += usize::from(argmax(&ours[p * v..(p + 1) * v]) == argmax(&want[p * v..(p + 1) * v]));
        }
    }
    assert!(agree * 10 >= total * 9, "{dir}: argmax agrees at {agree} of {total} positions");
}

#[test]
fn bitsandbytes_f32_checkpoint_loads_and_matches_its_logits() {
    check_bnb_logits("tiny_llama_bnb4_f32", 2e-4);
}

#[test]
fn bitsandbytes_bf16_checkpoint_loads_and_matches_its_logits() {
    check_bnb_logits("tiny_llama_bnb4", 0.3);
}

#[test]
fn an_adapter_we_trained_gives_peft_s_logits() {
    // tests/fixtures/peft_adapter: an adapter written by `gristmill train` on the tiny model, and
    // the logits transformers + PEFT computed with it (tests/golden/check_peft_adapter.py).
    let dir = fixtures().join("peft_adapter");
    let mut model = LlamaModel::load(&fixtures().join("tiny_llama"), BasePrecision::F32).unwrap();
    assert_eq!(gristmill::adapter::load_peft_adapter(&mut model, &dir).unwrap(), 14);
    check_logits(&model, &dir.join("peft_adapter_logits.safetensors"), "PEFT");
}

/// Our full-sequence logits on a fixture's inputs are within 2e-4 of its logits.
fn check_logits(model: &LlamaModel, path: &std::path::Path, reference: &str) {
    let (seqs, want, v) = golden_file(path);
    for (s, seq) in seqs.iter().enumerate() {
        let t = seq.len();
        let ours = model.forward(seq, &mut model.new_cache(), true).unwrap();
        let d = max_diff(&ours, &want[s * t * v..(s + 1) * t * v]);
        assert!(d <= 2e-4, "sequence {s}: max |Δlogit| {d} against {reference}");
    }
}

#[test]
fn a_model_we_merged_gives_transformers_logits() {
    // `gristmill merge` of tests/fixtures/tiny_llama + peft_adapter, loaded by transformers
    // (tests/golden/check_merged.py): the same merged weights give the same logits here.
    let adapter = fixtures().join("peft_adapter");
    let out = std::env::temp_dir().join(format!("gristmill-golden-merged-{}", std::process::id()));
    gristmill::merge::merge_adapter(&fixtures().join("tiny_llama"), &adapter, &out, &Default::default()).unwrap();
    let model = LlamaModel::load(&out, BasePrecision::F32).unwrap();
    check_logits(&model, &adapter.join("merged_logits.safetensors"), "transformers on the merged model");
    std::fs::remove_dir_all(&out).ok();
}
