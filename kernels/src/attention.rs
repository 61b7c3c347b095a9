//! Launchers of kernels/cuda/attention.cu: causal grouped-query attention, forward and backward,
//! without storing the attention matrix.
//!
//! bf16 with D = 64 or 128 runs the flash kernels (tensor cores, FlashAttention-2 layout): the
//! forward for more than [`DECODE_MAX_TQ`] queries, the backward always; on Hopper from the
//! compute_90a module with wgmma where that measured faster (the backward, the D = 128 forward),
//! elsewhere with mma.sync. f32, other head dimensions, buffers not on a 16-byte boundary and
//! decoding (few queries against a cache, split over the keys) run the SIMT kernels. Memory is
//! O(T) either way: no (Tq, Tk) buffer exists.
//!
//! Semantics are those of [`gristmill_core::ops::attention`]: q and o are `(B, Tq, H, D)`, k and v
//! `(B, Tk, Hkv, D)`, lse `(B, H, Tq)` f32; query `i` sits at position `Tk − Tq + i`, query head `h`
//! reads KV head `h / (H / Hkv)`, and with segment ids a query sees only keys of its own segment.

use crate::Gpu;
use crate::check::{self, BenchRow, Check, Work};
use crate::error::{KernelError, Result, check_len, to_i32};
use crate::launch::{Float, grid_1d, ptr, ptr_mut};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, sys};
use gristmill_core::ops::attention::{AttnShape, attention_bwd_ref, attention_fwd_ref};
use half::bf16;

const MODULE: &str = "attention";
/// Threads of the tiled kernels (4 warps).
const THREADS: u32 = 128;
/// Query rows (forward, dq) or keys (dk/dv) one block owns.
const BLOCK_ROWS: usize = 16;
/// Keys (forward, dq) or query rows (dk/dv) of one shared-memory tile: one per lane.
const TILE: usize = 32;
/// Largest head dimension: each lane holds at most 4 column pairs.
pub const MAX_D: usize = 256;
/// Most blocks a decode call splits the keys over.
const MAX_SPLITS: usize = 64;
/// Dynamic shared memory a block gets without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;
/// Queries up to which the forward keeps the split-key SIMT kernel (decoding against a cache).
pub const DECODE_MAX_TQ: usize = 16;
/// bf16 elements of padding after every shared-memory row of the flash kernels (PAD in the .cu).
const FLASH_PAD: usize = 8;
/// Largest grid y.
const MAX_GRID_Y: usize = 65_535;

/// One flash forward kernel and its tiles (FLASH_FWD and HOPPER_FWD in the .cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlashFwd {
    kernel: &'static str,
    d: usize,
    warps: usize,
    /// Query rows a block (16 a warp times the warp's row tiles).
    rows: usize,
    /// Keys a shared-memory tile.
    keys: usize,
    /// wgmma (compute_90a only): K and V tiles unpadded and swizzled.
    hopper: bool,
}

impl FlashFwd {
    fn threads(&self) -> u32 {
        (self.warps * 32) as u32
    }

    /// Q tile (padded rows), two stages of K and V tiles (padded, or swizzled plus 1024 bytes to
    /// align them for wgmma), two stages of key segment ids.
    fn smem(&self) -> usize {
        let ld = self.d + FLASH_PAD;
        let kv = if self.hopper { 4 * self.keys * self.d * 2 + 1024 } else { 4 * self.keys * ld * 2 };
        self.rows * ld * 2 + kv + 2 * self.keys * 4
    }
}

/// On Hopper the wgmma forward takes D = 128; D = 64 stays on mma.sync, which measured faster on an
/// H200 (209 against 193 TFLOP/s at B·T = 8·2048).
const FLASH_FWD: &[FlashFwd] = &[
    FlashFwd { kernel: "attention_hflash128_fwd_bf16", d: 128, warps: 8, rows: 128, keys: 128, hopper: true },
    FlashFwd { kernel: "attention_flash64_fwd_bf16", d: 64, warps: 4, rows: 128, keys: 64, hopper: false },
    FlashFwd { kernel: "attention_flash128_fwd_bf16", d: 128, warps: 4, rows: 128, keys: 64, hopper: false },
];

/// One flash dK/dV kernel and its tiles (FLASH_DKV and HOPPER_DKV in the .cu): 16 keys a warp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlashBwd {
    kernel: &'static str,
    d: usize,
    warps: usize,
    /// Query rows a tile.
    rows: usize,
    /// wgmma (compute_90a only): tiles unpadded and swizzled.
    hopper: bool,
}

impl FlashBwd {
    fn threads(&self) -> u32 {
        (self.warps * 32) as u32
    }

    /// Keys a block.
    fn keys(&self) -> usize {
        16 * self.warps
    }

    /// K and V tiles, two stages of {Q, dO, lse, delta, segment ids}, the dSᵀ tile; for wgmma
    /// unpadded, each stage rounded up to 1024 bytes and 1024 more to align the tiles.
    fn smem(&self) -> usize {
        if self.hopper {
            let stage = (2 * self.rows * self.d * 2 + 3 * self.rows * 4).div_ceil(1024) * 1024;
            return 2 * self.keys() * self.d * 2 + 2 * stage + self.keys() * self.rows * 2 + 1024;
        }
        let (ld, lds) = (self.d + FLASH_PAD, self.rows + FLASH_PAD);
        let stage = 2 * self.rows * ld * 2 + 3 * self.rows * 4;
        2 * self.keys() * ld * 2 + 2 * stage + self.keys() * lds * 2
    }

    /// Row tiles of 16 queries a head in dq_accum: Tq rounded up to whole query tiles.
    fn row_tiles16(&self, tq: usize) -> usize {
        tq.div_ceil(self.rows) * self.rows / 16
    }
}

const FLASH_BWD: &[FlashBwd] = &[
    FlashBwd { kernel: "attention_hflash64_dkv_bwd_bf16", d: 64, warps: 8, rows: 64, hopper: true },
    FlashBwd { kernel: "attention_hflash128_dkv_bwd_bf16", d: 128, warps: 8, rows: 64, hopper: true },
    FlashBwd { kernel: "attention_flash64_dkv_bwd_bf16", d: 64, warps: 8, rows: 64, hopper: false },
    FlashBwd { kernel: "attention_flash128_dkv_bwd_bf16", d: 128, warps: 8, rows: 64, hopper: false },
];

