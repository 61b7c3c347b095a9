//! One training micro-batch on the CPU: the Llama forward with every activation the backward needs
//! saved, then the backward written by hand — no autograd tape — producing the gradients of the
//! LoRA factors only (the base is frozen: its weights get input gradients, dX = dY·W, nothing else).
//!
//! Per layer, forward (M = B·T rows, packed examples separated by `segments`):
//!   a = RMSNorm(x);  q, k, v = LoRA-linear(a);  q, k = RoPE(q, k);  o = attention(q, k, v)
//!   x1 = x + LoRA-linear_o(o);  h = RMSNorm(x1);  g, u = LoRA-linear(h);  x2 = x1 + down(SwiGLU(g, u))
//! then RMSNorm and the LM head fused with cross-entropy in chunks of rows, so the (M, V) logits
//! never exist at once. The backward runs the same path in reverse.

use crate::cpu;
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::model::{Linear, LlamaModel, Weight};
use gristmill_core::ops::attention::{AttnShape, attention_bwd_ref, attention_fwd_ref};
use gristmill_core::ops::cross_entropy::{IGNORE_INDEX, cross_entropy_bwd_ref, cross_entropy_fwd_ref};
use gristmill_core::ops::embedding::embedding_fwd_ref;
use gristmill_core::ops::lora::dropout_mask_ref;
use gristmill_core::ops::rmsnorm::{rmsnorm_bwd_ref, rmsnorm_fwd_ref};
use gristmill_core::ops::rope::{RopeTables, rope_bwd_ref, rope_fwd_ref, rope_tables};
use gristmill_core::ops::swiglu::{swiglu_bwd_ref, swiglu_fwd_ref};
use gristmill_core::rng::mix64;

/// Rows of logits computed at once by the fused LM head + cross-entropy.
const CE_CHUNK: usize = 64;

