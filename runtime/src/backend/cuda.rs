//! The CUDA backend: the model's weights resident on one GPU and every op one of our kernels
//! (gristmill-kernels). `CudaBackend<T>` keeps activations, dense weights, the embedding table
//! and the KV cache in T — bf16 for speed, f32 to match the CPU to f32 rounding — while norms'
//! weights, per-row statistics (rstd, log-sum-exp), logits, LoRA master weights and gradients are
//! f32. NF4 linear layers go through dequantize + GEMM and attention through the simple kernel
//! until the fused NF4 and flash kernels replace them.
//!
//! LoRA parameters live in ONE flat f32 buffer (per adapted module: A (r, K) then B (N, r), in
//! [`crate::train::step::lora_slots`] order — the order of `LoraGrads::buffers_mut` and of the
//! optimizer's state), and their gradients in another of the same layout, so that the optimizer
//! updates every adapter in one launch and the gradient norm is one reduction.

use super::{Backend, BatchIn, Dropout, MicroStats, Norm, Proj, dropout_tag};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{Linear, LlamaModel, Weight};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr};
use gristmill_core::ops::attention::AttnShape;
use gristmill_core::ops::cross_entropy::IGNORE_INDEX;
use gristmill_core::ops::rope::rope_tables;
use gristmill_core::rng::mix64;
use gristmill_kernels::Float;
use gristmill_kernels::convert::cast;
use gristmill_kernels::gemm::{Layout, Nf4Weight, gemm, nf4_matmul_nn, nf4_matmul_nt};
use gristmill_kernels::nf4::{GEMV_MAX_M, Nf4Matrix, nf4_gemv};
use gristmill_kernels::{Gpu, attention as attn, elementwise as ew, loss, optim};
use std::sync::Arc;

/// Logits held at once by the fused LM head + cross-entropy: 64 Mi floats (256 MiB).
const CE_LOGITS: usize = 1 << 26;

/// A frozen linear weight on the GPU.
// One per linear layer (a few hundred at most): the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum GpuWeight<T> {
    /// (N, K)
    Dense(CudaSlice<T>),
    /// NF4 for the dequantize + GEMM products, and, when the backend decodes, the same weight for
    /// the one-pass GEMV of 1…16 rows (it needs weights quantized from bf16).
    Nf4(Nf4Weight, Option<Nf4Matrix>),
}

/// Where an adapter's factors sit in the flat LoRA buffers.
#[derive(Debug, Clone, Copy)]
struct LoraSlot {
    /// Position in [`crate::train::step::lora_slots`] order.
    index: usize,
    /// A: (r, K) at [a, a + r·K); B: (N, r) at [b, b + N·r)
    a: usize,
    b: usize,
    r: usize,
    scale: f32,
}

struct GpuLinear<T> {
    weight: GpuWeight<T>,
    /// (N)
    bias: Option<CudaSlice<T>>,
    lora: Option<LoraSlot>,
    n: usize,
    k: usize,
}

struct GpuLayer<T> {
    attn_norm: CudaSlice<f32>,
    mlp_norm: CudaSlice<f32>,
    lin: [GpuLinear<T>; 7],
}

/// The model on one GPU, with activations in T.
pub struct CudaBackend<T: Float = f32> {
    gpu: Arc<Gpu>,
    cfg: ModelConfig,
    /// (V, C)
    embed: CudaSlice<T>,
    layers: Vec<GpuLayer<T>>,
    /// (C)
    norm: CudaSlice<f32>,
    /// None when tied to the embeddings.
    lm_head: Option<GpuLinear<T>>,
    /// Every LoRA factor, flat (see the module's doc): the f32 master copy the optimizer updates.
    lora: CudaSlice<f32>,
    /// The same in T, what the products read; [`CudaBackend::refresh_lora`] after every update.
    lora_t: CudaSlice<T>,
    /// Host-side layout of `lora`: (offset, len) per buffer, A then B per slot.
    lora_layout: Vec<(usize, usize)>,
    /// (M) of ones, for broadcasting biases through a rank-1 GEMM; grown on demand.
    ones: std::sync::Mutex<Option<CudaSlice<T>>>,
}

impl<T: Float> std::fmt::Debug for CudaBackend<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({:?}, {} layers)", self.gpu, self.layers.len())
    }
}

/// Gradients of every LoRA factor, flat, in the layout of the backend's LoRA buffer.
pub struct GpuGrads {
    pub flat: CudaSlice<f32>,
    /// GRIT's statistics of this micro-batch, gathered by the backward when set.
    pub kfac: Option<GpuKfacCapture>,
}

/// Masked Gram matrices of the adapters' bottleneck activations for GRIT, on the GPU: per slot
/// Σ_t w_t u_t u_tᵀ and Σ_t w_t v_t v_tᵀ, (S, r, r) each, accumulated by `linear_bwd`.
pub struct GpuKfacCapture {
    /// (M) row weights: 1 where the position has a loss target.
    pub weights: CudaSlice<f32>,
    pub uu: CudaSlice<f32>,
    pub vv: CudaSlice<f32>,
    /// The Gram kernel's partial sums, held across calls.
    pub scratch: CudaSlice<f32>,
    pub r: usize,
}

