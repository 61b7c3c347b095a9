//! The SwiGLU gate of the Llama MLP: h = silu(gate) · up, with silu(g) = g · sigmoid(g).
//!
//! Elementwise, so shapes only need to agree; they are (M, F) in the model (F: the intermediate
//! size).

use crate::error::check_len;
use crate::{Real, Result};
use alloc::vec::Vec;

/// h = silu(gate) · up.
///
/// gate: (M, F)
/// up: (M, F)
/// returns h: (M, F)
pub fn swiglu_fwd_ref<T: Real>(gate: &[T], up: &[T]) -> Result<Vec<T>> {
    check_len("swiglu_fwd_ref", "up", up.len(), gate.len())?;
    // Multiplied in the order torch evaluates `act_fn(gate) * up` with silu = g · sigmoid(g).
    Ok(gate.iter().zip(up).map(|(&g, &u)| g * g.sigmoid() * u).collect())
}

/// Backward SwiGLU.
///
/// gate: (M, F)
/// up: (M, F)
/// dh: (M, F)
/// returns (dgate: (M, F), dup: (M, F))
///
/// dup = dh · silu(g); dgate = dh · up · silu'(g) with silu'(g) = σ(g) · (1 + g · (1 − σ(g))).
pub fn swiglu_bwd_ref<T: Real>(gate: &[T], up: &[T], dh: &[T]) -> Result<(Vec<T>, Vec<T>)> {
    const OP: &str = "swiglu_bwd_ref";
    check_len(OP, "up", up.len(), gate.len())?;
    check_len(OP, "dh", dh.len(), gate.len())?;
    let mut dgate = Vec::with_capacity(gate.len());
    let mut dup = Vec::with_capacity(gate.len());
    for ((&g, &u), &d) in gate.iter().zip(up).zip(dh) {
        let s = g.sigmoid();
        dup.push(d * g * s);
        dgate.push(d * u * s * (T::ONE + g * (T::ONE - s)));
    }
    Ok((dgate, dup))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, dot, numeric_grad, randn};

    #[test]
    fn hand_computed_forward() {
        // g = 0: silu = 0 whatever up is.
        // g = ln 3: σ = 3/(3 + 1) = 3/4, silu = 0.75 ln 3; up 2 -> 1.5 ln 3 = 1.6479184330021646.
        // g = −ln 3: σ = 1/4, silu = −0.25 ln 3; up −4 -> ln 3 = 1.0986122886681098.
        let l3 = libm::log(3.0);
        let h = swiglu_fwd_ref(&[0.0, l3, -l3], &[5.0, 2.0, -4.0]).unwrap();
        assert_close("h", &h, &[0.0, 1.6479184330021646, 1.0986122886681098], 1e-15);
        // Large |g| must not overflow: silu(−100) ≈ −100·e^−100 ≈ 0, silu(100) = 100.
        let h32 = swiglu_fwd_ref(&[-100.0f32, 100.0], &[1.0, 1.0]).unwrap();
        assert!(h32[0].abs() < 1e-30 && (h32[1] - 100.0).abs() < 1e-4, "{h32:?}");
    }

    #[test]
    fn backward_matches_finite_difference() {
        let mut rng = Rng::new(51);
        for n in [1, 3, 7, 13, 35] {
            // Scale 3 reaches well into both tails of the sigmoid.
            let g = randn(&mut rng, n, 3.0);
            let u = randn(&mut rng, n, 1.0);
            let w = randn(&mut rng, n, 1.0);
            let (dg, du) = swiglu_bwd_ref(&g, &u, &w).unwrap();
            let ng = numeric_grad(&g, 1e-6, |g| dot(&swiglu_fwd_ref(g, &u).unwrap(), &w));
            let nu = numeric_grad(&u, 1e-6, |u| dot(&swiglu_fwd_ref(&g, u).unwrap(), &w));
            assert_close("dgate", &dg, &ng, 1e-6);
            assert_close("dup", &du, &nu, 1e-6);
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        let v = [0.0f64; 5];
        assert!(matches!(swiglu_fwd_ref(&v, &v[..4]), Err(Error::Shape { .. })));
        assert!(matches!(swiglu_bwd_ref(&v, &v[..4], &v), Err(Error::Shape { .. })));
        assert!(matches!(swiglu_bwd_ref(&v, &v, &v[..3]), Err(Error::Shape { .. })));
    }
}
