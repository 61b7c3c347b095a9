//! AdamW and gradient-norm clipping, operation for operation as PyTorch computes them.
//!
//! Golden tests compare gristmill's training against PEFT + `torch.optim.AdamW` step by step, so
//! the reference follows torch's single-tensor path (`foreach=False`, `amsgrad=False`,
//! `maximize=False`) in the order it rounds things, not just its formula:
//!
//! ```text
//! p ← p·(1 − lr·wd)                       decoupled weight decay, before the moments
//! m ← lerp(m, g, 1 − β1)                  = m + (1−β1)(g − m) for 1−β1 < 0.5
//! v ← β2·v + (1−β2)·g²
//! bc1 = 1 − β1^t,  bc2 = 1 − β2^t
//! p ← p − (lr / bc1) · m / (√v / √bc2 + eps)
//! ```
//!
//! torch evaluates the scalar factors (`1 − lr·wd`, `1 − β1`, `lr / bc1`, `√bc2`) as Python
//! doubles and rounds each once to the tensor's dtype; the reference does the same in f64.

use crate::error::{check_len, invalid};
use crate::{Real, Result};
use alloc::format;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f32,
    /// Decay of the first moment.
    pub beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// Added to √v̂, outside the square root as torch does.
    pub eps: f32,
    /// Decoupled weight decay, multiplied by lr.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults.
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

impl AdamWConfig {
    /// The ranges torch.optim.AdamW's constructor accepts, with NaN refused too.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "AdamWConfig";
        let non_negative = [("lr", self.lr), ("eps", self.eps), ("weight_decay", self.weight_decay)];
        for (what, x) in non_negative {
            if !(x >= 0.0 && x.is_finite()) {
                return Err(invalid(OP, what, format!("must be finite and ≥ 0, got {x}")));
            }
        }
        for (what, x) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&x) {
                return Err(invalid(OP, what, format!("must be in [0, 1), got {x}")));
            }
        }
        Ok(())
    }
}

/// One AdamW step, updating `p`, `m` and `v` in place. `step` counts from 1 (the first update
/// uses bias corrections 1 − β^1).
///
/// p: (n) parameters; g: (n) gradient; m: (n) first moment; v: (n) second moment.
pub fn adamw_step_ref<T: Real>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    step: u64,
    cfg: &AdamWConfig,
) -> Result<()> {
    const OP: &str = "adamw_step_ref";
    cfg.validate()?;
    if step == 0 {
        return Err(invalid(OP, "step", "steps count from 1: step 0 would divide by a zero bias correction"));
    }
    check_len(OP, "g", g.len(), p.len())?;
    check_len(OP, "m", m.len(), p.len())?;
    check_len(OP, "v", v.len(), p.len())?;

    let (lr, beta1, beta2) = (cfg.lr as f64, cfg.beta1 as f64, cfg.beta2 as f64);
    let t = step as f64;
    let decay = T::from_f64(1.0 - lr * cfg.weight_decay as f64);
    let w1 = T::from_f64(1.0 - beta1);
    let b2 = T::from_f64(beta2);
    let w2 = T::from_f64(1.0 - beta2);
    let bc1 = 1.0 - libm::pow(beta1, t);
    let bc2 = 1.0 - libm::pow(beta2, t);
    let neg_step_size = T::from_f64(-(lr / bc1));
    let bc2_sqrt = T::from_f64(libm::sqrt(bc2));
    let eps = T::from_f32(cfg.eps);
    // torch's lerp switches formula at |weight| = 0.5 so that the result is exact at both ends;
    // for the usual β1 = 0.9 (weight 0.1) only the first branch runs.
    let lerp_from_start = w1.abs() < T::from_f64(0.5);

    for i in 0..p.len() {
        p[i] *= decay;
        let gi = g[i];
        m[i] = if lerp_from_start { m[i] + w1 * (gi - m[i]) } else { gi - (gi - m[i]) * (T::ONE - w1) };
        v[i] = v[i] * b2 + w2 * gi * gi;
        let denom = v[i].sqrt() / bc2_sqrt + eps;
        p[i] += neg_step_size * (m[i] / denom);
    }
    Ok(())
}

