//! Launchers of kernels/cuda/elementwise.cu: embedding, RMSNorm (plain and fused with the residual
//! add), RoPE, SwiGLU, dropout and the residual add, forward and backward.
//!
//! All are memory-bound. Data moves in 16-byte chunks (4 f32 or 8 bf16) with vector loads when
//! every pointer is 16-byte aligned (and, for row-wise ops, rows are whole chunks); views at odd
//! offsets and odd sizes take the element-by-element path of the same kernels. Row-wise ops run
//! one block per row and read the row once; the others are grid-stride loops of one wave, sized by
//! the driver's occupancy figure for the kernel at hand. On Hopper the module's compute_90a build
//! is loaded, whose embedding backward adds 16 bytes per atomic.

use crate::Gpu;
use crate::check::{self, BenchRow, Check, Work};
use crate::error::{KernelError, Result, check_len, to_i32};
use crate::launch::{Float, grid_rows, ptr, ptr_mut};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use gristmill_core::ops::{embedding, lora, rmsnorm, rope, swiglu};
use gristmill_core::rng::mix64;

const MODULE: &str = "elementwise";
/// Chunks a thread of a row-wise kernel keeps in registers (ROW_ITEMS in elementwise.cu).
const ROW_ITEMS: usize = 2;
/// Most threads of a row-wise block (ROW_THREADS, the kernels' launch bound).
const ROW_THREADS: usize = 512;
/// Threads of a flat kernel's block (FLAT_THREADS).
const FLAT_THREADS: u32 = 256;
/// Chunks a thread of the SwiGLU forward, dropout and add handles per loop iteration
/// (FLAT_UNROLL); the SwiGLU backward handles one.
const FLAT_UNROLL: usize = 2;

/// Elements of `T` in a 16-byte chunk.
fn lanes<T>() -> usize {
    16 / std::mem::size_of::<T>()
}

/// Threads of the block that handles a row of `c` elements, `lanes` a chunk: enough that every
/// thread holds at most ROW_ITEMS chunks, a multiple of 32, within 32..=ROW_THREADS.
fn row_threads(c: usize, lanes: usize) -> u32 {
    let per_thread = c.div_ceil(lanes.max(1)).div_ceil(ROW_ITEMS);
    per_thread.next_multiple_of(32).clamp(32, ROW_THREADS) as u32
}

/// Blocks of a flat kernel over `units` chunks, `per_thread` of them a thread: enough to cover
/// them in one pass, at most `wave` (the blocks resident on the whole GPU at once).
fn flat_blocks(units: usize, per_thread: usize, wave: usize) -> u32 {
    let cover = units.div_ceil(FLAT_THREADS as usize * per_thread.max(1));
    cover.clamp(1, wave.max(1)).min(u32::MAX as usize) as u32
}

/// One wave of `f`'s FLAT_THREADS-thread blocks, or fewer when they cover `units` chunks at
/// `per_thread` a thread. The wave comes from the driver's occupancy figure for `f` (its
/// registers decide how many blocks an SM holds): a grid-stride loop over a wave and a third
/// waits for the last third as long as for a whole wave.
fn flat_cfg(gpu: &Gpu, f: &CudaFunction, units: usize, per_thread: usize) -> Result<LaunchConfig> {
    let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(FLAT_THREADS, 0, None)?.max(1);
    let mp = usize::try_from(gpu.info().multiprocessors).unwrap_or(1);
    let wave = mp.saturating_mul(per_sm as usize);
    let blocks = flat_blocks(units, per_thread, wave);
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (FLAT_THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// Whether the vector path may be taken: every address 16-byte aligned and `len` (the row or
/// head length the chunks tile) a multiple of the chunk.
fn vec_ok(addrs: &[u64], len: usize, lanes: usize) -> i32 {
    i32::from(len.is_multiple_of(lanes) && addrs.iter().all(|a| a % 16 == 0))
}

/// Whether the embedding backward may add quads of 4 elements (float4 atomics on Hopper): C a
/// multiple of 4, dtable 16-byte aligned and dy aligned to 4 of its elements, so that every row
/// starts aligned too.
fn quads_ok(dy: u64, dtable: u64, c: usize, elem: usize) -> i32 {
    i32::from(c.is_multiple_of(4) && dtable.is_multiple_of(16) && dy.is_multiple_of(4 * elem as u64))
}

/// `a · b`, or a shape error when it overflows.
fn prod(kernel: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| KernelError::shape(kernel, format!("{a} × {b} overflows")))
}

/// tokens: (M) u32; table: (V, C); out: (M, C), with M = tokens.len().
///
/// out[m] = table[tokens[m]]. A token id ≥ V writes a row of zeros: the caller validates ids on
/// the host, and the kernel never reads outside the table.
pub fn embedding_fwd<T: Float>(
    gpu: &Gpu,
    tokens: &impl DevicePtr<u32>,
    table: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<T>,
    v: usize,
    c: usize,
) -> Result<()> {
    const K: &str = "embedding_fwd";
    let m = tokens.len();
    check_len(K, "table", table.len(), prod(K, v, c)?)?;
    check_len(K, "out", out.len(), prod(K, m, c)?)?;
    let (mi, vi, ci) = (to_i32(K, "M", m)?, to_i32(K, "V", v)?, to_i32(K, "C", c)?);
    if mi == 0 || ci == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, T::pick("embedding_fwd_f32", "embedding_fwd_bf16"))?;
    let (pt, ptab, po) = (ptr(gpu, tokens), ptr(gpu, table), ptr_mut(gpu, out));
    let vec = vec_ok(&[ptab, po], c, lanes::<T>());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pt).arg(&ptab).arg(&po).arg(&vi).arg(&ci).arg(&vec);
    // SAFETY: block m reads tokens[m] (M ids) and writes row m of out (M·C); it reads table row
    // tokens[m] only when tokens[m] < V, and table holds V·C. vec only with aligned pointers and
    // C a multiple of the chunk.
    unsafe { b.launch(grid_rows(m, row_threads(c, lanes::<T>()))) }?;
    Ok(())
}

