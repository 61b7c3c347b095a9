//! Launchers of kernels/cuda/grit.cu: the GRIT optimizer's rank-space kernels (docs/grit.md).
//!
//! Per adapted module (a slot, S of them) GRIT keeps two r × r f32 factors Σa, Σg. The kernels:
//! - [`kfac_gram`]: Σa += Σ_t w_t u_t u_tᵀ and Σg += Σ_t w_t v_t v_tᵀ for one module (§1);
//! - [`kfac_damped_inverse`]: all modules' damped inverses on the damping ladder (§2);
//! - [`eigh_jacobi`] and [`rank_projector`]: eigendecompositions, ranks and P = V_k V_kᵀ (§5);
//! - [`rank_apply`] / [`rank_apply_in_place`]: one launch of rank-space products over every slot
//!   of the flat LoRA buffers (preconditioning, regularizer gradients, reprojection; §3–§5),
//!   described by a [`SlotTable`] uploaded once;
//! - [`rank_quadratic`]: the regularizer values per slot, for the loss log (§4).
//!
//! The CPU references are `gristmill_core::linalg`; every result is deterministic (no float
//! atomics, reduction orders fixed by the shapes alone).

use crate::check::{self, BenchRow, Check, Work};
use crate::error::{KernelError, Result, check_len, to_i32};
use crate::launch::{Float, ptr, ptr_mut};
use crate::{Gpu, bf16};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, sys};
use gristmill_core::linalg;

/// Tolerances of the parity checks (`check::rel_err`, relative to the largest reference entry).
pub mod tol {
    /// Gram sums against f64: f32 fused multiply-adds over tiles of 64 rows, then ≤ 128 tile sums
    /// added in f32; ~200 roundings of 6e-8 at worst, far less in practice.
    pub const GRAM: f64 = 2e-5;
    /// Damped inverses against the f32 reference: the same algorithm, but the kernel's fused
    /// multiply-adds round differently and the error grows with κ(Σ + λI)·r·ε (κ ≤ ~25 in the
    /// tests, r ≤ 64: 1e-4 at worst, loosened to 5e-4 for headroom).
    pub const INVERSE: f64 = 5e-4;
    /// Eigenvalues against the f32 reference, relative to ‖A‖: both stop at 1e-6·‖A‖_F.
    pub const EIGENVALUES: f64 = 1e-5;
    /// Eigenvectors up to sign (or projectors onto a well-separated top-k), spectra with relative
    /// gaps ≥ 1/(2r): error ≈ ε·‖A‖ / gap.
    pub const EIGENVECTORS: f64 = 2e-3;
    /// P = V_k V_kᵀ from the same V: k sums of products, fused on the GPU.
    pub const PROJECTOR: f64 = 1e-6;
    /// Rank-space products against f64: r fused multiply-adds per output.
    pub const APPLY: f64 = 1e-5;
    /// Regularizer values against f64, relative to the sum of the terms' magnitudes (a quadratic
    /// form of an indefinite test Σ may cancel): per-thread f32 sums, a block tree, then f64.
    pub const QUADRATIC: f64 = 1e-5;
}

/// The largest LoRA rank the kernels take.
pub const MAX_RANK: usize = 64;
/// Rows of one gram tile (kfac_gram's shared-memory stage).
const GRAM_TILE: usize = 64;
/// The most blocks of kfac_gram's first pass.
const GRAM_MAX_BLOCKS: usize = 128;
/// Columns of A or rows of B one rank_apply block takes.
const APPLY_THREADS: usize = 128;

fn check_rank(kernel: &'static str, r: usize) -> Result<()> {
    if (1..=MAX_RANK).contains(&r) {
        Ok(())
    } else {
        Err(KernelError::shape(kernel, format!("rank r = {r} is outside 1..={MAX_RANK}")))
    }
}

fn product(kernel: &'static str, what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| KernelError::shape(kernel, format!("{what} {dims:?} overflows")))
}

/// Blocks of kfac_gram's first pass for M rows: a function of M alone, so that the sums are the
/// same on every GPU and every run.
pub fn gram_blocks(m: usize) -> usize {
    m.div_ceil(GRAM_TILE).clamp(1, GRAM_MAX_BLOCKS)
}

/// Threads of a kfac_gram block: one per output entry (2r²), at most 1024 (then ≤ 8 entries each).
fn gram_threads(r: usize) -> u32 {
    (2 * r * r).next_multiple_of(32).min(1024) as u32
}

/// su += Σ_t w_t u_t u_tᵀ and sv += Σ_t w_t v_t v_tᵀ (K-FAC statistics of one module, grit.md §1).
///
/// u, v: (M, r) T row-major; w: (M) f32 row weights (1 for tokens that count, 0 for padding and
/// masked prompt tokens); su, sv: (r, r) f32, accumulated — they may be views into one stats
/// buffer. The caller counts the rows. Both outputs stay exactly symmetric; the result is the
/// same bit for bit on every run (a split of M that depends on M alone, then a fixed-order sum).
#[allow(clippy::too_many_arguments)]
pub fn kfac_gram<T: Float>(
    gpu: &Gpu,
    u: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    w: &impl DevicePtr<f32>,
    m: usize,
    r: usize,
    su: &mut impl DevicePtrMut<f32>,
    sv: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    // Bounds the scratch size; every other check is kfac_gram_with_scratch's.
    check_rank("kfac_gram", r)?;
    let mut scratch = gpu.alloc::<f32>(kfac_gram_scratch_len(m, r))?;
    kfac_gram_with_scratch(gpu, u, v, w, m, r, su, sv, &mut scratch)
}

/// f32 elements of the scratch [`kfac_gram_with_scratch`] needs for M rows at rank r.
pub fn kfac_gram_scratch_len(m: usize, r: usize) -> usize {
    gram_blocks(m) * 2 * r * r
}

