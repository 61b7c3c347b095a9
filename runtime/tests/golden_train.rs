//! Golden QLoRA training against transformers + PEFT + bitsandbytes
//! (`tests/golden/make_peft_steps.py`, run on an H200): the same 4-bit base, the same initial LoRA
//! factors, the same batches; ten AdamW steps with accumulation 2, clipping and linear warmup.
//!
//! Tolerances (the reference runs the same f32 math on a GPU, in other summation orders):
//! - per-step loss: relative 2e-5;
//! - step-1 LoRA gradients: max |Δ| ≤ 1e-4 · max |g| per tensor;
//! - per-step gradient norm before clipping: relative 1e-4;
//! - LoRA factors after ten steps: max |Δ| ≤ 1e-4 (the updates are lr-sized, ~5e-3 each; Adam
//!   normalises the gradients, so tiny gradient differences stay tiny).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{fixtures, golden_batch};
use gristmill::adapter::{AdapterConfig, TargetModules, attach_lora_tensors};
use gristmill::data::Batch;
use gristmill::model::{BasePrecision, LlamaModel};
use gristmill::safetensors::Checkpoint;
use gristmill::train::config::SchedulerKind;
use gristmill::train::optim::{AdamW, lora_params};
use gristmill::train::schedule::lr_at;
use gristmill::train::step::{LoraGrads, lora_slots, micro_step};
use gristmill_core::ops::adamw::{AdamWConfig, clip_grad_norm_ref};

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

#[test]
fn ten_qlora_steps_match_peft() {
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
    assert_eq!(attach_lora_tensors(&mut model, &cfg, &g, "init.", &fixtures()).unwrap(), 14);

    let names: Vec<String> = lora_slots(&model)
        .iter()
        .flat_map(|(i, m, _)| {
            let p = gristmill::adapter::peft_module_path(*i, m);
            [format!("{p}.lora_A.weight"), format!("{p}.lora_B.weight")]
        })
        .collect();
    let want_losses = g.to_f32("losses").unwrap();
    let want_norms = g.to_f32("grad_norms").unwrap();
    let want_lrs = g.to_f32("lrs").unwrap();
    let mut opt =
        AdamW::new(AdamWConfig { lr: 5e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }, &model).unwrap();
    let mut grads = LoraGrads::zeros(&model);
    let (mut worst_loss, mut worst_grad, mut worst_norm) = (0f32, 0f32, 0f32);
    for s in 0..steps {
        let micro: Vec<Batch> = (0..accum).map(|a| golden_batch(&g, s, a, accum, b, t)).collect();
        let n_tok: usize = micro.iter().map(|m| m.n_targets).sum();
        grads.clear();
        let mut loss_sum = 0.0;
        for mb in &micro {
            loss_sum += micro_step(&model, mb, 1.0 / n_tok as f32, None, &mut grads).unwrap().loss_sum;
        }
        let loss = (loss_sum / n_tok as f64) as f32;
        let rel = (loss - want_losses[s]).abs() / want_losses[s];
        assert!(rel <= 2e-5, "step {}: loss {loss} vs PEFT {} (rel {rel:e})", s + 1, want_losses[s]);
        worst_loss = worst_loss.max(rel);

        let mut bufs = grads.buffers_mut();
        if s == 0 {
            for (name, gbuf) in names.iter().zip(bufs.iter()) {
                let want = g.to_f32(&format!("grad.{name}")).unwrap();
                let d = max_rel_diff(gbuf, &want);
                assert!(d <= 1e-4, "step 1 gradient of {name}: max |Δ| / max |g| = {d:e}");
                worst_grad = worst_grad.max(d);
            }
        }
        let norm = clip_grad_norm_ref(&mut bufs, 1.0f32).unwrap();
        let rel = (norm - want_norms[s]).abs() / want_norms[s];
        assert!(rel <= 1e-4, "step {}: grad norm {norm} vs PEFT {} (rel {rel:e})", s + 1, want_norms[s]);
        worst_norm = worst_norm.max(rel);

        let lr = lr_at(SchedulerKind::Linear, s, 3, steps, 5e-3);
        assert!((lr - want_lrs[s]).abs() <= 1e-9, "step {}: lr {lr} vs {}", s + 1, want_lrs[s]);
        let gref: Vec<&[f32]> =
            grads.da.iter().zip(&grads.db).flat_map(|(a, b)| [a.as_slice(), b.as_slice()]).collect();
        opt.update(&mut model, &gref, lr).unwrap();
    }
    let mut worst_final = 0f32;
    for (name, p) in names.iter().zip(lora_params(&model)) {
        let want = g.to_f32(&format!("final.{name}")).unwrap();
        let d = p.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(d <= 1e-4, "{name} after {steps} steps: max |Δ| {d:e}");
        worst_final = worst_final.max(d);
    }
    eprintln!(
        "vs PEFT: loss rel {worst_loss:.1e}, step-1 grads {worst_grad:.1e}, grad norms rel {worst_norm:.1e}, factors after {steps} steps {worst_final:.1e}"
    );
}
