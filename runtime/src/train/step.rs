//! One training micro-batch: the LoRA gradient buffers and the CPU entry points of the model's
//! forward and backward, which live, written once for every device, in [`crate::backend`].

use crate::backend::{BatchIn, CpuBackend, eval_step, train_step};
pub use crate::backend::{Dropout, MicroStats};
use crate::data::Batch;
use crate::error::Result;
use crate::model::{Linear, LlamaModel};

/// Gradients of every LoRA factor, in [`lora_slots`] order.
#[derive(Debug, Clone, Default)]
pub struct LoraGrads {
    /// da[i]: (r, K) of slot i
    pub da: Vec<Vec<f32>>,
    /// db[i]: (N, r) of slot i
    pub db: Vec<Vec<f32>>,
    /// GRIT's statistics of this micro-batch, gathered by the backward when set.
    pub kfac: Option<KfacCapture>,
}

/// Masked Gram matrices of the adapters' bottleneck activations, gathered by one micro-batch's
/// backward for GRIT: per slot Σ_t w_t u_t u_tᵀ and Σ_t w_t v_t v_tᵀ (u = x Aᵀ, v = dy B).
#[derive(Debug, Clone, Default)]
pub struct KfacCapture {
    /// w: (M) 1 for token rows that count (a loss target), 0 for padding and prompt rows.
    pub weights: Vec<f32>,
    /// uu[i], vv[i]: (r, r) of slot i.
    pub uu: Vec<Vec<f32>>,
    pub vv: Vec<Vec<f32>>,
}

impl KfacCapture {
    /// Zero sums for `slots` modules of rank `r`, with the row weights of a batch.
    pub fn new(weights: Vec<f32>, slots: usize, r: usize) -> Self {
        KfacCapture { weights, uu: vec![vec![0.0; r * r]; slots], vv: vec![vec![0.0; r * r]; slots] }
    }

    /// Rows that count.
    pub fn rows(&self) -> f64 {
        self.weights.iter().map(|&w| f64::from(w)).sum()
    }
}

/// GRIT's row weights of a batch: 1 where the position has a loss target.
pub fn target_weights(batch: &Batch) -> Vec<f32> {
    batch
        .targets
        .iter()
        .map(|&t| if t == gristmill_core::ops::cross_entropy::IGNORE_INDEX { 0.0 } else { 1.0 })
        .collect()
}

impl LoraGrads {
    /// Zero gradients shaped like the model's adapters.
    pub fn zeros(model: &LlamaModel) -> Self {
        let mut g = Self::default();
        for (_, _, lin) in lora_slots(model) {
            if let Some(l) = &lin.lora {
                g.da.push(vec![0.0; l.a.len()]);
                g.db.push(vec![0.0; l.b.len()]);
            }
        }
        g
    }

    /// Sets every gradient to zero, keeping the buffers.
    pub fn clear(&mut self) {
        self.da.iter_mut().chain(self.db.iter_mut()).for_each(|v| v.fill(0.0));
    }

    /// All gradient buffers, A then B for each slot, read-only.
    pub fn buffers(&self) -> Vec<&[f32]> {
        self.da.iter().zip(&self.db).flat_map(|(a, b)| [a.as_slice(), b.as_slice()]).collect()
    }

    /// All gradient buffers, A then B for each slot.
    pub fn buffers_mut(&mut self) -> Vec<&mut [f32]> {
        let mut out = Vec::with_capacity(2 * self.da.len());
        for (a, b) in self.da.iter_mut().zip(self.db.iter_mut()) {
            out.push(a.as_mut_slice());
            out.push(b.as_mut_slice());
        }
        out
    }
}

/// (layer, module name, linear) of every linear layer that carries a LoRA adapter, in a fixed
/// order: layer by layer, q, k, v, o, gate, up, down.
pub fn lora_slots(model: &LlamaModel) -> Vec<(usize, &'static str, &Linear)> {
    let mut out = Vec::new();
    for (i, l) in model.layers.iter().enumerate() {
        for (name, lin) in [
            ("q_proj", &l.q),
            ("k_proj", &l.k),
            ("v_proj", &l.v),
            ("o_proj", &l.o),
            ("gate_proj", &l.gate),
            ("up_proj", &l.up),
            ("down_proj", &l.down),
        ] {
            if lin.lora.is_some() {
                out.push((i, name, lin));
            }
        }
    }
    out
}

/// The CPU micro-batch: [`crate::backend::train_step`] on the [`CpuBackend`].
fn batch_in(batch: &Batch) -> BatchIn<'_> {
    BatchIn {
        b: batch.b,
        t: batch.t,
        tokens: &batch.tokens,
        positions: &batch.positions,
        segments: Some(&batch.segments),
        targets: Some(&batch.targets),
    }
}

/// Forward + backward of one micro-batch on the CPU. Gradients of the LoRA factors, scaled by
/// `grad_scale` (1 / the number of target tokens of the whole accumulated batch, so that every
/// token weighs the same however the batch is split), are ADDED to `grads`.
pub fn micro_step(
    model: &LlamaModel,
    batch: &Batch,
    grad_scale: f32,
    dropout: Option<Dropout>,
    grads: &mut LoraGrads,
) -> Result<MicroStats> {
    train_step(&CpuBackend::new(model), &batch_in(batch), grad_scale, dropout, grads)
}

/// The summed loss of a batch without gradients (evaluation), on the CPU.
pub fn eval_loss(model: &LlamaModel, batch: &Batch) -> Result<MicroStats> {
    eval_step(&CpuBackend::new(model), &batch_in(batch))
}

/// The batch as the backends take it.
pub fn as_batch_in(batch: &Batch) -> BatchIn<'_> {
    batch_in(batch)
}
