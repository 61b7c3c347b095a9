//! The CPU backend: the core's reference ops, with the products of activations and weights on the
//! fast CPU GEMMs of [`crate::cpu`]. Activations are f32.

use super::{Backend, BatchIn, Dropout, MicroStats, Norm, Proj, dropout_tag};
use crate::config::ModelConfig;
use crate::cpu;
use crate::error::{Error, Result};
use crate::model::{KvCache, Linear, LlamaModel, Weight};
use crate::train::step::LoraGrads;
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

/// The model on the CPU.
#[derive(Debug)]
pub struct CpuBackend<'a> {
    model: &'a LlamaModel,
    /// slot of (layer, module) in [`LoraGrads`] order.
    slots: Vec<[Option<usize>; 7]>,
}

impl<'a> CpuBackend<'a> {
    pub fn new(model: &'a LlamaModel) -> Self {
        Self { model, slots: slot_index(model) }
    }

    fn lin(&self, layer: usize, p: Proj) -> &Linear {
        let l = &self.model.layers[layer];
        match p {
            Proj::Q => &l.q,
            Proj::K => &l.k,
            Proj::V => &l.v,
            Proj::O => &l.o,
            Proj::Gate => &l.gate,
            Proj::Up => &l.up,
            Proj::Down => &l.down,
        }
    }

    fn norm_w(&self, n: Norm) -> &[f32] {
        match n {
            Norm::Attn(i) => &self.model.layers[i].attn_norm,
            Norm::Mlp(i) => &self.model.layers[i].mlp_norm,
            Norm::Final => &self.model.norm,
        }
    }
}

