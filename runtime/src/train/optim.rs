//! The optimizer state of a LoRA run: AdamW moments for every factor, in slot order.

use crate::error::{Error, Result};
use crate::model::LlamaModel;
use gristmill_core::ops::adamw::{AdamWConfig, adamw_step_ref};

/// AdamW over the LoRA factors (A then B of each adapted module, in layer and module order).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Updates done so far (the next one is `step + 1`, as torch counts).
    pub step: u64,
    /// first moments, one buffer per factor
    pub m: Vec<Vec<f32>>,
    /// second moments, one buffer per factor
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    /// Zero moments shaped like the model's adapters.
    pub fn new(cfg: AdamWConfig, model: &LlamaModel) -> Result<Self> {
        cfg.validate()?;
        let sizes: Vec<usize> = lora_params(model).iter().map(|p| p.len()).collect();
        Ok(Self {
            cfg,
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        })
    }

    /// One update of every factor with learning rate `lr`.
    pub fn update(&mut self, model: &mut LlamaModel, grads: &[&[f32]], lr: f32) -> Result<()> {
        let mut params = lora_params_mut(model);
        if params.len() != grads.len() || params.len() != self.m.len() {
            return Err(Error::Invalid(format!(
                "optimizer state holds {} tensors, the model {} and the gradients {}",
                self.m.len(),
                params.len(),
                grads.len()
            )));
        }
        self.step += 1;
        let cfg = AdamWConfig { lr, ..self.cfg };
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(&mut self.m).zip(&mut self.v) {
            adamw_step_ref(p, g, m, v, self.step, &cfg)?;
        }
        Ok(())
    }
}

/// The LoRA factors of `model`: A then B of each adapted module, in layer and module order.
pub fn lora_params(model: &LlamaModel) -> Vec<&[f32]> {
    let mut out = Vec::new();
    for layer in &model.layers {
        for lin in [&layer.q, &layer.k, &layer.v, &layer.o, &layer.gate, &layer.up, &layer.down] {
            if let Some(l) = &lin.lora {
                out.push(l.a.as_slice());
                out.push(l.b.as_slice());
            }
        }
    }
    out
}

/// Mutable [`lora_params`].
pub fn lora_params_mut(model: &mut LlamaModel) -> Vec<&mut [f32]> {
    let mut out = Vec::new();
    for layer in &mut model.layers {
        for (_, lin) in layer.linears_mut() {
            if let Some(l) = &mut lin.lora {
                out.push(l.a.as_mut_slice());
                out.push(l.b.as_mut_slice());
            }
        }
    }
    out
}