/// Gradients of every LoRA factor, in [`lora_slots`] order.
#[derive(Debug, Clone, Default)]
pub struct LoraGrads {
    /// da[i]: (r, K) of slot i
    pub da: Vec<Vec<f32>>,
    /// db[i]: (N, r) of slot i
    pub db: Vec<Vec<f32>>,
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

/// LoRA dropout for one micro-batch: probability and a seed from which every module's mask is
/// derived (so the backward regenerates the forward's masks).
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

/// What a LoRA linear layer keeps for its backward.
struct LinSaved {
    /// u = (x∘mask) Aᵀ: (M, r); empty without an adapter.
    u: Vec<f32>,
    /// mask: (M, K) when dropout is on.
    mask: Option<Vec<f32>>,
}

/// y = x Wᵀ (+ bias) + s·((x∘mask) Aᵀ) Bᵀ, keeping what the backward needs.
fn lin_fwd(lin: &Linear, x: &[f32], m: usize, drop: Option<Dropout>, tag: u64) -> Result<(Vec<f32>, LinSaved)> {
    let mut y = match &lin.weight {
        Weight::Dense(w) => cpu::matmul_nt(x, w, m, lin.k, lin.n)?,
        Weight::Nf4(w) => cpu::nf4_matmul_nt(x, w, m)?,
    };
    if let Some(b) = &lin.bias {
        for row in y.chunks_exact_mut(lin.n) {
            row.iter_mut().zip(b).for_each(|(v, bv)| *v += bv);
        }
    }
    let Some(l) = &lin.lora else { return Ok((y, LinSaved { u: Vec::new(), mask: None })) };
    let mask = match drop {
        Some(d) if d.p > 0.0 => Some(dropout_mask_ref(mix64(d.seed ^ tag), m * lin.k, d.p)?),
        _ => None,
    };
    let u = match &mask {
        Some(mk) => {
            let xd: Vec<f32> = x.iter().zip(mk).map(|(a, b)| a * b).collect();
            cpu::matmul_nt(&xd, &l.a, m, lin.k, l.r)?
        }
        None => cpu::matmul_nt(x, &l.a, m, lin.k, l.r)?,
    };
    let d = cpu::matmul_nt(&u, &l.b, m, l.r, lin.n)?;
    y.iter_mut().zip(&d).for_each(|(v, dv)| *v += l.scale * dv);
    Ok((y, LinSaved { u, mask }))
}

/// Backward of [`lin_fwd`]: returns dx (M, K) and adds dA, dB into `da`, `db` (when adapted).
fn lin_bwd(
    lin: &Linear,
    x: &[f32],
    saved: &LinSaved,
    dy: &[f32],
    m: usize,
    grads: Option<(&mut [f32], &mut [f32])>,
) -> Result<Vec<f32>> {
    let mut dx = match &lin.weight {
        Weight::Dense(w) => cpu::matmul_nn(dy, w, m, lin.n, lin.k)?,
        Weight::Nf4(w) => cpu::nf4_matmul_nn(dy, w, m)?,
    };
    let (Some(l), Some((da, db))) = (&lin.lora, grads) else { return Ok(dx) };
    let s = l.scale;
    // v = dy B: (M, r)
    let v = cpu::matmul_nn(dy, &l.b, m, lin.n, l.r)?;
    // dB += s · dyᵀ u: (N, r)
    let db_step = cpu::matmul_tn(dy, &saved.u, lin.n, m, l.r)?;
    db.iter_mut().zip(&db_step).for_each(|(g, d)| *g += s * d);
    // dA += s · vᵀ (x∘mask): (r, K)
    let da_step = match &saved.mask {
        Some(mk) => {
            let xd: Vec<f32> = x.iter().zip(mk).map(|(a, b)| a * b).collect();
            cpu::matmul_tn(&v, &xd, l.r, m, lin.k)?
        }
        None => cpu::matmul_tn(&v, x, l.r, m, lin.k)?,
    };
    da.iter_mut().zip(&da_step).for_each(|(g, d)| *g += s * d);
    // dx += s · (v A)∘mask
    let mut dxa = cpu::matmul_nn(&v, &l.a, m, l.r, lin.k)?;
    if let Some(mk) = &saved.mask {
        dxa.iter_mut().zip(mk).for_each(|(d, k)| *d *= k);
    }
    dx.iter_mut().zip(&dxa).for_each(|(d, e)| *d += s * e);
    Ok(dx)
}

/// Everything one layer's backward needs.
struct LayerSaved {
    /// x: (M, C) the layer input; rstd1: (M)
    x: Vec<f32>,
    rstd1: Vec<f32>,
    /// a = RMSNorm(x): (M, C), the input of q, k, v
    a: Vec<f32>,
    q: LinSaved,
    k: LinSaved,
    v: LinSaved,
    /// after RoPE: (M, H, D), (M, Hkv, D); v: (M, Hkv, D)
    qr: Vec<f32>,
    kr: Vec<f32>,
    vv: Vec<f32>,
    /// attention output (M, H·D) and its log-sum-exp (B, H, T)
    o: Vec<f32>,
    lse: Vec<f32>,
    o_lin: LinSaved,
    /// x1 = x + o_proj(o): (M, C); rstd2: (M)
    x1: Vec<f32>,
    rstd2: Vec<f32>,
    /// h = RMSNorm(x1): (M, C)
    h: Vec<f32>,
    gate: LinSaved,
    up: LinSaved,
    /// gate and up outputs: (M, F)
    g: Vec<f32>,
    u: Vec<f32>,
    down: LinSaved,
}

/// The loss of one micro-batch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MicroStats {
    /// Σ of per-token cross-entropy over the counted targets.
    pub loss_sum: f64,
    pub n_targets: usize,
}

fn check_batch(model: &LlamaModel, batch: &Batch) -> Result<()> {
    let m = batch.b * batch.t;
    let ok =
        batch.tokens.len() == m && batch.targets.len() == m && batch.positions.len() == m && batch.segments.len() == m;
    if !ok || m == 0 {
        return Err(Error::Invalid(format!("batch of {}×{} has buffers of the wrong size", batch.b, batch.t)));
    }
    if let Some(p) = batch.positions.iter().max()
        && *p as usize >= model.cfg.max_position_embeddings
    {
        return Err(Error::Invalid(format!(
            "position {p} is beyond the model's context of {} (lower --max-seq-len)",
            model.cfg.max_position_embeddings
        )));
    }
    Ok(())
}

