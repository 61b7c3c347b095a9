//! The whole model on the GPU against the CPU model (which the golden tests hold to
//! transformers + PEFT + bitsandbytes): logits, incremental decoding, the loss and every LoRA
//! gradient of a training step (with and without dropout), ten QLoRA steps of the golden run, and
//! a whole `train()` run on `cuda` against the same run on `cpu`.
//!
//! With f32 activations on the GPU the tolerances are f32 summation-order ones:
//! - logits: max |Δ| ≤ 1e-4 · max |logit|;
//! - loss: relative 1e-5; LoRA gradients: max |Δ| ≤ 1e-4 · max |g| per tensor;
//! - ten optimizer steps: per-step losses relative 1e-4, factors max |Δ| ≤ 1e-4.
//!
//! With bf16 activations (the GPU default) every stored activation is rounded to 8 bits of
//! mantissa, so the bands are bf16 ones: logits max |Δ| ≤ 8e-2 · max |logit| with mean |Δ| ≤
//! 2e-2 · mean |logit| and ≥ 90% of greedy choices equal, loss relative 1e-2,
//! every LoRA gradient tensor at cosine similarity ≥ 0.99 with the CPU's, and a ten-step run's
//! losses within 2% of the CPU's.
//!
//! Every test here needs a CUDA GPU; `scripts/gpu-test` runs them on the GPU machine.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{fixtures, golden_batch, tiny_run_toml, write_synth_data};
use gristmill::Device;
use gristmill::adapter::{AdapterConfig, LoraSpec, TargetModules, attach_lora_tensors, init_lora};
use gristmill::backend::cuda::CudaBackend;
use gristmill::backend::{CpuBackend, decode_step};
use gristmill::data::Batch;
use gristmill::model::{BasePrecision, LlamaModel};
use gristmill::safetensors::Checkpoint;
use gristmill::train::config::{SchedulerKind, TrainConfig};
use gristmill::train::engine::{ComputeDtype, Engine};
use gristmill::train::metrics::read_metrics;
use gristmill::train::optim::AdamW;
use gristmill::train::schedule::lr_at;
use gristmill::train::step::Dropout;
use gristmill::train::trainer::{Hooks, train};
use gristmill_core::ops::adamw::AdamWConfig;
use gristmill_core::ops::cross_entropy::IGNORE_INDEX;
use std::path::Path;
use std::sync::Arc;

fn gpu() -> Arc<gristmill_kernels::Gpu> {
    match Device::cuda(0) {
        Ok(Device::Cuda(g)) => g,
        Ok(_) => panic!("Device::cuda gave a CPU"),
        Err(e) => panic!("GPU test run without a usable GPU: {e}"),
    }
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 && nb == 0.0 { 1.0 } else { dot / (na * nb).max(1e-300) }
}

fn adapted(dir: &str, base: BasePrecision, seed: u64) -> LlamaModel {
    let mut model = LlamaModel::load(&fixtures().join(dir), base).unwrap();
    let all = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let spec =
        LoraSpec { r: 4, alpha: 8.0, dropout: 0.0, rslora: false, target_modules: all.map(String::from).to_vec() };
    init_lora(&mut model, &spec, seed).unwrap();
    // Non-zero B, so that every adapter contributes to the forward and A gets gradients.
    for l in &mut model.layers {
        for (i, (_, lin)) in l.linears_mut().into_iter().enumerate() {
            if let Some(ad) = &mut lin.lora {
                ad.b.iter_mut().enumerate().for_each(|(j, v)| *v = ((j * 7 + i) % 13) as f32 * 0.01 - 0.06);
            }
        }
    }
    model
}

