//! Fast CPU kernels for inference, each checked against its reference in `gristmill-core`.
//!
//! The CPU is the fallback device, so only the ops that dominate its time get a fast path: the
//! products of activations with weights. `y = x Wᵀ` with W in the `nn.Linear` layout (N, K) reads
//! both operands along K contiguously, so every output is a dot product of two contiguous rows.
//! The micro-kernel computes a 2 × 2 block of outputs at once (four 8-lane accumulators: one load
//! per FMA instead of two), compiled for AVX2 + FMA when the processor has them and for the
//! baseline otherwise; threads split the rows of W. Accumulation is f32, as in the reference,
//! but in a different order: results agree to rounding, not bit for bit.

use crate::error::{Error, Result};
use gristmill_core::nf4::Nf4Tensor;

const LANES: usize = 8;

/// Four dot products: (a0·b0, a0·b1, a1·b0, a1·b1). All four slices have the same length.
#[inline(always)]
fn dot2x2_body(a0: &[f32], a1: &[f32], b0: &[f32], b1: &[f32]) -> [f32; 4] {
    let k = a0.len();
    let mut acc = [[0f32; LANES]; 4];
    let chunks = k / LANES;
    for c in 0..chunks {
        let o = c * LANES;
        let (x0, x1) = (&a0[o..o + LANES], &a1[o..o + LANES]);
        let (y0, y1) = (&b0[o..o + LANES], &b1[o..o + LANES]);
        for l in 0..LANES {
            acc[0][l] += x0[l] * y0[l];
            acc[1][l] += x0[l] * y1[l];
            acc[2][l] += x1[l] * y0[l];
            acc[3][l] += x1[l] * y1[l];
        }
    }
    let mut out = [0f32; 4];
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a.iter().sum();
    }
    for i in chunks * LANES..k {
        out[0] += a0[i] * b0[i];
        out[1] += a0[i] * b1[i];
        out[2] += a1[i] * b0[i];
        out[3] += a1[i] * b1[i];
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot2x2_avx2(a0: &[f32], a1: &[f32], b0: &[f32], b1: &[f32]) -> [f32; 4] {
    dot2x2_body(a0, a1, b0, b1)
}

#[inline]
fn dot2x2(a0: &[f32], a1: &[f32], b0: &[f32], b1: &[f32]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features this function was compiled for were just detected on this CPU.
        return unsafe { dot2x2_avx2(a0, a1, b0, b1) };
    }
    dot2x2_body(a0, a1, b0, b1)
}

/// Threads to use for `work` multiply-adds: one per core, but none for tiny products where
/// spawning costs more than it saves.
fn threads_for(work: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if work < 1 << 18 { 1 } else { cores }
}

/// y[:, j0..j1] = x · W[j0..j1]ᵀ written into `out` (M, j1 − j0), W rows given as `w_rows`.
fn matmul_nt_block(x: &[f32], w_rows: &[f32], m: usize, k: usize, out: &mut [f32]) {
    let nb = w_rows.len().checked_div(k).unwrap_or_else(|| out.len() / m.max(1));
    let mut j = 0;
    while j < nb {
        let j1 = (j + 1).min(nb - 1);
        let (b0, b1) = (&w_rows[j * k..(j + 1) * k], &w_rows[j1 * k..(j1 + 1) * k]);
        let mut i = 0;
        while i < m {
            let i1 = (i + 1).min(m - 1);
            let r = dot2x2(&x[i * k..(i + 1) * k], &x[i1 * k..(i1 + 1) * k], b0, b1);
            out[i * nb + j] = r[0];
            if j1 != j {
                out[i * nb + j1] = r[1];
            }
            if i1 != i {
                out[i1 * nb + j] = r[2];
                if j1 != j {
                    out[i1 * nb + j1] = r[3];
                }
            }
            i += 2;
        }
        j += 2;
    }
}

/// Runs `f(j0, j1, block_out)` over column blocks of the (M, N) output on several threads and
/// assembles the result.
fn par_columns(
    m: usize,
    n: usize,
    work: usize,
    block: usize,
    f: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) -> Vec<f32> {
    let threads = threads_for(work).min(n.div_ceil(block.max(1))).max(1);
    let per = n.div_ceil(threads).div_ceil(block.max(1)) * block.max(1);
    let ranges: Vec<(usize, usize)> =
        (0..threads).map(|t| (t * per, ((t + 1) * per).min(n))).filter(|(a, b)| a < b).collect();
    let parts: Vec<Vec<f32>> = if ranges.len() <= 1 {
        ranges
            .iter()
            .map(|&(a, b)| {
                let mut o = vec![0f32; m * (b - a)];
                f(a, b, &mut o);
                o
            })
            .collect()
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = ranges
                .iter()
                .map(|&(a, b)| {
                    s.spawn(move || {
                        let mut o = vec![0f32; m * (b - a)];
                        f(a, b, &mut o);
                        o
                    })
                })
                .collect();
            // A worker only panics on a bug (all lengths are checked before); re-raise it here.
            handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
        })
    };
    if ranges.len() == 1 && ranges[0] == (0, n) {
        return parts.into_iter().next().unwrap_or_default();
    }
    let mut y = vec![0f32; m * n];
    for (&(a, b), part) in ranges.iter().zip(&parts) {
        let w = b - a;
        for i in 0..m {
            y[i * n + a..i * n + b].copy_from_slice(&part[i * w..(i + 1) * w]);
        }
    }
    y
}

