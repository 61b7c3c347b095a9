//! Launchers of kernels/cuda/gemm.cu: dense matrix products (bf16 on tensor cores, f32 SIMT) and
//! the NF4 weight dequantized into them.
//!
//! [`nf4_matmul_nt`] and [`nf4_matmul_nn`] are the simple form of the NF4 linear layer: dequantize
//! into a scratch buffer, then one GEMM. The scratch comes from the caching pool, so after the
//! first step it costs one pass over the weight and no allocation.

use crate::Gpu;
use crate::check::{self, BenchRow, Check, Work};
use crate::error::{KernelError, Result, check_len, to_i32};
use crate::launch::{Float, grid_1d, ptr, ptr_mut};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, sys};
use gristmill_core::DType;
use gristmill_core::nf4::{Absmax, Nf4Tensor};
use gristmill_core::ops::matmul::{Trans, matmul_fwd_ref};
use half::bf16;

const MODULE: &str = "gemm";

/// How A and B are stored; every product is C (M, N) = op(A) · op(B) summed over K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A (M, K), B (N, K): y = x Wᵀ
    NT,
    /// A (M, K), B (K, N): dx = dy W
    NN,
    /// A (K, M), B (K, N): dW = dyᵀ x
    TN,
}

impl Layout {
    pub const ALL: [Layout; 3] = [Layout::NT, Layout::NN, Layout::TN];

    /// Row lengths (leading dimensions) of the stored A and B of an M × N × K product.
    pub fn leading_dims(self, m: usize, n: usize, k: usize) -> (usize, usize) {
        match self {
            Layout::NT => (k, k),
            Layout::NN => (k, n),
            Layout::TN => (m, n),
        }
    }

    /// The transpose flags of the CPU reference (`matmul_fwd_ref`) for this layout.
    pub fn trans(self) -> (Trans, Trans) {
        match self {
            Layout::NT => (Trans::N, Trans::T),
            Layout::NN => (Trans::N, Trans::N),
            Layout::TN => (Trans::T, Trans::N),
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Layout::NT => "NT",
            Layout::NN => "NN",
            Layout::TN => "TN",
        }
    }
}

/// Output tile of one block of the tensor-core kernels (the f32 kernel has one tile, 128 × 128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// 128 × 256, 8 warps: the fast one, once there are enough tiles to fill the GPU.
    Large,
    /// 64 × 64, 4 warps: products too small in M or N to give every multiprocessor a large tile,
    /// or with a short K.
    Small,
}

impl Tile {
    /// (BM, BN, threads a block, dynamic shared memory bytes): 4 stages of BK = 32 bf16 columns
    /// of both operands, as gemm.cu's instantiations.
    pub const fn geometry(self) -> (usize, usize, u32, u32) {
        match self {
            Tile::Large => (128, 256, 256, 4 * (128 + 256) * 32 * 2),
            Tile::Small => (64, 64, 128, 4 * (64 + 64) * 32 * 2),
        }
    }

    /// Large tiles when there are at least as many as multiprocessors and K is long enough for
    /// their operand reuse to pay; small ones otherwise.
    pub fn pick(m: usize, n: usize, k: usize, multiprocessors: usize) -> Tile {
        let (bm, bn, _, _) = Tile::Large.geometry();
        let tiles = m.div_ceil(bm).saturating_mul(n.div_ceil(bn));
        if tiles >= multiprocessors && k >= LARGE_TILE_MIN_K { Tile::Large } else { Tile::Small }
    }
}

/// Below this K a product is dominated by loading its tiles and writing C, which the small tiles
/// (more blocks in flight per multiprocessor) do faster: on an H200 at M = N = 4096 small tiles
/// win up to K = 256 and lose from K = 1024 on.
const LARGE_TILE_MIN_K: usize = 512;

/// k-tile of the tensor-core kernels: split-K ranges are multiples of it.
const BK: usize = 32;

