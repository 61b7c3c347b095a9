//! Matrix products with optional transposes, and the linear layer `y = x Wᵀ + b` built on them.
//!
//! A transpose flag describes how an operand is *stored*, never a copy: the GPU GEMMs take the
//! same flags, so the reference must cover all four combinations the kernels can be called with.

use crate::error::{check_len, checked_product};
use crate::{Real, Result};
use alloc::vec::Vec;

/// How a matrix operand is stored relative to the logical operand of the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trans {
    /// Stored as the logical operand.
    N,
    /// Stored transposed: the logical (R, S) operand lives in an (S, R) buffer.
    T,
}

impl Trans {
    fn flip(self) -> Self {
        match self {
            Trans::N => Trans::T,
            Trans::T => Trans::N,
        }
    }

    /// (row stride, column stride) of the logical (rows, cols) operand inside its buffer.
    fn strides(self, rows: usize, cols: usize) -> (usize, usize) {
        match self {
            Trans::N => (cols, 1),
            Trans::T => (1, rows),
        }
    }
}

/// C = op(A) · op(B).
///
/// a: (M, K) when `ta == N`, (K, M) when `ta == T`
/// b: (K, N) when `tb == N`, (N, K) when `tb == T`
/// returns c: (M, N)
///
/// Each output accumulates over K in ascending order in `T`, so f32 results are reproducible.
pub fn matmul_fwd_ref<T: Real>(a: &[T], b: &[T], m: usize, k: usize, n: usize, ta: Trans, tb: Trans) -> Result<Vec<T>> {
    const OP: &str = "matmul_fwd_ref";
    check_len(OP, "a", a.len(), checked_product(&[m, k])?)?;
    check_len(OP, "b", b.len(), checked_product(&[k, n])?)?;
    let mut c = alloc::vec![T::ZERO; checked_product(&[m, n])?];
    let (ars, acs) = ta.strides(m, k);
    let (brs, bcs) = tb.strides(k, n);
    for i in 0..m {
        for j in 0..n {
            let mut acc = T::ZERO;
            for p in 0..k {
                acc += a[i * ars + p * acs] * b[p * brs + j * bcs];
            }
            c[i * n + j] = acc;
        }
    }
    Ok(c)
}

/// Gradients of C = op(A) · op(B) with respect to both operands, each in its stored layout.
///
/// a: (M, K) when `ta == N`, (K, M) when `ta == T`
/// b: (K, N) when `tb == N`, (N, K) when `tb == T`
/// dc: (M, N)
/// returns (da, db) with the shapes of `a` and `b`
///
/// d op(A) = dC · op(B)ᵀ and d op(B) = op(A)ᵀ · dC; for a stored-transposed operand the
/// gradient is the transpose of that, which is again a single product with flipped flags, so
/// no explicit transpose is ever materialised (the kernels do the same).
#[allow(clippy::too_many_arguments)]
pub fn matmul_bwd_ref<T: Real>(
    a: &[T],
    b: &[T],
    dc: &[T],
    m: usize,
    k: usize,
    n: usize,
    ta: Trans,
    tb: Trans,
) -> Result<(Vec<T>, Vec<T>)> {
    const OP: &str = "matmul_bwd_ref";
    check_len(OP, "a", a.len(), checked_product(&[m, k])?)?;
    check_len(OP, "b", b.len(), checked_product(&[k, n])?)?;
    check_len(OP, "dc", dc.len(), checked_product(&[m, n])?)?;
    let da = match ta {
        // (M, K) = dC (M, N) · op(B)ᵀ (N, K)
        Trans::N => matmul_fwd_ref(dc, b, m, n, k, Trans::N, tb.flip())?,
        // (K, M) = op(B) (K, N) · dCᵀ (N, M)
        Trans::T => matmul_fwd_ref(b, dc, k, n, m, tb, Trans::T)?,
    };
    let db = match tb {
        // (K, N) = op(A)ᵀ (K, M) · dC (M, N)
        Trans::N => matmul_fwd_ref(a, dc, k, m, n, ta.flip(), Trans::N)?,
        // (N, K) = dCᵀ (N, M) · op(A) (M, K)
        Trans::T => matmul_fwd_ref(dc, a, n, m, k, Trans::T, ta)?,
    };
    Ok((da, db))
}

/// Gradients of a linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearGrads<T> {
    /// dx: (M, K)
    pub dx: Vec<T>,
    /// dw: (N, K)
    pub dw: Vec<T>,
    /// dbias: (N), present when the layer has a bias.
    pub dbias: Option<Vec<T>>,
}

