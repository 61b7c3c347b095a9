//! The Llama-family forward and backward, written once over a [`Backend`] that supplies the ops:
//! the CPU backend ([`CpuBackend`], the core's references plus the fast CPU GEMMs) and the CUDA
//! backend ([`cuda::CudaBackend`], our kernels). No model code exists per device: the functions of
//! this module are the model.
//!
//! Per layer, forward (M = B·T rows, packed examples separated by `segments`):
//!   a = RMSNorm(x);  q, k, v = LoRA-linear(a);  q, k = RoPE(q, k);  o = attention(q, k, v)
//!   x1 = x + LoRA-linear_o(o);  h = RMSNorm(x1);  g, u = LoRA-linear(h);  x2 = x1 + down(SwiGLU(g, u))
//! then RMSNorm and the LM head fused with cross-entropy in chunks of rows, so the (M, V) logits
//! never exist at once. The backward runs the same path in reverse by hand — no autograd tape —
//! producing the gradients of the LoRA factors only (the base is frozen: its weights get input
//! gradients, dX = dY·W, nothing else).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use cpu::CpuBackend;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use gristmill_core::ops::attention::AttnShape;

/// A linear layer of a decoder layer, in PEFT/HF module order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    Q = 0,
    K = 1,
    V = 2,
    O = 3,
    Gate = 4,
    Up = 5,
    Down = 6,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The PEFT/HF module name.
    pub fn name(self) -> &'static str {
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"][self as usize]
    }
}

/// Which RMSNorm weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// Before attention in layer i.
    Attn(usize),
    /// Before the MLP in layer i.
    Mlp(usize),
    /// After the last layer.
    Final,
}

/// LoRA dropout for one micro-batch: probability and a seed from which every module's mask is
/// derived (so the backward regenerates the forward's masks).
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

/// The loss of one micro-batch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MicroStats {
    /// Σ of per-token cross-entropy over the counted targets.
    pub loss_sum: f64,
    pub n_targets: usize,
}

/// Tag of a (layer, module) pair for deriving its dropout mask.
pub fn dropout_tag(layer: usize, p: Proj) -> u64 {
    ((layer as u64) << 8) | p as u64
}

/// What one batch needs on the device besides the activations.
#[derive(Debug, Clone, Copy)]
pub struct BatchIn<'a> {
    pub b: usize,
    pub t: usize,
    /// tokens, positions: (B, T)
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    /// segments: (B, T), packed examples (training); None for one sequence (generation).
    pub segments: Option<&'a [u32]>,
    /// targets: (B, T), IGNORE_INDEX where no loss is taken (training and evaluation only).
    pub targets: Option<&'a [i64]>,
}

/// The ops the model is made of, on one device. Buffers are row-major; shape comments use
/// M = rows (tokens), C hidden, H/Hkv heads, D head dim, F the MLP width, V the vocabulary.
pub trait Backend {
    /// An activation buffer.
    type Buf;
    /// f32 per-row statistics kept for a backward: RMSNorm's rstd, attention's log-sum-exp.
    type Stat;
    /// What a linear layer keeps for its backward.
    type Saved;
    /// Gradients of every LoRA factor.
    type Grads;
    /// A batch's tokens, targets, rotary tables and segments as the device needs them.
    type Batch;
    /// Keys and values of past positions, per layer.
    type Cache;

    fn cfg(&self) -> &ModelConfig;