/// What a linear layer keeps for its backward.
pub struct GpuSaved<T> {
    /// u = (x∘mask) Aᵀ: (M, r)
    u: Option<CudaSlice<T>>,
    /// x∘mask: (M, K) when dropout is on.
    xd: Option<CudaSlice<T>>,
    /// The dropout seed of this module, to mask the input gradient the same way.
    drop: Option<(u64, f32)>,
}

/// A batch on the GPU.
pub struct GpuBatch {
    b: usize,
    t: usize,
    /// (M) u32
    tokens: CudaSlice<u32>,
    /// (M, D/2) each
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    segments: Option<CudaSlice<u32>>,
    /// host copy of the targets (M); rows with a target are gathered for the loss.
    targets: Option<Vec<i64>>,
}

/// Keys and values of past positions, per layer: (capacity, Hkv, D) each, `len` filled.
pub struct GpuCache<T> {
    k: Vec<CudaSlice<T>>,
    v: Vec<CudaSlice<T>>,
    cap: usize,
    len: usize,
}

fn up<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, v: &[T]) -> Result<CudaSlice<T>> {
    Ok(gpu.upload(v)?)
}

/// `v` converted to T on the host and uploaded.
fn up_t<T: Float>(gpu: &Gpu, v: &[f32]) -> Result<CudaSlice<T>> {
    let host: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    Ok(gpu.upload(&host)?)
}

fn upload_linear<T: Float>(gpu: &Gpu, lin: &Linear, slot: Option<LoraSlot>, gemv: bool) -> Result<GpuLinear<T>> {
    let weight = match &lin.weight {
        Weight::Dense(w) => GpuWeight::Dense(up_t(gpu, w)?),
        Weight::Nf4(w) => {
            // A weight the GEMV cannot take (not bf16-sourced) keeps the general path.
            let mat = if gemv { Nf4Matrix::upload(gpu, w).ok() } else { None };
            GpuWeight::Nf4(Nf4Weight::upload(gpu, w)?, mat)
        }
    };
    let bias = lin.bias.as_ref().map(|b| up_t(gpu, b)).transpose()?;
    Ok(GpuLinear { weight, bias, lora: slot, n: lin.n, k: lin.k })
}

impl<T: Float> CudaBackend<T> {
    /// Uploads `model` (frozen weights as they are held: dense f32 or NF4; LoRA factors into the
    /// flat buffer) for training and evaluation.
    pub fn new(gpu: Arc<Gpu>, model: &LlamaModel) -> Result<Self> {
        Self::with_decode(gpu, model, false)
    }

    /// [`CudaBackend::new`] for generation: NF4 weights also go up in the layout of the one-pass
    /// GEMV that decodes 1…16 tokens at a time (a second copy of the 4-bit weights).
    pub fn for_decoding(gpu: Arc<Gpu>, model: &LlamaModel) -> Result<Self> {
        Self::with_decode(gpu, model, true)
    }

