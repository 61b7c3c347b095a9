//! Launchers of kernels/cuda/loss.cu: the LM head's softmax cross-entropy, loss and gradient in
//! one kernel.

use crate::Gpu;
use crate::check::{self, BenchRow, Check, Work};
use crate::error::{KernelError, Result, check_len, to_i32};
use crate::launch::{Float, grid_rows, ptr, ptr_mut};
use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};
use gristmill_core::ops::cross_entropy::{IGNORE_INDEX, cross_entropy_bwd_ref, cross_entropy_fwd_ref};
use half::bf16;

/// Tolerances of the parity checks (`check::rel_err`: max abs error over max |reference|),
/// against an f64 reference computed from the same (bf16-rounded for bf16) logits.
pub mod tol {
    /// f32: loss, lse and dlogits; exp is ex2.approx (≈2⁻²² relative) of an f32 difference.
    pub const CROSS_ENTROPY_F32: f64 = 2e-5;
    /// bf16 loss and lse: f32 outputs computed in f32 from exact inputs, as for f32.
    pub const CROSS_ENTROPY_BF16: f64 = 2e-5;
    /// bf16 dlogits: loosened for the output's own rounding to bf16 (2⁻⁹ relative).
    pub const CROSS_ENTROPY_BF16_GRAD: f64 = 4e-3;
}

const MAX_THREADS: usize = 1024;

/// Threads a block for rows of `v` elements of `elem_bytes` each: one 16-byte vector a thread,
/// rounded up to whole warps, from 32 to 1024.
pub fn cross_entropy_threads(v: usize, elem_bytes: usize) -> u32 {
    let vectors = v.div_ceil(16 / elem_bytes.clamp(1, 16));
    vectors.div_ceil(32).clamp(1, MAX_THREADS / 32) as u32 * 32
}

/// The LM head's loss on one chunk of rows, forward and gradient in one pass over the logits.
///
/// logits: (N, V) T row-major — when `grad_scale` is Some(s), overwritten in place by
///   dlogits = s·(softmax − onehot(target)) (rows with target IGNORE_INDEX become exactly 0);
///   when None, left unchanged.
/// targets: (N) i32, each in [0, V) or -100 (the caller validates on the host; an out-of-range
///   target is treated as ignored, never read or written through).
/// loss: (N) f32 per-row loss lse − logit[target], 0 on ignored rows.
/// lse: (N) f32, log Σ exp(logits) of every row, ignored rows included.
///
/// One block per row: a single read with an online max-rescaled sum, then (with a gradient) a
/// second read writing dlogits.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_fwd_bwd<T: Float>(
    gpu: &Gpu,
    logits: &mut impl DevicePtrMut<T>,
    targets: &impl DevicePtr<i32>,
    loss: &mut impl DevicePtrMut<f32>,
    lse: &mut impl DevicePtrMut<f32>,
    n: usize,
    v: usize,
    grad_scale: Option<f32>,
) -> Result<()> {
    const K: &str = "cross_entropy_fwd_bwd";
    if v == 0 {
        return Err(KernelError::shape(K, "the vocabulary V must be non-empty"));
    }
    let nv = n.checked_mul(v).ok_or_else(|| KernelError::shape(K, format!("N·V = {n}·{v} overflows")))?;
    check_len(K, "logits (N·V)", logits.len(), nv)?;
    check_len(K, "targets (N)", targets.len(), n)?;
    check_len(K, "loss (N)", loss.len(), n)?;
    check_len(K, "lse (N)", lse.len(), n)?;
    to_i32(K, "N", n)?;
    let vi = to_i32(K, "V", v)?;
    if n == 0 {
        return Ok(());
    }
    let (name, scale) = match grad_scale {
        Some(s) => (T::pick("cross_entropy_bwd_f32", "cross_entropy_bwd_bf16"), s),
        None => (T::pick("cross_entropy_fwd_f32", "cross_entropy_fwd_bf16"), 0.0),
    };
    let f = gpu.function("loss", name)?;
    let (pl, pt, ploss, plse) = (ptr_mut(gpu, logits), ptr(gpu, targets), ptr_mut(gpu, loss), ptr_mut(gpu, lse));
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pl).arg(&pt).arg(&ploss).arg(&plse).arg(&vi).arg(&scale);
    let cfg = grid_rows(n, cross_entropy_threads(v, size_of::<T>()));
    // SAFETY: block r reads row r of logits (V elements, N·V held) and targets[r] (N held),
    // writes loss[r] and lse[r] (N held each) and, for the bwd kernel, row r of logits; a target
    // outside [0, V) is never used as an index. The block size is a multiple of 32, ≤ 1024.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// What one parity run of [`cross_entropy_fwd_bwd`] measured against the f64 reference.
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropyErrors {
    /// rel_err of the per-row loss.
    pub loss: f64,
    /// |Σ loss − reference loss_sum| / |reference loss_sum|.
    pub loss_sum: f64,
    pub lse: f64,
    /// rel_err of dlogits; 0 when run without a gradient (then the logits must be unchanged,
    /// which is checked here too and reported as infinite error if not).
    pub dlogits: f64,
}