/// y = x · Wᵀ.
///
/// x: (M, K); w: (N, K) (`nn.Linear` layout); returns y: (M, N).
pub fn matmul_nt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
    check("matmul_nt", "x", x.len(), m, k)?;
    check("matmul_nt", "w", w.len(), n, k)?;
    if m == 0 || n == 0 {
        return Ok(vec![0f32; m * n]);
    }
    Ok(par_columns(m, n, m * n * k, 2, &|a, b, out| matmul_nt_block(x, &w[a * k..b * k], m, k, out)))
}

/// y = x · dequant(W)ᵀ for an NF4 weight (N, K), dequantizing blocks of rows on the fly into a
/// per-thread scratch buffer so the f32 weight never exists in full. The dequantized values are
/// rounded to the weight's original dtype first, as the reference stack does.
pub fn nf4_matmul_nt(x: &[f32], w: &Nf4Tensor, m: usize) -> Result<Vec<f32>> {
    let (n, k) = match *w.shape.dims() {
        [n, k] => (n, k),
        _ => return Err(Error::Invalid(format!("nf4_matmul_nt: weight of shape {} is not a matrix", w.shape))),
    };
    check("nf4_matmul_nt", "x", x.len(), m, k)?;
    w.validate()?;
    let absmax = w.absmax_f32()?;
    if m == 0 || n == 0 {
        return Ok(vec![0f32; m * n]);
    }
    // Rows per scratch block: about 64 KiB of f32 weight.
    let rows = (16384 / k.max(1)).clamp(2, 256) & !1;
    let round: fn(f32) -> f32 = match w.dtype {
        gristmill_core::DType::BF16 => |v| half::bf16::from_f32(v).to_f32(),
        gristmill_core::DType::F16 => |v| half::f16::from_f32(v).to_f32(),
        _ => |v| v,
    };
    Ok(par_columns(m, n, m * n * k, rows, &|a, b, out| {
        let nb = b - a;
        let mut scratch = vec![0f32; rows.min(nb) * k];
        let mut j = a;
        while j < b {
            let j1 = (j + rows).min(b);
            let buf = &mut scratch[..(j1 - j) * k];
            for (t, v) in buf.iter_mut().enumerate() {
                let e = j * k + t;
                *v = round(gristmill_core::nf4::NF4_CODE[w.code_at(e) as usize] * absmax[e / w.blocksize]);
            }
            let mut part = vec![0f32; m * (j1 - j)];
            matmul_nt_block(x, buf, m, k, &mut part);
            for i in 0..m {
                out[i * nb + (j - a)..i * nb + (j1 - a)].copy_from_slice(&part[i * (j1 - j)..(i + 1) * (j1 - j)]);
            }
            j = j1;
        }
    }))
}

fn check(op: &str, what: &str, len: usize, r: usize, c: usize) -> Result<()> {
    match r.checked_mul(c) {
        Some(e) if e == len => Ok(()),
        _ => Err(Error::Invalid(format!("{op}: `{what}` has {len} elements, expected {r} × {c}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gristmill_core::ops::matmul::{Trans, matmul_fwd_ref};
    use gristmill_core::rng::Rng;
    use gristmill_core::{DType, Shape};

    fn randv(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    fn close(a: &[f32], b: &[f32], k: usize) {
        assert_eq!(a.len(), b.len());
        // Different summation order: allow rounding of a K-term sum of O(1) products.
        let tol = 1e-6 * (k as f32).sqrt() * 8.0;
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "[{i}] {x} vs {y}");
        }
    }

    #[test]
    fn matmul_matches_reference_on_awkward_shapes() {
        let mut rng = Rng::new(1);
        for &(m, k, n) in &[(1, 1, 1), (1, 7, 3), (3, 9, 5), (2, 16, 2), (5, 33, 17), (1, 576, 1536), (37, 300, 129)] {
            let x = randv(&mut rng, m * k);
            let w = randv(&mut rng, n * k);
            let y = matmul_nt(&x, &w, m, k, n).unwrap();
            let r = matmul_fwd_ref(&x, &w, m, k, n, Trans::N, Trans::T).unwrap();
            close(&y, &r, k);
        }
        assert!(matmul_nt(&[0.0; 5], &[0.0; 6], 2, 3, 2).is_err());
        assert_eq!(matmul_nt(&[], &[0.0; 6], 0, 3, 2).unwrap().len(), 0);
    }

    #[test]
    fn nf4_matmul_matches_reference() {
        let mut rng = Rng::new(2);
        for &(m, k, n, dt) in &[(1, 64, 3, DType::BF16), (3, 100, 7, DType::F32), (4, 576, 301, DType::BF16)] {
            let wf = randv(&mut rng, n * k);
            let w = Nf4Tensor::quantize(&wf, Shape::new([n, k]).unwrap(), dt, true).unwrap();
            let x = randv(&mut rng, m * k);
            let y = nf4_matmul_nt(&x, &w, m).unwrap();
            let r = gristmill_core::ops::nf4_gemm::nf4_gemm_fwd_ref(&x, &w, m).unwrap();
            close(&y, &r, k);
        }
    }
}