    /// Validates a batch (token ids < V, positions < the context, targets) and moves it over.
    fn batch(&self, b: &BatchIn<'_>) -> Result<Self::Batch>;
    /// x: (M, C) the embeddings of the batch's tokens.
    fn embed(&self, b: &Self::Batch) -> Result<Self::Buf>;
    /// (y, rstd) = RMSNorm(x): (M, C), (M).
    fn norm(&self, x: &Self::Buf, n: Norm, m: usize) -> Result<(Self::Buf, Self::Stat)>;
    /// x += delta, then (y, rstd) = RMSNorm(x).
    fn add_norm(&self, x: &mut Self::Buf, delta: &Self::Buf, n: Norm, m: usize) -> Result<(Self::Buf, Self::Stat)>;
    /// dx (+)= the input gradient of RMSNorm given dy.
    #[allow(clippy::too_many_arguments)]
    fn norm_bwd(
        &self,
        x: &Self::Buf,
        n: Norm,
        rstd: &Self::Stat,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        m: usize,
        accumulate: bool,
    ) -> Result<()>;
    /// y = x Wᵀ (+ bias) + s·((x∘mask) Aᵀ) Bᵀ: (M, N), keeping what the backward needs when
    /// `train` (dropout only then).
    fn linear(
        &self,
        layer: usize,
        p: Proj,
        x: &Self::Buf,
        m: usize,
        train: bool,
        drop: Option<Dropout>,
    ) -> Result<(Self::Buf, Self::Saved)>;
    /// dx (+)= dy W + s·((dy B) A)∘mask, and dA, dB added into `grads` when the layer is adapted.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        layer: usize,
        p: Proj,
        x: &Self::Buf,
        saved: &Self::Saved,
        dy: &Self::Buf,
        m: usize,
        grads: &mut Self::Grads,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// x: (M, heads, D) rotated in place (the transposed rotation when `inverse`).
    fn rope(&self, x: &mut Self::Buf, b: &Self::Batch, heads: usize, inverse: bool) -> Result<()>;
    /// (o, lse): (B, T, H, D), (B, H, T), causal within the batch's segments.
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: &AttnShape,
        b: &Self::Batch,
    ) -> Result<(Self::Buf, Self::Stat)>;
    /// (dq, dk, dv).
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        o: &Self::Buf,
        lse: &Self::Stat,
        d_o: &Self::Buf,
        shape: &AttnShape,
        b: &Self::Batch,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// silu(g)·u.
    fn swiglu(&self, g: &Self::Buf, u: &Self::Buf) -> Result<Self::Buf>;
    /// (dg, du).
    fn swiglu_bwd(&self, g: &Self::Buf, u: &Self::Buf, d: &Self::Buf) -> Result<(Self::Buf, Self::Buf)>;
    /// a += b.
    fn add(&self, a: &mut Self::Buf, b: &Self::Buf) -> Result<()>;
    /// A zeroed buffer of n elements.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// A copy of x.
    fn copy(&self, x: &Self::Buf) -> Result<Self::Buf>;
    /// The LM head fused with cross-entropy over the batch's target rows, chunk by chunk. With
    /// `backward = Some((scale, dhn))`, dhn (M, C) receives the gradient of scale·Σloss at the
    /// target rows (other rows are left as they are: zero).
    fn head_loss(&self, hn: &Self::Buf, b: &Self::Batch, backward: Option<(f32, &mut Self::Buf)>)
    -> Result<MicroStats>;
    /// Logits (rows, V) to the host for the last `rows` of hn (M, C).
    fn logits(&self, hn: &Self::Buf, m: usize, rows: usize) -> Result<Vec<f32>>;

    /// An empty cache.
    fn new_cache(&self) -> Result<Self::Cache>;
    /// Positions held by the cache.
    fn cache_len(&self, cache: &Self::Cache) -> usize;
    /// Appends t positions of k, v (t, Hkv, D) to layer `layer` (the length grows once all layers
    /// have appended: [`Backend::cache_advance`]).
    fn cache_append(&self, cache: &mut Self::Cache, layer: usize, k: &Self::Buf, v: &Self::Buf, t: usize)
    -> Result<()>;
    fn cache_advance(&self, cache: &mut Self::Cache, t: usize);
    fn cache_clear(&self, cache: &mut Self::Cache);
    /// Attention of t new queries (t, H, D) against layer `layer`'s cache, which already holds
    /// them: shape.tk = cache length + t.
    fn attention_cached(
        &self,
        q: &Self::Buf,
        cache: &Self::Cache,
        layer: usize,
        shape: &AttnShape,
    ) -> Result<Self::Buf>;
}

/// Everything one layer's backward needs.
struct LayerSaved<B: Backend> {
    /// x: (M, C) the layer input; rstd1: (M)
    x: B::Buf,
    rstd1: B::Stat,
    /// a = RMSNorm(x): (M, C), the input of q, k, v
    a: B::Buf,
    q: B::Saved,
    k: B::Saved,
    v: B::Saved,
    /// after RoPE: (M, H, D), (M, Hkv, D); v: (M, Hkv, D)
    qr: B::Buf,
    kr: B::Buf,
    vv: B::Buf,
    /// attention output (M, H·D) and its log-sum-exp (B, H, T)
    o: B::Buf,
    lse: B::Stat,
    o_lin: B::Saved,
    /// x1 = x + o_proj(o): (M, C); rstd2: (M)
    x1: B::Buf,
    rstd2: B::Stat,
    /// h = RMSNorm(x1): (M, C)
    h: B::Buf,
    gate: B::Saved,
    up: B::Saved,
    /// gate and up outputs: (M, F)
    g: B::Buf,
    u: B::Buf,
    /// SwiGLU(g, u): (M, F), the input of down
    sw: B::Buf,
    down: B::Saved,
}