/// tokens: (M) u32; dy: (M, C); dtable: (V, C) f32, accumulated into.
///
/// dtable[tokens[m]] += dy[m] (f32 atomics, so repeated ids sum in no fixed order); ids ≥ V are
/// skipped. On Hopper, with C a multiple of 4 and aligned buffers, each atomic adds 4 elements.
pub fn embedding_bwd<T: Float>(
    gpu: &Gpu,
    tokens: &impl DevicePtr<u32>,
    dy: &impl DevicePtr<T>,
    dtable: &mut impl DevicePtrMut<f32>,
    v: usize,
    c: usize,
) -> Result<()> {
    const K: &str = "embedding_bwd";
    let m = tokens.len();
    check_len(K, "dy", dy.len(), prod(K, m, c)?)?;
    check_len(K, "dtable", dtable.len(), prod(K, v, c)?)?;
    let (mi, vi, ci) = (to_i32(K, "M", m)?, to_i32(K, "V", v)?, to_i32(K, "C", c)?);
    if mi == 0 || ci == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, T::pick("embedding_bwd_f32", "embedding_bwd_bf16"))?;
    let (pt, pd, ptab) = (ptr(gpu, tokens), ptr(gpu, dy), ptr_mut(gpu, dtable));
    let vec = quads_ok(pd, ptab, c, std::mem::size_of::<T>());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pt).arg(&pd).arg(&ptab).arg(&vi).arg(&ci).arg(&vec);
    // SAFETY: block m reads tokens[m] and row m of dy (M·C), and adds into row tokens[m] of
    // dtable only when tokens[m] < V (dtable holds V·C); the quad path only with C a multiple of
    // 4, dtable 16-byte and dy 4·sizeof(T)-byte aligned.
    unsafe { b.launch(grid_rows(m, row_threads(c, 4))) }?;
    Ok(())
}

/// The checks every RMSNorm launcher shares: C > 0, eps finite and ≥ 0, M and C as i32.
fn rms_dims(kernel: &'static str, m: usize, c: usize, eps: f32) -> Result<(i32, i32)> {
    if c == 0 {
        return Err(KernelError::shape(kernel, "C = 0: the normalised dimension must be non-zero"));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(KernelError::shape(kernel, format!("eps must be finite and non-negative, got {eps}")));
    }
    Ok((to_i32(kernel, "M", m)?, to_i32(kernel, "C", c)?))
}

/// x: (M, C); w: (C) f32; y: (M, C); rstd: (M) f32, saved for the backward.
///
/// rstd = 1/sqrt(mean(x²) + eps) per row and y = w · (x · rstd), in f32, y rounded once to T.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_fwd<T: Float>(
    gpu: &Gpu,
    x: &impl DevicePtr<T>,
    w: &impl DevicePtr<f32>,
    y: &mut impl DevicePtrMut<T>,
    rstd: &mut impl DevicePtrMut<f32>,
    m: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
    const K: &str = "rmsnorm_fwd";
    let (mi, ci) = rms_dims(K, m, c, eps)?;
    let mc = prod(K, m, c)?;
    check_len(K, "x", x.len(), mc)?;
    check_len(K, "w", w.len(), c)?;
    check_len(K, "y", y.len(), mc)?;
    check_len(K, "rstd", rstd.len(), m)?;
    if mi == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, T::pick("rmsnorm_fwd_f32", "rmsnorm_fwd_bf16"))?;
    let (px, pw, py, pr) = (ptr(gpu, x), ptr(gpu, w), ptr_mut(gpu, y), ptr_mut(gpu, rstd));
    let vec = vec_ok(&[px, pw, py], c, lanes::<T>());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&px).arg(&pw).arg(&py).arg(&pr).arg(&ci).arg(&eps).arg(&vec);
    // SAFETY: block m reads row m of x (M·C) and all of w (C), writes row m of y (M·C) and
    // rstd[m] (M); vec only with aligned pointers and C a multiple of the chunk.
    unsafe { b.launch(grid_rows(m, row_threads(c, lanes::<T>()))) }?;
    Ok(())
}

