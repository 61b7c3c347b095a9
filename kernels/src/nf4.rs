//! Launchers of kernels/cuda/nf4.cu: the NF4 linear layer computed from the packed 4-bit weight
//! (no dequantized copy of W in memory) and the LoRA adapter fused around it.
//!
//! - [`nf4_gemm_fwd`] y = x Wᵀ and [`nf4_gemm_bwd`] dx = dy W: tensor-core tiles that expand the
//!   weight tile by tile in shared memory; [`nf4_gemm_fwd`] hands M ≤ [`GEMV_MAX_M`] rows to
//!   [`nf4_gemv`], which streams the weight once (decoding).
//! - [`nf4_lora_fwd`] y = x Wᵀ + s · (x∘mask) Aᵀ Bᵀ and [`nf4_lora_bwd`] (dx, dA, dB, v): the
//!   rank-r products run as small tensor-core kernels, and their r-wide results join the NF4
//!   product in its epilogue. A and B are bf16 (the training engine keeps bf16 copies of its f32
//!   masters for the products); dA and dB come out in f32.
//!
//! Numerics: the weight's values are `Nf4Tensor::dequantize_rounded` of a bf16 weight (bit for
//! bit); products are bf16 × bf16 with f32 accumulation; one rounding at the output.
//!
//! The tensor-core kernels take bf16 activations only (the GPU runtime's activation type); the
//! GEMV takes f32 or bf16.

use crate::Gpu;
use crate::check::{self, BenchRow, Check, Work};
use crate::error::{KernelError, Result, check_len};
use crate::gemm;
use crate::launch::{Float, ptr, ptr_mut};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchArgs, LaunchConfig, PushKernelArg, sys};
use gristmill_core::nf4::{Absmax, Nf4Tensor};
use gristmill_core::ops::lora::{LoraDims, dropout_mask_ref, lora_bwd_ref, lora_fwd_ref};
use gristmill_core::ops::nf4_gemm::{nf4_gemm_bwd_ref, nf4_gemm_fwd_ref};
use gristmill_core::{DType, Shape};
use half::bf16;

const MODULE: &str = "nf4";

/// Output tile of the tensor-core kernels (rows of x or dy, output columns) and its block size.
const GEMM_TILE: (usize, usize) = (256, 128);
const GEMM_THREADS: u32 = 256;
/// Dynamic shared memory of the tensor-core kernels (G_SMEM in nf4.cu).
const GEMM_SMEM: u32 = 90112;

/// Most rows the GEMV takes; [`nf4_gemm_fwd`] uses it up to here.
pub const GEMV_MAX_M: usize = 16;
/// Weight rows one GEMV block reduces.
const GEMV_ROWS: usize = 16;
const GEMV_THREADS: u32 = 256;

/// Largest LoRA rank the fused kernels take.
pub const MAX_RANK: usize = 64;
/// lora_down: rows a block, reduction columns a k-tile, dynamic shared memory, threads.
const DOWN_ROWS: usize = 64;
const DOWN_STEP: usize = 64;
const DOWN_SMEM: u32 = 65536;
/// lora_grad: output columns a block, reduction rows a k-tile, dynamic shared memory.
const GRAD_COLS: usize = 128;
const GRAD_STEP: usize = 32;
const GRAD_SMEM: u32 = 49152;
const RANK_THREADS: u32 = 128;

/// Sizes above this are refused: the kernels index rows and columns with 32-bit integers and
/// step past the last tile.
const MAX_DIM: usize = (i32::MAX / 2) as usize;

/// How the block scales of an [`Nf4Matrix`] sit on the device.
enum Scales {
    /// (n_blocks) f32
    Plain(CudaSlice<f32>),
    /// absmax = code[q] · nested[block >> nbs_log2] + offset
    Double {
        /// (n_blocks) u8
        q: CudaSlice<u8>,
        /// (ceil(n_blocks / nested_blocksize)) f32
        nested: CudaSlice<f32>,
        /// (256) f32
        code: CudaSlice<f32>,
        offset: f32,
        nbs_log2: i32,
    },
}

/// An NF4 weight (N, K) of a bf16 model on the GPU, in the bitsandbytes layout: packed codes and
/// block scales, plain or double-quantized. Block sizes must be powers of two.
pub struct Nf4Matrix {
    /// (ceil(N·K / 2)) u8, element 2j in the high nibble of byte j
    packed: CudaSlice<u8>,
    scales: Scales,
    bs_log2: i32,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for Nf4Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Nf4Matrix({} × {}, blocksize {}, {} bytes)",
            self.n,
            self.k,
            1usize << self.bs_log2,
            self.weight_bytes()
        )
    }
}

/// log2 of `v`, or a shape error when it is not a power of two.
fn log2_exact(kernel: &'static str, what: &str, v: usize) -> Result<i32> {
    if v.is_power_of_two() {
        Ok(v.trailing_zeros() as i32)
    } else {
        Err(KernelError::shape(kernel, format!("{what} = {v}: the NF4 kernels need a power of two")))
    }
}

/// What every NF4 kernel takes to read the weight (NF4_ARGS in nf4.cu).
struct WeightArgs {
    packed: u64,
    absmax: u64,
    q8: u64,
    nested: u64,
    code8: u64,
    offset: f32,
    bs_log2: i32,
    nbs_log2: i32,
}

fn push_weight<'a>(l: &mut LaunchArgs<'a>, a: &'a WeightArgs) {
    l.arg(&a.packed).arg(&a.absmax).arg(&a.q8).arg(&a.nested).arg(&a.code8);
    l.arg(&a.offset).arg(&a.bs_log2).arg(&a.nbs_log2);
}

impl Nf4Matrix {
    /// Copies a quantized (N, K) weight to the device. The fused kernels reproduce
    /// `dequantize_rounded` of bf16 weights, so the weight must have been quantized from bf16.
    pub fn upload(gpu: &Gpu, w: &Nf4Tensor) -> Result<Self> {
        const K: &str = "Nf4Matrix::upload";
        w.validate().map_err(|e| KernelError::shape(K, e.to_string()))?;
        let (n, k) = match *w.shape.dims() {
            [n, k] if n > 0 && k > 0 => (n, k),
            _ => return Err(KernelError::shape(K, format!("shape {:?}: expected a non-empty matrix", w.shape.dims()))),
        };
        if n > MAX_DIM || k > MAX_DIM {
            return Err(KernelError::shape(K, format!("shape ({n}, {k}): each side must be at most {MAX_DIM}")));
        }
        if w.dtype != DType::BF16 {
            return Err(KernelError::shape(
                K,
                format!("dtype {}: the NF4 kernels take weights quantized from bf16", w.dtype),
            ));
        }
        let bs_log2 = log2_exact(K, "blocksize", w.blocksize)?;
        let scales = match &w.absmax {
            Absmax::F32(a) => Scales::Plain(gpu.upload(a)?),
            Absmax::Double(d) => Scales::Double {
                q: gpu.upload(&d.q)?,
                nested: gpu.upload(&d.nested_absmax)?,
                code: gpu.upload(&d.code[..])?,
                offset: d.offset,
                nbs_log2: log2_exact(K, "nested_blocksize", d.nested_blocksize)?,
            },
        };
        Ok(Self { packed: gpu.upload(&w.packed)?, scales, bs_log2, n, k })
    }

