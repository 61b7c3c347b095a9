//! Where the training step runs: on the CPU against the host model, or on a GPU with the model,
//! the LoRA factors, their gradients and the optimizer state resident there. The host model and
//! optimizer (`LlamaModel`, `AdamW`) stay the source of truth for checkpoints: the GPU engine
//! copies its state into them before anything is written ([`Engine::sync_to_host`]).

use super::optim::AdamW;
use super::step::{Dropout, LoraGrads, MicroStats, eval_loss, micro_step};
use crate::data::Batch;
use crate::device::Device;
use crate::error::Result;
use crate::model::LlamaModel;
use gristmill_core::ops::adamw::clip_grad_norm_ref;

/// The training step's device and the state it keeps there.
pub enum Engine {
    Cpu {
        grads: LoraGrads,
    },
    #[cfg(feature = "cuda")]
    Cuda(Box<GpuEngine>),
}

/// A run on one GPU.
#[cfg(feature = "cuda")]
pub struct GpuEngine {
    be: crate::backend::cuda::CudaBackend,
    grads: crate::backend::cuda::GpuGrads,
    opt: crate::backend::cuda::GpuAdamW,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Engine::Cpu { .. } => f.write_str("Engine::Cpu"),
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => write!(f, "Engine::Cuda({:?})", g.be),
        }
    }
}

impl Engine {
    /// An engine on `device` for `model` with the optimizer state `opt` (fresh or resumed).
    pub fn new(device: &Device, model: &LlamaModel, opt: &AdamW) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Engine::Cpu { grads: LoraGrads::zeros(model) }),
            #[cfg(feature = "cuda")]
            Device::Cuda(gpu) => {
                use crate::backend::cuda::{CudaBackend, GpuAdamW};
                let be = CudaBackend::new(gpu.clone(), model)?;
                let grads = be.new_grads()?;
                let mut gopt = GpuAdamW::new(&be)?;
                gopt.upload(&be, &opt.m, &opt.v)?;
                gopt.step = opt.step;
                Ok(Engine::Cuda(Box::new(GpuEngine { be, grads, opt: gopt })))
            }
        }
    }

    /// Zeroes the gradients before a step's micro-batches.
    pub fn zero_grads(&mut self) -> Result<()> {
        match self {
            Engine::Cpu { grads } => grads.clear(),
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => {
                g.be.gpu()
                    .stream()
                    .memset_zeros(&mut g.grads.flat)
                    .map_err(|e| crate::error::Error::Gpu(gristmill_kernels::KernelError::Driver(e)))?
            }
        }
        Ok(())
    }

    /// Forward + backward of one micro-batch, adding its gradients.
    pub fn micro_step(
        &mut self,
        model: &LlamaModel,
        batch: &Batch,
        grad_scale: f32,
        drop: Option<Dropout>,
    ) -> Result<MicroStats> {
        match self {
            Engine::Cpu { grads } => micro_step(model, batch, grad_scale, drop, grads),
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => {
                crate::backend::train_step(&g.be, &super::step::as_batch_in(batch), grad_scale, drop, &mut g.grads)
            }
        }
    }

    /// The summed loss of a batch, no gradients.
    pub fn eval_loss(&self, model: &LlamaModel, batch: &Batch) -> Result<MicroStats> {
        match self {
            Engine::Cpu { .. } => eval_loss(model, batch),
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => crate::backend::eval_step(&g.be, &super::step::as_batch_in(batch)),
        }
    }

    /// Clips the gradients to `max_grad_norm` (0 = no clipping) and takes one AdamW step with
    /// learning rate `lr`; returns the gradient norm before clipping.
    pub fn optimizer_step(
        &mut self,
        model: &mut LlamaModel,
        opt: &mut AdamW,
        lr: f32,
        max_grad_norm: f32,
    ) -> Result<f32> {
        match self {
            Engine::Cpu { grads } => {
                let mut bufs = grads.buffers_mut();
                let norm = if max_grad_norm > 0.0 {
                    clip_grad_norm_ref(&mut bufs, max_grad_norm)?
                } else {
                    bufs.iter().map(|b| b.iter().map(|v| v * v).sum::<f32>()).sum::<f32>().sqrt()
                };
                let g: Vec<&[f32]> =
                    grads.da.iter().zip(&grads.db).flat_map(|(a, b)| [a.as_slice(), b.as_slice()]).collect();
                opt.update(model, &g, lr)?;
                Ok(norm)
            }
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => {
                let cfg = gristmill_core::ops::adamw::AdamWConfig { lr, ..opt.cfg };
                let GpuEngine { be, grads, opt: gopt } = &mut **g;
                let norm = gopt.step(be, grads, &cfg, max_grad_norm)?;
                opt.step = gopt.step;
                Ok(norm)
            }
        }
    }

    /// Copies the LoRA factors and the optimizer's moments to the host model and `opt` (a no-op
    /// on the CPU, where they live there already).
    pub fn sync_to_host(&self, model: &mut LlamaModel, opt: &mut AdamW) -> Result<()> {
        match self {
            Engine::Cpu { .. } => Ok(()),
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => {
                g.be.sync_lora_to(model)?;
                let (m, v) = g.opt.download(&g.be)?;
                opt.m = m;
                opt.v = v;
                opt.step = g.opt.step;
                Ok(())
            }
        }
    }

    /// The gradients as host vectors, A then B per adapted module (tests and diagnostics).
    pub fn grads_to_host(&self) -> Result<Vec<Vec<f32>>> {
        match self {
            Engine::Cpu { grads } => {
                Ok(grads.da.iter().zip(&grads.db).flat_map(|(a, b)| [a.clone(), b.clone()]).collect())
            }
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => g.be.download_grads(&g.grads),
        }
    }

    pub fn is_cuda(&self) -> bool {
        !matches!(self, Engine::Cpu { .. })
    }
}