/// resid: (M, C), updated in place; delta: (M, C); w: (C) f32; y: (M, C); rstd: (M) f32.
///
/// The residual add fused with the next norm: resid += delta (the sum rounded to T), then y,
/// rstd = [`rmsnorm_fwd`] of the new resid.
#[allow(clippy::too_many_arguments)]
pub fn add_rmsnorm_fwd<T: Float>(
    gpu: &Gpu,
    resid: &mut impl DevicePtrMut<T>,
    delta: &impl DevicePtr<T>,
    w: &impl DevicePtr<f32>,
    y: &mut impl DevicePtrMut<T>,
    rstd: &mut impl DevicePtrMut<f32>,
    m: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
    const K: &str = "add_rmsnorm_fwd";
    let (mi, ci) = rms_dims(K, m, c, eps)?;
    let mc = prod(K, m, c)?;
    check_len(K, "resid", resid.len(), mc)?;
    check_len(K, "delta", delta.len(), mc)?;
    check_len(K, "w", w.len(), c)?;
    check_len(K, "y", y.len(), mc)?;
    check_len(K, "rstd", rstd.len(), m)?;
    if mi == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, T::pick("add_rmsnorm_fwd_f32", "add_rmsnorm_fwd_bf16"))?;
    let (pres, pd, pw) = (ptr_mut(gpu, resid), ptr(gpu, delta), ptr(gpu, w));
    let (py, pr) = (ptr_mut(gpu, y), ptr_mut(gpu, rstd));
    let vec = vec_ok(&[pres, pd, pw, py], c, lanes::<T>());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pres).arg(&pd).arg(&pw).arg(&py).arg(&pr).arg(&ci).arg(&eps).arg(&vec);
    // SAFETY: block m reads and writes row m of resid and reads row m of delta (M·C each),
    // reads w (C), writes row m of y (M·C) and rstd[m] (M). resid and y are distinct buffers (one
    // is borrowed mutably while the other is); vec only with aligned pointers and whole chunks.
    unsafe { b.launch(grid_rows(m, row_threads(c, lanes::<T>()))) }?;
    Ok(())
}

/// x: (M, C); w: (C) f32; rstd: (M) f32 from the forward; dy: (M, C); dx: (M, C).
///
/// dx = rstd · (dy·w − x̂ · mean(dy·w·x̂)) with x̂ = x · rstd, as `rmsnorm_bwd_ref`'s dx. With
/// `accumulate` the result is added to dx (which holds the residual gradient) in f32 and rounded
/// once. The weight gradient is not computed: norm weights stay frozen.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd<T: Float>(
    gpu: &Gpu,
    x: &impl DevicePtr<T>,
    w: &impl DevicePtr<f32>,
    rstd: &impl DevicePtr<f32>,
    dy: &impl DevicePtr<T>,
    dx: &mut impl DevicePtrMut<T>,
    m: usize,
    c: usize,
    accumulate: bool,
) -> Result<()> {
    const K: &str = "rmsnorm_bwd";
    let (mi, ci) = rms_dims(K, m, c, 0.0)?;
    let mc = prod(K, m, c)?;
    check_len(K, "x", x.len(), mc)?;
    check_len(K, "w", w.len(), c)?;
    check_len(K, "rstd", rstd.len(), m)?;
    check_len(K, "dy", dy.len(), mc)?;
    check_len(K, "dx", dx.len(), mc)?;
    if mi == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, T::pick("rmsnorm_bwd_f32", "rmsnorm_bwd_bf16"))?;
    let (px, pw, pr, pdy, pdx) = (ptr(gpu, x), ptr(gpu, w), ptr(gpu, rstd), ptr(gpu, dy), ptr_mut(gpu, dx));
    let vec = vec_ok(&[px, pw, pdy, pdx], c, lanes::<T>());
    let acc = i32::from(accumulate);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&px).arg(&pw).arg(&pr).arg(&pdy).arg(&pdx).arg(&ci).arg(&acc).arg(&vec);
    // SAFETY: block m reads row m of x and dy (M·C each), w (C) and rstd[m] (M), and reads and
    // writes row m of dx (M·C); vec only with aligned pointers and whole chunks.
    unsafe { b.launch(grid_rows(m, row_threads(c, lanes::<T>()))) }?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn rope<T: Float>(
    gpu: &Gpu,
    name: &'static str,
    x: &mut impl DevicePtrMut<T>,
    cos: &impl DevicePtr<f32>,
    sin: &impl DevicePtr<f32>,
    n: usize,
    h: usize,
    d: usize,
) -> Result<()> {
    const K: &str = "rope";
    if d == 0 || d % 2 == 1 {
        return Err(KernelError::shape(K, format!("head dimension D must be even and non-zero, got {d}")));
    }
    let half = d / 2;
    let rows = prod(K, n, h)?;
    check_len(K, "x", x.len(), prod(K, rows, d)?)?;
    check_len(K, "cos", cos.len(), prod(K, n, half)?)?;
    check_len(K, "sin", sin.len(), prod(K, n, half)?)?;
    to_i32(K, "N·H·D", x.len())?;
    let (ri, hi, halfi) = (to_i32(K, "N·H", rows)?, to_i32(K, "H", h)?, to_i32(K, "D/2", half)?);
    if ri == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, name)?;
    let (px, pc, ps) = (ptr_mut(gpu, x), ptr(gpu, cos), ptr(gpu, sin));
    let lanes = lanes::<T>();
    let vec = vec_ok(&[px, pc, ps], half, lanes);
    let units = rows * half.div_ceil(lanes);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&px).arg(&pc).arg(&ps).arg(&ri).arg(&hi).arg(&halfi).arg(&vec);
    // SAFETY: each unit reads and writes up to a chunk of pairs (i, i + D/2) of one head of x
    // (N·H·D) and the matching entries of cos and sin (N·D/2 each), i < D/2 checked per element
    // off the vector path; vec only with aligned pointers and D/2 a multiple of the chunk.
    unsafe { b.launch(flat_cfg(gpu, &f, units, 1)?) }?;
    Ok(())
}

