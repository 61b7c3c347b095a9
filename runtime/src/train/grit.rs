//! GRIT (docs/grit.md): K-FAC natural gradient in the adapters' rank space, curvature and
//! reprojection regularizers, Fisher-guided reprojection of the LoRA factors and rank adaptation,
//! on top of AdamW.
//!
//! [`GritState`] holds everything GRIT keeps between steps — per adapted module the r × r factors
//! Σa = mean uuᵀ and Σg = mean vvᵀ (u = A x, v = Bᵀ g), their damped inverses, the projectors of
//! the last reprojection and the chosen rank — and the schedule that says when each part acts.
//! Its host-side math runs the CPU engine; the GPU engine runs the same steps with kernels and
//! uses this type for the schedule, the checkpoint and the logs, so both devices follow one
//! definition.
//!
//! One optimizer step, in order (docs/grit.md):
//! 1. each micro-batch's backward adds masked Gram matrices UᵀU, VᵀV when [`GritState::sample_now`]
//!    says so; [`GritState::fold`] merges them into the running factors;
//! 2. [`GritState::add_regularizer_grads`]: the regularizers' closed-form gradients join ∇A, ∇B
//!    (once per optimizer step: the regularizer is part of the step's loss, not of each
//!    micro-batch's — the reference adds it per micro-batch and never divides by the accumulation);
//! 3. clipping by the global norm (the engine, as for AdamW);
//! 4. [`GritState::precondition`]: refresh the damped inverses when due, then ∇A ← (Σa + λI)⁻¹ ∇A,
//!    ∇B ← ∇B (Σg + λI)⁻¹ (or the K-FAC pairing), NaN/inf zeroed, clamped to ±1e6;
//! 5. AdamW;
//! 6. [`GritState::after_step`]: reprojection when due (A ← Pa A, B ← B Pg, rank adaptation), the
//!    adaptive damping and frequency bookkeeping.

use super::config::{GritPairing, GritSection};
use crate::error::{Error, Result};
use crate::safetensors::{Checkpoint, write_safetensors};
use crate::util::write_atomic;
use gristmill_core::DType;
use gristmill_core::bnb::RawTensor;
use gristmill_core::linalg::{
    JACOBI_MAX_SWEEPS, JACOBI_TOL_F32, MIN_DAMPING, eigh_jacobi, kfac_damped_inverses, rank_for_energy, top_k_projector,
};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::path::Path;

/// Gradients larger than this in magnitude are clamped after preconditioning (docs/grit.md §3).
pub const PRECOND_CLAMP: f32 = 1e6;
/// Losses the adaptive damping and frequency look back over.
const LOSS_WINDOW: usize = 20;

/// One adapted module as GRIT sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GritModule {
    /// `layers.3.q_proj`
    pub name: String,
    /// d_in: columns of A.
    pub d_in: usize,
    /// d_out: rows of B.
    pub d_out: usize,
}

/// What one step of GRIT did, for the logs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GritStepLog {
    /// ‖preconditioned gradient‖ / ‖gradient‖ (after clipping); None when nothing was preconditioned.
    pub ng_ratio: Option<f64>,
    /// Value of the regularizers added to the loss (ramp included).
    pub reg_loss: f64,
    /// The damping λ asked for this step.
    pub damping: f64,
    /// Per module, the λ the last inversion used (0 where none happened yet).
    pub inverted: Option<Vec<f32>>,
    /// Set on reprojection steps.
    pub reprojected: Option<ReprojectionLog>,
    /// Modules whose factors have enough samples.
    pub ready_modules: usize,
}

impl GritStepLog {
    /// Ends the step: `grit`'s loss history and adaptive rules, and this log's remaining fields.
    pub fn finish(&mut self, grit: &mut GritState, loss: f64, inverted: Option<Vec<f32>>, ratio: Option<f64>) {
        grit.end_step(loss, inverted.is_some());
        self.ng_ratio = ratio;
        self.inverted = inverted;
        self.ready_modules = grit.ready_count();
    }
}

/// A reprojection's outcome.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReprojectionLog {
    /// k per module (r for modules that were not reprojected).
    pub k: Vec<usize>,
    /// Σk(d_in + d_out) / Σr(d_in + d_out).
    pub effective_param_ratio: f64,
    /// Eigenvalues of Σa per module, descending (empty for modules not reprojected).
    pub eigs_a: Vec<Vec<f32>>,
    /// Eigenvalues of Σg per module, descending.
    pub eigs_g: Vec<Vec<f32>>,
}

/// The scalar part of the state, saved as JSON in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Scalars {
    rows: Vec<f64>,
    lambda_used: Vec<f32>,
    k: Vec<usize>,
    damping: f64,
    kfac_freq: f64,
    reproj_freq: f64,
    losses: Vec<f64>,
    backward_calls: u64,
    last_invert: Option<usize>,
    last_reproject: Option<usize>,
    has_inverse: Vec<bool>,
    has_projector: Vec<bool>,
}

/// GRIT's state over a run.
#[derive(Debug, Clone, PartialEq)]
pub struct GritState {
    pub cfg: GritSection,
    /// LoRA rank r (all modules share it).
    pub r: usize,
    pub modules: Vec<GritModule>,
    /// Σa, Σg: (r, r) per module.
    pub sa: Vec<Vec<f32>>,
    pub sg: Vec<Vec<f32>>,
    /// Token rows sampled into each module's factors.
    pub rows: Vec<f64>,
    /// (Σa + λI)⁻¹, (Σg + λI)⁻¹ from the last inversion; empty before the first.
    pub inv_a: Vec<Vec<f32>>,
    pub inv_g: Vec<Vec<f32>>,
    /// λ of each module's last inversion (0: never inverted).
    pub lambda_used: Vec<f32>,
    /// Pa, Pg from the last reprojection; empty before the first.
    pub pa: Vec<Vec<f32>>,
    pub pg: Vec<Vec<f32>>,
    /// k of each module's last reprojection (r before the first).
    pub k: Vec<usize>,
    /// The damping in use (the configured one, or the adaptive one).
    pub damping: f64,
    /// Current frequencies (adaptive_frequency changes them).
    pub kfac_freq: f64,
    pub reproj_freq: f64,
    /// Recent step losses (for the adaptive damping and frequency).
    pub losses: Vec<f64>,
    /// Micro-batch backward passes so far.
    pub backward_calls: u64,
    pub last_invert: Option<usize>,
    pub last_reproject: Option<usize>,
}