/// Tag of a (layer, module) pair for deriving its dropout mask.
fn tag(layer: usize, module: u64) -> u64 {
    ((layer as u64) << 8) | module
}

/// Forward + backward of one micro-batch. Gradients of the LoRA factors, scaled by `grad_scale`
/// (1 / the number of target tokens of the whole accumulated batch, so that every token weighs
/// the same however the batch is split), are ADDED to `grads`.
pub fn micro_step(
    model: &LlamaModel,
    batch: &Batch,
    grad_scale: f32,
    dropout: Option<Dropout>,
    grads: &mut LoraGrads,
) -> Result<MicroStats> {
    check_batch(model, batch)?;
    let cfg = &model.cfg;
    let (bsz, t) = (batch.b, batch.t);
    let m = bsz * t;
    let (c, h, hkv, d, v) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size);
    let eps = cfg.rms_norm_eps;
    let tables = rope_tables(&cfg.rope, &batch.positions)?;
    let shape = AttnShape { b: bsz, tq: t, tk: t, h, hkv, d };
    let scale = 1.0 / (d as f32).sqrt();
    let segs = Some(batch.segments.as_slice());

    // ---- forward ----
    let mut x = embedding_fwd_ref(&batch.tokens, &model.embed, v, c)?;
    let mut saved = Vec::with_capacity(model.layers.len());
    for (li, layer) in model.layers.iter().enumerate() {
        let (a, rstd1) = rmsnorm_fwd_ref(&x, &layer.attn_norm, m, c, eps)?;
        let (q, qs) = lin_fwd(&layer.q, &a, m, dropout, tag(li, 0))?;
        let (k, ks) = lin_fwd(&layer.k, &a, m, dropout, tag(li, 1))?;
        let (vv, vs) = lin_fwd(&layer.v, &a, m, dropout, tag(li, 2))?;
        let qr = rope_fwd_ref(&q, &tables, m, h, d)?;
        let kr = rope_fwd_ref(&k, &tables, m, hkv, d)?;
        let (o, lse) = attention_fwd_ref(&qr, &kr, &vv, &shape, scale, segs)?;
        let (p, os) = lin_fwd(&layer.o, &o, m, dropout, tag(li, 3))?;
        let x1: Vec<f32> = x.iter().zip(&p).map(|(a, b)| a + b).collect();
        let (hn, rstd2) = rmsnorm_fwd_ref(&x1, &layer.mlp_norm, m, c, eps)?;
        let (g, gs) = lin_fwd(&layer.gate, &hn, m, dropout, tag(li, 4))?;
        let (u, us) = lin_fwd(&layer.up, &hn, m, dropout, tag(li, 5))?;
        let sw = swiglu_fwd_ref(&g, &u)?;
        let (dn, ds) = lin_fwd(&layer.down, &sw, m, dropout, tag(li, 6))?;
        let x2: Vec<f32> = x1.iter().zip(&dn).map(|(a, b)| a + b).collect();
        saved.push(LayerSaved {
            x: std::mem::replace(&mut x, x2),
            rstd1,
            a,
            q: qs,
            k: ks,
            v: vs,
            qr,
            kr,
            vv,
            o,
            lse,
            o_lin: os,
            x1,
            rstd2,
            h: hn,
            gate: gs,
            up: us,
            g,
            u,
            down: ds,
        });
    }
    let (hn, rstd_f) = rmsnorm_fwd_ref(&x, &model.norm, m, c, eps)?;

    // ---- LM head + cross-entropy, with the head's backward on the way ----
    let mut dhn = vec![0f32; m * c];
    let stats = head_loss(model, &hn, &batch.targets, Some((grad_scale, &mut dhn)))?;

    // ---- backward ----
    let (mut dx, _) = rmsnorm_bwd_ref(&x, &model.norm, &rstd_f, &dhn, m, c)?;
    let slot_of = slot_index(model);
    for (li, (layer, s)) in model.layers.iter().zip(saved.iter()).enumerate().rev() {
        let slots = slot_of[li];
        // MLP: x2 = x1 + down(swiglu(gate(h), up(h)))
        let sw = swiglu_fwd_ref(&s.g, &s.u)?;
        let dsw = lin_bwd(&layer.down, &sw, &s.down, &dx, m, slot_mut(grads, slots[6]))?;
        let (dg, du) = swiglu_bwd_ref(&s.g, &s.u, &dsw)?;
        let mut dh = lin_bwd(&layer.gate, &s.h, &s.gate, &dg, m, slot_mut(grads, slots[4]))?;
        let dh_up = lin_bwd(&layer.up, &s.h, &s.up, &du, m, slot_mut(grads, slots[5]))?;
        dh.iter_mut().zip(&dh_up).for_each(|(a, b)| *a += b);
        let (dx1_norm, _) = rmsnorm_bwd_ref(&s.x1, &layer.mlp_norm, &s.rstd2, &dh, m, c)?;
        let dx1: Vec<f32> = dx.iter().zip(&dx1_norm).map(|(a, b)| a + b).collect();
        // Attention: x1 = x + o_proj(attention(rope(q(a)), rope(k(a)), v(a)))
        let d_o = lin_bwd(&layer.o, &s.o, &s.o_lin, &dx1, m, slot_mut(grads, slots[3]))?;
        let (dqr, dkr, dv) = attention_bwd_ref(&s.qr, &s.kr, &s.vv, &s.o, &s.lse, &d_o, &shape, scale, segs)?;
        let dq = rope_bwd_ref(&dqr, &tables, m, h, d)?;
        let dk = rope_bwd_ref(&dkr, &tables, m, hkv, d)?;
        let mut da = lin_bwd(&layer.q, &s.a, &s.q, &dq, m, slot_mut(grads, slots[0]))?;
        let da_k = lin_bwd(&layer.k, &s.a, &s.k, &dk, m, slot_mut(grads, slots[1]))?;
        let da_v = lin_bwd(&layer.v, &s.a, &s.v, &dv, m, slot_mut(grads, slots[2]))?;
        da.iter_mut().zip(da_k.iter().zip(&da_v)).for_each(|(a, (b, c))| *a += b + c);
        let (dx_norm, _) = rmsnorm_bwd_ref(&s.x, &layer.attn_norm, &s.rstd1, &da, m, c)?;
        dx = dx1.iter().zip(&dx_norm).map(|(a, b)| a + b).collect();
    }
    // The embedding is frozen: dx stops here.
    Ok(stats)
}

