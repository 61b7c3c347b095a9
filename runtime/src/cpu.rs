//! Fast CPU matrix products for inference and training, each checked against its reference in
//! `gristmill-core` (`matmul_fwd_ref`, `nf4_gemm_fwd_ref`, `nf4_gemm_bwd_ref`).
//!
//! The CPU is the fallback device, so only the ops that dominate its time get a fast path: the
//! products of activations with weights and their gradients. All of them go through the `gemm`
//! crate (packed, cache-blocked micro-kernels picked at run time for the processor's SIMD), which
//! takes any row and column strides, so every transposed operand is read in place and never
//! copied.
//!
//! Letters: every function computes C (M, N) = op(A) (M, K) · op(B) (K, N), and takes `m, k, n`
//! in that order, as `matmul_fwd_ref` does. K is always the summed dimension. The suffix names how
//! A and B are *stored*: `n` as the logical operand, `t` transposed.
//!
//! | function        | A stored | B stored | typical use                                       |
//! |-----------------|----------|----------|---------------------------------------------------|
//! | [`matmul_nt`]   | (M, K)   | (N, K)   | y = x Wᵀ, forward of a linear layer               |
//! | [`matmul_nn`]   | (M, K)   | (K, N)   | dx = dy W (input gradient; the layer's N is K here)|
//! | [`matmul_tn`]   | (K, M)   | (K, N)   | dW = dyᵀ x (weight gradient; K = tokens)          |
//!
//! Each has an `_acc` form, C += op(A) · op(B), so a caller sums contributions (base + LoRA, or
//! several tokens' chunks) into one buffer without temporaries. The NF4 products
//! ([`nf4_matmul_nt`], [`nf4_matmul_nn`]) dequantize the frozen weight block by block of rows into
//! a per-thread scratch, rounded to the weight's dtype exactly as `Nf4Tensor::dequantize_rounded`
//! does, and multiply each block with `gemm`: the f32 copy of W never exists in full.
//!
//! Accumulation is f32, as in the references, but in another order (gemm blocks K and uses
//! several partial sums per lane): results agree to rounding, not bit for bit.
//!
//! Threads: see [`set_threads`]. Products under [`SERIAL_BELOW`] multiply-adds run on the calling
//! thread, where starting threads would cost more than it saves.

use crate::error::{Error, Result};
use gemm::Parallelism;
use gristmill_core::DType;
use gristmill_core::nf4::{NF4_CODE, Nf4Tensor};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Products of fewer multiply-adds (M·N·K) than this run on one thread. 2¹⁸ is about 10 µs of
/// work for one AVX2 core, the order of what waking rayon's workers costs; gemm then applies its
/// own, finer threshold to each cache block of larger products.
pub const SERIAL_BELOW: usize = 1 << 18;

/// Floats of dequantized NF4 weight per thread's scratch block: 512 KiB, so the block and the
/// packed activations stay in a 2 MiB L2 while blocks are wide enough (227 rows at K = 576) that
/// gemm re-packing the activations once per block costs a few percent; 256 KiB and 1 MiB measured
/// the same. A block has this many floats over its width rows, clamped to
/// [`NF4_MIN_ROWS`, `NF4_MAX_ROWS`].
const NF4_SCRATCH_FLOATS: usize = 1 << 17;
const NF4_MIN_ROWS: usize = 16;
const NF4_MAX_ROWS: usize = 512;

/// Dequantizing costs about as much per weight as this many multiply-adds; an NF4 product's work
/// is (M + this) · N · K, so a decode step (M = 1) on a large weight still uses every thread.
const NF4_DEQUANT_WORK: usize = 16;

/// 0: not set, use the default (`RAYON_NUM_THREADS`, else the number of cores).
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets how many threads the products of this module use; 0 restores the default.
///
/// The default is `RAYON_NUM_THREADS` when that is set to a positive number, else the number of
/// cores the process may use. Dense products run on rayon's global pool, which is sized once, from
/// `RAYON_NUM_THREADS` or the core count, when first used: a count above that pool's size cannot
/// add threads to those products (they are then split into more tasks than threads). The NF4
/// products start their own scoped threads and use the count as given. `set_threads(1)` makes
/// every product serial on the calling thread.
pub fn set_threads(n: usize) {
    THREADS.store(n, Ordering::Relaxed);
}

/// The number of threads products use now (see [`set_threads`]); at least 1.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => default_threads(),
        n => n,
    }
}

fn default_threads() -> usize {
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    })
}

/// Threads for a product of `work` multiply-adds: 1 under [`SERIAL_BELOW`].
fn threads_for(work: usize) -> usize {
    if work < SERIAL_BELOW { 1 } else { threads() }
}

fn parallelism(work: usize) -> Parallelism {
    match threads_for(work) {
        1 => Parallelism::None,
        t => Parallelism::Rayon(t),
    }
}