    fn with_decode(gpu: Arc<Gpu>, model: &LlamaModel, decode: bool) -> Result<Self> {
        let cfg = model.cfg.clone();
        let mut host_lora: Vec<f32> = Vec::new();
        let mut lora_layout = Vec::new();
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            let mut lins = Vec::with_capacity(7);
            for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                let slot = lin.lora.as_ref().map(|ad| {
                    let a = host_lora.len();
                    host_lora.extend_from_slice(&ad.a);
                    let b = host_lora.len();
                    host_lora.extend_from_slice(&ad.b);
                    lora_layout.push((a, ad.a.len()));
                    lora_layout.push((b, ad.b.len()));
                    LoraSlot { index: lora_layout.len() / 2 - 1, a, b, r: ad.r, scale: ad.scale }
                });
                lins.push(upload_linear(&gpu, lin, slot, decode)?);
            }
            let lin: [GpuLinear<T>; 7] =
                lins.try_into().map_err(|_| Error::Invalid("a layer has seven linear layers".into()))?;
            layers.push(GpuLayer { attn_norm: up(&gpu, &l.attn_norm)?, mlp_norm: up(&gpu, &l.mlp_norm)?, lin });
        }
        let lm_head = model.lm_head.as_ref().map(|h| upload_linear(&gpu, h, None, decode)).transpose()?;
        if host_lora.is_empty() {
            host_lora.push(0.0);
        }
        let lora = up(&gpu, &host_lora)?;
        let lora_t = up_t(&gpu, &host_lora)?;
        Ok(Self {
            embed: up_t(&gpu, &model.embed)?,
            norm: up(&gpu, &model.norm)?,
            layers,
            lm_head,
            lora,
            lora_t,
            lora_layout,
            cfg,
            gpu,
            ones: std::sync::Mutex::new(None),
        })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Linear layers whose 1…16-row products go through the NF4 GEMV.
    pub fn gemv_layers(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.lin.iter())
            .chain(self.lm_head.as_ref())
            .filter(|l| matches!(l.weight, GpuWeight::Nf4(_, Some(_))))
            .count()
    }

    /// Number of LoRA parameters.
    pub fn lora_len(&self) -> usize {
        self.lora_layout.last().map(|(o, l)| o + l).unwrap_or(0)
    }

    /// The flat LoRA parameters (for the optimizer).
    pub fn lora_params(&self) -> &CudaSlice<f32> {
        &self.lora
    }

    /// The f32 master LoRA buffer, mutable (refresh the T copy after changing it).
    pub fn lora_params_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.lora
    }

    /// Copies the f32 master LoRA factors into the T copy the products read.
    pub fn refresh_lora(&mut self) -> Result<()> {
        cast::<f32, T>(&self.gpu, &self.lora, &mut self.lora_t)?;
        Ok(())
    }

    /// Every adapter's place in the flat LoRA buffers, in slot order, and the rank (GRIT's kernels
    /// work over this table).
    pub fn lora_slots(&self) -> (Vec<gristmill_kernels::grit::Slot>, usize) {
        let mut out = Vec::new();
        let mut r = 0;
        for l in &self.layers {
            for lin in &l.lin {
                if let Some(s) = lin.lora {
                    out.push(gristmill_kernels::grit::Slot { a_off: s.a, b_off: s.b, k: lin.k, n: lin.n });
                    r = s.r;
                }
            }
        }
        (out, r)
    }

    /// Zeroed gradients in the LoRA layout.
    pub fn new_grads(&self) -> Result<GpuGrads> {
        Ok(GpuGrads { flat: self.gpu.zeros(self.lora_len().max(1))?, kfac: None })
    }

    /// The LoRA parameters, one host vector per buffer (A then B per slot).
    pub fn download_lora(&self) -> Result<Vec<Vec<f32>>> {
        Ok(self.split_lora(&self.gpu.download(&self.lora)?))
    }

    /// A flat host copy of a buffer in the LoRA layout, split into one vector per A or B.
    fn split_lora(&self, all: &[f32]) -> Vec<Vec<f32>> {
        self.lora_layout.iter().map(|&(o, l)| all[o..o + l].to_vec()).collect()
    }

    /// Gradients as host vectors in the same split.
    pub fn download_grads(&self, g: &GpuGrads) -> Result<Vec<Vec<f32>>> {
        Ok(self.split_lora(&self.gpu.download(&g.flat)?))
    }

    /// Writes the GPU's LoRA factors back into `model`'s adapters (for checkpoints and saving).
    pub fn sync_lora_to(&self, model: &mut LlamaModel) -> Result<()> {
        let bufs = self.download_lora()?;
        let mut it = bufs.into_iter();
        for l in &mut model.layers {
            for (_, lin) in l.linears_mut() {
                if let Some(ad) = &mut lin.lora {
                    match (it.next(), it.next()) {
                        (Some(a), Some(b)) if a.len() == ad.a.len() && b.len() == ad.b.len() => {
                            ad.a = a;
                            ad.b = b;
                        }
                        _ => return Err(Error::Invalid("the model's adapters changed shape since upload".into())),
                    }
                }
            }
        }
        Ok(())
    }

    /// Uploads `model`'s LoRA factors into the flat buffer (after loading a checkpoint).
    pub fn load_lora_from(&mut self, model: &LlamaModel) -> Result<()> {
        let mut host = vec![0f32; self.lora.len()];
        let mut slots = self.lora_layout.iter();
        for l in &model.layers {
            for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                if let Some(ad) = &lin.lora {
                    for src in [&ad.a, &ad.b] {
                        match slots.next() {
                            Some(&(o, len)) if len == src.len() => host[o..o + len].copy_from_slice(src),
                            _ => return Err(Error::Invalid("the model's adapters changed shape since upload".into())),
                        }
                    }
                }
            }
        }
        self.gpu.upload_into(&host, &mut self.lora)?;
        self.refresh_lora()
    }

    fn lin(&self, layer: usize, p: Proj) -> Result<&GpuLinear<T>> {
        self.layers
            .get(layer)
            .map(|l| &l.lin[p as usize])
            .ok_or_else(|| Error::Invalid(format!("the model has no layer {layer}")))
    }

    fn norm_w(&self, n: Norm) -> Result<&CudaSlice<f32>> {
        let layer = |i: usize| self.layers.get(i).ok_or_else(|| Error::Invalid(format!("the model has no layer {i}")));
        Ok(match n {
            Norm::Attn(i) => &layer(i)?.attn_norm,
            Norm::Mlp(i) => &layer(i)?.mlp_norm,
            Norm::Final => &self.norm,
        })
    }

    fn view(&self, off: usize, len: usize) -> CudaView<'_, T> {
        self.lora_t.slice(off..off + len)
    }

    /// y (M, N) = x Wᵀ (+ beta·y).
    fn base_fwd(&self, lin: &GpuLinear<T>, x: &CudaSlice<T>, y: &mut CudaSlice<T>, m: usize) -> Result<()> {
        match &lin.weight {
            GpuWeight::Dense(w) => gemm::<T, T>(&self.gpu, Layout::NT, m, lin.n, lin.k, x, w, y, 1.0, 0.0)?,
            GpuWeight::Nf4(_, Some(mat)) if m <= GEMV_MAX_M => nf4_gemv::<T>(&self.gpu, x, mat, y, m, 1.0, 0.0)?,
            GpuWeight::Nf4(w, _) => nf4_matmul_nt::<T>(&self.gpu, x, w, y, m, 1.0, 0.0)?,
        }
        if let Some(b) = &lin.bias {
            self.add_bias(y, b, m, lin.n)?;
        }
        Ok(())
    }

    /// y (M, N) += 1 (M, 1) · bias (1, N).
    fn add_bias(&self, y: &mut CudaSlice<T>, bias: &CudaSlice<T>, m: usize, n: usize) -> Result<()> {
        let mut ones = self.ones.lock().map_err(|_| Error::Invalid("bias buffer poisoned".into()))?;
        if ones.as_ref().is_none_or(|o| o.len() < m) {
            *ones = Some(up_t(&self.gpu, &vec![1f32; m.next_power_of_two()])?);
        }
        let Some(o) = ones.as_ref() else { return Err(Error::Invalid("bias buffer missing".into())) };
        gemm::<T, T>(&self.gpu, Layout::NN, m, n, 1, &o.slice(0..m), bias, y, 1.0, 1.0)?;
        Ok(())
    }

    /// dx (M, K) = dy W (+ beta·dx).
    fn base_bwd(
        &self,
        lin: &GpuLinear<T>,
        dy: &CudaSlice<T>,
        dx: &mut CudaSlice<T>,
        m: usize,
        beta: f32,
    ) -> Result<()> {
        match &lin.weight {
            GpuWeight::Dense(w) => gemm::<T, T>(&self.gpu, Layout::NN, m, lin.k, lin.n, dy, w, dx, 1.0, beta)?,
            GpuWeight::Nf4(w, _) => nf4_matmul_nn::<T>(&self.gpu, dy, w, dx, m, 1.0, beta)?,
        }
        Ok(())
    }

    /// The LM head's weight (V, C) product: logits (n, V) f32 = h Wᵀ.
    fn head_fwd(&self, h: &impl DevicePtr<T>, logits: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        match &self.lm_head {
            None => gemm::<T, f32>(&self.gpu, Layout::NT, n, v, c, h, &self.embed, logits, 1.0, 0.0)?,
            Some(lin) => match &lin.weight {
                GpuWeight::Dense(w) => gemm::<T, f32>(&self.gpu, Layout::NT, n, v, c, h, w, logits, 1.0, 0.0)?,
                GpuWeight::Nf4(w, _) => {
                    // The NF4 products give T; the loss reads f32.
                    let mut lt = self.gpu.alloc::<T>(n * v)?;
                    nf4_matmul_nt::<T>(&self.gpu, h, w, &mut lt, n, 1.0, 0.0)?;
                    cast::<T, f32>(&self.gpu, &lt, logits)?;
                }
            },
        }
        Ok(())
    }

    /// dh (n, C) = dlogits W, dlogits (n, V) in T.
    fn head_bwd(&self, dlogits: &CudaSlice<T>, dh: &mut CudaSlice<T>, n: usize) -> Result<()> {
        let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        match &self.lm_head {
            None => gemm::<T, T>(&self.gpu, Layout::NN, n, c, v, dlogits, &self.embed, dh, 1.0, 0.0)?,
            Some(lin) => match &lin.weight {
                GpuWeight::Dense(w) => gemm::<T, T>(&self.gpu, Layout::NN, n, c, v, dlogits, w, dh, 1.0, 0.0)?,
                GpuWeight::Nf4(w, _) => nf4_matmul_nn::<T>(&self.gpu, dlogits, w, dh, n, 1.0, 0.0)?,
            },
        }
        Ok(())
    }

    fn grow_cache(&self, cache: &mut GpuCache<T>, need: usize) -> Result<()> {
        if need <= cache.cap {
            return Ok(());
        }
        let row = self.cfg.num_kv_heads * self.cfg.head_dim;
        let cap = need.next_power_of_two().max(256).min(self.cfg.max_position_embeddings.max(need));
        for buf in cache.k.iter_mut().chain(cache.v.iter_mut()) {
            let mut bigger = self.gpu.zeros::<T>(cap * row)?;
            if cache.len > 0 {
                let n = cache.len * row;
                self.gpu.stream().memcpy_dtod(&buf.slice(0..n), &mut bigger.slice_mut(0..n)).map_err(gpu_err)?;
            }
            *buf = bigger;
        }
        cache.cap = cap;
        Ok(())
    }
}