/// The gradient buffers of slot `i`, if the module has an adapter.
fn slot_mut(grads: &mut LoraGrads, i: Option<usize>) -> Option<(&mut [f32], &mut [f32])> {
    let i = i?;
    match (grads.da.get_mut(i), grads.db.get_mut(i)) {
        (Some(a), Some(b)) => Some((a.as_mut_slice(), b.as_mut_slice())),
        _ => None,
    }
}

/// slot index of (layer, module 0..7) in [`lora_slots`] order.
fn slot_index(model: &LlamaModel) -> Vec<[Option<usize>; 7]> {
    let mut next = 0;
    model
        .layers
        .iter()
        .map(|l| {
            let mut row = [None; 7];
            for (j, lin) in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down].into_iter().enumerate() {
                if lin.lora.is_some() {
                    row[j] = Some(next);
                    next += 1;
                }
            }
            row
        })
        .collect()
}

/// The summed loss of a batch without gradients (evaluation).
pub fn eval_loss(model: &LlamaModel, batch: &Batch) -> Result<MicroStats> {
    check_batch(model, batch)?;
    let cfg = &model.cfg;
    let (bsz, t) = (batch.b, batch.t);
    let m = bsz * t;
    let (c, h, hkv, d, v) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size);
    let tables: RopeTables = rope_tables(&cfg.rope, &batch.positions)?;
    let shape = AttnShape { b: bsz, tq: t, tk: t, h, hkv, d };
    let scale = 1.0 / (d as f32).sqrt();
    let segs = Some(batch.segments.as_slice());
    let mut x = embedding_fwd_ref(&batch.tokens, &model.embed, v, c)?;
    for layer in &model.layers {
        let (a, _) = rmsnorm_fwd_ref(&x, &layer.attn_norm, m, c, cfg.rms_norm_eps)?;
        let q = rope_fwd_ref(&layer.q.forward(&a, m)?, &tables, m, h, d)?;
        let k = rope_fwd_ref(&layer.k.forward(&a, m)?, &tables, m, hkv, d)?;
        let vv = layer.v.forward(&a, m)?;
        let (o, _) = attention_fwd_ref(&q, &k, &vv, &shape, scale, segs)?;
        let p = layer.o.forward(&o, m)?;
        x.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
        let (hn, _) = rmsnorm_fwd_ref(&x, &layer.mlp_norm, m, c, cfg.rms_norm_eps)?;
        let sw = swiglu_fwd_ref(&layer.gate.forward(&hn, m)?, &layer.up.forward(&hn, m)?)?;
        let dn = layer.down.forward(&sw, m)?;
        x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
    }
    let (hn, _) = rmsnorm_fwd_ref(&x, &model.norm, m, c, cfg.rms_norm_eps)?;
    head_loss(model, &hn, &batch.targets, None)
}