/// x: (N, H, D), rotated in place; cos, sin: (N, D/2) f32 (the core `RopeTables` layout).
///
/// Rotate-half RoPE: for i < D/2, x[i] ← x[i]·cos − x[i+D/2]·sin, x[i+D/2] ← x[i+D/2]·cos +
/// x[i]·sin.
pub fn rope_fwd<T: Float>(
    gpu: &Gpu,
    x: &mut impl DevicePtrMut<T>,
    cos: &impl DevicePtr<f32>,
    sin: &impl DevicePtr<f32>,
    n: usize,
    h: usize,
    d: usize,
) -> Result<()> {
    rope(gpu, T::pick("rope_fwd_f32", "rope_fwd_bf16"), x, cos, sin, n, h, d)
}

/// dx: (N, H, D), the gradient of the rotated x, turned in place into the gradient of x by the
/// transposed rotation (`rope_bwd_ref`); cos, sin: (N, D/2) f32.
pub fn rope_bwd<T: Float>(
    gpu: &Gpu,
    dx: &mut impl DevicePtrMut<T>,
    cos: &impl DevicePtr<f32>,
    sin: &impl DevicePtr<f32>,
    n: usize,
    h: usize,
    d: usize,
) -> Result<()> {
    rope(gpu, T::pick("rope_bwd_f32", "rope_bwd_bf16"), dx, cos, sin, n, h, d)
}

/// g, u, out: (n) each, e.g. (M, F).
///
/// out = silu(g) · u = g · σ(g) · u.
pub fn swiglu_fwd<T: Float>(
    gpu: &Gpu,
    g: &impl DevicePtr<T>,
    u: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    const K: &str = "swiglu_fwd";
    check_len(K, "u", u.len(), g.len())?;
    check_len(K, "out", out.len(), g.len())?;
    let n = to_i32(K, "n", g.len())?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, T::pick("swiglu_fwd_f32", "swiglu_fwd_bf16"))?;
    let (pg, pu, po) = (ptr(gpu, g), ptr(gpu, u), ptr_mut(gpu, out));
    let vec = vec_ok(&[pg, pu, po], 0, 1);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pg).arg(&pu).arg(&po).arg(&n).arg(&vec);
    // SAFETY: the kernel reads n elements of g and u and writes n of out; all three hold n (the
    // last partial chunk goes element by element).
    unsafe { b.launch(flat_cfg(gpu, &f, g.len().div_ceil(lanes::<T>()), FLAT_UNROLL)?) }?;
    Ok(())
}

/// g, u, dout, dg, du: (n) each.
///
/// du = dout · silu(g); dg = dout · u · σ(g) · (1 + g · (1 − σ(g))) (`swiglu_bwd_ref`).
pub fn swiglu_bwd<T: Float>(
    gpu: &Gpu,
    g: &impl DevicePtr<T>,
    u: &impl DevicePtr<T>,
    dout: &impl DevicePtr<T>,
    dg: &mut impl DevicePtrMut<T>,
    du: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    const K: &str = "swiglu_bwd";
    check_len(K, "u", u.len(), g.len())?;
    check_len(K, "dout", dout.len(), g.len())?;
    check_len(K, "dg", dg.len(), g.len())?;
    check_len(K, "du", du.len(), g.len())?;
    let n = to_i32(K, "n", g.len())?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, T::pick("swiglu_bwd_f32", "swiglu_bwd_bf16"))?;
    let (pg, pu, pd) = (ptr(gpu, g), ptr(gpu, u), ptr(gpu, dout));
    let (pdg, pdu) = (ptr_mut(gpu, dg), ptr_mut(gpu, du));
    let vec = vec_ok(&[pg, pu, pd, pdg, pdu], 0, 1);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pg).arg(&pu).arg(&pd).arg(&pdg).arg(&pdu).arg(&n).arg(&vec);
    // SAFETY: reads n elements of g, u and dout, writes n of dg and du; all five hold n.
    unsafe { b.launch(flat_cfg(gpu, &f, g.len().div_ceil(lanes::<T>()), 1)?) }?;
    Ok(())
}

/// x, out: (n) each; p in [0, 1).
///
/// out = x ∘ mask with mask exactly `dropout_mask_ref(seed, n, p)`: element i is dropped when the
/// counter-based uniform of (seed, i) is below p and scaled by 1/(1 − p) otherwise, so the CPU and
/// the GPU (and a backward that regenerates the mask) drop the same elements.
pub fn dropout_fwd<T: Float>(
    gpu: &Gpu,
    x: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<T>,
    seed: u64,
    p: f32,
) -> Result<()> {
    const K: &str = "dropout_fwd";
    // Written so that NaN fails as well.
    if !(0.0..1.0).contains(&p) {
        return Err(KernelError::shape(K, format!("dropout probability must be in [0, 1), got {p}")));
    }
    check_len(K, "out", out.len(), x.len())?;
    let n = to_i32(K, "n", x.len())?;
    if n == 0 {
        return Ok(());
    }
    // The reference's scale, computed in f32 the same way.
    let keep = 1.0f32 / (1.0 - p);
    let (key, cut) = (mix64(seed), dropout_cut(p));
    let f = gpu.function(MODULE, T::pick("dropout_fwd_f32", "dropout_fwd_bf16"))?;
    let (px, po) = (ptr(gpu, x), ptr_mut(gpu, out));
    let vec = vec_ok(&[px, po], 0, 1);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&px).arg(&po).arg(&n).arg(&key).arg(&cut).arg(&keep).arg(&vec);
    // SAFETY: reads n elements of x and writes n of out; both hold n.
    unsafe { b.launch(flat_cfg(gpu, &f, x.len().div_ceil(lanes::<T>()), FLAT_UNROLL)?) }?;
    Ok(())
}

