//! Where the training step runs: on the CPU against the host model, or on a GPU with the model,
//! the LoRA factors, their gradients and the optimizer state resident there. The host model and
//! optimizer (`LlamaModel`, `AdamW`) stay the source of truth for checkpoints: the GPU engine
//! copies its state into them before anything is written ([`Engine::sync_to_host`]).

use super::grit::{GritState, GritStepLog};
use super::optim::{AdamW, lora_params, lora_params_mut};
use super::step::{Dropout, KfacCapture, LoraGrads, MicroStats, eval_loss, micro_step, target_weights};
use crate::data::Batch;
use crate::device::Device;
use crate::error::Result;
use crate::model::LlamaModel;
use gristmill_core::ops::adamw::clip_grad_norm_ref;

/// The element type of activations on a GPU (the CPU always computes in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDtype {
    /// bf16 activations, f32 accumulation, statistics, LoRA masters and optimizer state.
    #[default]
    Bf16,
    /// f32 throughout: matches the CPU to f32 rounding; slower.
    F32,
}

impl ComputeDtype {
    /// `bf16` or `f32`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "bf16" => Ok(Self::Bf16),
            "f32" => Ok(Self::F32),
            o => Err(crate::error::Error::Invalid(format!("compute dtype must be bf16 or f32, found `{o}`"))),
        }
    }
}

/// Clips `bufs` to a global norm of `max_grad_norm` (0: no clipping) and returns the norm before.
fn clip_or_norm(bufs: &mut [&mut [f32]], max_grad_norm: f32) -> Result<f32> {
    if max_grad_norm > 0.0 {
        Ok(clip_grad_norm_ref(bufs, max_grad_norm)?)
    } else {
        Ok(bufs.iter().map(|b| b.iter().map(|v| v * v).sum::<f32>()).sum::<f32>().sqrt())
    }
}

/// The training step's device and the state it keeps there.
pub enum Engine {
    Cpu {
        grads: LoraGrads,
    },
    #[cfg(feature = "cuda")]
    Cuda(Box<GpuEngine<f32>>),
    #[cfg(feature = "cuda")]
    CudaBf16(Box<GpuEngine<gristmill_kernels::bf16>>),
}

/// A run on one GPU with activations in T.
#[cfg(feature = "cuda")]
pub struct GpuEngine<T: gristmill_kernels::Float> {
    be: crate::backend::cuda::CudaBackend<T>,
    grads: crate::backend::cuda::GpuGrads,
    opt: crate::backend::cuda::GpuAdamW,
    /// GRIT's device state, made from the host state on the first GRIT micro-batch.
    grit: Option<super::grit_gpu::GpuGrit>,
}

#[cfg(feature = "cuda")]
impl<T: gristmill_kernels::Float> GpuEngine<T> {
    fn new(gpu: &std::sync::Arc<gristmill_kernels::Gpu>, model: &LlamaModel, opt: &AdamW) -> Result<Box<Self>> {
        use crate::backend::cuda::{CudaBackend, GpuAdamW};
        let be = CudaBackend::<T>::new(gpu.clone(), model)?;
        let grads = be.new_grads()?;
        let mut gopt = GpuAdamW::new(&be)?;
        gopt.upload(&be, &opt.m, &opt.v)?;
        gopt.step = opt.step;
        Ok(Box::new(GpuEngine { be, grads, opt: gopt, grit: None }))
    }

    /// GRIT's device state, made from `grit` the first time.
    fn gpu_grit(&mut self, grit: &GritState) -> Result<()> {
        if self.grit.is_none() {
            self.grit = Some(super::grit_gpu::GpuGrit::new(&self.be, grit)?);
        }
        Ok(())
    }