/// y = x Wᵀ + b, with W in the PyTorch `nn.Linear` layout (out_features, in_features).
///
/// x: (M, K)
/// w: (N, K)
/// bias: (N)
/// returns y: (M, N)
pub fn linear_fwd_ref<T: Real>(x: &[T], w: &[T], bias: Option<&[T]>, m: usize, k: usize, n: usize) -> Result<Vec<T>> {
    const OP: &str = "linear_fwd_ref";
    check_len(OP, "x", x.len(), checked_product(&[m, k])?)?;
    check_len(OP, "w", w.len(), checked_product(&[n, k])?)?;
    if let Some(b) = bias {
        check_len(OP, "bias", b.len(), n)?;
    }
    let mut y = matmul_fwd_ref(x, w, m, k, n, Trans::N, Trans::T)?;
    if let Some(b) = bias {
        // The bias is added after the full K reduction, as cuBLAS epilogues do.
        for row in y.chunks_exact_mut(n.max(1)) {
            for (yj, &bj) in row.iter_mut().zip(b) {
                *yj += bj;
            }
        }
    }
    Ok(y)
}

/// Backward of [`linear_fwd_ref`].
///
/// x: (M, K)
/// w: (N, K)
/// dy: (M, N)
/// returns dx: (M, K), dw: (N, K), dbias: (N) when `has_bias`
pub fn linear_bwd_ref<T: Real>(
    x: &[T],
    w: &[T],
    dy: &[T],
    has_bias: bool,
    m: usize,
    k: usize,
    n: usize,
) -> Result<LinearGrads<T>> {
    const OP: &str = "linear_bwd_ref";
    check_len(OP, "x", x.len(), checked_product(&[m, k])?)?;
    check_len(OP, "w", w.len(), checked_product(&[n, k])?)?;
    check_len(OP, "dy", dy.len(), checked_product(&[m, n])?)?;
    let (dx, dw) = matmul_bwd_ref(x, w, dy, m, k, n, Trans::N, Trans::T)?;
    let dbias = has_bias.then(|| {
        let mut db = alloc::vec![T::ZERO; n];
        for row in dy.chunks_exact(n.max(1)) {
            for (dbj, &g) in db.iter_mut().zip(row) {
                *dbj += g;
            }
        }
        db
    });
    Ok(LinearGrads { dx, dw, dbias })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, dot, numeric_grad, randn};

    const ALL: [(Trans, Trans); 4] =
        [(Trans::N, Trans::N), (Trans::N, Trans::T), (Trans::T, Trans::N), (Trans::T, Trans::T)];

    /// Stores a logical row-major (r, s) matrix the way `t` asks for.
    fn store(x: &[f64], r: usize, s: usize, t: Trans) -> Vec<f64> {
        match t {
            Trans::N => x.to_vec(),
            Trans::T => {
                let mut y = alloc::vec![0.0; r * s];
                for i in 0..r {
                    for j in 0..s {
                        y[j * r + i] = x[i * s + j];
                    }
                }
                y
            }
        }
    }

    #[test]
    fn hand_computed_product_in_every_layout() {
        // A = [[1, 2, 3], [4, 5, 6]], B = [[7, 8], [9, 10], [11, 12]]
        // C[0] = [1*7 + 2*9 + 3*11, 1*8 + 2*10 + 3*12] = [58, 64]
        // C[1] = [4*7 + 5*9 + 6*11, 4*8 + 5*10 + 6*12] = [139, 154]
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        for (ta, tb) in ALL {
            let c = matmul_fwd_ref(&store(&a, 2, 3, ta), &store(&b, 3, 2, tb), 2, 3, 2, ta, tb).unwrap();
            assert_eq!(c, [58.0, 64.0, 139.0, 154.0], "{ta:?} {tb:?}");
        }
        // Same in f32: small integers are exact.
        let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        let b32: Vec<f32> = store(&b, 3, 2, Trans::T).iter().map(|&v| v as f32).collect();
        let c = matmul_fwd_ref(&a32, &b32, 2, 3, 2, Trans::N, Trans::T).unwrap();
        assert_eq!(c, [58.0f32, 64.0, 139.0, 154.0]);
    }

    #[test]
    fn hand_computed_linear() {
        // x = [1, 2]; W rows [1, 0], [0, 1], [1, 1]; b = [0.5, -1, 2]
        // y = [1 + 0.5, 2 - 1, 3 + 2] = [1.5, 1, 5]
        let y = linear_fwd_ref(&[1.0, 2.0], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], Some(&[0.5, -1.0, 2.0]), 1, 2, 3).unwrap();
        assert_eq!(y, [1.5, 1.0, 5.0]);
        let y = linear_fwd_ref(&[1.0, 2.0], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], None, 1, 2, 3).unwrap();
        assert_eq!(y, [1.0, 2.0, 3.0]);
        // dy = [1, 1, 1]: dx = sum of W rows = [2, 2]; dW row j = dy_j x = [1, 2]; db = dy.
        let g = linear_bwd_ref(&[1.0, 2.0], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[1.0, 1.0, 1.0], true, 1, 2, 3).unwrap();
        assert_eq!(g.dx, [2.0, 2.0]);
        assert_eq!(g.dw, [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]);
        assert_eq!(g.dbias.as_deref(), Some(&[1.0, 1.0, 1.0][..]));
    }

    #[test]
    fn matmul_backward_matches_finite_difference() {
        let mut rng = Rng::new(11);
        let shapes = [(1, 1, 1), (1, 3, 5), (3, 1, 7), (5, 7, 1), (7, 13, 3), (13, 5, 7)];
        for (m, k, n) in shapes {
            for (ta, tb) in ALL {
                let a = randn(&mut rng, m * k, 1.0);
                let b = randn(&mut rng, k * n, 1.0);
                let w = randn(&mut rng, m * n, 1.0);
                let (da, db) = matmul_bwd_ref(&a, &b, &w, m, k, n, ta, tb).unwrap();
                let na = numeric_grad(&a, 1e-6, |a| dot(&matmul_fwd_ref(a, &b, m, k, n, ta, tb).unwrap(), &w));
                let nb = numeric_grad(&b, 1e-6, |b| dot(&matmul_fwd_ref(&a, b, m, k, n, ta, tb).unwrap(), &w));
                assert_close(&alloc::format!("da {m}x{k}x{n} {ta:?}{tb:?}"), &da, &na, 1e-7);
                assert_close(&alloc::format!("db {m}x{k}x{n} {ta:?}{tb:?}"), &db, &nb, 1e-7);
            }
        }
    }

    #[test]
    fn linear_backward_matches_finite_difference() {
        let mut rng = Rng::new(12);
        for (m, k, n) in [(1, 1, 1), (1, 5, 3), (3, 7, 1), (7, 3, 5), (13, 5, 7)] {
            let x = randn(&mut rng, m * k, 1.0);
            let w = randn(&mut rng, n * k, 1.0);
            let b = randn(&mut rng, n, 1.0);
            let r = randn(&mut rng, m * n, 1.0);
            let g = linear_bwd_ref(&x, &w, &r, true, m, k, n).unwrap();
            let loss = |x: &[f64], w: &[f64], b: &[f64]| dot(&linear_fwd_ref(x, w, Some(b), m, k, n).unwrap(), &r);
            let nx = numeric_grad(&x, 1e-6, |x| loss(x, &w, &b));
            let nw = numeric_grad(&w, 1e-6, |w| loss(&x, w, &b));
            let nb = numeric_grad(&b, 1e-6, |b| loss(&x, &w, b));
            assert_close("dx", &g.dx, &nx, 1e-7);
            assert_close("dw", &g.dw, &nw, 1e-7);
            assert_close("dbias", g.dbias.as_deref().unwrap(), &nb, 1e-7);
            let g2 = linear_bwd_ref(&x, &w, &r, false, m, k, n).unwrap();
            assert!(g2.dbias.is_none());
            assert_eq!((g2.dx, g2.dw), (g.dx, g.dw));
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        let v = [0.0f64; 6];
        assert!(matches!(matmul_fwd_ref(&v[..5], &v, 2, 3, 2, Trans::N, Trans::N), Err(Error::Shape { .. })));
        assert!(matches!(matmul_fwd_ref(&v, &v[..5], 2, 3, 2, Trans::T, Trans::T), Err(Error::Shape { .. })));
        assert!(matches!(matmul_bwd_ref(&v, &v, &v[..3], 2, 3, 2, Trans::N, Trans::T), Err(Error::Shape { .. })));
        assert!(matches!(linear_fwd_ref(&v, &v, Some(&v[..1]), 2, 3, 2), Err(Error::Shape { .. })));
        assert!(matches!(linear_fwd_ref(&v[..4], &v, None, 2, 3, 2), Err(Error::Shape { .. })));
        assert!(matches!(linear_bwd_ref(&v, &v, &v[..5], true, 2, 3, 2), Err(Error::Shape { .. })));
        // A product that overflows usize is reported, not wrapped.
        assert!(matches!(matmul_fwd_ref(&v, &v, usize::MAX, 2, 1, Trans::N, Trans::N), Err(Error::Overflow(_))));
    }

    #[test]
    fn empty_reduction_gives_zeros() {
        let c = matmul_fwd_ref::<f64>(&[], &[], 2, 0, 3, Trans::N, Trans::N).unwrap();
        assert_eq!(c, [0.0; 6]);
        let y = linear_fwd_ref::<f64>(&[], &[0.0; 6], Some(&[1.0, 2.0]), 0, 3, 2).unwrap();
        assert!(y.is_empty());
    }
}