    /// Rows (output features).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Columns (input features).
    pub fn k(&self) -> usize {
        self.k
    }

    pub fn blocksize(&self) -> usize {
        1 << self.bs_log2
    }

    /// Bytes one pass over the weight reads: packed codes plus block scales (8-bit codes and
    /// nested f32 scales when double-quantized, f32 otherwise).
    pub fn weight_bytes(&self) -> usize {
        let scales = match &self.scales {
            Scales::Plain(a) => 4 * a.len(),
            Scales::Double { q, nested, .. } => q.len() + 4 * nested.len(),
        };
        self.packed.len() + scales
    }

    fn args(&self, gpu: &Gpu) -> WeightArgs {
        let packed = ptr(gpu, &self.packed);
        let bs_log2 = self.bs_log2;
        match &self.scales {
            Scales::Plain(a) => WeightArgs {
                packed,
                absmax: ptr(gpu, a),
                q8: 0,
                nested: 0,
                code8: 0,
                offset: 0.0,
                bs_log2,
                nbs_log2: 0,
            },
            Scales::Double { q, nested, code, offset, nbs_log2 } => WeightArgs {
                packed,
                absmax: 0,
                q8: ptr(gpu, q),
                nested: ptr(gpu, nested),
                code8: ptr(gpu, code),
                offset: *offset,
                bs_log2,
                nbs_log2: *nbs_log2,
            },
        }
    }
}

fn product(kernel: &'static str, what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| KernelError::shape(kernel, format!("{what} = {a} × {b} overflows usize")))
}

/// M as the kernels take it: at least 1, at most [`MAX_DIM`].
fn rows_i32(kernel: &'static str, m: usize) -> Result<i32> {
    if m == 0 || m > MAX_DIM {
        return Err(KernelError::shape(kernel, format!("M = {m}: must be in 1..={MAX_DIM}")));
    }
    Ok(m as i32)
}

/// The LoRA term a tensor-core launch adds in its epilogue (u null: none).
struct Tail {
    /// fwd: U (M, r); bwd: V (M, r)
    u: u64,
    /// fwd: B (N, r); bwd: A (r, K)
    w: u64,
    r: i32,
    s: f32,
    mask: Mask,
}

impl Tail {
    const NONE: Tail = Tail { u: 0, w: 0, r: 0, s: 0.0, mask: Mask::NONE };
}

/// The dropout mask as kernels regenerate it (p = 0: none).
#[derive(Debug, Clone, Copy)]
struct Mask {
    seed: u64,
    p: f32,
    keep: f32,
}

impl Mask {
    const NONE: Mask = Mask { seed: 0, p: 0.0, keep: 1.0 };

    fn of(kernel: &'static str, d: Option<Dropout>) -> Result<Mask> {
        let Some(d) = d else { return Ok(Mask::NONE) };
        // Written so that NaN fails as well.
        if !(0.0..1.0).contains(&d.p) {
            return Err(KernelError::shape(kernel, format!("dropout probability must be in [0, 1), got {}", d.p)));
        }
        // The reference's scale, computed in f32 the same way.
        Ok(Mask { seed: d.seed, p: d.p, keep: 1.0f32 / (1.0 - d.p) })
    }
}

/// One tensor-core launch: c = alpha · (a · op(W) + tail) + beta · c. Buffer lengths are the
/// caller's to check.
#[allow(clippy::too_many_arguments)]
fn launch_tiled(
    gpu: &Gpu,
    kernel: &'static str,
    bwd: bool,
    a: u64,
    w: &Nf4Matrix,
    c: u64,
    m: usize,
    alpha: f32,
    beta: f32,
    tail: &Tail,
) -> Result<()> {
    let (kr, no) = if bwd { (w.n, w.k) } else { (w.k, w.n) };
    let mi = rows_i32(kernel, m)?;
    let (ni, ki) = (w.n as i32, w.k as i32); // ≤ MAX_DIM, checked by upload
    let (bm, bn) = GEMM_TILE;
    let (gx, gy) = (m.div_ceil(bm), no.div_ceil(bn));
    if gy > 65535 {
        return Err(KernelError::shape(kernel, format!("{no} output columns need {gy} column tiles, at most 65535")));
    }
    let vec_a = i32::from(a.is_multiple_of(16) && kr.is_multiple_of(8));
    let fast = i32::from(w.k.is_multiple_of(32) && w.bs_log2 >= 4);
    let f = gpu.function(MODULE, if bwd { "nf4_gemm_bwd_bf16" } else { "nf4_gemm_fwd_bf16" })?;
    // More than the default 48 KiB of dynamic shared memory must be asked for per function.
    f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, GEMM_SMEM as i32)?;
    let cfg = LaunchConfig {
        grid_dim: (gx as u32, gy as u32, 1),
        block_dim: (GEMM_THREADS, 1, 1),
        shared_mem_bytes: GEMM_SMEM,
    };
    let wa = w.args(gpu);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&a);
    push_weight(&mut l, &wa);
    l.arg(&c).arg(&mi).arg(&ni).arg(&ki).arg(&alpha).arg(&beta).arg(&vec_a).arg(&fast);
    l.arg(&tail.u).arg(&tail.w).arg(&tail.r).arg(&tail.s);
    if bwd {
        l.arg(&tail.mask.seed).arg(&tail.mask.p).arg(&tail.mask.keep);
    }
    // SAFETY: the caller checked that a holds M·KR and c M·NO bf16, and (when tail.u is set)
    // that U/V hold M·r and B (N, r) / A (r, K) bf16 with 1 ≤ r ≤ 64; the weight's buffers come
    // from a validated Nf4Tensor (packed ⌈N·K/2⌉ bytes, one scale a block, 256 code entries).
    // Every global access of the kernel is guarded by M, N, K and r, 16-byte copies are used
    // only where vec_a / fast say rows are aligned, and it writes c inside (M, NO) only.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// y (M, N) = alpha · x (M, K) · Wᵀ + beta · y, bf16, f32 accumulation; beta == 0 never reads y.
///
/// x: (M, K) row-major
/// w: NF4 (N, K)
/// y: (M, N) row-major
///
/// M ≤ [`GEMV_MAX_M`] goes to [`nf4_gemv`], larger M to [`nf4_gemm_fwd_tiled`].
pub fn nf4_gemm_fwd(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    w: &Nf4Matrix,
    y: &mut impl DevicePtrMut<bf16>,
    m: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    if (1..=GEMV_MAX_M).contains(&m) {
        nf4_gemv(gpu, x, w, y, m, alpha, beta)
    } else {
        nf4_gemm_fwd_tiled(gpu, x, w, y, m, alpha, beta)
    }
}