/// The LM head fused with cross-entropy over the rows that have a target, `CE_CHUNK` rows at a
/// time, so that the (M, V) logits never exist at once and rows without a target (prompts,
/// padding: often most of a batch) cost nothing. With `backward = Some((scale, dhn))` the
/// gradient of `scale · Σ loss` with respect to the final hidden states is written into `dhn`
/// (M, C) at those rows.
///
/// hn: (M, C) final hidden states; targets: (M).
fn head_loss(
    model: &LlamaModel,
    hn: &[f32],
    targets: &[i64],
    mut backward: Option<(f32, &mut [f32])>,
) -> Result<MicroStats> {
    let (c, v) = (model.cfg.hidden_size, model.cfg.vocab_size);
    let rows: Vec<usize> = (0..targets.len()).filter(|&r| targets[r] != IGNORE_INDEX).collect();
    let mut stats = MicroStats::default();
    for chunk in rows.chunks(CE_CHUNK) {
        let n = chunk.len();
        let hc: Vec<f32> = chunk.iter().flat_map(|&r| hn[r * c..(r + 1) * c].iter().copied()).collect();
        let tg: Vec<i64> = chunk.iter().map(|&r| targets[r]).collect();
        let logits = match &model.lm_head {
            Some(head) => head.forward(&hc, n)?,
            None => cpu::matmul_nt(&hc, &model.embed, n, c, v)?,
        };
        let ce = cross_entropy_fwd_ref(&logits, &tg, n, v, IGNORE_INDEX)?;
        stats.loss_sum += f64::from(ce.loss_sum);
        stats.n_targets += ce.n_counted;
        if let Some((scale, dhn)) = backward.as_mut() {
            let dlogits = cross_entropy_bwd_ref(&logits, &tg, &ce.lse, n, v, IGNORE_INDEX, *scale)?;
            let dh = match &model.lm_head {
                Some(head) => match &head.weight {
                    Weight::Dense(w) => cpu::matmul_nn(&dlogits, w, n, v, c)?,
                    Weight::Nf4(w) => cpu::nf4_matmul_nn(&dlogits, w, n)?,
                },
                None => cpu::matmul_nn(&dlogits, &model.embed, n, v, c)?,
            };
            for (k, &r) in chunk.iter().enumerate() {
                dhn[r * c..(r + 1) * c].copy_from_slice(&dh[k * c..(k + 1) * c]);
            }
        }
    }
    Ok(stats)
}