/// slot index of (layer, module 0..7) in [`crate::train::step::lora_slots`] order.
pub(crate) fn slot_index(model: &LlamaModel) -> Vec<[Option<usize>; 7]> {
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

/// What a LoRA linear layer keeps for its backward.
#[derive(Debug, Default)]
pub struct LinSaved {
    /// u = (x∘mask) Aᵀ: (M, r); empty without an adapter or outside training.
    u: Vec<f32>,
    /// mask: (M, K) when dropout is on.
    mask: Option<Vec<f32>>,
}

/// A batch on the CPU.
#[derive(Debug)]
pub struct CpuBatch {
    b: usize,
    t: usize,
    tokens: Vec<u32>,
    tables: RopeTables,
    segments: Option<Vec<u32>>,
    targets: Option<Vec<i64>>,
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
}

fn put(dst: &mut Vec<f32>, src: Vec<f32>, accumulate: bool) {
    if accumulate {
        add_into(dst, &src);
    } else {
        *dst = src;
    }
}

impl Backend for CpuBackend<'_> {
    type Buf = Vec<f32>;
    type Stat = Vec<f32>;
    type Saved = LinSaved;
    type Grads = LoraGrads;
    type Batch = CpuBatch;
    type Cache = KvCache;

    fn cfg(&self) -> &ModelConfig {
        &self.model.cfg
    }

    fn batch(&self, b: &BatchIn<'_>) -> Result<CpuBatch> {
        Ok(CpuBatch {
            b: b.b,
            t: b.t,
            tokens: b.tokens.to_vec(),
            tables: rope_tables(&self.model.cfg.rope, b.positions)?,
            segments: b.segments.map(<[u32]>::to_vec),
            targets: b.targets.map(<[i64]>::to_vec),
        })
    }

    fn embed(&self, b: &CpuBatch) -> Result<Vec<f32>> {
        let cfg = &self.model.cfg;
        Ok(embedding_fwd_ref(&b.tokens, &self.model.embed, cfg.vocab_size, cfg.hidden_size)?)
    }

    fn norm(&self, x: &Vec<f32>, n: Norm, m: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let cfg = &self.model.cfg;
        Ok(rmsnorm_fwd_ref(x, self.norm_w(n), m, cfg.hidden_size, cfg.rms_norm_eps)?)
    }

    fn add_norm(&self, x: &mut Vec<f32>, delta: &Vec<f32>, n: Norm, m: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        add_into(x, delta);
        self.norm(x, n, m)
    }

    fn norm_bwd(
        &self,
        x: &Vec<f32>,
        n: Norm,
        rstd: &Vec<f32>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
        m: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (d, _) = rmsnorm_bwd_ref(x, self.norm_w(n), rstd, dy, m, self.model.cfg.hidden_size)?;
        put(dx, d, accumulate);
        Ok(())
    }

    fn linear(
        &self,
        layer: usize,
        p: Proj,
        x: &Vec<f32>,
        m: usize,
        train: bool,
        drop: Option<Dropout>,
    ) -> Result<(Vec<f32>, LinSaved)> {
        let lin = self.lin(layer, p);
        if !train {
            return Ok((lin.forward(x, m)?, LinSaved::default()));
        }
        let mut y = match &lin.weight {
            Weight::Dense(w) => cpu::matmul_nt(x, w, m, lin.k, lin.n)?,
            Weight::Nf4(w) => cpu::nf4_matmul_nt(x, w, m)?,
        };
        if let Some(b) = &lin.bias {
            for row in y.chunks_exact_mut(lin.n) {
                add_into(row, b);
            }
        }
        let Some(l) = &lin.lora else { return Ok((y, LinSaved::default())) };
        let mask = match drop {
            Some(d) if d.p > 0.0 => Some(dropout_mask_ref(mix64(d.seed ^ dropout_tag(layer, p)), m * lin.k, d.p)?),
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

    fn linear_bwd(
        &self,
        layer: usize,
        p: Proj,
        x: &Vec<f32>,
        saved: &LinSaved,
        dy: &Vec<f32>,
        m: usize,
        grads: &mut LoraGrads,
        dx: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<()> {
        let lin = self.lin(layer, p);
        let mut d = match &lin.weight {
            Weight::Dense(w) => cpu::matmul_nn(dy, w, m, lin.n, lin.k)?,
            Weight::Nf4(w) => cpu::nf4_matmul_nn(dy, w, m)?,
        };
        let slot = self.slots.get(layer).and_then(|r| r[p as usize]);
        if let (Some(l), Some(i)) = (&lin.lora, slot) {
            let (Some(da), Some(db)) = (grads.da.get_mut(i), grads.db.get_mut(i)) else {
                return Err(Error::Invalid(format!("LoRA gradients have no slot {i} (layer {layer} {})", p.name())));
            };
            let s = l.scale;
            // v = dy B: (M, r)
            let v = cpu::matmul_nn(dy, &l.b, m, lin.n, l.r)?;
            if let Some(kc) = &mut grads.kfac
                && let (Some(uu), Some(vv)) = (kc.uu.get_mut(i), kc.vv.get_mut(i))
            {
                crate::train::grit::gram_accumulate(&saved.u, &kc.weights, l.r, uu);
                crate::train::grit::gram_accumulate(&v, &kc.weights, l.r, vv);
            }
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
            d.iter_mut().zip(&dxa).for_each(|(d, e)| *d += s * e);
        }
        put(dx, d, accumulate);
        Ok(())
    }

    fn rope(&self, x: &mut Vec<f32>, b: &CpuBatch, heads: usize, inverse: bool) -> Result<()> {
        let (n, d) = (b.b * b.t, self.model.cfg.head_dim);
        *x = if inverse { rope_bwd_ref(x, &b.tables, n, heads, d)? } else { rope_fwd_ref(x, &b.tables, n, heads, d)? };
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        shape: &AttnShape,
        b: &CpuBatch,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let scale = 1.0 / (shape.d as f32).sqrt();
        Ok(attention_fwd_ref(q, k, v, shape, scale, b.segments.as_deref())?)
    }

    fn attention_bwd(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        o: &Vec<f32>,
        lse: &Vec<f32>,
        d_o: &Vec<f32>,
        shape: &AttnShape,
        b: &CpuBatch,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let scale = 1.0 / (shape.d as f32).sqrt();
        Ok(attention_bwd_ref(q, k, v, o, lse, d_o, shape, scale, b.segments.as_deref())?)
    }

    fn swiglu(&self, g: &Vec<f32>, u: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(swiglu_fwd_ref(g, u)?)
    }

    fn swiglu_bwd(&self, g: &Vec<f32>, u: &Vec<f32>, d: &Vec<f32>) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(swiglu_bwd_ref(g, u, d)?)
    }

    fn add(&self, a: &mut Vec<f32>, b: &Vec<f32>) -> Result<()> {
        if a.len() != b.len() {
            return Err(Error::Invalid(format!("add: {} and {} elements", a.len(), b.len())));
        }
        add_into(a, b);
        Ok(())
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn copy(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn head_loss(&self, hn: &Vec<f32>, b: &CpuBatch, mut backward: Option<(f32, &mut Vec<f32>)>) -> Result<MicroStats> {
        let model = self.model;
        let (c, v) = (model.cfg.hidden_size, model.cfg.vocab_size);
        let Some(targets) = &b.targets else {
            return Err(Error::Invalid("head_loss: the batch has no targets".into()));
        };
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

    fn logits(&self, hn: &Vec<f32>, m: usize, rows: usize) -> Result<Vec<f32>> {
        let model = self.model;
        let (c, v) = (model.cfg.hidden_size, model.cfg.vocab_size);
        let first = m.checked_sub(rows).ok_or_else(|| Error::Invalid(format!("logits of {rows} rows of {m}")))?;
        let h = &hn[first * c..m * c];
        match &model.lm_head {
            Some(head) => head.forward(h, rows),
            None => cpu::matmul_nt(h, &model.embed, rows, c, v),
        }
    }

    fn new_cache(&self) -> Result<KvCache> {
        Ok(KvCache::new(&self.model.cfg))
    }

    fn cache_len(&self, cache: &KvCache) -> usize {
        cache.len()
    }

    fn cache_append(&self, cache: &mut KvCache, layer: usize, k: &Vec<f32>, v: &Vec<f32>, _t: usize) -> Result<()> {
        cache.append(layer, k, v)
    }

    fn cache_advance(&self, cache: &mut KvCache, t: usize) {
        cache.advance(t);
    }

    fn cache_clear(&self, cache: &mut KvCache) {
        cache.clear();
    }

    fn attention_cached(&self, q: &Vec<f32>, cache: &KvCache, layer: usize, shape: &AttnShape) -> Result<Vec<f32>> {
        let (k, v) = cache.layer(layer)?;
        let scale = 1.0 / (shape.d as f32).sqrt();
        Ok(attention_fwd_ref(q, k, v, shape, scale, None)?.0)
    }
}
