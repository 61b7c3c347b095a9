//! `gristmill selfcheck`: the reference path end to end on an embedded default, with numbers.
//!
//! It needs no files and no GPU. Each check computes something real and compares it with a bound
//! the math gives, so a broken build fails here rather than inside a long training run:
//! 1. NF4: quantize a SmolLM2-135M MLP projection (1536 × 576, N(0, 0.02²)) with double
//!    quantization; every element within half a code spacing (plus the scale's own 8-bit error)
//!    of the original, about 4.13 bits per weight.
//! 2. The bitsandbytes safetensors layout round-trips that tensor exactly.
//! 3. QLoRA in miniature: a frozen NF4 base plus a rank-8 LoRA adapter trained with AdamW to fit
//!    a layer that differs from the base by a rank-4 update; the loss must fall 1000-fold.
//! 4. K-FAC algebra on the adapter's own statistics Σa = uᵀu/M and Σg = vᵀv/M: damped inverses
//!    and a Jacobi eigendecomposition that reconstruct their inputs.

use gristmill_core::bnb::{from_bnb_tensors, to_bnb_tensors};
use gristmill_core::linalg::{eigh_jacobi, kfac_damped_inverses, rank_for_energy};
use gristmill_core::nf4::{NF4_BLOCKSIZE, NF4_CODE, Nf4Tensor, block_absmax, nf4_code_of};
use gristmill_core::ops::adamw::{AdamWConfig, adamw_step_ref};
use gristmill_core::ops::lora::{LoraDims, lora_bwd_ref, lora_fwd_ref, lora_init_a, lora_init_b, lora_scale};
use gristmill_core::ops::matmul::{Trans, matmul_fwd_ref};
use gristmill_core::rng::Rng;
use gristmill_core::{DType, Shape};
use std::time::Instant;

/// One line of the self-check report.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    /// What was measured, readable.
    pub measured: String,
    /// The bound it was held to.
    pub bound: String,
    pub ok: bool,
    pub seconds: f64,
}

/// Runs every check; a failing check is reported, never a panic.
pub fn run(seed: u64) -> Vec<Check> {
    let mut out = Vec::new();
    let mut rng = Rng::new(seed);
    let (w_nf4, c) = timed(|| nf4_round_trip(&mut rng));
    out.push(c);
    if let Some(w) = w_nf4 {
        out.push(timed(|| ((), bnb_layout(&w))).1);
    }
    let (stats, c) = timed(|| qlora_fit(&mut rng));
    out.push(c);
    if let Some((sa, sg, r)) = stats {
        out.push(timed(|| ((), kfac(&sa, &sg, r))).1);
    }
    out
}

fn timed<R>(f: impl FnOnce() -> (R, Check)) -> (R, Check) {
    let t = Instant::now();
    let (r, mut c) = f();
    c.seconds = t.elapsed().as_secs_f64();
    (r, c)
}

fn check(name: &'static str, ok: bool, measured: String, bound: impl Into<String>) -> Check {
    Check { name, measured, bound: bound.into(), ok, seconds: 0.0 }
}

fn failed(name: &'static str, e: impl std::fmt::Display) -> Check {
    check(name, false, format!("error: {e}"), "no error")
}