/// Whether every address is on a 16-byte boundary (the flash kernels move 16-byte chunks).
fn aligned16(ptrs: &[sys::CUdeviceptr]) -> bool {
    ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// The flash forward for this call, or None where the SIMT kernels run: f32, another D, few
/// queries, a buffer off a 16-byte boundary, or a GPU with less than `smem_max` bytes of shared
/// memory a block (the 99 KiB of sm_86/sm_89 do not hold the D = 128 tiles).
/// On Hopper (`hopper`: the compute_90a module is loaded) the wgmma kernel of that D comes first.
fn flash_fwd_for(
    bf16: bool,
    s: &AttnShape,
    ptrs: &[sys::CUdeviceptr],
    smem_max: usize,
    hopper: bool,
) -> Option<&'static FlashFwd> {
    let fits = |c: &FlashFwd| c.smem() <= smem_max && s.tq.div_ceil(c.rows) <= MAX_GRID_Y;
    let c = FLASH_FWD.iter().find(|c| c.d == s.d && (hopper || !c.hopper) && fits(c))?;
    (bf16 && s.tq > DECODE_MAX_TQ && aligned16(ptrs)).then_some(c)
}

/// The flash backward for this call, or None where the SIMT kernels run (as for the forward,
/// at any number of queries).
fn flash_bwd_for(
    bf16: bool,
    s: &AttnShape,
    ptrs: &[sys::CUdeviceptr],
    smem_max: usize,
    hopper: bool,
) -> Option<&'static FlashBwd> {
    let fits = |c: &FlashBwd| c.smem() <= smem_max && s.tk.div_ceil(c.keys()) <= MAX_GRID_Y;
    let c = FLASH_BWD.iter().find(|c| c.d == s.d && (hopper || !c.hopper) && fits(c))?;
    (bf16 && aligned16(ptrs)).then_some(c)
}

/// Shared memory a block may opt into on this GPU (0 if the driver cannot say).
fn smem_max(gpu: &Gpu) -> usize {
    let a = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
    gpu.context().attribute(a).map_or(0, |n| usize::try_from(n).unwrap_or(0))
}

/// scale · log2(e): the flash kernels take exponentials in base 2.
fn scale_log2(scale: f32) -> f32 {
    (f64::from(scale) * std::f64::consts::LOG2_E) as f32
}

/// The checked dimensions of one call, as the kernels take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    b: i32,
    tq: i32,
    tk: i32,
    h: i32,
    hkv: i32,
    d: i32,
    /// Query rows of one (batch, KV head): Tq · H / Hkv.
    rows: usize,
    q_len: usize,
    kv_len: usize,
    lse_len: usize,
}

/// Validates `shape` for the kernels of `kernel` (a well-formed call, D even and ≤ 256, sizes
/// that fit the kernels' 32-bit indices and the grid limits) without touching a GPU.
fn dims(kernel: &'static str, s: &AttnShape) -> Result<Dims> {
    s.validate().map_err(|e| KernelError::shape(kernel, e.to_string()))?;
    if s.d > MAX_D || !s.d.is_multiple_of(2) {
        return Err(KernelError::shape(kernel, format!("head dimension D = {} must be even and at most {MAX_D}", s.d)));
    }
    let small = |what: &str, n: usize| -> Result<i32> {
        // Half the i32 range leaves the kernels room for tile arithmetic past the end.
        if n <= i32::MAX as usize / 2 {
            Ok(n as i32)
        } else {
            Err(KernelError::shape(kernel, format!("{what} = {n} is too large for the attention kernels")))
        }
    };
    let rows = s.tq * s.group();
    small("Tq·H/Hkv", rows)?;
    small("B·Tq·H", s.b * s.tq * s.h)?;
    if s.hkv > 65_535 || s.b > 65_535 {
        return Err(KernelError::shape(kernel, format!("B = {} and Hkv = {} must be at most 65535", s.b, s.hkv)));
    }
    let err = |e: gristmill_core::Error| KernelError::shape(kernel, e.to_string());
    Ok(Dims {
        b: small("B", s.b)?,
        tq: small("Tq", s.tq)?,
        tk: small("Tk", s.tk)?,
        h: small("H", s.h)?,
        hkv: small("Hkv", s.hkv)?,
        d: small("D", s.d)?,
        rows,
        q_len: s.q_len().map_err(err)?,
        kv_len: s.kv_len().map_err(err)?,
        lse_len: s.lse_len().map_err(err)?,
    })
}

/// Row stride (floats) of a shared tile read one row per lane: odd in float2 units, so the loads
/// of a half-warp fall on distinct banks. Mirrors `padded` in the .cu.
fn padded(d: usize) -> usize {
    if (d / 2) % 2 == 1 { d } else { d + 2 }
}

/// Dynamic shared memory of attention_fwd: q rows, a padded K tile, a V tile.
fn smem_fwd(d: usize) -> usize {
    (BLOCK_ROWS * d + TILE * padded(d) + TILE * d) * 4
}

/// Dynamic shared memory of attention_dq_bwd and attention_dkv_bwd: two unpadded tiles of
/// BLOCK_ROWS rows and two padded tiles of TILE rows.
fn smem_bwd(d: usize) -> usize {
    (2 * BLOCK_ROWS * d + 2 * TILE * padded(d)) * 4
}

/// How many key ranges the forward splits each block's work into: 1 when `blocks` already give
/// every one of `sms` multiprocessors four blocks (about what fits at once), else enough to do
/// so, keeping at least two tiles of `key_tiles` per split.
fn fwd_splits(blocks: usize, key_tiles: usize, sms: usize) -> usize {
    let target = 4 * sms.max(1);
    if blocks >= target {
        return 1;
    }
    target.div_ceil(blocks.max(1)).min(key_tiles / 2).clamp(1, MAX_SPLITS)
}

/// Shape error unless a T buffer starts on a two-element boundary (the kernels move pairs).
fn check_aligned<T>(kernel: &'static str, what: &str, p: sys::CUdeviceptr) -> Result<()> {
    let align = 2 * std::mem::size_of::<T>() as u64;
    if p.is_multiple_of(align) {
        Ok(())
    } else {
        Err(KernelError::shape(kernel, format!("{what} must start at an even element (a {align}-byte boundary)")))
    }
}