/// The kernel's integer form of `dropout_uniform(seed, i) < p`: u = k · 2⁻²⁴ with k = z >> 40 an
/// integer, and p · 2²⁴ exact in f32, so u < p ⇔ k < ⌈p · 2²⁴⌉ ⇔ (z >> 32) < ⌈p · 2²⁴⌉ · 2⁸.
/// p < 1 keeps the cut below 2³²: the largest f32 below 1 gives (2²⁴ − 1) · 2⁸.
fn dropout_cut(p: f32) -> u32 {
    let k = (f64::from(p) * f64::from(1u32 << 24)).ceil().clamp(0.0, f64::from((1u32 << 24) - 1));
    (k as u32) << 8
}

/// a, b: (n) each.
///
/// a += b, the sum rounded to T.
pub fn add<T: Float>(gpu: &Gpu, a: &mut impl DevicePtrMut<T>, b: &impl DevicePtr<T>) -> Result<()> {
    const K: &str = "add";
    check_len(K, "b", b.len(), a.len())?;
    let n = to_i32(K, "n", a.len())?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, T::pick("add_fwd_f32", "add_fwd_bf16"))?;
    let (pa, pb) = (ptr_mut(gpu, a), ptr(gpu, b));
    let vec = vec_ok(&[pa, pb], 0, 1);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&pa).arg(&pb).arg(&n).arg(&vec);
    // SAFETY: reads and writes n elements of a and reads n of b; both hold n.
    unsafe { l.launch(flat_cfg(gpu, &f, a.len().div_ceil(lanes::<T>()), FLAT_UNROLL)?) }?;
    Ok(())
}

// ------------------------------------------------------------------------------ self-test, bench

/// Tolerances of the self-test: (f32, bf16). bf16 outputs are rounded once from f32, so half a
/// bf16 ulp (2⁻⁹) of the largest value, doubled for slack.
const TOL_ROUNDED: (f64, f64) = (2e-5, 8e-3);
/// Copies, dropout and the add are exact in both types.
const TOL_EXACT: (f64, f64) = (0.0, 0.0);

fn tol<T: Float>(t: (f64, f64)) -> f64 {
    if T::IS_BF16 { t.1 } else { t.0 }
}

fn upload<T: Float>(gpu: &Gpu, v: &[f32]) -> Result<CudaSlice<T>> {
    gpu.upload(&v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>())
}

fn download<T: Float>(gpu: &Gpu, s: &CudaSlice<T>) -> Result<Vec<f32>> {
    Ok(gpu.download(s)?.into_iter().map(T::to_f32).collect())
}

/// `v` as the device sees it after the upload as T.
fn rounded<T: Float>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

fn reference(kernel: &'static str) -> impl Fn(gristmill_core::Error) -> KernelError {
    move |e| KernelError::shape(kernel, format!("reference: {e}"))
}

