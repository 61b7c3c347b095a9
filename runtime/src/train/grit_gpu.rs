//! GRIT on the GPU: the factors, inverses and projectors of every module live on the device next
//! to the flat LoRA buffers, and each part of a step is one batched kernel over all modules
//! (gristmill_kernels::grit). [`GritState`] keeps the schedule, the sample counts and the logs on
//! the host, and receives the device state before a checkpoint ([`GpuGrit::sync_to`]).
//!
//! Host traffic per step: the gradient norm (as for AdamW) and, on the steps where they happen, the
//! λ of an inversion (S floats), the regularizer values (4·S floats) and a reprojection's ranks and
//! spectra (S·(2r + 1) values), all for the logs. Statistics are sampled in the LoRA backward
//! (`linear_bwd` adds the masked Gram matrices) and folded into the factors by three launches.

use super::grit::{GritState, PRECOND_CLAMP, ReprojectionLog};
use crate::backend::cuda::{CudaBackend, GpuAdamW, GpuGrads, GpuKfacCapture};
use crate::error::{Error, Result};
use gristmill_core::linalg::{JACOBI_MAX_SWEEPS, JACOBI_TOL_F32, MIN_DAMPING};
use gristmill_kernels::grit::{
    RankOp, RankRule, SlotTable, eigh_jacobi, kfac_damped_inverse, kfac_gram_scratch_len, rank_apply,
    rank_apply_in_place, rank_projector, rank_quadratic, sanitize,
};
use gristmill_kernels::{CudaSlice, Float, elementwise as ew, optim};

use super::config::GritPairing;

fn identity(s: usize, r: usize) -> Vec<f32> {
    let mut v = vec![0f32; s * r * r];
    for m in 0..s {
        for i in 0..r {
            v[m * r * r + i * r + i] = 1.0;
        }
    }
    v
}

/// Per-module host vectors joined into one (S·len) buffer; `fill` for modules without one.
fn join(parts: &[Vec<f32>], len: usize, fill: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(parts.len() * len);
    for (i, p) in parts.iter().enumerate() {
        if p.len() == len {
            out.extend_from_slice(p);
        } else {
            out.extend_from_slice(&fill[i * len..(i + 1) * len]);
        }
    }
    out
}

/// GRIT's device state for one run.
pub struct GpuGrit {
    table: SlotTable,
    s: usize,
    r: usize,
    /// Σa, Σg, their damped inverses (identity before the first inversion), the projectors:
    /// (S, r, r) each.
    sa: CudaSlice<f32>,
    sg: CudaSlice<f32>,
    inv_a: CudaSlice<f32>,
    inv_g: CudaSlice<f32>,
    pa: CudaSlice<f32>,
    pg: CudaSlice<f32>,
    /// pa/pg hold projectors of the current factors (before the first reprojection the regularizer
    /// needs them from the current spectrum; they go stale when a sample is folded in).
    proj_current: bool,
    lambda_used: CudaSlice<f32>,
    samples: CudaSlice<f32>,
    values: CudaSlice<f32>,
    vectors: CudaSlice<f32>,
    values_g: CudaSlice<f32>,
    vectors_g: CudaSlice<f32>,
    info: CudaSlice<i32>,
    kbuf: CudaSlice<i32>,
    quad: CudaSlice<f32>,
}