/// How many K ranges a tensor-core product is cut into (1: none), and the length of each.
///
/// A product with fewer tiles than half the multiprocessors and a long K (a LoRA factor's
/// product, a rank-sized weight gradient) would leave most of the GPU idle: its K is split so that
/// about two blocks per multiprocessor run, each split at least 256 long, at most 16 splits. The
/// partial sums go to an f32 workspace that a second kernel adds up (deterministically).
pub fn split_k(m: usize, n: usize, k: usize, tile: Tile, multiprocessors: usize) -> (usize, usize) {
    let (bm, bn, _, _) = tile.geometry();
    let tiles = m.div_ceil(bm).saturating_mul(n.div_ceil(bn)).max(1);
    if tiles.saturating_mul(2) > multiprocessors {
        return (1, k);
    }
    let want = (2 * multiprocessors).div_ceil(tiles).min(k / 256).min(16);
    if want <= 1 {
        return (1, k);
    }
    let per = k.div_ceil(want).div_ceil(BK) * BK;
    (k.div_ceil(per), per)
}

/// Tile of the f32 SIMT kernels and their block size.
const SIMT_TILE: (usize, usize, u32) = (128, 128, 256);

/// The kernel symbol for a layout, input and output types and tile; `None` for f32 inputs with
/// a bf16 output, which has no kernel.
pub fn kernel_name(layout: Layout, in_bf16: bool, out_bf16: bool, tile: Tile) -> Option<&'static str> {
    use Layout::*;
    Some(match (in_bf16, out_bf16, tile, layout) {
        (false, true, _, _) => return None,
        (false, false, _, NT) => "gemm_nt_fwd_f32",
        (false, false, _, NN) => "gemm_nn_fwd_f32",
        (false, false, _, TN) => "gemm_tn_fwd_f32",
        (true, true, Tile::Large, NT) => "gemm_nt_fwd_bf16",
        (true, true, Tile::Large, NN) => "gemm_nn_fwd_bf16",
        (true, true, Tile::Large, TN) => "gemm_tn_fwd_bf16",
        (true, false, Tile::Large, NT) => "gemm_nt_f32out_fwd_bf16",
        (true, false, Tile::Large, NN) => "gemm_nn_f32out_fwd_bf16",
        (true, false, Tile::Large, TN) => "gemm_tn_f32out_fwd_bf16",
        (true, true, Tile::Small, NT) => "gemm_nt_small_fwd_bf16",
        (true, true, Tile::Small, NN) => "gemm_nn_small_fwd_bf16",
        (true, true, Tile::Small, TN) => "gemm_tn_small_fwd_bf16",
        (true, false, Tile::Small, NT) => "gemm_nt_small_f32out_fwd_bf16",
        (true, false, Tile::Small, NN) => "gemm_nn_small_f32out_fwd_bf16",
        (true, false, Tile::Small, TN) => "gemm_tn_small_f32out_fwd_bf16",
    })
}

/// Whether a bf16 operand at device address `addr` with row length `ld` can be copied in 16-byte
/// chunks: every row must start 16-byte aligned.
pub fn vector_loads_ok(addr: u64, ld: usize) -> bool {
    addr.is_multiple_of(16) && ld.is_multiple_of(8)
}

fn multiprocessors(gpu: &Gpu) -> usize {
    gpu.info().multiprocessors.max(1) as usize
}

fn product(kernel: &'static str, what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| KernelError::shape(kernel, format!("{what} = {a} × {b} overflows usize")))
}

/// C = alpha · op(A)·op(B) + beta · C, f32 accumulation. beta == 0 does not read C (it may hold
/// garbage or NaN).
///
/// a: (M, K) for NT and NN, (K, M) for TN
/// b: (N, K) for NT, (K, N) for NN and TN
/// c: (M, N)
///
/// f32 inputs give an f32 output (SIMT kernel); bf16 inputs a bf16 or f32 output (tensor cores;
/// the tile by [`Tile::pick`], K split by [`split_k`] when the tiles alone would leave the GPU idle).
/// Any M, N, K ≥ 1 and any element-aligned buffer or view; f32 inputs with a bf16 output are a
/// shape error.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Float, O: Float>(
    gpu: &Gpu,
    layout: Layout,
    m: usize,
    n: usize,
    k: usize,
    a: &impl DevicePtr<T>,
    b: &impl DevicePtr<T>,
    c: &mut impl DevicePtrMut<O>,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let tile = Tile::pick(m, n, k, multiprocessors(gpu));
    gemm_with_tile(gpu, layout, tile, m, n, k, a, b, c, alpha, beta)
}