fn gpu_err(e: cudarc::driver::DriverError) -> Error {
    Error::Gpu(gristmill_kernels::KernelError::Driver(e))
}

impl<T: Float> Backend for CudaBackend<T> {
    type Buf = CudaSlice<T>;
    type Stat = CudaSlice<f32>;
    type Saved = GpuSaved<T>;
    type Grads = GpuGrads;
    type Batch = GpuBatch;
    type Cache = GpuCache<T>;

    fn cfg(&self) -> &ModelConfig {
        &self.cfg
    }

    fn batch(&self, b: &BatchIn<'_>) -> Result<GpuBatch> {
        let tables = rope_tables(&self.cfg.rope, b.positions)?;
        Ok(GpuBatch {
            b: b.b,
            t: b.t,
            tokens: up(&self.gpu, b.tokens)?,
            cos: up(&self.gpu, &tables.cos)?,
            sin: up(&self.gpu, &tables.sin)?,
            segments: b.segments.map(|s| up(&self.gpu, s)).transpose()?,
            targets: b.targets.map(<[i64]>::to_vec),
        })
    }

    fn embed(&self, b: &GpuBatch) -> Result<CudaSlice<T>> {
        let (v, c) = (self.cfg.vocab_size, self.cfg.hidden_size);
        let mut x = self.gpu.alloc::<T>(b.b * b.t * c)?;
        ew::embedding_fwd::<T>(&self.gpu, &b.tokens, &self.embed, &mut x, v, c)?;
        Ok(x)
    }

