//! The NF4 linear layer: y = x · Wᵀ with W stored in NF4, and its input gradient dx = dy · W.
//!
//! The frozen base weight of QLoRA never gets a gradient, so the backward is only dX. The weight
//! is dequantized and rounded to its original dtype (bf16 for a bf16 checkpoint) before the
//! product, which is what the reference stack multiplies by and what the fused kernels must
//! reproduce while never writing that dequantized copy to memory.

use crate::error::{Error, Result, check_len, checked_product};
use crate::nf4::Nf4Tensor;
use crate::ops::matmul::{Trans, matmul_fwd_ref};
use crate::real::Real;
use alloc::vec::Vec;

/// (N, K) of a weight that must be a matrix.
fn weight_dims(op: &'static str, w: &Nf4Tensor) -> Result<(usize, usize)> {
    match *w.shape.dims() {
        [n, k] => Ok((n, k)),
        _ => Err(Error::Shape { op, what: "weight rank", expected: 2, found: w.shape.rank() }),
    }
}

fn weight_as<T: Real>(w: &Nf4Tensor) -> Result<Vec<T>> {
    Ok(w.dequantize_rounded()?.into_iter().map(T::from_f32).collect())
}

/// y = x · Wᵀ.
///
/// x: (M, K)
/// w: NF4 (N, K)
/// returns y: (M, N)
pub fn nf4_gemm_fwd_ref<T: Real>(x: &[T], w: &Nf4Tensor, m: usize) -> Result<Vec<T>> {
    const OP: &str = "nf4_gemm_fwd_ref";
    let (n, k) = weight_dims(OP, w)?;
    check_len(OP, "x", x.len(), checked_product(&[m, k])?)?;
    matmul_fwd_ref(x, &weight_as::<T>(w)?, m, k, n, Trans::N, Trans::T)
}

/// dx = dy · W.
///
/// dy: (M, N)
/// w: NF4 (N, K)
/// returns dx: (M, K)
pub fn nf4_gemm_bwd_ref<T: Real>(dy: &[T], w: &Nf4Tensor, m: usize) -> Result<Vec<T>> {
    const OP: &str = "nf4_gemm_bwd_ref";
    let (n, k) = weight_dims(OP, w)?;
    check_len(OP, "dy", dy.len(), checked_product(&[m, n])?)?;
    matmul_fwd_ref(dy, &weight_as::<T>(w)?, m, n, k, Trans::N, Trans::N)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::rng::Rng;
    use crate::shape::Shape;
    use crate::testutil::{assert_close, dot, numeric_grad, randn};

    #[test]
    fn hand_computed_forward() {
        // W = [[2, -2], [0, 1]] is exact in NF4 (codes ±1 and 0 of block absmax 2): y = x Wᵀ.
        let w = Nf4Tensor::quantize(&[2.0, -2.0, 0.0, 1.0], Shape::new([2, 2]).unwrap(), DType::F32, false).unwrap();
        // 1.0 / 2 = 0.5 is not a code: it becomes 0.4407·2 = 0.88141966.
        let y = nf4_gemm_fwd_ref(&[1.0f64, 3.0], &w, 1).unwrap();
        assert_eq!(y[0], 2.0 - 6.0);
        assert!((y[1] - 3.0 * 0.881_419_658_660_888_7).abs() < 1e-6);
    }

    #[test]
    fn backward_matches_finite_difference_and_dequantized_linear() {
        let mut rng = Rng::new(21);
        for &(m, n, k) in &[(1usize, 5usize, 7usize), (3, 13, 65), (4, 1, 9)] {
            let wf: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let w = Nf4Tensor::quantize(&wf, Shape::new([n, k]).unwrap(), DType::BF16, true).unwrap();
            let x = randn(&mut rng, m * k, 1.0);
            let dy = randn(&mut rng, m * n, 1.0);
            let dx = nf4_gemm_bwd_ref(&dy, &w, m).unwrap();
            let num = numeric_grad(&x, 1e-6, |xp| dot(&nf4_gemm_fwd_ref(xp, &w, m).unwrap(), &dy));
            assert_close("dx", &dx, &num, 1e-7);
            // The weight is bf16-rounded: every element is a bf16 value.
            for v in w.dequantize_rounded().unwrap() {
                assert_eq!(half::bf16::from_f32(v).to_f32(), v);
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let w = Nf4Tensor::quantize(&[1.0; 6], Shape::new([2, 3]).unwrap(), DType::F32, false).unwrap();
        assert!(nf4_gemm_fwd_ref(&[1.0f32; 5], &w, 2).is_err());
        assert!(nf4_gemm_bwd_ref(&[1.0f32; 3], &w, 2).is_err());
        let w3 = Nf4Tensor::quantize(&[1.0; 8], Shape::new([2, 2, 2]).unwrap(), DType::F32, false).unwrap();
        assert!(nf4_gemm_fwd_ref(&[1.0f32; 4], &w3, 2).is_err());
    }
}