/// [`gemm`] with the tensor-core tile chosen by the caller (ignored for f32 inputs).
#[allow(clippy::too_many_arguments)]
pub fn gemm_with_tile<T: Float, O: Float>(
    gpu: &Gpu,
    layout: Layout,
    tile: Tile,
    m: usize,
    n: usize,
    k: usize,
    a: &impl DevicePtr<T>,
    b: &impl DevicePtr<T>,
    c: &mut impl DevicePtrMut<O>,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    const K: &str = "gemm";
    if m == 0 || n == 0 || k == 0 {
        return Err(KernelError::shape(K, format!("M, N, K = {m}, {n}, {k}: each must be at least 1")));
    }
    let name = kernel_name(layout, T::IS_BF16, O::IS_BF16, tile)
        .ok_or_else(|| KernelError::shape(K, "f32 inputs with a bf16 output are not supported"))?;
    check_len(K, "a", a.len(), product(K, "M·K", m, k)?)?;
    check_len(K, "b", b.len(), product(K, "N·K", n, k)?)?;
    check_len(K, "c", c.len(), product(K, "M·N", m, n)?)?;
    let (mi, ni, ki) = (to_i32(K, "M", m)?, to_i32(K, "N", n)?, to_i32(K, "K", k)?);
    let f = gpu.function(MODULE, name)?;
    let (pa, pb) = (ptr(gpu, a), ptr(gpu, b));
    if !T::IS_BF16 {
        let (bm, bn, threads) = SIMT_TILE;
        let cfg = grid_2d(K, m.div_ceil(bm), n.div_ceil(bn), 1, threads, 0)?;
        let pc = ptr_mut(gpu, c);
        let mut l = gpu.stream().launch_builder(&f);
        l.arg(&pa).arg(&pb).arg(&pc).arg(&mi).arg(&ni).arg(&ki).arg(&alpha).arg(&beta);
        // SAFETY: a holds M·K, b N·K and c M·N f32 (checked above); every load is bounds-checked
        // against M, N, K and only c is written, inside (M, N).
        unsafe { l.launch(cfg) }?;
        return Ok(());
    }
    let (bm, bn, threads, smem) = tile.geometry();
    let (splits, per) = split_k(m, n, k, tile, multiprocessors(gpu));
    let cfg = grid_2d(K, m.div_ceil(bm), n.div_ceil(bn), splits, threads, smem)?;
    // More than the default 48 KiB of dynamic shared memory must be asked for per function.
    f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)?;
    let (lda, ldb) = layout.leading_dims(m, n, k);
    let (vec_a, vec_b) = (i32::from(vector_loads_ok(pa, lda)), i32::from(vector_loads_ok(pb, ldb)));
    let per_i = to_i32(K, "K per split", per)?;
    let mut ws = if splits > 1 { Some(gpu.alloc::<f32>(splits * m * n)?) } else { None };
    let pws = ws.as_mut().map_or(0, |w| ptr_mut(gpu, w));
    let pc = ptr_mut(gpu, c);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&pa).arg(&pb).arg(&pc).arg(&pws).arg(&mi).arg(&ni).arg(&ki).arg(&per_i);
    l.arg(&alpha).arg(&beta).arg(&vec_a).arg(&vec_b);
    // SAFETY: a holds M·K, b N·K and c M·N elements of the kernel's types (checked above); the
    // kernel reads only inside those (every load is bounds-checked against M, N, K, and 16-byte
    // copies are used only where vec_a / vec_b say the rows are aligned). It writes c, or with
    // split-K (grid z = splits, each `per` of K) only the workspace of splits·M·N f32.
    unsafe { l.launch(cfg) }?;
    if let Some(ws) = &ws {
        let f = gpu.function(MODULE, O::pick("gemm_splitk_fwd_f32", "gemm_splitk_fwd_bf16"))?;
        let mn = (m * n) as i64; // M, N ≤ i32::MAX, so M·N < 2^62
        let splits_i = splits as i32; // at most 16
        let pws = ptr(gpu, ws);
        let mut l = gpu.stream().launch_builder(&f);
        l.arg(&pws).arg(&pc).arg(&mn).arg(&splits_i).arg(&alpha).arg(&beta);
        // SAFETY: ws holds splits·M·N f32, all written by the launch above (every split covers
        // every (row, col) of C); c holds M·N elements; the grid-stride loop stops at M·N.
        unsafe { l.launch(grid_1d(m * n, 256)) }?;
    }
    Ok(())
}