// ---------------------------------------------------------------------------------------------
// The one gemm call, behind bounds checks.

/// A read-only strided matrix operand: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct MatRef<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// Whether every element (i, j), i < rows, j < cols, of a strided view lies inside `len`.
fn in_bounds(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1).checked_mul(rs).and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)));
    matches!(last, Some(l) if l < len)
}

fn stride(op: &str, s: usize) -> Result<isize> {
    isize::try_from(s).map_err(|_| Error::Invalid(format!("{op}: stride {s} does not fit in isize")))
}

/// dst (M, N) {=, +=} lhs (M, K) · rhs (K, N), with dst row-major of row stride `dst_rs` (column
/// stride 1). `acc` keeps what dst holds and adds to it; otherwise dst is overwritten.
///
/// Every view is checked to lie inside its slice first, so a wrong stride in this module is an
/// error, never an out-of-bounds access.
#[allow(clippy::too_many_arguments)]
fn gemm_checked(
    op: &str,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    m: usize,
    k: usize,
    n: usize,
    acc: bool,
    par: Parallelism,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !acc {
            for row in dst.chunks_mut(dst_rs.max(1)).take(m) {
                row.iter_mut().take(n).for_each(|v| *v = 0.0);
            }
        }
        return Ok(());
    }
    // Rows of dst must not overlap (dst_rs ≥ N) or threads would write the same element.
    if dst_rs < n
        || !in_bounds(dst.len(), m, n, dst_rs, 1)
        || !in_bounds(lhs.data.len(), m, k, lhs.rs, lhs.cs)
        || !in_bounds(rhs.data.len(), k, n, rhs.rs, rhs.cs)
    {
        return Err(Error::Invalid(format!(
            "{op}: internal view out of bounds (M {m}, K {k}, N {n}; dst {} rs {dst_rs}; lhs {} rs {} cs {}; rhs {} rs {} cs {})",
            dst.len(),
            lhs.data.len(),
            lhs.rs,
            lhs.cs,
            rhs.data.len(),
            rhs.rs,
            rhs.cs
        )));
    }
    let (d_rs, l_rs, l_cs, r_rs, r_cs) =
        (stride(op, dst_rs)?, stride(op, lhs.rs)?, stride(op, lhs.cs)?, stride(op, rhs.rs)?, stride(op, rhs.cs)?);
    // SAFETY: gemm reads lhs at i·l_rs + p·l_cs (i < m, p < k), rhs at p·r_rs + j·r_cs (p < k,
    // j < n) and reads (when `acc`) and writes dst at i·d_rs + j (i < m, j < n); `in_bounds` just
    // checked that the largest of each offset is below its slice's length, and all strides are
    // non-negative, so every access is inside a live slice. dst is a `&mut` borrow, so it aliases
    // neither lhs nor rhs, and its rows do not overlap (d_rs ≥ n), so gemm's threads write
    // disjoint elements. The slices outlive the call, which returns only when all its threads are
    // done. T = f32 is one of gemm's supported types (it panics only on others).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            d_rs,
            acc,
            lhs.data.as_ptr(),
            l_cs,
            l_rs,
            rhs.data.as_ptr(),
            r_cs,
            r_rs,
            1.0, // alpha: dst := alpha·dst + beta·lhs·rhs (alpha is ignored when `acc` is false)
            1.0, // beta
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dense products.

/// `len` must equal `r × c`: the error names the op, the operand and both sizes.
fn check(op: &str, what: &str, len: usize, r: usize, c: usize) -> Result<()> {
    match r.checked_mul(c) {
        Some(e) if e == len => Ok(()),
        Some(e) => Err(Error::Invalid(format!("{op}: `{what}` has {len} elements, expected {r} × {c} = {e}"))),
        None => Err(Error::Invalid(format!("{op}: `{what}` of {r} × {c} elements overflows usize"))),
    }
}

fn work(m: usize, k: usize, n: usize) -> usize {
    m.saturating_mul(k).saturating_mul(n)
}

/// A zeroed (M, N) output. Its size is an error, not an abort, when it overflows or cannot be
/// allocated (with K = 0 the operands say nothing about M and N).
fn zeros(op: &str, m: usize, n: usize) -> Result<Vec<f32>> {
    let len = m.checked_mul(n).ok_or_else(|| Error::Invalid(format!("{op}: output of {m} × {n} overflows usize")))?;
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::Invalid(format!("{op}: cannot allocate the {m} × {n} output")))?;
    v.resize(len, 0f32);
    Ok(v)
}

/// How A and B are stored, named as in the public functions.
#[derive(Clone, Copy)]
enum Form {
    /// A (M, K), B stored (N, K).
    Nt,
    /// A (M, K), B (K, N).
    Nn,
    /// A stored (K, M), B (K, N).
    Tn,
}