impl GpuGrit {
    /// Device state for `be`'s adapters, starting from `state` (fresh or resumed).
    pub fn new<T: Float>(be: &CudaBackend<T>, state: &GritState) -> Result<Self> {
        let gpu = be.gpu();
        let (slots, r) = be.lora_slots();
        let s = slots.len();
        if s != state.modules.len() || (s > 0 && r != state.r) {
            return Err(Error::Invalid(format!(
                "GRIT state of {} modules at rank {}, the GPU model has {s} at rank {r}",
                state.modules.len(),
                state.r
            )));
        }
        let table = SlotTable::new(gpu, r.max(1), &slots)?;
        let rr = r * r;
        let eye = identity(s, r);
        let zero = vec![0f32; s * rr];
        let up = |v: &[f32]| -> Result<CudaSlice<f32>> {
            if v.is_empty() { Ok(gpu.zeros::<f32>(1)?) } else { Ok(gpu.upload(v)?) }
        };
        let proj_current = state.pa.iter().all(|p| p.len() == rr) && s > 0;
        Ok(GpuGrit {
            s,
            r,
            sa: up(&join(&state.sa, rr, &zero))?,
            sg: up(&join(&state.sg, rr, &zero))?,
            inv_a: up(&join(&state.inv_a, rr, &eye))?,
            inv_g: up(&join(&state.inv_g, rr, &eye))?,
            pa: up(&join(&state.pa, rr, &zero))?,
            pg: up(&join(&state.pg, rr, &zero))?,
            proj_current,
            lambda_used: up(&state.lambda_used)?,
            samples: gpu.zeros(s.max(1))?,
            values: gpu.zeros((s * r).max(1))?,
            vectors: gpu.zeros(rr.max(1) * s.max(1))?,
            values_g: gpu.zeros((s * r).max(1))?,
            vectors_g: gpu.zeros(rr.max(1) * s.max(1))?,
            info: gpu.zeros(s.max(1))?,
            kbuf: gpu.zeros(s.max(1))?,
            quad: gpu.zeros((4 * s).max(1))?,
            table,
        })
    }

    /// Buffers for one sampled micro-batch of `weights.len()` rows.
    pub fn capture<T: Float>(&self, be: &CudaBackend<T>, weights: &[f32]) -> Result<GpuKfacCapture> {
        let gpu = be.gpu();
        let rr = self.r * self.r;
        Ok(GpuKfacCapture {
            weights: gpu.upload(weights)?,
            uu: gpu.zeros((self.s * rr).max(1))?,
            vv: gpu.zeros((self.s * rr).max(1))?,
            scratch: gpu.zeros(kfac_gram_scratch_len(weights.len(), self.r.max(1)).max(1))?,
            r: self.r,
        })
    }

    /// Folds a sampled micro-batch of `rows` counted rows into the factors (every module saw the
    /// same rows, so one pair of weights serves all).
    pub fn fold<T: Float>(
        &mut self,
        be: &CudaBackend<T>,
        mut cap: GpuKfacCapture,
        rows: f64,
        state: &mut GritState,
    ) -> Result<()> {
        if rows <= 0.0 || self.s == 0 {
            return Ok(());
        }
        let gpu = be.gpu();
        let (wa, wb) = state.fold_weights(0, rows);
        for (sig, g) in [(&mut self.sa, &mut cap.uu), (&mut self.sg, &mut cap.vv)] {
            optim::scale(gpu, sig, wa as f32)?;
            optim::scale(gpu, g, wb as f32)?;
            ew::add::<f32>(gpu, sig, g)?;
        }
        state.rows.iter_mut().for_each(|n| *n += rows);
        self.proj_current = false;
        Ok(())
    }

    fn ready(&self, state: &GritState) -> bool {
        self.s > 0 && state.ready(0)
    }

    #[allow(clippy::type_complexity)]
    /// Projectors of the current factors into pa/pg (k by the rank rule at `adapt`); returns k,
    /// and the eigenvalues of Σa and Σg, per module.
    fn projectors<T: Float>(
        &mut self,
        be: &CudaBackend<T>,
        state: &GritState,
        adapt: bool,
    ) -> Result<(Vec<usize>, Vec<Vec<f32>>, Vec<Vec<f32>>)> {
        let gpu = be.gpu();
        let (s, r) = (self.s, self.r);
        let cfg = &state.cfg;
        eigh_jacobi(
            gpu,
            &self.sa,
            s,
            r,
            JACOBI_TOL_F32,
            JACOBI_MAX_SWEEPS,
            &mut self.values,
            &mut self.vectors,
            &mut self.info,
        )?;
        let rule = if adapt && cfg.enable_rank_adaptation {
            RankRule::Energy { threshold: cfg.rank_adaptation_threshold as f32, min_rank: cfg.min_lora_rank }
        } else {
            RankRule::Fixed(cfg.reprojection_k.min(r))
        };
        rank_projector(gpu, &self.values, &self.vectors, s, r, &rule, &mut self.pa, &mut self.kbuf)?;
        eigh_jacobi(
            gpu,
            &self.sg,
            s,
            r,
            JACOBI_TOL_F32,
            JACOBI_MAX_SWEEPS,
            &mut self.values_g,
            &mut self.vectors_g,
            &mut self.info,
        )?;
        let given = RankRule::Given(self.kbuf.slice(..s));
        rank_projector(gpu, &self.values_g, &self.vectors_g, s, r, &given, &mut self.pg, &mut self.info)?;
        let k: Vec<usize> = gpu.download(&self.kbuf)?.iter().take(s).map(|&k| k.max(0) as usize).collect();
        let va = gpu.download(&self.values)?;
        let vg = gpu.download(&self.values_g)?;
        let split = |v: &[f32]| -> Vec<Vec<f32>> { v.chunks(r.max(1)).take(s).map(<[f32]>::to_vec).collect() };
        let (ea, eg) = (split(&va), split(&vg));
        // One-sided where Σg carries no signal (or two-sided reprojection is off): Pg = Pa.
        let rr = r * r;
        for (i, e) in eg.iter().enumerate() {
            let trace: f32 = e.iter().map(|v| v.max(0.0)).sum();
            if !(cfg.use_two_sided_reprojection && trace.is_finite() && trace > 0.0) {
                let src = self.pa.slice(i * rr..(i + 1) * rr);
                let mut dst = self.pg.slice_mut(i * rr..(i + 1) * rr);
                gpu.stream()
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(|e| Error::Gpu(gristmill_kernels::KernelError::Driver(e)))?;
            }
        }
        self.proj_current = true;
        Ok((k, ea, eg))
    }