    fn micro_step_grit(
        &mut self,
        batch: &Batch,
        grad_scale: f32,
        drop: Option<Dropout>,
        grit: &mut GritState,
    ) -> Result<MicroStats> {
        self.gpu_grit(grit)?;
        let (true, Some(gg)) = (grit.sample_now(), self.grit.as_mut()) else {
            return self.micro_step(batch, grad_scale, drop);
        };
        let w = target_weights(batch);
        let rows: f64 = w.iter().map(|&x| f64::from(x)).sum();
        self.grads.kfac = Some(gg.capture(&self.be, &w)?);
        let out =
            crate::backend::train_step(&self.be, &super::step::as_batch_in(batch), grad_scale, drop, &mut self.grads);
        let cap = self.grads.kfac.take();
        let stats = out?;
        if let Some(cap) = cap {
            gg.fold(&self.be, cap, rows, grit)?;
        }
        Ok(stats)
    }

    #[allow(clippy::too_many_arguments)]
    fn grit_optimizer_step(
        &mut self,
        opt: &mut AdamW,
        lr: f32,
        max_grad_norm: f32,
        grit: &mut GritState,
        step: usize,
        loss: f64,
    ) -> Result<(f32, GritStepLog)> {
        let mut log = GritStepLog { damping: grit.damping, ..Default::default() };
        self.gpu_grit(grit)?;
        let Some(gg) = self.grit.as_mut() else { return Err(crate::error::Error::Invalid("no GRIT state".into())) };
        let gpu = self.be.gpu().clone();
        log.reg_loss = gg.add_regularizer_grads(&self.be, &mut self.grads, grit, step)?;
        let (norm, mul) = crate::backend::cuda::GpuAdamW::clip_factor(&gpu, &self.grads, max_grad_norm)?;
        let Some(mul) = mul else { return Ok((norm, log)) };
        if mul != 1.0 {
            gristmill_kernels::optim::scale(&gpu, &mut self.grads.flat, mul)?;
        }
        let (inverted, ratio) = gg.precondition(&self.be, &mut self.grads, grit, step, norm * mul)?;
        let cfg = gristmill_core::ops::adamw::AdamWConfig { lr, ..opt.cfg };
        self.opt.apply(&mut self.be, &self.grads, &cfg, 1.0)?;
        opt.step = self.opt.step;
        if grit.reproject_due(step) {
            log.reprojected = Some(gg.reproject(&mut self.be, &mut self.opt, grit, step)?);
        }
        log.finish(grit, loss, inverted, ratio);
        Ok((norm, log))
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.be
            .gpu()
            .stream()
            .memset_zeros(&mut self.grads.flat)
            .map_err(|e| crate::error::Error::Gpu(gristmill_kernels::KernelError::Driver(e)))
    }

    fn micro_step(&mut self, batch: &Batch, grad_scale: f32, drop: Option<Dropout>) -> Result<MicroStats> {
        crate::backend::train_step(&self.be, &super::step::as_batch_in(batch), grad_scale, drop, &mut self.grads)
    }

    fn eval_loss(&self, batch: &Batch) -> Result<MicroStats> {
        crate::backend::eval_step(&self.be, &super::step::as_batch_in(batch))
    }

    fn optimizer_step(&mut self, opt: &mut AdamW, lr: f32, max_grad_norm: f32) -> Result<f32> {
        let cfg = gristmill_core::ops::adamw::AdamWConfig { lr, ..opt.cfg };
        let norm = self.opt.step(&mut self.be, &self.grads, &cfg, max_grad_norm)?;
        opt.step = self.opt.step;
        Ok(norm)
    }

    fn sync_to_host(&self, model: &mut LlamaModel, opt: &mut AdamW) -> Result<()> {
        self.be.sync_lora_to(model)?;
        let (m, v) = self.opt.download(&self.be)?;
        opt.m = m;
        opt.v = v;
        opt.step = self.opt.step;
        Ok(())
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Engine::Cpu { .. } => f.write_str("Engine::Cpu"),
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => write!(f, "Engine::Cuda(f32, {:?})", g.be),
            #[cfg(feature = "cuda")]
            Engine::CudaBf16(g) => write!(f, "Engine::Cuda(bf16, {:?})", g.be),
        }
    }
}

impl Engine {
    /// An engine on `device` for `model` with the optimizer state `opt` (fresh or resumed), bf16
    /// activations on a GPU.
    pub fn new(device: &Device, model: &LlamaModel, opt: &AdamW) -> Result<Self> {
        Self::with_dtype(device, model, opt, ComputeDtype::default())
    }

