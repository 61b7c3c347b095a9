//! RMSNorm as in Hugging Face's `LlamaRMSNorm`: y = w · (x · rstd), rstd = 1 / sqrt(mean(x²) + eps).

use crate::error::{check_len, checked_product, invalid};
use crate::{Real, Result};
use alloc::vec::Vec;

/// Forward RMSNorm over the last dimension.
///
/// x: (M, C)
/// w: (C)
/// returns (y: (M, C), rstd: (M)); `rstd` is saved for the backward so it need not be recomputed
pub fn rmsnorm_fwd_ref<T: Real>(x: &[T], w: &[T], m: usize, c: usize, eps: T) -> Result<(Vec<T>, Vec<T>)> {
    const OP: &str = "rmsnorm_fwd_ref";
    // A zero-width row has no mean; refusing it beats returning NaN rows.
    if c == 0 {
        return Err(invalid(OP, "c", "the normalised dimension must be non-zero"));
    }
    check_len(OP, "x", x.len(), checked_product(&[m, c])?)?;
    check_len(OP, "w", w.len(), c)?;
    let mut y = Vec::with_capacity(x.len());
    let mut rstd = Vec::with_capacity(m);
    let inv_c = T::ONE / T::from_usize(c);
    for row in x.chunks_exact(c) {
        let ss: T = row.iter().map(|&v| v * v).sum();
        let r = T::ONE / (ss * inv_c + eps).sqrt();
        // HF normalises first and scales by the weight last; keep that order for f32 agreement.
        y.extend(row.iter().zip(w).map(|(&v, &wi)| wi * (v * r)));
        rstd.push(r);
    }
    Ok((y, rstd))
}

/// Backward RMSNorm.
///
/// x: (M, C)
/// w: (C)
/// rstd: (M), as returned by the forward
/// dy: (M, C)
/// returns (dx: (M, C), dw: (C))
///
/// With x̂ = x · rstd and g = dy · w: dx = rstd · (g − x̂ · mean(g · x̂)), dw = Σ_rows dy · x̂.
pub fn rmsnorm_bwd_ref<T: Real>(
    x: &[T],
    w: &[T],
    rstd: &[T],
    dy: &[T],
    m: usize,
    c: usize,
) -> Result<(Vec<T>, Vec<T>)> {
    const OP: &str = "rmsnorm_bwd_ref";
    if c == 0 {
        return Err(invalid(OP, "c", "the normalised dimension must be non-zero"));
    }
    let mc = checked_product(&[m, c])?;
    check_len(OP, "x", x.len(), mc)?;
    check_len(OP, "w", w.len(), c)?;
    check_len(OP, "rstd", rstd.len(), m)?;
    check_len(OP, "dy", dy.len(), mc)?;
    let mut dx = Vec::with_capacity(mc);
    let mut dw = alloc::vec![T::ZERO; c];
    let inv_c = T::ONE / T::from_usize(c);
    for ((xr, dyr), &r) in x.chunks_exact(c).zip(dy.chunks_exact(c)).zip(rstd) {
        let mut dot = T::ZERO;
        for j in 0..c {
            let xh = xr[j] * r;
            dot += dyr[j] * w[j] * xh;
            dw[j] += dyr[j] * xh;
        }
        let mean = dot * inv_c;
        dx.extend((0..c).map(|j| r * (dyr[j] * w[j] - xr[j] * r * mean)));
    }
    Ok((dx, dw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, dot, numeric_grad, randn};

    #[test]
    fn hand_computed_forward() {
        // Row 0: x = [1, 3], mean(x²) = (1 + 9)/2 = 5, eps = 4 -> rstd = 1/sqrt(9) = 1/3,
        //        x̂ = [1/3, 1], w = [3, -2] -> y = [1, -2].
        // Row 1: x = [0, 0] -> rstd = 1/sqrt(0 + 4) = 1/2, y = [0, 0].
        let (y, rstd) = rmsnorm_fwd_ref(&[1.0, 3.0, 0.0, 0.0], &[3.0, -2.0], 2, 2, 4.0f64).unwrap();
        assert_close("y", &y, &[1.0, -2.0, 0.0, 0.0], 1e-15);
        assert_close("rstd", &rstd, &[1.0 / 3.0, 0.5], 1e-15);
        let (y32, _) = rmsnorm_fwd_ref(&[1.0f32, 3.0], &[3.0, -2.0], 1, 2, 4.0).unwrap();
        assert!((y32[0] - 1.0).abs() < 1e-6 && (y32[1] + 2.0).abs() < 1e-6, "{y32:?}");
    }

    #[test]
    fn backward_matches_finite_difference() {
        let mut rng = Rng::new(31);
        for (m, c) in [(1, 1), (1, 7), (3, 5), (5, 13), (7, 3)] {
            let x = randn(&mut rng, m * c, 1.0);
            let w = randn(&mut rng, c, 1.0);
            let r = randn(&mut rng, m * c, 1.0);
            let eps = 1e-5;
            let (_, rstd) = rmsnorm_fwd_ref(&x, &w, m, c, eps).unwrap();
            let (dx, dw) = rmsnorm_bwd_ref(&x, &w, &rstd, &r, m, c).unwrap();
            let nx = numeric_grad(&x, 1e-6, |x| dot(&rmsnorm_fwd_ref(x, &w, m, c, eps).unwrap().0, &r));
            let nw = numeric_grad(&w, 1e-6, |w| dot(&rmsnorm_fwd_ref(&x, w, m, c, eps).unwrap().0, &r));
            assert_close(&alloc::format!("dx {m}x{c}"), &dx, &nx, 1e-6);
            assert_close(&alloc::format!("dw {m}x{c}"), &dw, &nw, 1e-6);
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        let v = [1.0f64; 6];
        assert!(matches!(rmsnorm_fwd_ref(&v[..5], &v[..3], 2, 3, 1e-5), Err(Error::Shape { .. })));
        assert!(matches!(rmsnorm_fwd_ref(&v, &v[..2], 2, 3, 1e-5), Err(Error::Shape { .. })));
        assert!(matches!(rmsnorm_fwd_ref(&v[..0], &v[..0], 2, 0, 1e-5), Err(Error::Invalid { .. })));
        assert!(matches!(rmsnorm_bwd_ref(&v, &v[..3], &v[..1], &v, 2, 3), Err(Error::Shape { .. })));
        assert!(matches!(rmsnorm_bwd_ref(&v, &v[..3], &v[..2], &v[..5], 2, 3), Err(Error::Shape { .. })));
        assert!(matches!(rmsnorm_bwd_ref(&v, &v[..4], &v[..2], &v, 2, 3), Err(Error::Shape { .. })));
    }
}