/// (ceil(M / BM), ceil(N / BN), splits) blocks of `threads`, or a shape error past the grid's
/// y limit of 65535 (x takes up to 2^31 − 1, which M ≤ i32::MAX never reaches in tiles).
fn grid_2d(kernel: &'static str, gx: usize, gy: usize, gz: usize, threads: u32, smem: u32) -> Result<LaunchConfig> {
    if gy > 65535 {
        return Err(KernelError::shape(kernel, format!("N needs {gy} column tiles, at most 65535")));
    }
    Ok(LaunchConfig { grid_dim: (gx as u32, gy as u32, gz as u32), block_dim: (threads, 1, 1), shared_mem_bytes: smem })
}

/// How the block scales of an [`Nf4Weight`] sit on the device.
enum Scales {
    /// (n_blocks) f32
    F32(CudaSlice<f32>),
    /// Double quantization: absmax = code[q] · nested[block / nested_blocksize] + offset.
    Double {
        /// (n_blocks) u8
        q: CudaSlice<u8>,
        /// (ceil(n_blocks / nested_blocksize)) f32
        nested: CudaSlice<f32>,
        /// (256) f32
        code: CudaSlice<f32>,
        offset: f32,
        nested_blocksize: i32,
    },
}

/// An NF4 weight resident on the GPU: packed codes, block scales (plain f32 or double-quantized),
/// block sizes, shape (N, K) and the dtype its dequantized values round to.
pub struct Nf4Weight {
    /// (ceil(N·K / 2)) u8, element 2j in the high nibble of byte j
    packed: CudaSlice<u8>,
    scales: Scales,
    blocksize: i32,
    n: usize,
    k: usize,
    /// 0: f32 (kept), 1: bf16, 2: f16 — gemm.cu's ROUND_* codes.
    round: i32,
}

impl std::fmt::Debug for Nf4Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nf4Weight({} × {}, blocksize {}, {} bytes)", self.n, self.k, self.blocksize, self.device_bytes())
    }
}

impl Nf4Weight {
    /// Copies a quantized (N, K) weight to the device.
    pub fn upload(gpu: &Gpu, w: &Nf4Tensor) -> Result<Self> {
        const K: &str = "Nf4Weight::upload";
        w.validate().map_err(|e| KernelError::shape(K, e.to_string()))?;
        let (n, k) = match *w.shape.dims() {
            [n, k] if n > 0 && k > 0 => (n, k),
            _ => return Err(KernelError::shape(K, format!("shape {:?}: expected a non-empty matrix", w.shape.dims()))),
        };
        to_i64(K, n.checked_mul(k))?;
        let round = match w.dtype {
            DType::F32 => 0,
            DType::BF16 => 1,
            DType::F16 => 2,
            other => return Err(KernelError::shape(K, format!("dtype {other}: expected F32, BF16 or F16"))),
        };
        let blocksize = to_i32(K, "blocksize", w.blocksize)?;
        let scales = match &w.absmax {
            Absmax::F32(a) => Scales::F32(gpu.upload(a)?),
            Absmax::Double(d) => Scales::Double {
                q: gpu.upload(&d.q)?,
                nested: gpu.upload(&d.nested_absmax)?,
                code: gpu.upload(&d.code[..])?,
                offset: d.offset,
                nested_blocksize: to_i32(K, "nested_blocksize", d.nested_blocksize)?,
            },
        };
        Ok(Self { packed: gpu.upload(&w.packed)?, scales, blocksize, n, k, round })
    }

    /// Rows (output features).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Columns (input features).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes of device memory the codes and scales take.
    pub fn device_bytes(&self) -> usize {
        let scales = match &self.scales {
            Scales::F32(a) => 4 * a.len(),
            Scales::Double { q, nested, code, .. } => q.len() + 4 * nested.len() + 4 * code.len() + 4,
        };
        self.packed.len() + scales
    }
}

fn to_i64(kernel: &'static str, numel: Option<usize>) -> Result<i64> {
    numel
        .and_then(|v| i64::try_from(v).ok())
        .ok_or_else(|| KernelError::shape(kernel, "the element count does not fit in 64 bits"))
}