/// [`nf4_gemm_fwd`] on the tensor-core kernel for any M.
///
/// x: (M, K) row-major
/// w: NF4 (N, K)
/// y: (M, N) row-major
pub fn nf4_gemm_fwd_tiled(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    w: &Nf4Matrix,
    y: &mut impl DevicePtrMut<bf16>,
    m: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    const K: &str = "nf4_gemm_fwd";
    check_len(K, "x", x.len(), product(K, "M·K", m, w.k)?)?;
    check_len(K, "y", y.len(), product(K, "M·N", m, w.n)?)?;
    let (px, py) = (ptr(gpu, x), ptr_mut(gpu, y));
    launch_tiled(gpu, K, false, px, w, py, m, alpha, beta, &Tail::NONE)
}

/// dx (M, K) = alpha · dy (M, N) · W + beta · dx, bf16, f32 accumulation; beta == 0 never reads dx.
///
/// dy: (M, N) row-major
/// w: NF4 (N, K)
/// dx: (M, K) row-major
pub fn nf4_gemm_bwd(
    gpu: &Gpu,
    dy: &impl DevicePtr<bf16>,
    w: &Nf4Matrix,
    dx: &mut impl DevicePtrMut<bf16>,
    m: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    const K: &str = "nf4_gemm_bwd";
    check_len(K, "dy", dy.len(), product(K, "M·N", m, w.n)?)?;
    check_len(K, "dx", dx.len(), product(K, "M·K", m, w.k)?)?;
    let (pdy, pdx) = (ptr(gpu, dy), ptr_mut(gpu, dx));
    launch_tiled(gpu, K, true, pdy, w, pdx, m, alpha, beta, &Tail::NONE)
}

/// y (M, N) = alpha · x (M, K) · Wᵀ + beta · y for 1 ≤ M ≤ [`GEMV_MAX_M`]: one pass over the
/// weight. f32 or bf16 activations (f32 x is split into two bf16 terms: the weight values are
/// exact in bf16, so the products lose only the 2⁻¹⁷ of x beyond them).
///
/// x: (M, K) row-major
/// w: NF4 (N, K)
/// y: (M, N) row-major
pub fn nf4_gemv<T: Float>(
    gpu: &Gpu,
    x: &impl DevicePtr<T>,
    w: &Nf4Matrix,
    y: &mut impl DevicePtrMut<T>,
    m: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    const K: &str = "nf4_gemv";
    if !(1..=GEMV_MAX_M).contains(&m) {
        return Err(KernelError::shape(K, format!("M = {m}: the GEMV takes 1..={GEMV_MAX_M} rows")));
    }
    check_len(K, "x", x.len(), m * w.k)?;
    check_len(K, "y", y.len(), m * w.n)?;
    let (mi, ni, ki) = (m as i32, w.n as i32, w.k as i32);
    let px = ptr(gpu, x);
    let fast = i32::from(w.k.is_multiple_of(32) && w.bs_log2 >= 5 && px.is_multiple_of(16));
    let f = gpu.function(MODULE, T::pick("nf4_gemv_fwd_f32", "nf4_gemv_fwd_bf16"))?;
    let cfg = LaunchConfig {
        grid_dim: (w.n.div_ceil(GEMV_ROWS) as u32, 1, 1),
        block_dim: (GEMV_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let wa = w.args(gpu);
    let py = ptr_mut(gpu, y);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&px);
    push_weight(&mut l, &wa);
    l.arg(&py).arg(&mi).arg(&ni).arg(&ki).arg(&alpha).arg(&beta).arg(&fast);
    // SAFETY: x holds M·K and y M·N elements of T (checked), M ≤ 16; the weight's buffers come
    // from a validated Nf4Tensor. Loads are guarded by M, N, K (16-byte loads only on the fast
    // path: K a multiple of 32, x 16-byte aligned); only y inside (M, N) is written.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// LoRA

/// Inverted dropout on the adapter's input, regenerated from `seed` exactly as
/// `gristmill_core::ops::lora::dropout_mask_ref(seed, M·K, p)` (element m·K + k).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub seed: u64,
    /// In [0, 1); 0 keeps everything.
    pub p: f32,
}

/// The adapter of one LoRA linear layer: rank, scale s and dropout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lora {
    /// 1 ≤ r ≤ [`MAX_RANK`]
    pub r: usize,
    pub scale: f32,
    pub dropout: Option<Dropout>,
}

/// The rank padded to the kernels' instantiations.
fn rank_pad(r: usize) -> usize {
    if r <= 16 {
        16
    } else if r <= 32 {
        32
    } else {
        64
    }
}

/// (splits, length of each, a multiple of `step`) of a reduction of `len` whose output already
/// gives `blocks` blocks: about two blocks a multiprocessor, each split at least 512 long, at
/// most 32 splits. The last split may be shorter; none is empty.
pub fn reduction_splits(len: usize, blocks: usize, step: usize, multiprocessors: usize) -> (usize, usize) {
    let want = (2 * multiprocessors.max(1)).div_ceil(blocks.max(1)).min(len / 512).clamp(1, 32);
    let per = len.div_ceil(want).div_ceil(step).max(1) * step;
    (len.div_ceil(per).max(1), per)
}

fn multiprocessors(gpu: &Gpu) -> usize {
    gpu.info().multiprocessors.max(1) as usize
}

/// Blocks of a grid-stride finishing kernel over `n` elements: at most 8 waves of 256 threads.
fn finish_cfg(gpu: &Gpu, n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 8 * multiprocessors(gpu));
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn down_name(nt: bool, rp: usize) -> &'static str {
    match (nt, rp) {
        (true, 16) => "lora_down_nt_r16_fwd_bf16",
        (true, 32) => "lora_down_nt_r32_fwd_bf16",
        (true, _) => "lora_down_nt_r64_fwd_bf16",
        (false, 16) => "lora_down_nn_r16_fwd_bf16",
        (false, 32) => "lora_down_nn_r32_fwd_bf16",
        (false, _) => "lora_down_nn_r64_fwd_bf16",
    }
}

fn grad_name(rp: usize) -> &'static str {
    match rp {
        16 => "lora_grad_r16_bwd_bf16",
        32 => "lora_grad_r32_bwd_bf16",
        _ => "lora_grad_r64_bwd_bf16",
    }
}