/// Checks A's and B's lengths for `form`.
fn check_ab(op: &str, form: Form, a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize)) -> Result<()> {
    let (a_dims, b_dims) = match form {
        Form::Nt => ((m, k), (n, k)),
        Form::Nn => ((m, k), (k, n)),
        Form::Tn => ((k, m), (k, n)),
    };
    check(op, "a", a.len(), a_dims.0, a_dims.1)?;
    check(op, "b", b.len(), b_dims.0, b_dims.1)
}

/// out (M, N) {=, +=} op(A) · op(B).
fn dense_into(
    op: &str,
    form: Form,
    a: &[f32],
    b: &[f32],
    mkn: (usize, usize, usize),
    out: &mut [f32],
    acc: bool,
) -> Result<()> {
    let (m, k, n) = mkn;
    check_ab(op, form, a, b, mkn)?;
    check(op, "out", out.len(), m, n)?;
    let (lhs, rhs) = match form {
        // B stored (N, K): logical element (p, j) of Bᵀ is b[j·K + p].
        Form::Nt => (MatRef { data: a, rs: k, cs: 1 }, MatRef { data: b, rs: 1, cs: k }),
        Form::Nn => (MatRef { data: a, rs: k, cs: 1 }, MatRef { data: b, rs: n, cs: 1 }),
        // A stored (K, M): logical element (i, p) of Aᵀ is a[p·M + i].
        Form::Tn => (MatRef { data: a, rs: 1, cs: m }, MatRef { data: b, rs: n, cs: 1 }),
    };
    gemm_checked(op, out, n, lhs, rhs, m, k, n, acc, parallelism(work(m, k, n)))
}

/// A new (M, N) = op(A) · op(B); the operands are checked before the output is allocated.
fn dense(op: &str, form: Form, a: &[f32], b: &[f32], mkn: (usize, usize, usize)) -> Result<Vec<f32>> {
    check_ab(op, form, a, b, mkn)?;
    let mut out = zeros(op, mkn.0, mkn.2)?;
    dense_into(op, form, a, b, mkn, &mut out, false)?;
    Ok(out)
}

/// y = x · Wᵀ: the forward of a linear layer.
///
/// x: (M, K); w: (N, K), the `nn.Linear` layout (out, in); returns y: (M, N).
pub fn matmul_nt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
    dense("matmul_nt", Form::Nt, x, w, (m, k, n))
}

/// out += x · Wᵀ.
///
/// x: (M, K); w: (N, K); out: (M, N), added to.
pub fn matmul_nt_acc(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) -> Result<()> {
    dense_into("matmul_nt_acc", Form::Nt, x, w, (m, k, n), out, true)
}

/// C = A · B, both stored as the logical operands.
///
/// a: (M, K); b: (K, N); returns c: (M, N).
///
/// For the input gradient of a linear layer y = x Wᵀ with W (N_out, K_in): dx = dy · W is
/// `matmul_nn(dy, w, m, n_out, k_in)`: the product's K is the layer's N_out and its N is K_in.
pub fn matmul_nn(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
    dense("matmul_nn", Form::Nn, a, b, (m, k, n))
}

/// c += A · B.
///
/// a: (M, K); b: (K, N); out: (M, N), added to.
pub fn matmul_nn_acc(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) -> Result<()> {
    dense_into("matmul_nn_acc", Form::Nn, a, b, (m, k, n), out, true)
}

/// C = Aᵀ · B with A stored transposed: the sum over K (tokens, for a weight gradient) runs down
/// the rows of both buffers.
///
/// a: stored (K, M); b: (K, N); returns c: (M, N).
///
/// For a weight gradient of y = x Wᵀ (x (T, K_in), dy (T, N_out)): dW (N_out, K_in) = dyᵀ · x is
/// `matmul_tn(dy, x, n_out, t, k_in)`. For LoRA (u = x Aᵀ, du = dy B: (T, r)):
/// dA (r, K_in) = duᵀ · x is `matmul_tn(du, x, r, t, k_in)`.
pub fn matmul_tn(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
    dense("matmul_tn", Form::Tn, a, b, (m, k, n))
}

/// c += Aᵀ · B.
///
/// a: stored (K, M); b: (K, N); out: (M, N), added to.
pub fn matmul_tn_acc(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) -> Result<()> {
    dense_into("matmul_tn_acc", Form::Tn, a, b, (m, k, n), out, true)
}

// ---------------------------------------------------------------------------------------------
// NF4 products.

/// (N, K) of an NF4 weight, which must be a matrix.
fn nf4_shape(op: &str, w: &Nf4Tensor) -> Result<(usize, usize)> {
    match *w.shape.dims() {
        [n, k] => Ok((n, k)),
        _ => Err(Error::Invalid(format!("{op}: `w` of shape {} is not a matrix (N, K)", w.shape))),
    }
}