fn nf4_round_trip(rng: &mut Rng) -> (Option<Nf4Tensor>, Check) {
    const NAME: &str = "NF4 quantize → dequantize (1536×576, double quant)";
    let (n, k) = (1536usize, 576usize);
    let w: Vec<f32> = (0..n * k).map(|_| (rng.normal() * 0.02) as f32).collect();
    let res = Shape::new([n, k])
        .and_then(|s| Nf4Tensor::quantize(&w, s, DType::BF16, true))
        .and_then(|t| Ok((t.dequantize()?, t.absmax_f32()?, t)));
    let (back, absmax, t) = match res {
        Ok(v) => v,
        Err(e) => return (None, failed(NAME, e)),
    };
    let true_absmax = block_absmax(&w, NF4_BLOCKSIZE);
    let (mut worst, mut se, mut s2) = (0f64, 0f64, 0f64);
    for (i, (&x, &y)) in w.iter().zip(&back).enumerate() {
        let b = i / NF4_BLOCKSIZE;
        let q = nf4_code_of(x / true_absmax[b]) as usize;
        let gap = |j: usize| (NF4_CODE[j + 1] - NF4_CODE[j]) as f64;
        let spacing = if q == 0 {
            gap(0)
        } else if q == 15 {
            gap(14)
        } else {
            gap(q - 1).max(gap(q))
        };
        let bound = 0.5 * spacing * true_absmax[b] as f64 + (absmax[b] - true_absmax[b]).abs() as f64 + 1e-7;
        worst = worst.max((x - y).abs() as f64 / bound);
        se += ((x - y) as f64).powi(2);
        s2 += (x as f64).powi(2);
    }
    let bits = t.storage_bytes() as f64 * 8.0 / (n * k) as f64;
    let rel_rms = (se / s2).sqrt();
    let ok = worst <= 1.0 && bits < 4.2;
    let c = check(
        NAME,
        ok,
        format!("{bits:.3} bits/weight, rel. RMS error {rel_rms:.4}, worst error {worst:.3} of its bound"),
        "error ≤ half code spacing + scale error; < 4.2 bits",
    );
    (Some(t), c)
}

fn bnb_layout(w: &Nf4Tensor) -> Check {
    const NAME: &str = "bitsandbytes safetensors layout round trip";
    let name = "model.layers.0.mlp.up_proj.weight";
    match to_bnb_tensors(name, w).and_then(|raw| Ok((raw.len(), from_bnb_tensors(name, raw.as_slice())?))) {
        Ok((n, back)) => {
            check(NAME, back == *w, format!("{n} tensors written, read back identical: {}", back == *w), "identical")
        }
        Err(e) => failed(NAME, e),
    }
}

/// (Σa, Σg, r) of the trained adapter.
type Stats = (Vec<f32>, Vec<f32>, usize);

fn qlora_fit(rng: &mut Rng) -> (Option<Stats>, Check) {
    const NAME: &str = "QLoRA fit: NF4 base + LoRA r=8, AdamW, 300 steps";
    match qlora_fit_inner(rng) {
        Ok((first, last, stats)) => {
            let ratio = first / last.max(f32::MIN_POSITIVE);
            let c = check(
                NAME,
                ratio >= 1000.0,
                format!("MSE {first:.3e} → {last:.3e} ({ratio:.0}× lower)"),
                "≥ 1000× lower",
            );
            (Some(stats), c)
        }
        Err(e) => (None, failed(NAME, e)),
    }
}

