//! Small dense symmetric algebra for K-FAC: the r × r factors of GRIT (r = LoRA rank, typically 16).
//!
//! Two consumers:
//! - the inversion step (grit.md §2): [`kfac_damped_inverses`] symmetrizes Σa and Σg, adds λ·I and
//!   inverts both through [`cholesky`], climbing the [`DAMPING_LADDER`] until both factorizations
//!   succeed;
//! - the reprojection step (grit.md §5): [`eigh_jacobi`] eigendecomposes Σa (and Σg),
//!   [`rank_for_energy`] picks k from the spectrum and [`top_k_projector`] builds P = V_k V_kᵀ.
//!
//! All matrices are row-major `n × n` slices with `n` passed explicitly. The code is written as the
//! reference for batched GPU kernels (one CTA per small matrix), so every algorithm is the plain
//! textbook one with a fixed loop order: a kernel that follows the same order reproduces these
//! results up to the rounding of its fused multiply-adds.

use crate::error::{Error, Result, check_len, checked_product, invalid};
use crate::real::Real;
use alloc::vec;
use alloc::vec::Vec;

/// Multipliers of the damping λ tried in turn by [`kfac_damped_inverses`] (grit.md §2): the
/// configured λ first, then ×3, ×10, ×30, ×100, ×300.
pub const DAMPING_LADDER: [f64; 6] = [1.0, 3.0, 10.0, 30.0, 100.0, 300.0];

/// The smallest damping [`kfac_damped_inverses`] uses, whatever the configuration asks (grit.md §2).
pub const MIN_DAMPING: f64 = 1e-6;

/// Default relative tolerance of [`eigh_jacobi`] in f32: stop once the off-diagonal Frobenius norm
/// is at most 1e-6·‖A‖_F. That is about 8 f32 ulps of the norm: a cyclic Jacobi sweep only mixes
/// off-diagonal entries among themselves, so the residual keeps shrinking quadratically well below
/// machine precision and this level is reached without stalling, while the eigenvalues are then
/// accurate to ~1e-6·‖A‖_F, far finer than a 0.99-energy rank decision needs.
pub const JACOBI_TOL_F32: f32 = 1e-6;

/// Default relative tolerance of [`eigh_jacobi`] in f64 (tests and host-side checks).
pub const JACOBI_TOL_F64: f64 = 1e-14;

/// Default sweep budget of [`eigh_jacobi`]. Cyclic Jacobi converges quadratically once the
/// off-diagonal part is small; 16 × 16 and 17 × 17 matrices need 6 to 10 sweeps in f64. 30 leaves
/// a wide margin and still bounds the work of a GPU kernel that runs a fixed number of sweeps.
pub const JACOBI_MAX_SWEEPS: usize = 30;

/// Traces at or below this are treated as "no signal" by [`rank_for_energy`] (grit.md §5).
const RANK_MIN_TRACE: f64 = 1e-6;

/// Checks that `a` holds an `n × n` matrix.
fn check_square<T>(op: &'static str, what: &'static str, a: &[T], n: usize) -> Result<()> {
    let nn = checked_product(&[n, n])?;
    check_len(op, what, a.len(), nn)
}

/// A ← (A + Aᵀ)/2, in place. `a`: (n, n).
///
/// Accumulated statistics are symmetric only up to rounding; the factorizations below read one
/// triangle, so symmetrizing first makes them see the average of both.
pub fn symmetrize<T: Real>(a: &mut [T], n: usize) -> Result<()> {
    check_square("symmetrize", "a", a, n)?;
    let half = T::from_f64(0.5);
    for i in 0..n {
        for j in (i + 1)..n {
            let m = (a[i * n + j] + a[j * n + i]) * half;
            a[i * n + j] = m;
            a[j * n + i] = m;
        }
    }
    Ok(())
}

/// A ← A + λ·I, in place. `a`: (n, n).
pub fn add_diagonal<T: Real>(a: &mut [T], n: usize, lambda: T) -> Result<()> {
    check_square("add_diagonal", "a", a, n)?;
    for i in 0..n {
        a[i * n + i] += lambda;
    }
    Ok(())
}

/// Cholesky factor of a symmetric positive definite matrix. `a`: (n, n) → L: (n, n), lower
/// triangular with a positive diagonal and zeros above it, A = L Lᵀ.
///
/// Only the lower triangle of `a` (diagonal included) is read. Fails with
/// [`Error::NotPositiveDefinite`] at the first column `pivot` whose pivot (the diagonal entry after
/// eliminating the previous columns; `value` is it) is ≤ 0 or not finite. A NaN or infinity
/// anywhere in the lower triangle reaches some later pivot, so it is reported too.
pub fn cholesky<T: Real>(a: &[T], n: usize) -> Result<Vec<T>> {
    check_square("cholesky", "a", a, n)?;
    let mut l = vec![T::ZERO; n * n];
    // Column by column (left-looking): column j needs only columns < j of L, already final.
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= l[j * n + k] * l[j * n + k];
        }
        // Written as a positive test so that a NaN pivot fails it too.
        let usable = d > T::ZERO && d.is_finite();
        if !usable {
            return Err(Error::NotPositiveDefinite { pivot: j, value: d.to_f64() });
        }
        let ljj = d.sqrt();
        l[j * n + j] = ljj;
        for i in (j + 1)..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            l[i * n + j] = s / ljj;
        }
    }
    Ok(l)
}