/// A packed batch of two rows with three segments and a padded tail.
fn packed_batch(v: usize) -> Batch {
    let (b, t) = (2, 13);
    let tokens: Vec<u32> = (0..b * t).map(|i| ((i * 37 + 11) % v) as u32).collect();
    let mut targets: Vec<i64> = (0..b * t).map(|i| ((i * 53 + 3) % v) as i64).collect();
    let segments: Vec<u32> = (0..b * t)
        .map(|i| {
            if i % t < 6 {
                0
            } else if i % t < 11 {
                1
            } else {
                2
            }
        })
        .collect();
    let positions: Vec<u32> =
        (0..b * t).map(|i| if i % t < 6 { i % t } else if i % t < 11 { i % t - 6 } else { i % t - 11 } as u32).collect();
    for (i, tg) in targets.iter_mut().enumerate() {
        if i % t < 2 || i % t >= 11 {
            *tg = IGNORE_INDEX;
        }
    }
    let n_targets = targets.iter().filter(|&&x| x != IGNORE_INDEX).count();
    Batch { b, t, tokens, targets, positions, segments, n_targets, n_tokens: b * 11 }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn logits_and_decoding_match_the_cpu() {
    let gpu = gpu();
    for (dir, base) in [
        ("tiny_llama", BasePrecision::AsStored),
        ("tiny_llama_bnb4_f32", BasePrecision::AsStored),
        ("tiny_llama", BasePrecision::Nf4),
    ] {
        let model = adapted(dir, base, 5);
        let cpu = CpuBackend::new(&model);
        let cuda = CudaBackend::<f32>::new(gpu.clone(), &model).unwrap();
        let v = model.cfg.vocab_size;
        let ids: Vec<u32> = (0..19).map(|i| ((i * 31 + 7) % v) as u32).collect();
        let want = decode_step(&cpu, &ids, &mut model.new_cache(), true).unwrap();
        let mut cache = gristmill::backend::Backend::new_cache(&cuda).unwrap();
        let got = decode_step(&cuda, &ids, &mut cache, true).unwrap();
        let d = rel(&got, &want);
        assert!(d <= 1e-4, "{dir} {base:?}: logits max |Δ| / max = {d:e}");
        // Prefill 5, then one token at a time: the last position's logits each time.
        let mut cache = gristmill::backend::Backend::new_cache(&cuda).unwrap();
        let mut inc = decode_step(&cuda, &ids[..5], &mut cache, true).unwrap();
        for &id in &ids[5..] {
            inc.extend(decode_step(&cuda, &[id], &mut cache, false).unwrap());
        }
        let d = rel(&inc, &want);
        assert!(d <= 1e-4, "{dir} {base:?}: incremental decoding max |Δ| / max = {d:e}");
        // bf16 activations: the same logits to bf16 precision.
        let cuda16 = CudaBackend::<gristmill_kernels::bf16>::new(gpu.clone(), &model).unwrap();
        let mut cache = gristmill::backend::Backend::new_cache(&cuda16).unwrap();
        let got16 = decode_step(&cuda16, &ids, &mut cache, true).unwrap();
        let d16 = rel(&got16, &want);
        let mean16 = got16.iter().zip(&want).map(|(a, b)| f64::from((a - b).abs())).sum::<f64>()
            / want.iter().map(|b| f64::from(b.abs())).sum::<f64>();
        // The tiny random models' logits are small next to their hidden states, so bf16 rounding
        // of the activations shows as a few percent of the largest logit; the mean error and the
        // greedy choices are what a user sees.
        let argmax = |l: &[f32]| l.iter().enumerate().fold(0, |bi, (i, &x)| if x > l[bi] { i } else { bi });
        let same = got16.chunks(v).zip(want.chunks(v)).filter(|(a, b)| argmax(a) == argmax(b)).count();
        println!(
            "{dir} {base:?}: bf16 logits max rel {d16:.2e}, mean rel {mean16:.2e}, {same}/{} argmax agree",
            ids.len()
        );
        assert!(d16 <= 8e-2 && mean16 <= 2e-2, "{dir} {base:?}: bf16 logits max rel {d16:e}, mean rel {mean16:e}");
        assert!(same * 10 >= ids.len() * 9, "{dir} {base:?}: bf16 greedy choices agree at {same}/{}", ids.len());
        println!("{dir} {base:?}: logits match (f32 rel {d:.2e}, bf16 rel {d16:.2e})");
    }
}

/// Generation's backend sends 1…16-row products of bf16-sourced NF4 weights through the one-pass
/// GEMV: prefill and token-by-token decoding of the bitsandbytes 4-bit fixture match the CPU.
#[test]
#[ignore = "needs a CUDA GPU"]
fn decoding_through_the_nf4_gemv_matches_the_cpu() {
    let gpu = gpu();
    let model = adapted("tiny_llama_bnb4", BasePrecision::AsStored, 9);
    let cpu = CpuBackend::new(&model);
    let cuda = CudaBackend::<f32>::for_decoding(gpu, &model).unwrap();
    assert_eq!(cuda.gemv_layers(), 7 * model.cfg.num_layers, "every NF4 projection decodes through the GEMV");
    let v = model.cfg.vocab_size;
    let ids: Vec<u32> = (0..12).map(|i| ((i * 29 + 5) % v) as u32).collect();
    let want = decode_step(&cpu, &ids, &mut model.new_cache(), true).unwrap();
    let mut cache = gristmill::backend::Backend::new_cache(&cuda).unwrap();
    // Prefill 12 rows (≤ 16: the GEMV), then one at a time.
    let mut got = decode_step(&cuda, &ids[..11], &mut cache, true).unwrap();
    got.extend(decode_step(&cuda, &ids[11..], &mut cache, true).unwrap());
    let d = rel(&got, &want);
    // The GEMV splits f32 activations into two bf16 terms: products lose 2⁻¹⁷ relative.
    assert!(d <= 1e-3, "NF4 GEMV decoding: max |Δ| / max = {d:e}");
    println!("tiny_llama_bnb4 through the NF4 GEMV: logits rel {d:.2e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_training_step_matches_the_cpu() {
    let gpu = gpu();
    for (dir, drop) in [("tiny_llama_bnb4_f32", None), ("tiny_llama", Some(Dropout { p: 0.1, seed: 99 }))] {
        let model = adapted(dir, BasePrecision::AsStored, 3);
        let batch = packed_batch(model.cfg.vocab_size);
        let opt = AdamW::new(AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }, &model)
            .unwrap();
        let mut cpu = Engine::new(&Device::Cpu, &model, &opt).unwrap();
        let mut cuda = Engine::with_dtype(&Device::Cuda(gpu.clone()), &model, &opt, ComputeDtype::F32).unwrap();
        let mut cuda16 = Engine::with_dtype(&Device::Cuda(gpu.clone()), &model, &opt, ComputeDtype::Bf16).unwrap();
        let scale = 1.0 / batch.n_targets as f32;
        let a = cpu.micro_step(&model, &batch, scale, drop).unwrap();
        let b = cuda.micro_step(&model, &batch, scale, drop).unwrap();
        assert_eq!(a.n_targets, b.n_targets);
        let lr = ((b.loss_sum - a.loss_sum) / a.loss_sum).abs();
        assert!(lr <= 1e-5, "{dir}: loss {} vs CPU {} (rel {lr:e})", b.loss_sum, a.loss_sum);
        let (ga, gb) = (cpu.grads_to_host().unwrap(), cuda.grads_to_host().unwrap());
        assert_eq!(ga.len(), gb.len());
        for (i, (x, y)) in gb.iter().zip(&ga).enumerate() {
            let d = rel(x, y);
            assert!(d <= 1e-4, "{dir}: LoRA gradient buffer {i}: max |Δ| / max |g| = {d:e}");
        }
        let c = cuda16.micro_step(&model, &batch, scale, drop).unwrap();
        let lr16 = ((c.loss_sum - a.loss_sum) / a.loss_sum).abs();
        assert!(lr16 <= 1e-2, "{dir}: bf16 loss {} vs CPU {} (rel {lr16:e})", c.loss_sum, a.loss_sum);
        for (i, (x, y)) in cuda16.grads_to_host().unwrap().iter().zip(&ga).enumerate() {
            let cos = cosine(x, y);
            assert!(cos >= 0.99, "{dir}: bf16 LoRA gradient buffer {i}: cosine {cos} with the CPU's");
        }
        let e = cuda.eval_loss(&model, &batch).unwrap();
        let le = ((e.loss_sum - a.loss_sum) / a.loss_sum).abs();
        // Evaluation has no dropout: compare with the CPU's evaluation instead when it was on.
        let want = if drop.is_some() { cpu.eval_loss(&model, &batch).unwrap().loss_sum } else { a.loss_sum };
        let le = if drop.is_some() { ((e.loss_sum - want) / want).abs() } else { le };
        assert!(le <= 1e-5, "{dir}: eval loss {} vs {want}", e.loss_sum);
        println!("{dir}: loss {} (CPU {}), {} gradient buffers match", b.loss_sum, a.loss_sum, gb.len());
    }
}

#[allow(clippy::needless_range_loop)] // s indexes the fixture's flat buffers too
/// The golden QLoRA run (tests/fixtures/peft_steps.safetensors): ten steps on the GPU track the
/// CPU step for step, and PEFT's losses.
#[test]
#[ignore = "needs a CUDA GPU"]
fn ten_golden_qlora_steps_on_the_gpu() {
    let gpu = gpu();
    let g = Checkpoint::open(fixtures().join("peft_steps.safetensors")).unwrap();
    let shape = g.get("input_ids").unwrap().shape.to_vec();
    let (steps, accum, b, t) = (shape[0], shape[1], shape[2], shape[3]);
    let mut model = LlamaModel::load(&fixtures().join("tiny_llama_bnb4_f32"), BasePrecision::AsStored).unwrap();
    let cfg = AdapterConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::None,
        use_rslora: false,
        fan_in_fan_out: false,
        peft_type: None,
        base_model_name_or_path: None,
    };
    attach_lora_tensors(&mut model, &cfg, &g, "init.", &fixtures()).unwrap();
    let mut cpu_model = model.clone();
    let adam = AdamWConfig { lr: 5e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let (mut opt_c, mut opt_g) = (AdamW::new(adam, &model).unwrap(), AdamW::new(adam, &model).unwrap());
    let mut cpu = Engine::new(&Device::Cpu, &cpu_model, &opt_c).unwrap();
    let mut cuda = Engine::with_dtype(&Device::Cuda(gpu), &model, &opt_g, ComputeDtype::F32).unwrap();
    let want_losses = g.to_f32("losses").unwrap();
    let mut worst = 0f64;
    for s in 0..steps {
        let micro: Vec<Batch> = (0..accum).map(|a| golden_batch(&g, s, a, accum, b, t)).collect();
        let n_tok: usize = micro.iter().map(|m| m.n_targets).sum();
        let lr = lr_at(SchedulerKind::Linear, s, 3, steps, 5e-3);
        let mut losses = [0f64; 2];
        for (k, (eng, m, opt)) in
            [(&mut cpu, &mut cpu_model, &mut opt_c), (&mut cuda, &mut model, &mut opt_g)].into_iter().enumerate()
        {
            eng.zero_grads().unwrap();
            for mb in &micro {
                losses[k] += eng.micro_step(m, mb, 1.0 / n_tok as f32, None).unwrap().loss_sum;
            }
            eng.optimizer_step(m, opt, lr, 1.0).unwrap();
        }
        let (lc, lg) = (losses[0] / n_tok as f64, losses[1] / n_tok as f64);
        let d = ((lg - lc) / lc).abs();
        worst = worst.max(d);
        assert!(d <= 1e-4, "step {}: GPU loss {lg} vs CPU {lc}", s + 1);
        let dp = ((lg - f64::from(want_losses[s])) / f64::from(want_losses[s])).abs();
        assert!(dp <= 1e-4, "step {}: GPU loss {lg} vs PEFT {}", s + 1, want_losses[s]);
        println!("step {:2}: loss GPU {lg:.6} CPU {lc:.6} PEFT {:.6}", s + 1, want_losses[s]);
    }
    cuda.sync_to_host(&mut model, &mut opt_g).unwrap();
    for (a, c) in model.layers.iter().zip(&cpu_model.layers) {
        for (x, y) in [(&a.q, &c.q), (&a.v, &c.v), (&a.down, &c.down)] {
            if let (Some(la), Some(lc)) = (&x.lora, &y.lora) {
                let d =
                    la.a.iter()
                        .zip(&lc.a)
                        .chain(la.b.iter().zip(&lc.b))
                        .map(|(p, q)| (p - q).abs())
                        .fold(0.0, f32::max);
                assert!(d <= 1e-4, "LoRA factors after ten steps differ by {d}");
            }
        }
    }
    assert_eq!(opt_g.step, steps as u64);
    println!("ten golden steps: worst loss rel diff GPU vs CPU {worst:.2e}");
}

fn run_config(data: &Path, out: &Path, device: &str, dtype: &str) -> TrainConfig {
    let text = format!(
        r#"{head}dropout = 0.1
[optim]
lr = 3e-3
warmup_steps = 2
[train]
max_steps = 10
batch_size = 3
grad_accum = 2
eval_every = 5
seed = 11
device = "{device}"
compute_dtype = "{dtype}"
[output]
dir = "{out}"
"#,
        head = tiny_run_toml(data),
        out = out.display(),
    );
    TrainConfig::from_toml_str(&text).unwrap()
}

/// `train()` on `cuda` and on `cpu`: the same ten losses, evaluation losses and adapter.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_training_run_on_the_gpu_tracks_the_cpu() {
    let _ = gpu();
    let dir = std::env::temp_dir().join(format!("gristmill-gpu-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = write_synth_data(&dir);
    let mut runs = Vec::new();
    for (name, device, dtype) in [("cpu", "cpu", "f32"), ("cuda", "cuda", "f32"), ("cuda16", "cuda", "bf16")] {
        let out_dir = dir.join(name);
        let out = train(&run_config(&data, &out_dir, device, dtype), Hooks::default()).unwrap();
        assert_eq!(out.steps, 10);
        let want = if device == "cpu" { "training on cpu".to_string() } else { format!("{dtype} activations") };
        assert!(out.notes.iter().any(|n| n.contains(&want)), "{name}: {:?}", out.notes);
        runs.push(read_metrics(&out_dir.join("metrics.jsonl")).unwrap());
    }
    for (a, b) in runs[0].iter().zip(&runs[2]) {
        if let (Some(x), Some(y)) = (a.loss, b.loss) {
            assert!(((x - y) / x).abs() <= 2e-2, "step {}: CPU loss {x} vs GPU bf16 {y}", a.step);
            println!("step {:2}: loss CPU {x:.6} GPU bf16 {y:.6}", a.step);
        }
    }
    let (c, g) = (&runs[0], &runs[1]);
    assert_eq!(c.len(), g.len());
    for (a, b) in c.iter().zip(g) {
        if let (Some(x), Some(y)) = (a.loss, b.loss) {
            assert!(((x - y) / x).abs() <= 1e-4, "step {}: CPU loss {x} vs GPU {y}", a.step);
            println!("step {:2}: loss CPU {x:.6} GPU {y:.6}", a.step);
        }
        if let (Some(x), Some(y)) = (a.eval_loss, b.eval_loss) {
            assert!(((x - y) / x).abs() <= 1e-4, "step {}: CPU eval loss {x} vs GPU {y}", a.step);
        }
    }
    let ck = |d: &str| Checkpoint::open(dir.join(d).join("adapter_model.safetensors")).unwrap();
    let (ac, ag) = (ck("cpu"), ck("cuda"));
    for name in ac.names() {
        let d = rel(&ag.to_f32(name).unwrap(), &ac.to_f32(name).unwrap());
        assert!(d <= 1e-3, "{name}: GPU adapter differs from the CPU's by {d:e} of its scale");
    }
}

/// A GRIT run (every part acting within ten steps) on `cuda` f32 and bf16 against the CPU: the
/// same losses, natural-gradient ratios, inversion λs, reprojection ranks and adapter; and a
/// resumed GPU run that ends where the uninterrupted one does.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_grit_run_on_the_gpu_tracks_the_cpu() {
    let _ = gpu();
    let dir = std::env::temp_dir().join(format!("gristmill-gpu-grit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = write_synth_data(&dir);
    let grit = |out: &Path, device: &str, dtype: &str| {
        let mut c = run_config(&data, out, device, dtype);
        common::quick_grit(&mut c);
        c.train.save_every = 3;
        c
    };
    let events = |d: &Path, kind: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("grit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["event"] == kind)
            .collect()
    };
    let mut runs = Vec::new();
    for (name, device, dtype) in [("cpu", "cpu", "f32"), ("cuda", "cuda", "f32"), ("cuda16", "cuda", "bf16")] {
        let out_dir = dir.join(name);
        let out = train(&grit(&out_dir, device, dtype), Hooks::default()).unwrap();
        assert_eq!(out.steps, 10);
        runs.push(read_metrics(&out_dir.join("metrics.jsonl")).unwrap());
    }
    let get = |r: &gristmill::train::metrics::Record, k: &str| r.extra.get(k).and_then(|v| v.as_f64());
    for (i, tol) in [(1, 1e-3), (2, 3e-2)] {
        for (a, b) in runs[0].iter().zip(&runs[i]) {
            if let (Some(x), Some(y)) = (a.loss, b.loss) {
                println!("run {i} step {:2}: loss CPU {x:.6} GPU {y:.6}", a.step);
                assert!(((x - y) / x).abs() <= tol, "run {i} step {}: CPU loss {x} vs GPU {y}", a.step);
            }
            match (get(a, "grit_ng_ratio"), get(b, "grit_ng_ratio")) {
                (Some(x), Some(y)) => {
                    println!("run {i} step {:2}: ng ratio CPU {x:.5} GPU {y:.5}", a.step);
                    assert!(((x - y) / x).abs() <= 10.0 * tol, "run {i} step {}: ng ratio {x} vs {y}", a.step);
                }
                (None, None) => {}
                (x, y) => panic!("run {i} step {}: ng ratio CPU {x:?} GPU {y:?}", a.step),
            }
            if let (Some(x), Some(y)) = (get(a, "grit_reg_loss"), get(b, "grit_reg_loss")) {
                assert!((x - y).abs() <= 10.0 * tol * x.abs().max(1e-12), "run {i} step {}: reg {x} vs {y}", a.step);
            }
        }
    }
    // Inversions at the same steps with the same λ, reprojections with the same ranks (f32 run).
    let (ci, gi) = (events(&dir.join("cpu"), "invert"), events(&dir.join("cuda"), "invert"));
    assert_eq!(ci.len(), gi.len());
    for (a, b) in ci.iter().zip(&gi) {
        assert_eq!((&a["step"], &a["lambda"]), (&b["step"], &b["lambda"]));
    }
    let (cr, gr) = (events(&dir.join("cpu"), "reproject"), events(&dir.join("cuda"), "reproject"));
    assert_eq!(cr.len(), 2);
    for (a, b) in cr.iter().zip(&gr) {
        assert_eq!((&a["step"], &a["k"]), (&b["step"], &b["k"]), "reprojection ranks");
    }
    let ck = |d: &str| Checkpoint::open(dir.join(d).join("adapter_model.safetensors")).unwrap();
    let (ac, ag) = (ck("cpu"), ck("cuda"));
    for name in ac.names() {
        let d = rel(&ag.to_f32(name).unwrap(), &ac.to_f32(name).unwrap());
        assert!(d <= 1e-2, "{name}: GRIT GPU adapter differs from the CPU's by {d:e} of its scale");
    }
    // Resume on the GPU from the step-6 checkpoint: the same final adapter as without the stop.
    let part = dir.join("part");
    let mut stop_at_6 = |r: &gristmill::train::metrics::Record| r.step < 6;
    train(&grit(&part, "cuda", "f32"), Hooks { on_step: Some(&mut stop_at_6), ..Default::default() }).unwrap();
    let mut c = grit(&part, "cuda", "f32");
    c.output.resume = Some("latest".into());
    train(&c, Hooks::default()).unwrap();
    let ap = Checkpoint::open(part.join("adapter_model.safetensors")).unwrap();
    for name in ag.names() {
        let d = rel(&ap.to_f32(name).unwrap(), &ag.to_f32(name).unwrap());
        assert!(d <= 1e-5, "{name}: resumed GPU GRIT run differs by {d:e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
