//! Test helpers: random data and finite-difference gradient checks in f64.

use crate::rng::Rng;
use alloc::vec::Vec;

/// `n` standard-normal values scaled by `scale`.
pub fn randn(rng: &mut Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

/// Central finite difference of a scalar function at `x`, one coordinate at a time.
pub fn numeric_grad(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let fp = f(&xp);
            xp[i] = orig - h;
            let fm = f(&xp);
            xp[i] = orig;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// `<a, b>`: the scalar objective a backward pass is checked through (L = <y, w> so dL/dy = w).
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Asserts `analytic` matches `numeric` elementwise to `tol`, relative to max(1, |numeric|).
#[track_caller]
pub fn assert_close(what: &str, analytic: &[f64], numeric: &[f64], tol: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0.0f64);
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (a - n).abs() / n.abs().max(1.0);
        assert!(err.is_finite(), "{what}[{i}]: non-finite ({a} vs {n})");
        if err > worst.1 {
            worst = (i, err);
        }
    }
    let (i, e) = worst;
    assert!(e <= tol, "{what}[{i}]: analytic {} vs expected {} (rel err {e:e} > {tol:e})", analytic[i], numeric[i]);
}