/// (r, r) × (r, c) → (r, c): out = m · x.
fn left_mul(m: &[f32], x: &[f32], r: usize) -> Vec<f32> {
    let c = x.len() / r.max(1);
    let mut out = vec![0f32; x.len()];
    for i in 0..r {
        let row = &mut out[i * c..(i + 1) * c];
        for k in 0..r {
            let w = m[i * r + k];
            if w != 0.0 {
                row.iter_mut().zip(&x[k * c..(k + 1) * c]).for_each(|(o, &v)| *o += w * v);
            }
        }
    }
    out
}

/// (n, r) × (r, r) → (n, r): out = x · m.
fn right_mul(x: &[f32], m: &[f32], r: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (orow, xrow) in out.chunks_exact_mut(r).zip(x.chunks_exact(r)) {
        for (k, &xv) in xrow.iter().enumerate() {
            if xv != 0.0 {
                orow.iter_mut().zip(&m[k * r..(k + 1) * r]).for_each(|(o, &w)| *o += xv * w);
            }
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum()
}

fn sq_norm(a: &[f32]) -> f64 {
    dot(a, a)
}

/// NaN/inf → 0, then clamp to ±[`PRECOND_CLAMP`].
pub fn sanitize(g: &mut [f32]) {
    for v in g {
        *v = if v.is_finite() { v.clamp(-PRECOND_CLAMP, PRECOND_CLAMP) } else { 0.0 };
    }
}

/// Σ_t w_t x_t x_tᵀ added into `out` (r, r); x: (M, r), w: (M). Full symmetric result.
pub fn gram_accumulate(x: &[f32], w: &[f32], r: usize, out: &mut [f32]) {
    for (row, &wt) in x.chunks_exact(r).zip(w) {
        if wt == 0.0 {
            continue;
        }
        for i in 0..r {
            let xi = wt * row[i];
            for j in 0..r {
                out[i * r + j] += xi * row[j];
            }
        }
    }
}

/// The population standard deviation of `v`.
fn std_dev(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt()
}

impl GritState {
    /// A fresh state for `modules`, all of rank `r`.
    pub fn new(cfg: &GritSection, r: usize, modules: Vec<GritModule>) -> Self {
        let s = modules.len();
        GritState {
            cfg: cfg.clone(),
            r,
            sa: vec![vec![0.0; r * r]; s],
            sg: vec![vec![0.0; r * r]; s],
            rows: vec![0.0; s],
            inv_a: vec![Vec::new(); s],
            inv_g: vec![Vec::new(); s],
            lambda_used: vec![0.0; s],
            pa: vec![Vec::new(); s],
            pg: vec![Vec::new(); s],
            k: vec![r; s],
            damping: cfg.kfac_damping,
            kfac_freq: cfg.kfac_update_freq as f64,
            reproj_freq: cfg.reprojection_freq as f64,
            losses: Vec::new(),
            backward_calls: 0,
            last_invert: None,
            last_reproject: None,
            modules,
        }
    }

    /// Whether the next micro-batch's backward should sample the factors; counts the call.
    pub fn sample_now(&mut self) -> bool {
        let f = self.cfg.grit_cov_update_freq.max(1) as u64;
        let yes = self.backward_calls.is_multiple_of(f);
        self.backward_calls += 1;
        yes
    }

    /// Merges one sample of module `i`: Gram sums UᵀU, VᵀV over `rows` counted token rows.
    /// Cumulative mean weighted by rows (factor_decay = 0) or an EMA of the sample means.
    pub fn fold(&mut self, i: usize, uu: &[f32], vv: &[f32], rows: f64) {
        if rows <= 0.0 {
            return;
        }
        let (wa, wb) = self.fold_weights(i, rows);
        for (s, &g) in self.sa[i].iter_mut().zip(uu) {
            *s = (f64::from(*s) * wa + f64::from(g) * wb) as f32;
        }
        for (s, &g) in self.sg[i].iter_mut().zip(vv) {
            *s = (f64::from(*s) * wa + f64::from(g) * wb) as f32;
        }
        self.rows[i] += rows;
    }

    /// (weight of the old factor, weight of the new Gram SUM) of [`GritState::fold`]: the GPU
    /// engine applies the same two numbers with a kernel.
    pub fn fold_weights(&self, i: usize, rows: f64) -> (f64, f64) {
        let n = self.rows[i];
        let d = self.cfg.factor_decay;
        if d > 0.0 && n > 0.0 { (d, (1.0 - d) / rows) } else { (n / (n + rows), 1.0 / (n + rows)) }
    }

    /// Whether module `i` has enough samples to be inverted or projected.
    pub fn ready(&self, i: usize) -> bool {
        self.rows[i] >= self.cfg.kfac_min_samples as f64 && self.rows[i] > 0.0
    }

    /// The regularizers' ramp at optimizer step `step` (1-based).
    pub fn ramp(&self, step: usize) -> f64 {
        let w = self.cfg.regularizer_warmup_steps;
        if w == 0 { 1.0 } else { (step as f64 / w as f64).min(1.0) }
    }

    /// Whether the inverses are refreshed at step `step`: every `kfac_update_freq` steps, and as
    /// soon as some module first has enough samples.
    pub fn invert_due(&self, step: usize) -> bool {
        match self.last_invert {
            None => (0..self.modules.len()).any(|i| self.ready(i)),
            Some(l) => (step - l.min(step)) as f64 >= self.kfac_freq.round().max(1.0),
        }
    }

    /// Whether step `step` reprojects: every `reprojection_freq` steps after the warmup.
    pub fn reproject_due(&self, step: usize) -> bool {
        if step <= self.cfg.reprojection_warmup_steps {
            return false;
        }
        let f = self.reproj_freq.round().max(1.0) as usize;
        match self.last_reproject {
            None => step.is_multiple_of(f),
            Some(l) => step - l.min(step) >= f,
        }
    }

    /// Whether step `step` is preconditioned.
    pub fn precondition_due(&self, step: usize) -> bool {
        step > self.cfg.ng_warmup_steps
    }

    /// The regularizers need projectors from the current spectrum (before the first reprojection).
    fn regularizer_projectors(&self, i: usize, step: usize) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        if !self.pa[i].is_empty() {
            return Ok(Some((self.pa[i].clone(), self.pg[i].clone())));
        }
        if !self.ready(i) {
            return Ok(None);
        }
        let (pa, pg, _, _, _) = self.projectors(i, self.adapt_at(step))?;
        Ok(Some((pa, pg)))
    }

    /// k and the projectors (Pa, Pg) of module `i` from its current factors, with the top
    /// eigenvalues of both.
    #[allow(clippy::type_complexity)]
    fn projectors(&self, i: usize, adapt: bool) -> Result<(Vec<f32>, Vec<f32>, usize, Vec<f32>, Vec<f32>)> {
        let r = self.r;
        let ea = eigh_jacobi(&self.sa[i], r, JACOBI_TOL_F32, JACOBI_MAX_SWEEPS)?;
        let k = if adapt && self.cfg.enable_rank_adaptation {
            rank_for_energy(&ea.values, self.cfg.rank_adaptation_threshold as f32, self.cfg.min_lora_rank, r)
        } else {
            self.cfg.reprojection_k.min(r)
        };
        let pa = top_k_projector(&ea.vectors, r, k)?;
        let eg = eigh_jacobi(&self.sg[i], r, JACOBI_TOL_F32, JACOBI_MAX_SWEEPS)?;
        let trace_g: f32 = eg.values.iter().map(|v| v.max(0.0)).sum();
        let pg = if self.cfg.use_two_sided_reprojection && trace_g.is_finite() && trace_g > 0.0 {
            top_k_projector(&eg.vectors, r, k)?
        } else {
            pa.clone()
        };
        Ok((pa, pg, k, ea.values, eg.values))
    }

    /// Adds the regularizers' gradients to the gradients and returns their value (docs/grit.md §4).
    /// `params[2i]`, `params[2i+1]`: A (r, d_in), B (d_out, r) of module i; `grads` likewise.
    pub fn add_regularizer_grads(&self, step: usize, params: &[&[f32]], grads: &mut [&mut [f32]]) -> Result<f64> {
        self.check_buffers(params.len(), grads.len())?;
        let ramp = self.ramp(step);
        let (lk, lr) = (self.cfg.lambda_kfac * ramp, self.cfg.lambda_reproj * ramp);
        if lk == 0.0 && lr == 0.0 {
            return Ok(0.0);
        }
        let r = self.r;
        let mut value = 0.0;
        for i in 0..self.modules.len() {
            if !self.ready(i) {
                continue;
            }
            let (a, b) = (params[2 * i], params[2 * i + 1]);
            // tr(AᵀΣaA) and tr(BΣgBᵀ); gradients 2ΣaA and 2BΣg.
            let sa_a = left_mul(&self.sa[i], a, r);
            let b_sg = right_mul(b, &self.sg[i], r);
            value += lk * (dot(a, &sa_a) + dot(b, &b_sg));
            let (ga, gb) = {
                let (x, y) = grads.split_at_mut(2 * i + 1);
                (&mut x[2 * i], &mut y[0])
            };
            let ck = (2.0 * lk) as f32;
            ga.iter_mut().zip(&sa_a).for_each(|(g, v)| *g += ck * v);
            gb.iter_mut().zip(&b_sg).for_each(|(g, v)| *g += ck * v);
            if lr > 0.0
                && let Some((pa, pg)) = self.regularizer_projectors(i, step)?
            {
                // ‖(I − Pa)A‖² and ‖B(I − Pg)‖²; gradients 2(I − Pa)A and 2B(I − Pg).
                let ra: Vec<f32> = a.iter().zip(left_mul(&pa, a, r)).map(|(x, p)| x - p).collect();
                let rb: Vec<f32> = b.iter().zip(right_mul(b, &pg, r)).map(|(x, p)| x - p).collect();
                value += lr * (sq_norm(&ra) + sq_norm(&rb));
                let cr = (2.0 * lr) as f32;
                ga.iter_mut().zip(&ra).for_each(|(g, v)| *g += cr * v);
                gb.iter_mut().zip(&rb).for_each(|(g, v)| *g += cr * v);
            }
        }
        Ok(value)
    }

    fn check_buffers(&self, a: usize, b: usize) -> Result<()> {
        let want = 2 * self.modules.len();
        if a != want || b != want {
            return Err(Error::Invalid(format!(
                "GRIT holds {} modules ({want} factors), the call passed {a} and {b} buffers",
                self.modules.len()
            )));
        }
        Ok(())
    }

    /// Refreshes the damped inverses of every module with enough samples (docs/grit.md §2).
    /// Returns the λ each module used (0 for modules skipped).
    pub fn invert(&mut self, step: usize) -> Result<Vec<f32>> {
        let r = self.r;
        let lam = self.damping.max(MIN_DAMPING) as f32;
        let mut used = vec![0f32; self.modules.len()];
        for (i, u) in used.iter_mut().enumerate() {
            if !self.ready(i) {
                continue;
            }
            match kfac_damped_inverses(&self.sa[i], &self.sg[i], r, lam) {
                Ok(d) => {
                    self.inv_a[i] = d.inv_a;
                    self.inv_g[i] = d.inv_g;
                    self.lambda_used[i] = d.lambda;
                    *u = d.lambda;
                }
                // Every rung failed (non-finite statistics): keep the previous inverses, if any.
                Err(gristmill_core::Error::NotPositiveDefinite { .. }) => *u = -1.0,
                Err(e) => return Err(e.into()),
            }
        }
        self.last_invert = Some(step);
        Ok(used)
    }

    /// Preconditions the (clipped) gradients in place, refreshing the inverses first when due.
    /// Returns the λ per module when an inversion happened, and ‖new‖/‖old‖ when any module was
    /// preconditioned.
    #[allow(clippy::type_complexity)]
    pub fn precondition(&mut self, step: usize, grads: &mut [&mut [f32]]) -> Result<(Option<Vec<f32>>, Option<f64>)> {
        self.check_buffers(grads.len(), grads.len())?;
        let inverted = if self.invert_due(step) { Some(self.invert(step)?) } else { None };
        if !self.precondition_due(step) {
            return Ok((inverted, None));
        }
        let r = self.r;
        let (mut before, mut after, mut any) = (0.0, 0.0, false);
        for i in 0..self.modules.len() {
            before += sq_norm(grads[2 * i]) + sq_norm(grads[2 * i + 1]);
            if !self.inv_a[i].is_empty() {
                any = true;
                let (ia, ig) = match self.cfg.pairing {
                    GritPairing::Grit => (&self.inv_a[i], &self.inv_g[i]),
                    GritPairing::Kfac => (&self.inv_g[i], &self.inv_a[i]),
                };
                let na = left_mul(ia, grads[2 * i], r);
                let nb = right_mul(grads[2 * i + 1], ig, r);
                grads[2 * i].copy_from_slice(&na);
                grads[2 * i + 1].copy_from_slice(&nb);
                sanitize(grads[2 * i]);
                sanitize(grads[2 * i + 1]);
            }
            after += sq_norm(grads[2 * i]) + sq_norm(grads[2 * i + 1]);
        }
        let ratio = (any && before > 0.0).then(|| (after / before).sqrt());
        Ok((inverted, ratio))
    }

    /// Whether rank adaptation is on at `step`.
    fn adapt_at(&self, step: usize) -> bool {
        self.cfg.enable_rank_adaptation && step >= self.cfg.rank_adaptation_start_step
    }

    /// Reprojects every module with enough samples (docs/grit.md §5): A ← Pa A, B ← B Pg, and the
    /// AdamW moments too when `project_optimizer_state` (first moments by P, second moments by
    /// P∘P, which keeps them non-negative). `params`/`moments`: A, B per module.
    #[allow(clippy::type_complexity)]
    pub fn reproject(
        &mut self,
        step: usize,
        params: &mut [&mut [f32]],
        moments: Option<(&mut [&mut [f32]], &mut [&mut [f32]])>,
    ) -> Result<ReprojectionLog> {
        self.check_buffers(params.len(), params.len())?;
        let r = self.r;
        let adapt = self.adapt_at(step);
        let mut log = ReprojectionLog::default();
        let mut projs: Vec<Option<(Vec<f32>, Vec<f32>)>> = vec![None; self.modules.len()];
        for (i, slot) in projs.iter_mut().enumerate() {
            if !self.ready(i) {
                log.k.push(self.k[i]);
                log.eigs_a.push(Vec::new());
                log.eigs_g.push(Vec::new());
                continue;
            }
            let (pa, pg, k, va, vg) = self.projectors(i, adapt)?;
            let a = left_mul(&pa, params[2 * i], r);
            params[2 * i].copy_from_slice(&a);
            let b = right_mul(params[2 * i + 1], &pg, r);
            params[2 * i + 1].copy_from_slice(&b);
            self.k[i] = k;
            log.k.push(k);
            log.eigs_a.push(va);
            log.eigs_g.push(vg);
            *slot = Some((pa.clone(), pg.clone()));
            self.pa[i] = pa;
            self.pg[i] = pg;
        }
        if let Some((m, v)) = moments {
            self.check_buffers(m.len(), v.len())?;
            for (i, p) in projs.iter().enumerate() {
                let Some((pa, pg)) = p else { continue };
                let sq = |p: &[f32]| p.iter().map(|x| x * x).collect::<Vec<f32>>();
                let (pa2, pg2) = (sq(pa), sq(pg));
                let x = left_mul(pa, m[2 * i], r);
                m[2 * i].copy_from_slice(&x);
                let x = right_mul(m[2 * i + 1], pg, r);
                m[2 * i + 1].copy_from_slice(&x);
                let x = left_mul(&pa2, v[2 * i], r);
                v[2 * i].copy_from_slice(&x);
                let x = right_mul(v[2 * i + 1], &pg2, r);
                v[2 * i + 1].copy_from_slice(&x);
            }
        }
        log.effective_param_ratio = self.effective_param_ratio();
        self.last_reproject = Some(step);
        Ok(log)
    }

    /// Σk(d_in + d_out) / Σr(d_in + d_out) over all modules.
    pub fn effective_param_ratio(&self) -> f64 {
        let (mut num, mut den) = (0.0, 0.0);
        for (m, &k) in self.modules.iter().zip(&self.k) {
            num += (k * (m.d_in + m.d_out)) as f64;
            den += (self.r * (m.d_in + m.d_out)) as f64;
        }
        if den > 0.0 { num / den } else { 1.0 }
    }

    /// Records the step's loss and applies the adaptive damping and frequency (docs/grit.md §2, §6).
    pub fn observe_loss(&mut self, loss: f64) {
        if !loss.is_finite() {
            return;
        }
        self.losses.push(loss);
        if self.losses.len() > LOSS_WINDOW {
            self.losses.remove(0);
        }
        if self.cfg.adaptive_damping && self.losses.len() >= 10 {
            self.damping = (0.001 + std_dev(&self.losses)).clamp(1e-6, 1e-2);
        }
    }

    /// The adaptive frequency rule, applied at each inversion once 20 losses exist.
    fn adapt_frequencies(&mut self) {
        if !self.cfg.adaptive_frequency || self.losses.len() < LOSS_WINDOW {
            return;
        }
        let first = self.losses[..10].iter().sum::<f64>() / 10.0;
        let last = self.losses[10..].iter().sum::<f64>() / 10.0;
        let m = if last < first * 0.99 { 1.5 } else { 0.75 };
        self.kfac_freq = (self.kfac_freq * m).clamp(1.0, 1000.0);
        self.reproj_freq = (self.reproj_freq * m).clamp(1.0, 2000.0);
    }

    /// Bookkeeping at the end of step `step`: the loss history and the adaptive rules. Reprojection
    /// itself is [`GritState::reproject`], called by the engine when [`GritState::reproject_due`].
    pub fn end_step(&mut self, loss: f64, inverted: bool) {
        self.observe_loss(loss);
        if inverted {
            self.adapt_frequencies();
        }
    }

    /// Modules with enough samples.
    pub fn ready_count(&self) -> usize {
        (0..self.modules.len()).filter(|&i| self.ready(i)).count()
    }

    /// Writes the state into checkpoint directory `dir` (`grit.safetensors` + `grit_state.json`).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut t = Vec::new();
        let tensor = |name: String, data: &[f32]| RawTensor {
            name,
            dtype: DType::F32,
            shape: vec![data.len()],
            data: Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        };
        for i in 0..self.modules.len() {
            t.push(tensor(format!("sa.{i}"), &self.sa[i]));
            t.push(tensor(format!("sg.{i}"), &self.sg[i]));
            for (name, v) in
                [("inv_a", &self.inv_a[i]), ("inv_g", &self.inv_g[i]), ("pa", &self.pa[i]), ("pg", &self.pg[i])]
            {
                if !v.is_empty() {
                    t.push(tensor(format!("{name}.{i}"), v));
                }
            }
        }
        write_safetensors(&dir.join("grit.safetensors"), &t, None)?;
        let s = Scalars {
            rows: self.rows.clone(),
            lambda_used: self.lambda_used.clone(),
            k: self.k.clone(),
            damping: self.damping,
            kfac_freq: self.kfac_freq,
            reproj_freq: self.reproj_freq,
            losses: self.losses.clone(),
            backward_calls: self.backward_calls,
            last_invert: self.last_invert,
            last_reproject: self.last_reproject,
            has_inverse: self.inv_a.iter().map(|v| !v.is_empty()).collect(),
            has_projector: self.pa.iter().map(|v| !v.is_empty()).collect(),
        };
        let text = serde_json::to_string_pretty(&s).map_err(|e| Error::format(dir, e.to_string()))?;
        write_atomic(&dir.join("grit_state.json"), text.as_bytes())
    }

    /// Restores what [`GritState::save`] wrote.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let jpath = dir.join("grit_state.json");
        let text = std::fs::read_to_string(&jpath).map_err(|e| Error::io(&jpath, e))?;
        let s: Scalars = serde_json::from_str(&text).map_err(|e| Error::format(&jpath, e.to_string()))?;
        let n = self.modules.len();
        if s.rows.len() != n || s.k.len() != n || s.has_inverse.len() != n || s.has_projector.len() != n {
            return Err(Error::format(&jpath, format!("state of {} modules, the adapter has {n}", s.rows.len())));
        }
        let path = dir.join("grit.safetensors");
        let ck = Checkpoint::open(&path)?;
        let rr = self.r * self.r;
        let get = |name: String| -> Result<Vec<f32>> {
            let v = ck.to_f32(&name)?;
            if v.len() != rr {
                return Err(Error::format(
                    &path,
                    format!("`{name}` has {} values, rank {} needs {rr}", v.len(), self.r),
                ));
            }
            Ok(v)
        };
        for i in 0..n {
            self.sa[i] = get(format!("sa.{i}"))?;
            self.sg[i] = get(format!("sg.{i}"))?;
            (self.inv_a[i], self.inv_g[i]) = if s.has_inverse[i] {
                (get(format!("inv_a.{i}"))?, get(format!("inv_g.{i}"))?)
            } else {
                (Vec::new(), Vec::new())
            };
            (self.pa[i], self.pg[i]) = if s.has_projector[i] {
                (get(format!("pa.{i}"))?, get(format!("pg.{i}"))?)
            } else {
                (Vec::new(), Vec::new())
            };
        }
        self.rows = s.rows;
        self.lambda_used = s.lambda_used;
        self.k = s.k;
        self.damping = s.damping;
        self.kfac_freq = s.kfac_freq;
        self.reproj_freq = s.reproj_freq;
        self.losses = s.losses;
        self.backward_calls = s.backward_calls;
        self.last_invert = s.last_invert;
        self.last_reproject = s.last_reproject;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Checks against a plain f64 implementation of docs/grit.md on small random problems.
    use super::*;
    use gristmill_core::rng::Rng;

    fn randn(rng: &mut Rng, n: usize, s: f32) -> Vec<f32> {
        (0..n).map(|_| (rng.normal() as f32) * s).collect()
    }

    fn modules(dims: &[(usize, usize)]) -> Vec<GritModule> {
        dims.iter().enumerate().map(|(i, &(d_in, d_out))| GritModule { name: format!("m{i}"), d_in, d_out }).collect()
    }

    /// f64 (n, n) inverse by Gauss-Jordan with partial pivoting.
    fn inv64(a: &[f64], n: usize) -> Vec<f64> {
        let mut m = a.to_vec();
        let mut inv: Vec<f64> = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
        for c in 0..n {
            let p = (c..n).max_by(|&x, &y| m[x * n + c].abs().total_cmp(&m[y * n + c].abs())).unwrap();
            for j in 0..n {
                m.swap(c * n + j, p * n + j);
                inv.swap(c * n + j, p * n + j);
            }
            let d = m[c * n + c];
            for j in 0..n {
                m[c * n + j] /= d;
                inv[c * n + j] /= d;
            }
            for i in 0..n {
                if i != c {
                    let f = m[i * n + c];
                    for j in 0..n {
                        m[i * n + j] -= f * m[c * n + j];
                        inv[i * n + j] -= f * inv[c * n + j];
                    }
                }
            }
        }
        inv
    }

    fn mm64(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
        let mut c = vec![0.0; n * m];
        for i in 0..n {
            for j in 0..m {
                c[i * m + j] = (0..k).map(|t| a[i * k + t] * b[t * m + j]).sum();
            }
        }
        c
    }

    fn f64v(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| f64::from(x)).collect()
    }

    fn max_rel(a: &[f32], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
        a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - y).abs()).fold(0.0, f64::max) / scale
    }

    /// A state of one module of rank r with factors from `rows` random samples folded in `parts`.
    fn state_with_samples(cfg: &GritSection, r: usize, d_in: usize, d_out: usize, seed: u64) -> GritState {
        let mut rng = Rng::new(seed);
        let mut g = GritState::new(cfg, r, modules(&[(d_in, d_out)]));
        for _ in 0..3 {
            let m = 40;
            let u = randn(&mut rng, m * r, 1.0);
            let v = randn(&mut rng, m * r, 0.01);
            let w: Vec<f32> = (0..m).map(|t| if t % 5 == 0 { 0.0 } else { 1.0 }).collect();
            let (mut uu, mut vv) = (vec![0.0; r * r], vec![0.0; r * r]);
            gram_accumulate(&u, &w, r, &mut uu);
            gram_accumulate(&v, &w, r, &mut vv);
            g.fold(0, &uu, &vv, w.iter().map(|&x| f64::from(x)).sum());
        }
        g
    }

    #[test]
    fn statistics_are_the_masked_mean_or_its_ema() {
        let (r, m) = (5, 23);
        let mut rng = Rng::new(1);
        let samples: Vec<(Vec<f32>, Vec<f32>)> = (0..4)
            .map(|s| {
                let u = randn(&mut rng, m * r, 1.0);
                let w: Vec<f32> = (0..m).map(|t| if (t + s) % 3 == 0 { 0.0 } else { 1.0 }).collect();
                (u, w)
            })
            .collect();
        for decay in [0.0, 0.9] {
            let cfg = GritSection { factor_decay: decay, ..Default::default() };
            let mut g = GritState::new(&cfg, r, modules(&[(8, 8)]));
            let mut want = vec![0f64; r * r];
            let mut n = 0f64;
            for (u, w) in &samples {
                let mut uu = vec![0.0; r * r];
                gram_accumulate(u, w, r, &mut uu);
                let rows: f64 = w.iter().map(|&x| f64::from(x)).sum();
                g.fold(0, &uu, &uu, rows);
                // f64: the sample's masked mean, merged by rows (decay 0) or by EMA after the first.
                let mut s = vec![0f64; r * r];
                for t in 0..m {
                    for i in 0..r {
                        for j in 0..r {
                            s[i * r + j] += f64::from(w[t]) * f64::from(u[t * r + i]) * f64::from(u[t * r + j]);
                        }
                    }
                }
                for (x, sv) in want.iter_mut().zip(&s) {
                    *x = if decay > 0.0 && n > 0.0 {
                        decay * *x + (1.0 - decay) * sv / rows
                    } else {
                        (*x * n + sv) / (n + rows)
                    };
                }
                n += rows;
            }
            assert!(max_rel(&g.sa[0], &want) < 1e-6, "decay {decay}");
            assert_eq!(g.rows[0], n);
        }
    }

    #[test]
    fn sampling_and_schedules_follow_the_frequencies() {
        let cfg = GritSection {
            grit_cov_update_freq: 3,
            kfac_update_freq: 4,
            reprojection_freq: 5,
            reprojection_warmup_steps: 5,
            regularizer_warmup_steps: 4,
            ng_warmup_steps: 2,
            kfac_min_samples: 10,
            ..Default::default()
        };
        let mut g = GritState::new(&cfg, 2, modules(&[(4, 4)]));
        let sampled: Vec<bool> = (0..7).map(|_| g.sample_now()).collect();
        assert_eq!(sampled, [true, false, false, true, false, false, true]);
        assert!(!g.invert_due(1), "nothing to invert before the samples");
        g.rows[0] = 10.0;
        assert!(g.invert_due(1), "the first inversion comes as soon as a module is ready");
        g.last_invert = Some(1);
        assert!(!g.invert_due(4) && g.invert_due(5));
        assert!(!g.reproject_due(5), "the warmup holds reprojection back");
        assert!(g.reproject_due(10) && !g.reproject_due(11));
        assert!(!g.precondition_due(2) && g.precondition_due(3));
        assert_eq!((g.ramp(1), g.ramp(2), g.ramp(8)), (0.25, 0.5, 1.0));
    }

    #[test]
    fn preconditioning_applies_the_damped_inverses_in_both_pairings() {
        let (r, d_in, d_out) = (6, 11, 9);
        for pairing in [GritPairing::Grit, GritPairing::Kfac] {
            let cfg = GritSection { pairing, kfac_min_samples: 16, kfac_damping: 1e-3, ..Default::default() };
            let mut g = state_with_samples(&cfg, r, d_in, d_out, 7);
            let mut rng = Rng::new(3);
            let (ga, gb) = (randn(&mut rng, r * d_in, 1.0), randn(&mut rng, d_out * r, 1.0));
            let (mut a, mut b) = (ga.clone(), gb.clone());
            let (inv, ratio) = {
                let mut bufs: Vec<&mut [f32]> = vec![&mut a, &mut b];
                g.precondition(1, &mut bufs).unwrap()
            };
            assert_eq!(inv.unwrap()[0], 1e-3, "a well-conditioned pair inverts at the first rung");
            let damped = |s: &[f32]| -> Vec<f64> {
                let mut m = f64v(s);
                for i in 0..r {
                    for j in 0..i {
                        let avg = (m[i * r + j] + m[j * r + i]) / 2.0;
                        m[i * r + j] = avg;
                        m[j * r + i] = avg;
                    }
                    m[i * r + i] += f64::from(1e-3f32);
                }
                inv64(&m, r)
            };
            let (ia, ig) = (damped(&g.sa[0]), damped(&g.sg[0]));
            let (left, right) = if pairing == GritPairing::Grit { (&ia, &ig) } else { (&ig, &ia) };
            let want_a = mm64(left, &f64v(&ga), r, r, d_in);
            let want_b = mm64(&f64v(&gb), right, d_out, r, r);
            assert!(max_rel(&a, &want_a) < 1e-4, "{pairing:?} A: {}", max_rel(&a, &want_a));
            assert!(max_rel(&b, &want_b) < 1e-4, "{pairing:?} B: {}", max_rel(&b, &want_b));
            let n0: f64 = ga.iter().chain(&gb).map(|&x| f64::from(x).powi(2)).sum::<f64>();
            let n1: f64 = want_a.iter().chain(&want_b).map(|x| x * x).sum::<f64>();
            assert!((ratio.unwrap() - (n1 / n0).sqrt()).abs() < 1e-4 * (n1 / n0).sqrt());
        }
    }

    #[test]
    fn the_ladder_escalates_and_sanitizing_clamps() {
        let r = 3;
        let cfg = GritSection { kfac_min_samples: 1, kfac_damping: 1e-3, ..Default::default() };
        let mut g = GritState::new(&cfg, r, modules(&[(2, 2)]));
        // Σa with an eigenvalue of -0.002: λ = 1e-3 fails, 3e-3 works.
        g.sa[0] = vec![-0.002, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        g.sg[0] = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        g.rows[0] = 5.0;
        let used = g.invert(1).unwrap();
        assert!((used[0] - 3e-3).abs() < 1e-9, "{used:?}");
        let mut v = vec![f32::NAN, f32::INFINITY, 2e6, -3e6, 0.5];
        sanitize(&mut v);
        assert_eq!(v, vec![0.0, 0.0, 1e6, -1e6, 0.5]);
    }

    /// The regularizer in f64, as docs/grit.md §4 writes it.
    #[allow(clippy::too_many_arguments)]
    fn reg64(a: &[f64], b: &[f64], sa: &[f64], sg: &[f64], pa: &[f64], pg: &[f64], r: usize, lk: f64, lr: f64) -> f64 {
        let (d_in, d_out) = (a.len() / r, b.len() / r);
        let sa_a = mm64(sa, a, r, r, d_in);
        let b_sg = mm64(b, sg, d_out, r, r);
        let pa_a = mm64(pa, a, r, r, d_in);
        let b_pg = mm64(b, pg, d_out, r, r);
        let tr_a: f64 = a.iter().zip(&sa_a).map(|(x, y)| x * y).sum();
        let tr_b: f64 = b.iter().zip(&b_sg).map(|(x, y)| x * y).sum();
        let ra: f64 = a.iter().zip(&pa_a).map(|(x, p)| (x - p) * (x - p)).sum();
        let rb: f64 = b.iter().zip(&b_pg).map(|(x, p)| (x - p) * (x - p)).sum();
        lk * (tr_a + tr_b) + lr * (ra + rb)
    }

    #[test]
    fn regularizer_values_and_gradients_match_f64_and_finite_differences() {
        let (r, d_in, d_out) = (4, 7, 5);
        let cfg = GritSection {
            kfac_min_samples: 16,
            lambda_kfac: 0.3,
            lambda_reproj: 0.7,
            regularizer_warmup_steps: 4,
            enable_rank_adaptation: false,
            reprojection_k: 2,
            ..Default::default()
        };
        let g = state_with_samples(&cfg, r, d_in, d_out, 11);
        let mut rng = Rng::new(5);
        let (a, b) = (randn(&mut rng, r * d_in, 1.0), randn(&mut rng, d_out * r, 1.0));
        let (mut ga, mut gb) = (vec![0f32; a.len()], vec![0f32; b.len()]);
        let step = 2; // ramp 0.5
        let value = {
            let mut bufs: Vec<&mut [f32]> = vec![&mut ga, &mut gb];
            g.add_regularizer_grads(step, &[&a, &b], &mut bufs).unwrap()
        };
        // Projectors from the current spectrum with k = reprojection_k, in f64.
        let proj = |s: &[f32]| {
            let e = eigh_jacobi(&f64v(s), r, 1e-14, 50).unwrap();
            top_k_projector(&e.vectors, r, 2).unwrap()
        };
        let (pa, pg) = (proj(&g.sa[0]), proj(&g.sg[0]));
        let (sa, sg) = (f64v(&g.sa[0]), f64v(&g.sg[0]));
        let f = |a: &[f64], b: &[f64]| reg64(a, b, &sa, &sg, &pa, &pg, r, 0.15, 0.35);
        let (a64, b64) = (f64v(&a), f64v(&b));
        let want = f(&a64, &b64);
        assert!((value - want).abs() < 1e-5 * want.abs(), "{value} vs {want}");
        // Central differences of the f64 value give the gradient.
        let h = 1e-6;
        let mut fd_a = vec![0f64; a.len()];
        for i in 0..a.len() {
            let (mut p, mut m) = (a64.clone(), a64.clone());
            p[i] += h;
            m[i] -= h;
            fd_a[i] = (f(&p, &b64) - f(&m, &b64)) / (2.0 * h);
        }
        let mut fd_b = vec![0f64; b.len()];
        for i in 0..b.len() {
            let (mut p, mut m) = (b64.clone(), b64.clone());
            p[i] += h;
            m[i] -= h;
            fd_b[i] = (f(&a64, &p) - f(&a64, &m)) / (2.0 * h);
        }
        assert!(max_rel(&ga, &fd_a) < 1e-4, "dA {}", max_rel(&ga, &fd_a));
        assert!(max_rel(&gb, &fd_b) < 1e-4, "dB {}", max_rel(&gb, &fd_b));
    }

    #[test]
    fn reprojection_projects_both_factors_and_picks_k_by_energy() {
        let (r, d_in, d_out) = (6, 10, 8);
        let cfg = GritSection {
            kfac_min_samples: 16,
            enable_rank_adaptation: true,
            rank_adaptation_threshold: 0.9,
            min_lora_rank: 2,
            project_optimizer_state: true,
            ..Default::default()
        };
        let mut g = state_with_samples(&cfg, r, d_in, d_out, 13);
        // A spectrum with a clear knee: Σa = diag-dominant with 3 large directions.
        let mut rng = Rng::new(17);
        let q = randn(&mut rng, r * r, 1.0);
        let qe = eigh_jacobi(&mm64(&f64v(&q), &transpose(&f64v(&q), r), r, r, r), r, 1e-14, 50).unwrap();
        let lam = [10.0, 8.0, 6.0, 0.1, 0.05, 0.01];
        let mut sa = vec![0f64; r * r];
        for i in 0..r {
            for j in 0..r {
                sa[i * r + j] = (0..r).map(|c| qe.vectors[i * r + c] * lam[c] * qe.vectors[j * r + c]).sum();
            }
        }
        g.sa[0] = sa.iter().map(|&x| x as f32).collect();
        let (a, b) = (randn(&mut rng, r * d_in, 1.0), randn(&mut rng, d_out * r, 1.0));
        let (m_a, m_b) = (randn(&mut rng, r * d_in, 1.0), randn(&mut rng, d_out * r, 1.0));
        let (v_a, v_b): (Vec<f32>, Vec<f32>) =
            (randn(&mut rng, r * d_in, 1.0).iter().map(|x| x * x).collect(), vec![1.0; d_out * r]);
        let (mut pa_, mut pb_) = (a.clone(), b.clone());
        let (mut ma, mut mb, mut va, mut vb) = (m_a.clone(), m_b.clone(), v_a.clone(), v_b.clone());
        let log = {
            let mut p: Vec<&mut [f32]> = vec![&mut pa_, &mut pb_];
            let mut m: Vec<&mut [f32]> = vec![&mut ma, &mut mb];
            let mut v: Vec<&mut [f32]> = vec![&mut va, &mut vb];
            g.reproject(50, &mut p, Some((&mut m, &mut v))).unwrap()
        };
        // 0.9 of the trace (24.16) needs the first three directions: 24/24.16 ≥ 0.9 > 18/24.16.
        assert_eq!(log.k, vec![3]);
        assert_eq!(g.k[0], 3);
        let want_k = rank_for_energy(&lam, 0.9, 2, r);
        assert_eq!(want_k, 3);
        let ratio = 3.0 / 6.0;
        assert!((log.effective_param_ratio - ratio).abs() < 1e-12);
        // f64 projectors.
        let ea = eigh_jacobi(&f64v(&g.sa[0]), r, 1e-14, 50).unwrap();
        let pa = top_k_projector(&ea.vectors, r, 3).unwrap();
        let eg = eigh_jacobi(&f64v(&g.sg[0]), r, 1e-14, 50).unwrap();
        let pg = top_k_projector(&eg.vectors, r, 3).unwrap();
        assert!(max_rel(&pa_, &mm64(&pa, &f64v(&a), r, r, d_in)) < 1e-5);
        assert!(max_rel(&pb_, &mm64(&f64v(&b), &pg, d_out, r, r)) < 1e-5);
        assert!(max_rel(&ma, &mm64(&pa, &f64v(&m_a), r, r, d_in)) < 1e-5);
        let pa2: Vec<f64> = pa.iter().map(|x| x * x).collect();
        assert!(max_rel(&va, &mm64(&pa2, &f64v(&v_a), r, r, d_in)) < 1e-5);
        assert!(va.iter().chain(&vb).all(|&x| x >= 0.0), "second moments stay non-negative");
        // Σg of zeros: the B side falls back to Pa (one-sided).
        g.sg[0] = vec![0.0; r * r];
        let mut p2 = (a.clone(), b.clone());
        {
            let mut p: Vec<&mut [f32]> = vec![&mut p2.0, &mut p2.1];
            g.reproject(100, &mut p, None).unwrap();
        }
        assert!(max_rel(&p2.1, &mm64(&f64v(&b), &pa, d_out, r, r)) < 1e-5);
    }

    fn transpose(a: &[f64], n: usize) -> Vec<f64> {
        (0..n * n).map(|i| a[(i % n) * n + i / n]).collect()
    }

    #[test]
    fn adaptive_damping_and_frequency_follow_the_losses() {
        let cfg = GritSection { adaptive_damping: true, adaptive_frequency: true, ..Default::default() };
        let mut g = GritState::new(&cfg, 2, modules(&[(2, 2)]));
        for i in 0..9 {
            g.end_step(1.0 + 0.001 * i as f64, false);
        }
        assert_eq!(g.damping, cfg.kfac_damping, "fewer than 10 losses keep the configured λ");
        g.end_step(1.009, false);
        let l: Vec<f64> = (0..10).map(|i| 1.0 + 0.001 * i as f64).collect();
        let want = 0.001 + std_dev(&l);
        assert!(want < 1e-2 && (g.damping - want).abs() < 1e-12, "{} vs {want}", g.damping);
        // 20 falling losses: the second half is > 1% lower, so the frequencies stretch by 1.5.
        for i in 0..20 {
            g.end_step(2.0 - 0.05 * i as f64, i == 19);
        }
        assert_eq!((g.kfac_freq, g.reproj_freq), (75.0, 75.0));
        assert!(g.damping <= 1e-2);
    }

    #[test]
    fn save_and_load_round_trip() {
        let cfg = GritSection { kfac_min_samples: 16, ..Default::default() };
        let mut g = state_with_samples(&cfg, 4, 6, 5, 21);
        g.invert(3).unwrap();
        let mut rng = Rng::new(2);
        let (mut a, mut b) = (randn(&mut rng, 24, 1.0), randn(&mut rng, 20, 1.0));
        {
            let mut p: Vec<&mut [f32]> = vec![&mut a, &mut b];
            g.reproject(50, &mut p, None).unwrap();
        }
        g.end_step(1.5, true);
        let dir = std::env::temp_dir().join(format!("gristmill-grit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        g.save(&dir).unwrap();
        let mut h = GritState::new(&cfg, 4, g.modules.clone());
        h.load(&dir).unwrap();
        assert_eq!(g, h);
        // A state of another shape is refused with the reason.
        let mut other = GritState::new(&cfg, 4, modules(&[(6, 5), (6, 5)]));
        assert!(other.load(&dir).unwrap_err().to_string().contains("1 modules"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
