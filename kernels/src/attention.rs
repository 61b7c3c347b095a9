//! Launchers of kernels/cuda/attention.cu: causal grouped-query attention, forward and backward,
//! without storing the attention matrix (the stand-in until flash attention replaces it).
//!
//! Semantics are those of [`gristmill_core::ops::attention`]: q and o are `(B, Tq, H, D)`, k and v
//! `(B, Tk, Hkv, D)`, lse `(B, H, Tq)` f32; query `i` sits at position `Tk − Tq + i`, query head `h`
//! reads KV head `h / (H / Hkv)`, and with segment ids a query sees only keys of its own segment.

use crate::Gpu;
use crate::check::{self, BenchRow, Check, Work};
use crate::error::{KernelError, Result, check_len};
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
/// query heads of its group. Uses delta_i = rowsum(dO ∘ O) and recomputes P from lse; no atomics,
/// so the result is deterministic. Shape rules as for [`attention_fwd`].
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
    let smem = smem_bwd(shape.d);

    let mut delta = gpu.alloc::<f32>(dm.lse_len)?;
    let pdelta = ptr_mut(gpu, &mut delta);
    let f = gpu.function(MODULE, T::pick("attention_delta_bwd_f32", "attention_delta_bwd_bf16"))?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&po).arg(&pdo).arg(&pdelta).arg(&dm.b).arg(&dm.tq).arg(&dm.h).arg(&dm.d);
    // SAFETY: one warp per row of the B·Tq·H rows (surplus warps return); reads D elements of o and
    // d_o per row and writes one float of delta per row, B·H·Tq in all, as allocated.
    unsafe { b.launch(grid_1d(dm.lse_len * 32, 256)) }?;

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
/// bf16: o and the gradients are rounded to bf16 on the way out (up to 2⁻⁸ of a value).
const TOL_FWD_BF16: f64 = 1e-2;
const TOL_BWD_BF16: f64 = 1e-2;

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

fn self_test_dtype<T: Float>(gpu: &Gpu, tol_fwd: f64, tol_bwd: f64) -> Result<Vec<Check>> {
    // Packed: three examples in row 0, two and padding in row 1; ragged T, GQA 3, D = 80.
    let train = AttnShape { b: 2, tq: 37, tk: 37, h: 6, hkv: 2, d: 80 };
    let mut seg = vec![0u32; 74];
    for (j, s) in seg.iter_mut().enumerate() {
        *s = match j {
            0..=9 => 0,
            10..=29 => 1,
            30..=36 => 2,
            37..=52 => 3,
            53..=69 => 4,
            _ => 9,
        };
    }
    let (fwd, dq, dkv) = run_case::<T>(gpu, &Case::new::<T>(train, Some(seg), 1))?;
    // Decoding 3 tokens against 300 cached ones: one block of rows, so the keys are split.
    let decode = AttnShape { b: 1, tq: 3, tk: 300, h: 4, hkv: 1, d: 64 };
    let (split, _, _) = run_case::<T>(gpu, &Case::new::<T>(decode, None, 5))?;
    let check = |kernel, shape: &AttnShape, rel_err, tol| Check {
        kernel,
        shape: format!("B={} Tq={} Tk={} H={} Hkv={} D={}", shape.b, shape.tq, shape.tk, shape.h, shape.hkv, shape.d),
        rel_err,
        tol,
    };
    Ok(vec![
        check(T::pick("attention_fwd_f32", "attention_fwd_bf16"), &train, fwd, tol_fwd),
        check(T::pick("attention_combine_fwd_f32", "attention_combine_fwd_bf16"), &decode, split, tol_fwd),
        check(T::pick("attention_dq_bwd_f32", "attention_dq_bwd_bf16"), &train, dq, tol_bwd),
        check(T::pick("attention_dkv_bwd_f32", "attention_dkv_bwd_bf16"), &train, dkv, tol_bwd),
    ])
}

/// Every kernel of this module against its CPU reference on small, awkward shapes.
pub fn self_test(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut out = self_test_dtype::<f32>(gpu, TOL_FWD_F32, TOL_BWD_F32)?;
    out.extend(self_test_dtype::<bf16>(gpu, TOL_FWD_BF16, TOL_BWD_BF16)?);
    Ok(out)
}

/// Every kernel of this module at realistic sizes: a Llama-8B-like layer (H = 32, Hkv = 8,
/// D = 128) at T = 2048, forward and forward + backward, and one decode step against a 4096-token
/// cache; bf16.
pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let train = AttnShape { b: 1, tq: 2048, tk: 2048, h: 32, hkv: 8, d: 128 };
    let decode = AttnShape { tq: 1, tk: 4096, ..train };
    let describe = |s: &AttnShape| format!("B={} Tq={} Tk={} H={} Hkv={} D={}", s.b, s.tq, s.tk, s.h, s.hkv, s.d);
    let scale = 1.0 / (train.d as f32).sqrt();

    for (s, seed) in [(train, 10u64), (decode, 20)] {
        let (nq, nkv, nl) = (s.b * s.tq * s.h * s.d, s.b * s.tk * s.hkv * s.d, s.b * s.h * s.tq);
        let q = upload_as::<bf16>(gpu, &check::test_data(nq, seed, 1.0))?;
        let k = upload_as::<bf16>(gpu, &check::test_data(nkv, seed + 1, 1.0))?;
        let v = upload_as::<bf16>(gpu, &check::test_data(nkv, seed + 2, 1.0))?;
        let mut o = gpu.zeros::<bf16>(nq)?;
        let mut lse = gpu.zeros::<f32>(nl)?;
        let t_fwd =
            check::time_median(gpu, 5, 20, || attention_fwd(gpu, &q, &k, &v, &mut o, &mut lse, &s, scale, None))?;
        if s.tq == 1 {
            // Decoding is memory-bound: q, k, v read, o and lse written.
            let bytes = (2 * (nq + 2 * nkv + nq) + 4 * nl) as f64;
            rows.push(BenchRow {
                kernel: "attention_fwd_bf16",
                shape: describe(&s),
                seconds: t_fwd,
                work: Work::Bytes(bytes),
            });
            continue;
        }
        // Causal: half of the 2·2·B·H·T²·D FLOPs of the two products.
        let flops = 4.0 * (s.b * s.h) as f64 * (s.tq as f64) * (s.tk as f64) * s.d as f64 / 2.0;
        rows.push(BenchRow {
            kernel: "attention_fwd_bf16",
            shape: describe(&s),
            seconds: t_fwd,
            work: Work::Flops(flops),
        });

        let d_o = upload_as::<bf16>(gpu, &check::test_data(nq, seed + 3, 1.0))?;
        let (mut dq, mut dk, mut dv) = (gpu.zeros::<bf16>(nq)?, gpu.zeros::<bf16>(nkv)?, gpu.zeros::<bf16>(nkv)?);
        let t_all = check::time_median(gpu, 5, 20, || {
            attention_fwd(gpu, &q, &k, &v, &mut o, &mut lse, &s, scale, None)?;
            attention_bwd(gpu, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv, &s, scale, None)
        })?;
        // The backward's five products are 2.5 times the forward's two.
        rows.push(BenchRow {
            kernel: "attention_fwd+bwd_bf16",
            shape: describe(&s),
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
}