/// Runs [`cross_entropy_fwd_bwd`] on `logits_f32` (rounded to T first) and compares with the f64
/// reference on the same rounded values. Shared by the self-test and the parity tests.
pub fn cross_entropy_parity<T: Float>(
    gpu: &Gpu,
    logits_f32: &[f32],
    targets: &[i32],
    v: usize,
    grad_scale: Option<f32>,
) -> Result<CrossEntropyErrors> {
    const K: &str = "cross_entropy_parity";
    let n = targets.len();
    let host: Vec<T> = logits_f32.iter().map(|&x| T::from_f32(x)).collect();
    let x64: Vec<f64> = host.iter().map(|&x| f64::from(x.to_f32())).collect();
    let t64: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
    let reference = cross_entropy_fwd_ref(&x64, &t64, n, v, IGNORE_INDEX)
        .map_err(|e| KernelError::shape(K, format!("reference: {e}")))?;

    let mut d_logits = gpu.upload(&host)?;
    let d_targets = gpu.upload(targets)?;
    let mut d_loss = gpu.zeros::<f32>(n)?;
    let mut d_lse = gpu.zeros::<f32>(n)?;
    cross_entropy_fwd_bwd(gpu, &mut d_logits, &d_targets, &mut d_loss, &mut d_lse, n, v, grad_scale)?;
    let loss = gpu.download(&d_loss)?;
    let lse = gpu.download(&d_lse)?;
    let out: Vec<f32> = gpu.download(&d_logits)?.iter().map(|x| x.to_f32()).collect();

    let want_loss: Vec<f32> = t64
        .iter()
        .enumerate()
        .map(|(r, &t)| if t == IGNORE_INDEX { 0.0 } else { (reference.lse[r] - x64[r * v + t as usize]) as f32 })
        .collect();
    let want_lse: Vec<f32> = reference.lse.iter().map(|&l| l as f32).collect();
    let got_sum: f64 = loss.iter().map(|&l| f64::from(l)).sum();
    let loss_sum = (got_sum - reference.loss_sum).abs() / reference.loss_sum.abs().max(1e-30);
    let dlogits = match grad_scale {
        Some(s) => {
            let d = cross_entropy_bwd_ref(&x64, &t64, &reference.lse, n, v, IGNORE_INDEX, f64::from(s))
                .map_err(|e| KernelError::shape(K, format!("reference: {e}")))?;
            let d: Vec<f32> = d.iter().map(|&x| x as f32).collect();
            let err = check::rel_err(&out, &d);
            // Ignored rows must be exactly zero, not merely small.
            let exact_zero = t64
                .iter()
                .enumerate()
                .all(|(r, &t)| t != IGNORE_INDEX || out[r * v..(r + 1) * v].iter().all(|&x| x.to_bits() == 0));
            if exact_zero { err } else { f64::INFINITY }
        }
        None => {
            let unchanged = out.iter().zip(&x64).all(|(&a, &b)| f64::from(a) == b);
            if unchanged { 0.0 } else { f64::INFINITY }
        }
    };
    Ok(CrossEntropyErrors {
        loss: check::rel_err(&loss, &want_loss),
        loss_sum,
        lse: check::rel_err(&lse, &want_lse),
        dlogits,
    })
}

/// Targets for tests: every `every`-th row ignored (when `every` > 0), the rest spread over [0, V).
pub fn test_targets(n: usize, v: usize, every: usize, seed: u64) -> Vec<i32> {
    (0..n)
        .map(|r| {
            if every > 0 && r % every == every - 1 {
                IGNORE_INDEX as i32
            } else {
                (gristmill_core::rng::mix64(seed ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) % v as u64) as i32
            }
        })
        .collect()
}