fn check_rows(b: &BatchIn<'_>) -> Result<usize> {
    let m = b.b * b.t;
    let ok = b.tokens.len() == m
        && b.positions.len() == m
        && b.segments.is_none_or(|s| s.len() == m)
        && b.targets.is_none_or(|s| s.len() == m);
    if !ok || m == 0 {
        return Err(Error::Invalid(format!("batch of {}×{} has buffers of the wrong size", b.b, b.t)));
    }
    Ok(m)
}

/// Checks what every backend checks of a batch against the model: ids < V, positions < the
/// context, targets in [0, V) or IGNORE_INDEX.
pub fn validate_batch(cfg: &ModelConfig, b: &BatchIn<'_>) -> Result<usize> {
    let m = check_rows(b)?;
    if let Some(&id) = b.tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        return Err(Error::Invalid(format!("token id {id} is outside the model's vocabulary of {}", cfg.vocab_size)));
    }
    if let Some(p) = b.positions.iter().max()
        && *p as usize >= cfg.max_position_embeddings
    {
        return Err(Error::Invalid(format!(
            "position {p} is beyond the model's context of {} (lower --max-seq-len)",
            cfg.max_position_embeddings
        )));
    }
    if let Some(t) = b.targets
        && let Some(&bad) = t.iter().find(|&&t| {
            t != gristmill_core::ops::cross_entropy::IGNORE_INDEX && !(0..cfg.vocab_size as i64).contains(&t)
        })
    {
        return Err(Error::Invalid(format!("target {bad} is outside the model's vocabulary of {}", cfg.vocab_size)));
    }
    Ok(m)
}

/// The norm applied to the embeddings: the first layer's, or the final one of a model without
/// layers.
fn first_norm(cfg: &ModelConfig) -> Norm {
    if cfg.num_layers > 0 { Norm::Attn(0) } else { Norm::Final }
}

fn attn_shape(cfg: &ModelConfig, b: usize, t: usize) -> AttnShape {
    AttnShape { b, tq: t, tk: t, h: cfg.num_heads, hkv: cfg.num_kv_heads, d: cfg.head_dim }
}