    /// Adds the regularizers' gradients (docs/grit.md §4) and returns their value.
    pub fn add_regularizer_grads<T: Float>(
        &mut self,
        be: &CudaBackend<T>,
        grads: &mut GpuGrads,
        state: &GritState,
        step: usize,
    ) -> Result<f64> {
        let ramp = state.ramp(step);
        let (lk, lr) = (state.cfg.lambda_kfac * ramp, state.cfg.lambda_reproj * ramp);
        if (lk == 0.0 && lr == 0.0) || !self.ready(state) {
            return Ok(0.0);
        }
        if lr > 0.0 && state.last_reproject.is_none() && !self.proj_current {
            let adapt = state.cfg.enable_rank_adaptation && step >= state.cfg.rank_adaptation_start_step;
            self.projectors(be, state, adapt)?;
        }
        let gpu = be.gpu();
        let params = be.lora_params();
        let op = RankOp::regularizer_grad(
            self.sa.slice(..),
            self.pa.slice(..),
            self.sg.slice(..),
            self.pg.slice(..),
            lk as f32,
            lr as f32,
        );
        rank_apply(gpu, &self.table, params, &mut grads.flat, &op)?;
        rank_quadratic(gpu, &self.table, params, &self.sa, &self.pa, &self.sg, &self.pg, &mut self.quad)?;
        let q = gpu.download(&self.quad)?;
        Ok(q.chunks(4).take(self.s).map(|c| lk * f64::from(c[0] + c[1]) + lr * f64::from(c[2] + c[3])).sum())
    }

    /// Refreshes the inverses when due, then preconditions the clipped gradients whose squared
    /// norm is `norm2_before`. Returns the λ per module of an inversion and ‖new‖/‖old‖.
    #[allow(clippy::type_complexity)]
    pub fn precondition<T: Float>(
        &mut self,
        be: &CudaBackend<T>,
        grads: &mut GpuGrads,
        state: &mut GritState,
        step: usize,
        norm_before: f32,
    ) -> Result<(Option<Vec<f32>>, Option<f64>)> {
        let gpu = be.gpu();
        let s = self.s;
        let mut inverted = None;
        if state.invert_due(step) {
            let samples: Vec<f32> = state.rows.iter().map(|&n| n as f32).collect();
            gpu.upload_into(&samples, &mut self.samples)?;
            let lam = state.damping.max(MIN_DAMPING) as f32;
            kfac_damped_inverse(
                gpu,
                &self.sa,
                &self.sg,
                &self.samples,
                state.cfg.kfac_min_samples as f32,
                s,
                self.r,
                lam,
                &mut self.inv_a,
                &mut self.inv_g,
                &mut self.lambda_used,
            )?;
            let used: Vec<f32> = gpu.download(&self.lambda_used)?.into_iter().take(s).collect();
            for (dst, &u) in state.lambda_used.iter_mut().zip(&used) {
                if u != 0.0 {
                    *dst = u;
                }
            }
            state.last_invert = Some(step);
            inverted = Some(used);
        }
        let any = state.lambda_used.iter().any(|&l| l != 0.0);
        if !state.precondition_due(step) || !any {
            return Ok((inverted, None));
        }
        let (l, rgt) = match state.cfg.pairing {
            GritPairing::Grit => (&self.inv_a, &self.inv_g),
            GritPairing::Kfac => (&self.inv_g, &self.inv_a),
        };
        rank_apply_in_place(gpu, &self.table, &mut grads.flat, &RankOp::left_right(l.slice(..), rgt.slice(..)))?;
        sanitize(gpu, &mut grads.flat, PRECOND_CLAMP)?;
        let after = optim::l2_norm(gpu, &grads.flat)?;
        let ratio = (norm_before > 0.0).then(|| f64::from(after) / f64::from(norm_before));
        Ok((inverted, ratio))
    }