fn self_test_one<T: Float>(gpu: &Gpu, grad: bool) -> Result<Check> {
    let (n, v) = (5, 1003);
    let logits = check::test_data(n * v, 17, 8.0);
    let targets = test_targets(n, v, 3, 5);
    let e = cross_entropy_parity::<T>(gpu, &logits, &targets, v, grad.then_some(0.25))?;
    let stats = e.loss.max(e.loss_sum).max(e.lse);
    let (kernel, rel_err, tol) = match (T::IS_BF16, grad) {
        (false, false) => ("cross_entropy_fwd_f32", stats, tol::CROSS_ENTROPY_F32),
        (false, true) => ("cross_entropy_bwd_f32", stats.max(e.dlogits), tol::CROSS_ENTROPY_F32),
        (true, false) => ("cross_entropy_fwd_bf16", stats, tol::CROSS_ENTROPY_BF16),
        // The bf16 gradient's tolerance is the looser one; the f32 outputs must still be
        // within theirs, so they are scaled onto the same figure.
        (true, true) => (
            "cross_entropy_bwd_bf16",
            (stats * tol::CROSS_ENTROPY_BF16_GRAD / tol::CROSS_ENTROPY_BF16).max(e.dlogits),
            tol::CROSS_ENTROPY_BF16_GRAD,
        ),
    };
    Ok(Check { kernel, shape: format!("N={n} V={v}, every 3rd row ignored"), rel_err, tol })
}

/// Every kernel of this module against its CPU reference on small, awkward shapes.
pub fn self_test(gpu: &Gpu) -> Result<Vec<Check>> {
    Ok(vec![
        self_test_one::<f32>(gpu, false)?,
        self_test_one::<f32>(gpu, true)?,
        self_test_one::<bf16>(gpu, false)?,
        self_test_one::<bf16>(gpu, true)?,
    ])
}

/// Every kernel of this module at realistic sizes.
pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    // One chunk of the LM head of a Llama-3 vocabulary.
    let (n, v) = (1024usize, 128_256usize);
    let host: Vec<bf16> = check::test_data(n * v, 3, 6.0).into_iter().map(bf16::from_f32).collect();
    let mut logits = gpu.upload(&host)?;
    let targets = gpu.upload(&test_targets(n, v, 0, 9))?;
    let mut loss = gpu.zeros::<f32>(n)?;
    let mut lse = gpu.zeros::<f32>(n)?;
    let row_bytes = (n * v * size_of::<bf16>()) as f64;
    let small = (n * (4 + 4 + 4)) as f64;
    let shape = format!("N={n} V={v}");
    // The gradient overwrites the logits, so later calls run on gradients: same work, and the
    // values stay finite.
    let bwd = check::time_median(gpu, 5, 20, || {
        cross_entropy_fwd_bwd(gpu, &mut logits, &targets, &mut loss, &mut lse, n, v, Some(1.0 / n as f32))
    })?;
    let fwd = check::time_median(gpu, 5, 20, || {
        cross_entropy_fwd_bwd(gpu, &mut logits, &targets, &mut loss, &mut lse, n, v, None)
    })?;
    Ok(vec![
        BenchRow {
            kernel: "cross_entropy_bwd_bf16",
            shape: shape.clone(),
            seconds: bwd,
            work: Work::Bytes(3.0 * row_bytes + small),
        },
        BenchRow { kernel: "cross_entropy_fwd_bf16", shape, seconds: fwd, work: Work::Bytes(row_bytes + small) },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_covers_small_and_large_rows() {
        assert_eq!(cross_entropy_threads(1, 2), 32);
        assert_eq!(cross_entropy_threads(5, 4), 32);
        // 1000 f32 = 250 vectors → 8 warps.
        assert_eq!(cross_entropy_threads(1000, 4), 256);
        assert_eq!(cross_entropy_threads(49_152, 2), 1024);
        assert_eq!(cross_entropy_threads(128_256, 2), 1024);
        for v in 1..5000 {
            for bytes in [2, 4] {
                let t = cross_entropy_threads(v, bytes);
                assert!(t.is_multiple_of(32) && (32..=1024).contains(&t), "v={v}: {t}");
            }
        }
    }

    #[test]
    fn test_targets_ignore_every_kth_row() {
        let t = test_targets(10, 7, 3, 1);
        for (r, &x) in t.iter().enumerate() {
            if r % 3 == 2 {
                assert_eq!(x, -100);
            } else {
                assert!((0..7).contains(&x));
            }
        }
        assert!(test_targets(10, 7, 0, 1).iter().all(|&x| (0..7).contains(&x)));
    }
}
