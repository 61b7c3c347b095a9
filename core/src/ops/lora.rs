//! A linear layer with a LoRA adapter, with PEFT's semantics:
//!
//! `y = x Wᵀ + s · (dropout(x) Aᵀ) Bᵀ`
//!
//! W is the frozen base weight (in gristmill an NF4 tensor, dequantized before it gets here), A
//! and B the trainable adapter, `s` the scale from [`lora_scale`]. Dropout touches only the
//! adapter's input, never the base path. The dropout mask is counter-based ([`dropout_uniform`]):
//! a kernel regenerates it from (seed, element index) in the backward instead of storing M·K
//! values.

use crate::error::{check_len, checked_product, invalid};
use crate::ops::matmul::{Trans, matmul_fwd_ref as matmul};
use crate::rng::Rng;
use crate::rng::{GOLDEN_GAMMA, mix64};
use crate::{Real, Result};
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// The adapter's output multiplier: `alpha / r`, or `alpha / √r` with rsLoRA (rank-stabilised
/// LoRA, whose updates keep their size as r grows).
pub fn lora_scale(alpha: f32, r: usize, rslora: bool) -> Result<f32> {
    const OP: &str = "lora_scale";
    if r == 0 {
        return Err(invalid(OP, "r", "the LoRA rank must be at least 1"));
    }
    if !alpha.is_finite() {
        return Err(invalid(OP, "alpha", format!("must be finite, got {alpha}")));
    }
    // Computed in f64 as PEFT does in Python, then rounded once.
    let r = r as f64;
    let denom = if rslora { libm::sqrt(r) } else { r };
    Ok((alpha as f64 / denom) as f32)
}

/// Dimensions of a LoRA linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraDims {
    /// Rows of x: tokens in the batch.
    pub m: usize,
    /// Input features d_in.
    pub k: usize,
    /// Output features d_out.
    pub n: usize,
    /// Adapter rank r.
    pub r: usize,
}

impl LoraDims {
    fn check(&self, op: &'static str) -> Result<()> {
        if self.r == 0 {
            return Err(invalid(op, "r", "the LoRA rank must be at least 1"));
        }
        for pair in
            [[self.m, self.k], [self.n, self.k], [self.r, self.k], [self.n, self.r], [self.m, self.n], [self.m, self.r]]
        {
            checked_product(&pair)?;
        }
        Ok(())
    }
}

/// x∘mask, the adapter's input; x itself without a mask.
fn masked<T: Real>(x: &[T], mask: Option<&[T]>) -> Vec<T> {
    match mask {
        Some(mask) => x.iter().zip(mask).map(|(&xv, &mv)| xv * mv).collect(),
        None => x.to_vec(),
    }
}

/// Checks the buffers the forward and backward share.
#[allow(clippy::too_many_arguments)]
fn check_common<T>(
    op: &'static str,
    x: &[T],
    w: &[T],
    a: &[T],
    b: &[T],
    dims: &LoraDims,
    dropout_mask: Option<&[T]>,
) -> Result<()> {
    dims.check(op)?;
    let LoraDims { m, k, n, r } = *dims;
    check_len(op, "x", x.len(), m * k)?;
    check_len(op, "w", w.len(), n * k)?;
    check_len(op, "a", a.len(), r * k)?;
    check_len(op, "b", b.len(), n * r)?;
    if let Some(mask) = dropout_mask {
        check_len(op, "dropout_mask", mask.len(), m * k)?;
    }
    Ok(())
}

/// What the forward returns.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFwd<T> {
    /// y: (M, N), the layer's output.
    pub y: Vec<T>,
    /// u: (M, r) = (x∘mask) Aᵀ, the adapter's bottleneck activation, saved for the backward
    /// (it gives dB without redoing the rank-r product).
    pub u: Vec<T>,
}