/// out (N, K) = the dequantized weight, bit-identical to `Nf4Tensor::dequantize_rounded` (then
/// rounded to T, nearest even).
///
/// out: (N, K) row-major
pub fn nf4_dequant<T: Float>(gpu: &Gpu, w: &Nf4Weight, out: &mut impl DevicePtrMut<T>) -> Result<()> {
    const K: &str = "nf4_dequant";
    let numel = w.n * w.k; // fits: checked by upload
    check_len(K, "out", out.len(), numel)?;
    let numel_i = to_i64(K, Some(numel))?;
    let f = gpu.function(MODULE, T::pick("nf4_dequant_fwd_f32", "nf4_dequant_fwd_bf16"))?;
    // Pointers the kernel does not read (the other kind of scales) are passed as null.
    let (absmax, q8, nested, code8, offset, nested_bs, double_quant) = match &w.scales {
        Scales::F32(a) => (ptr(gpu, a), 0, 0, 0, 0f32, 1i32, 0i32),
        Scales::Double { q, nested, code, offset, nested_blocksize } => {
            (0, ptr(gpu, q), ptr(gpu, nested), ptr(gpu, code), *offset, *nested_blocksize, 1)
        }
    };
    let (pp, po) = (ptr(gpu, &w.packed), ptr_mut(gpu, out));
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&pp).arg(&absmax).arg(&q8).arg(&nested).arg(&code8).arg(&offset).arg(&nested_bs);
    l.arg(&double_quant).arg(&w.blocksize).arg(&w.round).arg(&numel_i).arg(&po);
    // SAFETY: the weight's buffers were uploaded from a validated Nf4Tensor: packed holds
    // ceil(numel / 2) bytes, the scales one entry per block (and the nested scales one per nested
    // block, the code book 256); out holds numel elements (checked). The kernel reads only those,
    // through a grid-stride loop bounded by numel.
    unsafe { l.launch(grid_1d(numel.div_ceil(2), 256)) }?;
    Ok(())
}

/// y (M, N) = alpha · x (M, K) · Wᵀ + beta · y, through a dequantized copy of W.
///
/// x: (M, K)
/// w: NF4 (N, K)
/// y: (M, N)
pub fn nf4_matmul_nt<T: Float>(
    gpu: &Gpu,
    x: &impl DevicePtr<T>,
    w: &Nf4Weight,
    y: &mut impl DevicePtrMut<T>,
    m: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    const K: &str = "nf4_matmul_nt";
    check_len(K, "x", x.len(), product(K, "M·K", m, w.k)?)?;
    check_len(K, "y", y.len(), product(K, "M·N", m, w.n)?)?;
    let mut wd = gpu.alloc::<T>(w.n * w.k)?;
    nf4_dequant(gpu, w, &mut wd)?;
    gemm(gpu, Layout::NT, m, w.n, w.k, x, &wd, y, alpha, beta)
}

/// dx (M, K) = alpha · dy (M, N) · W + beta · dx, through a dequantized copy of W.
///
/// dy: (M, N)
/// w: NF4 (N, K)
/// dx: (M, K)
pub fn nf4_matmul_nn<T: Float>(
    gpu: &Gpu,
    dy: &impl DevicePtr<T>,
    w: &Nf4Weight,
    dx: &mut impl DevicePtrMut<T>,
    m: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    const K: &str = "nf4_matmul_nn";
    check_len(K, "dy", dy.len(), product(K, "M·N", m, w.n)?)?;
    check_len(K, "dx", dx.len(), product(K, "M·K", m, w.k)?)?;
    let mut wd = gpu.alloc::<T>(w.n * w.k)?;
    nf4_dequant(gpu, w, &mut wd)?;
    // The product's own K is the weight's N.
    gemm(gpu, Layout::NN, m, w.k, w.n, dy, &wd, dx, alpha, beta)
}

/// Tolerances of the self-test: max |gpu − ref| / max |ref| against an f64 reference computed
/// from the same (bf16-rounded) inputs.
pub const TOL_F32: f64 = 5e-5;
/// bf16 inputs, f32 output: the products are exact, but tensor cores align the addends of each
/// mma by truncation, which costs a few more f32 ulps than a chain of FMAs.
pub const TOL_BF16_F32OUT: f64 = 1e-4;
/// bf16 output: one round-to-nearest-even of the result (2⁻⁹ relative) on top of the above.
pub const TOL_BF16: f64 = 5e-3;