    fn norm(&self, x: &CudaSlice<T>, n: Norm, m: usize) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
        let c = self.cfg.hidden_size;
        let (mut y, mut rstd) = (self.gpu.alloc::<T>(m * c)?, self.gpu.alloc::<f32>(m)?);
        ew::rmsnorm_fwd::<T>(&self.gpu, x, self.norm_w(n)?, &mut y, &mut rstd, m, c, self.cfg.rms_norm_eps)?;
        Ok((y, rstd))
    }

    fn add_norm(
        &self,
        x: &mut CudaSlice<T>,
        delta: &CudaSlice<T>,
        n: Norm,
        m: usize,
    ) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
        let c = self.cfg.hidden_size;
        let (mut y, mut rstd) = (self.gpu.alloc::<T>(m * c)?, self.gpu.alloc::<f32>(m)?);
        let w = self.norm_w(n)?;
        ew::add_rmsnorm_fwd::<T>(&self.gpu, x, delta, w, &mut y, &mut rstd, m, c, self.cfg.rms_norm_eps)?;
        Ok((y, rstd))
    }

    fn norm_bwd(
        &self,
        x: &CudaSlice<T>,
        n: Norm,
        rstd: &CudaSlice<f32>,
        dy: &CudaSlice<T>,
        dx: &mut CudaSlice<T>,
        m: usize,
        accumulate: bool,
    ) -> Result<()> {
        let c = self.cfg.hidden_size;
        ew::rmsnorm_bwd::<T>(&self.gpu, x, self.norm_w(n)?, rstd, dy, dx, m, c, accumulate)?;
        Ok(())
    }

    fn linear(
        &self,
        layer: usize,
        p: Proj,
        x: &CudaSlice<T>,
        m: usize,
        train: bool,
        drop: Option<Dropout>,
    ) -> Result<(CudaSlice<T>, GpuSaved<T>)> {
        let lin = self.lin(layer, p)?;
        let mut y = self.gpu.alloc::<T>(m * lin.n)?;
        self.base_fwd(lin, x, &mut y, m)?;
        let none = GpuSaved { u: None, xd: None, drop: None };
        let Some(slot) = lin.lora else { return Ok((y, none)) };
        let (a, b) = (self.view(slot.a, slot.r * lin.k), self.view(slot.b, lin.n * slot.r));
        let drop = match drop {
            Some(d) if train && d.p > 0.0 => Some((mix64(d.seed ^ dropout_tag(layer, p)), d.p)),
            _ => None,
        };
        let xd = match drop {
            Some((seed, pr)) => {
                let mut xd = self.gpu.alloc::<T>(m * lin.k)?;
                ew::dropout_fwd::<T>(&self.gpu, x, &mut xd, seed, pr)?;
                Some(xd)
            }
            None => None,
        };
        let mut u = self.gpu.alloc::<T>(m * slot.r)?;
        gemm::<T, T>(&self.gpu, Layout::NT, m, slot.r, lin.k, xd.as_ref().unwrap_or(x), &a, &mut u, 1.0, 0.0)?;
        gemm::<T, T>(&self.gpu, Layout::NT, m, lin.n, slot.r, &u, &b, &mut y, slot.scale, 1.0)?;
        Ok((y, if train { GpuSaved { u: Some(u), xd, drop } } else { none }))
    }

    fn linear_bwd(
        &self,
        layer: usize,
        p: Proj,
        x: &CudaSlice<T>,
        saved: &GpuSaved<T>,
        dy: &CudaSlice<T>,
        m: usize,
        grads: &mut GpuGrads,
        dx: &mut CudaSlice<T>,
        accumulate: bool,
    ) -> Result<()> {
        let lin = self.lin(layer, p)?;
        self.base_bwd(lin, dy, dx, m, if accumulate { 1.0 } else { 0.0 })?;
        let Some(slot) = lin.lora else { return Ok(()) };
        let Some(u) = &saved.u else {
            return Err(Error::Invalid(format!("layer {layer} {}: no saved activations for the backward", p.name())));
        };
        let (r, n, k, s) = (slot.r, lin.n, lin.k, slot.scale);
        let (a, b) = (self.view(slot.a, r * k), self.view(slot.b, n * r));
        // v = dy B: (M, r)
        let mut v = self.gpu.alloc::<T>(m * r)?;
        gemm::<T, T>(&self.gpu, Layout::NN, m, r, n, dy, &b, &mut v, 1.0, 0.0)?;
        if let Some(kc) = &mut grads.kfac {
            let rr = kc.r * kc.r;
            let at = slot.index * rr;
            if kc.r != r || kc.uu.len() < at + rr {
                return Err(Error::Invalid(format!("GRIT statistics have no slot {} of rank {r}", slot.index)));
            }
            gristmill_kernels::grit::kfac_gram_with_scratch::<T>(
                &self.gpu,
                u,
                &v,
                &kc.weights,
                m,
                r,
                &mut kc.uu.slice_mut(at..at + rr),
                &mut kc.vv.slice_mut(at..at + rr),
                &mut kc.scratch,
            )?;
        }
        // dB += s · dyᵀ u: (N, r)
        gemm::<T, f32>(
            &self.gpu,
            Layout::TN,
            n,
            r,
            m,
            dy,
            u,
            &mut grads.flat.slice_mut(slot.b..slot.b + n * r),
            s,
            1.0,
        )?;
        // dA += s · vᵀ (x∘mask): (r, K)
        let xin = saved.xd.as_ref().unwrap_or(x);
        gemm::<T, f32>(
            &self.gpu,
            Layout::TN,
            r,
            k,
            m,
            &v,
            xin,
            &mut grads.flat.slice_mut(slot.a..slot.a + r * k),
            s,
            1.0,
        )?;
        // dx += s · (v A)∘mask
        match saved.drop {
            None => gemm::<T, T>(&self.gpu, Layout::NN, m, k, r, &v, &a, dx, s, 1.0)?,
            Some((seed, pr)) => {
                let mut t = self.gpu.alloc::<T>(m * k)?;
                gemm::<T, T>(&self.gpu, Layout::NN, m, k, r, &v, &a, &mut t, s, 0.0)?;
                let mut tm = self.gpu.alloc::<T>(m * k)?;
                ew::dropout_fwd::<T>(&self.gpu, &t, &mut tm, seed, pr)?;
                ew::add::<T>(&self.gpu, dx, &tm)?;
            }
        }
        Ok(())
    }

    fn rope(&self, x: &mut CudaSlice<T>, b: &GpuBatch, heads: usize, inverse: bool) -> Result<()> {
        let (n, d) = (b.b * b.t, self.cfg.head_dim);
        if inverse {
            ew::rope_bwd::<T>(&self.gpu, x, &b.cos, &b.sin, n, heads, d)?;
        } else {
            ew::rope_fwd::<T>(&self.gpu, x, &b.cos, &b.sin, n, heads, d)?;
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        shape: &AttnShape,
        b: &GpuBatch,
    ) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
        let mut o = self.gpu.alloc::<T>(q.len())?;
        let mut lse = self.gpu.alloc::<f32>(shape.b * shape.h * shape.tq)?;
        let scale = 1.0 / (shape.d as f32).sqrt();
        attn::attention_fwd::<T>(&self.gpu, q, k, v, &mut o, &mut lse, shape, scale, b.segments.as_ref())?;
        Ok((o, lse))
    }

    fn attention_bwd(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        o: &CudaSlice<T>,
        lse: &CudaSlice<f32>,
        d_o: &CudaSlice<T>,
        shape: &AttnShape,
        b: &GpuBatch,
    ) -> Result<(CudaSlice<T>, CudaSlice<T>, CudaSlice<T>)> {
        let mut dq = self.gpu.alloc::<T>(q.len())?;
        let mut dk = self.gpu.alloc::<T>(k.len())?;
        let mut dv = self.gpu.alloc::<T>(v.len())?;
        let scale = 1.0 / (shape.d as f32).sqrt();
        attn::attention_bwd::<T>(
            &self.gpu,
            q,
            k,
            v,
            o,
            lse,
            d_o,
            &mut dq,
            &mut dk,
            &mut dv,
            shape,
            scale,
            b.segments.as_ref(),
        )?;
        Ok((dq, dk, dv))
    }

    fn swiglu(&self, g: &CudaSlice<T>, u: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        let mut out = self.gpu.alloc::<T>(g.len())?;
        ew::swiglu_fwd::<T>(&self.gpu, g, u, &mut out)?;
        Ok(out)
    }

    fn swiglu_bwd(&self, g: &CudaSlice<T>, u: &CudaSlice<T>, d: &CudaSlice<T>) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
        let (mut dg, mut du) = (self.gpu.alloc::<T>(g.len())?, self.gpu.alloc::<T>(g.len())?);
        ew::swiglu_bwd::<T>(&self.gpu, g, u, d, &mut dg, &mut du)?;
        Ok((dg, du))
    }

    fn add(&self, a: &mut CudaSlice<T>, b: &CudaSlice<T>) -> Result<()> {
        ew::add::<T>(&self.gpu, a, b)?;
        Ok(())
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<T>> {
        Ok(self.gpu.zeros::<T>(n)?)
    }

    fn copy(&self, x: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        self.gpu.stream().clone_dtod(x).map_err(gpu_err)
    }

    fn head_loss(
        &self,
        hn: &CudaSlice<T>,
        b: &GpuBatch,
        mut backward: Option<(f32, &mut CudaSlice<T>)>,
    ) -> Result<MicroStats> {
        let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let m = b.b * b.t;
        let Some(targets) = &b.targets else {
            return Err(Error::Invalid("head_loss: the batch has no targets".into()));
        };
        let rows: Vec<u32> = (0..m).filter(|&r| targets[r] != IGNORE_INDEX).map(|r| r as u32).collect();
        let chunk = (CE_LOGITS / v.max(1)).max(1);
        let mut stats = MicroStats::default();
        // dL/dhn in f32, scattered row by row, then converted into the caller's buffer.
        let mut dhn32 = match backward {
            Some(_) => Some(self.gpu.zeros::<f32>(m * c)?),
            None => None,
        };
        for rs in rows.chunks(chunk) {
            let n = rs.len();
            let idx = up(&self.gpu, rs)?;
            let tg: Vec<i32> = rs.iter().map(|&r| targets[r as usize] as i32).collect();
            let tg = up(&self.gpu, &tg)?;
            // Gather the rows with a target: an embedding lookup with hn as the table.
            let mut hc = self.gpu.alloc::<T>(n * c)?;
            ew::embedding_fwd::<T>(&self.gpu, &idx, hn, &mut hc, m, c)?;
            let mut logits = self.gpu.alloc::<f32>(n * v)?;
            self.head_fwd(&hc, &mut logits, n)?;
            let (mut loss_rows, mut lse) = (self.gpu.alloc::<f32>(n)?, self.gpu.alloc::<f32>(n)?);
            let scale = backward.as_ref().map(|(s, _)| *s);
            loss::cross_entropy_fwd_bwd::<f32>(&self.gpu, &mut logits, &tg, &mut loss_rows, &mut lse, n, v, scale)?;
            let l = self.gpu.download(&loss_rows)?;
            stats.loss_sum += l.iter().map(|&x| f64::from(x)).sum::<f64>();
            stats.n_targets += n;
            if let Some(d32) = dhn32.as_mut() {
                let mut dl = self.gpu.alloc::<T>(n * v)?;
                cast::<f32, T>(&self.gpu, &logits, &mut dl)?;
                drop(logits);
                let mut dh = self.gpu.alloc::<T>(n * c)?;
                self.head_bwd(&dl, &mut dh, n)?;
                // Scatter back to the rows (each once, into zeros): the embedding's backward.
                ew::embedding_bwd::<T>(&self.gpu, &idx, &dh, d32, m, c)?;
            }
        }
        if let (Some(d32), Some((_, dhn))) = (dhn32, backward.as_mut()) {
            cast::<f32, T>(&self.gpu, &d32, &mut **dhn)?;
        }
        Ok(stats)
    }

    fn logits(&self, hn: &CudaSlice<T>, m: usize, rows: usize) -> Result<Vec<f32>> {
        let c = self.cfg.hidden_size;
        let first = m.checked_sub(rows).ok_or_else(|| Error::Invalid(format!("logits of {rows} rows of {m}")))?;
        let mut logits = self.gpu.alloc::<f32>(rows * self.cfg.vocab_size)?;
        self.head_fwd(&hn.slice(first * c..m * c), &mut logits, rows)?;
        Ok(self.gpu.download(&logits)?)
    }

    fn new_cache(&self) -> Result<GpuCache<T>> {
        let n = self.cfg.num_layers;
        let mut k = Vec::with_capacity(n);
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            k.push(self.gpu.zeros::<T>(1)?);
            v.push(self.gpu.zeros::<T>(1)?);
        }
        Ok(GpuCache { k, v, cap: 0, len: 0 })
    }

    fn cache_len(&self, cache: &GpuCache<T>) -> usize {
        cache.len
    }

    fn cache_append(
        &self,
        cache: &mut GpuCache<T>,
        layer: usize,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        t: usize,
    ) -> Result<()> {
        self.grow_cache(cache, cache.len + t)?;
        let row = self.cfg.num_kv_heads * self.cfg.head_dim;
        let (a, z) = (cache.len * row, (cache.len + t) * row);
        let (Some(kc), Some(vc)) = (cache.k.get_mut(layer), cache.v.get_mut(layer)) else {
            return Err(Error::Invalid(format!("KV cache has no layer {layer}")));
        };
        let stream = self.gpu.stream();
        stream.memcpy_dtod(&k.slice(0..t * row), &mut kc.slice_mut(a..z)).map_err(gpu_err)?;
        stream.memcpy_dtod(&v.slice(0..t * row), &mut vc.slice_mut(a..z)).map_err(gpu_err)?;
        Ok(())
    }

    fn cache_advance(&self, cache: &mut GpuCache<T>, t: usize) {
        cache.len += t;
    }

    fn cache_clear(&self, cache: &mut GpuCache<T>) {
        cache.len = 0;
    }

    fn attention_cached(
        &self,
        q: &CudaSlice<T>,
        cache: &GpuCache<T>,
        layer: usize,
        shape: &AttnShape,
    ) -> Result<CudaSlice<T>> {
        let row = self.cfg.num_kv_heads * self.cfg.head_dim;
        let (Some(kc), Some(vc)) = (cache.k.get(layer), cache.v.get(layer)) else {
            return Err(Error::Invalid(format!("KV cache has no layer {layer}")));
        };
        let n = shape.tk * row;
        let mut o = self.gpu.alloc::<T>(q.len())?;
        let mut lse = self.gpu.alloc::<f32>(shape.h * shape.tq)?;
        let scale = 1.0 / (shape.d as f32).sqrt();
        attn::attention_fwd::<T>(&self.gpu, q, &kc.slice(0..n), &vc.slice(0..n), &mut o, &mut lse, shape, scale, None)?;
        Ok(o)
    }
}

