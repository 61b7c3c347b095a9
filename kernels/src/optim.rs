//! Launchers of kernels/cuda/optim.cu: AdamW over flat f32 vectors, the global gradient norm and
//! scaling.
//!
//! All LoRA parameters of a model live in one f32 buffer (and their gradients and moments in
//! three more of the same layout), so one launch of each kernel covers the whole model.

use crate::Gpu;
use crate::check::{self, BenchRow, Check, Work};
use crate::error::{KernelError, Result, check_len, to_i32};
use crate::launch::{grid_1d, ptr, ptr_mut};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use gristmill_core::Real;
use gristmill_core::ops::adamw::{AdamWConfig, adamw_step_ref};

/// Tolerances of the parity checks (`check::rel_err`).
pub mod tol {
    /// adamw_step and scale are bit-exact with the reference.
    pub const EXACT: f64 = 0.0;
    /// Σ x² against an f64 sum: f32 squares summed four at a time, then f64; the result is
    /// rounded to f32 (6e-8).
    pub const SUM_SQUARES_F32: f64 = 1e-6;
}

const THREADS: u32 = 256;
/// The most blocks of the first Σ x² pass: one wave of 256-thread blocks on a large GPU.
const SUM_SQUARES_MAX_BLOCKS: usize = 1024;

/// The scalar factors of one AdamW step, computed as `adamw_step_ref` computes them (in f64,
/// rounded once to f32), plus the gradient multiplier. [`AdamWConstants::update`] is the
/// kernel's per-element arithmetic, in the same order, for CPU tests of these constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConstants {
    pub decay: f32,
    pub w1: f32,
    pub one_minus_w1: f32,
    pub b2: f32,
    pub w2: f32,
    pub bc2_sqrt: f32,
    pub neg_step: f32,
    pub eps: f32,
    pub grad_mul: f32,
    pub lerp_from_start: bool,
}

impl AdamWConstants {
    /// `step` counts from 1; `cfg` must be valid (the launcher checks both first).
    pub fn new(step: u64, cfg: &AdamWConfig, grad_mul: f32) -> Self {
        let (lr, beta1, beta2) = (f64::from(cfg.lr), f64::from(cfg.beta1), f64::from(cfg.beta2));
        let t = step as f64;
        // Real::powf and Real::sqrt of f64 are the reference's own (libm's pow and sqrt), so the
        // bias corrections agree to the last bit.
        let bc1 = 1.0 - Real::powf(beta1, t);
        let bc2 = 1.0 - Real::powf(beta2, t);
        let w1 = (1.0 - beta1) as f32;
        Self {
            decay: (1.0 - lr * f64::from(cfg.weight_decay)) as f32,
            w1,
            one_minus_w1: 1.0 - w1,
            b2: beta2 as f32,
            w2: (1.0 - beta2) as f32,
            bc2_sqrt: Real::sqrt(bc2) as f32,
            neg_step: (-(lr / bc1)) as f32,
            eps: cfg.eps,
            grad_mul,
            lerp_from_start: w1.abs() < 0.5,
        }
    }

    /// One element, exactly as `adamw_step_f32` computes it.
    pub fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        let g = g * self.grad_mul;
        *p *= self.decay;
        *m = if self.lerp_from_start { *m + self.w1 * (g - *m) } else { g - (g - *m) * self.one_minus_w1 };
        *v = *v * self.b2 + self.w2 * g * g;
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        *p += self.neg_step * (*m / denom);
    }
}

/// torch's clip coefficient for a global gradient norm: `max_norm / (norm + 1e-6)` when that is
/// below 1, else 1. None when `norm` is not finite (the step must be skipped and the gradients
/// kept as they are) or `max_norm` is not finite and positive.
pub fn clip_factor(norm: f32, max_norm: f32) -> Option<f32> {
    if !(norm.is_finite() && max_norm > 0.0 && max_norm.is_finite()) {
        return None;
    }
    let coef = max_norm / (norm + 1e-6f64 as f32);
    Some(if coef < 1.0 { coef } else { 1.0 })
}