/// Forward pass: `y = x Wᵀ + s · u Bᵀ` with `u = (x∘mask) Aᵀ`.
///
/// x: (M, K); w: (N, K); a: (r, K); b: (N, r); dropout_mask: (M, K) when given, entries 0 or
/// 1/(1−p) as from [`dropout_mask_ref`]; y: (M, N); u: (M, r).
#[allow(clippy::too_many_arguments)]
pub fn lora_fwd_ref<T: Real>(
    x: &[T],
    w: &[T],
    a: &[T],
    b: &[T],
    scale: T,
    dims: &LoraDims,
    dropout_mask: Option<&[T]>,
) -> Result<LoraFwd<T>> {
    check_common("lora_fwd_ref", x, w, a, b, dims, dropout_mask)?;
    let LoraDims { m, k, n, r } = *dims;
    let xd = masked(x, dropout_mask);
    let mut y = matmul(x, w, m, k, n, Trans::N, Trans::T)?;
    let u = matmul(&xd, a, m, k, r, Trans::N, Trans::T)?;
    let adapter = matmul(&u, b, m, r, n, Trans::N, Trans::T)?;
    for (yv, &av) in y.iter_mut().zip(&adapter) {
        *yv += scale * av;
    }
    Ok(LoraFwd { y, u })
}

/// What the backward returns.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraGrads<T> {
    /// dx: (M, K) = dy W + s · ((dy B) A)∘mask.
    pub dx: Vec<T>,
    /// da: (r, K) = s · (dy B)ᵀ (x∘mask).
    pub da: Vec<T>,
    /// db: (N, r) = s · dyᵀ u.
    pub db: Vec<T>,
    /// v: (M, r) = dy B, the gradient reaching the bottleneck before the scale. Returned because
    /// the GRIT optimizer builds its curvature statistics from it (products like vᵀv / M, the
    /// output-side factor paired with uᵀu on the input side), and it is already computed here.
    pub v: Vec<T>,
}

/// Backward pass of [`lora_fwd_ref`]. W is frozen, so it gets no gradient.
///
/// x: (M, K); w: (N, K); a: (r, K); b: (N, r); dropout_mask: (M, K), the forward's; u: (M, r)
/// from the forward; dy: (M, N). dx: (M, K); da: (r, K); db: (N, r); v: (M, r).
#[allow(clippy::too_many_arguments)]
pub fn lora_bwd_ref<T: Real>(
    x: &[T],
    w: &[T],
    a: &[T],
    b: &[T],
    scale: T,
    dims: &LoraDims,
    dropout_mask: Option<&[T]>,
    u: &[T],
    dy: &[T],
) -> Result<LoraGrads<T>> {
    const OP: &str = "lora_bwd_ref";
    check_common(OP, x, w, a, b, dims, dropout_mask)?;
    let LoraDims { m, k, n, r } = *dims;
    check_len(OP, "u", u.len(), m * r)?;
    check_len(OP, "dy", dy.len(), m * n)?;
    let xd = masked(x, dropout_mask);

    let v = matmul(dy, b, m, n, r, Trans::N, Trans::N)?;
    let mut dx = matmul(dy, w, m, n, k, Trans::N, Trans::N)?;
    // The adapter path saw x∘mask, so its share of dx goes back through the same mask.
    let dxd = matmul(&v, a, m, r, k, Trans::N, Trans::N)?;
    let dxd = masked(&dxd, dropout_mask);
    for (d, &e) in dx.iter_mut().zip(&dxd) {
        *d += scale * e;
    }
    let mut da = matmul(&v, &xd, r, m, k, Trans::T, Trans::N)?;
    let mut db = matmul(dy, u, n, m, r, Trans::T, Trans::N)?;
    for g in da.iter_mut().chain(db.iter_mut()) {
        *g *= scale;
    }
    Ok(LoraGrads { dx, da, db, v })
}