/// out (M, r) bf16 = (Q ∘ mask) · Rᵀ with R (r, C) (`nt`), or Q · R with R (C, r). Lengths are
/// the caller's to check (Q: M·C, R: r·C, out: M·r; 1 ≤ r ≤ 64).
#[allow(clippy::too_many_arguments)]
fn launch_down(gpu: &Gpu, nt: bool, q: u64, rm: u64, out: u64, m: usize, c: usize, r: usize, mask: Mask) -> Result<()> {
    let rp = rank_pad(r);
    let mblocks = m.div_ceil(DOWN_ROWS);
    let (splits, per) = reduction_splits(c, mblocks, DOWN_STEP, multiprocessors(gpu));
    let mut ws = gpu.alloc::<f32>(splits * m * rp)?;
    let f = gpu.function(MODULE, down_name(nt, rp))?;
    f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, DOWN_SMEM as i32)?;
    let cfg = LaunchConfig {
        grid_dim: (mblocks as u32, splits as u32, 1),
        block_dim: (RANK_THREADS, 1, 1),
        shared_mem_bytes: DOWN_SMEM,
    };
    let (mi, ci, ri, per_i) = (m as i32, c as i32, r as i32, per as i32);
    let vec_q = i32::from(q.is_multiple_of(16) && c.is_multiple_of(8));
    let vec_r = i32::from(rm.is_multiple_of(16) && (if nt { c } else { r }).is_multiple_of(8));
    let pws = ptr_mut(gpu, &mut ws);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&q).arg(&rm).arg(&pws).arg(&mi).arg(&ci).arg(&ri).arg(&per_i).arg(&vec_q).arg(&vec_r);
    l.arg(&mask.seed).arg(&mask.p).arg(&mask.keep);
    // SAFETY: Q holds M·C and R r·C bf16 (the caller's checks), ws splits·M·RP f32; loads are
    // guarded by M, C and r (16-byte copies only where vec_q / vec_r say rows are aligned), and
    // block (x, z) writes rows of its 64 below M of ws[z] only.
    unsafe { l.launch(cfg) }?;
    let f = gpu.function(MODULE, "lora_down_finish_fwd_bf16")?;
    let (rpi, si) = (rp as i32, splits as i32);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&pws).arg(&out).arg(&mi).arg(&ri).arg(&rpi).arg(&si);
    // SAFETY: ws holds splits·M·RP f32, all written above (every split covers every row); out
    // holds M·r bf16 (the caller's check); the loop stops at M·r.
    unsafe { l.launch(finish_cfg(gpu, m * r)) }?;
    Ok(())
}

/// out = s · Pᵀ (Q ∘ mask) + beta · out in f32, as (r, C), or (C, r) with `trans`. P (M, r),
/// Q (M, C) bf16. Lengths are the caller's to check.
#[allow(clippy::too_many_arguments)]
fn launch_grad(
    gpu: &Gpu,
    p: u64,
    q: u64,
    out: u64,
    m: usize,
    c: usize,
    r: usize,
    s: f32,
    beta: f32,
    trans: bool,
    mask: Mask,
) -> Result<()> {
    let rp = rank_pad(r);
    let cblocks = c.div_ceil(GRAD_COLS);
    if cblocks > i32::MAX as usize {
        return Err(KernelError::shape("lora_grad", format!("C = {c} is too wide")));
    }
    let (splits, per) = reduction_splits(m, cblocks, GRAD_STEP, multiprocessors(gpu));
    let mut ws = gpu.alloc::<f32>(splits * rp * c)?;
    let f = gpu.function(MODULE, grad_name(rp))?;
    f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, GRAD_SMEM as i32)?;
    let cfg = LaunchConfig {
        grid_dim: (cblocks as u32, splits as u32, 1),
        block_dim: (RANK_THREADS, 1, 1),
        shared_mem_bytes: GRAD_SMEM,
    };
    let (mi, ci, ri, per_i) = (m as i32, c as i32, r as i32, per as i32);
    let vec_p = i32::from(p.is_multiple_of(16) && r.is_multiple_of(8));
    let vec_q = i32::from(q.is_multiple_of(16) && c.is_multiple_of(8));
    let pws = ptr_mut(gpu, &mut ws);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&p).arg(&q).arg(&pws).arg(&mi).arg(&ci).arg(&ri).arg(&per_i).arg(&vec_p).arg(&vec_q);
    l.arg(&mask.seed).arg(&mask.p).arg(&mask.keep);
    // SAFETY: P holds M·r and Q M·C bf16 (the caller's checks), ws splits·RP·C f32; loads are
    // guarded by M, C and r, and block (x, z) writes its columns below C of ws[z] only.
    unsafe { l.launch(cfg) }?;
    let f = gpu.function(MODULE, "lora_grad_finish_bwd_f32")?;
    let (rpi, si, ti) = (rp as i32, splits as i32, i32::from(trans));
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&pws).arg(&out).arg(&ci).arg(&ri).arg(&rpi).arg(&si).arg(&s).arg(&beta).arg(&ti);
    // SAFETY: ws holds splits·RP·C f32, all written above; out holds r·C f32 (the caller's
    // check); the loop stops at r·C.
    unsafe { l.launch(finish_cfg(gpu, r * c)) }?;
    Ok(())
}

/// Checks the rank and returns (M·K, N·r, r·K, M·r, M·N).
fn lora_lens(kernel: &'static str, w: &Nf4Matrix, m: usize, lora: &Lora) -> Result<[usize; 5]> {
    if !(1..=MAX_RANK).contains(&lora.r) {
        return Err(KernelError::shape(kernel, format!("rank r = {}: must be in 1..={MAX_RANK}", lora.r)));
    }
    rows_i32(kernel, m)?;
    Ok([
        product(kernel, "M·K", m, w.k)?,
        w.n * lora.r,
        lora.r * w.k,
        product(kernel, "M·r", m, lora.r)?,
        product(kernel, "M·N", m, w.n)?,
    ])
}

/// The LoRA linear layer's forward: y = x Wᵀ + s · u Bᵀ with u = (x ∘ mask) Aᵀ, saved for the
/// backward. Two launches: u (a rank-r product that reads x once, applying the mask on the fly),
/// then the NF4 product with s · u Bᵀ added in its epilogue.
///
/// x: (M, K) bf16; w: NF4 (N, K); a: (r, K) bf16; b: (N, r) bf16
/// y: (M, N) bf16 (overwritten); u: (M, r) bf16
#[allow(clippy::too_many_arguments)]
pub fn nf4_lora_fwd(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    w: &Nf4Matrix,
    a: &impl DevicePtr<bf16>,
    b: &impl DevicePtr<bf16>,
    lora: &Lora,
    y: &mut impl DevicePtrMut<bf16>,
    u: &mut impl DevicePtrMut<bf16>,
    m: usize,
) -> Result<()> {
    const K: &str = "nf4_lora_fwd";
    let [mk, nr, rk, mr, mn] = lora_lens(K, w, m, lora)?;
    check_len(K, "x", x.len(), mk)?;
    check_len(K, "a", a.len(), rk)?;
    check_len(K, "b", b.len(), nr)?;
    check_len(K, "y", y.len(), mn)?;
    check_len(K, "u", u.len(), mr)?;
    let mask = Mask::of(K, lora.dropout)?;
    let (px, pa, pb, py, pu) = (ptr(gpu, x), ptr(gpu, a), ptr(gpu, b), ptr_mut(gpu, y), ptr_mut(gpu, u));
    launch_down(gpu, true, px, pa, pu, m, w.k, lora.r, mask)?;
    let tail = Tail { u: pu, w: pb, r: lora.r as i32, s: lora.scale, mask: Mask::NONE };
    launch_tiled(gpu, K, false, px, w, py, m, 1.0, 0.0, &tail)
}