    /// [`Engine::new`] with the GPU's activation type chosen.
    pub fn with_dtype(device: &Device, model: &LlamaModel, opt: &AdamW, dtype: ComputeDtype) -> Result<Self> {
        #[cfg(not(feature = "cuda"))]
        let _ = dtype;
        match device {
            Device::Cpu => Ok(Engine::Cpu { grads: LoraGrads::zeros(model) }),
            #[cfg(feature = "cuda")]
            Device::Cuda(gpu) => Ok(match dtype {
                ComputeDtype::F32 => Engine::Cuda(GpuEngine::new(gpu, model, opt)?),
                ComputeDtype::Bf16 => Engine::CudaBf16(GpuEngine::new(gpu, model, opt)?),
            }),
        }
    }

    /// Zeroes the gradients before a step's micro-batches.
    pub fn zero_grads(&mut self) -> Result<()> {
        match self {
            Engine::Cpu { grads } => grads.clear(),
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => g.zero_grads()?,
            #[cfg(feature = "cuda")]
            Engine::CudaBf16(g) => g.zero_grads()?,
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
            Engine::Cuda(g) => g.micro_step(batch, grad_scale, drop),
            #[cfg(feature = "cuda")]
            Engine::CudaBf16(g) => g.micro_step(batch, grad_scale, drop),
        }
    }

    /// The summed loss of a batch, no gradients.
    pub fn eval_loss(&self, model: &LlamaModel, batch: &Batch) -> Result<MicroStats> {
        match self {
            Engine::Cpu { .. } => eval_loss(model, batch),
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => g.eval_loss(batch),
            #[cfg(feature = "cuda")]
            Engine::CudaBf16(g) => g.eval_loss(batch),
        }
    }