/// Forward + backward of one micro-batch. Gradients of the LoRA factors, scaled by `grad_scale`
/// (1 / the number of target tokens of the whole accumulated batch, so that every token weighs
/// the same however the batch is split), are ADDED to `grads`.
pub fn train_step<B: Backend>(
    be: &B,
    batch: &BatchIn<'_>,
    grad_scale: f32,
    dropout: Option<Dropout>,
    grads: &mut B::Grads,
) -> Result<MicroStats> {
    let cfg = be.cfg();
    let m = validate_batch(cfg, batch)?;
    if batch.targets.is_none() {
        return Err(Error::Invalid("train_step: the batch has no targets".into()));
    }
    let (c, h, hkv) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads);
    let n_layers = cfg.num_layers;
    let shape = attn_shape(cfg, batch.b, batch.t);
    let bd = be.batch(batch)?;

    // ---- forward ----
    let mut x = be.embed(&bd)?;
    let mut saved: Vec<LayerSaved<B>> = Vec::with_capacity(n_layers);
    for li in 0..n_layers {
        let (a, rstd1) = be.norm(&x, Norm::Attn(li), m)?;
        let (mut qr, q) = be.linear(li, Proj::Q, &a, m, true, dropout)?;
        let (mut kr, k) = be.linear(li, Proj::K, &a, m, true, dropout)?;
        let (vv, v) = be.linear(li, Proj::V, &a, m, true, dropout)?;
        be.rope(&mut qr, &bd, h, false)?;
        be.rope(&mut kr, &bd, hkv, false)?;
        let (o, lse) = be.attention(&qr, &kr, &vv, &shape, &bd)?;
        let (p, o_lin) = be.linear(li, Proj::O, &o, m, true, dropout)?;
        // x1 = x + p, keeping x for the backward.
        let mut x1 = be.copy(&x)?;
        let (hn, rstd2) = be.add_norm(&mut x1, &p, Norm::Mlp(li), m)?;
        let (g, gate) = be.linear(li, Proj::Gate, &hn, m, true, dropout)?;
        let (u, up) = be.linear(li, Proj::Up, &hn, m, true, dropout)?;
        let sw = be.swiglu(&g, &u)?;
        let (dn, down) = be.linear(li, Proj::Down, &sw, m, true, dropout)?;
        let mut x2 = be.copy(&x1)?;
        be.add(&mut x2, &dn)?;
        saved.push(LayerSaved {
            x: std::mem::replace(&mut x, x2),
            rstd1,
            a,
            q,
            k,
            v,
            qr,
            kr,
            vv,
            o,
            lse,
            o_lin,
            x1,
            rstd2,
            h: hn,
            gate,
            up,
            g,
            u,
            sw,
            down,
        });
    }
    let (hn, rstd_f) = be.norm(&x, Norm::Final, m)?;

    // ---- LM head + cross-entropy, with the head's backward on the way ----
    let mut dhn = be.zeros(m * c)?;
    let stats = be.head_loss(&hn, &bd, Some((grad_scale, &mut dhn)))?;
    drop(hn);

    // ---- backward ----
    let mut dx = be.zeros(m * c)?;
    be.norm_bwd(&x, Norm::Final, &rstd_f, &dhn, &mut dx, m, false)?;
    drop(dhn);
    for (li, s) in saved.iter().enumerate().rev() {
        // MLP: x2 = x1 + down(swiglu(gate(h), up(h))); dx holds dL/dx2 and becomes dL/dx1.
        let mut dsw = be.zeros(m * cfg.intermediate_size)?;
        be.linear_bwd(li, Proj::Down, &s.sw, &s.down, &dx, m, grads, &mut dsw, false)?;
        let (dg, du) = be.swiglu_bwd(&s.g, &s.u, &dsw)?;
        drop(dsw);
        let mut dh = be.zeros(m * c)?;
        be.linear_bwd(li, Proj::Gate, &s.h, &s.gate, &dg, m, grads, &mut dh, false)?;
        be.linear_bwd(li, Proj::Up, &s.h, &s.up, &du, m, grads, &mut dh, true)?;
        be.norm_bwd(&s.x1, Norm::Mlp(li), &s.rstd2, &dh, &mut dx, m, true)?;
        // Attention: x1 = x + o_proj(attention(rope(q(a)), rope(k(a)), v(a))); dx becomes dL/dx.
        let mut d_o = be.zeros(m * h * cfg.head_dim)?;
        be.linear_bwd(li, Proj::O, &s.o, &s.o_lin, &dx, m, grads, &mut d_o, false)?;
        let (mut dq, mut dk, dv) = be.attention_bwd(&s.qr, &s.kr, &s.vv, &s.o, &s.lse, &d_o, &shape, &bd)?;
        be.rope(&mut dq, &bd, h, true)?;
        be.rope(&mut dk, &bd, hkv, true)?;
        let mut da = be.zeros(m * c)?;
        be.linear_bwd(li, Proj::Q, &s.a, &s.q, &dq, m, grads, &mut da, false)?;
        be.linear_bwd(li, Proj::K, &s.a, &s.k, &dk, m, grads, &mut da, true)?;
        be.linear_bwd(li, Proj::V, &s.a, &s.v, &dv, m, grads, &mut da, true)?;
        be.norm_bwd(&s.x, Norm::Attn(li), &s.rstd1, &da, &mut dx, m, true)?;
    }
    // The embedding is frozen: dx stops here.
    Ok(stats)
}