/// The inputs of one product rounded to T, and those rounded values in f64.
fn operand<T: Float>(n: usize, seed: u64) -> (Vec<T>, Vec<f64>) {
    let t: Vec<T> = check::test_data(n, seed, 1.0).into_iter().map(T::from_f32).collect();
    let r = t.iter().map(|v| f64::from(v.to_f32())).collect();
    (t, r)
}

/// Runs one product on the device and returns (rel_err against the f64 reference, shape).
#[allow(clippy::too_many_arguments)]
fn gemm_err<T: Float, O: Float>(
    gpu: &Gpu,
    layout: Layout,
    tile: Tile,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
) -> Result<f64> {
    let (a, ar) = operand::<T>(m * k, 1);
    let (b, br) = operand::<T>(n * k, 2);
    let (c0, cr) = operand::<O>(m * n, 3);
    let (ta, tb) = layout.trans();
    let prod = matmul_fwd_ref(&ar, &br, m, k, n, ta, tb).map_err(|e| KernelError::shape("gemm", e.to_string()))?;
    let want: Vec<f32> = prod
        .iter()
        .zip(&cr)
        .map(|(&p, &c)| (f64::from(alpha) * p + if beta == 0.0 { 0.0 } else { f64::from(beta) * c }) as f32)
        .collect();
    let (da, db) = (gpu.upload(&a)?, gpu.upload(&b)?);
    let mut dc = gpu.upload(&c0)?;
    gemm_with_tile(gpu, layout, tile, m, n, k, &da, &db, &mut dc, alpha, beta)?;
    let got: Vec<f32> = gpu.download(&dc)?.into_iter().map(O::to_f32).collect();
    Ok(check::rel_err(&got, &want))
}

/// Every kernel of this module against its CPU reference on small, awkward shapes.
pub fn self_test(gpu: &Gpu) -> Result<Vec<Check>> {
    let (m, n, k) = (37, 45, 70);
    let shape = format!("M={m} N={n} K={k} alpha=0.75 beta=0.5");
    let mut out = Vec::new();
    let mut push = |kernel: Option<&'static str>, rel_err: f64, tol: f64| {
        if let Some(kernel) = kernel {
            out.push(Check { kernel, shape: shape.clone(), rel_err, tol });
        }
    };
    for layout in Layout::ALL {
        let e = gemm_err::<f32, f32>(gpu, layout, Tile::Small, m, n, k, 0.75, 0.5)?;
        push(kernel_name(layout, false, false, Tile::Small), e, TOL_F32);
        for tile in [Tile::Large, Tile::Small] {
            let e = gemm_err::<bf16, bf16>(gpu, layout, tile, m, n, k, 0.75, 0.5)?;
            push(kernel_name(layout, true, true, tile), e, TOL_BF16);
            let e = gemm_err::<bf16, f32>(gpu, layout, tile, m, n, k, 0.75, 0.5)?;
            push(kernel_name(layout, true, false, tile), e, TOL_BF16_F32OUT);
        }
    }
    // NF4 dequantization must be bit-exact: the figure is the fraction of elements that differ.
    let (wn, wk) = (7, 129);
    let wf = check::test_data(wn * wk, 4, 0.05);
    let shape_w = gristmill_core::Shape::new([wn, wk]).map_err(|e| KernelError::shape("nf4_dequant", e.to_string()))?;
    let wq = Nf4Tensor::quantize(&wf, shape_w, DType::BF16, true)
        .map_err(|e| KernelError::shape("nf4_dequant", e.to_string()))?;
    let want = wq.dequantize_rounded().map_err(|e| KernelError::shape("nf4_dequant", e.to_string()))?;
    let w = Nf4Weight::upload(gpu, &wq)?;
    let mut o32 = gpu.alloc::<f32>(wn * wk)?;
    nf4_dequant(gpu, &w, &mut o32)?;
    let got32 = gpu.download(&o32)?;
    let mut o16 = gpu.alloc::<bf16>(wn * wk)?;
    nf4_dequant(gpu, &w, &mut o16)?;
    let got16 = gpu.download(&o16)?;
    let frac = |diff: usize| diff as f64 / want.len() as f64;
    let d32 = got32.iter().zip(&want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
    let d16 = got16.iter().zip(&want).filter(|(g, w)| g.to_bits() != bf16::from_f32(**w).to_bits()).count();
    let shape = format!("N={wn} K={wk} double-quant");
    out.push(Check { kernel: "nf4_dequant_fwd_f32", shape: shape.clone(), rel_err: frac(d32), tol: 0.0 });
    out.push(Check { kernel: "nf4_dequant_fwd_bf16", shape, rel_err: frac(d16), tol: 0.0 });
    Ok(out)
}