/// The device address of `segments` after checking its length, or null without segments.
fn segments_ptr(gpu: &Gpu, kernel: &'static str, seg: Option<&CudaSlice<u32>>, s: &AttnShape) -> Result<u64> {
    match seg {
        Some(seg) => {
            check_len(kernel, "segments", seg.len(), s.b * s.tk)?;
            Ok(ptr(gpu, seg))
        }
        None => Ok(0),
    }
}

/// Lets `f` use `smem` bytes of dynamic shared memory, or says why this GPU cannot give them.
fn allow_smem(gpu: &Gpu, f: &CudaFunction, kernel: &'static str, smem: usize) -> Result<()> {
    if smem <= DEFAULT_SMEM {
        return Ok(());
    }
    let most =
        gpu.context().attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    if smem > most.max(0) as usize {
        return Err(KernelError::shape(
            kernel,
            format!("needs {smem} bytes of shared memory a block; this GPU has {most}"),
        ));
    }
    f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)?;
    Ok(())
}

/// The flash forward `c` on checked pointers [q, k, v, o, lse, segments or 0].
fn launch_flash_fwd(gpu: &Gpu, c: &FlashFwd, p: [u64; 6], s: &AttnShape, dm: &Dims, scale: f32) -> Result<()> {
    const K: &str = "attention_fwd";
    let f = gpu.function(MODULE, c.kernel)?;
    allow_smem(gpu, &f, K, c.smem())?;
    let cfg = LaunchConfig {
        grid_dim: ((s.b * s.h) as u32, s.tq.div_ceil(c.rows) as u32, 1),
        block_dim: (c.threads(), 1, 1),
        shared_mem_bytes: c.smem() as u32,
    };
    let sl2 = scale_log2(scale);
    let [pq, pk, pv, po, pl, pseg] = p;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pq).arg(&pk).arg(&pv).arg(&po).arg(&pl).arg(&pseg);
    b.arg(&dm.tq).arg(&dm.tk).arg(&dm.h).arg(&dm.hkv).arg(&sl2);
    // SAFETY: the caller checked every length against the shape: the kernel reads q (B·Tq·H·D),
    // k and v (B·Tk·Hkv·D) and segments (B·Tk, or none when null) and writes o and lse, each of
    // the checked size, in 16-byte chunks at 16-byte-aligned addresses (D is c.d). Grid
    // (B·H, ⌈Tq / rows⌉), block and shared memory are those of its header; the grid fits
    // (B·H ≤ B·Tq·H, checked by dims; ⌈Tq / rows⌉ ≤ 65535 by flash_fwd_for).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// The flash dK/dV kernel `c` and the dq conversion on checked pointers
/// [q, k, v, lse, delta, d_o, segments or 0, dq, dk, dv], delta already computed.
fn launch_flash_bwd(gpu: &Gpu, c: &FlashBwd, p: [u64; 10], s: &AttnShape, dm: &Dims, scale: f32) -> Result<()> {
    const K: &str = "attention_bwd";
    let [pq, pk, pv, pl, pdelta, pdo, pseg, pdq, pdk, pdv] = p;
    // dq is summed over key blocks in f32 by atomics, in dq_index order (see the .cu).
    let nt16 = c.row_tiles16(s.tq);
    let mut acc = gpu.zeros::<f32>(s.b * s.h * nt16 * 16 * s.d)?;
    let pacc = ptr_mut(gpu, &mut acc);
    let f = gpu.function(MODULE, c.kernel)?;
    allow_smem(gpu, &f, K, c.smem())?;
    let cfg = LaunchConfig {
        grid_dim: ((s.b * s.hkv) as u32, s.tk.div_ceil(c.keys()) as u32, 1),
        block_dim: (c.threads(), 1, 1),
        shared_mem_bytes: c.smem() as u32,
    };
    let sl2 = scale_log2(scale);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pq).arg(&pk).arg(&pv).arg(&pl).arg(&pdelta).arg(&pdo).arg(&pseg).arg(&pacc).arg(&pdk).arg(&pdv);
    b.arg(&dm.tq).arg(&dm.tk).arg(&dm.h).arg(&dm.hkv).arg(&scale).arg(&sl2);
    // SAFETY: the caller checked every length against the shape: the kernel reads q, d_o
    // (B·Tq·H·D), k, v (B·Tk·Hkv·D) in 16-byte chunks at 16-byte-aligned addresses, lse and delta
    // (B·H·Tq), segments (B·Tk or null); it writes dk and dv (B·Tk·Hkv·D) and adds to acc,
    // allocated above with B·H·nt16·16·D floats for the nt16 row tiles of 16 a head it indexes.
    // Grid (B·Hkv, ⌈Tk / keys⌉ ≤ 65535 by flash_bwd_for), block and shared memory as in its header.
    unsafe { b.launch(cfg) }?;

    let f = gpu.function(MODULE, "attention_dq_convert_bwd_bf16")?;
    let nt = to_i32(K, "Tq rounded up to whole query tiles", nt16)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pacc).arg(&pdq).arg(&dm.b).arg(&dm.tq).arg(&dm.h).arg(&dm.d).arg(&nt).arg(&scale);
    // SAFETY: grid-stride over the B·H·nt16·(D/8)·64 column pairs of acc (half its length);
    // writes the pairs of rows below Tq into dq (B·Tq·H·D, checked, pair-aligned).
    unsafe { b.launch(grid_1d(s.b * s.h * nt16 * s.d / 8 * 64, 256)) }?;
    // acc is freed in stream order, after the conversion has read it.
    Ok(())
}