/// The summed loss of a batch without gradients (evaluation).
pub fn eval_step<B: Backend>(be: &B, batch: &BatchIn<'_>) -> Result<MicroStats> {
    let cfg = be.cfg();
    let m = validate_batch(cfg, batch)?;
    if batch.targets.is_none() {
        return Err(Error::Invalid("eval_step: the batch has no targets".into()));
    }
    let shape = attn_shape(cfg, batch.b, batch.t);
    let bd = be.batch(batch)?;
    let mut x = be.embed(&bd)?;
    let (mut hn, _) = be.norm(&x, first_norm(cfg), m)?;
    for li in 0..cfg.num_layers {
        let (mut q, _) = be.linear(li, Proj::Q, &hn, m, false, None)?;
        let (mut k, _) = be.linear(li, Proj::K, &hn, m, false, None)?;
        let (v, _) = be.linear(li, Proj::V, &hn, m, false, None)?;
        be.rope(&mut q, &bd, cfg.num_heads, false)?;
        be.rope(&mut k, &bd, cfg.num_kv_heads, false)?;
        let (o, _) = be.attention(&q, &k, &v, &shape, &bd)?;
        let (p, _) = be.linear(li, Proj::O, &o, m, false, None)?;
        let (h2, _) = be.add_norm(&mut x, &p, Norm::Mlp(li), m)?;
        let (g, _) = be.linear(li, Proj::Gate, &h2, m, false, None)?;
        let (u, _) = be.linear(li, Proj::Up, &h2, m, false, None)?;
        let sw = be.swiglu(&g, &u)?;
        let (dn, _) = be.linear(li, Proj::Down, &sw, m, false, None)?;
        let next = if li + 1 < cfg.num_layers { Norm::Attn(li + 1) } else { Norm::Final };
        hn = be.add_norm(&mut x, &dn, next, m)?.0;
    }
    be.head_loss(&hn, &bd, None)
}

/// Runs `tokens` (one sequence) after the positions already in `cache`, appending to it.
/// Returns the logits of every new position (T, V) when `all_logits`, else of the last (1, V).
pub fn decode_step<B: Backend>(be: &B, tokens: &[u32], cache: &mut B::Cache, all_logits: bool) -> Result<Vec<f32>> {
    decode_step_observed(be, tokens, cache, all_logits, &mut |_, _| {})
}

/// [`decode_step`], handing `observe(layer, x)` each layer's output (the residual stream after it,
/// x: (T, C)).
pub fn decode_step_observed<B: Backend>(
    be: &B,
    tokens: &[u32],
    cache: &mut B::Cache,
    all_logits: bool,
    observe: &mut dyn FnMut(usize, &B::Buf),
) -> Result<Vec<f32>> {
    let cfg = be.cfg();
    let t = tokens.len();
    if t == 0 {
        return Err(Error::Invalid("forward: no tokens".into()));
    }
    let start = be.cache_len(cache);
    if start + t > cfg.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "sequence of {} tokens is longer than the model's context of {} (max_position_embeddings)",
            start + t,
            cfg.max_position_embeddings
        )));
    }
    let positions: Vec<u32> = (start..start + t).map(|p| p as u32).collect();
    let bi = BatchIn { b: 1, t, tokens, positions: &positions, segments: None, targets: None };
    validate_batch(cfg, &bi)?;
    let bd = be.batch(&bi)?;
    let shape = AttnShape { b: 1, tq: t, tk: start + t, h: cfg.num_heads, hkv: cfg.num_kv_heads, d: cfg.head_dim };
    let mut x = be.embed(&bd)?;
    let (mut hn, _) = be.norm(&x, first_norm(cfg), t)?;
    for li in 0..cfg.num_layers {
        let (mut q, _) = be.linear(li, Proj::Q, &hn, t, false, None)?;
        let (mut k, _) = be.linear(li, Proj::K, &hn, t, false, None)?;
        let (v, _) = be.linear(li, Proj::V, &hn, t, false, None)?;
        be.rope(&mut q, &bd, cfg.num_heads, false)?;
        be.rope(&mut k, &bd, cfg.num_kv_heads, false)?;
        be.cache_append(cache, li, &k, &v, t)?;
        let o = be.attention_cached(&q, cache, li, &shape)?;
        let (p, _) = be.linear(li, Proj::O, &o, t, false, None)?;
        let (h2, _) = be.add_norm(&mut x, &p, Norm::Mlp(li), t)?;
        let (g, _) = be.linear(li, Proj::Gate, &h2, t, false, None)?;
        let (u, _) = be.linear(li, Proj::Up, &h2, t, false, None)?;
        let sw = be.swiglu(&g, &u)?;
        let (dn, _) = be.linear(li, Proj::Down, &sw, t, false, None)?;
        let next = if li + 1 < cfg.num_layers { Norm::Attn(li + 1) } else { Norm::Final };
        hn = be.add_norm(&mut x, &dn, next, t)?.0;
        observe(li, &x);
    }
    be.cache_advance(cache, t);
    be.logits(&hn, t, if all_logits { t } else { 1 })
}