/// The largest error over the (M, C) shapes of the self-test, per kernel of one dtype.
fn self_test_typed<T: Float>(gpu: &Gpu, m: usize, c: usize, errs: &mut [f64; 11]) -> Result<()> {
    let mc = m * c;
    let x = rounded::<T>(&check::test_data(mc, 1, 2.0));
    let d = rounded::<T>(&check::test_data(mc, 2, 1.0));
    let w = check::test_data(c, 3, 1.5);
    let (xd, dd, wd) = (upload::<T>(gpu, &x)?, upload::<T>(gpu, &d)?, gpu.upload(&w)?);
    let r = |e: &mut f64, got: &[f32], want: &[f32]| *e = e.max(check::rel_err(got, want));
    let round = |v: Vec<f32>| rounded::<T>(&v);

    // embedding: V = c/2 + 3 rows, ids wrapping around so that some repeat.
    let v = c / 2 + 3;
    let ids: Vec<u32> = (0..m).map(|i| ((i * 7 + 1) % v) as u32).collect();
    let table = rounded::<T>(&check::test_data(v * c, 4, 1.0));
    let (idd, tabd) = (gpu.upload(&ids)?, upload::<T>(gpu, &table)?);
    let mut out = gpu.zeros::<T>(mc)?;
    embedding_fwd(gpu, &idd, &tabd, &mut out, v, c)?;
    let want = embedding::embedding_fwd_ref(&ids, &table, v, c).map_err(reference("embedding_fwd"))?;
    r(&mut errs[0], &download(gpu, &out)?, &want);
    let mut dtab = gpu.zeros::<f32>(v * c)?;
    embedding_bwd(gpu, &idd, &dd, &mut dtab, v, c)?;
    let want = embedding::embedding_bwd_ref(&ids, &d, v, c).map_err(reference("embedding_bwd"))?;
    r(&mut errs[1], &gpu.download(&dtab)?, &want);

    // rmsnorm and the fused add.
    let eps = 1e-5;
    let (mut y, mut rstd) = (gpu.zeros::<T>(mc)?, gpu.zeros::<f32>(m)?);
    rmsnorm_fwd(gpu, &xd, &wd, &mut y, &mut rstd, m, c, eps)?;
    let (wy, wr) = rmsnorm::rmsnorm_fwd_ref(&x, &w, m, c, eps).map_err(reference("rmsnorm_fwd"))?;
    r(&mut errs[2], &download(gpu, &y)?, &wy);
    r(&mut errs[2], &gpu.download(&rstd)?, &wr);
    let mut resid = upload::<T>(gpu, &x)?;
    add_rmsnorm_fwd(gpu, &mut resid, &dd, &wd, &mut y, &mut rstd, m, c, eps)?;
    let sum = round(x.iter().zip(&d).map(|(a, b)| a + b).collect());
    let (sy, sr) = rmsnorm::rmsnorm_fwd_ref(&sum, &w, m, c, eps).map_err(reference("add_rmsnorm_fwd"))?;
    r(&mut errs[3], &download(gpu, &resid)?, &sum);
    r(&mut errs[3], &download(gpu, &y)?, &sy);
    r(&mut errs[3], &gpu.download(&rstd)?, &sr);
    let mut dx = upload::<T>(gpu, &x)?;
    let wr_d = gpu.upload(&wr)?;
    rmsnorm_bwd(gpu, &xd, &wd, &wr_d, &dd, &mut dx, m, c, true)?;
    let (wdx, _) = rmsnorm::rmsnorm_bwd_ref(&x, &w, &wr, &d, m, c).map_err(reference("rmsnorm_bwd"))?;
    r(&mut errs[4], &download(gpu, &dx)?, &x.iter().zip(&wdx).map(|(a, b)| a + b).collect::<Vec<_>>());

    // rope on (N, H, D) = (m, 3, 2·⌈c/6⌉): the same number of elements, give or take.
    let (n, h, hd) = (m, 3, 2 * c.div_ceil(6));
    let cfg = rope::RopeConfig { theta: 10000.0, head_dim: hd, scaling: rope::RopeScaling::None };
    let pos: Vec<u32> = (0..n as u32).map(|i| i * 5 + 1).collect();
    let t = rope::rope_tables(&cfg, &pos).map_err(reference("rope_fwd"))?;
    let xr = rounded::<T>(&check::test_data(n * h * hd, 5, 1.0));
    let (cd, sd) = (gpu.upload(&t.cos)?, gpu.upload(&t.sin)?);
    let mut xrd = upload::<T>(gpu, &xr)?;
    rope_fwd(gpu, &mut xrd, &cd, &sd, n, h, hd)?;
    r(&mut errs[5], &download(gpu, &xrd)?, &rope::rope_fwd_ref(&xr, &t, n, h, hd).map_err(reference("rope_fwd"))?);
    let mut xrd = upload::<T>(gpu, &xr)?;
    rope_bwd(gpu, &mut xrd, &cd, &sd, n, h, hd)?;
    r(&mut errs[6], &download(gpu, &xrd)?, &rope::rope_bwd_ref(&xr, &t, n, h, hd).map_err(reference("rope_bwd"))?);

    // swiglu on (M, C).
    let mut o = gpu.zeros::<T>(mc)?;
    swiglu_fwd(gpu, &xd, &dd, &mut o)?;
    r(&mut errs[7], &download(gpu, &o)?, &swiglu::swiglu_fwd_ref(&x, &d).map_err(reference("swiglu_fwd"))?);
    let (mut dg, mut du) = (gpu.zeros::<T>(mc)?, gpu.zeros::<T>(mc)?);
    swiglu_bwd(gpu, &xd, &dd, &xd, &mut dg, &mut du)?;
    let (wg, wu) = swiglu::swiglu_bwd_ref(&x, &d, &x).map_err(reference("swiglu_bwd"))?;
    r(&mut errs[8], &download(gpu, &dg)?, &wg);
    r(&mut errs[8], &download(gpu, &du)?, &wu);

    // dropout and add: exact.
    let (seed, p) = (0x5eed + mc as u64, 0.3);
    dropout_fwd(gpu, &xd, &mut o, seed, p)?;
    let mask = lora::dropout_mask_ref(seed, mc, p).map_err(reference("dropout_fwd"))?;
    r(&mut errs[9], &download(gpu, &o)?, &round(x.iter().zip(&mask).map(|(a, b)| a * b).collect()));
    let mut a = upload::<T>(gpu, &x)?;
    add(gpu, &mut a, &dd)?;
    r(&mut errs[10], &download(gpu, &a)?, &sum);
    Ok(())
}

/// Every kernel of this module against its CPU reference on small, awkward shapes: rows of 203
/// (the element-by-element path) and 576 (the vector path), both dtypes.
pub fn self_test(gpu: &Gpu) -> Result<Vec<Check>> {
    const NAMES: [(&str, &str, (f64, f64)); 11] = [
        ("embedding_fwd_f32", "embedding_fwd_bf16", TOL_EXACT),
        ("embedding_bwd_f32", "embedding_bwd_bf16", (1e-6, 1e-6)),
        ("rmsnorm_fwd_f32", "rmsnorm_fwd_bf16", TOL_ROUNDED),
        ("add_rmsnorm_fwd_f32", "add_rmsnorm_fwd_bf16", TOL_ROUNDED),
        ("rmsnorm_bwd_f32", "rmsnorm_bwd_bf16", TOL_ROUNDED),
        ("rope_fwd_f32", "rope_fwd_bf16", TOL_ROUNDED),
        ("rope_bwd_f32", "rope_bwd_bf16", TOL_ROUNDED),
        ("swiglu_fwd_f32", "swiglu_fwd_bf16", TOL_ROUNDED),
        ("swiglu_bwd_f32", "swiglu_bwd_bf16", TOL_ROUNDED),
        ("dropout_fwd_f32", "dropout_fwd_bf16", TOL_EXACT),
        ("add_fwd_f32", "add_fwd_bf16", TOL_EXACT),
    ];
    const SHAPES: [(usize, usize); 2] = [(5, 203), (3, 576)];
    let shape = "(M, C) = (5, 203), (3, 576)".to_string();
    let mut checks = Vec::new();
    let (mut e32, mut e16) = ([0f64; 11], [0f64; 11]);
    for (m, c) in SHAPES {
        self_test_typed::<f32>(gpu, m, c, &mut e32)?;
        self_test_typed::<half::bf16>(gpu, m, c, &mut e16)?;
    }
    for (i, (k32, k16, t)) in NAMES.into_iter().enumerate() {
        checks.push(Check { kernel: k32, shape: shape.clone(), rel_err: e32[i], tol: tol::<f32>(t) });
        checks.push(Check { kernel: k16, shape: shape.clone(), rel_err: e16[i], tol: tol::<half::bf16>(t) });
    }
    Ok(checks)
}