/// First and second moments, one host vector per LoRA buffer.
pub type Moments = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// The optimizer of a GPU run: AdamW over the flat LoRA buffer, one launch a step.
pub struct GpuAdamW {
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    pub step: u64,
}

impl GpuAdamW {
    pub fn new<T: Float>(be: &CudaBackend<T>) -> Result<Self> {
        let n = be.lora.len();
        Ok(Self { m: be.gpu.zeros(n)?, v: be.gpu.zeros(n)?, step: 0 })
    }

    /// Moments to the host, split like the LoRA buffers (for checkpoints).
    pub fn download<T: Float>(&self, be: &CudaBackend<T>) -> Result<Moments> {
        let (m, v) = (be.gpu.download(&self.m)?, be.gpu.download(&self.v)?);
        Ok((be.split_lora(&m), be.split_lora(&v)))
    }

    /// Moments from the host (split like the LoRA buffers).
    pub fn upload<T: Float>(&mut self, be: &CudaBackend<T>, m: &[Vec<f32>], v: &[Vec<f32>]) -> Result<()> {
        let join = |parts: &[Vec<f32>]| -> Result<Vec<f32>> {
            let mut all = vec![0f32; be.lora.len()];
            if parts.len() != be.lora_layout.len() {
                return Err(Error::Invalid("optimizer state has the wrong number of tensors".into()));
            }
            for (&(o, l), p) in be.lora_layout.iter().zip(parts) {
                if p.len() != l {
                    return Err(Error::Invalid("optimizer state has a tensor of the wrong size".into()));
                }
                all[o..o + l].copy_from_slice(p);
            }
            Ok(all)
        };
        be.gpu.upload_into(&join(m)?, &mut self.m)?;
        be.gpu.upload_into(&join(v)?, &mut self.v)?;
        Ok(())
    }