/// Blocks of the first Σ x² pass for `n` elements: a function of n alone, so that the sum is
/// the same on every GPU and every run.
pub fn sum_squares_blocks(n: usize) -> usize {
    n.div_ceil(THREADS as usize * 16).clamp(1, SUM_SQUARES_MAX_BLOCKS)
}

/// One AdamW step over flat f32 vectors, in place.
///
/// p: (n) parameters; g: (n) gradient; m: (n) first moment; v: (n) second moment.
///
/// The gradient used is the f32 product g·grad_mul (grad_mul is the clip factor, 1.0 when not
/// clipping), as torch's in-place clip followed by its step gives. `step` counts from 1. The
/// result is bit-exact with `adamw_step_ref::<f32>` applied to g·grad_mul.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    gpu: &Gpu,
    p: &mut impl DevicePtrMut<f32>,
    g: &impl DevicePtr<f32>,
    m: &mut impl DevicePtrMut<f32>,
    v: &mut impl DevicePtrMut<f32>,
    step: u64,
    cfg: &AdamWConfig,
    grad_mul: f32,
) -> Result<()> {
    const K: &str = "adamw_step";
    if step == 0 {
        return Err(KernelError::shape(K, "steps count from 1: step 0 would divide by a zero bias correction"));
    }
    cfg.validate().map_err(|e| KernelError::shape(K, e.to_string()))?;
    let n = p.len();
    check_len(K, "g", g.len(), n)?;
    check_len(K, "m", m.len(), n)?;
    check_len(K, "v", v.len(), n)?;
    let ni = to_i32(K, "n", n)?;
    if n == 0 {
        return Ok(());
    }
    let c = AdamWConstants::new(step, cfg, grad_mul);
    let lerp = i32::from(c.lerp_from_start);
    let f = gpu.function("optim", "adamw_step_f32")?;
    let (pp, pg, pm, pv) = (ptr_mut(gpu, p), ptr(gpu, g), ptr_mut(gpu, m), ptr_mut(gpu, v));
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pp).arg(&pg).arg(&pm).arg(&pv).arg(&ni);
    b.arg(&c.decay).arg(&c.w1).arg(&c.one_minus_w1).arg(&c.b2).arg(&c.w2).arg(&c.bc2_sqrt);
    b.arg(&c.neg_step).arg(&c.eps).arg(&c.grad_mul).arg(&lerp);
    // SAFETY: the kernel reads and writes elements [0, n) of p, m and v and reads [0, n) of g,
    // grid-stride; all four hold n elements.
    unsafe { b.launch(grid_1d(n.div_ceil(4), THREADS)) }?;
    Ok(())
}