/// Where the LoRA backward writes, and whether it adds to what is there.
pub struct LoraGradsOut<'a, DX, DA, DB, V> {
    /// dx: (M, K) bf16 = dy W + s · ((dy B) A) ∘ mask
    pub dx: &'a mut DX,
    /// da: (r, K) f32 = s · vᵀ (x ∘ mask)
    pub da: &'a mut DA,
    /// db: (N, r) f32 = s · dyᵀ u
    pub db: &'a mut DB,
    /// v: (M, r) bf16 = dy B
    pub v: &'a mut V,
    /// dx = new + dx_beta · dx (1: accumulate, as q, k and v projections of one input do).
    pub dx_beta: f32,
    /// da, db = new + grad_beta · old (1: accumulate over micro-batches).
    pub grad_beta: f32,
}

/// The LoRA linear layer's backward (W frozen): v = dy B, then dx = dy W + s · (v A) ∘ mask (the
/// NF4 product with the rank term in its epilogue), dA = s · vᵀ (x ∘ mask), dB = s · dyᵀ u.
/// dy is read by the v and dB products and the NF4 product, x once (dA), the mask regenerated
/// where it is needed.
///
/// x: (M, K) bf16; w: NF4 (N, K); a: (r, K) bf16; b: (N, r) bf16; u: (M, r) bf16 (the forward's)
/// dy: (M, N) bf16
#[allow(clippy::too_many_arguments)]
pub fn nf4_lora_bwd<DX, DA, DB, V>(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    w: &Nf4Matrix,
    a: &impl DevicePtr<bf16>,
    b: &impl DevicePtr<bf16>,
    lora: &Lora,
    u: &impl DevicePtr<bf16>,
    dy: &impl DevicePtr<bf16>,
    m: usize,
    out: LoraGradsOut<'_, DX, DA, DB, V>,
) -> Result<()>
where
    DX: DevicePtrMut<bf16>,
    DA: DevicePtrMut<f32>,
    DB: DevicePtrMut<f32>,
    V: DevicePtrMut<bf16>,
{
    const K: &str = "nf4_lora_bwd";
    let [mk, nr, rk, mr, mn] = lora_lens(K, w, m, lora)?;
    check_len(K, "x", x.len(), mk)?;
    check_len(K, "a", a.len(), rk)?;
    check_len(K, "b", b.len(), nr)?;
    check_len(K, "u", u.len(), mr)?;
    check_len(K, "dy", dy.len(), mn)?;
    check_len(K, "dx", out.dx.len(), mk)?;
    check_len(K, "da", out.da.len(), rk)?;
    check_len(K, "db", out.db.len(), nr)?;
    check_len(K, "v", out.v.len(), mr)?;
    let mask = Mask::of(K, lora.dropout)?;
    let (px, pa, pb, pu, pdy) = (ptr(gpu, x), ptr(gpu, a), ptr(gpu, b), ptr(gpu, u), ptr(gpu, dy));
    let (pdx, pda, pdb, pv) = (ptr_mut(gpu, out.dx), ptr_mut(gpu, out.da), ptr_mut(gpu, out.db), ptr_mut(gpu, out.v));
    let r = lora.r;
    launch_down(gpu, false, pdy, pb, pv, m, w.n, r, Mask::NONE)?;
    let tail = Tail { u: pv, w: pa, r: r as i32, s: lora.scale, mask };
    launch_tiled(gpu, K, true, pdy, w, pdx, m, 1.0, out.dx_beta, &tail)?;
    launch_grad(gpu, pv, px, pda, m, w.k, r, lora.scale, out.grad_beta, false, mask)?;
    launch_grad(gpu, pu, pdy, pdb, m, w.n, r, lora.scale, out.grad_beta, true, Mask::NONE)
}

// ---------------------------------------------------------------------------------------------
// Self-test and benchmark

/// Tolerances: max |gpu − ref| / max |ref| against an f64 reference from the same
/// (bf16-rounded) inputs and the weight's `dequantize_rounded` values.
///
/// bf16 output: the products are exact, the f32 sums differ from the reference's by a few ulps
/// (tensor cores align each mma's addends by truncation), then one bf16 rounding (2⁻⁹).
pub const TOL_GEMM: f64 = 5e-3;
/// f32 output of the GEMV: x split into two bf16 terms (2⁻¹⁷ of x lost) and f32 sums of
/// truncating tensor-core adds.
pub const TOL_GEMV_F32: f64 = 2e-4;
/// LoRA outputs, loosened from [`TOL_GEMM`]: the rank-side activations (u, v, x ∘ mask) are
/// rounded to bf16 before their second product, which the f64 reference does not do.
pub const TOL_LORA: f64 = 1e-2;

fn shape_err(kernel: &'static str) -> impl Fn(gristmill_core::Error) -> KernelError {
    move |e| KernelError::shape(kernel, e.to_string())
}

/// A random (n, k) weight of scale 0.05 quantized from bf16.
pub fn test_weight(n: usize, k: usize, seed: u64, double_quant: bool) -> Result<Nf4Tensor> {
    let values: Vec<f32> =
        check::test_data(n * k, seed, 0.05).into_iter().map(|v| bf16::from_f32(v).to_f32()).collect();
    let shape = Shape::new([n, k]).map_err(shape_err("test_weight"))?;
    Nf4Tensor::quantize(&values, shape, DType::BF16, double_quant).map_err(shape_err("test_weight"))
}

/// `n` values of test data rounded to T, and the same values as f64.
fn data<T: Float>(n: usize, seed: u64, scale: f32) -> (Vec<T>, Vec<f64>) {
    let t: Vec<T> = check::test_data(n, seed, scale).into_iter().map(T::from_f32).collect();
    let r = t.iter().map(|v| f64::from(v.to_f32())).collect();
    (t, r)
}

fn to_f32s<T: Float>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn f64s_to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// y = x Wᵀ of an (m, n, k) product with T activations, on the GEMV or (bf16 only) the tiled
/// kernel, against the f64 reference; the relative error.
fn fwd_err<T: Float>(gpu: &Gpu, (m, n, k): (usize, usize, usize), gemv: bool) -> Result<f64> {
    const K: &str = "nf4 self-test";
    let wq = test_weight(n, k, 1, true)?;
    let w = Nf4Matrix::upload(gpu, &wq)?;
    let (x, xr) = data::<T>(m * k, 2, 1.0);
    let want = f64s_to_f32(&nf4_gemm_fwd_ref(&xr, &wq, m).map_err(shape_err(K))?);
    if gemv {
        let dx = gpu.upload(&x)?;
        let mut dy = gpu.zeros::<T>(m * n)?;
        nf4_gemv(gpu, &dx, &w, &mut dy, m, 1.0, 0.0)?;
        return Ok(check::rel_err(&to_f32s(&gpu.download(&dy)?), &want));
    }
    let xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(v.to_f32())).collect();
    let dx = gpu.upload(&xb)?;
    let mut dy = gpu.zeros::<bf16>(m * n)?;
    nf4_gemm_fwd_tiled(gpu, &dx, &w, &mut dy, m, 1.0, 0.0)?;
    Ok(check::rel_err(&to_f32s(&gpu.download(&dy)?), &want))
}

