//! Parity of the element-wise kernels with their gristmill-core references, f32 and bf16, on
//! ragged shapes (rows that are not whole 16-byte chunks, M = 1, views at odd offsets that take
//! the element-by-element path, rows wider than the register cache), plus the launchers' shape
//! checks. bf16 cases feed the reference the bf16-rounded inputs and compute it in f32.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use cudarc::driver::{LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use gristmill_core::ops::lora::{dropout_mask_ref, dropout_uniform};
use gristmill_core::ops::rope::{RopeConfig, RopeScaling, RopeTables, rope_bwd_ref, rope_fwd_ref, rope_tables};
use gristmill_core::ops::{embedding, rmsnorm, swiglu};
use gristmill_kernels::check::{rel_err, test_data};
use gristmill_kernels::elementwise::{
    add, add_rmsnorm_fwd, dropout_fwd, embedding_bwd, embedding_fwd, rmsnorm_bwd, rmsnorm_fwd, rope_bwd, rope_fwd,
    swiglu_bwd, swiglu_fwd,
};
use gristmill_kernels::{CudaSlice, DevicePtr, Float, Gpu, KernelError, bf16};

// Tolerances: max |gpu − ref| / max |ref|, one per op and dtype. A bf16 output is rounded once
// from f32, half a bf16 ulp (2⁻⁹) of the largest value; a different last f32 bit before rounding
// can flip that rounding, so bf16 gets two ulps (2⁻⁷ ≈ 8e-3).
const RMSNORM_F32: f64 = 1e-5;
const RMSNORM_BF16: f64 = 8e-3;
/// rstd is f32 in both, computed from the same (rounded) inputs; only the sum order differs.
const RSTD_F32: f64 = 1e-5;
const RSTD_BF16: f64 = 1e-5;
/// Loosened from RMSNORM_F32: dx subtracts the projection on x̂, which cancels.
const RMSNORM_BWD_F32: f64 = 3e-5;
const RMSNORM_BWD_BF16: f64 = 8e-3;
const ROPE_F32: f64 = 1e-6;
const ROPE_BF16: f64 = 8e-3;
/// expf on the device and libm's expf may differ in the last bit.
const SWIGLU_F32: f64 = 1e-5;
const SWIGLU_BF16: f64 = 8e-3;
/// Sums of the same f32 values, in a different order (atomics).
const EMBEDDING_BWD_F32: f64 = 1e-6;
const EMBEDDING_BWD_BF16: f64 = 1e-6;
// The embedding forward (a copy), dropout and add are exact in both dtypes: compared bit for bit.

/// (M, C): one element, a row shorter than a chunk, SmolLM's hidden size, a ragged row, Llama's
/// hidden size, and rows wider than the register cache (8192 bf16 / 4096 f32 elements).
const SHAPES: [(usize, usize); 7] = [(1, 1), (3, 7), (5, 576), (17, 1000), (64, 4096), (2, 8200), (2, 20000)];

fn gpu() -> Gpu {
    common::gpu()
}

fn up<T: Float>(gpu: &Gpu, v: &[f32]) -> CudaSlice<T> {
    gpu.upload(&v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>()).unwrap()
}

fn down<T: Float>(gpu: &Gpu, s: &impl DevicePtr<T>) -> Vec<f32> {
    gpu.download(s).unwrap().into_iter().map(T::to_f32).collect()
}

/// `v` as a T buffer holds it.
fn rounded<T: Float>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

/// Deterministic data in [−scale, scale), already rounded to T.
fn data<T: Float>(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    rounded::<T>(&test_data(n, seed, scale))
}

fn tol<T: Float>(f32_tol: f64, bf16_tol: f64) -> f64 {
    if T::IS_BF16 { bf16_tol } else { f32_tol }
}

fn name<T: Float>() -> &'static str {
    if T::IS_BF16 { "bf16" } else { "f32" }
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: rel err {e:e} > {tol:e}");
}

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} is {} (bits {:08x}), expected {} ({:08x})",
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

// ------------------------------------------------------------------------------------- rmsnorm