/// Every kernel of this module at a training step's size: M = B·T = 4096 rows of C = 4096, bf16
/// (RoPE: 4096 tokens × 32 heads × 128, the same element count). GB/s counts bytes read plus
/// written once each.
pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    type B = half::bf16;
    const M: usize = 4096;
    const C: usize = 4096;
    const V: usize = 32768;
    const E: f64 = 2.0; // bytes of a bf16
    let (mc, mcf) = (M * C, (M * C) as f64);
    let (mf, cf) = (M as f64, C as f64);
    let x = upload::<B>(gpu, &check::test_data(mc, 11, 2.0))?;
    let d = upload::<B>(gpu, &check::test_data(mc, 12, 1.0))?;
    let w = gpu.upload(&check::test_data(C, 13, 1.0))?;
    let mut y = gpu.zeros::<B>(mc)?;
    let mut z = gpu.zeros::<B>(mc)?;
    let mut rstd = gpu.zeros::<f32>(M)?;
    let mut rows = Vec::new();
    let mut row = |kernel: &'static str, shape: &str, bytes: f64, seconds: f64| {
        rows.push(BenchRow { kernel, shape: shape.to_string(), seconds, work: Work::Bytes(bytes) });
    };
    let shape = format!("M={M} C={C}");
    let t = |f: &mut dyn FnMut() -> Result<()>| check::time_median(gpu, 5, 20, f);

    let ids: Vec<u32> =
        check::test_data(M, 14, 1.0).iter().map(|v| ((v + 1.0) * 0.5 * V as f32) as u32 % V as u32).collect();
    let ids = gpu.upload(&ids)?;
    let table = upload::<B>(gpu, &check::test_data(V * C, 15, 1.0))?;
    let s = t(&mut || embedding_fwd(gpu, &ids, &table, &mut y, V, C))?;
    row("embedding_fwd_bf16", &format!("{shape} V={V}"), mf * 4.0 + 2.0 * mcf * E, s);
    let mut dtable = gpu.zeros::<f32>(V * C)?;
    let s = t(&mut || embedding_bwd(gpu, &ids, &d, &mut dtable, V, C))?;
    // The rows touched are read and written in f32 by the atomics.
    row("embedding_bwd_bf16", &format!("{shape} V={V}"), mf * 4.0 + mcf * E + 2.0 * mcf * 4.0, s);
    drop((table, dtable));

    let side = cf * 4.0 + mf * 4.0; // w and rstd
    let s = t(&mut || rmsnorm_fwd(gpu, &x, &w, &mut y, &mut rstd, M, C, 1e-5))?;
    row("rmsnorm_fwd_bf16", &shape, 2.0 * mcf * E + side, s);
    let s = t(&mut || add_rmsnorm_fwd(gpu, &mut z, &d, &w, &mut y, &mut rstd, M, C, 1e-5))?;
    row("add_rmsnorm_fwd_bf16", &shape, 4.0 * mcf * E + side, s);
    let s = t(&mut || rmsnorm_bwd(gpu, &x, &w, &rstd, &d, &mut z, M, C, true))?;
    row("rmsnorm_bwd_bf16", &format!("{shape} accumulate"), 4.0 * mcf * E + side, s);

    let (n, h, hd) = (M, 32, 128);
    let cfg = rope::RopeConfig { theta: 500000.0, head_dim: hd, scaling: rope::RopeScaling::None };
    let pos: Vec<u32> = (0..n as u32).collect();
    let tabs = rope::rope_tables(&cfg, &pos).map_err(reference("rope_fwd"))?;
    let (cd, sd) = (gpu.upload(&tabs.cos)?, gpu.upload(&tabs.sin)?);
    let rshape = format!("N={n} H={h} D={hd}");
    let rbytes = 2.0 * mcf * E + 2.0 * (n * hd / 2) as f64 * 4.0;
    let s = t(&mut || rope_fwd(gpu, &mut z, &cd, &sd, n, h, hd))?;
    row("rope_fwd_bf16", &rshape, rbytes, s);
    let s = t(&mut || rope_bwd(gpu, &mut z, &cd, &sd, n, h, hd))?;
    row("rope_bwd_bf16", &rshape, rbytes, s);

    let fshape = format!("n={M}x{C}");
    let s = t(&mut || swiglu_fwd(gpu, &x, &d, &mut y))?;
    row("swiglu_fwd_bf16", &fshape, 3.0 * mcf * E, s);
    let s = t(&mut || swiglu_bwd(gpu, &x, &d, &x, &mut y, &mut z))?;
    row("swiglu_bwd_bf16", &fshape, 5.0 * mcf * E, s);
    let s = t(&mut || dropout_fwd(gpu, &x, &mut y, 7, 0.1))?;
    row("dropout_fwd_bf16", &format!("{fshape} p=0.1"), 2.0 * mcf * E, s);
    let s = t(&mut || add(gpu, &mut y, &d))?;
    row("add_fwd_bf16", &fshape, 3.0 * mcf * E, s);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_blocks_hold_a_row_in_registers() {
        // bf16 (8 a chunk): C = 4096 is 512 chunks, 2 a thread -> 256 threads.
        assert_eq!(row_threads(4096, 8), 256);
        // f32 (4 a chunk): 1024 chunks -> 512 threads.
        assert_eq!(row_threads(4096, 4), 512);
        // Tiny rows still get a whole warp; 576 bf16 = 72 chunks -> 36 -> 64.
        assert_eq!(row_threads(1, 8), 32);
        assert_eq!(row_threads(576, 8), 64);
        // 1000 f32 = 250 chunks -> 125 -> 128.
        assert_eq!(row_threads(1000, 4), 128);
        // Wider than ROW_THREADS · ROW_ITEMS chunks: capped, the rest is re-read.
        assert_eq!(row_threads(1 << 16, 4), 512);
        for c in [1, 7, 31, 33, 576, 1000, 4095, 8192, 16384] {
            for lanes in [4, 8] {
                let t = row_threads(c, lanes) as usize;
                assert!(t.is_multiple_of(32) && (32..=ROW_THREADS).contains(&t), "{c} {lanes}: {t}");
                if c.div_ceil(lanes) <= ROW_THREADS * ROW_ITEMS {
                    assert!(t * ROW_ITEMS >= c.div_ceil(lanes), "{c} {lanes}: {t} threads do not hold the row");
                }
            }
        }
    }

    #[test]
    fn flat_grids_stop_at_one_wave() {
        assert_eq!(flat_blocks(0, 1, 1056), 1);
        assert_eq!(flat_blocks(1, 2, 1056), 1);
        assert_eq!(flat_blocks(257, 1, 1056), 2);
        assert_eq!(flat_blocks(513, 2, 1056), 2);
        assert_eq!(flat_blocks(1 << 24, 2, 132 * 6), 132 * 6);
        assert_eq!(flat_blocks(1 << 24, 2, 0), 1);
    }

    #[test]
    fn embedding_quads_need_alignment_and_whole_quads() {
        assert_eq!(quads_ok(0x1008, 0x2000, 4096, 2), 1);
        assert_eq!(quads_ok(0x1004, 0x2000, 4096, 2), 0);
        assert_eq!(quads_ok(0x1008, 0x2000, 4096, 4), 0);
        assert_eq!(quads_ok(0x1010, 0x2000, 4096, 4), 1);
        assert_eq!(quads_ok(0x1000, 0x2008, 4096, 4), 0);
        assert_eq!(quads_ok(0x1000, 0x2000, 4098, 2), 0);
    }

    /// The device's dropout test, word for word in u32 arithmetic: the high word of SplitMix64's
    /// finaliser (the last multiply from 32-bit pieces) against the cut.
    fn device_dropped(key: u64, i: u64, cut: u32) -> bool {
        use gristmill_core::rng::GOLDEN_GAMMA;
        let mut z = key.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z ^= z >> 27;
        let (lo, hi) = (z as u32, (z >> 32) as u32);
        let (c_lo, c_hi) = (0x1331_11EBu32, 0x94D0_49BBu32);
        let mulhi = ((u64::from(lo) * u64::from(c_lo)) >> 32) as u32;
        mulhi.wrapping_add(lo.wrapping_mul(c_hi)).wrapping_add(hi.wrapping_mul(c_lo)) < cut
    }

    #[test]
    fn dropout_integer_test_equals_the_reference() {
        let seed = 0x1234_5678_9abc_def0;
        let us: Vec<f32> = (0..20_000u64).map(|i| lora::dropout_uniform(seed, i)).collect();
        // Every u itself (not dropped: u < u is false) and its neighbours, the extremes and a few
        // round figures.
        let mut ps = vec![0.0, 1.0 / 16_777_216.0, 0.1, 0.25, 0.5, 0.9, 1.0 - 1.0 / 16_777_216.0];
        for &u in us.iter().step_by(97) {
            ps.extend([u, f32::from_bits(u.to_bits() + 1), u + 1.0 / 16_777_216.0]);
        }
        for p in ps.into_iter().filter(|p| (0.0..1.0).contains(p)) {
            let cut = dropout_cut(p);
            for (i, &u) in us.iter().enumerate() {
                assert_eq!(device_dropped(mix64(seed), i as u64, cut), u < p, "p = {p:e}, i = {i}, u = {u:e}");
            }
        }
        assert_eq!(dropout_cut(0.0), 0);
        assert_eq!(dropout_cut(1.0 - 1.0 / 16_777_216.0), 0xffff_ff00);
    }

    #[test]
    fn vector_path_needs_alignment_and_whole_chunks() {
        assert_eq!(vec_ok(&[0x1000, 0x2010], 4096, 8), 1);
        assert_eq!(vec_ok(&[0x1000, 0x2008], 4096, 8), 0);
        assert_eq!(vec_ok(&[0x1000], 4100, 8), 0);
        assert_eq!(vec_ok(&[0x1000], 4100, 4), 1);
        // Flat ops: any length (the tail goes element by element).
        assert_eq!(vec_ok(&[0x1000, 0x2000], 0, 1), 1);
    }
}