/// Every kernel of this module against its CPU reference on small, awkward shapes.
pub fn self_test(gpu: &Gpu) -> Result<Vec<Check>> {
    const K: &str = "nf4 self-test";
    let mut out = Vec::new();
    let (m, n, k) = (37, 70, 192);
    let shape = format!("M={m} N={n} K={k} double-quant");
    out.push(Check {
        kernel: "nf4_gemm_fwd_bf16",
        shape: shape.clone(),
        rel_err: fwd_err::<bf16>(gpu, (m, n, k), false)?,
        tol: TOL_GEMM,
    });
    {
        let wq = test_weight(n, k, 3, false)?;
        let w = Nf4Matrix::upload(gpu, &wq)?;
        let (dy, dyr) = data::<bf16>(m * n, 4, 1.0);
        let want = nf4_gemm_bwd_ref(&dyr, &wq, m).map_err(shape_err(K))?;
        let ddy = gpu.upload(&dy)?;
        let mut ddx = gpu.zeros::<bf16>(m * k)?;
        nf4_gemm_bwd(gpu, &ddy, &w, &mut ddx, m, 1.0, 0.0)?;
        let e = check::rel_err(&to_f32s(&gpu.download(&ddx)?), &f64s_to_f32(&want));
        out.push(Check {
            kernel: "nf4_gemm_bwd_bf16",
            shape: format!("M={m} N={n} K={k} plain absmax"),
            rel_err: e,
            tol: TOL_GEMM,
        });
    }
    let (gm, gk) = (5, 160);
    let gshape = format!("M={gm} N={n} K={gk} double-quant");
    out.push(Check {
        kernel: "nf4_gemv_fwd_f32",
        shape: gshape.clone(),
        rel_err: fwd_err::<f32>(gpu, (gm, n, gk), true)?,
        tol: TOL_GEMV_F32,
    });
    out.push(Check {
        kernel: "nf4_gemv_fwd_bf16",
        shape: gshape,
        rel_err: fwd_err::<bf16>(gpu, (gm, n, gk), true)?,
        tol: TOL_GEMM,
    });

    // LoRA, rank 16 with dropout: every rank-side kernel through the fused forward and backward.
    let r = 16;
    let lora = Lora { r, scale: 1.5, dropout: Some(Dropout { seed: 7, p: 0.25 }) };
    let errs = lora_errs(gpu, m, n, k, &lora)?;
    let lshape = format!("M={m} N={n} K={k} r={r} p=0.25");
    for (kernel, e) in [
        ("lora_down_nt_r16_fwd_bf16", errs.u),
        ("nf4_gemm_fwd_bf16", errs.y),
        ("lora_down_nn_r16_fwd_bf16", errs.v),
        ("nf4_gemm_bwd_bf16", errs.dx),
        ("lora_grad_r16_bwd_bf16", errs.da.max(errs.db)),
    ] {
        out.push(Check { kernel, shape: lshape.clone(), rel_err: e, tol: TOL_LORA });
    }
    Ok(out)
}

/// Relative errors of one fused LoRA forward and backward against lora_fwd_ref / lora_bwd_ref.
#[derive(Debug, Clone, Copy)]
pub struct LoraErrs {
    pub y: f64,
    pub u: f64,
    pub dx: f64,
    pub da: f64,
    pub db: f64,
    pub v: f64,
}

/// Runs [`nf4_lora_fwd`] and [`nf4_lora_bwd`] on random data of shape (m, n, k) and compares
/// every output with the f64 reference (the weight dequantized, the mask from
/// `dropout_mask_ref`). The backward's reference takes the GPU's u, as the backward does.
pub fn lora_errs(gpu: &Gpu, m: usize, n: usize, k: usize, lora: &Lora) -> Result<LoraErrs> {
    const K: &str = "nf4 LoRA check";
    let r = lora.r;
    let wq = test_weight(n, k, 11, true)?;
    let w = Nf4Matrix::upload(gpu, &wq)?;
    let wr: Vec<f64> = wq.dequantize_rounded().map_err(shape_err(K))?.into_iter().map(f64::from).collect();
    let (x, xr) = data::<bf16>(m * k, 12, 1.0);
    let (a, ar) = data::<bf16>(r * k, 13, 0.1);
    let (b, br) = data::<bf16>(n * r, 14, 0.1);
    let (dy, dyr) = data::<bf16>(m * n, 15, 1.0);
    let mask: Option<Vec<f64>> = match lora.dropout {
        Some(d) => {
            Some(dropout_mask_ref(d.seed, m * k, d.p).map_err(shape_err(K))?.into_iter().map(f64::from).collect())
        }
        None => None,
    };
    let dims = LoraDims { m, k, n, r };
    let s = f64::from(lora.scale);
    let fwd = lora_fwd_ref(&xr, &wr, &ar, &br, s, &dims, mask.as_deref()).map_err(shape_err(K))?;

    let (gx, ga, gb, gdy) = (gpu.upload(&x)?, gpu.upload(&a)?, gpu.upload(&b)?, gpu.upload(&dy)?);
    let mut gy = gpu.zeros::<bf16>(m * n)?;
    let mut gu = gpu.zeros::<bf16>(m * r)?;
    nf4_lora_fwd(gpu, &gx, &w, &ga, &gb, lora, &mut gy, &mut gu, m)?;
    let u_gpu: Vec<f64> = gpu.download(&gu)?.iter().map(|v| f64::from(v.to_f32())).collect();

    let bwd = lora_bwd_ref(&xr, &wr, &ar, &br, s, &dims, mask.as_deref(), &u_gpu, &dyr).map_err(shape_err(K))?;
    let (mut gdx, mut gda, mut gdb, mut gv) =
        (gpu.zeros::<bf16>(m * k)?, gpu.zeros::<f32>(r * k)?, gpu.zeros::<f32>(n * r)?, gpu.zeros::<bf16>(m * r)?);
    let grads = LoraGradsOut { dx: &mut gdx, da: &mut gda, db: &mut gdb, v: &mut gv, dx_beta: 0.0, grad_beta: 0.0 };
    nf4_lora_bwd(gpu, &gx, &w, &ga, &gb, lora, &gu, &gdy, m, grads)?;
    let e16 = |got: &CudaSlice<bf16>, want: &[f64]| -> Result<f64> {
        Ok(check::rel_err(&to_f32s(&gpu.download(got)?), &f64s_to_f32(want)))
    };
    let e32 = |got: &CudaSlice<f32>, want: &[f64]| -> Result<f64> {
        Ok(check::rel_err(&gpu.download(got)?, &f64s_to_f32(want)))
    };
    Ok(LoraErrs {
        y: e16(&gy, &fwd.y)?,
        u: e16(&gu, &fwd.u)?,
        dx: e16(&gdx, &bwd.dx)?,
        da: e32(&gda, &bwd.da)?,
        db: e32(&gdb, &bwd.db)?,
        v: e16(&gv, &bwd.v)?,
    })
}