/// (N, K) of an NF4 weight with consistent buffers, and its scales as f32.
fn nf4_dims(op: &str, w: &Nf4Tensor) -> Result<(usize, usize, Vec<f32>)> {
    let (n, k) = nf4_shape(op, w)?;
    w.validate()?;
    Ok((n, k, w.absmax_f32()?))
}

/// The rounding `Nf4Tensor::dequantize_rounded` applies for the weight's dtype.
fn rounding(dtype: DType) -> fn(f32) -> f32 {
    match dtype {
        DType::BF16 => |v| half::bf16::from_f32(v).to_f32(),
        DType::F16 => |v| half::f16::from_f32(v).to_f32(),
        _ => |v| v,
    }
}

/// Rows per scratch block for a block `width` floats wide.
fn nf4_rows(width: usize) -> usize {
    (NF4_SCRATCH_FLOATS / width.max(1)).clamp(NF4_MIN_ROWS, NF4_MAX_ROWS)
}

/// Dequantizes W[rows, cols] (W is (·, K) row-major) into `dst`, row-major (rows.len(), cols.len()).
///
/// Each value is `round(NF4_CODE[q] · absmax[block])`, the same f32 operations as
/// `dequantize_rounded`; they are precomputed per scale block as a 16-entry table, so the inner
/// loop is one lookup per weight. `w` was validated, so every index is in range.
fn dequant_block(
    w: &Nf4Tensor,
    absmax: &[f32],
    round: fn(f32) -> f32,
    k: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    dst: &mut [f32],
) {
    let bs = w.blocksize;
    let width = cols.len();
    let mut lut_block = usize::MAX;
    let mut lut = [0f32; 16];
    for (j, drow) in rows.zip(dst.chunks_exact_mut(width.max(1))) {
        let (mut e, end) = (j * k + cols.start, j * k + cols.end);
        let mut o = 0;
        while e < end {
            let block = e / bs;
            let seg_end = end.min((block + 1) * bs);
            if block != lut_block {
                let scale = absmax[block];
                for (l, c) in lut.iter_mut().zip(NF4_CODE) {
                    *l = round(c * scale);
                }
                lut_block = block;
            }
            // Element 2i is the high nibble of byte i: an odd start takes one low nibble first,
            // then whole bytes, then at most one high nibble.
            if e % 2 == 1 {
                drow[o] = lut[(w.packed[e / 2] & 15) as usize];
                e += 1;
                o += 1;
            }
            let pairs = seg_end.saturating_sub(e) / 2;
            for (byte, d) in w.packed[e / 2..e / 2 + pairs].iter().zip(drow[o..o + 2 * pairs].chunks_exact_mut(2)) {
                d[0] = lut[(byte >> 4) as usize];
                d[1] = lut[(byte & 15) as usize];
            }
            e += 2 * pairs;
            o += 2 * pairs;
            if e < seg_end {
                drow[o] = lut[(w.packed[e / 2] >> 4) as usize];
                e += 1;
                o += 1;
            }
        }
    }
}

/// `f(c0, c1, dst, dst_rs)` of [`split_columns`].
type ColumnsFn<'a> = dyn Fn(usize, usize, &mut [f32], usize) -> Result<()> + Sync + 'a;

/// Splits the `cols` output columns of an (M, cols) product over `t` threads and runs
/// `f(c0, c1, dst, dst_rs)` on each range, where dst holds columns c0..c1 of every row at row
/// stride dst_rs and must be *added to*. One thread writes straight into `out`; several each fill a
/// zeroed part of their own, added into `out` afterwards (an (M, N) row-major output cannot be
/// split into column ranges as slices).
fn split_columns(op: &str, m: usize, cols: usize, t: usize, out: &mut [f32], f: &ColumnsFn<'_>) -> Result<()> {
    let per = cols.div_ceil(t.max(1)).max(1);
    let ranges: Vec<(usize, usize)> =
        (0..t).map(|i| (i * per, ((i + 1) * per).min(cols))).filter(|(a, b)| a < b).collect();
    if ranges.len() <= 1 {
        return f(0, cols, out, cols);
    }
    let parts: Vec<Result<Vec<f32>>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranges
            .iter()
            .map(|&(a, b)| {
                s.spawn(move || -> Result<Vec<f32>> {
                    let mut part = vec![0f32; m * (b - a)];
                    f(a, b, &mut part, b - a)?;
                    Ok(part)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Invalid(format!("{op}: a worker thread panicked")))))
            .collect()
    });
    for (&(a, b), part) in ranges.iter().zip(parts) {
        let part = part?;
        for (orow, prow) in out.chunks_exact_mut(cols).zip(part.chunks_exact(b - a)) {
            orow[a..b].iter_mut().zip(prow).for_each(|(o, p)| *o += p);
        }
    }
    Ok(())
}