fn bench_gemm<T: Float, O: Float>(gpu: &Gpu, layout: Layout, m: usize, n: usize, k: usize) -> Result<BenchRow> {
    let a: Vec<T> = check::test_data(m * k, 1, 1.0).into_iter().map(T::from_f32).collect();
    let b: Vec<T> = check::test_data(n * k, 2, 1.0).into_iter().map(T::from_f32).collect();
    let (da, db) = (gpu.upload(&a)?, gpu.upload(&b)?);
    let mut dc = gpu.zeros::<O>(m * n)?;
    let seconds = check::time_median(gpu, 5, 20, || gemm::<T, O>(gpu, layout, m, n, k, &da, &db, &mut dc, 1.0, 0.0))?;
    let tile = Tile::pick(m, n, k, multiprocessors(gpu));
    Ok(BenchRow {
        kernel: kernel_name(layout, T::IS_BF16, O::IS_BF16, tile).unwrap_or("gemm"),
        shape: format!("{} M={m} N={n} K={k}", layout.tag()),
        seconds,
        work: Work::Flops(2.0 * m as f64 * n as f64 * k as f64),
    })
}

/// Every kernel of this module at realistic sizes.
pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    // Square products, then the two LoRA shapes of rank 16 (x·Aᵀ and its dx-side twin).
    for (m, n, k) in [(4096, 4096, 4096), (4096, 16, 4096), (4096, 4096, 16)] {
        for layout in Layout::ALL {
            rows.push(bench_gemm::<bf16, bf16>(gpu, layout, m, n, k)?);
        }
    }
    for layout in Layout::ALL {
        rows.push(bench_gemm::<f32, f32>(gpu, layout, 2048, 2048, 2048)?);
    }
    let (m, n, k) = (4096, 4096, 4096);
    let wf = check::test_data(n * k, 5, 0.05);
    let shape_w = gristmill_core::Shape::new([n, k]).map_err(|e| KernelError::shape("nf4_matmul_nt", e.to_string()))?;
    let wq = Nf4Tensor::quantize(&wf, shape_w, DType::BF16, true)
        .map_err(|e| KernelError::shape("nf4_matmul_nt", e.to_string()))?;
    let w = Nf4Weight::upload(gpu, &wq)?;
    let x: Vec<bf16> = check::test_data(m * k, 6, 1.0).into_iter().map(bf16::from_f32).collect();
    let dx = gpu.upload(&x)?;
    let mut dy = gpu.zeros::<bf16>(m * n)?;
    let seconds = check::time_median(gpu, 5, 20, || nf4_matmul_nt(gpu, &dx, &w, &mut dy, m, 1.0, 0.0))?;
    rows.push(BenchRow {
        kernel: "nf4_matmul_nt_bf16",
        shape: format!("M={m} N={n} K={k} double-quant"),
        seconds,
        work: Work::Flops(2.0 * m as f64 * n as f64 * k as f64),
    });
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_combination_has_a_kernel_except_f32_to_bf16() {
        for layout in Layout::ALL {
            for tile in [Tile::Large, Tile::Small] {
                assert!(kernel_name(layout, false, true, tile).is_none());
                for (i, o) in [(false, false), (true, true), (true, false)] {
                    let name = kernel_name(layout, i, o, tile).unwrap();
                    let tag = layout.tag().to_lowercase();
                    assert!(name.starts_with(&format!("gemm_{tag}_")), "{name}");
                    assert!(name.ends_with(if i { "_fwd_bf16" } else { "_fwd_f32" }), "{name}");
                    assert_eq!(name.contains("f32out"), i && !o, "{name}");
                    assert_eq!(name.contains("small"), i && tile == Tile::Small, "{name}");
                }
            }
        }
        // 15 distinct symbols, each in the committed PTX.
        let ptx = crate::ptx::module("gemm").unwrap().sm80;
        let mut names = Vec::new();
        for layout in Layout::ALL {
            for tile in [Tile::Large, Tile::Small] {
                for (i, o) in [(false, false), (true, true), (true, false)] {
                    names.push(kernel_name(layout, i, o, tile).unwrap());
                }
            }
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 15);
        for n in names.iter().chain(&["nf4_dequant_fwd_f32", "nf4_dequant_fwd_bf16"]) {
            assert!(ptx.contains(&format!(".entry {n}(")), "{n} missing from gemm.ptx");
        }
    }

    #[test]
    fn tile_choice_fills_the_gpu() {
        // 4096² on 132 multiprocessors: 32 × 16 = 512 large tiles.
        assert_eq!(Tile::pick(4096, 4096, 4096, 132), Tile::Large);
        // A rank-16 LoRA product has 32 large tiles: too few.
        assert_eq!(Tile::pick(4096, 16, 4096, 132), Tile::Small);
        // Its twin with K = 16 has enough tiles, but each is mostly writing C.
        assert_eq!(Tile::pick(4096, 4096, 16, 132), Tile::Small);
        assert_eq!(Tile::pick(4096, 4096, 256, 132), Tile::Small);
        assert_eq!(Tile::pick(4096, 4096, 1024, 132), Tile::Large);
        assert_eq!(Tile::pick(1, 1, 4096, 132), Tile::Small);
        assert_eq!(Tile::pick(1, 1, 4096, 1), Tile::Large);
        assert_eq!(Tile::pick(usize::MAX, usize::MAX, usize::MAX, 132), Tile::Large);
    }

    #[test]
    fn split_k_only_for_few_tiles_and_long_k() {
        // Enough tiles: no split.
        assert_eq!(split_k(4096, 4096, 4096, Tile::Large, 132), (1, 4096));
        assert_eq!(split_k(4096, 4096, 4096, Tile::Small, 132), (1, 4096));
        // x · Aᵀ of a rank-16 LoRA: 64 small tiles → 5 splits of 832 (a multiple of 32).
        assert_eq!(split_k(4096, 16, 4096, Tile::Small, 132), (5, 832));
        // Short K: nothing to split.
        assert_eq!(split_k(129, 70, 200, Tile::Small, 132), (1, 200));
        assert_eq!(split_k(1, 1, 1, Tile::Large, 132), (1, 1));
        // One tile, long K: at most 16 splits; the last may be short but none is empty.
        assert_eq!(split_k(64, 16, 4096, Tile::Large, 132), (16, 256));
        assert_eq!(split_k(1, 4096, 576, Tile::Small, 132), (2, 288));
        for k in [300, 511, 512, 1000, 4097, 100_000] {
            for tile in [Tile::Large, Tile::Small] {
                let (s, per) = split_k(3, 5, k, tile, 132);
                assert!((1..=16).contains(&s), "k={k}: {s} splits");
                assert!(s == 1 || per % BK == 0, "k={k}: {s} × {per}");
                assert!(per * s >= k && per * (s - 1) < k, "k={k}: {s} × {per}");
            }
        }
    }

    #[test]
    fn vector_loads_need_aligned_rows() {
        assert!(vector_loads_ok(0x1000, 4096));
        assert!(vector_loads_ok(0x1010, 8));
        assert!(!vector_loads_ok(0x1002, 4096));
        assert!(!vector_loads_ok(0x1000, 576 + 1));
        assert!(!vector_loads_ok(0x1000, 12));
    }

    #[test]
    fn leading_dims_and_reference_flags_agree() {
        // The leading dimension is the stored row length, which the reference's flags imply.
        let (m, n, k) = (3, 5, 7);
        for layout in Layout::ALL {
            let (lda, ldb) = layout.leading_dims(m, n, k);
            let (ta, tb) = layout.trans();
            assert_eq!(lda, if ta == Trans::N { k } else { m });
            assert_eq!(ldb, if tb == Trans::N { n } else { k });
        }
    }

    #[test]
    fn shared_memory_fits_every_target() {
        // sm_86 / sm_89 allow 99 KiB a block.
        for tile in [Tile::Large, Tile::Small] {
            assert!(tile.geometry().3 <= 99 * 1024);
        }
    }
}