/// Σ x² of an f32 vector, written to out[0]; deterministic (a fixed two-pass reduction in f64,
/// no atomics).
///
/// x: (n) f32; out: (1) f32.
pub fn sum_squares(gpu: &Gpu, x: &impl DevicePtr<f32>, out: &mut impl DevicePtrMut<f32>) -> Result<()> {
    const K: &str = "sum_squares";
    check_len(K, "out", out.len(), 1)?;
    let n = x.len();
    let ni = to_i32(K, "n", n)?;
    let blocks = sum_squares_blocks(n);
    let bi = to_i32(K, "blocks", blocks)?;
    let mut partial = gpu.alloc::<f64>(blocks)?;
    let (first, finish) = (gpu.function("optim", "sum_squares_f32")?, gpu.function("optim", "sum_squares_finish_f32")?);
    let (px, ppart, pout) = (ptr(gpu, x), ptr_mut(gpu, &mut partial), ptr_mut(gpu, out));
    let mut b = gpu.stream().launch_builder(&first);
    b.arg(&px).arg(&ni).arg(&ppart);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the kernel reads x[0, n) (n held) and block b writes partial[b], b < blocks, the
    // length of `partial`.
    unsafe { b.launch(cfg) }?;
    let mut b = gpu.stream().launch_builder(&finish);
    b.arg(&ppart).arg(&bi).arg(&pout);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: one block reads partial[0, blocks), all written by the launch before it on the
    // same stream, and writes out[0] (out holds 1). `partial` is freed after both, in stream order.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// The global L2 norm of `x`: [`sum_squares`], then one 4-byte download (synchronizes).
///
/// x: (n) f32.
pub fn l2_norm(gpu: &Gpu, x: &impl DevicePtr<f32>) -> Result<f32> {
    let mut out = gpu.alloc::<f32>(1)?;
    sum_squares(gpu, x, &mut out)?;
    let ss = gpu.download(&out)?;
    Ok(ss.first().copied().unwrap_or(0.0).sqrt())
}

/// x *= s in place, for callers that clip explicitly.
///
/// x: (n) f32.
pub fn scale(gpu: &Gpu, x: &mut impl DevicePtrMut<f32>, s: f32) -> Result<()> {
    const K: &str = "scale";
    let n = x.len();
    let ni = to_i32(K, "n", n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("optim", "scale_f32")?;
    let px = ptr_mut(gpu, x);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&px).arg(&ni).arg(&s);
    // SAFETY: the kernel reads and writes x[0, n), grid-stride; x holds n elements. The grid has
    // at least 256 threads, enough for the ≤ 6 scalar head and tail elements.
    unsafe { b.launch(grid_1d(n.div_ceil(4), THREADS)) }?;
    Ok(())
}

/// Runs `steps` AdamW steps on n elements (buffers offset by `offset` elements, to reach the
/// unaligned path) and compares p, m and v with `adamw_step_ref::<f32>` on g·grad_mul. Returns
/// 0 when every bit agrees, else the largest rel_err (at least f64::MIN_POSITIVE).
pub fn adamw_parity(gpu: &Gpu, n: usize, offset: usize, steps: u64, cfg: &AdamWConfig, grad_mul: f32) -> Result<f64> {
    const K: &str = "adamw_parity";
    let mut p = check::test_data(n, 11, 1.0);
    let mut m = check::test_data(n, 12, 1e-2);
    let mut v: Vec<f32> = check::test_data(n, 13, 1e-3).iter().map(|x| x * x).collect();
    let pad = |x: &[f32]| [vec![0.5f32; offset], x.to_vec()].concat();
    let (mut dp, mut dm, mut dv) = (gpu.upload(&pad(&p))?, gpu.upload(&pad(&m))?, gpu.upload(&pad(&v))?);
    for step in 1..=steps {
        let g = check::test_data(n, 100 + step, 0.1);
        let dg = gpu.upload(&pad(&g))?;
        adamw_step(
            gpu,
            &mut dp.slice_mut(offset..),
            &dg.slice(offset..),
            &mut dm.slice_mut(offset..),
            &mut dv.slice_mut(offset..),
            step,
            cfg,
            grad_mul,
        )?;
        let clipped: Vec<f32> = g.iter().map(|&x| x * grad_mul).collect();
        adamw_step_ref(&mut p, &clipped, &mut m, &mut v, step, cfg)
            .map_err(|e| KernelError::shape(K, format!("reference: {e}")))?;
    }
    let mut worst = 0f64;
    for (dev, want) in [(&dp, &p), (&dm, &m), (&dv, &v)] {
        let got = gpu.download(dev)?;
        let got = &got[offset..];
        if got.iter().zip(want.iter()).any(|(a, b)| a.to_bits() != b.to_bits()) {
            worst = worst.max(check::rel_err(got, want).max(f64::MIN_POSITIVE));
        }
    }
    Ok(worst)
}

/// Σ x² of test data of n elements (from element `offset` of the buffer) against an f64 sum;
/// returns rel_err of sum_squares and of l2_norm.
pub fn sum_squares_parity(gpu: &Gpu, n: usize, offset: usize) -> Result<(f64, f64)> {
    let x = check::test_data(n + offset, 21, 2.0);
    let want: f64 = x[offset..].iter().map(|&a| f64::from(a) * f64::from(a)).sum();
    let dx = gpu.upload(&x)?;
    let mut out = gpu.alloc::<f32>(1)?;
    sum_squares(gpu, &dx.slice(offset..), &mut out)?;
    let got = gpu.download(&out)?;
    let norm = l2_norm(gpu, &dx.slice(offset..))?;
    Ok((check::rel_err(&got, &[want as f32]), check::rel_err(&[norm], &[want.sqrt() as f32])))
}

/// [`scale`] on n elements from `offset` against x·s on the host; 0 when bit-exact.
pub fn scale_parity(gpu: &Gpu, n: usize, offset: usize, s: f32) -> Result<f64> {
    let x = check::test_data(n + offset, 31, 3.0);
    let mut dx = gpu.upload(&x)?;
    scale(gpu, &mut dx.slice_mut(offset..), s)?;
    let got = gpu.download(&dx)?;
    let want: Vec<f32> = x.iter().enumerate().map(|(i, &a)| if i < offset { a } else { a * s }).collect();
    let exact = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
    Ok(if exact { 0.0 } else { check::rel_err(&got, &want).max(f64::MIN_POSITIVE) })
}

/// Every kernel of this module against its CPU reference on small, awkward shapes.
pub fn self_test(gpu: &Gpu) -> Result<Vec<Check>> {
    let cfg = AdamWConfig::default();
    let (adam_aligned, adam_offset) =
        (adamw_parity(gpu, 1003, 0, 2, &cfg, 0.37)?, adamw_parity(gpu, 1003, 1, 2, &cfg, 0.37)?);
    let (ss, norm) = sum_squares_parity(gpu, 1023, 1)?;
    let sc = scale_parity(gpu, 1023, 1, -0.37)?.max(scale_parity(gpu, 1024, 0, 0.37)?);
    Ok(vec![
        Check {
            kernel: "adamw_step_f32",
            shape: "n=1003, 2 steps, aligned and offset by 1".into(),
            rel_err: adam_aligned.max(adam_offset),
            tol: tol::EXACT,
        },
        Check {
            kernel: "sum_squares_f32",
            shape: "n=1023, offset by 1".into(),
            rel_err: ss.max(norm),
            tol: tol::SUM_SQUARES_F32,
        },
        Check { kernel: "scale_f32", shape: "n=1023 offset by 1, n=1024".into(), rel_err: sc, tol: tol::EXACT },
    ])
}

/// Every kernel of this module at realistic sizes.
pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    // LoRA rank 16 on every projection of an 8B model is about 40M parameters.
    let n = 40_000_000usize;
    let shape = format!("n={n}");
    let mut p = gpu.upload(&check::test_data(n, 1, 1.0))?;
    let g = gpu.upload(&check::test_data(n, 2, 1e-2))?;
    let mut m = gpu.upload(&check::test_data(n, 3, 1e-3))?;
    let mut v = gpu.upload(&check::test_data(n, 4, 1e-3).iter().map(|x| x * x).collect::<Vec<f32>>())?;
    let cfg = AdamWConfig::default();
    let mut step = 0u64;
    let adam = check::time_median(gpu, 5, 20, || {
        step += 1;
        adamw_step(gpu, &mut p, &g, &mut m, &mut v, step, &cfg, 0.5)
    })?;
    let mut out = gpu.alloc::<f32>(1)?;
    let ss = check::time_median(gpu, 5, 20, || sum_squares(gpu, &g, &mut out))?;
    let sc = check::time_median(gpu, 5, 20, || scale(gpu, &mut p, 1.0))?;
    let b = (n * size_of::<f32>()) as f64;
    Ok(vec![
        BenchRow { kernel: "adamw_step_f32", shape: shape.clone(), seconds: adam, work: Work::Bytes(7.0 * b) },
        BenchRow { kernel: "sum_squares_f32", shape: shape.clone(), seconds: ss, work: Work::Bytes(b) },
        BenchRow { kernel: "scale_f32", shape, seconds: sc, work: Work::Bytes(2.0 * b) },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use gristmill_core::ops::adamw::clip_grad_norm_ref;

    fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        check::test_data(n, seed, scale)
    }

    /// The kernel's arithmetic with these constants is the reference, bit for bit.
    #[test]
    fn constants_reproduce_the_reference() {
        let configs = [
            AdamWConfig::default(),
            AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() },
            // β1 = 0.25 takes torch's other lerp branch.
            AdamWConfig { lr: 3e-4, beta1: 0.25, beta2: 0.95, eps: 1e-6, weight_decay: 0.1 },
        ];
        for cfg in configs {
            for grad_mul in [1.0, 0.37] {
                let n = 257;
                let (mut p, mut m) = (data(n, 1, 1.0), data(n, 2, 1e-2));
                let mut v: Vec<f32> = data(n, 3, 1e-2).iter().map(|x| x * x).collect();
                let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
                for step in [1, 2, 3, 1000, 123_457] {
                    let g = data(n, 10 + step, 0.1);
                    let c = AdamWConstants::new(step, &cfg, grad_mul);
                    for i in 0..n {
                        c.update(&mut p[i], g[i], &mut m[i], &mut v[i]);
                    }
                    let gm: Vec<f32> = g.iter().map(|&x| x * grad_mul).collect();
                    adamw_step_ref(&mut p2, &gm, &mut m2, &mut v2, step, &cfg).unwrap();
                    for (a, b) in [(&p, &p2), (&m, &m2), (&v, &v2)] {
                        assert!(a.iter().zip(b.iter()).all(|(x, y)| x.to_bits() == y.to_bits()), "{cfg:?} step {step}");
                    }
                }
            }
        }
    }

    #[test]
    fn clip_factor_agrees_with_clip_grad_norm() {
        for (scale, max_norm) in [(1.0f32, 1.0f32), (0.01, 1.0), (3.0, 0.5), (1e-3, 1e-3)] {
            let (a, b) = (data(100, 5, scale), data(37, 6, scale));
            let (mut ra, mut rb) = (a.clone(), b.clone());
            let total = clip_grad_norm_ref(&mut [&mut ra[..], &mut rb[..]], max_norm).unwrap();
            let coef = clip_factor(total, max_norm).unwrap();
            // Multiplying by an exact 1.0 (not clipping) leaves every bit as it is.
            let scaled: Vec<f32> = a.iter().chain(&b).map(|&x| x * coef).collect();
            let want: Vec<f32> = ra.iter().chain(&rb).copied().collect();
            assert!(scaled.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "scale {scale}");
            assert!(coef <= 1.0);
        }
        assert_eq!(clip_factor(5.0, 10.0), Some(1.0));
        assert_eq!(clip_factor(5.0, 1.0), Some(1.0 / (5.0 + 1e-6f64 as f32)));
        assert_eq!(clip_factor(f32::INFINITY, 1.0), None);
        assert_eq!(clip_factor(f32::NAN, 1.0), None);
        assert_eq!(clip_factor(1.0, 0.0), None);
        assert_eq!(clip_factor(1.0, f32::NAN), None);
    }

    #[test]
    fn sum_squares_blocks_depend_on_n_only() {
        assert_eq!(sum_squares_blocks(0), 1);
        assert_eq!(sum_squares_blocks(1), 1);
        assert_eq!(sum_squares_blocks(4096), 1);
        assert_eq!(sum_squares_blocks(4097), 2);
        assert_eq!(sum_squares_blocks(40_000_000), 1024);
    }
}