fn upload_bf16(gpu: &Gpu, n: usize, seed: u64, scale: f32) -> Result<CudaSlice<bf16>> {
    let v: Vec<bf16> = check::test_data(n, seed, scale).into_iter().map(bf16::from_f32).collect();
    gpu.upload(&v)
}

/// The training shapes (M, N, K) of the benchmark: a square projection, the down projection of
/// a 14336-wide MLP and its up projection.
pub const BENCH_TRAIN: [(usize, usize, usize); 3] = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096)];
/// The decoding shapes: M tokens through 4096 → 4096 and 4096 → 14336.
pub const BENCH_DECODE: [(usize, usize, usize); 6] =
    [(1, 4096, 4096), (4, 4096, 4096), (16, 4096, 4096), (1, 14336, 4096), (4, 14336, 4096), (16, 14336, 4096)];
/// Rank of the fused LoRA rows.
pub const BENCH_RANK: usize = 16;

/// The key a benchmark row is matched by against the reference stack's figures
/// (scripts/bench-ref-nf4.py writes the same strings).
pub fn bench_key(op: &str, m: usize, n: usize, k: usize) -> String {
    format!("{op} M={m} N={n} K={k}")
}

/// Every kernel of this module at realistic sizes: the NF4 products of training (forward,
/// backward, fused LoRA at rank 16 with dropout) and decoding, each beside the
/// dequantize-then-GEMM stand-in of the gemm module.
pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let flops = |m: usize, n: usize, k: usize| 2.0 * m as f64 * n as f64 * k as f64;
    // One 4096 × 4096 and one 4096 · 14336 element weight; the two MLP shapes share the codes.
    let sq = test_weight(4096, 4096, 21, true)?;
    let mut wide = test_weight(14336, 4096, 22, true)?;
    for (m, n, k) in BENCH_TRAIN {
        let wq = if n == k {
            sq.clone()
        } else {
            wide.shape = Shape::new([n, k]).map_err(shape_err("nf4 bench"))?;
            wide.clone()
        };
        let w = Nf4Matrix::upload(gpu, &wq)?;
        let ws = gemm::Nf4Weight::upload(gpu, &wq)?;
        let x = upload_bf16(gpu, m * k, 23, 1.0)?;
        let dy = upload_bf16(gpu, m * n, 24, 1.0)?;
        let mut y = gpu.zeros::<bf16>(m * n)?;
        let mut dx = gpu.zeros::<bf16>(m * k)?;
        let fwd = bench_key("fwd", m, n, k);
        let bwd = bench_key("bwd", m, n, k);
        let t = check::time_median(gpu, 5, 20, || nf4_gemm_fwd_tiled(gpu, &x, &w, &mut y, m, 1.0, 0.0))?;
        rows.push(BenchRow {
            kernel: "nf4_gemm_fwd_bf16",
            shape: fwd.clone(),
            seconds: t,
            work: Work::Flops(flops(m, n, k)),
        });
        let t = check::time_median(gpu, 5, 20, || gemm::nf4_matmul_nt(gpu, &x, &ws, &mut y, m, 1.0, 0.0))?;
        rows.push(BenchRow { kernel: "nf4_matmul_nt_bf16", shape: fwd, seconds: t, work: Work::Flops(flops(m, n, k)) });
        let t = check::time_median(gpu, 5, 20, || nf4_gemm_bwd(gpu, &dy, &w, &mut dx, m, 1.0, 0.0))?;
        let bwd_key = bwd.clone();
        rows.push(BenchRow {
            kernel: "nf4_gemm_bwd_bf16",
            shape: bwd.clone(),
            seconds: t,
            work: Work::Flops(flops(m, n, k)),
        });
        let t = check::time_median(gpu, 5, 20, || gemm::nf4_matmul_nn(gpu, &dy, &ws, &mut dx, m, 1.0, 0.0))?;
        rows.push(BenchRow { kernel: "nf4_matmul_nn_bf16", shape: bwd, seconds: t, work: Work::Flops(flops(m, n, k)) });

        // Fused LoRA: the NF4 product plus the rank-16 products (x Aᵀ, u Bᵀ; backward v, v A,
        // dA, dB), counted in the work.
        let r = BENCH_RANK;
        let lora = Lora { r, scale: 2.0, dropout: Some(Dropout { seed: 5, p: 0.1 }) };
        let a = upload_bf16(gpu, r * k, 25, 0.02)?;
        let b = upload_bf16(gpu, n * r, 26, 0.02)?;
        let mut u = gpu.zeros::<bf16>(m * r)?;
        let rank_flops = 2.0 * (m * r) as f64 * (k + n) as f64;
        let t = check::time_median(gpu, 5, 20, || nf4_lora_fwd(gpu, &x, &w, &a, &b, &lora, &mut y, &mut u, m))?;
        rows.push(BenchRow {
            kernel: "nf4_lora_fwd",
            shape: format!("{} r={r} p=0.1", bench_key("lora-fwd", m, n, k)),
            seconds: t,
            work: Work::Flops(flops(m, n, k) + rank_flops),
        });
        let (mut da, mut db, mut v) = (gpu.zeros::<f32>(r * k)?, gpu.zeros::<f32>(n * r)?, gpu.zeros::<bf16>(m * r)?);
        let t = check::time_median(gpu, 5, 20, || {
            let out = LoraGradsOut { dx: &mut dx, da: &mut da, db: &mut db, v: &mut v, dx_beta: 0.0, grad_beta: 0.0 };
            nf4_lora_bwd(gpu, &x, &w, &a, &b, &lora, &u, &dy, m, out)
        })?;
        if n == k {
            // The rank-side kernels alone (bytes: the activation they stream, read once).
            let mask = Mask::of("nf4 bench", lora.dropout)?;
            let (px, pa, pb, pdy, pu) = (ptr(gpu, &x), ptr(gpu, &a), ptr(gpu, &b), ptr(gpu, &dy), ptr(gpu, &u));
            let mut scratch = gpu.zeros::<bf16>(m * r)?;
            let mut g32 = gpu.zeros::<f32>(r * k.max(n))?;
            let (ps, pg) = (ptr_mut(gpu, &mut scratch), ptr_mut(gpu, &mut g32));
            let parts: [(&'static str, &str, usize); 4] = [
                ("lora_down_nt_r16_fwd_bf16", "u = (x∘mask) Aᵀ", m * k),
                ("lora_down_nn_r16_fwd_bf16", "v = dy B", m * n),
                ("lora_grad_r16_bwd_bf16", "dA = s vᵀ (x∘mask)", m * k),
                ("lora_grad_r16_bwd_bf16", "dB = s dyᵀ u", m * n),
            ];
            // The backward's NF4 product with its rank term, without and with the mask.
            let pdx = ptr_mut(gpu, &mut dx);
            for (tag, tmask) in [("s·(v A)", Mask::NONE), ("s·(v A)∘mask", mask)] {
                let tail = Tail { u: ps, w: pa, r: r as i32, s: 2.0, mask: tmask };
                let t = check::time_median(gpu, 5, 20, || {
                    launch_tiled(gpu, "nf4 bench", true, pdy, &w, pdx, m, 1.0, 0.0, &tail)
                })?;
                rows.push(BenchRow {
                    kernel: "nf4_gemm_bwd_bf16",
                    shape: format!("{bwd_key} + {tag} r={r}"),
                    seconds: t,
                    work: Work::Flops(flops(m, n, k) + 2.0 * (m * r * k) as f64),
                });
            }
            for (i, (kernel, what, elems)) in parts.into_iter().enumerate() {
                let t = check::time_median(gpu, 5, 20, || match i {
                    0 => launch_down(gpu, true, px, pa, ps, m, k, r, mask),
                    1 => launch_down(gpu, false, pdy, pb, ps, m, n, r, Mask::NONE),
                    2 => launch_grad(gpu, ps, px, pg, m, k, r, 2.0, 0.0, false, mask),
                    _ => launch_grad(gpu, pu, pdy, pg, m, n, r, 2.0, 0.0, true, Mask::NONE),
                })?;
                rows.push(BenchRow {
                    kernel,
                    shape: format!("{what} M={m} K={} r={r}", if i % 2 == 0 { k } else { n }),
                    seconds: t,
                    work: Work::Bytes(2.0 * elems as f64),
                });
            }
        }
        rows.push(BenchRow {
            kernel: "nf4_lora_bwd",
            shape: format!("{} r={r} p=0.1", bench_key("lora-bwd", m, n, k)),
            seconds: t,
            work: Work::Flops(flops(m, n, k) + 2.0 * rank_flops),
        });
    }
    for (m, n, k) in BENCH_DECODE {
        let wq = if n == k {
            sq.clone()
        } else {
            wide.shape = Shape::new([n, k]).map_err(shape_err("nf4 bench"))?;
            wide.clone()
        };
        let w = Nf4Matrix::upload(gpu, &wq)?;
        let ws = gemm::Nf4Weight::upload(gpu, &wq)?;
        let x = upload_bf16(gpu, m * k, 27, 1.0)?;
        let mut y = gpu.zeros::<bf16>(m * n)?;
        let key = bench_key("decode", m, n, k);
        let bytes = w.weight_bytes() as f64;
        let t = check::time_median(gpu, 5, 20, || nf4_gemv(gpu, &x, &w, &mut y, m, 1.0, 0.0))?;
        rows.push(BenchRow { kernel: "nf4_gemv_fwd_bf16", shape: key.clone(), seconds: t, work: Work::Bytes(bytes) });
        let t = check::time_median(gpu, 5, 20, || gemm::nf4_matmul_nt(gpu, &x, &ws, &mut y, m, 1.0, 0.0))?;
        rows.push(BenchRow { kernel: "nf4_matmul_nt_bf16", shape: key, seconds: t, work: Work::Bytes(bytes) });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_pads_to_an_instantiation() {
        assert_eq!(rank_pad(1), 16);
        assert_eq!(rank_pad(16), 16);
        assert_eq!(rank_pad(17), 32);
        assert_eq!(rank_pad(32), 32);
        assert_eq!(rank_pad(40), 64);
        assert_eq!(rank_pad(64), 64);
        for rp in [16, 32, 64] {
            for nt in [true, false] {
                assert!(down_name(nt, rp).contains(&format!("_r{rp}_")));
            }
            assert!(grad_name(rp).contains(&format!("_r{rp}_")));
        }
    }

    #[test]
    fn every_kernel_is_in_the_ptx() {
        let ptx = crate::ptx::module(MODULE).unwrap().sm80;
        let mut names = vec![
            "nf4_gemm_fwd_bf16",
            "nf4_gemm_bwd_bf16",
            "nf4_gemv_fwd_f32",
            "nf4_gemv_fwd_bf16",
            "lora_down_finish_fwd_bf16",
            "lora_grad_finish_bwd_f32",
        ];
        for rp in [16, 32, 64] {
            names.extend([down_name(true, rp), down_name(false, rp), grad_name(rp)]);
        }
        for n in names {
            assert!(ptx.contains(&format!(".entry {n}(")), "{n} missing from nf4.ptx");
        }
    }

    #[test]
    fn reduction_splits_cover_without_empty_splits() {
        // x Aᵀ at M = 8192: 128 row blocks on 132 multiprocessors → 3 splits of 1408.
        assert_eq!(reduction_splits(4096, 128, 64, 132), (3, 1408));
        // dA at K = 4096: 32 column blocks, M = 8192 → 9 splits of 928 rows.
        assert_eq!(reduction_splits(8192, 32, 32, 132), (9, 928));
        // Short reductions are not split.
        assert_eq!(reduction_splits(200, 1, 64, 132), (1, 256));
        assert_eq!(reduction_splits(1, 1, 32, 132), (1, 32));
        for len in [1, 63, 64, 511, 512, 1000, 4097, 14336, 100_000] {
            for blocks in [1, 7, 64, 500] {
                for step in [32, 64] {
                    let (s, per) = reduction_splits(len, blocks, step, 132);
                    assert!((1..=32).contains(&s), "len={len}: {s} splits");
                    assert_eq!(per % step, 0);
                    assert!(per * s >= len && per * (s - 1) < len, "len={len} blocks={blocks}: {s} × {per}");
                }
            }
        }
    }

    #[test]
    fn log2_needs_powers_of_two() {
        assert_eq!(log2_exact("t", "bs", 64).unwrap(), 6);
        assert_eq!(log2_exact("t", "bs", 1).unwrap(), 0);
        assert!(log2_exact("t", "bs", 96).is_err());
        assert!(log2_exact("t", "bs", 0).is_err());
    }

    #[test]
    fn dropout_probability_is_checked() {
        assert!(Mask::of("t", None).is_ok());
        let m = Mask::of("t", Some(Dropout { seed: 1, p: 0.1 })).unwrap();
        assert_eq!(m.keep, 1.0f32 / 0.9);
        for p in [1.0, -0.1, f32::NAN, 2.0] {
            assert!(Mask::of("t", Some(Dropout { seed: 1, p })).is_err(), "p = {p}");
        }
    }

    #[test]
    fn bench_keys_are_what_the_reference_script_writes() {
        assert_eq!(bench_key("fwd", 8192, 4096, 14336), "fwd M=8192 N=4096 K=14336");
        assert_eq!(bench_key("decode", 1, 14336, 4096), "decode M=1 N=14336 K=4096");
    }
}