fn qlora_fit_inner(rng: &mut Rng) -> gristmill_core::Result<(f32, f32, Stats)> {
    let (m, k, n, r, true_rank) = (256usize, 96usize, 64usize, 8usize, 4usize);
    // Frozen base: an NF4 weight, used as the dense bf16 values the reference stack multiplies by.
    let w0: Vec<f32> = (0..n * k).map(|_| (rng.normal() * 0.05) as f32).collect();
    let base = Nf4Tensor::quantize(&w0, Shape::new([n, k])?, DType::BF16, true)?.dequantize_rounded()?;
    // Target layer: the base plus a rank-4 update the adapter can represent exactly.
    let p: Vec<f32> = (0..n * true_rank).map(|_| (rng.normal() * 0.1) as f32).collect();
    let q: Vec<f32> = (0..true_rank * k).map(|_| (rng.normal() * 0.1) as f32).collect();
    let delta = matmul_fwd_ref(&p, &q, n, true_rank, k, Trans::N, Trans::N)?;
    let target_w: Vec<f32> = base.iter().zip(&delta).map(|(a, b)| a + b).collect();
    let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
    let target = matmul_fwd_ref(&x, &target_w, m, k, n, Trans::N, Trans::T)?;

    let dims = LoraDims { m, k, n, r };
    let scale = lora_scale(16.0, r, false)?;
    let mut a = lora_init_a(rng, r, k);
    let mut b = lora_init_b(n, r);
    let cfg = AdamWConfig { lr: 1e-2, weight_decay: 0.0, ..AdamWConfig::default() };
    let (mut ma, mut va) = (vec![0f32; a.len()], vec![0f32; a.len()]);
    let (mut mb, mut vb) = (vec![0f32; b.len()], vec![0f32; b.len()]);
    let (mut first, mut last) = (f32::NAN, f32::NAN);
    let mut stats = (Vec::new(), Vec::new(), r);
    for step in 1..=300u64 {
        let fwd = lora_fwd_ref(&x, &base, &a, &b, scale, &dims, None)?;
        let numel = (m * n) as f32;
        let loss = fwd.y.iter().zip(&target).map(|(y, t)| (y - t) * (y - t)).sum::<f32>() / numel;
        let dy: Vec<f32> = fwd.y.iter().zip(&target).map(|(y, t)| 2.0 * (y - t) / numel).collect();
        let g = lora_bwd_ref(&x, &base, &a, &b, scale, &dims, None, &fwd.u, &dy)?;
        if step == 1 {
            first = loss;
        }
        last = loss;
        if step == 300 {
            // K-FAC factors of this module, as GRIT accumulates them: Σa = uᵀu/M, Σg = vᵀv/M.
            let gram = |z: &[f32]| -> gristmill_core::Result<Vec<f32>> {
                let s = matmul_fwd_ref(z, z, r, m, r, Trans::T, Trans::N)?;
                Ok(s.into_iter().map(|v| v / m as f32).collect())
            };
            stats = (gram(&fwd.u)?, gram(&g.v)?, r);
        }
        adamw_step_ref(&mut a, &g.da, &mut ma, &mut va, step, &cfg)?;
        adamw_step_ref(&mut b, &g.db, &mut mb, &mut vb, step, &cfg)?;
    }
    Ok((first, last, stats))
}

fn kfac(sa: &[f32], sg: &[f32], r: usize) -> Check {
    const NAME: &str = "K-FAC: damped inverses and Jacobi eigh of Σa, Σg";
    let run = || -> gristmill_core::Result<(f32, f32, f32, usize)> {
        let inv = kfac_damped_inverses(sa, sg, r, 1e-3f32)?;
        let residual = |s: &[f32], inv: &[f32], lambda: f32| -> gristmill_core::Result<f32> {
            let mut damped = s.to_vec();
            for i in 0..r {
                damped[i * r + i] += lambda;
            }
            let prod = matmul_fwd_ref(&damped, inv, r, r, r, Trans::N, Trans::N)?;
            Ok((0..r * r).map(|i| (prod[i] - if i % (r + 1) == 0 { 1.0 } else { 0.0 }).abs()).fold(0.0, f32::max))
        };
        let res = residual(sa, &inv.inv_a, inv.lambda)?.max(residual(sg, &inv.inv_g, inv.lambda)?);
        let e = eigh_jacobi(sa, r, 1e-6f32, 30)?;
        let mut recon_err = 0f32;
        let norm = sa.iter().map(|v| v * v).sum::<f32>().sqrt();
        for i in 0..r {
            for j in 0..r {
                let v: f32 = (0..r).map(|l| e.vectors[i * r + l] * e.values[l] * e.vectors[j * r + l]).sum();
                recon_err = recon_err.max((v - sa[i * r + j]).abs() / norm);
            }
        }
        let k = rank_for_energy(&e.values, 0.99, 1, r);
        Ok((res, recon_err, inv.lambda, k))
    };
    match run() {
        Ok((res, recon, lambda, k)) => check(
            NAME,
            res < 1e-3 && recon < 1e-5,
            format!(
                "‖(Σ+λI)(Σ+λI)⁻¹ − I‖max {res:.1e} at λ {lambda:.0e}; eigh rel. error {recon:.1e}; 99% energy in rank {k}"
            ),
            "< 1e-3; < 1e-5",
        ),
        Err(e) => failed(NAME, e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_check_passes() {
        let checks = super::run(7);
        assert_eq!(checks.len(), 4);
        for c in &checks {
            assert!(c.ok, "{}: {} (bound {})", c.name, c.measured, c.bound);
        }
    }
}