/// [`kfac_gram`] with a caller-held scratch of at least [`kfac_gram_scratch_len`] f32 (it saves an
/// allocation and a free per call: one call per module per micro-batch). One scratch may serve
/// every call on the stream, one after another.
#[allow(clippy::too_many_arguments)]
pub fn kfac_gram_with_scratch<T: Float>(
    gpu: &Gpu,
    u: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    w: &impl DevicePtr<f32>,
    m: usize,
    r: usize,
    su: &mut impl DevicePtrMut<f32>,
    sv: &mut impl DevicePtrMut<f32>,
    scratch: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    const K: &str = "kfac_gram";
    check_rank(K, r)?;
    let mr = product(K, "u", &[m, r])?;
    check_len(K, "u", u.len(), mr)?;
    check_len(K, "v", v.len(), mr)?;
    check_len(K, "w", w.len(), m)?;
    check_len(K, "su", su.len(), r * r)?;
    check_len(K, "sv", sv.len(), r * r)?;
    to_i32(K, "M·r", mr)?;
    if m == 0 {
        return Ok(());
    }
    crate::error::check_min(K, "scratch", scratch.len(), kfac_gram_scratch_len(m, r))?;
    let (mi, ri) = (to_i32(K, "M", m)?, to_i32(K, "r", r)?);
    let blocks = gram_blocks(m);
    let total = 2 * r * r;
    let bi = to_i32(K, "blocks", blocks)?;
    let first = gpu.function("grit", T::pick("kfac_gram_f32", "kfac_gram_bf16"))?;
    let finish = gpu.function("grit", "kfac_gram_finish_f32")?;
    let (pu, pv, pw, pp) = (ptr(gpu, u), ptr(gpu, v), ptr(gpu, w), ptr_mut(gpu, scratch));
    let mut b = gpu.stream().launch_builder(&first);
    b.arg(&pu).arg(&pv).arg(&pw).arg(&mi).arg(&ri).arg(&pp);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (gram_threads(r), 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the kernel reads M·r elements of u and v and M of w (all checked), and block c
    // writes partial[c·2r² .. (c+1)·2r²), c < blocks; the scratch holds at least blocks·2r² (checked). The thread count
    // times 8 covers 2r² for r ≤ 64.
    unsafe { b.launch(cfg) }?;
    let (psu, psv) = (ptr_mut(gpu, su), ptr_mut(gpu, sv));
    let mut b = gpu.stream().launch_builder(&finish);
    b.arg(&pp).arg(&bi).arg(&ri).arg(&psu).arg(&psv);
    let cfg =
        LaunchConfig { grid_dim: (total.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: one thread per entry e < 2r² reads partial[c·2r² + e] for c < blocks (written by the
    // launch before, same stream) and updates su or sv (r² each, checked).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// The damped inverses of every module's factors on the damping ladder (grit.md §2), exactly
/// `gristmill_core::linalg::kfac_damped_inverses` per slot.
///
/// sa, sg: (S, r, r) f32 factors (symmetrized by the kernel); samples: (S) f32 sample counts;
/// inv_a, inv_g: (S, r, r) f32; lambda_used: (S) f32. Per slot:
/// - samples < min_samples (or NaN): skipped — inverses untouched, lambda_used = 0;
/// - else lambda_used = the λ that worked for both factors (λ floored at 1e-6, times the first
///   ladder multiplier for which both Cholesky factorizations and inverses succeed);
/// - when no rung works (an eigenvalue below −300·λ, non-finite statistics): lambda_used = −1
///   and both inverses are I / (300·max(λ, 1e-6)), a plain rescale.
#[allow(clippy::too_many_arguments)]
pub fn kfac_damped_inverse(
    gpu: &Gpu,
    sa: &impl DevicePtr<f32>,
    sg: &impl DevicePtr<f32>,
    samples: &impl DevicePtr<f32>,
    min_samples: f32,
    s: usize,
    r: usize,
    lambda: f32,
    inv_a: &mut impl DevicePtrMut<f32>,
    inv_g: &mut impl DevicePtrMut<f32>,
    lambda_used: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    const K: &str = "kfac_damped_inverse";
    check_rank(K, r)?;
    if !lambda.is_finite() {
        return Err(KernelError::shape(K, format!("lambda must be finite, got {lambda}")));
    }
    if min_samples.is_nan() {
        return Err(KernelError::shape(K, "min_samples is NaN"));
    }
    let srr = product(K, "sa", &[s, r, r])?;
    check_len(K, "sa", sa.len(), srr)?;
    check_len(K, "sg", sg.len(), srr)?;
    check_len(K, "samples", samples.len(), s)?;
    check_len(K, "inv_a", inv_a.len(), srr)?;
    check_len(K, "inv_g", inv_g.len(), srr)?;
    check_len(K, "lambda_used", lambda_used.len(), s)?;
    to_i32(K, "S·r·r", srr)?;
    if s == 0 {
        return Ok(());
    }
    let ri = to_i32(K, "r", r)?;
    let f = gpu.function("grit", "kfac_damped_inverse_f32")?;
    let (pa, pg, pn) = (ptr(gpu, sa), ptr(gpu, sg), ptr(gpu, samples));
    let (pia, pig, pl) = (ptr_mut(gpu, inv_a), ptr_mut(gpu, inv_g), ptr_mut(gpu, lambda_used));
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pa).arg(&pg).arg(&pn).arg(&min_samples).arg(&ri).arg(&lambda).arg(&pia).arg(&pig).arg(&pl);
    let cfg = LaunchConfig { grid_dim: (s as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: block s reads and writes the r·r entries of slot s of sa, sg, inv_a, inv_g and entry
    // s of samples and lambda_used; all hold S slots (checked), r ≤ 64 fits the shared arrays.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Batched symmetric eigendecomposition by cyclic Jacobi, `gristmill_core::linalg::eigh_jacobi` in
/// f32 per matrix (same sweep order, rotations, stopping rule and stable descending sort).
///
/// a: (S, r, r) f32 (symmetrized by the kernel); values: (S, r) descending; vectors: (S, r, r)
/// row-major, column j the unit eigenvector of values[j] (signs as the rotations leave them);
/// info: (S) i32 — sweeps done, −1 when `max_sweeps` were not enough (the result so far is
/// written), −2 for a non-finite input or one whose squared norm overflows (NaN written).
/// `tol` as the reference's ([`linalg::JACOBI_TOL_F32`] with [`linalg::JACOBI_MAX_SWEEPS`]).
#[allow(clippy::too_many_arguments)]
pub fn eigh_jacobi(
    gpu: &Gpu,
    a: &impl DevicePtr<f32>,
    s: usize,
    r: usize,
    tol: f32,
    max_sweeps: usize,
    values: &mut impl DevicePtrMut<f32>,
    vectors: &mut impl DevicePtrMut<f32>,
    info: &mut impl DevicePtrMut<i32>,
) -> Result<()> {
    const K: &str = "eigh_jacobi";
    check_rank(K, r)?;
    if !(tol >= 0.0 && tol.is_finite()) {
        return Err(KernelError::shape(K, format!("tol must be finite and >= 0, got {tol}")));
    }
    let srr = product(K, "a", &[s, r, r])?;
    check_len(K, "a", a.len(), srr)?;
    check_len(K, "values", values.len(), s * r)?;
    check_len(K, "vectors", vectors.len(), srr)?;
    check_len(K, "info", info.len(), s)?;
    to_i32(K, "S·r·r", srr)?;
    if s == 0 {
        return Ok(());
    }
    let (ri, mi) = (to_i32(K, "r", r)?, to_i32(K, "max_sweeps", max_sweeps)?);
    let f = gpu.function("grit", "eigh_jacobi_f32")?;
    let (pa, pw, pv, pi) = (ptr(gpu, a), ptr_mut(gpu, values), ptr_mut(gpu, vectors), ptr_mut(gpu, info));
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pa).arg(&ri).arg(&tol).arg(&mi).arg(&pw).arg(&pv).arg(&pi);
    let cfg = LaunchConfig { grid_dim: (s as u32, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: block s reads a[s] (r·r), writes values[s] (r), vectors[s] (r·r) and info[s]; all
    // hold S of them (checked); r ≤ 64 fits the shared arrays.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// How [`rank_projector`] picks each slot's k.
#[derive(Debug)]
pub enum RankRule<'a> {
    /// The same k for every slot (`reprojection_k`), clamped to [1, r].
    Fixed(usize),
    /// `linalg::rank_for_energy(values, threshold, min_rank, r)` per slot (rank adaptation);
    /// threshold finite and > 0.
    Energy { threshold: f32, min_rank: usize },
    /// k per slot from a device array (S) i32, clamped to [1, r]: e.g. Σa's k for Pg.
    Given(CudaView<'a, i32>),
}

/// Per slot: k by `rule`, then P = V_k V_kᵀ (`linalg::top_k_projector`), exactly symmetric.
///
/// values: (S, r) descending and vectors: (S, r, r) as [`eigh_jacobi`] writes them; proj:
/// (S, r, r) f32; k: (S) i32, the k used.
#[allow(clippy::too_many_arguments)]
pub fn rank_projector(
    gpu: &Gpu,
    values: &impl DevicePtr<f32>,
    vectors: &impl DevicePtr<f32>,
    s: usize,
    r: usize,
    rule: &RankRule<'_>,
    proj: &mut impl DevicePtrMut<f32>,
    k: &mut impl DevicePtrMut<i32>,
) -> Result<()> {
    const K: &str = "rank_projector";
    check_rank(K, r)?;
    let srr = product(K, "vectors", &[s, r, r])?;
    check_len(K, "values", values.len(), s * r)?;
    check_len(K, "vectors", vectors.len(), srr)?;
    check_len(K, "proj", proj.len(), srr)?;
    check_len(K, "k", k.len(), s)?;
    to_i32(K, "S·r·r", srr)?;
    let (mode, k_fixed, given, threshold, min_rank) = match rule {
        RankRule::Fixed(kf) => (0i32, (*kf).min(r) as i32, 0 as sys::CUdeviceptr, 0f32, 0i32),
        RankRule::Energy { threshold, min_rank } => {
            if !(*threshold > 0.0 && threshold.is_finite()) {
                return Err(KernelError::shape(K, format!("energy threshold must be finite and > 0, got {threshold}")));
            }
            (1, 0, 0, *threshold, (*min_rank).min(r) as i32)
        }
        RankRule::Given(view) => {
            check_len(K, "given k", view.len(), s)?;
            (2, 0, ptr(gpu, view), 0.0, 0)
        }
    };
    if s == 0 {
        return Ok(());
    }
    let ri = to_i32(K, "r", r)?;
    let f = gpu.function("grit", "rank_projector_f32")?;
    let (pw, pv, pp, pk) = (ptr(gpu, values), ptr(gpu, vectors), ptr_mut(gpu, proj), ptr_mut(gpu, k));
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pw).arg(&pv).arg(&ri).arg(&mode).arg(&k_fixed).arg(&given).arg(&threshold).arg(&min_rank);
    b.arg(&pp).arg(&pk);
    let cfg = LaunchConfig { grid_dim: (s as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: block s reads values[s] (r), vectors[s] (r·r) and, in mode 2 only, given[s] (S
    // checked), and writes proj[s] (r·r) and k[s]; every buffer holds S slots (checked).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Where one slot's LoRA factors live in the flat buffers (offsets in f32 elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// A: (r, K) row-major from here.
    pub a_off: usize,
    /// B: (N, r) row-major from here.
    pub b_off: usize,
    /// K: the module's input width (d_in).
    pub k: usize,
    /// N: the module's output width (d_out).
    pub n: usize,
}

/// The slot layout of the flat LoRA buffers, uploaded once: per-slot offsets and widths, and the
/// block → (slot, side, first column/row) table that lets one launch cover every slot.
#[derive(Debug)]
pub struct SlotTable {
    r: usize,
    slots: Vec<Slot>,
    min_len: usize,
    a_tasks: usize,
    b_tasks: usize,
    a_off: CudaSlice<i64>,
    b_off: CudaSlice<i64>,
    k_dim: CudaSlice<i32>,
    n_dim: CudaSlice<i32>,
    /// (a_tasks + b_tasks, 4) i32: A tasks first, then B tasks, each in slot order.
    tasks: CudaSlice<i32>,
    /// (S, 4) i32: first A task, A tasks, first B task, B tasks.
    slot_tasks: CudaSlice<i32>,
}

impl SlotTable {
    /// Checks and uploads a layout: 1 ≤ r ≤ 64, K and N ≥ 1 and within i32, and no two of the 2S
    /// regions (A and B of every slot) overlapping — what makes in-place products safe.
    pub fn new(gpu: &Gpu, r: usize, slots: &[Slot]) -> Result<Self> {
        const K: &str = "SlotTable";
        check_rank(K, r)?;
        let mut regions = Vec::with_capacity(2 * slots.len());
        for (i, s) in slots.iter().enumerate() {
            if s.k == 0 || s.n == 0 {
                return Err(KernelError::shape(K, format!("slot {i}: K = {} and N = {} must be ≥ 1", s.k, s.n)));
            }
            to_i32(K, "K", s.k)?;
            to_i32(K, "N", s.n)?;
            let a_end = product(K, "A", &[r, s.k])?
                .checked_add(s.a_off)
                .ok_or_else(|| KernelError::shape(K, format!("slot {i}: A's end overflows")))?;
            let b_end = product(K, "B", &[s.n, r])?
                .checked_add(s.b_off)
                .ok_or_else(|| KernelError::shape(K, format!("slot {i}: B's end overflows")))?;
            if i64::try_from(a_end.max(b_end)).is_err() {
                return Err(KernelError::shape(K, format!("slot {i}: offsets beyond 64-bit signed")));
            }
            regions.push((s.a_off, a_end, i, 'A'));
            regions.push((s.b_off, b_end, i, 'B'));
        }
        regions.sort_unstable();
        for w in regions.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(KernelError::shape(
                    K,
                    format!("slot {}'s {} overlaps slot {}'s {}", w[0].2, w[0].3, w[1].2, w[1].3),
                ));
            }
        }
        let min_len = regions.iter().map(|x| x.1).max().unwrap_or(0);
        let mut a_list = Vec::new();
        let mut b_list = Vec::new();
        let mut per_slot = Vec::with_capacity(4 * slots.len());
        let mut a_count = 0usize;
        for (i, s) in slots.iter().enumerate() {
            let first = a_count;
            for start in (0..s.k).step_by(APPLY_THREADS) {
                a_list.extend_from_slice(&[i as i32, 0, start as i32, 0]);
                a_count += 1;
            }
            per_slot.extend_from_slice(&[first, a_count - first]);
        }
        let mut b_count = 0usize;
        for (i, s) in slots.iter().enumerate() {
            let first = a_count + b_count;
            for start in (0..s.n).step_by(APPLY_THREADS) {
                b_list.extend_from_slice(&[i as i32, 1, start as i32, 0]);
                b_count += 1;
            }
            per_slot.extend_from_slice(&[first, a_count + b_count - first]);
        }
        // per_slot holds (A first, A count) for every slot, then (B first, B count): interleave.
        let mut slot_tasks = Vec::with_capacity(4 * slots.len());
        for i in 0..slots.len() {
            for v in [
                per_slot[2 * i],
                per_slot[2 * i + 1],
                per_slot[2 * (slots.len() + i)],
                per_slot[2 * (slots.len() + i) + 1],
            ] {
                slot_tasks.push(to_i32(K, "task index", v)?);
            }
        }
        to_i32(K, "tasks", a_count + b_count)?;
        a_list.extend_from_slice(&b_list);
        if a_list.is_empty() {
            a_list.extend_from_slice(&[0, 0, 0, 0]);
        }
        if slot_tasks.is_empty() {
            slot_tasks.extend_from_slice(&[0, 0, 0, 0]);
        }
        let offs = |f: fn(&Slot) -> usize| -> Vec<i64> {
            let v: Vec<i64> = slots.iter().map(|s| f(s) as i64).collect();
            if v.is_empty() { vec![0] } else { v }
        };
        let dims = |f: fn(&Slot) -> usize| -> Vec<i32> {
            let v: Vec<i32> = slots.iter().map(|s| f(s) as i32).collect();
            if v.is_empty() { vec![0] } else { v }
        };
        Ok(Self {
            r,
            slots: slots.to_vec(),
            min_len,
            a_tasks: a_count,
            b_tasks: b_count,
            a_off: gpu.upload(&offs(|s| s.a_off))?,
            b_off: gpu.upload(&offs(|s| s.b_off))?,
            k_dim: gpu.upload(&dims(|s| s.k))?,
            n_dim: gpu.upload(&dims(|s| s.n))?,
            tasks: gpu.upload(&a_list)?,
            slot_tasks: gpu.upload(&slot_tasks)?,
        })
    }

    /// The LoRA rank r of every slot.
    pub fn rank(&self) -> usize {
        self.r
    }

    /// S, the number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Elements a flat buffer must hold: the end of the last region.
    pub fn min_len(&self) -> usize {
        self.min_len
    }

    /// (first task, task count) of a side.
    fn task_range(&self, side: Side) -> (usize, usize) {
        match side {
            Side::A => (0, self.a_tasks),
            Side::B => (self.a_tasks, self.b_tasks),
            Side::Both => (0, self.a_tasks + self.b_tasks),
        }
    }

    /// The rank_apply / rank_quadratic instantiation for this r.
    fn variant(&self, apply: bool) -> &'static str {
        match (self.r, apply) {
            (..=16, true) => "rank_apply_r16_f32",
            (17..=32, true) => "rank_apply_r32_f32",
            (_, true) => "rank_apply_r64_f32",
            (..=16, false) => "rank_quadratic_r16_f32",
            (17..=32, false) => "rank_quadratic_r32_f32",
            (_, false) => "rank_quadratic_r64_f32",
        }
    }
}

/// Which factors of every slot a [`RankOp`] touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Only A (r, K): left products.
    A,
    /// Only B (N, r): right products.
    B,
    Both,
}

/// One rank-space product over every slot:
///   A side: Y_A ← β·Y_A + α·(c1·L1_s + c2·L2_s + c3·I)·X_A
///   B side: Y_B ← β·Y_B + α·X_B·(c1·R1_s + c2·R2_s + c3·I)
/// L1, L2, R1, R2: (S, r, r) f32, None meaning 0. β = 0 never reads Y.
#[derive(Debug)]
pub struct RankOp<'a> {
    pub side: Side,
    pub l1: Option<CudaView<'a, f32>>,
    pub l2: Option<CudaView<'a, f32>>,
    pub r1: Option<CudaView<'a, f32>>,
    pub r2: Option<CudaView<'a, f32>>,
    pub c1: f32,
    pub c2: f32,
    pub c3: f32,
    pub alpha: f32,
    pub beta: f32,
}

impl<'a> RankOp<'a> {
    /// Y_A = La·X_A, Y_B = X_B·Rb: preconditioning (La = (Σa + λI)⁻¹, Rb = (Σg + λI)⁻¹, grit.md
    /// §3, with the "grit" pairing) or reprojection (La = Pa, Rb = Pg, §5).
    pub fn left_right(la: CudaView<'a, f32>, rb: CudaView<'a, f32>) -> Self {
        Self {
            side: Side::Both,
            l1: Some(la),
            l2: None,
            r1: Some(rb),
            r2: None,
            c1: 1.0,
            c2: 0.0,
            c3: 0.0,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// The regularizers' gradients added to the gradient buffer (X = params, Y = grads, §4):
    /// ∇A += 2λk·Σa·A + 2λr·(I − Pa)·A and ∇B += 2λk·B·Σg + 2λr·B·(I − Pg), with λk =
    /// ramp·lambda_kfac and λr = ramp·lambda_reproj.
    pub fn regularizer_grad(
        sa: CudaView<'a, f32>,
        pa: CudaView<'a, f32>,
        sg: CudaView<'a, f32>,
        pg: CudaView<'a, f32>,
        lambda_k: f32,
        lambda_r: f32,
    ) -> Self {
        Self {
            side: Side::Both,
            l1: Some(sa),
            l2: Some(pa),
            r1: Some(sg),
            r2: Some(pg),
            c1: 2.0 * lambda_k,
            c2: -2.0 * lambda_r,
            c3: 2.0 * lambda_r,
            alpha: 1.0,
            beta: 1.0,
        }
    }
}

fn launch_rank_apply(
    gpu: &Gpu,
    table: &SlotTable,
    px: sys::CUdeviceptr,
    py: sys::CUdeviceptr,
    op: &RankOp<'_>,
) -> Result<()> {
    const K: &str = "rank_apply";
    let srr = table.len() * table.r * table.r;
    let mats = [&op.l1, &op.l2, &op.r1, &op.r2];
    let mut pm = [0 as sys::CUdeviceptr; 4];
    for (i, (m, name)) in mats.iter().zip(["l1", "l2", "r1", "r2"]).enumerate() {
        if let Some(v) = m {
            check_len(K, name, v.len(), srr)?;
            pm[i] = ptr(gpu, v);
        }
    }
    let (first, count) = table.task_range(op.side);
    if count == 0 {
        return Ok(());
    }
    let tasks = table.tasks.slice(4 * first..);
    let pt = ptr(gpu, &tasks);
    let (pa, pb, pk, pn) =
        (ptr(gpu, &table.a_off), ptr(gpu, &table.b_off), ptr(gpu, &table.k_dim), ptr(gpu, &table.n_dim));
    let ri = table.r as i32;
    let f = gpu.function("grit", table.variant(true))?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pt).arg(&pa).arg(&pb).arg(&pk).arg(&pn).arg(&ri).arg(&px).arg(&py);
    b.arg(&pm[0]).arg(&pm[1]).arg(&pm[2]).arg(&pm[3]);
    b.arg(&op.c1).arg(&op.c2).arg(&op.c3).arg(&op.alpha).arg(&op.beta);
    let cfg =
        LaunchConfig { grid_dim: (count as u32, 1, 1), block_dim: (APPLY_THREADS as u32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: block b reads task first + b (the table holds first + count tasks) and the r·r
    // entries of its slot of each non-null matrix (S·r·r checked); it reads and writes only the
    // A or B region of its slot, inside min_len (checked by the callers against x and y). Regions
    // of different slots do not overlap (SlotTable::new), and each column of A / row of B belongs
    // to one thread, which reads all of it before writing: x and y may be the same buffer.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Applies `op` with X = `x` and Y = `y` (both flat LoRA-layout buffers of at least
/// `table.min_len()` f32).
pub fn rank_apply(
    gpu: &Gpu,
    table: &SlotTable,
    x: &impl DevicePtr<f32>,
    y: &mut impl DevicePtrMut<f32>,
    op: &RankOp<'_>,
) -> Result<()> {
    const K: &str = "rank_apply";
    crate::error::check_min(K, "x", x.len(), table.min_len())?;
    crate::error::check_min(K, "y", y.len(), table.min_len())?;
    let (px, py) = (ptr(gpu, x), ptr_mut(gpu, y));
    launch_rank_apply(gpu, table, px, py, op)
}

/// Applies `op` with X = Y = `xy`, in place (gradients preconditioned, parameters or moments
/// reprojected).
pub fn rank_apply_in_place(
    gpu: &Gpu,
    table: &SlotTable,
    xy: &mut impl DevicePtrMut<f32>,
    op: &RankOp<'_>,
) -> Result<()> {
    crate::error::check_min("rank_apply", "xy", xy.len(), table.min_len())?;
    let p = ptr_mut(gpu, xy);
    launch_rank_apply(gpu, table, p, p, op)
}

/// The regularizer values of every slot (grit.md §4), deterministic.
///
/// x: the flat parameters; sa, pa, sg, pg: (S, r, r) f32; out: (S, 4) f32 per slot
/// [tr(AᵀΣaA), tr(BΣgBᵀ), ‖(I − Pa)A‖², ‖B(I − Pg)‖²].
#[allow(clippy::too_many_arguments)]
pub fn rank_quadratic(
    gpu: &Gpu,
    table: &SlotTable,
    x: &impl DevicePtr<f32>,
    sa: &impl DevicePtr<f32>,
    pa: &impl DevicePtr<f32>,
    sg: &impl DevicePtr<f32>,
    pg: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    const K: &str = "rank_quadratic";
    let s = table.len();
    let srr = s * table.r * table.r;
    crate::error::check_min(K, "x", x.len(), table.min_len())?;
    for (name, len) in [("sa", sa.len()), ("pa", pa.len()), ("sg", sg.len()), ("pg", pg.len())] {
        check_len(K, name, len, srr)?;
    }
    check_len(K, "out", out.len(), 4 * s)?;
    let count = table.a_tasks + table.b_tasks;
    if s == 0 || count == 0 {
        return Ok(());
    }
    let mut partial = gpu.alloc::<f32>(2 * count)?;
    let (pt, pa_off, pb_off) = (ptr(gpu, &table.tasks), ptr(gpu, &table.a_off), ptr(gpu, &table.b_off));
    let (pk, pn) = (ptr(gpu, &table.k_dim), ptr(gpu, &table.n_dim));
    let (px, psa, ppa, psg, ppg) = (ptr(gpu, x), ptr(gpu, sa), ptr(gpu, pa), ptr(gpu, sg), ptr(gpu, pg));
    let pp = ptr_mut(gpu, &mut partial);
    let ri = table.r as i32;
    let f = gpu.function("grit", table.variant(false))?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pt).arg(&pa_off).arg(&pb_off).arg(&pk).arg(&pn).arg(&ri).arg(&px);
    b.arg(&psa).arg(&ppa).arg(&psg).arg(&ppg).arg(&pp);
    let cfg =
        LaunchConfig { grid_dim: (count as u32, 1, 1), block_dim: (APPLY_THREADS as u32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: block b reads task b (count tasks in the table), its slot's r·r entries of the four
    // matrices (S·r·r checked) and its slot's region of x (inside min_len, checked); it writes
    // partial[2b], partial[2b + 1] (partial holds 2·count).
    unsafe { b.launch(cfg) }?;
    let finish = gpu.function("grit", "rank_quadratic_finish_f32")?;
    let (pst, po) = (ptr(gpu, &table.slot_tasks), ptr_mut(gpu, out));
    let si = to_i32(K, "S", s)?;
    let mut b = gpu.stream().launch_builder(&finish);
    b.arg(&pp).arg(&pst).arg(&si).arg(&po);
    let cfg = LaunchConfig { grid_dim: (s.div_ceil(128) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: thread s < S reads slot_tasks[s] (S rows) and the partials of its tasks (< count,
    // written by the launch before on this stream) and writes out[4s .. 4s + 4] (4·S checked).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Host references and parity checks (used by self_test and kernels/tests/grit.rs).

/// A random orthogonal (r, r) matrix from test data (modified Gram–Schmidt, twice), in f64.
pub fn orthogonal(r: usize, seed: u64) -> Vec<f64> {
    let mut q: Vec<f64> = check::test_data(r * r, seed, 1.0).iter().map(|&x| f64::from(x)).collect();
    for _ in 0..2 {
        for j in 0..r {
            for p in 0..j {
                let d: f64 = (0..r).map(|i| q[i * r + j] * q[i * r + p]).sum();
                for i in 0..r {
                    q[i * r + j] -= d * q[i * r + p];
                }
            }
            let n: f64 = (0..r).map(|i| q[i * r + j] * q[i * r + j]).sum::<f64>().sqrt();
            let n = if n > 0.0 { n } else { 1.0 };
            for i in 0..r {
                q[i * r + j] /= n;
            }
        }
    }
    q
}

/// Q diag(eigs) Qᵀ rounded to f32, Q from [`orthogonal`]: a symmetric matrix with (nearly) the
/// given spectrum.
pub fn with_spectrum(eigs: &[f64], seed: u64) -> Vec<f32> {
    let r = eigs.len();
    let q = orthogonal(r, seed);
    let mut a = vec![0f32; r * r];
    for i in 0..r {
        for j in 0..r {
            let s: f64 = (0..r).map(|k| q[i * r + k] * eigs[k] * q[j * r + k]).sum();
            a[i * r + j] = s as f32;
        }
    }
    a
}

/// Σ_t w_t x_t x_tᵀ in f64: x (M, r), w (M).
pub fn gram_ref(x: &[f32], w: &[f32], r: usize) -> Vec<f64> {
    let mut g = vec![0f64; r * r];
    for (t, &wt) in w.iter().enumerate() {
        let row = &x[t * r..(t + 1) * r];
        for i in 0..r {
            for j in 0..r {
                g[i * r + j] += f64::from(wt) * f64::from(row[i]) * f64::from(row[j]);
            }
        }
    }
    g
}

/// kfac_gram on test data (M, r) of type T with ~1/4 of the rows weighted 0, accumulated onto
/// non-zero outputs; returns (rel_err of su and sv against f64, whether a run onto zeroed
/// outputs gives exactly symmetric matrices and the same bits when repeated).
pub fn gram_parity<T: Float>(gpu: &Gpu, m: usize, r: usize) -> Result<(f64, bool)> {
    let round = |v: Vec<f32>| -> Vec<T> { v.into_iter().map(T::from_f32).collect() };
    let u = round(check::test_data(m * r, 41 + r as u64, 1.0));
    let v = round(check::test_data(m * r, 42 + m as u64, 1e-3));
    let w: Vec<f32> =
        (0..m).map(|t| if gristmill_core::rng::mix64(t as u64).is_multiple_of(4) { 0.0 } else { 1.0 }).collect();
    let su0 = check::test_data(r * r, 43, 0.5);
    let sv0 = check::test_data(r * r, 44, 1e-6);
    let (du, dv, dw) = (gpu.upload(&u)?, gpu.upload(&v)?, gpu.upload(&w)?);
    let rr = r * r;
    // Both entry points: allocating, and with a held scratch larger than needed.
    let mut scratch = gpu.alloc::<f32>(kfac_gram_scratch_len(m, r) + 5)?;
    let mut run = |init: &[f32], held: bool| -> Result<Vec<f32>> {
        let mut stats = gpu.upload(init)?;
        {
            let (mut a, mut g) = stats.split_at_mut(rr);
            if held {
                kfac_gram_with_scratch(gpu, &du, &dv, &dw, m, r, &mut a, &mut g, &mut scratch)?;
            } else {
                kfac_gram(gpu, &du, &dv, &dw, m, r, &mut a, &mut g)?;
            }
        }
        gpu.download(&stats)
    };
    let got = run(&[su0.clone(), sv0.clone()].concat(), false)?;
    let f = |x: &[T]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
    let (gu, gv) = (gram_ref(&f(&u), &w, r), gram_ref(&f(&v), &w, r));
    let want_u: Vec<f32> = gu.iter().zip(&su0).map(|(g, s)| (g + f64::from(*s)) as f32).collect();
    let want_v: Vec<f32> = gv.iter().zip(&sv0).map(|(g, s)| (g + f64::from(*s)) as f32).collect();
    let err = check::rel_err(&got[..rr], &want_u).max(check::rel_err(&got[rr..], &want_v));
    let zeros = vec![0f32; 2 * rr];
    let (z1, z2) = (run(&zeros, false)?, run(&zeros, true)?);
    let same = z1.iter().zip(&z2).all(|(a, b)| a.to_bits() == b.to_bits());
    let sym = (0..2)
        .all(|h| (0..r).all(|i| (0..r).all(|j| z1[h * rr + i * r + j].to_bits() == z1[h * rr + j * r + i].to_bits())));
    Ok((err, same && sym))
}

/// What the kernel writes for one slot, computed with `linalg::kfac_damped_inverses::<f32>`.
/// `previous` is what the inverses held before (kept for skipped slots).
#[allow(clippy::too_many_arguments)]
pub fn damped_inverse_ref(
    sa: &[f32],
    sg: &[f32],
    r: usize,
    lambda: f32,
    samples: f32,
    min_samples: f32,
    previous: (&[f32], &[f32]),
) -> (Vec<f32>, Vec<f32>, f32) {
    // Written as the kernel tests it, so that a NaN count skips too.
    let enough = samples >= min_samples;
    if !enough {
        return (previous.0.to_vec(), previous.1.to_vec(), 0.0);
    }
    match linalg::kfac_damped_inverses(sa, sg, r, lambda) {
        Ok(d) => (d.inv_a, d.inv_g, d.lambda),
        Err(_) => {
            let base = if linalg::MIN_DAMPING as f32 > lambda { linalg::MIN_DAMPING as f32 } else { lambda };
            let last = base * linalg::DAMPING_LADDER[linalg::DAMPING_LADDER.len() - 1] as f32;
            let mut eye = vec![0f32; r * r];
            for i in 0..r {
                eye[i * r + i] = 1.0 / last;
            }
            (eye.clone(), eye, -1.0)
        }
    }
}

/// Factors for the damping tests: slot i of S, (Σa, Σg, samples). Kinds cycle through a
/// well-conditioned PSD pair, pairs that need ×10 and ×30 on the ladder, a zero factor, a factor
/// no rung can fix, a NaN factor and a skipped slot.
pub fn damping_cases(s: usize, r: usize, lambda: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    // Negative eigenvalues scale with λ; at least 1e-3 so that a tiny or zero λ (raised to the
    // 1e-6 floor) meets factors the ladder cannot fix rather than singular ones.
    let lam = f64::from(lambda).max(1e-3);
    let spread = |top: f64, bottom: f64| -> Vec<f64> {
        (0..r).map(|i| if r == 1 { top } else { top * (bottom / top).powf(i as f64 / (r - 1) as f64) }).collect()
    };
    let (mut sa, mut sg, mut n) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..s {
        let seed = 1000 + 17 * i as u64;
        let good_a = with_spectrum(&spread(1.0, 0.05), seed);
        let good_g = with_spectrum(&spread(0.5, 0.02), seed + 1);
        let with_neg = |neg: f64| {
            let mut e = spread(1.0, 0.05);
            e[r - 1] = -neg * lam;
            with_spectrum(&e, seed + 2)
        };
        let (a, g, count) = match i % 7 {
            0 => (good_a, good_g, 100.0),
            // −5λ: rungs 1 and 3 fail, ×10 works.
            1 => (with_neg(5.0), good_g, 100.0),
            // Σg's −15λ needs ×30.
            2 => (good_a, with_neg(15.0), 100.0),
            3 => (vec![0.0; r * r], good_g, 100.0),
            // −1000λ: beyond the ladder.
            4 => (with_neg(1000.0), good_g, 100.0),
            5 => {
                let mut a = good_a;
                a[r * r / 2] = f32::NAN;
                (a, good_g, 100.0)
            }
            _ => (good_a, good_g, 3.0),
        };
        sa.extend(a);
        sg.extend(g);
        n.push(count);
    }
    (sa, sg, n)
}

/// kfac_damped_inverse on [`damping_cases`] against [`damped_inverse_ref`]: infinite when any
/// lambda_used differs, else the largest rel_err of an inverse (per slot, relative to its own
/// largest entry).
pub fn damped_inverse_parity(gpu: &Gpu, s: usize, r: usize, lambda: f32) -> Result<f64> {
    let (sa, sg, n) = damping_cases(s, r, lambda);
    let min_samples = 16.0;
    let prev_a = check::test_data(s * r * r, 51, 1.0);
    let prev_g = check::test_data(s * r * r, 52, 1.0);
    let (dsa, dsg, dn) = (gpu.upload(&sa)?, gpu.upload(&sg)?, gpu.upload(&n)?);
    let (mut ia, mut ig, mut lu) = (gpu.upload(&prev_a)?, gpu.upload(&prev_g)?, gpu.upload(&vec![7f32; s])?);
    kfac_damped_inverse(gpu, &dsa, &dsg, &dn, min_samples, s, r, lambda, &mut ia, &mut ig, &mut lu)?;
    let (ga, gg, gl) = (gpu.download(&ia)?, gpu.download(&ig)?, gpu.download(&lu)?);
    let rr = r * r;
    let mut worst = 0f64;
    for i in 0..s {
        let sl = i * rr..(i + 1) * rr;
        let (wa, wg, wl) = damped_inverse_ref(
            &sa[sl.clone()],
            &sg[sl.clone()],
            r,
            lambda,
            n[i],
            min_samples,
            (&prev_a[sl.clone()], &prev_g[sl.clone()]),
        );
        if gl[i].to_bits() != wl.to_bits() {
            return Ok(f64::INFINITY);
        }
        worst = worst.max(check::rel_err(&ga[sl.clone()], &wa)).max(check::rel_err(&gg[sl], &wg));
    }
    Ok(worst)
}

/// Test matrices for the eigensolver: slot i of S, with spectra whose gaps are at least 1/(2r) of
/// ‖A‖₂ (kind 0: both signs, kind 1: positive, from 1 down to 1/2) and a K-FAC-like PSD factor
/// of rank r/3.
pub fn eigh_cases(s: usize, r: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(s * r * r);
    for i in 0..s {
        let seed = 2000 + 31 * i as u64;
        let m = match i % 3 {
            0 => with_spectrum(
                &(0..r)
                    .map(|k| (if k % 2 == 0 { 1.0 } else { -1.0 }) * (1.0 - k as f64 / (2 * r) as f64))
                    .collect::<Vec<_>>(),
                seed,
            ),
            1 => with_spectrum(&(0..r).map(|k| 1.0 - k as f64 / (2 * r) as f64).collect::<Vec<_>>(), seed),
            _ => {
                let rank = (r / 3).max(1);
                with_spectrum(&(0..r).map(|k| if k < rank { 1.0 + k as f64 } else { 0.0 }).collect::<Vec<_>>(), seed)
            }
        };
        out.extend(m);
    }
    out
}

/// eigh_jacobi on [`eigh_cases`] against `linalg::eigh_jacobi::<f32>`: (eigenvalue error relative
/// to ‖A‖, eigenvector error — per column up to sign for kinds 0 and 1, the top-rank projector
/// for kind 2 —, whether info reported convergence wherever the reference converged).
pub fn eigh_parity(gpu: &Gpu, s: usize, r: usize) -> Result<(f64, f64, bool)> {
    let a = eigh_cases(s, r);
    let da = gpu.upload(&a)?;
    let (mut w, mut v, mut info) = (gpu.zeros::<f32>(s * r)?, gpu.zeros::<f32>(s * r * r)?, gpu.zeros::<i32>(s)?);
    eigh_jacobi(gpu, &da, s, r, linalg::JACOBI_TOL_F32, linalg::JACOBI_MAX_SWEEPS, &mut w, &mut v, &mut info)?;
    let (gw, gv, gi) = (gpu.download(&w)?, gpu.download(&v)?, gpu.download(&info)?);
    let rr = r * r;
    let (mut ew, mut ev, mut ok) = (0f64, 0f64, true);
    for i in 0..s {
        let m = &a[i * rr..(i + 1) * rr];
        let want = match linalg::eigh_jacobi(m, r, linalg::JACOBI_TOL_F32, linalg::JACOBI_MAX_SWEEPS) {
            Ok(e) => e,
            Err(_) => return Ok((f64::INFINITY, f64::INFINITY, false)),
        };
        ok &= gi[i] >= 0;
        let norm = m.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt().max(1e-30);
        let gwi = &gw[i * r..(i + 1) * r];
        for (g, t) in gwi.iter().zip(&want.values) {
            ew = ew.max((f64::from(*g) - f64::from(*t)).abs() / norm);
        }
        let gvi = &gv[i * rr..(i + 1) * rr];
        if i % 3 == 2 {
            let k = (r / 3).max(1);
            let (pg, pw) = (
                linalg::top_k_projector(gvi, r, k).unwrap_or_default(),
                linalg::top_k_projector(&want.vectors, r, k).unwrap_or_default(),
            );
            ev = ev.max(check::rel_err(&pg, &pw));
        } else {
            for j in 0..r {
                let dot: f64 = (0..r).map(|k| f64::from(gvi[k * r + j]) * f64::from(want.vectors[k * r + j])).sum();
                let sign = if dot < 0.0 { -1.0 } else { 1.0 };
                for k in 0..r {
                    ev = ev.max((sign * f64::from(gvi[k * r + j]) - f64::from(want.vectors[k * r + j])).abs());
                }
            }
        }
    }
    Ok((ew, ev, ok))
}

/// rank_projector after eigh_jacobi on [`eigh_cases`] under `rule`, against rank_for_energy /
/// clamping and top_k_projector on the downloaded decomposition: infinite when a k differs, else
/// the projectors' rel_err.
pub fn projector_parity(gpu: &Gpu, s: usize, r: usize, rule: &RankRule<'_>, given: Option<&[i32]>) -> Result<f64> {
    let a = eigh_cases(s, r);
    let da = gpu.upload(&a)?;
    let (mut w, mut v, mut info) = (gpu.zeros::<f32>(s * r)?, gpu.zeros::<f32>(s * r * r)?, gpu.zeros::<i32>(s)?);
    eigh_jacobi(gpu, &da, s, r, linalg::JACOBI_TOL_F32, linalg::JACOBI_MAX_SWEEPS, &mut w, &mut v, &mut info)?;
    let (mut p, mut k) = (gpu.zeros::<f32>(s * r * r)?, gpu.zeros::<i32>(s)?);
    rank_projector(gpu, &w, &v, s, r, rule, &mut p, &mut k)?;
    let (hw, hv, hp, hk) = (gpu.download(&w)?, gpu.download(&v)?, gpu.download(&p)?, gpu.download(&k)?);
    let rr = r * r;
    let mut worst = 0f64;
    for i in 0..s {
        let want_k = match rule {
            RankRule::Fixed(kf) => (*kf).clamp(1, r),
            RankRule::Energy { threshold, min_rank } => {
                linalg::rank_for_energy(&hw[i * r..(i + 1) * r], *threshold, *min_rank, r)
            }
            RankRule::Given(_) => given.and_then(|g| g.get(i)).map_or(1, |&g| (g.max(1) as usize).min(r)),
        };
        if hk[i] as usize != want_k {
            return Ok(f64::INFINITY);
        }
        let want = linalg::top_k_projector(&hv[i * rr..(i + 1) * rr], r, want_k)
            .map_err(|e| KernelError::shape("projector_parity", e.to_string()))?;
        worst = worst.max(check::rel_err(&hp[i * rr..(i + 1) * rr], &want));
    }
    Ok(worst)
}

/// A layout of `slots` slots with ragged K and N (not multiples of 128 or 4), gaps between the
/// regions and odd offsets (the unaligned paths), and its total length.
pub fn ragged_layout(slots: usize, r: usize) -> (Vec<Slot>, usize) {
    let mut off = 3usize;
    let mut out = Vec::with_capacity(slots);
    for i in 0..slots {
        let k = [1usize, 5, 130, 257, 64][i % 5];
        let n = [3usize, 129, 1, 200, 17][(i + 2) % 5];
        let a_off = off;
        off += r * k + (i % 3);
        let b_off = off;
        off += n * r + 1;
        out.push(Slot { a_off, b_off, k, n });
    }
    (out, off)
}

/// Y per the op's definition in f64, over every slot of `layout`. `m(i)` gives slot i's four
/// matrices (None = 0).
#[allow(clippy::too_many_arguments)]
pub fn rank_apply_ref(
    layout: &[Slot],
    r: usize,
    x: &[f32],
    y: &[f32],
    mats: [Option<&[f32]>; 4],
    c: [f32; 3],
    alpha: f32,
    beta: f32,
    side: Side,
) -> Vec<f32> {
    let mut out = y.to_vec();
    let rr = r * r;
    for (s, sl) in layout.iter().enumerate() {
        let mat = |m1: Option<&[f32]>, m2: Option<&[f32]>, i: usize, j: usize| -> f64 {
            let mut v = 0f64;
            if let Some(m) = m1 {
                v += f64::from(c[0]) * f64::from(m[s * rr + i * r + j]);
            }
            if let Some(m) = m2 {
                v += f64::from(c[1]) * f64::from(m[s * rr + i * r + j]);
            }
            if i == j {
                v += f64::from(c[2]);
            }
            f64::from(alpha) * v
        };
        if side != Side::B {
            for j in 0..sl.k {
                for i in 0..r {
                    let acc: f64 =
                        (0..r).map(|l| mat(mats[0], mats[1], i, l) * f64::from(x[sl.a_off + l * sl.k + j])).sum();
                    let o = sl.a_off + i * sl.k + j;
                    let old = if beta == 0.0 { 0.0 } else { f64::from(beta) * f64::from(y[o]) };
                    out[o] = (old + acc) as f32;
                }
            }
        }
        if side != Side::A {
            for n in 0..sl.n {
                for j in 0..r {
                    let acc: f64 =
                        (0..r).map(|l| f64::from(x[sl.b_off + n * r + l]) * mat(mats[2], mats[3], l, j)).sum();
                    let o = sl.b_off + n * r + j;
                    let old = if beta == 0.0 { 0.0 } else { f64::from(beta) * f64::from(y[o]) };
                    out[o] = (old + acc) as f32;
                }
            }
        }
    }
    out
}

/// rank_apply on [`ragged_layout`] against [`rank_apply_ref`]: out of place with β = 1 and all
/// four matrices, then in place with β = 0, L2/R1 absent, for `side`. Returns the worse rel_err
/// (elements outside the slots must be untouched: infinite otherwise).
pub fn rank_apply_parity(gpu: &Gpu, slots: usize, r: usize, side: Side) -> Result<f64> {
    let (layout, len) = ragged_layout(slots, r);
    let table = SlotTable::new(gpu, r, &layout)?;
    let srr = slots * r * r;
    let m: Vec<Vec<f32>> = (0..4).map(|i| check::test_data(srr, 60 + i, 0.5)).collect();
    let dm: Vec<CudaSlice<f32>> = m.iter().map(|v| gpu.upload(v)).collect::<Result<_>>()?;
    let x = check::test_data(len, 70, 1.0);
    let y = check::test_data(len, 71, 1.0);
    let (c, alpha, beta) = ([0.7f32, -0.3, 0.25], 1.5f32, 1.0f32);
    let dx = gpu.upload(&x)?;
    let mut dy = gpu.upload(&y)?;
    let op = RankOp {
        side,
        l1: Some(dm[0].as_view()),
        l2: Some(dm[1].as_view()),
        r1: Some(dm[2].as_view()),
        r2: Some(dm[3].as_view()),
        c1: c[0],
        c2: c[1],
        c3: c[2],
        alpha,
        beta,
    };
    rank_apply(gpu, &table, &dx, &mut dy, &op)?;
    let got = gpu.download(&dy)?;
    let want =
        rank_apply_ref(&layout, r, &x, &y, [Some(&m[0]), Some(&m[1]), Some(&m[2]), Some(&m[3])], c, alpha, beta, side);
    let e1 = check::rel_err(&got, &want);

    // In place, β = 0 over a buffer holding NaN where Y would be read: must not be read.
    let mut dxy = gpu.upload(&x)?;
    let op = RankOp {
        side,
        l1: Some(dm[0].as_view()),
        l2: None,
        r1: None,
        r2: Some(dm[3].as_view()),
        c1: 1.0,
        c2: 2.0,
        c3: 0.5,
        alpha: 1.0,
        beta: 0.0,
    };
    rank_apply_in_place(gpu, &table, &mut dxy, &op)?;
    let got = gpu.download(&dxy)?;
    let want =
        rank_apply_ref(&layout, r, &x, &x, [Some(&m[0]), None, None, Some(&m[3])], [1.0, 2.0, 0.5], 1.0, 0.0, side);
    let e2 = check::rel_err(&got, &want);
    Ok(e1.max(e2))
}

/// rank_quadratic on [`ragged_layout`] against f64 sums.
pub fn rank_quadratic_parity(gpu: &Gpu, slots: usize, r: usize) -> Result<f64> {
    let (layout, len) = ragged_layout(slots, r);
    let table = SlotTable::new(gpu, r, &layout)?;
    let srr = slots * r * r;
    let m: Vec<Vec<f32>> = (0..4).map(|i| check::test_data(srr, 80 + i, 0.5)).collect();
    let dm: Vec<CudaSlice<f32>> = m.iter().map(|v| gpu.upload(v)).collect::<Result<_>>()?;
    let x = check::test_data(len, 90, 1.0);
    let dx = gpu.upload(&x)?;
    let mut out = gpu.zeros::<f32>(4 * slots)?;
    rank_quadratic(gpu, &table, &dx, &dm[0], &dm[1], &dm[2], &dm[3], &mut out)?;
    let got = gpu.download(&out)?;
    let rr = r * r;
    let mut worst = 0f64;
    for (s, sl) in layout.iter().enumerate() {
        let at = |v: &Vec<f32>, i: usize, j: usize| f64::from(v[s * rr + i * r + j]);
        // Per quantity: value and the sum of its terms' magnitudes.
        let mut q = [(0f64, 0f64); 4];
        for j in 0..sl.k {
            let col: Vec<f64> = (0..r).map(|i| f64::from(x[sl.a_off + i * sl.k + j])).collect();
            for i in 0..r {
                let sx: f64 = (0..r).map(|l| at(&m[0], i, l) * col[l]).sum();
                let px: f64 = (0..r).map(|l| at(&m[1], i, l) * col[l]).sum();
                q[0].0 += col[i] * sx;
                q[0].1 += (col[i] * sx).abs();
                q[2].0 += (col[i] - px) * (col[i] - px);
            }
        }
        for n in 0..sl.n {
            let row: Vec<f64> = (0..r).map(|l| f64::from(x[sl.b_off + n * r + l])).collect();
            for j in 0..r {
                let xs: f64 = (0..r).map(|l| row[l] * at(&m[2], l, j)).sum();
                let xp: f64 = (0..r).map(|l| row[l] * at(&m[3], l, j)).sum();
                q[1].0 += row[j] * xs;
                q[1].1 += (row[j] * xs).abs();
                q[3].0 += (row[j] - xp) * (row[j] - xp);
            }
        }
        q[2].1 = q[2].0;
        q[3].1 = q[3].0;
        for (i, (want, scale)) in q.iter().enumerate() {
            let g = f64::from(got[4 * s + i]);
            let e = (g - want).abs() / scale.max(1e-30);
            worst = worst.max(if e.is_nan() { f64::INFINITY } else { e });
        }
    }
    Ok(worst)
}

/// Runs [`sanitize`] with c = 1e6 on n values salted with NaN, ±inf and ±2e6 and returns the
/// largest difference from the host rule (0 when every value matches).
pub fn sanitize_parity(gpu: &Gpu, n: usize) -> Result<f64> {
    let mut x = check::test_data(n, 41, 5.0);
    for (i, v) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 2e6, -2e6].into_iter().enumerate() {
        if let Some(e) = x.get_mut(i * 7) {
            *e = v;
        }
    }
    let want: Vec<f32> = x.iter().map(|&v| if v.is_finite() { v.clamp(-1e6, 1e6) } else { 0.0 }).collect();
    let mut d = gpu.upload(&x)?;
    sanitize(gpu, &mut d, 1e6)?;
    let got = gpu.download(&d)?;
    Ok(got.iter().zip(&want).map(|(g, w)| f64::from((g - w).abs())).fold(0.0, f64::max))
}

/// x ← 0 where x is NaN or ±inf, else clamp(x, −c, c), in place. x: (n) f32.
pub fn sanitize(gpu: &Gpu, x: &mut impl DevicePtrMut<f32>, c: f32) -> Result<()> {
    const K: &str = "grit_sanitize";
    let n = x.len();
    if c.is_nan() || c < 0.0 {
        return Err(KernelError::shape(K, format!("the clamp must be ≥ 0, got {c}")));
    }
    if n == 0 {
        return Ok(());
    }
    let n64 = i64::try_from(n).map_err(|_| KernelError::shape(K, format!("{n} elements")))?;
    let f = gpu.function("grit", "grit_sanitize_f32")?;
    let px = ptr_mut(gpu, x);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&px).arg(&n64).arg(&c);
    let blocks = n.div_ceil(256).min(4096) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the kernel reads and writes x[0, n) grid-stride and nothing else; x holds n elements.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Every kernel of this module against its CPU reference on small, awkward shapes.
pub fn self_test(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    let mut gram = |kernel: &'static str, res: (f64, bool), shape: String| {
        out.push(Check { kernel, shape, rel_err: if res.1 { res.0 } else { f64::INFINITY }, tol: tol::GRAM });
    };
    gram("kfac_gram_f32", gram_parity::<f32>(gpu, 1000, 17)?, "M=1000 r=17".into());
    gram("kfac_gram_bf16", gram_parity::<bf16>(gpu, 4099, 16)?, "M=4099 r=16".into());
    let inv = damped_inverse_parity(gpu, 113, 5, 1e-2)?.max(damped_inverse_parity(gpu, 14, 16, 1e-3)?);
    out.push(Check {
        kernel: "kfac_damped_inverse_f32",
        shape: "S=113 r=5, S=14 r=16, ladder".into(),
        rel_err: inv,
        tol: tol::INVERSE,
    });
    let (ew, ev, ok) = eigh_parity(gpu, 3, 17)?;
    out.push(Check {
        kernel: "eigh_jacobi_f32",
        shape: "S=3 r=17 values".into(),
        rel_err: if ok { ew } else { f64::INFINITY },
        tol: tol::EIGENVALUES,
    });
    out.push(Check {
        kernel: "eigh_jacobi_f32",
        shape: "S=3 r=17 vectors".into(),
        rel_err: ev,
        tol: tol::EIGENVECTORS,
    });
    let p = projector_parity(gpu, 3, 16, &RankRule::Energy { threshold: 0.99, min_rank: 4 }, None)?;
    out.push(Check {
        kernel: "rank_projector_f32",
        shape: "S=3 r=16 energy 0.99".into(),
        rel_err: p,
        tol: tol::PROJECTOR,
    });
    out.push(Check {
        kernel: "grit_sanitize_f32",
        shape: "n=1031 with NaN, ±inf, ±2e6".into(),
        rel_err: sanitize_parity(gpu, 1031)?,
        tol: 0.0,
    });
    let a = rank_apply_parity(gpu, 7, 16, Side::Both)?.max(rank_apply_parity(gpu, 3, 5, Side::A)?);
    out.push(Check {
        kernel: "rank_apply_r16_f32",
        shape: "7 slots r=16, 3 slots r=5 A".into(),
        rel_err: a,
        tol: tol::APPLY,
    });
    let q = rank_quadratic_parity(gpu, 7, 17)?;
    out.push(Check { kernel: "rank_quadratic_r32_f32", shape: "7 slots r=17".into(), rel_err: q, tol: tol::QUADRATIC });
    Ok(out)
}

/// A Llama-3.2-1B-like slot layout: 16 layers × (q, k, v, o, gate, up, down), hidden 2048, kv
/// 512, MLP 8192; A then B of each slot, back to back.
pub fn llama_1b_layout(r: usize) -> (Vec<Slot>, usize) {
    let shapes = [(2048, 2048), (2048, 512), (2048, 512), (2048, 2048), (2048, 8192), (2048, 8192), (8192, 2048)];
    let mut off = 0usize;
    let mut out = Vec::new();
    for _ in 0..16 {
        for &(k, n) in &shapes {
            let a_off = off;
            off += r * k;
            let b_off = off;
            off += n * r;
            out.push(Slot { a_off, b_off, k, n });
        }
    }
    (out, off)
}

/// Every kernel of this module at realistic sizes (r = 16, S = 112: the 1B layout).
pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    let r = 16usize;
    let mut rows = Vec::new();
    for m in [4096usize, 16384] {
        let u = gpu.upload(&check::test_data(m * r, 1, 1.0).into_iter().map(bf16::from_f32).collect::<Vec<_>>())?;
        let v = gpu.upload(&check::test_data(m * r, 2, 1.0).into_iter().map(bf16::from_f32).collect::<Vec<_>>())?;
        let w = gpu.upload(&vec![1f32; m])?;
        let mut st = gpu.zeros::<f32>(2 * r * r)?;
        let t = check::time_median(gpu, 5, 20, || {
            let (mut a, mut g) = st.split_at_mut(r * r);
            kfac_gram(gpu, &u, &v, &w, m, r, &mut a, &mut g)
        })?;
        let work = Work::Bytes((2 * m * r * 2 + m * 4) as f64);
        rows.push(BenchRow { kernel: "kfac_gram_bf16", shape: format!("M={m} r={r}"), seconds: t, work });
        let mut scratch = gpu.alloc::<f32>(kfac_gram_scratch_len(m, r))?;
        let t = check::time_median(gpu, 5, 20, || {
            let (mut a, mut g) = st.split_at_mut(r * r);
            kfac_gram_with_scratch(gpu, &u, &v, &w, m, r, &mut a, &mut g, &mut scratch)
        })?;
        rows.push(BenchRow { kernel: "kfac_gram_bf16", shape: format!("M={m} r={r}, held scratch"), seconds: t, work });
    }
    let s = 112usize;
    let (sa, sg, _) = damping_cases(s, r, 1e-3);
    let (dsa, dsg, dn) = (gpu.upload(&sa)?, gpu.upload(&sg)?, gpu.upload(&vec![100f32; s])?);
    let (mut ia, mut ig, mut lu) = (gpu.zeros::<f32>(s * r * r)?, gpu.zeros::<f32>(s * r * r)?, gpu.zeros::<f32>(s)?);
    let t = check::time_median(gpu, 3, 10, || {
        kfac_damped_inverse(gpu, &dsa, &dsg, &dn, 16.0, s, r, 1e-3, &mut ia, &mut ig, &mut lu)
    })?;
    rows.push(BenchRow {
        kernel: "kfac_damped_inverse_f32",
        shape: format!("S={s} r={r}"),
        seconds: t,
        work: Work::Bytes((4 * s * r * r * 4) as f64),
    });
    let a = gpu.upload(&eigh_cases(s, r))?;
    let (mut w, mut vv, mut info) = (gpu.zeros::<f32>(s * r)?, gpu.zeros::<f32>(s * r * r)?, gpu.zeros::<i32>(s)?);
    let t = check::time_median(gpu, 3, 10, || {
        eigh_jacobi(gpu, &a, s, r, linalg::JACOBI_TOL_F32, linalg::JACOBI_MAX_SWEEPS, &mut w, &mut vv, &mut info)
    })?;
    rows.push(BenchRow {
        kernel: "eigh_jacobi_f32",
        shape: format!("S={s} r={r}"),
        seconds: t,
        work: Work::Bytes((2 * s * r * r * 4) as f64),
    });
    let (mut p, mut k) = (gpu.zeros::<f32>(s * r * r)?, gpu.zeros::<i32>(s)?);
    let rule = RankRule::Energy { threshold: 0.99, min_rank: 4 };
    let t = check::time_median(gpu, 3, 10, || rank_projector(gpu, &w, &vv, s, r, &rule, &mut p, &mut k))?;
    rows.push(BenchRow {
        kernel: "rank_projector_f32",
        shape: format!("S={s} r={r}"),
        seconds: t,
        work: Work::Bytes((2 * s * r * r * 4) as f64),
    });

    let (layout, len) = llama_1b_layout(r);
    let table = SlotTable::new(gpu, r, &layout)?;
    let x = gpu.upload(&check::test_data(len, 5, 1.0))?;
    let mut y = gpu.zeros::<f32>(len)?;
    let inv = gpu.upload(&check::test_data(s * r * r, 6, 0.1))?;
    let bytes = (len * 4) as f64;
    let shape = format!("Llama-1B layout, {len} f32");
    let op = RankOp::left_right(inv.as_view(), inv.as_view());
    let t = check::time_median(gpu, 5, 20, || rank_apply(gpu, &table, &x, &mut y, &op))?;
    rows.push(BenchRow {
        kernel: "rank_apply_r16_f32",
        shape: format!("{shape}, β=0"),
        seconds: t,
        work: Work::Bytes(2.0 * bytes),
    });
    let t = check::time_median(gpu, 5, 20, || rank_apply_in_place(gpu, &table, &mut y, &op))?;
    rows.push(BenchRow {
        kernel: "rank_apply_r16_f32",
        shape: format!("{shape}, in place"),
        seconds: t,
        work: Work::Bytes(2.0 * bytes),
    });
    let reg = RankOp::regularizer_grad(inv.as_view(), inv.as_view(), inv.as_view(), inv.as_view(), 1e-5, 1e-4);
    let t = check::time_median(gpu, 5, 20, || rank_apply(gpu, &table, &x, &mut y, &reg))?;
    rows.push(BenchRow {
        kernel: "rank_apply_r16_f32",
        shape: format!("{shape}, β=1"),
        seconds: t,
        work: Work::Bytes(3.0 * bytes),
    });
    let mut q = gpu.zeros::<f32>(4 * s)?;
    let t = check::time_median(gpu, 5, 20, || rank_quadratic(gpu, &table, &x, &inv, &inv, &inv, &inv, &mut q))?;
    rows.push(BenchRow { kernel: "rank_quadratic_r16_f32", shape, seconds: t, work: Work::Bytes(bytes) });
    // The same bytes copied device to device: the bandwidth rank_apply is measured against.
    let t = check::time_median(gpu, 5, 20, || crate::convert::cast::<f32, f32>(gpu, &x, &mut y))?;
    rows.push(BenchRow {
        kernel: "copy (memcpy_dtod)",
        shape: format!("{len} f32"),
        seconds: t,
        work: Work::Bytes(2.0 * bytes),
    });
    Ok(rows)
}