    /// Reprojects every module (docs/grit.md §5) and the AdamW moments when asked.
    pub fn reproject<T: Float>(
        &mut self,
        be: &mut CudaBackend<T>,
        opt: &mut GpuAdamW,
        state: &mut GritState,
        step: usize,
    ) -> Result<ReprojectionLog> {
        let mut log = ReprojectionLog::default();
        if !self.ready(state) {
            log.k = state.k.clone();
            log.eigs_a = vec![Vec::new(); self.s];
            log.eigs_g = vec![Vec::new(); self.s];
            log.effective_param_ratio = state.effective_param_ratio();
            state.last_reproject = Some(step);
            return Ok(log);
        }
        let adapt = state.cfg.enable_rank_adaptation && step >= state.cfg.rank_adaptation_start_step;
        let (k, ea, eg) = self.projectors(be, state, adapt)?;
        let gpu = be.gpu().clone();
        let op = RankOp::left_right(self.pa.slice(..), self.pg.slice(..));
        rank_apply_in_place(&gpu, &self.table, be.lora_params_mut(), &op)?;
        be.refresh_lora()?;
        if state.cfg.project_optimizer_state {
            let (m, v) = opt.moments_mut();
            rank_apply_in_place(&gpu, &self.table, m, &op)?;
            // Second moments by P∘P, which keeps them non-negative.
            let sq = |d: &CudaSlice<f32>| -> Result<CudaSlice<f32>> {
                let h: Vec<f32> = gpu.download(d)?.iter().map(|x| x * x).collect();
                Ok(gpu.upload(&h)?)
            };
            let (pa2, pg2) = (sq(&self.pa)?, sq(&self.pg)?);
            rank_apply_in_place(&gpu, &self.table, v, &RankOp::left_right(pa2.slice(..), pg2.slice(..)))?;
        }
        state.k = k.clone();
        state.last_reproject = Some(step);
        log.k = k;
        log.eigs_a = ea;
        log.eigs_g = eg;
        log.effective_param_ratio = state.effective_param_ratio();
        Ok(log)
    }

    /// Copies the factors, inverses and projectors into `state` (before a checkpoint).
    pub fn sync_to<T: Float>(&self, be: &CudaBackend<T>, state: &mut GritState) -> Result<()> {
        let gpu = be.gpu();
        let rr = self.r * self.r;
        let split = |d: &CudaSlice<f32>| -> Result<Vec<Vec<f32>>> {
            Ok(gpu.download(d)?.chunks(rr.max(1)).take(self.s).map(<[f32]>::to_vec).collect())
        };
        state.sa = split(&self.sa)?;
        state.sg = split(&self.sg)?;
        let (ia, ig) = (split(&self.inv_a)?, split(&self.inv_g)?);
        for i in 0..self.s {
            let has = state.lambda_used[i] != 0.0;
            state.inv_a[i] = if has { ia[i].clone() } else { Vec::new() };
            state.inv_g[i] = if has { ig[i].clone() } else { Vec::new() };
        }
        let has_proj = state.last_reproject.is_some();
        let (pa, pg) = (split(&self.pa)?, split(&self.pg)?);
        for i in 0..self.s {
            state.pa[i] = if has_proj { pa[i].clone() } else { Vec::new() };
            state.pg[i] = if has_proj { pg[i].clone() } else { Vec::new() };
        }
        Ok(())
    }
}