/// Scales all gradients together so that their joint L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` does; returns the norm before clipping.
///
/// grads: one (n_i) slice per parameter tensor. The total is `√Σ_i ‖g_i‖²`, taken, as torch does,
/// as the norm of the per-tensor norms; the factor is `max_norm / (total + 1e-6)`, applied only
/// when below 1. A non-finite total is returned unchanged and nothing is scaled: torch would
/// multiply by NaN (or by 0 for an infinite norm) and wipe the gradients, whereas the caller
/// needs them intact to skip the step and report the overflow.
pub fn clip_grad_norm_ref<T: Real>(grads: &mut [&mut [T]], max_norm: T) -> Result<T> {
    if !(max_norm > T::ZERO && max_norm.is_finite()) {
        return Err(invalid("clip_grad_norm_ref", "max_norm", format!("must be finite and > 0, got {max_norm}")));
    }
    let total = grads
        .iter()
        .map(|g| {
            let n = g.iter().map(|&x| x * x).sum::<T>().sqrt();
            n * n
        })
        .sum::<T>()
        .sqrt();
    if !total.is_finite() {
        return Ok(total);
    }
    let coef = max_norm / (total + T::from_f64(1e-6));
    if coef < T::ONE {
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x *= coef;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::assert_close;
    use alloc::vec::Vec;

    #[test]
    fn default_is_torch() {
        let c = AdamWConfig::default();
        assert_eq!((c.lr, c.beta1, c.beta2, c.eps, c.weight_decay), (1e-3, 0.9, 0.999, 1e-8, 0.01));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn one_and_two_steps_by_hand() {
        // Default config: lr = 1e-3, β1 = 0.9, β2 = 0.999, eps = 1e-8, wd = 0.01, so the decay
        // factor is 1 − 1e-3·0.01 = 1 − 1e-5. The config holds f32s (0.001f32 = 0.001 + 4.7e-11
        // and so on), which moves p by ~1e-10: hence the 1e-9 tolerance. The moments move more,
        // ~2.4e-7 relative for m (1 − 0.9f32 = 0.100000024) and 1.3e-5 for v (1 − 0.999f32 =
        // 0.000999987), but the bias corrections are computed from the same rounded β and cancel
        // it in p; m and v are checked to 1e-7 absolute, above that and well below their sizes.
        let cfg = AdamWConfig::default();
        let mut p = [1.0f64, -2.0, 0.5];
        let (mut m, mut v) = ([0.0; 3], [0.0; 3]);

        // Step 1, g = [0.5, −1, 0]; bc1 = 0.1, bc2 = 0.001, step_size = 1e-3 / 0.1 = 0.01.
        // p0: 1·(1 − 1e-5) = 0.99999; m = 0.1·0.5 = 0.05; v = 0.001·0.25 = 0.00025;
        //     denom = √0.00025 / √0.001 + 1e-8 = 0.5 + 1e-8; p = 0.99999 − 0.01·0.05/0.50000001
        //     = 0.99999 − 0.00099999998 = 0.99899000002.
        // p1: −2·(1 − 1e-5) = −1.99998; m = −0.1; v = 0.001; denom = 1 + 1e-8;
        //     p = −1.99998 + 0.01·0.1/1.00000001 = −1.99998 + 0.00099999999 = −1.99898000001.
        // p2: zero gradient, so m = v = 0, the update is 0/eps = 0 and only the decay acts:
        //     0.5·(1 − 1e-5) = 0.499995.
        adamw_step_ref(&mut p, &[0.5, -1.0, 0.0], &mut m, &mut v, 1, &cfg).unwrap();
        assert_close("p after 1", &p, &[0.99899000002, -1.99898000001, 0.499995], 1e-9);
        assert_close("m after 1", &m, &[0.05, -0.1, 0.0], 1e-7);
        assert_close("v after 1", &v, &[0.00025, 0.001, 0.0], 1e-7);

        // Step 2, g = [−0.25, 0.5, 0]; bc1 = 1 − 0.81 = 0.19, bc2 = 1 − 0.998001 = 0.001999,
        // step_size = 1e-3 / 0.19 = 0.0052631578947.
        // p0: 0.99899000002·(1 − 1e-5) = 0.99898001012; m = 0.9·0.05 + 0.1·(−0.25) = 0.02;
        //     v = 0.999·0.00025 + 0.001·0.0625 = 0.00031225;
        //     denom = √(0.00031225 / 0.001999) + 1e-8 = 0.3952253907;
        //     p = 0.99898001012 − 0.0052631578947·0.02/0.3952253907 = 0.99898001012 − 0.00026633703
        //     = 0.99871367309.
        // p1: −1.99898000001·(1 − 1e-5) = −1.99896001021; m = 0.9·(−0.1) + 0.1·0.5 = −0.04;
        //     v = 0.999·0.001 + 0.001·0.25 = 0.001249; denom = √(0.001249 / 0.001999) + 1e-8
        //     = 0.7904507714; p = −1.99896001021 + 0.0052631578947·0.04/0.7904507714
        //     = −1.99896001021 + 0.00026633704 = −1.99869367317.
        // p2: 0.499995·(1 − 1e-5) = 0.49999000005.
        adamw_step_ref(&mut p, &[-0.25, 0.5, 0.0], &mut m, &mut v, 2, &cfg).unwrap();
        assert_close("m after 2", &m, &[0.02, -0.04, 0.0], 1e-7);
        assert_close("v after 2", &v, &[0.00031225, 0.001249, 0.0], 1e-7);
        assert_close("p after 2", &p, &[0.99871367309, -1.99869367317, 0.49999000005], 1e-9);

        // The same steps in f32 land within f32 rounding of the f64 run.
        let mut p32 = [1.0f32, -2.0, 0.5];
        let (mut m32, mut v32) = ([0.0f32; 3], [0.0f32; 3]);
        adamw_step_ref(&mut p32, &[0.5, -1.0, 0.0], &mut m32, &mut v32, 1, &cfg).unwrap();
        adamw_step_ref(&mut p32, &[-0.25, 0.5, 0.0], &mut m32, &mut v32, 2, &cfg).unwrap();
        let p32: Vec<f64> = p32.iter().map(|&x| x as f64).collect();
        assert_close("p f32", &p32, &p, 1e-6);
    }

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        // At t = 1 the bias corrections undo the moments exactly: m̂ = g, v̂ = g², so without
        // decay the update is lr·g/(|g| + eps) ≈ lr·sign(g) whatever |g| is.
        // Also β1 = 0.25 takes torch's other lerp branch (weight 0.75 ≥ 0.5): m = g − g·0.25 =
        // 0.75·g. All constants are exact in f32, so the result is exact up to f64 rounding.
        let cfg = AdamWConfig { lr: 0.5, beta1: 0.25, beta2: 0.5, eps: 0.0, weight_decay: 0.0 };
        let mut p = [0.0f64, 0.0];
        let (mut m, mut v) = ([0.0; 2], [0.0; 2]);
        adamw_step_ref(&mut p, &[1e-3, -40.0], &mut m, &mut v, 1, &cfg).unwrap();
        assert_close("p", &p, &[-0.5, 0.5], 1e-12);
        assert_close("m", &m, &[0.75e-3, -30.0], 1e-12);
    }

    #[test]
    fn adamw_errors() {
        let cfg = AdamWConfig::default();
        let (mut p, mut m, mut v) = ([1.0f32; 3], [0.0f32; 3], [0.0f32; 3]);
        let g = [0.1f32; 3];
        assert!(adamw_step_ref(&mut p, &g, &mut m, &mut v, 0, &cfg).is_err());
        assert!(adamw_step_ref(&mut p, &g[1..], &mut m, &mut v, 1, &cfg).is_err());
        assert!(adamw_step_ref(&mut p, &g, &mut m[1..], &mut v, 1, &cfg).is_err());
        assert!(adamw_step_ref(&mut p, &g, &mut m, &mut v[..2], 1, &cfg).is_err());
        for bad in [
            AdamWConfig { lr: -1.0, ..cfg },
            AdamWConfig { lr: f32::NAN, ..cfg },
            AdamWConfig { beta1: 1.0, ..cfg },
            AdamWConfig { beta2: -0.1, ..cfg },
            AdamWConfig { eps: -1e-8, ..cfg },
            AdamWConfig { weight_decay: f32::INFINITY, ..cfg },
        ] {
            assert!(adamw_step_ref(&mut p, &g, &mut m, &mut v, 1, &bad).is_err(), "{bad:?}");
        }
        // Nothing was touched by the refused calls.
        assert_eq!((p, m, v), ([1.0; 3], [0.0; 3], [0.0; 3]));
    }

    #[test]
    fn clip_below_threshold_leaves_grads() {
        // ‖[3]‖ = 3, ‖[4, 0]‖ = 4, total = √(9 + 16) = 5; coef = 10 / 5.000001 > 1: no change.
        let (mut a, mut b) = ([3.0f64], [4.0, 0.0]);
        let total = clip_grad_norm_ref(&mut [&mut a[..], &mut b[..]], 10.0).unwrap();
        assert_eq!(total, 5.0);
        assert_eq!((a, b), ([3.0], [4.0, 0.0]));
    }

    #[test]
    fn clip_above_threshold_scales() {
        // Total 5 as above, max_norm 1: coef = 1 / (5 + 1e-6) = 0.199999960000008, so the
        // gradients become [0.59999988, 0.79999984, 0] and their norm is just under 1.
        let (mut a, mut b) = ([3.0f64], [4.0, 0.0]);
        let total = clip_grad_norm_ref(&mut [&mut a[..], &mut b[..]], 1.0).unwrap();
        assert_eq!(total, 5.0);
        let coef = 1.0 / (5.0 + 1e-6);
        assert_close("a", &a, &[3.0 * coef], 1e-15);
        assert_close("b", &b, &[4.0 * coef, 0.0], 1e-15);
        assert_close("coef", &[coef], &[0.199_999_960_000_008], 1e-15);
    }

    #[test]
    fn clip_non_finite_is_reported_not_applied() {
        let (mut a, mut b) = ([f32::INFINITY, 1.0], [2.0f32]);
        let total = clip_grad_norm_ref(&mut [&mut a[..], &mut b[..]], 1.0).unwrap();
        assert_eq!(total, f32::INFINITY);
        assert_eq!((a, b), ([f32::INFINITY, 1.0], [2.0]));

        let mut c = [f32::NAN, 3.0];
        assert!(clip_grad_norm_ref(&mut [&mut c[..]], 1.0).unwrap().is_nan());
        assert_eq!(c[1], 3.0);
    }

    #[test]
    fn clip_errors_and_empty() {
        let mut a = [1.0f64];
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(clip_grad_norm_ref(&mut [&mut a[..]], bad).is_err(), "max_norm {bad}");
        }
        assert_eq!(clip_grad_norm_ref::<f64>(&mut [], 1.0).unwrap(), 0.0);
    }
}