    /// The moments (m, v), flat in the LoRA layout (GRIT projects them at a reprojection).
    pub fn moments_mut(&mut self) -> (&mut CudaSlice<f32>, &mut CudaSlice<f32>) {
        (&mut self.m, &mut self.v)
    }

    /// One AdamW step on gradients multiplied by `grad_mul`, without computing their norm.
    pub fn apply<T: Float>(
        &mut self,
        be: &mut CudaBackend<T>,
        grads: &GpuGrads,
        cfg: &gristmill_core::ops::adamw::AdamWConfig,
        grad_mul: f32,
    ) -> Result<()> {
        self.step += 1;
        optim::adamw_step(&be.gpu, &mut be.lora, &grads.flat, &mut self.m, &mut self.v, self.step, cfg, grad_mul)?;
        be.refresh_lora()
    }

    /// Global gradient norm, clipping (torch's rule) and one AdamW step; returns the norm before
    /// clipping. A non-finite norm updates nothing and is returned for the caller to report.
    pub fn step<T: Float>(
        &mut self,
        be: &mut CudaBackend<T>,
        grads: &GpuGrads,
        cfg: &gristmill_core::ops::adamw::AdamWConfig,
        max_grad_norm: f32,
    ) -> Result<f32> {
        let (norm, mul) = Self::clip_factor(&be.gpu.clone(), grads, max_grad_norm)?;
        if let Some(mul) = mul {
            self.apply(be, grads, cfg, mul)?;
        }
        Ok(norm)
    }

    /// The global gradient norm and the multiplier that clips it to `max_grad_norm` (torch's
    /// rule; 0 turns clipping off); no multiplier when the norm is NaN or infinite.
    pub fn clip_factor(gpu: &Gpu, grads: &GpuGrads, max_grad_norm: f32) -> Result<(f32, Option<f32>)> {
        let norm = optim::l2_norm(gpu, &grads.flat)?;
        let mul = if max_grad_norm > 0.0 { optim::clip_factor(norm, max_grad_norm) } else { Some(1.0) };
        Ok((norm, mul.filter(|_| norm.is_finite())))
    }
}