fn nf4_nt_into(op: &str, x: &[f32], w: &Nf4Tensor, m: usize, out: &mut [f32]) -> Result<()> {
    let (n, k, absmax) = nf4_dims(op, w)?;
    check(op, "x", x.len(), m, k)?;
    check(op, "out", out.len(), m, n)?;
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let round = rounding(w.dtype);
    let rows = nf4_rows(k);
    let t = threads_for(work(m + NF4_DEQUANT_WORK, k, n));
    // Threads split the rows of W, i.e. the columns of y; each multiplies its blocks serially.
    split_columns(op, m, n, t, out, &|j0, j1, dst, dst_rs| {
        let mut scratch = vec![0f32; rows.min(j1 - j0) * k];
        let mut j = j0;
        while j < j1 {
            let jb = (j + rows).min(j1);
            let buf = &mut scratch[..(jb - j) * k];
            dequant_block(w, &absmax, round, k, j..jb, 0..k, buf);
            // y[:, j..jb] += x · W[j..jb]ᵀ: the block (jb − j, K) read transposed.
            let lhs = MatRef { data: x, rs: k, cs: 1 };
            let rhs = MatRef { data: buf, rs: 1, cs: k };
            gemm_checked(op, &mut dst[j - j0..], dst_rs, lhs, rhs, m, k, jb - j, true, Parallelism::None)?;
            j = jb;
        }
        Ok(())
    })
}

fn nf4_nn_into(op: &str, dy: &[f32], w: &Nf4Tensor, m: usize, out: &mut [f32]) -> Result<()> {
    let (n, k, absmax) = nf4_dims(op, w)?;
    check(op, "dy", dy.len(), m, n)?;
    check(op, "out", out.len(), m, k)?;
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let round = rounding(w.dtype);
    let t = threads_for(work(m + NF4_DEQUANT_WORK, k, n));
    // Threads split the columns of W (those of dx); each walks down the rows of W (the summed
    // dimension) a block at a time, adding dy[:, j..jb] · W[j..jb, c0..c1] to its columns.
    split_columns(op, m, k, t, out, &|c0, c1, dst, dst_rs| {
        let width = c1 - c0;
        let rows = nf4_rows(width);
        let mut scratch = vec![0f32; rows.min(n) * width];
        let mut j = 0;
        while j < n {
            let jb = (j + rows).min(n);
            let buf = &mut scratch[..(jb - j) * width];
            dequant_block(w, &absmax, round, k, j..jb, c0..c1, buf);
            let lhs = MatRef { data: &dy[j..], rs: n, cs: 1 };
            let rhs = MatRef { data: buf, rs: width, cs: 1 };
            gemm_checked(op, dst, dst_rs, lhs, rhs, m, jb - j, width, true, Parallelism::None)?;
            j = jb;
        }
        Ok(())
    })
}

/// y = x · dequant(W)ᵀ for a frozen NF4 weight: the forward of a QLoRA base layer.
///
/// x: (M, K); w: NF4 (N, K); returns y: (M, N). Equals `nf4_gemm_fwd_ref` up to f32 summation
/// order.
pub fn nf4_matmul_nt(x: &[f32], w: &Nf4Tensor, m: usize) -> Result<Vec<f32>> {
    const OP: &str = "nf4_matmul_nt";
    let (n, k) = nf4_shape(OP, w)?;
    check(OP, "x", x.len(), m, k)?;
    let mut out = zeros(OP, m, n)?;
    nf4_nt_into(OP, x, w, m, &mut out)?;
    Ok(out)
}

/// out += x · dequant(W)ᵀ.
///
/// x: (M, K); w: NF4 (N, K); out: (M, N), added to.
pub fn nf4_matmul_nt_acc(x: &[f32], w: &Nf4Tensor, m: usize, out: &mut [f32]) -> Result<()> {
    nf4_nt_into("nf4_matmul_nt_acc", x, w, m, out)
}

/// dx = dy · dequant(W): the input gradient through a frozen NF4 weight.
///
/// dy: (M, N); w: NF4 (N, K); returns dx: (M, K). Equals `nf4_gemm_bwd_ref` up to f32 summation
/// order.
pub fn nf4_matmul_nn(dy: &[f32], w: &Nf4Tensor, m: usize) -> Result<Vec<f32>> {
    const OP: &str = "nf4_matmul_nn";
    let (n, k) = nf4_shape(OP, w)?;
    check(OP, "dy", dy.len(), m, n)?;
    let mut out = zeros(OP, m, k)?;
    nf4_nn_into(OP, dy, w, m, &mut out)?;
    Ok(out)
}