fn rmsnorm_case<T: Float>(gpu: &Gpu, m: usize, c: usize) {
    let what = format!("rmsnorm {} {m}x{c}", name::<T>());
    let x = data::<T>(m * c, 1 + c as u64, 3.0);
    let w = test_data(c, 2, 1.5);
    let eps = 1e-5;
    let (xd, wd) = (up::<T>(gpu, &x), gpu.upload(&w).unwrap());
    let (mut y, mut rstd) = (gpu.zeros::<T>(m * c).unwrap(), gpu.zeros::<f32>(m).unwrap());
    rmsnorm_fwd(gpu, &xd, &wd, &mut y, &mut rstd, m, c, eps).unwrap();
    let (wy, wr) = rmsnorm::rmsnorm_fwd_ref(&x, &w, m, c, eps).unwrap();
    assert_close(&format!("{what} y"), &down(gpu, &y), &wy, tol::<T>(RMSNORM_F32, RMSNORM_BF16));
    assert_close(&format!("{what} rstd"), &gpu.download(&rstd).unwrap(), &wr, tol::<T>(RSTD_F32, RSTD_BF16));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rmsnorm_fwd_matches_reference() {
    let gpu = gpu();
    for (m, c) in SHAPES {
        rmsnorm_case::<f32>(&gpu, m, c);
        rmsnorm_case::<bf16>(&gpu, m, c);
    }
}

fn add_rmsnorm_case<T: Float>(gpu: &Gpu, m: usize, c: usize) {
    let what = format!("add_rmsnorm {} {m}x{c}", name::<T>());
    let r = data::<T>(m * c, 3, 2.0);
    let d = data::<T>(m * c, 4, 1.0);
    let w = test_data(c, 5, 1.5);
    let eps = 1e-6;
    let (mut rd, dd, wd) = (up::<T>(gpu, &r), up::<T>(gpu, &d), gpu.upload(&w).unwrap());
    let (mut y, mut rstd) = (gpu.zeros::<T>(m * c).unwrap(), gpu.zeros::<f32>(m).unwrap());
    add_rmsnorm_fwd(gpu, &mut rd, &dd, &wd, &mut y, &mut rstd, m, c, eps).unwrap();
    // The norm sees the sum as stored: rounded to T.
    let sum = rounded::<T>(&r.iter().zip(&d).map(|(a, b)| a + b).collect::<Vec<_>>());
    assert_bits(&format!("{what} resid"), &down(gpu, &rd), &sum);
    let (wy, wr) = rmsnorm::rmsnorm_fwd_ref(&sum, &w, m, c, eps).unwrap();
    assert_close(&format!("{what} y"), &down(gpu, &y), &wy, tol::<T>(RMSNORM_F32, RMSNORM_BF16));
    assert_close(&format!("{what} rstd"), &gpu.download(&rstd).unwrap(), &wr, tol::<T>(RSTD_F32, RSTD_BF16));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn add_rmsnorm_fwd_matches_reference() {
    let gpu = gpu();
    for (m, c) in SHAPES {
        add_rmsnorm_case::<f32>(&gpu, m, c);
        add_rmsnorm_case::<bf16>(&gpu, m, c);
    }
}

fn rmsnorm_bwd_case<T: Float>(gpu: &Gpu, m: usize, c: usize, accumulate: bool) {
    let what = format!("rmsnorm_bwd {} {m}x{c} accumulate={accumulate}", name::<T>());
    let x = data::<T>(m * c, 6, 2.0);
    let dy = data::<T>(m * c, 7, 1.0);
    let prior = data::<T>(m * c, 8, 0.5);
    let w = test_data(c, 9, 1.5);
    let (_, rstd) = rmsnorm::rmsnorm_fwd_ref(&x, &w, m, c, 1e-5).unwrap();
    let (xd, dyd, wd, rd) = (up::<T>(gpu, &x), up::<T>(gpu, &dy), gpu.upload(&w).unwrap(), gpu.upload(&rstd).unwrap());
    let mut dx = up::<T>(gpu, &prior);
    rmsnorm_bwd(gpu, &xd, &wd, &rd, &dyd, &mut dx, m, c, accumulate).unwrap();
    let (mut want, _) = rmsnorm::rmsnorm_bwd_ref(&x, &w, &rstd, &dy, m, c).unwrap();
    if accumulate {
        want.iter_mut().zip(&prior).for_each(|(a, b)| *a += b);
    }
    assert_close(&what, &down(gpu, &dx), &want, tol::<T>(RMSNORM_BWD_F32, RMSNORM_BWD_BF16));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rmsnorm_bwd_matches_reference() {
    let gpu = gpu();
    for (m, c) in SHAPES {
        for acc in [false, true] {
            rmsnorm_bwd_case::<f32>(&gpu, m, c, acc);
            rmsnorm_bwd_case::<bf16>(&gpu, m, c, acc);
        }
    }
}

/// Views one element into a buffer are 4 or 2 bytes off 16-byte alignment: the same kernels
/// must take their element-by-element path and give the same answers.
fn misaligned_case<T: Float>(gpu: &Gpu) {
    let (m, c) = (7, 576);
    let what = format!("misaligned {}", name::<T>());
    let x = data::<T>(m * c + 1, 10, 2.0);
    let w = test_data(c + 1, 11, 1.0);
    let (xd, wd) = (up::<T>(gpu, &x), gpu.upload(&w).unwrap());
    let (xv, wv) = (xd.slice(1..), wd.slice(1..));
    let mut y = gpu.zeros::<T>(m * c + 1).unwrap();
    let mut rstd = gpu.zeros::<f32>(m).unwrap();
    rmsnorm_fwd(gpu, &xv, &wv, &mut y.slice_mut(1..), &mut rstd, m, c, 1e-5).unwrap();
    let (wy, _) = rmsnorm::rmsnorm_fwd_ref(&x[1..], &w[1..], m, c, 1e-5).unwrap();
    assert_close(&format!("{what} rmsnorm"), &down(gpu, &y)[1..], &wy, tol::<T>(RMSNORM_F32, RMSNORM_BF16));

    let mut o = gpu.zeros::<T>(m * c + 1).unwrap();
    swiglu_fwd(gpu, &xv, &xd.slice(..m * c), &mut o.slice_mut(1..)).unwrap();
    let want = swiglu::swiglu_fwd_ref(&x[1..], &x[..m * c]).unwrap();
    assert_close(&format!("{what} swiglu"), &down(gpu, &o)[1..], &want, tol::<T>(SWIGLU_F32, SWIGLU_BF16));

    let mut a = up::<T>(gpu, &x);
    add(gpu, &mut a.slice_mut(1..), &xd.slice(..m * c)).unwrap();
    let want: Vec<f32> = x[1..].iter().zip(&x[..m * c]).map(|(p, q)| p + q).collect();
    assert_bits(&format!("{what} add"), &down(gpu, &a)[1..], &rounded::<T>(&want));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn views_at_odd_offsets_take_the_scalar_path() {
    let gpu = gpu();
    misaligned_case::<f32>(&gpu);
    misaligned_case::<bf16>(&gpu);
}

// ----------------------------------------------------------------------------------- embedding

fn embedding_case<T: Float>(gpu: &Gpu, m: usize, v: usize, c: usize) {
    let what = format!("embedding {} M={m} V={v} C={c}", name::<T>());
    // ids repeat (m > v in some cases, and i·7 mod v collides), and every fifth is out of range.
    let ids: Vec<u32> = (0..m).map(|i| if i % 5 == 4 { (v + i) as u32 } else { ((i * 7) % v) as u32 }).collect();
    let table = data::<T>(v * c, 12, 1.0);
    let (idd, td) = (gpu.upload(&ids).unwrap(), up::<T>(gpu, &table));
    let mut out = up::<T>(gpu, &vec![9.0; m * c]);
    embedding_fwd(gpu, &idd, &td, &mut out, v, c).unwrap();
    let mut want = Vec::with_capacity(m * c);
    for &id in &ids {
        match (id as usize) < v {
            true => want.extend_from_slice(&table[id as usize * c..(id as usize + 1) * c]),
            false => want.extend(std::iter::repeat_n(0.0, c)),
        }
    }
    assert_bits(&format!("{what} fwd"), &down(gpu, &out), &want);

    // The backward adds into what dtable holds.
    let dy = data::<T>(m * c, 13, 1.0);
    let prior = test_data(v * c, 14, 0.25);
    let (dyd, mut dtab) = (up::<T>(gpu, &dy), gpu.upload(&prior).unwrap());
    embedding_bwd(gpu, &idd, &dyd, &mut dtab, v, c).unwrap();
    let (valid_ids, valid_dy): (Vec<u32>, Vec<f32>) = {
        let keep: Vec<usize> = (0..m).filter(|&i| (ids[i] as usize) < v).collect();
        (keep.iter().map(|&i| ids[i]).collect(), keep.iter().flat_map(|&i| dy[i * c..(i + 1) * c].to_vec()).collect())
    };
    let mut want = embedding::embedding_bwd_ref(&valid_ids, &valid_dy, v, c).unwrap();
    want.iter_mut().zip(&prior).for_each(|(a, b)| *a += b);
    let got = gpu.download(&dtab).unwrap();
    assert_close(&format!("{what} bwd"), &got, &want, tol::<T>(EMBEDDING_BWD_F32, EMBEDDING_BWD_BF16));
}

/// (M, V, C): C = 7 and 1002 are not whole quads (the one-element path on Hopper too), C = 1000,
/// 4096 and 20000 are.
const EMBEDDING_SHAPES: [(usize, usize, usize); 7] =
    [(1, 1, 1), (3, 2, 7), (17, 5, 576), (40, 3, 1000), (33, 7, 1002), (64, 100, 4096), (9, 4, 20000)];

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_matches_reference_with_repeats_and_bad_ids() {
    let gpu = gpu();
    for (m, v, c) in EMBEDDING_SHAPES {
        embedding_case::<f32>(&gpu, m, v, c);
        embedding_case::<bf16>(&gpu, m, v, c);
    }
}

/// dtable after the compute_80 build's embedding_bwd_<T> (one f32 atomic an element) adds dy into
/// `prior`: launched by hand, as the launcher does, since a Hopper loads the compute_90a build.
fn embedding_bwd_compute_80<T: Float>(
    gpu: &Gpu,
    ids: &[u32],
    dy: &[f32],
    prior: &[f32],
    v: usize,
    c: usize,
) -> Vec<f32> {
    let m = gristmill_kernels::ptx::module("elementwise").unwrap();
    let module = gpu.context().load_module(Ptx::from_src(m.sm80)).unwrap();
    let f = module.load_function(T::pick("embedding_bwd_f32", "embedding_bwd_bf16")).unwrap();
    let (idd, dyd, mut dtab) = (gpu.upload(ids).unwrap(), up::<T>(gpu, dy), gpu.upload(prior).unwrap());
    let (vi, ci, vec) = (v as i32, c as i32, 1i32);
    let (pi, pd) = (idd.device_ptr(gpu.stream()).0, dyd.device_ptr(gpu.stream()).0);
    let pt = gristmill_kernels::DevicePtrMut::device_ptr_mut(&mut dtab, gpu.stream()).0;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pi).arg(&pd).arg(&pt).arg(&vi).arg(&ci).arg(&vec);
    let cfg = LaunchConfig { grid_dim: (ids.len() as u32, 1, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the launcher's contract: block m reads ids[m] and row m of dy (M·C) and adds into
    // row ids[m] < V of dtable (V·C); all buffers hold what they should.
    unsafe { b.launch(cfg) }.unwrap();
    gpu.download(&dtab).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_bwd_compute_80_build_matches_reference() {
    let gpu = gpu();
    for (m, v, c) in EMBEDDING_SHAPES {
        for bf in [false, true] {
            let ids: Vec<u32> =
                (0..m).map(|i| if i % 5 == 4 { (v + i) as u32 } else { ((i * 7) % v) as u32 }).collect();
            let dy = if bf { data::<bf16>(m * c, 13, 1.0) } else { data::<f32>(m * c, 13, 1.0) };
            let prior = test_data(v * c, 14, 0.25);
            let got = match bf {
                true => embedding_bwd_compute_80::<bf16>(&gpu, &ids, &dy, &prior, v, c),
                false => embedding_bwd_compute_80::<f32>(&gpu, &ids, &dy, &prior, v, c),
            };
            let mut want = prior.clone();
            for (i, &id) in ids.iter().enumerate().filter(|(_, id)| (**id as usize) < v) {
                for j in 0..c {
                    want[id as usize * c + j] += dy[i * c + j];
                }
            }
            let t = if bf { EMBEDDING_BWD_BF16 } else { EMBEDDING_BWD_F32 };
            assert_close(&format!("embedding_bwd compute_80 bf16={bf} M={m} V={v} C={c}"), &got, &want, t);
        }
    }
}

// ---------------------------------------------------------------------------------------- rope

fn tables(n: usize, d: usize) -> RopeTables {
    let cfg = RopeConfig { theta: 500000.0, head_dim: d, scaling: RopeScaling::None };
    // Packed positions: a second document restarts at 0 halfway.
    let pos: Vec<u32> = (0..n).map(|i| if i < n / 2 { (i * 331) as u32 } else { (i - n / 2) as u32 }).collect();
    rope_tables(&cfg, &pos).unwrap()
}

fn rope_case<T: Float>(gpu: &Gpu, n: usize, h: usize, d: usize) {
    let what = format!("rope {} N={n} H={h} D={d}", name::<T>());
    let t = tables(n, d);
    let x = data::<T>(n * h * d, 15 + d as u64, 2.0);
    let (cd, sd) = (gpu.upload(&t.cos).unwrap(), gpu.upload(&t.sin).unwrap());
    let mut xd = up::<T>(gpu, &x);
    rope_fwd(gpu, &mut xd, &cd, &sd, n, h, d).unwrap();
    let want = rope_fwd_ref(&x, &t, n, h, d).unwrap();
    assert_close(&format!("{what} fwd"), &down(gpu, &xd), &want, tol::<T>(ROPE_F32, ROPE_BF16));
    let mut xd = up::<T>(gpu, &x);
    rope_bwd(gpu, &mut xd, &cd, &sd, n, h, d).unwrap();
    let want = rope_bwd_ref(&x, &t, n, h, d).unwrap();
    assert_close(&format!("{what} bwd"), &down(gpu, &xd), &want, tol::<T>(ROPE_F32, ROPE_BF16));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_matches_reference() {
    let gpu = gpu();
    // H = 3 with D = 64 and 128, N = 1 and 9; GQA heads of SmolLM2 (9 q / 3 kv, D = 64) and of
    // Llama 3 8B (32 q / 8 kv, D = 128); D = 10 and 6, whose halves are not whole chunks.
    let cases = [
        (1, 3, 64),
        (9, 3, 64),
        (1, 3, 128),
        (9, 3, 128),
        (33, 9, 64),
        (33, 3, 64),
        (17, 32, 128),
        (17, 8, 128),
        (5, 3, 10),
        (7, 1, 6),
    ];
    for (n, h, d) in cases {
        rope_case::<f32>(&gpu, n, h, d);
        rope_case::<bf16>(&gpu, n, h, d);
    }
}

// ---------------------------------------------------------------------------------------- flat

fn swiglu_case<T: Float>(gpu: &Gpu, n: usize) {
    let what = format!("swiglu {} n={n}", name::<T>());
    // Scale 12 reaches far into both tails of the sigmoid.
    let g = data::<T>(n, 16, 12.0);
    let u = data::<T>(n, 17, 1.0);
    let dout = data::<T>(n, 18, 1.0);
    let (gd, ud, dd) = (up::<T>(gpu, &g), up::<T>(gpu, &u), up::<T>(gpu, &dout));
    let mut o = gpu.zeros::<T>(n).unwrap();
    swiglu_fwd(gpu, &gd, &ud, &mut o).unwrap();
    let t = tol::<T>(SWIGLU_F32, SWIGLU_BF16);
    assert_close(&format!("{what} fwd"), &down(gpu, &o), &swiglu::swiglu_fwd_ref(&g, &u).unwrap(), t);
    let (mut dg, mut du) = (gpu.zeros::<T>(n).unwrap(), gpu.zeros::<T>(n).unwrap());
    swiglu_bwd(gpu, &gd, &ud, &dd, &mut dg, &mut du).unwrap();
    let (wg, wu) = swiglu::swiglu_bwd_ref(&g, &u, &dout).unwrap();
    assert_close(&format!("{what} dg"), &down(gpu, &dg), &wg, t);
    assert_close(&format!("{what} du"), &down(gpu, &du), &wu, t);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn swiglu_matches_reference() {
    let gpu = gpu();
    for (m, c) in SHAPES {
        swiglu_case::<f32>(&gpu, m * c);
        swiglu_case::<bf16>(&gpu, m * c);
    }
}

fn dropout_case<T: Float>(gpu: &Gpu, n: usize, seed: u64, p: f32) {
    let what = format!("dropout {} n={n} seed={seed} p={p}", name::<T>());
    let x = data::<T>(n, 19, 2.0);
    let xd = up::<T>(gpu, &x);
    let mut o = up::<T>(gpu, &vec![7.0; n]);
    dropout_fwd(gpu, &xd, &mut o, seed, p).unwrap();
    let mask = dropout_mask_ref(seed, n, p).unwrap();
    let got = down(gpu, &o);
    // Which elements are dropped, exactly.
    for i in 0..n {
        if x[i] != 0.0 {
            assert_eq!(got[i] == 0.0, mask[i] == 0.0, "{what}: element {i} dropped on one side only");
        }
    }
    // And the kept values, bit for bit (x · mask in f32, rounded once).
    let want: Vec<f32> = x.iter().zip(&mask).map(|(a, b)| a * b).collect();
    assert_bits(&what, &got, &rounded::<T>(&want));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dropout_matches_the_cpu_mask_bit_for_bit() {
    let gpu = gpu();
    for (n, seed, p) in [(1, 0, 0.5), (7, 1, 0.1), (1000, 42, 0.0), (4099, 7, 0.05), (100_003, u64::MAX, 0.9)] {
        dropout_case::<f32>(&gpu, n, seed, p);
        dropout_case::<bf16>(&gpu, n, seed, p);
    }
    // The fraction dropped is p: the mask is not degenerate.
    let mask = dropout_mask_ref(3, 100_000, 0.25).unwrap();
    let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / 1e5;
    assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
    dropout_case::<f32>(&gpu, 100_000, 3, 0.25);
}

/// The kernel compares integers where the reference compares u < p in f32: p equal to some
/// element's u (kept: u < u is false), one f32 ulp and one 2⁻²⁴ step above it (dropped), and the
/// extreme p (the smallest step, the largest f32 below 1) must drop exactly the same elements.
#[test]
#[ignore = "needs a CUDA GPU"]
fn dropout_threshold_is_exact_at_the_boundaries() {
    let gpu = gpu();
    let (n, seed) = (5000, 0xdead_beef);
    let mut ps = vec![1.0 / 16_777_216.0, 1.0 - 1.0 / 16_777_216.0];
    for i in [0u64, 1, 17, 4095, 4999] {
        let u = dropout_uniform(seed, i);
        ps.extend([u, f32::from_bits(u.to_bits() + 1), u + 1.0 / 16_777_216.0]);
    }
    for p in ps.into_iter().filter(|p| (0.0..1.0).contains(p)) {
        dropout_case::<f32>(&gpu, n, seed, p);
        dropout_case::<bf16>(&gpu, n, seed, p);
    }
}

fn add_case<T: Float>(gpu: &Gpu, n: usize) {
    let a = data::<T>(n, 20, 3.0);
    let b = data::<T>(n, 21, 1.0);
    let (mut ad, bd) = (up::<T>(gpu, &a), up::<T>(gpu, &b));
    add(gpu, &mut ad, &bd).unwrap();
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_bits(&format!("add {} n={n}", name::<T>()), &down(gpu, &ad), &rounded::<T>(&want));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn add_matches_reference() {
    let gpu = gpu();
    for (m, c) in SHAPES {
        add_case::<f32>(&gpu, m * c);
        add_case::<bf16>(&gpu, m * c);
    }
}

// ------------------------------------------------------------------------------- shape checks

fn is_shape<T: std::fmt::Debug>(what: &str, r: Result<T, KernelError>) {
    assert!(matches!(r, Err(KernelError::Shape { .. })), "{what}: expected a shape error, got {r:?}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn launchers_reject_wrong_lengths() {
    let gpu = gpu();
    let (m, c, v) = (3, 8, 5);
    let z = |n: usize| gpu.zeros::<bf16>(n).unwrap();
    let f = |n: usize| gpu.zeros::<f32>(n).unwrap();
    let ids = gpu.upload(&[0u32, 1, 2]).unwrap();

    is_shape("embedding_fwd table", embedding_fwd(&gpu, &ids, &z(v * c - 1), &mut z(m * c), v, c));
    is_shape("embedding_fwd out", embedding_fwd(&gpu, &ids, &z(v * c), &mut z(m * c + 1), v, c));
    is_shape("embedding_bwd dy", embedding_bwd(&gpu, &ids, &z(m * c - 1), &mut f(v * c), v, c));
    is_shape("embedding_bwd dtable", embedding_bwd(&gpu, &ids, &z(m * c), &mut f(v * c - 1), v, c));

    is_shape("rmsnorm_fwd x", rmsnorm_fwd(&gpu, &z(m * c - 1), &f(c), &mut z(m * c), &mut f(m), m, c, 1e-5));
    is_shape("rmsnorm_fwd w", rmsnorm_fwd(&gpu, &z(m * c), &f(c + 1), &mut z(m * c), &mut f(m), m, c, 1e-5));
    is_shape("rmsnorm_fwd y", rmsnorm_fwd(&gpu, &z(m * c), &f(c), &mut z(m * c - 1), &mut f(m), m, c, 1e-5));
    is_shape("rmsnorm_fwd rstd", rmsnorm_fwd(&gpu, &z(m * c), &f(c), &mut z(m * c), &mut f(m - 1), m, c, 1e-5));
    // Empty views of real buffers: the driver refuses zero-byte allocations.
    let (zb, fb, mut zo, mut fo) = (z(1), f(1), z(1), f(1));
    let (ze, fe) = (zb.slice(0..0), fb.slice(0..0));
    is_shape("rmsnorm_fwd C = 0", rmsnorm_fwd(&gpu, &ze, &fe, &mut zo.slice_mut(0..0), &mut f(m), m, 0, 1e-5));
    is_shape("rmsnorm_fwd eps", rmsnorm_fwd(&gpu, &z(m * c), &f(c), &mut z(m * c), &mut f(m), m, c, f32::NAN));

    let arn = |r: usize, d: usize, w: usize, y: usize, s: usize| {
        add_rmsnorm_fwd(&gpu, &mut z(r), &z(d), &f(w), &mut z(y), &mut f(s), m, c, 1e-5)
    };
    is_shape("add_rmsnorm_fwd resid", arn(m * c - 1, m * c, c, m * c, m));
    is_shape("add_rmsnorm_fwd delta", arn(m * c, m * c + 1, c, m * c, m));
    is_shape("add_rmsnorm_fwd w", arn(m * c, m * c, c - 1, m * c, m));
    is_shape("add_rmsnorm_fwd y", arn(m * c, m * c, c, m * c - 1, m));
    is_shape("add_rmsnorm_fwd rstd", arn(m * c, m * c, c, m * c, m + 1));

    let bwd = |x: usize, w: usize, r: usize, dy: usize, dx: usize| {
        rmsnorm_bwd(&gpu, &z(x), &f(w), &f(r), &z(dy), &mut z(dx), m, c, true)
    };
    is_shape("rmsnorm_bwd x", bwd(m * c - 1, c, m, m * c, m * c));
    is_shape("rmsnorm_bwd w", bwd(m * c, c - 1, m, m * c, m * c));
    is_shape("rmsnorm_bwd rstd", bwd(m * c, c, m - 1, m * c, m * c));
    is_shape("rmsnorm_bwd dy", bwd(m * c, c, m, m * c - 1, m * c));
    is_shape("rmsnorm_bwd dx", bwd(m * c, c, m, m * c, m * c - 1));

    let (n, h, d) = (3, 2, 8);
    is_shape("rope_fwd x", rope_fwd(&gpu, &mut z(n * h * d - 1), &f(n * d / 2), &f(n * d / 2), n, h, d));
    is_shape("rope_fwd cos", rope_fwd(&gpu, &mut z(n * h * d), &f(n * d / 2 - 1), &f(n * d / 2), n, h, d));
    is_shape("rope_bwd sin", rope_bwd(&gpu, &mut z(n * h * d), &f(n * d / 2), &f(n * d / 2 + 1), n, h, d));
    is_shape("rope_bwd odd D", rope_bwd(&gpu, &mut z(n * h * 7), &f(n * 3), &f(n * 3), n, h, 7));

    is_shape("swiglu_fwd u", swiglu_fwd(&gpu, &z(10), &z(9), &mut z(10)));
    is_shape("swiglu_fwd out", swiglu_fwd(&gpu, &z(10), &z(10), &mut z(11)));
    is_shape("swiglu_bwd u", swiglu_bwd(&gpu, &z(10), &z(9), &z(10), &mut z(10), &mut z(10)));
    is_shape("swiglu_bwd dout", swiglu_bwd(&gpu, &z(10), &z(10), &z(9), &mut z(10), &mut z(10)));
    is_shape("swiglu_bwd dg", swiglu_bwd(&gpu, &z(10), &z(10), &z(10), &mut z(9), &mut z(10)));
    is_shape("swiglu_bwd du", swiglu_bwd(&gpu, &z(10), &z(10), &z(10), &mut z(10), &mut z(11)));

    is_shape("dropout_fwd out", dropout_fwd(&gpu, &z(10), &mut z(9), 1, 0.1));
    is_shape("dropout_fwd p = 1", dropout_fwd(&gpu, &z(10), &mut z(10), 1, 1.0));
    is_shape("dropout_fwd p < 0", dropout_fwd(&gpu, &z(10), &mut z(10), 1, -0.1));
    is_shape("dropout_fwd p NaN", dropout_fwd(&gpu, &z(10), &mut z(10), 1, f32::NAN));
    is_shape("add b", add(&gpu, &mut z(10), &z(11)));

    // Empty inputs are no work, not errors.
    add(&gpu, &mut zo.slice_mut(0..0), &ze).unwrap();
    rmsnorm_fwd(&gpu, &ze, &f(c), &mut zo.slice_mut(0..0), &mut fo.slice_mut(0..0), 0, c, 1e-5).unwrap();
}

// ------------------------------------------------------------------------ self-test and bench

#[test]
#[ignore = "needs a CUDA GPU"]
fn self_test_passes() {
    let gpu = gpu();
    let checks = gristmill_kernels::elementwise::self_test(&gpu).unwrap();
    assert_eq!(checks.len(), 22);
    for c in &checks {
        assert!(c.passed(), "{}: rel err {:e} > {:e} on {}", c.kernel, c.rel_err, c.tol, c.shape);
    }
}

/// GB/s of a device-to-device copy of `bytes` (read plus written).
fn copy_rate(gpu: &Gpu, bytes: usize) -> f64 {
    let src = gpu.zeros::<u8>(bytes).unwrap();
    let mut dst = gpu.zeros::<u8>(bytes).unwrap();
    let s =
        gristmill_kernels::check::time_median(gpu, 5, 20, || Ok(gpu.stream().memcpy_dtod(&src, &mut dst)?)).unwrap();
    let rate = 2.0 * bytes as f64 / s / 1e9;
    println!(
        "{:<22} {:<26} {:>9.1} us {:>8.0} GB/s",
        "memcpy_dtod (ref)",
        format!("{} MiB", bytes >> 20),
        s * 1e6,
        rate
    );
    rate
}

/// Prints every kernel's rate next to a device-to-device copy of 512 MiB, the reference of
/// `gristmill bench kernels` (run with --nocapture to see it). A 32 MiB copy, the size of one
/// activation, is printed too: it partly stays in L2.
#[test]
#[ignore = "needs a CUDA GPU"]
fn bench_reports_rates() {
    let gpu = gpu();
    copy_rate(&gpu, 32 << 20);
    let copy = copy_rate(&gpu, 512 << 20);
    for r in gristmill_kernels::elementwise::bench(&gpu).unwrap() {
        let (rate, unit) = r.rate();
        println!(
            "{:<22} {:<26} {:>9.1} us {:>8.0} {unit} {:>5.0}% of copy",
            r.kernel,
            r.shape,
            r.seconds * 1e6,
            rate,
            100.0 * rate / copy
        );
        assert!(rate > 0.0 && rate.is_finite(), "{}", r.kernel);
    }
}