/// Inverse of a symmetric positive definite matrix through its Cholesky factor. `a`: (n, n) →
/// A⁻¹: (n, n), exactly symmetric (each off-diagonal pair is computed once and mirrored).
///
/// L⁻¹ is formed by forward substitution and A⁻¹ = L⁻ᵀ L⁻¹. Reads only the lower triangle of `a`.
/// Errors as [`cholesky`]; in addition, when every pivot is positive but one is so small that the
/// inverse overflows (possible in f32 for a numerically singular matrix), the result is rejected
/// as [`Error::NotPositiveDefinite`] at the smallest pivot, so that callers such as the damping
/// ladder treat it as the failure it is instead of passing infinities on.
pub fn spd_inverse<T: Real>(a: &[T], n: usize) -> Result<Vec<T>> {
    let l = cholesky(a, n)?;

    // L⁻¹ is lower triangular too; column j of it solves L x = e_j, whose first j entries are 0.
    let mut li = vec![T::ZERO; n * n];
    for j in 0..n {
        li[j * n + j] = T::ONE / l[j * n + j];
        for i in (j + 1)..n {
            let mut s = T::ZERO;
            for k in j..i {
                s += l[i * n + k] * li[k * n + j];
            }
            li[i * n + j] = -s / l[i * n + i];
        }
    }

    // (L⁻ᵀ L⁻¹)[i][j] = Σ_k L⁻¹[k][i] L⁻¹[k][j], over k ≥ max(i, j) where both can be non-zero.
    let mut inv = vec![T::ZERO; n * n];
    let mut finite = true;
    for i in 0..n {
        for j in i..n {
            let mut s = T::ZERO;
            for k in j..n {
                s += li[k * n + i] * li[k * n + j];
            }
            finite &= s.is_finite();
            inv[i * n + j] = s;
            inv[j * n + i] = s;
        }
    }

    if !finite {
        let mut worst = 0;
        for j in 1..n {
            if l[j * n + j] < l[worst * n + worst] {
                worst = j;
            }
        }
        let p = l[worst * n + worst];
        return Err(Error::NotPositiveDefinite { pivot: worst, value: (p * p).to_f64() });
    }
    Ok(inv)
}

/// The damped inverses of one module's K-FAC factors and the damping that produced them.
#[derive(Debug, Clone, PartialEq)]
pub struct DampedInverses<T> {
    /// (Σa + λ·I)⁻¹: (r, r), symmetric.
    pub inv_a: Vec<T>,
    /// (Σg + λ·I)⁻¹: (r, r), symmetric.
    pub inv_g: Vec<T>,
    /// The λ that worked for both: the requested damping (floored at [`MIN_DAMPING`]) times the
    /// first multiplier of [`DAMPING_LADDER`] for which both factorizations succeeded.
    pub lambda: T,
}