/// dx += dy · dequant(W), e.g. onto the LoRA path's contribution.
///
/// dy: (M, N); w: NF4 (N, K); out: (M, K), added to.
pub fn nf4_matmul_nn_acc(dy: &[f32], w: &Nf4Tensor, m: usize, out: &mut [f32]) -> Result<()> {
    nf4_nn_into("nf4_matmul_nn_acc", dy, w, m, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gristmill_core::ops::matmul::{Trans, matmul_fwd_ref};
    use gristmill_core::ops::nf4_gemm::{nf4_gemm_bwd_ref, nf4_gemm_fwd_ref};
    use gristmill_core::rng::Rng;
    use gristmill_core::{DType, Shape};

    /// (M, K, N): ones, thin sides, odd sizes, and the SmolLM2 MLP shape.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (1, 7, 3),
        (5, 9, 1),
        (4, 1, 6),
        (3, 7, 5),
        (2, 16, 2),
        (17, 33, 65),
        (1, 576, 1536),
        (37, 300, 129),
        (64, 576, 1536),
    ];

    fn randv(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// Tolerance: both sides sum K f32 products of O(1) inputs in different orders, so they differ
    /// by rounding that grows like √K times the size of the terms; with outputs of rms ~ √K,
    /// |got − want| ≤ 1e-5 · √K · max(1, rms(want)) (a relative 1e-5·√K bound) holds with
    /// ~100× margin, while any indexing bug is off by O(rms).
    #[track_caller]
    fn close(what: &str, got: &[f32], want: &[f32], k: usize) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let rms = (want.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / want.len().max(1) as f64).sqrt();
        let tol = 1e-5 * (k.max(1) as f64).sqrt() * rms.max(1.0);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let d = f64::from(g - w).abs();
            assert!(d <= tol, "{what}[{i}]: {g} vs {w} (|Δ| {d:e} > {tol:e})");
        }
    }

    #[test]
    fn dense_products_match_reference_on_awkward_shapes() {
        let mut rng = Rng::new(1);
        for &(m, k, n) in SHAPES {
            let a = randv(&mut rng, m * k);
            let b = randv(&mut rng, k * n);
            let tag = format!("({m},{k},{n})");
            // nt: A (M, K), B stored (N, K).
            let want = matmul_fwd_ref(&a, &b, m, k, n, Trans::N, Trans::T).unwrap();
            close(&format!("nt {tag}"), &matmul_nt(&a, &b, m, k, n).unwrap(), &want, k);
            // nn: A (M, K), B (K, N).
            let want = matmul_fwd_ref(&a, &b, m, k, n, Trans::N, Trans::N).unwrap();
            close(&format!("nn {tag}"), &matmul_nn(&a, &b, m, k, n).unwrap(), &want, k);
            // tn: A stored (K, M), B (K, N).
            let want = matmul_fwd_ref(&a, &b, m, k, n, Trans::T, Trans::N).unwrap();
            close(&format!("tn {tag}"), &matmul_tn(&a, &b, m, k, n).unwrap(), &want, k);
        }
    }

    #[test]
    fn accumulate_forms_add_to_the_output() {
        let mut rng = Rng::new(2);
        for &(m, k, n) in &[(1, 1, 1), (3, 7, 5), (37, 300, 129)] {
            let a = randv(&mut rng, m * k);
            let b = randv(&mut rng, k * n);
            let c0 = randv(&mut rng, m * n);
            let plus = |p: Vec<f32>| p.iter().zip(&c0).map(|(x, y)| x + y).collect::<Vec<f32>>();
            type Acc = fn(&[f32], &[f32], usize, usize, usize, &mut [f32]) -> Result<()>;
            let cases: [(&str, Acc, Trans, Trans); 3] = [
                ("nt_acc", matmul_nt_acc, Trans::N, Trans::T),
                ("nn_acc", matmul_nn_acc, Trans::N, Trans::N),
                ("tn_acc", matmul_tn_acc, Trans::T, Trans::N),
            ];
            for (name, f, ta, tb) in cases {
                let mut c = c0.clone();
                f(&a, &b, m, k, n, &mut c).unwrap();
                close(name, &c, &plus(matmul_fwd_ref(&a, &b, m, k, n, ta, tb).unwrap()), k);
                // Twice: the sum of two contributions.
                f(&a, &b, m, k, n, &mut c).unwrap();
                let twice: Vec<f32> = matmul_fwd_ref(&a, &b, m, k, n, ta, tb)
                    .unwrap()
                    .iter()
                    .zip(&c0)
                    .map(|(p, y)| 2.0 * p + y)
                    .collect();
                close(name, &c, &twice, 2 * k);
            }
        }
    }

    #[test]
    fn thread_counts_give_the_same_products() {
        // Serial and threaded paths must agree (up to gemm's blocking, which depends on threads).
        let mut rng = Rng::new(3);
        let (m, k, n) = (64, 300, 257);
        let a = randv(&mut rng, m * k);
        let b = randv(&mut rng, n * k);
        let wq = Nf4Tensor::quantize(&b, Shape::new([n, k]).unwrap(), DType::BF16, true).unwrap();
        let want = matmul_fwd_ref(&a, &b, m, k, n, Trans::N, Trans::T).unwrap();
        let want_q = nf4_gemm_fwd_ref(&a, &wq, m).unwrap();
        let dy = randv(&mut rng, m * n);
        let want_dq = nf4_gemm_bwd_ref(&dy, &wq, m).unwrap();
        for t in [1, 2, 3, 0] {
            set_threads(t);
            assert!(threads() >= 1);
            close(&format!("nt t={t}"), &matmul_nt(&a, &b, m, k, n).unwrap(), &want, k);
            close(&format!("nf4 nt t={t}"), &nf4_matmul_nt(&a, &wq, m).unwrap(), &want_q, k);
            close(&format!("nf4 nn t={t}"), &nf4_matmul_nn(&dy, &wq, m).unwrap(), &want_dq, n);
        }
    }

    #[test]
    fn nf4_products_match_reference() {
        let mut rng = Rng::new(4);
        // Row blocks of nf4_rows(K) rows: N and K here are not multiples of them (nor of 64, the
        // scale block), so partial blocks and scale blocks straddling rows are exercised; odd
        // N·K leaves a padding nibble.
        let rows = nf4_rows(576);
        let cases: &[(usize, usize, usize, DType)] = &[
            (1, 1, 1, DType::F32),
            (1, 64, 3, DType::BF16),
            (3, 7, 5, DType::F16),
            (5, 1, 9, DType::BF16),
            (3, 100, 7, DType::F32),
            (37, 300, 129, DType::BF16),
            (4, 576, 2 * rows + 3, DType::BF16),
            (64, 576, 1536, DType::BF16),
            (2, 1536, 577, DType::F32),
        ];
        for &(m, k, n, dt) in cases {
            let wf = randv(&mut rng, n * k);
            let w = Nf4Tensor::quantize(&wf, Shape::new([n, k]).unwrap(), dt, true).unwrap();
            let x = randv(&mut rng, m * k);
            let dy = randv(&mut rng, m * n);
            let tag = format!("({m},{k},{n},{dt})");
            let want = nf4_gemm_fwd_ref(&x, &w, m).unwrap();
            close(&format!("nf4 nt {tag}"), &nf4_matmul_nt(&x, &w, m).unwrap(), &want, k);
            let want_dx = nf4_gemm_bwd_ref(&dy, &w, m).unwrap();
            close(&format!("nf4 nn {tag}"), &nf4_matmul_nn(&dy, &w, m).unwrap(), &want_dx, n);
            // Accumulate forms.
            let y0 = randv(&mut rng, m * n);
            let mut y = y0.clone();
            nf4_matmul_nt_acc(&x, &w, m, &mut y).unwrap();
            let want_acc: Vec<f32> = want.iter().zip(&y0).map(|(a, b)| a + b).collect();
            close(&format!("nf4 nt acc {tag}"), &y, &want_acc, k);
            let dx0 = randv(&mut rng, m * k);
            let mut dx = dx0.clone();
            nf4_matmul_nn_acc(&dy, &w, m, &mut dx).unwrap();
            let want_acc: Vec<f32> = want_dx.iter().zip(&dx0).map(|(a, b)| a + b).collect();
            close(&format!("nf4 nn acc {tag}"), &dx, &want_acc, n);
        }
    }

    #[test]
    fn nf4_dequantization_is_exactly_dequantize_rounded() {
        // Blocksize 32 and an odd K: scale blocks and nibble parity cross row boundaries.
        let mut rng = Rng::new(5);
        let (n, k) = (13, 45);
        for dt in [DType::BF16, DType::F16, DType::F32] {
            let wf = randv(&mut rng, n * k);
            let w = Nf4Tensor::quantize_with_blocksize(&wf, Shape::new([n, k]).unwrap(), dt, 32, false).unwrap();
            let full = w.dequantize_rounded().unwrap();
            let absmax = w.absmax_f32().unwrap();
            let (rows, cols) = (2..11, 3..44);
            let mut got = vec![0f32; rows.len() * cols.len()];
            dequant_block(&w, &absmax, rounding(dt), k, rows.clone(), cols.clone(), &mut got);
            for (r, j) in rows.enumerate() {
                for (c, col) in cols.clone().enumerate() {
                    assert_eq!(got[r * cols.len() + c].to_bits(), full[j * k + col].to_bits(), "{dt} ({j}, {col})");
                }
            }
            // A product with it is the reference's product (identity x picks out rows of Wᵀ).
            let eye: Vec<f32> = (0..k * k).map(|i| if i / k == i % k { 1.0 } else { 0.0 }).collect();
            let y = nf4_matmul_nt(&eye, &w, k).unwrap();
            for i in 0..k {
                for j in 0..n {
                    assert_eq!(y[i * n + j], full[j * k + i]);
                }
            }
        }
    }

    #[test]
    fn zero_sizes() {
        for &(m, k, n) in &[(0, 3, 2), (2, 0, 3), (2, 3, 0), (0, 0, 0)] {
            let a = vec![1.0f32; m * k];
            let b = vec![1.0f32; k * n];
            for c in [matmul_nt(&a, &b, m, k, n), matmul_nn(&a, &b, m, k, n), matmul_tn(&a, &b, m, k, n)] {
                let c = c.unwrap();
                assert_eq!(c.len(), m * n);
                assert!(c.iter().all(|&v| v == 0.0));
            }
            // K = 0 adds nothing.
            let mut out = vec![7.0f32; m * n];
            matmul_nt_acc(&a, &b, m, k, n, &mut out).unwrap();
            matmul_nn_acc(&a, &b, m, k, n, &mut out).unwrap();
            matmul_tn_acc(&a, &b, m, k, n, &mut out).unwrap();
            assert!(out.iter().all(|&v| v == 7.0));
        }
        let w = Nf4Tensor::quantize(&[1.0; 6], Shape::new([2, 3]).unwrap(), DType::F32, false).unwrap();
        assert!(nf4_matmul_nt(&[], &w, 0).unwrap().is_empty());
        assert!(nf4_matmul_nn(&[], &w, 0).unwrap().is_empty());
        for (n, k) in [(0, 5), (4, 0)] {
            let w = Nf4Tensor::quantize(&[], Shape::new([n, k]).unwrap(), DType::BF16, true).unwrap();
            assert_eq!(nf4_matmul_nt(&vec![1.0; 3 * k], &w, 3).unwrap(), vec![0.0; 3 * n]);
            assert_eq!(nf4_matmul_nn(&vec![1.0; 3 * n], &w, 3).unwrap(), vec![0.0; 3 * k]);
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        let msg = |r: Result<Vec<f32>>| match r {
            Err(Error::Invalid(s)) => s,
            other => panic!("expected Error::Invalid, got {other:?}"),
        };
        let s = msg(matmul_nt(&[0.0; 5], &[0.0; 6], 2, 3, 2));
        assert!(s.contains("matmul_nt") && s.contains("`a`") && s.contains("5") && s.contains("2 × 3"), "{s}");
        let s = msg(matmul_nn(&[0.0; 6], &[0.0; 5], 2, 3, 2));
        assert!(s.contains("matmul_nn") && s.contains("`b`") && s.contains("3 × 2"), "{s}");
        let s = msg(matmul_tn(&[0.0; 7], &[0.0; 6], 2, 3, 2));
        assert!(s.contains("matmul_tn") && s.contains("`a`") && s.contains("3 × 2"), "{s}");
        let mut out = vec![0.0; 3];
        assert!(matmul_nt_acc(&[0.0; 6], &[0.0; 6], 2, 3, 2, &mut out).is_err());
        assert!(matmul_nn_acc(&[0.0; 6], &[0.0; 6], 2, 3, 2, &mut out).is_err());
        assert!(matmul_tn_acc(&[0.0; 6], &[0.0; 6], 2, 3, 2, &mut out).is_err());
        // Overflowing sizes are errors, not panics or huge allocations.
        assert!(matmul_nt(&[], &[], usize::MAX, 2, 0).is_err());
        assert!(matmul_nn(&[0.0; 2], &[], 1, 2, usize::MAX).is_err());

        let w = Nf4Tensor::quantize(&[1.0; 6], Shape::new([2, 3]).unwrap(), DType::F32, false).unwrap();
        let s = msg(nf4_matmul_nt(&[1.0; 5], &w, 2));
        assert!(s.contains("nf4_matmul_nt") && s.contains("`x`") && s.contains("2 × 3"), "{s}");
        let s = msg(nf4_matmul_nn(&[1.0; 3], &w, 2));
        assert!(s.contains("nf4_matmul_nn") && s.contains("`dy`") && s.contains("2 × 2"), "{s}");
        let mut out = vec![0.0; 5];
        assert!(nf4_matmul_nt_acc(&[1.0; 6], &w, 2, &mut out).is_err());
        assert!(nf4_matmul_nn_acc(&[1.0; 4], &w, 2, &mut out).is_err());
        // A weight that is not a matrix, and one with damaged buffers.
        let w3 = Nf4Tensor::quantize(&[1.0; 8], Shape::new([2, 2, 2]).unwrap(), DType::F32, false).unwrap();
        assert!(nf4_matmul_nt(&[1.0; 4], &w3, 2).is_err());
        assert!(nf4_matmul_nn(&[1.0; 4], &w3, 2).is_err());
        let mut bad = w.clone();
        bad.packed.pop();
        assert!(nf4_matmul_nt(&[1.0; 6], &bad, 2).is_err());
        assert!(nf4_matmul_nn(&[1.0; 4], &bad, 2).is_err());
    }
}