/// Causal grouped-query attention forward: `o = softmax(scale · q kᵀ, causal/segment mask) v`.
///
/// q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D); o: (B, Tq, H, D); lse: (B, H, Tq) f32, natural-log
/// softmax denominators of the scaled scores; segments: (B, Tk) when given (packed sequences).
/// D ≤ 256 and even; H a multiple of Hkv; Tq ≤ Tk; every buffer starting at an even element;
/// otherwise a Shape error. With few blocks (decoding against a long cache) the keys are split over
/// several blocks whose partial results a second kernel merges.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd<T: Float>(
    gpu: &Gpu,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    o: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    shape: &AttnShape,
    scale: f32,
    segments: Option<&CudaSlice<u32>>,
) -> Result<()> {
    const K: &str = "attention_fwd";
    let dm = dims(K, shape)?;
    check_len(K, "q", q.len(), dm.q_len)?;
    check_len(K, "k", k.len(), dm.kv_len)?;
    check_len(K, "v", v.len(), dm.kv_len)?;
    check_len(K, "o", o.len(), dm.q_len)?;
    check_len(K, "lse", lse.len(), dm.lse_len)?;
    let pseg = segments_ptr(gpu, K, segments, shape)?;
    let (pq, pk, pv, po, pl) = (ptr(gpu, q), ptr(gpu, k), ptr(gpu, v), ptr_mut(gpu, o), ptr_mut(gpu, lse));
    for (what, p) in [("q", pq), ("k", pk), ("v", pv), ("o", po)] {
        check_aligned::<T>(K, what, p)?;
    }
    if let Some(c) = flash_fwd_for(T::IS_BF16, shape, &[pq, pk, pv, po], smem_max(gpu), gpu.is_hopper()) {
        return launch_flash_fwd(gpu, c, [pq, pk, pv, po, pl, pseg], shape, &dm, scale);
    }

    let row_tiles = dm.rows.div_ceil(BLOCK_ROWS);
    let key_tiles = shape.tk.div_ceil(TILE);
    let sms = usize::try_from(gpu.info().multiprocessors).unwrap_or(1);
    // The split index shares grid z with the batch (at most 65535).
    let want = fwd_splits(row_tiles * shape.hkv * shape.b, key_tiles, sms).min(65_535 / shape.b).max(1);
    let tiles_per_split = key_tiles.div_ceil(want);
    let nsplit = key_tiles.div_ceil(tiles_per_split);

    let f = gpu.function(MODULE, T::pick("attention_fwd_f32", "attention_fwd_bf16"))?;
    let smem = smem_fwd(shape.d);
    allow_smem(gpu, &f, K, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (row_tiles as u32, shape.hkv as u32, (shape.b * nsplit) as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (ns, tps) = (nsplit as i32, tiles_per_split as i32);
    if nsplit == 1 {
        let null: u64 = 0;
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(&pq).arg(&pk).arg(&pv).arg(&po).arg(&pl).arg(&pseg).arg(&null).arg(&null);
        b.arg(&dm.tq).arg(&dm.tk).arg(&dm.h).arg(&dm.hkv).arg(&dm.d).arg(&scale).arg(&ns).arg(&tps);
        // SAFETY: every length was checked against the shape above: the kernel reads q (B·Tq·H·D),
        // k and v (B·Tk·Hkv·D) and segments (B·Tk, or none when null) and writes o and lse, each of
        // the checked size, at pair-aligned addresses; the partial buffers are unused when
        // nsplit = 1. The grid and shared memory are those the kernel's header gives.
        unsafe { b.launch(cfg) }?;
        return Ok(());
    }

    // Decode: partial results per key range, merged by attention_combine_fwd.
    let nr = shape.b * shape.tq * shape.h;
    let mut opart = gpu.alloc::<f32>(nsplit * nr * shape.d)?;
    let mut lpart = gpu.alloc::<f32>(nsplit * nr)?;
    let (pop, plp) = (ptr_mut(gpu, &mut opart), ptr_mut(gpu, &mut lpart));
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pq).arg(&pk).arg(&pv).arg(&po).arg(&pl).arg(&pseg).arg(&pop).arg(&plp);
    b.arg(&dm.tq).arg(&dm.tk).arg(&dm.h).arg(&dm.hkv).arg(&dm.d).arg(&scale).arg(&ns).arg(&tps);
    // SAFETY: as above, except that the kernel writes opart (nsplit·B·Tq·H·D floats) and lpart
    // (nsplit·B·Tq·H), both allocated at exactly those sizes, instead of o and lse.
    unsafe { b.launch(cfg) }?;

    let fc = gpu.function(MODULE, T::pick("attention_combine_fwd_f32", "attention_combine_fwd_bf16"))?;
    let mut b = gpu.stream().launch_builder(&fc);
    b.arg(&pop).arg(&plp).arg(&po).arg(&pl).arg(&dm.b).arg(&dm.tq).arg(&dm.h).arg(&dm.d).arg(&ns);
    // SAFETY: one warp per row of the B·Tq·H rows (8 warps a block, surplus warps return); it reads
    // the nsplit partials the forward wrote and writes o and lse, whose sizes were checked.
    unsafe { b.launch(grid_1d(nr * 32, 256)) }?;
    // opart and lpart are freed in stream order, after the merge has read them.
    Ok(())
}

/// Causal grouped-query attention backward.
///
/// q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D); o: (B, Tq, H, D) and lse: (B, H, Tq) from
/// [`attention_fwd`] with the same `scale` and `segments`; d_o: (B, Tq, H, D).
/// dq: (B, Tq, H, D); dk, dv: (B, Tk, Hkv, D), overwritten, each KV head receiving the sum over the
/// query heads of its group. Uses delta_i = rowsum(dO ∘ O) and recomputes P from lse. The SIMT
/// kernels use no atomics; the flash kernels (bf16, D = 64 or 128) form dk and dv in one block's
/// registers (deterministic) and sum dq over blocks of 128 keys with f32 atomics, so dq of a query
/// that sees more than two such blocks may differ in its last bits from run to run. Shape rules as
/// for [`attention_fwd`].
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Float>(
    gpu: &Gpu,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    o: &impl DevicePtr<T>,
    lse: &impl DevicePtr<f32>,
    d_o: &impl DevicePtr<T>,
    dq: &mut impl DevicePtrMut<T>,
    dk: &mut impl DevicePtrMut<T>,
    dv: &mut impl DevicePtrMut<T>,
    shape: &AttnShape,
    scale: f32,
    segments: Option<&CudaSlice<u32>>,
) -> Result<()> {
    const K: &str = "attention_bwd";
    let dm = dims(K, shape)?;
    for (what, n) in [("q", q.len()), ("o", o.len()), ("d_o", d_o.len()), ("dq", dq.len())] {
        check_len(K, what, n, dm.q_len)?;
    }
    for (what, n) in [("k", k.len()), ("v", v.len()), ("dk", dk.len()), ("dv", dv.len())] {
        check_len(K, what, n, dm.kv_len)?;
    }
    check_len(K, "lse", lse.len(), dm.lse_len)?;
    let pseg = segments_ptr(gpu, K, segments, shape)?;
    let (pq, pk, pv, po, pl, pdo) = (ptr(gpu, q), ptr(gpu, k), ptr(gpu, v), ptr(gpu, o), ptr(gpu, lse), ptr(gpu, d_o));
    let (pdq, pdk, pdv) = (ptr_mut(gpu, dq), ptr_mut(gpu, dk), ptr_mut(gpu, dv));
    for (what, p) in [("q", pq), ("k", pk), ("v", pv), ("o", po), ("d_o", pdo), ("dq", pdq), ("dk", pdk), ("dv", pdv)] {
        check_aligned::<T>(K, what, p)?;
    }
    let flash = flash_bwd_for(T::IS_BF16, shape, &[pq, pk, pv, pdo, pdq, pdk, pdv], smem_max(gpu), gpu.is_hopper());

    let mut delta = gpu.alloc::<f32>(dm.lse_len)?;
    let pdelta = ptr_mut(gpu, &mut delta);
    let f = gpu.function(MODULE, T::pick("attention_delta_bwd_f32", "attention_delta_bwd_bf16"))?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&po).arg(&pdo).arg(&pdelta).arg(&dm.b).arg(&dm.tq).arg(&dm.h).arg(&dm.d);
    // SAFETY: one warp per row of the B·Tq·H rows (surplus warps return); reads D elements of o and
    // d_o per row and writes one float of delta per row, B·H·Tq in all, as allocated.
    unsafe { b.launch(grid_1d(dm.lse_len * 32, 256)) }?;

    if let Some(c) = flash {
        return launch_flash_bwd(gpu, c, [pq, pk, pv, pl, pdelta, pdo, pseg, pdq, pdk, pdv], shape, &dm, scale);
    }

    let smem = smem_bwd(shape.d);
    let f = gpu.function(MODULE, T::pick("attention_dq_bwd_f32", "attention_dq_bwd_bf16"))?;
    allow_smem(gpu, &f, K, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (dm.rows.div_ceil(BLOCK_ROWS) as u32, shape.hkv as u32, shape.b as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pq).arg(&pk).arg(&pv).arg(&pl).arg(&pdelta).arg(&pdo).arg(&pseg).arg(&pdq);
    b.arg(&dm.tq).arg(&dm.tk).arg(&dm.h).arg(&dm.hkv).arg(&dm.d).arg(&scale);
    // SAFETY: all lengths were checked against the shape: the kernel reads q, d_o (B·Tq·H·D),
    // k, v (B·Tk·Hkv·D), lse and delta (B·H·Tq), segments (B·Tk or null) and writes dq
    // (B·Tq·H·D), at pair-aligned addresses, with the grid and shared memory of its header.
    unsafe { b.launch(cfg) }?;

    let f = gpu.function(MODULE, T::pick("attention_dkv_bwd_f32", "attention_dkv_bwd_bf16"))?;
    allow_smem(gpu, &f, K, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (shape.tk.div_ceil(BLOCK_ROWS) as u32, shape.hkv as u32, shape.b as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pq).arg(&pk).arg(&pv).arg(&pl).arg(&pdelta).arg(&pdo).arg(&pseg).arg(&pdk).arg(&pdv);
    b.arg(&dm.tq).arg(&dm.tk).arg(&dm.h).arg(&dm.hkv).arg(&dm.d).arg(&scale);
    // SAFETY: as for dq, writing dk and dv (B·Tk·Hkv·D each, checked) instead of dq.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Self-test tolerances (max error over max |reference|), one per pass and dtype; the parity
/// tests measure about 1e-6 for f32.
const TOL_FWD_F32: f64 = 2e-5;
const TOL_BWD_F32: f64 = 2e-5;
/// bf16: o and the gradients are rounded to bf16 on the way out (up to 2⁻⁸ of a value), and the
/// flash kernels round P and dS to bf16 for their tensor-core products.
const TOL_FWD_BF16: f64 = 1e-2;
const TOL_BWD_BF16: f64 = 1.5e-2;

/// Inputs of one self-test case, already rounded through T.
struct Case {
    shape: AttnShape,
    scale: f32,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
    segments: Option<Vec<u32>>,
}

impl Case {
    fn new<T: Float>(shape: AttnShape, segments: Option<Vec<u32>>, seed: u64) -> Self {
        let round = |x: Vec<f32>| x.into_iter().map(|y| T::from_f32(y).to_f32()).collect::<Vec<f32>>();
        let (nq, nkv) = (shape.b * shape.tq * shape.h * shape.d, shape.b * shape.tk * shape.hkv * shape.d);
        Self {
            shape,
            scale: 1.0 / (shape.d as f32).sqrt(),
            q: round(check::test_data(nq, seed, 2.0)),
            k: round(check::test_data(nkv, seed + 1, 2.0)),
            v: round(check::test_data(nkv, seed + 2, 1.0)),
            d_o: round(check::test_data(nq, seed + 3, 1.0)),
            segments,
        }
    }
}

fn upload_as<T: Float>(gpu: &Gpu, x: &[f32]) -> Result<CudaSlice<T>> {
    gpu.upload(&x.iter().map(|&y| T::from_f32(y)).collect::<Vec<T>>())
}

fn download_f32<T: Float>(gpu: &Gpu, x: &CudaSlice<T>) -> Result<Vec<f32>> {
    Ok(gpu.download(x)?.into_iter().map(T::to_f32).collect())
}

/// Runs forward and backward of `c` on the GPU and the f32 reference; returns the forward error
/// (o and lse), the dq error and the dk/dv error.
fn run_case<T: Float>(gpu: &Gpu, c: &Case) -> Result<(f64, f64, f64)> {
    let s = &c.shape;
    let (q, k, v, d_o) = (
        upload_as::<T>(gpu, &c.q)?,
        upload_as::<T>(gpu, &c.k)?,
        upload_as::<T>(gpu, &c.v)?,
        upload_as::<T>(gpu, &c.d_o)?,
    );
    let seg = c.segments.as_deref().map(|sg| gpu.upload(sg)).transpose()?;
    let mut o = gpu.zeros::<T>(c.q.len())?;
    let mut lse = gpu.zeros::<f32>(s.b * s.h * s.tq)?;
    attention_fwd(gpu, &q, &k, &v, &mut o, &mut lse, s, c.scale, seg.as_ref())?;
    let (mut dq, mut dk, mut dv) = (gpu.zeros::<T>(c.q.len())?, gpu.zeros::<T>(c.k.len())?, gpu.zeros::<T>(c.k.len())?);
    attention_bwd(gpu, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv, s, c.scale, seg.as_ref())?;
    let (o_gpu, lse_gpu) = (download_f32(gpu, &o)?, gpu.download(&lse)?);

    let reference = |e: gristmill_core::Error| KernelError::shape("attention self-test", e.to_string());
    let segs = c.segments.as_deref();
    let (o_ref, lse_ref) = attention_fwd_ref(&c.q, &c.k, &c.v, s, c.scale, segs).map_err(reference)?;
    // The backward reference starts from the GPU's forward outputs, as the kernels do.
    let (dq_ref, dk_ref, dv_ref) =
        attention_bwd_ref(&c.q, &c.k, &c.v, &o_gpu, &lse_gpu, &c.d_o, s, c.scale, segs).map_err(reference)?;
    let fwd = check::rel_err(&o_gpu, &o_ref).max(check::rel_err(&lse_gpu, &lse_ref));
    let e_dq = check::rel_err(&download_f32(gpu, &dq)?, &dq_ref);
    let e_dkv =
        check::rel_err(&download_f32(gpu, &dk)?, &dk_ref).max(check::rel_err(&download_f32(gpu, &dv)?, &dv_ref));
    Ok((fwd, e_dq, e_dkv))
}

fn describe(s: &AttnShape) -> String {
    format!("B={} Tq={} Tk={} H={} Hkv={} D={}", s.b, s.tq, s.tk, s.h, s.hkv, s.d)
}

fn check(kernel: &'static str, shape: &AttnShape, rel_err: f64, tol: f64) -> Check {
    Check { kernel, shape: describe(shape), rel_err, tol }
}

/// Segment ids of `t`-long rows: row 0 three examples, row 1 two and padding, row 2 ids that are
/// not contiguous (the mask only compares them).
fn packed_segments(b: usize, t: usize) -> Vec<u32> {
    (0..b * t)
        .map(|x| {
            let (row, j) = (x / t, x % t);
            match row % 3 {
                0 => (3 * j / t) as u32,
                1 => u32::from(j >= t / 2) + 4 + 5 * u32::from(j >= t - t / 8),
                _ => (j % 3) as u32,
            }
        })
        .collect()
}

fn self_test_dtype<T: Float>(gpu: &Gpu, tol_fwd: f64, tol_bwd: f64) -> Result<Vec<Check>> {
    // Packed: ragged T, GQA 3, D = 80 (the SIMT kernels at every dtype).
    let train = AttnShape { b: 3, tq: 37, tk: 37, h: 6, hkv: 2, d: 80 };
    let (fwd, dq, dkv) = run_case::<T>(gpu, &Case::new::<T>(train, Some(packed_segments(3, 37)), 1))?;
    // Decoding 3 tokens against 300 cached ones: one block of rows, so the keys are split.
    let decode = AttnShape { b: 1, tq: 3, tk: 300, h: 4, hkv: 1, d: 80 };
    let (split, _, _) = run_case::<T>(gpu, &Case::new::<T>(decode, None, 5))?;
    let mut out = vec![
        check(T::pick("attention_fwd_f32", "attention_fwd_bf16"), &train, fwd, tol_fwd),
        check(T::pick("attention_combine_fwd_f32", "attention_combine_fwd_bf16"), &decode, split, tol_fwd),
        check(T::pick("attention_dq_bwd_f32", "attention_dq_bwd_bf16"), &train, dq, tol_bwd),
        check(T::pick("attention_dkv_bwd_f32", "attention_dkv_bwd_bf16"), &train, dkv, tol_bwd),
    ];
    if T::IS_BF16 {
        // The flash kernels: packed rows at D = 64, ragged GQA 4 at D = 128.
        let d64 = AttnShape { b: 3, tq: 130, tk: 130, h: 6, hkv: 2, d: 64 };
        let (fwd, dq, dkv) = run_case::<T>(gpu, &Case::new::<T>(d64, Some(packed_segments(3, 130)), 7))?;
        out.push(check("attention_flash64_fwd_bf16", &d64, fwd, tol_fwd));
        out.push(check("attention_flash64_dkv_bwd_bf16", &d64, dkv, tol_bwd));
        out.push(check("attention_dq_convert_bwd_bf16", &d64, dq, tol_bwd));
        let d128 = AttnShape { b: 1, tq: 150, tk: 150, h: 8, hkv: 2, d: 128 };
        let (fwd, dq, dkv) = run_case::<T>(gpu, &Case::new::<T>(d128, None, 9))?;
        out.push(check("attention_flash128_fwd_bf16", &d128, fwd, tol_fwd));
        out.push(check("attention_flash128_dkv_bwd_bf16", &d128, dkv.max(dq), tol_bwd));
    }
    Ok(out)
}

/// Every kernel of this module against its CPU reference on small, awkward shapes.
pub fn self_test(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut out = self_test_dtype::<f32>(gpu, TOL_FWD_F32, TOL_BWD_F32)?;
    out.extend(self_test_dtype::<bf16>(gpu, TOL_FWD_BF16, TOL_BWD_BF16)?);
    Ok(out)
}

/// Training shapes of the benchmark: a Llama-8B-like layer (H = 32, Hkv = 8, D = 128) at
/// B·T = 2·2048 and 1·8192, and SmolLM2-135M's (H = 9, Hkv = 3, D = 64) at 8·2048.
pub const BENCH_TRAIN: [AttnShape; 3] = [
    AttnShape { b: 2, tq: 2048, tk: 2048, h: 32, hkv: 8, d: 128 },
    AttnShape { b: 1, tq: 8192, tk: 8192, h: 32, hkv: 8, d: 128 },
    AttnShape { b: 8, tq: 2048, tk: 2048, h: 9, hkv: 3, d: 64 },
];

/// Decode shapes of the benchmark: one new token against a cache.
pub const BENCH_DECODE: [AttnShape; 2] = [
    AttnShape { b: 1, tq: 1, tk: 4096, h: 32, hkv: 8, d: 128 },
    AttnShape { b: 8, tq: 1, tk: 2048, h: 9, hkv: 3, d: 64 },
];

/// Causal FLOPs of one forward: half of the 2·2·B·H·Tq·Tk·D of its two products.
pub fn causal_fwd_flops(s: &AttnShape) -> f64 {
    4.0 * (s.b * s.h) as f64 * s.tq as f64 * s.tk as f64 * s.d as f64 / 2.0
}

/// Every kernel of this module at realistic sizes, bf16: forward and forward + backward of
/// [`BENCH_TRAIN`] (TFLOP/s, the backward counted as 2.5 forwards), and decoding
/// ([`BENCH_DECODE`], GB/s).
pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for (i, s) in BENCH_TRAIN.iter().chain(&BENCH_DECODE).enumerate() {
        let seed = 10 * i as u64;
        let scale = 1.0 / (s.d as f32).sqrt();
        let (nq, nkv, nl) = (s.b * s.tq * s.h * s.d, s.b * s.tk * s.hkv * s.d, s.b * s.h * s.tq);
        let q = upload_as::<bf16>(gpu, &check::test_data(nq, seed, 1.0))?;
        let k = upload_as::<bf16>(gpu, &check::test_data(nkv, seed + 1, 1.0))?;
        let v = upload_as::<bf16>(gpu, &check::test_data(nkv, seed + 2, 1.0))?;
        let mut o = gpu.zeros::<bf16>(nq)?;
        let mut lse = gpu.zeros::<f32>(nl)?;
        let t_fwd =
            check::time_median(gpu, 5, 20, || attention_fwd(gpu, &q, &k, &v, &mut o, &mut lse, s, scale, None))?;
        if s.tq <= DECODE_MAX_TQ {
            // Decoding is memory-bound: q, k, v read, o and lse written.
            let bytes = (2 * (nq + 2 * nkv + nq) + 4 * nl) as f64;
            rows.push(BenchRow {
                kernel: "attention_fwd_bf16",
                shape: describe(s),
                seconds: t_fwd,
                work: Work::Bytes(bytes),
            });
            continue;
        }
        let flops = causal_fwd_flops(s);
        rows.push(BenchRow {
            kernel: "attention_fwd_bf16",
            shape: describe(s),
            seconds: t_fwd,
            work: Work::Flops(flops),
        });

        let d_o = upload_as::<bf16>(gpu, &check::test_data(nq, seed + 3, 1.0))?;
        let (mut dq, mut dk, mut dv) = (gpu.zeros::<bf16>(nq)?, gpu.zeros::<bf16>(nkv)?, gpu.zeros::<bf16>(nkv)?);
        let t_all = check::time_median(gpu, 3, 10, || {
            attention_fwd(gpu, &q, &k, &v, &mut o, &mut lse, s, scale, None)?;
            attention_bwd(gpu, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv, s, scale, None)
        })?;
        // The backward's five products are 2.5 times the forward's two.
        rows.push(BenchRow {
            kernel: "attention_fwd+bwd_bf16",
            shape: describe(s),
            seconds: t_all,
            work: Work::Flops(3.5 * flops),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(b: usize, tq: usize, tk: usize, h: usize, hkv: usize, d: usize) -> AttnShape {
        AttnShape { b, tq, tk, h, hkv, d }
    }

    #[test]
    fn shapes_the_kernels_cannot_take_are_refused() {
        assert!(dims("t", &shape(1, 4, 4, 2, 1, 300)).is_err(), "D > 256");
        assert!(dims("t", &shape(1, 4, 4, 2, 1, 258)).is_err(), "D > 256");
        assert!(dims("t", &shape(1, 4, 4, 2, 1, 63)).is_err(), "odd D");
        assert!(dims("t", &shape(1, 4, 4, 6, 4, 64)).is_err(), "H not a multiple of Hkv");
        assert!(dims("t", &shape(1, 5, 4, 2, 1, 64)).is_err(), "Tq > Tk");
        assert!(dims("t", &shape(0, 4, 4, 2, 1, 64)).is_err(), "B = 0");
        assert!(dims("t", &shape(70_000, 1, 1, 1, 1, 2)).is_err(), "B beyond the grid");
        assert!(dims("t", &shape(1, 1 << 30, 1 << 30, 4, 1, 2)).is_err(), "rows beyond 32 bits");
        let ok = dims("t", &shape(3, 37, 40, 9, 3, 256)).unwrap();
        assert_eq!((ok.rows, ok.q_len, ok.kv_len, ok.lse_len), (111, 3 * 37 * 9 * 256, 3 * 40 * 3 * 256, 3 * 9 * 37));
        assert!(dims("t", &shape(1, 1, 1, 1, 1, 2)).is_ok());
    }

    #[test]
    fn padded_strides_are_odd_in_pairs() {
        for d in (2..=MAX_D).step_by(2) {
            let p = padded(d);
            assert!(p == d || p == d + 2);
            assert_eq!((p / 2) % 2, 1, "D = {d}");
        }
        assert_eq!(padded(128), 130);
        assert_eq!(padded(70), 70);
    }

    #[test]
    fn shared_memory_fits_every_gpu_from_ampere_on() {
        // sm_86/sm_89 allow 99 KiB a block after opting in; D = 256 f32 tiles must fit.
        assert!(smem_fwd(MAX_D) <= 99 * 1024);
        assert!(smem_bwd(MAX_D) <= 99 * 1024);
        // The common head dimensions need no opt-in for the forward.
        assert!(smem_fwd(128) <= DEFAULT_SMEM);
        assert!(smem_fwd(64) <= DEFAULT_SMEM);
    }

    #[test]
    fn splits_only_when_blocks_are_few() {
        // Training: plenty of blocks.
        assert_eq!(fwd_splits(1024, 64, 132), 1);
        // Decode at B = 1, Hkv = 8 against 4096 keys (128 tiles): fill 4 × 66 SMs.
        assert_eq!(fwd_splits(8, 128, 66), 33);
        // At least two tiles a split, at most MAX_SPLITS.
        assert_eq!(fwd_splits(1, 10, 132), 5);
        assert_eq!(fwd_splits(1, 1000, 132), MAX_SPLITS);
        assert_eq!(fwd_splits(1, 1, 132), 1);
        assert_eq!(fwd_splits(0, 3, 0), 1);
        assert_eq!(fwd_splits(527, 100, 132), 2);
    }
    #[test]
    fn flash_tables_match_the_cuda_instantiations() {
        // FLASH_FWD(name, D, warps, row tiles a warp, keys a tile, keys a step) and
        // FLASH_DKV(name, D, warps, query rows a tile) in the .cu.
        let cu = include_str!("../cuda/attention.cu");
        let args = |line: &str| -> Vec<String> {
            let inner = &line[line.find('(').unwrap() + 1..line.rfind(')').unwrap()];
            inner.split(',').map(|x| x.trim().to_string()).collect()
        };
        let num = |x: &str| x.parse::<usize>().unwrap();
        for c in FLASH_FWD.iter().filter(|c| !c.hopper) {
            let line = cu.lines().find(|l| l.starts_with(&format!("FLASH_FWD({},", c.kernel))).unwrap();
            let a = args(line);
            assert_eq!(
                (num(&a[1]), num(&a[2]), 16 * num(&a[2]) * num(&a[3]), num(&a[4])),
                (c.d, c.warps, c.rows, c.keys)
            );
        }
        // HOPPER_FWD(name, D, keys a tile): two warpgroups, 128 rows.
        for c in FLASH_FWD.iter().filter(|c| c.hopper) {
            let line = cu.lines().find(|l| l.starts_with(&format!("HOPPER_FWD({},", c.kernel))).unwrap();
            let a = args(line);
            assert_eq!((num(&a[1]), 8, 128, num(&a[2])), (c.d, c.warps, c.rows, c.keys));
        }
        for c in FLASH_BWD.iter().filter(|c| !c.hopper) {
            let line = cu.lines().find(|l| l.starts_with(&format!("FLASH_DKV({},", c.kernel))).unwrap();
            let a = args(line);
            assert_eq!((num(&a[1]), num(&a[2]), num(&a[3])), (c.d, c.warps, c.rows));
        }
        // HOPPER_DKV(name, D): two warpgroups of 64 keys, 64 queries a tile.
        for c in FLASH_BWD.iter().filter(|c| c.hopper) {
            let line = cu.lines().find(|l| l.starts_with(&format!("HOPPER_DKV({},", c.kernel))).unwrap();
            assert_eq!((num(&args(line)[1]), 8, 64), (c.d, c.warps, c.rows));
        }
    }

    #[test]
    fn flash_shared_memory() {
        // Q tile 128 × (128 + 8) bf16, two stages of K and V 64 × 136, segment ids 2 × 64.
        assert_eq!(FLASH_FWD[2].smem(), (128 * 136 + 4 * 64 * 136) * 2 + 2 * 64 * 4);
        // Hopper: Q tile as above, two stages of K and V 128 × 128 (+ 1024 to align), ids 2 × 128.
        assert_eq!(FLASH_FWD[0].smem(), 128 * 136 * 2 + 4 * 128 * 128 * 2 + 1024 + 2 * 128 * 4);
        // K, V 128 × 136; two stages of Q and dO 64 × 136 plus 3 × 64 floats; dSᵀ 128 × 72.
        assert_eq!(FLASH_BWD[3].smem(), 2 * 128 * 136 * 2 + 2 * (2 * 64 * 136 * 2 + 3 * 64 * 4) + 128 * 72 * 2);
        // Hopper: K, V 128 × 128; stages of Q, dO 64 × 128 and 768 bytes rounded to 33 KiB; dSᵀ
        // 128 × 64; 1024 to align.
        assert_eq!(FLASH_BWD[1].smem(), 2 * 128 * 128 * 2 + 2 * 33 * 1024 + 128 * 64 * 2 + 1024);
        // Everything fits an A100 or H100 (163 / 227 KiB a block); D = 64 also fits sm_86/sm_89.
        for c in FLASH_FWD {
            assert!(c.smem() <= if c.hopper { 227 } else { 163 } * 1024, "{}", c.kernel);
        }
        for c in FLASH_BWD {
            assert!(c.smem() <= if c.hopper { 227 } else { 163 } * 1024, "{}", c.kernel);
        }
        assert!(FLASH_FWD[1].smem() <= 99 * 1024 && FLASH_BWD[2].smem() <= 99 * 1024);
        assert_eq!(FLASH_BWD[1].row_tiles16(1), 4);
        assert_eq!(FLASH_BWD[1].row_tiles16(129), 12);
    }

    #[test]
    fn flash_path_only_where_it_applies() {
        let (big, ok) = (227 * 1024, [0x1000u64, 0x2000]);
        let train = shape(2, 300, 300, 8, 2, 128);
        assert_eq!(flash_fwd_for(true, &train, &ok, big, false).map(|c| c.d), Some(128));
        assert_eq!(flash_bwd_for(true, &train, &ok, big, false).map(|c| c.d), Some(128));
        assert!(flash_fwd_for(false, &train, &ok, big, false).is_none(), "f32");
        assert!(flash_bwd_for(false, &train, &ok, big, false).is_none(), "f32");
        assert!(flash_fwd_for(true, &shape(2, 300, 300, 8, 2, 80), &ok, big, false).is_none(), "D = 80");
        assert!(flash_fwd_for(true, &train, &[0x1000, 0x2004], big, false).is_none(), "off 16 bytes");
        assert!(flash_bwd_for(true, &train, &[0x1004], big, false).is_none(), "off 16 bytes");
        assert!(flash_fwd_for(true, &train, &ok, 99 * 1024, false).is_none(), "99 KiB");
        assert_eq!(flash_fwd_for(true, &shape(2, 300, 300, 8, 2, 64), &ok, 99 * 1024, false).map(|c| c.d), Some(64));
        // Decoding keeps the split-key kernel; its backward is flash.
        let decode = shape(1, DECODE_MAX_TQ, 4096, 32, 8, 128);
        assert!(flash_fwd_for(true, &decode, &ok, big, false).is_none());
        assert!(flash_bwd_for(true, &decode, &ok, big, false).is_some());
        assert!(flash_fwd_for(true, &shape(1, DECODE_MAX_TQ + 1, 4096, 32, 8, 128), &ok, big, false).is_some());
        // Hopper: the wgmma kernel, or the mma.sync one where it does not fit.
        assert_eq!(flash_fwd_for(true, &train, &ok, big, true).map(|c| c.kernel), Some("attention_hflash128_fwd_bf16"));
        assert_eq!(
            flash_fwd_for(true, &train, &ok, 120 * 1024, true).map(|c| c.kernel),
            Some("attention_flash128_fwd_bf16")
        );
        assert_eq!(
            flash_bwd_for(true, &train, &ok, big, true).map(|c| c.kernel),
            Some("attention_hflash128_dkv_bwd_bf16")
        );
        assert!((scale_log2(0.125) - 0.125 * std::f32::consts::LOG2_E).abs() < 1e-7);
    }
}