    /// Clips the gradients to `max_grad_norm` (0 = no clipping) and takes one AdamW step with
    /// learning rate `lr`; returns the gradient norm before clipping. A NaN or infinite norm
    /// takes no step: parameters and optimizer state are left as they were.
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
                let norm = clip_or_norm(&mut bufs, max_grad_norm)?;
                if !norm.is_finite() {
                    // No update from a NaN or infinite gradient (as on the GPU): the adapter and
                    // the optimizer state stay as they were, and the caller decides what to do.
                    return Ok(norm);
                }
                opt.update(model, &grads.buffers(), lr)?;
                Ok(norm)
            }
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => g.optimizer_step(opt, lr, max_grad_norm),
            #[cfg(feature = "cuda")]
            Engine::CudaBf16(g) => g.optimizer_step(opt, lr, max_grad_norm),
        }
    }

    /// [`Engine::micro_step`] for a GRIT run: when GRIT samples this backward pass, the masked
    /// Gram matrices of every adapter's bottleneck activations are gathered and folded into its
    /// factors.
    pub fn micro_step_grit(
        &mut self,
        model: &LlamaModel,
        batch: &Batch,
        grad_scale: f32,
        drop: Option<Dropout>,
        grit: &mut GritState,
    ) -> Result<MicroStats> {
        match self {
            Engine::Cpu { grads } => {
                if !grit.sample_now() {
                    return micro_step(model, batch, grad_scale, drop, grads);
                }
                let kc = KfacCapture::new(target_weights(batch), grit.modules.len(), grit.r);
                let rows = kc.rows();
                grads.kfac = Some(kc);
                let out = micro_step(model, batch, grad_scale, drop, grads);
                let kc = grads.kfac.take();
                let stats = out?;
                if let Some(kc) = kc {
                    for (i, (uu, vv)) in kc.uu.iter().zip(&kc.vv).enumerate() {
                        grit.fold(i, uu, vv, rows);
                    }
                }
                Ok(stats)
            }
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => g.micro_step_grit(batch, grad_scale, drop, grit),
            #[cfg(feature = "cuda")]
            Engine::CudaBf16(g) => g.micro_step_grit(batch, grad_scale, drop, grit),
        }
    }

    /// A GRIT optimizer step (docs/grit.md): the regularizers' gradients, clipping to
    /// `max_grad_norm`, the inversion when due and the preconditioning, AdamW with learning rate
    /// `lr`, then the reprojection when due. `step` is the step being taken (1-based), `loss` its
    /// training loss. Returns the gradient norm before clipping and what GRIT did.
    #[allow(clippy::too_many_arguments)]
    pub fn grit_optimizer_step(
        &mut self,
        model: &mut LlamaModel,
        opt: &mut AdamW,
        lr: f32,
        max_grad_norm: f32,
        grit: &mut GritState,
        step: usize,
        loss: f64,
    ) -> Result<(f32, GritStepLog)> {
        let mut log = GritStepLog { damping: grit.damping, ..Default::default() };
        match self {
            Engine::Cpu { grads } => {
                let mut bufs = grads.buffers_mut();
                log.reg_loss = grit.add_regularizer_grads(step, &lora_params(model), &mut bufs)?;
                let norm = clip_or_norm(&mut bufs, max_grad_norm)?;
                if !norm.is_finite() {
                    // As in `optimizer_step`: no update from a NaN or infinite gradient.
                    return Ok((norm, log));
                }
                let (inverted, ratio) = grit.precondition(step, &mut bufs)?;
                opt.update(model, &grads.buffers(), lr)?;
                if grit.reproject_due(step) {
                    let mut params = lora_params_mut(model);
                    let project = grit.cfg.project_optimizer_state;
                    let mut m: Vec<&mut [f32]> = opt.m.iter_mut().map(|v| v.as_mut_slice()).collect();
                    let mut v: Vec<&mut [f32]> = opt.v.iter_mut().map(|v| v.as_mut_slice()).collect();
                    let moments = project.then_some((m.as_mut_slice(), v.as_mut_slice()));
                    log.reprojected = Some(grit.reproject(step, &mut params, moments)?);
                }
                log.finish(grit, loss, inverted, ratio);
                Ok((norm, log))
            }
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => g.grit_optimizer_step(opt, lr, max_grad_norm, grit, step, loss),
            #[cfg(feature = "cuda")]
            Engine::CudaBf16(g) => g.grit_optimizer_step(opt, lr, max_grad_norm, grit, step, loss),
        }
    }

    /// Copies GRIT's device state into `grit` (before a checkpoint; a no-op on the CPU).
    pub fn sync_grit(&self, grit: &mut GritState) -> Result<()> {
        match self {
            Engine::Cpu { .. } => Ok(()),
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => g.grit.as_ref().map_or(Ok(()), |gg| gg.sync_to(&g.be, grit)),
            #[cfg(feature = "cuda")]
            Engine::CudaBf16(g) => g.grit.as_ref().map_or(Ok(()), |gg| gg.sync_to(&g.be, grit)),
        }
    }

    /// Copies the LoRA factors and the optimizer's moments to the host model and `opt` (a no-op
    /// on the CPU, where they live there already).
    pub fn sync_to_host(&self, model: &mut LlamaModel, opt: &mut AdamW) -> Result<()> {
        match self {
            Engine::Cpu { .. } => Ok(()),
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => g.sync_to_host(model, opt),
            #[cfg(feature = "cuda")]
            Engine::CudaBf16(g) => g.sync_to_host(model, opt),
        }
    }

    /// The gradients as host vectors, A then B per adapted module (tests and diagnostics).
    pub fn grads_to_host(&self) -> Result<Vec<Vec<f32>>> {
        match self {
            Engine::Cpu { grads } => Ok(grads.buffers().into_iter().map(<[f32]>::to_vec).collect()),
            #[cfg(feature = "cuda")]
            Engine::Cuda(g) => g.be.download_grads(&g.grads),
            #[cfg(feature = "cuda")]
            Engine::CudaBf16(g) => g.be.download_grads(&g.grads),
        }
    }

    pub fn is_cuda(&self) -> bool {
        !matches!(self, Engine::Cpu { .. })
    }
}