/// A uniform number in [0, 1) that depends only on `(seed, i)`: the dropout mask's element `i`.
///
/// `z = mix64(mix64(seed) + (i + 1)·γ)` (wrapping, γ = 0x9E3779B97F4A7C15, mix64 SplitMix64's
/// finaliser), then the top 24 bits of `z` divided by 2^24. For a fixed seed this is the
/// SplitMix64 stream keyed by `mix64(seed)`, so elements are independent of one another and of the
/// order they are computed in, which is what lets a GPU thread regenerate any element alone.
/// Mixing the seed first keeps seeds that differ by a multiple of γ (say per-layer seeds
/// `base + layer·γ`) from producing shifted copies of one stream. 24 bits because that is what an
/// f32 holds exactly: the division is exact, the comparison with p has no rounding.
#[inline]
pub fn dropout_uniform(seed: u64, i: u64) -> f32 {
    let z = mix64(mix64(seed).wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)));
    (z >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// The inverted-dropout mask of `n` elements: element i is 0 when `dropout_uniform(seed, i) < p`
/// (dropped, probability p) and `1/(1 − p)` otherwise, so that E[x∘mask] = x.
///
/// mask: (n), usually (M, K) flattened row-major, i = row·K + column.
pub fn dropout_mask_ref(seed: u64, n: usize, p: f32) -> Result<Vec<f32>> {
    // Written so that NaN fails as well.
    if !(0.0..1.0).contains(&p) {
        return Err(invalid("dropout_mask_ref", "p", format!("dropout probability must be in [0, 1), got {p}")));
    }
    let keep = 1.0 / (1.0 - p);
    Ok((0..n as u64).map(|i| if dropout_uniform(seed, i) < p { 0.0 } else { keep }).collect())
}

/// PEFT's initial A: (r, d_in), uniform in [−1/√d_in, 1/√d_in].
///
/// PEFT calls `kaiming_uniform_(A, a=√5)`. Its bound is `gain · √(3 / fan_in)` with the leaky-ReLU
/// gain `√(2 / (1 + a²)) = √(2 / 6) = 1/√3`, and fan_in = d_in (A's second dimension), so
/// the bound is `(1/√3) · √3 / √d_in = 1/√d_in`. The values come from gristmill's [`Rng`], not
/// torch's: same distribution, different draws (golden tests load the reference's A).
pub fn lora_init_a(rng: &mut Rng, r: usize, d_in: usize) -> Vec<f32> {
    // d_in = 0 gives an empty A, so the infinite bound is never used.
    let bound = 1.0 / libm::sqrt(d_in as f64);
    rng.vec(r.saturating_mul(d_in), |g| g.uniform_in(-bound, bound) as f32)
}

/// PEFT's initial B: (d_out, r), all zeros, so that the adapted layer starts out equal to the base
/// layer (B A = 0) while A's gradient s·(dy B)ᵀ x is zero too and B's, s·dyᵀ (x Aᵀ), is not:
/// training moves B first.
pub fn lora_init_b(d_out: usize, r: usize) -> Vec<f32> {
    vec![0.0; d_out.saturating_mul(r)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::testutil::{assert_close, dot, numeric_grad, randn};

    #[test]
    fn scale_plain_and_rslora() {
        // alpha = 16, r = 8: 16 / 8 = 2; rsLoRA with r = 4: 16 / √4 = 8.
        assert_eq!(lora_scale(16.0, 8, false).unwrap(), 2.0);
        assert_eq!(lora_scale(16.0, 4, true).unwrap(), 8.0);
        assert_eq!(lora_scale(8.0, 1, true).unwrap(), 8.0);
        assert!(lora_scale(16.0, 0, false).is_err());
        assert!(lora_scale(16.0, 0, true).is_err());
        assert!(lora_scale(f32::NAN, 4, false).is_err());
    }

    #[test]
    fn forward_hand_case() {
        // M = 1, K = 2, N = 2, r = 1, s = 0.5.
        // x = [1, 2]; W = I → x Wᵀ = [1, 2]; A = [[3, 4]] → u = 1·3 + 2·4 = 11;
        // B = [[1], [−1]] → u Bᵀ = [11, −11]; y = [1 + 0.5·11, 2 − 0.5·11] = [6.5, −3.5].
        let dims = LoraDims { m: 1, k: 2, n: 2, r: 1 };
        let (x, w, a, b) = ([1.0, 2.0], [1.0, 0.0, 0.0, 1.0], [3.0, 4.0], [1.0, -1.0]);
        let f = lora_fwd_ref::<f64>(&x, &w, &a, &b, 0.5, &dims, None).unwrap();
        assert_eq!(f.y, [6.5, -3.5]);
        assert_eq!(f.u, [11.0]);

        // With p = 0.5 and mask [2, 0]: the base path still sees x (y_base = [1, 2]), the adapter
        // sees xd = [2, 0], u = 2·3 + 0·4 = 6, y = [1 + 0.5·6, 2 − 0.5·6] = [4, −1].
        let f = lora_fwd_ref::<f64>(&x, &w, &a, &b, 0.5, &dims, Some(&[2.0, 0.0])).unwrap();
        assert_eq!(f.y, [4.0, -1.0]);
        assert_eq!(f.u, [6.0]);
    }

    /// Checks dx, da, db against central differences of L = <y, w_obj>, and v against dy·B.
    fn grad_check(dims: LoraDims, with_mask: bool, seed: u64) {
        let LoraDims { m, k, n, r } = dims;
        let mut rng = Rng::new(seed);
        let x = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, 0.5);
        let a = randn(&mut rng, r * k, 0.5);
        // B is random, not PEFT's zeros: with B = 0 the check would not see da.
        let b = randn(&mut rng, n * r, 0.5);
        let dy = randn(&mut rng, m * n, 1.0);
        let mask: Option<Vec<f64>> =
            with_mask.then(|| dropout_mask_ref(seed, m * k, 0.5).unwrap().iter().map(|&v| v as f64).collect());
        let mask = mask.as_deref();
        if let Some(mk) = mask {
            assert!(mk.contains(&0.0) && mk.iter().any(|&v| v > 1.0), "mask should drop and keep: {mk:?}");
        }
        let s = 1.7;

        let fwd = lora_fwd_ref(&x, &w, &a, &b, s, &dims, mask).unwrap();
        let g = lora_bwd_ref(&x, &w, &a, &b, s, &dims, mask, &fwd.u, &dy).unwrap();

        let loss = |x: &[f64], a: &[f64], b: &[f64]| dot(&lora_fwd_ref(x, &w, a, b, s, &dims, mask).unwrap().y, &dy);
        let h = 1e-6;
        assert_close("dx", &g.dx, &numeric_grad(&x, h, |p| loss(p, &a, &b)), 1e-6);
        assert_close("da", &g.da, &numeric_grad(&a, h, |p| loss(&x, p, &b)), 1e-6);
        assert_close("db", &g.db, &numeric_grad(&b, h, |p| loss(&x, &a, p)), 1e-6);

        let mut v = vec![0.0; m * r];
        for i in 0..m {
            for j in 0..r {
                v[i * r + j] = (0..n).map(|o| dy[i * n + o] * b[o * r + j]).sum();
            }
        }
        assert_close("v", &g.v, &v, 1e-14);
    }

    #[test]
    fn gradients_rank_1() {
        grad_check(LoraDims { m: 3, k: 5, n: 4, r: 1 }, false, 1);
        grad_check(LoraDims { m: 3, k: 5, n: 4, r: 1 }, true, 2);
    }

    #[test]
    fn gradients_ragged_rank() {
        grad_check(LoraDims { m: 4, k: 7, n: 5, r: 3 }, false, 3);
        grad_check(LoraDims { m: 4, k: 7, n: 5, r: 3 }, true, 4);
        grad_check(LoraDims { m: 1, k: 6, n: 9, r: 5 }, true, 5);
    }

    #[test]
    fn mask_of_ones_is_no_mask() {
        let dims = LoraDims { m: 2, k: 3, n: 4, r: 2 };
        let mut rng = Rng::new(9);
        let (x, w, a, b) =
            (randn(&mut rng, 6, 1.0), randn(&mut rng, 12, 1.0), randn(&mut rng, 6, 1.0), randn(&mut rng, 8, 1.0));
        let ones: Vec<f64> = dropout_mask_ref(1, 6, 0.0).unwrap().iter().map(|&v| v as f64).collect();
        assert_eq!(
            lora_fwd_ref(&x, &w, &a, &b, 0.5, &dims, None).unwrap(),
            lora_fwd_ref(&x, &w, &a, &b, 0.5, &dims, Some(&ones)).unwrap()
        );
    }

    #[test]
    fn dropout_mask_values_and_rate() {
        let n = 200_000;
        let p = 0.1f32;
        let mask = dropout_mask_ref(42, n, p).unwrap();
        let keep = 1.0 / (1.0 - p);
        assert!(mask.iter().all(|&v| v == 0.0 || v == keep));
        let dropped = mask.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped fraction {dropped}");
        // Element i depends on (seed, i) alone: a prefix is the same mask, another seed is not.
        assert_eq!(dropout_mask_ref(42, 100, p).unwrap(), mask[..100]);
        assert_ne!(dropout_mask_ref(43, 100, p).unwrap(), mask[..100]);
        assert!(dropout_mask_ref(7, 1000, 0.0).unwrap().iter().all(|&v| v == 1.0));
        for bad in [1.0, 1.5, -0.1, f32::NAN] {
            assert!(dropout_mask_ref(1, 10, bad).is_err(), "p = {bad}");
        }
    }

    #[test]
    fn dropout_uniform_is_uniform_on_24_bits() {
        let n = 100_000u64;
        let mut mean = 0.0f64;
        for i in 0..n {
            let u = dropout_uniform(3, i);
            assert!((0.0..1.0).contains(&u));
            // A multiple of 2^-24, so exactly representable.
            assert_eq!((u * (1u32 << 24) as f32).fract(), 0.0);
            mean += u as f64;
        }
        assert!((mean / n as f64 - 0.5).abs() < 0.005);
    }

    #[test]
    fn dropout_uniform_pinned_values() {
        // Pinned so that a change to the hash, which would silently break the GPU kernel's
        // regeneration of the mask, fails here. Computed independently (Python, 64-bit wrapping):
        // z = mix64(mix64(seed) + (i+1)·0x9E3779B97F4A7C15); u = (z >> 40) / 2^24.
        let cases: [(u64, u64, u32); 4] =
            [(0, 0, 14_819_496), (0, 1, 7_239_838), (42, 0, 10_001_215), (u64::MAX, 12_345, 14_984_029)];
        for (seed, i, top24) in cases {
            assert_eq!(dropout_uniform(seed, i), top24 as f32 / 16_777_216.0, "seed {seed} i {i}");
        }
    }

    #[test]
    fn init_a_bound_and_b_zero() {
        let (r, d_in) = (8, 3000);
        let a = lora_init_a(&mut Rng::new(5), r, d_in);
        assert_eq!(a.len(), r * d_in);
        let bound = 1.0 / (d_in as f32).sqrt();
        assert!(a.iter().all(|&v| v.abs() <= bound));
        // U(−c, c) has variance c²/3.
        let var = a.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / a.len() as f64;
        let expected = (bound as f64).powi(2) / 3.0;
        assert!((var / expected - 1.0).abs() < 0.05, "variance {var} vs {expected}");
        assert_eq!(lora_init_a(&mut Rng::new(5), r, d_in), a);
        assert!(lora_init_b(7, 3).iter().all(|&v| v == 0.0));
        assert_eq!(lora_init_b(7, 3).len(), 21);
    }

    #[test]
    fn bad_lengths_are_errors() {
        let dims = LoraDims { m: 2, k: 3, n: 4, r: 2 };
        let (x, w, a, b) = (vec![1.0f64; 6], vec![1.0; 12], vec![1.0; 6], vec![1.0; 8]);
        let mask = vec![1.0; 6];
        let err_what = |r: Result<LoraFwd<f64>>| match r {
            Err(Error::Shape { what, .. }) => what,
            other => panic!("expected a shape error, got {other:?}"),
        };
        assert_eq!(err_what(lora_fwd_ref(&x[1..], &w, &a, &b, 1.0, &dims, None)), "x");
        assert_eq!(err_what(lora_fwd_ref(&x, &w[1..], &a, &b, 1.0, &dims, None)), "w");
        assert_eq!(err_what(lora_fwd_ref(&x, &w, &a[1..], &b, 1.0, &dims, None)), "a");
        assert_eq!(err_what(lora_fwd_ref(&x, &w, &a, &b[1..], 1.0, &dims, None)), "b");
        assert_eq!(err_what(lora_fwd_ref(&x, &w, &a, &b, 1.0, &dims, Some(&mask[1..]))), "dropout_mask");
        assert!(lora_fwd_ref(&x, &w, &a, &b, 1.0, &LoraDims { r: 0, ..dims }, None).is_err());
        assert!(lora_fwd_ref(&x, &w, &a, &b, 1.0, &LoraDims { m: usize::MAX, ..dims }, None).is_err());

        let f = lora_fwd_ref(&x, &w, &a, &b, 1.0, &dims, Some(&mask)).unwrap();
        let dy = vec![1.0; 8];
        assert!(lora_bwd_ref(&x, &w, &a, &b, 1.0, &dims, Some(&mask), &f.u, &dy).is_ok());
        assert!(lora_bwd_ref(&x, &w, &a, &b, 1.0, &dims, Some(&mask), &f.u[1..], &dy).is_err());
        assert!(lora_bwd_ref(&x, &w, &a, &b, 1.0, &dims, Some(&mask), &f.u, &dy[1..]).is_err());
        assert!(lora_bwd_ref(&x, &w, &a, &b, 1.0, &dims, Some(&mask[1..]), &f.u, &dy).is_err());
        assert!(lora_bwd_ref(&x[1..], &w, &a, &b, 1.0, &dims, None, &f.u, &dy).is_err());
        assert!(lora_bwd_ref(&x, &w, &a, &b[1..], 1.0, &dims, None, &f.u, &dy).is_err());
    }
}