/// GRIT's inversion of one module's factors (grit.md §2). `sigma_a`, `sigma_g`: (r, r).
///
/// Symmetrizes copies of both, floors `lambda` at [`MIN_DAMPING`], then for each multiplier m of
/// [`DAMPING_LADDER`] tries to invert Σa + λ·m·I and Σg + λ·m·I by Cholesky; the first m for which
/// both succeed wins. Both factors share one λ because the preconditioned gradient's scale depends
/// on it: damping them differently would tilt the A and B updates against each other.
///
/// Fails with the last [`Error::NotPositiveDefinite`] when no rung works (a factor with an
/// eigenvalue below −300·λ, or non-finite entries), and with [`Error::Invalid`] for a non-finite
/// `lambda`.
pub fn kfac_damped_inverses<T: Real>(sigma_a: &[T], sigma_g: &[T], r: usize, lambda: T) -> Result<DampedInverses<T>> {
    const OP: &str = "kfac_damped_inverses";
    check_square(OP, "sigma_a", sigma_a, r)?;
    check_square(OP, "sigma_g", sigma_g, r)?;
    if !lambda.is_finite() {
        return Err(invalid(OP, "lambda", alloc::format!("must be finite, got {lambda}")));
    }
    let mut sa = sigma_a.to_vec();
    let mut sg = sigma_g.to_vec();
    symmetrize(&mut sa, r)?;
    symmetrize(&mut sg, r)?;
    let base = lambda.max(T::from_f64(MIN_DAMPING));

    let mut last = None;
    let mut damped = vec![T::ZERO; r * r];
    for &mult in DAMPING_LADDER.iter() {
        let lam = base * T::from_f64(mult);
        let attempt = |src: &[T], dst: &mut Vec<T>| -> Result<Vec<T>> {
            dst.copy_from_slice(src);
            add_diagonal(dst, r, lam)?;
            spd_inverse(dst, r)
        };
        // Σg is not tried when Σa already failed at this λ: the rung is lost either way.
        let result = attempt(&sa, &mut damped).and_then(|inv_a| {
            let inv_g = attempt(&sg, &mut damped)?;
            Ok((inv_a, inv_g))
        });
        match result {
            Ok((inv_a, inv_g)) => return Ok(DampedInverses { inv_a, inv_g, lambda: lam }),
            Err(e @ Error::NotPositiveDefinite { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    // The ladder is non-empty, so `last` is set; the fallback only keeps this free of unwraps.
    Err(last.unwrap_or(Error::NotPositiveDefinite { pivot: 0, value: f64::NAN }))
}

/// Eigendecomposition of a symmetric matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Eigh<T> {
    /// Eigenvalues: (n), in descending order.
    pub values: Vec<T>,
    /// Eigenvectors: (n, n) row-major, column j (entries `vectors[i * n + j]`) is the unit
    /// eigenvector of `values[j]`; the columns are orthonormal. Signs are whatever the rotations
    /// produce (deterministic, but not normalized).
    pub vectors: Vec<T>,
    /// Number of full sweeps performed (0 when the input was already diagonal to tolerance).
    pub sweeps: usize,
}

/// Frobenius norm of the off-diagonal part of `a`: (n, n).
fn off_diagonal_norm<T: Real>(a: &[T], n: usize) -> T {
    let mut s = T::ZERO;
    for i in 0..n {
        for j in 0..n {
            if i != j {
                s += a[i * n + j] * a[i * n + j];
            }
        }
    }
    s.sqrt()
}

/// Symmetric eigendecomposition by cyclic Jacobi rotations. `a`: (n, n) → [`Eigh`].
///
/// Works on a symmetrized copy of `a`. Each sweep visits the pairs (p, q) with p < q in row-cyclic
/// order (p outer, q inner) and annihilates A\[p\]\[q\] with one rotation, accumulated into V. Before
/// each sweep the off-diagonal Frobenius norm is compared with `tol`·‖A‖_F: at or below it (or
/// exactly zero) the diagonal is taken as the spectrum. Values are then sorted in descending
/// order, the columns of V permuted with them (ties keep their diagonal order).
///
/// `tol` is relative; [`JACOBI_TOL_F32`] / [`JACOBI_TOL_F64`] are sensible, 0 asks for an exactly
/// diagonal result. Fails with [`Error::NoConvergence`] when `max_sweeps` sweeps were not enough
/// (see [`JACOBI_MAX_SWEEPS`]), with [`Error::Invalid`] for non-finite entries, a negative or
/// non-finite `tol`, or a matrix whose squared norm overflows `T`.
pub fn eigh_jacobi<T: Real>(a: &[T], n: usize, tol: T, max_sweeps: usize) -> Result<Eigh<T>> {
    const OP: &str = "eigh_jacobi";
    check_square(OP, "a", a, n)?;
    let tol_ok = tol >= T::ZERO && tol.is_finite();
    if !tol_ok {
        return Err(invalid(OP, "tol", alloc::format!("must be finite and >= 0, got {tol}")));
    }
    if a.iter().any(|x| !x.is_finite()) {
        return Err(invalid(OP, "a", "has non-finite entries"));
    }
    let mut m = a.to_vec();
    symmetrize(&mut m, n)?;
    let norm = m.iter().map(|&x| x * x).sum::<T>().sqrt();
    if !norm.is_finite() {
        return Err(invalid(OP, "a", "entries too large: the squared Frobenius norm overflows"));
    }
    let threshold = tol * norm;

    let mut v = vec![T::ZERO; n * n];
    for i in 0..n {
        v[i * n + i] = T::ONE;
    }

    let half = T::from_f64(0.5);
    // Past this |θ|, θ² + 1 rounds to θ² (and θ² may overflow), so t = 1/(2θ) is the same value.
    let big_theta = T::ONE / T::EPSILON;
    let mut sweeps = 0;
    loop {
        let off = off_diagonal_norm(&m, n);
        if off == T::ZERO || off <= threshold {
            break;
        }
        if sweeps == max_sweeps {
            return Err(Error::NoConvergence { sweeps, off: off.to_f64() });
        }
        for p in 0..n {
            for q in (p + 1)..n {
                let apq = m[p * n + q];
                if apq == T::ZERO {
                    continue;
                }
                let app = m[p * n + p];
                let aqq = m[q * n + q];
                // The rotation angle φ satisfies cot 2φ = θ; t = tan φ is the smaller root of
                // t² + 2θt − 1 = 0, written so that no cancellation occurs (|φ| ≤ π/4).
                let theta = (aqq - app) * half / apq;
                let t = if theta.abs() > big_theta {
                    half / theta
                } else {
                    let sign = if theta < T::ZERO { -T::ONE } else { T::ONE };
                    sign / (theta.abs() + (theta * theta + T::ONE).sqrt())
                };
                let c = T::ONE / (t * t + T::ONE).sqrt();
                let s = t * c;

                // The exact updates of the pivot entries in terms of t avoid forming
                // c²·app − 2cs·apq + s²·aqq, whose rounding would not leave A[p][q] at zero.
                m[p * n + p] = app - t * apq;
                m[q * n + q] = aqq + t * apq;
                m[p * n + q] = T::ZERO;
                m[q * n + p] = T::ZERO;
                for k in 0..n {
                    if k == p || k == q {
                        continue;
                    }
                    let akp = m[k * n + p];
                    let akq = m[k * n + q];
                    let new_kp = c * akp - s * akq;
                    let new_kq = s * akp + c * akq;
                    m[k * n + p] = new_kp;
                    m[p * n + k] = new_kp;
                    m[k * n + q] = new_kq;
                    m[q * n + k] = new_kq;
                }
                for k in 0..n {
                    let vkp = v[k * n + p];
                    let vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
        sweeps += 1;
    }

    let diag: Vec<T> = (0..n).map(|i| m[i * n + i]).collect();
    let mut order: Vec<usize> = (0..n).collect();
    // Stable, and the values are finite (checked on entry, rotations are bounded), so
    // `partial_cmp` never fails.
    order.sort_by(|&i, &j| diag[j].partial_cmp(&diag[i]).unwrap_or(core::cmp::Ordering::Equal));
    let values = order.iter().map(|&i| diag[i]).collect();
    let mut vectors = vec![T::ZERO; n * n];
    for (dst, &src) in order.iter().enumerate() {
        for k in 0..n {
            vectors[k * n + dst] = v[k * n + src];
        }
    }
    Ok(Eigh { values, vectors, sweeps })
}

/// Orthogonal projector onto the span of the first `k` columns of `vectors`: P = V_k V_kᵀ.
/// `vectors`: (n, n) row-major with orthonormal columns (as [`Eigh::vectors`]) → P: (n, n),
/// exactly symmetric. `k` = 0 gives the zero matrix, `k` = n the identity (to rounding).
pub fn top_k_projector<T: Real>(vectors: &[T], n: usize, k: usize) -> Result<Vec<T>> {
    const OP: &str = "top_k_projector";
    check_square(OP, "vectors", vectors, n)?;
    if k > n {
        return Err(invalid(OP, "k", alloc::format!("{k} exceeds the dimension {n}")));
    }
    let mut p = vec![T::ZERO; n * n];
    for i in 0..n {
        for j in i..n {
            let mut s = T::ZERO;
            for c in 0..k {
                s += vectors[i * n + c] * vectors[j * n + c];
            }
            p[i * n + j] = s;
            p[j * n + i] = s;
        }
    }
    Ok(p)
}

/// GRIT's adaptive rank (grit.md §5): the smallest k ≥ 1 whose top-k eigenvalues hold at least
/// `threshold` of the trace, clamped to [`min_rank`, `max_rank`] (`max_rank` wins if the bounds
/// cross). `values_desc`: (n), eigenvalues in descending order, as [`Eigh::values`].
///
/// Negative eigenvalues (rounding noise of a PSD factor) count as 0 in both the running sum and the
/// trace. When the trace is ≤ 1e-6 the spectrum carries no usable signal and `max_rank` is
/// returned. If rounding keeps the running sum just below `threshold`·trace (e.g. `threshold` = 1),
/// k is the number of values.
pub fn rank_for_energy<T: Real>(values_desc: &[T], threshold: T, min_rank: usize, max_rank: usize) -> usize {
    let clamp = |k: usize| k.max(min_rank).min(max_rank);
    let trace: T = values_desc.iter().map(|&x| x.max(T::ZERO)).sum();
    // Written as a positive test so that a NaN trace also takes the no-signal branch.
    let has_signal = trace > T::from_f64(RANK_MIN_TRACE);
    if !has_signal {
        return max_rank;
    }
    let target = threshold * trace;
    let mut cum = T::ZERO;
    for (i, &x) in values_desc.iter().enumerate() {
        cum += x.max(T::ZERO);
        if cum >= target {
            return clamp(i + 1);
        }
    }
    clamp(values_desc.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::testutil::randn;

    const SIZES: [usize; 5] = [1, 2, 5, 16, 17];

    /// C = A B for (n, n) matrices in f64.
    fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
        let mut c = vec![0.0; n * n];
        for i in 0..n {
            for k in 0..n {
                let aik = a[i * n + k];
                for j in 0..n {
                    c[i * n + j] += aik * b[k * n + j];
                }
            }
        }
        c
    }

    fn transpose(a: &[f64], n: usize) -> Vec<f64> {
        let mut t = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                t[j * n + i] = a[i * n + j];
            }
        }
        t
    }

    fn eye(n: usize) -> Vec<f64> {
        let mut e = vec![0.0; n * n];
        for i in 0..n {
            e[i * n + i] = 1.0;
        }
        e
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    fn max_abs(a: &[f64]) -> f64 {
        a.iter().map(|x| x.abs()).fold(0.0, f64::max)
    }

    fn to_f32(a: &[f64]) -> Vec<f32> {
        a.iter().map(|&x| x as f32).collect()
    }

    fn to_f64(a: &[f32]) -> Vec<f64> {
        a.iter().map(|&x| x as f64).collect()
    }

    /// A random orthogonal (n, n) matrix: modified Gram–Schmidt, applied twice, on the columns of
    /// a Gaussian matrix.
    fn random_orthogonal(rng: &mut Rng, n: usize) -> Vec<f64> {
        let mut q = randn(rng, n * n, 1.0);
        for j in 0..n {
            for _pass in 0..2 {
                for c in 0..j {
                    let d: f64 = (0..n).map(|i| q[i * n + c] * q[i * n + j]).sum();
                    for i in 0..n {
                        q[i * n + j] -= d * q[i * n + c];
                    }
                }
            }
            let norm = (0..n).map(|i| q[i * n + j] * q[i * n + j]).sum::<f64>().sqrt();
            for i in 0..n {
                q[i * n + j] /= norm;
            }
        }
        q
    }

    /// Q diag(eigs) Qᵀ with a random orthogonal Q, exactly symmetric.
    fn with_spectrum(rng: &mut Rng, eigs: &[f64]) -> Vec<f64> {
        let n = eigs.len();
        let q = random_orthogonal(rng, n);
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| q[i * n + k] * eigs[k] * q[j * n + k]).sum();
            }
        }
        symmetrize(&mut a, n).unwrap();
        a
    }

    /// n eigenvalues spread geometrically from 1 down to 1/cond.
    fn spread(n: usize, cond: f64) -> Vec<f64> {
        (0..n).map(|i| if n == 1 { 1.0 } else { cond.powf(-(i as f64) / (n - 1) as f64) }).collect()
    }

    /// Mean of m outer products u uᵀ of Gaussian r-vectors scaled by `scale`: a K-FAC factor
    /// from m samples, rank min(m, r).
    fn sample_factor(rng: &mut Rng, r: usize, m: usize, scale: f64) -> Vec<f64> {
        let mut s = vec![0.0; r * r];
        for _ in 0..m {
            let u = randn(rng, r, scale);
            for i in 0..r {
                for j in 0..r {
                    s[i * r + j] += u[i] * u[j] / m as f64;
                }
            }
        }
        s
    }

    #[test]
    fn symmetrize_averages_and_checks_length() {
        let mut rng = Rng::new(1);
        let n = 5;
        let a0 = randn(&mut rng, n * n, 1.0);
        let mut a = a0.clone();
        symmetrize(&mut a, n).unwrap();
        for i in 0..n {
            for j in 0..n {
                assert_eq!(a[i * n + j], a[j * n + i]);
                assert!((a[i * n + j] - 0.5 * (a0[i * n + j] + a0[j * n + i])).abs() < 1e-15);
            }
        }
        assert!(matches!(symmetrize(&mut a, 4), Err(Error::Shape { expected: 16, found: 25, .. })));
        assert!(symmetrize(&mut a[..24], 5).is_err());
        assert!(symmetrize(&mut a, usize::MAX).is_err());
    }

    #[test]
    fn add_diagonal_adds_only_the_diagonal() {
        let mut a = vec![1.0f64; 9];
        add_diagonal(&mut a, 3, 0.5).unwrap();
        assert_eq!(a, [1.5, 1.0, 1.0, 1.0, 1.5, 1.0, 1.0, 1.0, 1.5]);
        assert!(add_diagonal(&mut a, 2, 1.0).is_err());
    }

    #[test]
    fn cholesky_reconstructs() {
        let mut rng = Rng::new(2);
        for &n in &SIZES {
            for &cond in &[1.0, 1e3, 1e6] {
                let a = with_spectrum(&mut rng, &spread(n, cond));
                let l = cholesky(&a, n).unwrap();
                for i in 0..n {
                    assert!(l[i * n + i] > 0.0);
                    for j in (i + 1)..n {
                        assert_eq!(l[i * n + j], 0.0, "n={n}: L[{i}][{j}] above the diagonal");
                    }
                }
                let llt = matmul(&l, &transpose(&l, n), n);
                let err = max_abs_diff(&llt, &a) / max_abs(&a);
                assert!(err < 1e-14, "n={n} cond={cond}: |LLᵀ − A| = {err:e}");
            }
        }
    }

    #[test]
    fn cholesky_known_factor() {
        // [[4, 2], [2, 10]] = L Lᵀ with L = [[2, 0], [1, 3]].
        let l = cholesky(&[4.0f64, 2.0, 2.0, 10.0], 2).unwrap();
        assert_eq!(l, [2.0, 0.0, 1.0, 3.0]);
        // The upper triangle is not read.
        let l = cholesky(&[4.0f64, 99.0, 2.0, 10.0], 2).unwrap();
        assert_eq!(l, [2.0, 0.0, 1.0, 3.0]);
        assert!(cholesky(&[] as &[f64], 0).unwrap().is_empty());
    }

    #[test]
    fn cholesky_reports_the_failing_pivot() {
        // Diagonal: the third pivot is the diagonal entry itself.
        let mut d = vec![0.0f64; 16];
        for (i, v) in [1.0, 2.0, -1.0, 3.0].iter().enumerate() {
            d[i * 4 + i] = *v;
        }
        assert_eq!(cholesky(&d, 4), Err(Error::NotPositiveDefinite { pivot: 2, value: -1.0 }));
        // [[1, 2], [2, 1]] (eigenvalues 3, −1): the second pivot is 1 − 2² = −3.
        assert_eq!(cholesky(&[1.0f64, 2.0, 2.0, 1.0], 2), Err(Error::NotPositiveDefinite { pivot: 1, value: -3.0 }));
        // A zero pivot is not positive.
        assert_eq!(cholesky(&[0.0f64; 4], 2), Err(Error::NotPositiveDefinite { pivot: 0, value: 0.0 }));
        // An indefinite matrix with a random basis: the error names some pivot, and the leading
        // blocks before it factor fine.
        let mut rng = Rng::new(3);
        let mut eigs = spread(16, 10.0);
        eigs[7] = -0.5;
        let a = with_spectrum(&mut rng, &eigs);
        match cholesky(&a, 16) {
            Err(Error::NotPositiveDefinite { pivot, value }) => {
                assert!(value <= 0.0);
                let mut lead = vec![0.0; pivot * pivot];
                for i in 0..pivot {
                    for j in 0..pivot {
                        lead[i * pivot + j] = a[i * 16 + j];
                    }
                }
                assert!(cholesky(&lead, pivot).is_ok());
            }
            other => panic!("expected NotPositiveDefinite, got {other:?}"),
        }
        // Non-finite entries are reported, not propagated.
        assert!(matches!(cholesky(&[1.0f64, 0.0, f64::NAN, 1.0], 2), Err(Error::NotPositiveDefinite { pivot: 1, .. })));
        assert!(matches!(
            cholesky(&[f64::INFINITY, 0.0, 0.0, 1.0], 2),
            Err(Error::NotPositiveDefinite { pivot: 0, .. })
        ));
        assert!(matches!(cholesky(&[1.0f64; 3], 2), Err(Error::Shape { .. })));
    }

    #[test]
    fn spd_inverse_f64_by_condition_number() {
        let mut rng = Rng::new(4);
        for &n in &SIZES {
            for &cond in &[1.0, 1e3, 1e6] {
                let a = with_spectrum(&mut rng, &spread(n, cond));
                let inv = spd_inverse(&a, n).unwrap();
                for i in 0..n {
                    for j in 0..n {
                        assert_eq!(inv[i * n + j], inv[j * n + i], "inverse not exactly symmetric");
                    }
                }
                let err = max_abs_diff(&matmul(&a, &inv, n), &eye(n));
                assert!(err <= 1e-14 * cond, "n={n} cond={cond}: |A A⁻¹ − I|max = {err:e}");
            }
        }
    }

    #[test]
    fn spd_inverse_f32_after_damping() {
        let mut rng = Rng::new(5);
        for &n in &SIZES {
            for &cond in &[1.0, 1e3, 1e6] {
                // K-FAC factors of a LoRA module are small; the residual is scale-free anyway.
                let scale = 0.02;
                let eigs: Vec<f64> = spread(n, cond).iter().map(|e| e * scale).collect();
                let mut a = to_f32(&with_spectrum(&mut rng, &eigs));
                add_diagonal(&mut a, n, (1e-3 * scale) as f32).unwrap();
                let inv = spd_inverse(&a, n).unwrap();
                let err = max_abs_diff(&matmul(&to_f64(&a), &to_f64(&inv), n), &eye(n));
                assert!(err <= 1e-3, "f32 n={n} cond={cond}: |A A⁻¹ − I|max = {err:e}");
            }
        }
    }

    #[test]
    fn spd_inverse_rejects_what_cholesky_rejects() {
        assert_eq!(spd_inverse(&[1.0f64, 2.0, 2.0, 1.0], 2), Err(Error::NotPositiveDefinite { pivot: 1, value: -3.0 }));
        assert!(matches!(spd_inverse(&[1.0f64; 5], 2), Err(Error::Shape { .. })));
        // Every pivot positive, but the inverse overflows f32: reported at the tiny pivot.
        let a = [1.0f32, 0.0, 0.0, 1e-44];
        assert!(matches!(spd_inverse(&a, 2), Err(Error::NotPositiveDefinite { pivot: 1, .. })));
    }

    /// |(Σ + λI) Σ⁻¹_damped − I|max in f64 for a symmetric Σ.
    fn damped_residual(sigma: &[f64], inv: &[f64], n: usize, lambda: f64) -> f64 {
        let mut s = sigma.to_vec();
        add_diagonal(&mut s, n, lambda).unwrap();
        max_abs_diff(&matmul(&s, inv, n), &eye(n))
    }

    #[test]
    fn ladder_climbs_to_the_first_rung_that_works() {
        let mut rng = Rng::new(6);
        let r = 16;
        let mut eigs = spread(r, 1e2);
        eigs[r - 1] = -5e-3;
        let bad = with_spectrum(&mut rng, &eigs);
        let good = with_spectrum(&mut rng, &spread(r, 10.0));

        // The rungs ×1 and ×3 really are indefinite: −5e-3 + 1e-3 and −5e-3 + 3e-3 < 0.
        for lam in [1e-3, 3e-3] {
            let mut s = bad.clone();
            add_diagonal(&mut s, r, lam).unwrap();
            assert!(cholesky(&s, r).is_err(), "λ={lam} should fail");
        }

        // Either factor holding the negative eigenvalue moves both to λ×10.
        for (sa, sg) in [(&bad, &good), (&good, &bad)] {
            let d = kfac_damped_inverses(sa, sg, r, 1e-3).unwrap();
            assert!((d.lambda - 1e-2).abs() < 1e-15, "λ = {}", d.lambda);
            assert!(damped_residual(sa, &d.inv_a, r, d.lambda) < 1e-10);
            assert!(damped_residual(sg, &d.inv_g, r, d.lambda) < 1e-10);
        }

        // Σa needs ×10, Σg needs ×30: the shared λ is the larger.
        let mut eigs_g = spread(r, 1e2);
        eigs_g[0] = -2e-2;
        let worse = with_spectrum(&mut rng, &eigs_g);
        let d = kfac_damped_inverses(&bad, &worse, r, 1e-3).unwrap();
        assert!((d.lambda - 3e-2).abs() < 1e-15, "λ = {}", d.lambda);

        // The same in f32, the precision the library runs in.
        let d = kfac_damped_inverses(&to_f32(&bad), &to_f32(&good), r, 1e-3f32).unwrap();
        assert!((d.lambda - 1e-2).abs() < 1e-8, "λ = {}", d.lambda);
        assert!(damped_residual(&to_f64(&to_f32(&bad)), &to_f64(&d.inv_a), r, d.lambda as f64) < 1e-3);
    }

    #[test]
    fn ladder_first_rung_floor_and_exhaustion() {
        let mut rng = Rng::new(7);
        let r = 5;
        let a = with_spectrum(&mut rng, &spread(r, 1e2));
        let g = with_spectrum(&mut rng, &spread(r, 1e3));
        let d = kfac_damped_inverses(&a, &g, r, 0.1).unwrap();
        assert_eq!(d.lambda, 0.1);
        assert!(damped_residual(&a, &d.inv_a, r, 0.1) < 1e-12);
        assert!(damped_residual(&g, &d.inv_g, r, 0.1) < 1e-12);

        // λ below the floor (zero or negative) is raised to MIN_DAMPING.
        for lam in [0.0, -1.0, 1e-9] {
            assert_eq!(kfac_damped_inverses(&a, &g, r, lam).unwrap().lambda, MIN_DAMPING);
        }

        // An eigenvalue of −1 is beyond 300 × 1e-3: every rung fails, the last error comes back.
        let mut eigs = spread(r, 10.0);
        eigs[2] = -1.0;
        let hopeless = with_spectrum(&mut rng, &eigs);
        match kfac_damped_inverses(&hopeless, &g, r, 1e-3) {
            Err(Error::NotPositiveDefinite { value, .. }) => assert!(value <= 0.0),
            other => panic!("expected NotPositiveDefinite, got {other:?}"),
        }
        // Non-finite statistics never produce inverses.
        let mut nan = a.clone();
        nan[7] = f64::NAN;
        assert!(matches!(kfac_damped_inverses(&nan, &g, r, 1e-3), Err(Error::NotPositiveDefinite { .. })));
        assert!(matches!(kfac_damped_inverses(&a, &g, r, f64::NAN), Err(Error::Invalid { .. })));
        assert!(matches!(kfac_damped_inverses(&a[..24], &g, r, 1e-3), Err(Error::Shape { .. })));
        assert!(matches!(kfac_damped_inverses(&a, &g[..24], r, 1e-3), Err(Error::Shape { .. })));
    }

    #[test]
    fn ladder_symmetrizes_its_inputs() {
        // 2·I plus a skew part: read as its lower triangle it is [[2, 3], [3, 2]] (indefinite,
        // second pivot 2 − 9/2), symmetrized it is 2·I.
        let skewed = [2.0f64, -3.0, 3.0, 2.0];
        assert!(cholesky(&skewed, 2).is_err());
        let d = kfac_damped_inverses(&skewed, &eye(2), 2, 1e-3).unwrap();
        assert_eq!(d.lambda, 1e-3);
        assert!(damped_residual(&[2.0, 0.0, 0.0, 2.0], &d.inv_a, 2, 1e-3) < 1e-14);
    }

    #[test]
    fn rank_deficient_factors_invert_after_damping() {
        let mut rng = Rng::new(8);
        for &r in &SIZES {
            for m in [1, 3, r.saturating_sub(1).max(1)] {
                let sa = sample_factor(&mut rng, r, m, 0.3);
                let sg = sample_factor(&mut rng, r, m.div_ceil(2), 0.01);
                let d = kfac_damped_inverses(&sa, &sg, r, 1e-3).unwrap();
                assert_eq!(d.lambda, 1e-3, "a PSD factor needs no climb");
                assert!(damped_residual(&sa, &d.inv_a, r, d.lambda) < 1e-9);
                assert!(damped_residual(&sg, &d.inv_g, r, d.lambda) < 1e-9);

                let (sa32, sg32) = (to_f32(&sa), to_f32(&sg));
                let d = kfac_damped_inverses(&sa32, &sg32, r, 1e-3f32).unwrap();
                let lam = d.lambda as f64;
                let ea = damped_residual(&to_f64(&sa32), &to_f64(&d.inv_a), r, lam);
                let eg = damped_residual(&to_f64(&sg32), &to_f64(&d.inv_g), r, lam);
                assert!(ea < 1e-3 && eg < 1e-3, "f32 r={r} m={m}: residuals {ea:e} {eg:e}");
            }
        }
    }

    /// Checks V diag(w) Vᵀ = A, VᵀV = I and descending values; returns nothing, panics with `what`.
    fn check_eigh(what: &str, a: &[f64], e: &Eigh<f64>, n: usize, tol: f64) {
        let scale = max_abs(a).max(1e-300);
        assert!(e.values.windows(2).all(|w| w[0] >= w[1]), "{what}: not descending {:?}", e.values);
        let v = &e.vectors;
        let mut vw = v.clone();
        for i in 0..n {
            for j in 0..n {
                vw[i * n + j] *= e.values[j];
            }
        }
        let rec = matmul(&vw, &transpose(v, n), n);
        let err = max_abs_diff(&rec, a) / scale;
        assert!(err < tol, "{what}: |V diag(w) Vᵀ − A| = {err:e}");
        let err = max_abs_diff(&matmul(&transpose(v, n), v, n), &eye(n));
        assert!(err < tol, "{what}: |VᵀV − I| = {err:e}");
    }

    #[test]
    fn jacobi_recovers_a_known_spectrum() {
        let mut rng = Rng::new(9);
        for &n in &SIZES {
            // Distinct values of both signs, spread over three decades.
            let mut eigs: Vec<f64> = (0..n)
                .map(|i| (if i % 3 == 2 { -1.0 } else { 1.0 }) * 10f64.powf(-3.0 * i as f64 / n as f64))
                .collect();
            let a = with_spectrum(&mut rng, &eigs);
            let e = eigh_jacobi(&a, n, JACOBI_TOL_F64, JACOBI_MAX_SWEEPS).unwrap();
            check_eigh(&alloc::format!("n={n}"), &a, &e, n, 1e-12);
            eigs.sort_by(|x, y| y.partial_cmp(x).unwrap());
            let err = max_abs_diff(&e.values, &eigs);
            assert!(err < 1e-12, "n={n}: values {:?} vs {eigs:?}", e.values);
            assert!(n == 1 || (1..=12).contains(&e.sweeps), "n={n}: {} sweeps", e.sweeps);
            // Each eigenpair on its own: A v = w v.
            let av = matmul(&a, &e.vectors, n);
            for j in 0..n {
                for i in 0..n {
                    assert!((av[i * n + j] - e.values[j] * e.vectors[i * n + j]).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn jacobi_two_by_two() {
        let e = eigh_jacobi(&[2.0f64, 1.0, 1.0, 2.0], 2, 0.0, JACOBI_MAX_SWEEPS).unwrap();
        // One rotation zeroes the only off-diagonal pair exactly.
        assert_eq!(e.sweeps, 1);
        assert!((e.values[0] - 3.0).abs() < 1e-15 && (e.values[1] - 1.0).abs() < 1e-15);
        let h = core::f64::consts::FRAC_1_SQRT_2;
        assert!((e.vectors[0].abs() - h).abs() < 1e-15 && (e.vectors[2].abs() - h).abs() < 1e-15);
        assert!(e.vectors[0] * e.vectors[2] > 0.0, "top eigenvector is ±(1, 1)/√2");

        // |θ| beyond 1/ε takes the overflow-free branch and still annihilates the pair.
        let a = [1e20f64, 1.0, 1.0, 0.0];
        let e = eigh_jacobi(&a, 2, 0.0, JACOBI_MAX_SWEEPS).unwrap();
        assert_eq!(e.sweeps, 1);
        assert_eq!(e.values[0], 1e20);
        assert!((e.values[1] + 1e-20).abs() < 1e-30, "{}", e.values[1]);
        check_eigh("big θ", &a, &e, 2, 1e-15);
    }

    #[test]
    fn jacobi_repeated_eigenvalues() {
        let mut rng = Rng::new(10);
        for &n in &[5usize, 16, 17] {
            let mut eigs: Vec<f64> = (0..n).map(|i| [3.0, 3.0, 3.0, 1.0, 1.0, -2.0][i % 6]).collect();
            eigs[n - 1] = 0.0;
            let a = with_spectrum(&mut rng, &eigs);
            let e = eigh_jacobi(&a, n, JACOBI_TOL_F64, JACOBI_MAX_SWEEPS).unwrap();
            check_eigh(&alloc::format!("repeated n={n}"), &a, &e, n, 1e-12);
            eigs.sort_by(|x, y| y.partial_cmp(x).unwrap());
            assert!(max_abs_diff(&e.values, &eigs) < 1e-12, "{:?} vs {eigs:?}", e.values);
        }
        // Scalar multiple of the identity: already diagonal.
        let mut a = eye(4);
        a.iter_mut().for_each(|x| *x *= 7.0);
        let e = eigh_jacobi(&a, 4, 0.0, 0).unwrap();
        assert_eq!((e.sweeps, e.values, e.vectors), (0, vec![7.0; 4], eye(4)));
    }

    #[test]
    fn jacobi_diagonal_takes_no_sweep_and_sorts() {
        let d = [2.0f64, -1.0, 5.0, 0.0, 3.0];
        let n = d.len();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            a[i * n + i] = d[i];
        }
        let e = eigh_jacobi(&a, n, JACOBI_TOL_F64, JACOBI_MAX_SWEEPS).unwrap();
        assert_eq!(e.sweeps, 0);
        assert_eq!(e.values, [5.0, 3.0, 2.0, 0.0, -1.0]);
        // Columns are the unit vectors, permuted with the values.
        for (j, src) in [2usize, 4, 0, 3, 1].iter().enumerate() {
            for i in 0..n {
                assert_eq!(e.vectors[i * n + j], if i == *src { 1.0 } else { 0.0 });
            }
        }
        // Empty and zero matrices are trivially diagonal.
        let e = eigh_jacobi(&[] as &[f64], 0, 0.0, 0).unwrap();
        assert!(e.values.is_empty() && e.vectors.is_empty() && e.sweeps == 0);
        let e = eigh_jacobi(&[0.0f64; 9], 3, 0.0, 0).unwrap();
        assert_eq!(e.values, [0.0; 3]);
    }

    #[test]
    fn jacobi_f32_sixteen_converges() {
        let mut rng = Rng::new(11);
        let n = 16;
        for trial in 0..20 {
            // A K-FAC-like factor: PSD, rank-deficient in some trials, and a generic symmetric one.
            let a = match trial % 3 {
                0 => sample_factor(&mut rng, n, 4 + trial, 0.05),
                1 => with_spectrum(&mut rng, &spread(n, 1e4)),
                _ => randn(&mut rng, n * n, 1.0),
            };
            let mut a32 = to_f32(&a);
            symmetrize(&mut a32, n).unwrap();
            let e = eigh_jacobi(&a32, n, JACOBI_TOL_F32, JACOBI_MAX_SWEEPS).unwrap();
            assert!(e.sweeps <= 12, "trial {trial}: {} sweeps", e.sweeps);
            let e64 = Eigh { values: to_f64(&e.values), vectors: to_f64(&e.vectors), sweeps: e.sweeps };
            check_eigh(&alloc::format!("f32 trial {trial}"), &to_f64(&a32), &e64, n, 2e-5);
            // Against the f64 solution of the same (rounded) matrix.
            let exact = eigh_jacobi(&to_f64(&a32), n, JACOBI_TOL_F64, JACOBI_MAX_SWEEPS).unwrap();
            let err = max_abs_diff(&e64.values, &exact.values) / max_abs(&exact.values);
            assert!(err < 3e-6, "trial {trial}: eigenvalue error {err:e}");
        }
    }

    #[test]
    fn jacobi_errors() {
        let mut rng = Rng::new(12);
        let a = with_spectrum(&mut rng, &spread(16, 1e2));
        match eigh_jacobi(&a, 16, JACOBI_TOL_F64, 0) {
            Err(Error::NoConvergence { sweeps: 0, off }) => assert!(off > 0.0),
            other => panic!("expected NoConvergence, got {other:?}"),
        }
        match eigh_jacobi(&a, 16, 0.0, 2) {
            Err(Error::NoConvergence { sweeps: 2, off }) => assert!(off > 0.0),
            other => panic!("expected NoConvergence, got {other:?}"),
        }
        assert!(matches!(eigh_jacobi(&a[..255], 16, 1e-12, 30), Err(Error::Shape { .. })));
        assert!(matches!(eigh_jacobi(&a, 16, -1.0, 30), Err(Error::Invalid { .. })));
        assert!(matches!(eigh_jacobi(&a, 16, f64::NAN, 30), Err(Error::Invalid { .. })));
        let mut bad = a.clone();
        bad[3] = f64::INFINITY;
        assert!(matches!(eigh_jacobi(&bad, 16, 1e-12, 30), Err(Error::Invalid { .. })));
        assert!(matches!(eigh_jacobi(&[1e30f32, 1e30, 1e30, 1e30], 2, 1e-6, 30), Err(Error::Invalid { .. })));
    }

    #[test]
    fn projector_is_idempotent_with_trace_k() {
        let mut rng = Rng::new(13);
        for &n in &SIZES {
            let a = with_spectrum(&mut rng, &spread(n, 1e2));
            let e = eigh_jacobi(&a, n, JACOBI_TOL_F64, JACOBI_MAX_SWEEPS).unwrap();
            for k in 0..=n {
                let p = top_k_projector(&e.vectors, n, k).unwrap();
                assert!(max_abs_diff(&matmul(&p, &p, n), &p) < 1e-13, "n={n} k={k}: P² ≠ P");
                let tr: f64 = (0..n).map(|i| p[i * n + i]).sum();
                assert!((tr - k as f64).abs() < 1e-12, "n={n} k={k}: trace {tr}");
                for i in 0..n {
                    for j in 0..n {
                        assert_eq!(p[i * n + j], p[j * n + i]);
                    }
                }
                // P keeps the top-k eigenvectors and removes the others.
                let pv = matmul(&p, &e.vectors, n);
                for c in 0..n {
                    for i in 0..n {
                        let want = if c < k { e.vectors[i * n + c] } else { 0.0 };
                        assert!((pv[i * n + c] - want).abs() < 1e-13);
                    }
                }
            }
            assert!(max_abs_diff(&top_k_projector(&e.vectors, n, n).unwrap(), &eye(n)) < 1e-13);
            assert!(top_k_projector(&e.vectors, n, 0).unwrap().iter().all(|&x| x == 0.0));
            assert!(matches!(top_k_projector(&e.vectors, n, n + 1), Err(Error::Invalid { .. })));
            assert!(matches!(top_k_projector(&e.vectors[1..], n, 1), Err(Error::Shape { .. })));
        }
        // Known case: the first two unit vectors of R³.
        let p = top_k_projector(&eye(3), 3, 2).unwrap();
        assert_eq!(p, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn rank_for_energy_known_cases() {
        let w = [4.0f64, 3.0, 2.0, 1.0];
        assert_eq!(rank_for_energy(&w, 0.35, 1, 4), 1);
        assert_eq!(rank_for_energy(&w, 0.65, 1, 4), 2);
        assert_eq!(rank_for_energy(&w, 0.75, 1, 4), 3);
        assert_eq!(rank_for_energy(&w, 0.99, 1, 4), 4);
        assert_eq!(rank_for_energy(&w, 1.0, 1, 4), 4);
        // Clamping to [min_rank, max_rank].
        assert_eq!(rank_for_energy(&w, 0.35, 3, 4), 3);
        assert_eq!(rank_for_energy(&w, 0.99, 1, 2), 2);
        assert_eq!(rank_for_energy(&w, 0.99, 3, 2), 2);
        // Negative eigenvalues count as zero: with them the trace would be 8 − 100 < 0.
        assert_eq!(rank_for_energy(&[5.0f64, 3.0, -100.0], 0.99, 1, 3), 2);
        assert_eq!(rank_for_energy(&[5.0f64, 3.0, -100.0], 0.5, 1, 3), 1);
        // No signal: max_rank.
        assert_eq!(rank_for_energy(&[1e-7f64, 1e-8, 0.0], 0.99, 1, 3), 3);
        assert_eq!(rank_for_energy(&[0.0f64; 16], 0.99, 4, 16), 16);
        assert_eq!(rank_for_energy(&[] as &[f64], 0.99, 1, 16), 16);
        assert_eq!(rank_for_energy(&[-1.0f64, -2.0], 0.99, 1, 2), 2);
        // A 16-rank factor whose energy sits in 3 directions, in f32.
        let mut w = [1e-5f32; 16];
        w[..3].copy_from_slice(&[1.0, 0.5, 0.25]);
        assert_eq!(rank_for_energy(&w, 0.99, 1, 16), 3);
        assert_eq!(rank_for_energy(&w, 0.99, 4, 16), 4);
        // Through the eigensolver: a spectrum with a sharp drop after 5 values.
        let mut rng = Rng::new(14);
        let eigs: Vec<f64> = (0..16).map(|i| if i < 5 { 1.0 + i as f64 } else { 1e-4 }).collect();
        let a = with_spectrum(&mut rng, &eigs);
        let e = eigh_jacobi(&a, 16, JACOBI_TOL_F64, JACOBI_MAX_SWEEPS).unwrap();
        assert_eq!(rank_for_energy(&e.values, 0.99, 1, 16), 5);
    }
}
