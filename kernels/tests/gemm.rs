//! Parity of the GEMMs, NF4 dequantization and the NF4 linear stand-in with their CPU references.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use gristmill_core::nf4::Nf4Tensor;
use gristmill_core::ops::matmul::matmul_fwd_ref;
use gristmill_core::ops::nf4_gemm::{nf4_gemm_bwd_ref, nf4_gemm_fwd_ref};
use gristmill_core::{DType, Shape};
use gristmill_kernels::check::{rel_err, test_data};
use gristmill_kernels::gemm::{
    self, Layout, Nf4Weight, TOL_BF16, TOL_BF16_F32OUT, TOL_F32, Tile, gemm, gemm_with_tile, nf4_dequant,
    nf4_matmul_nn, nf4_matmul_nt,
};
use gristmill_kernels::{CudaSlice, Float, Gpu, KernelError, bf16};

/// M, N, K: ragged against every tile (64, 128, 256 and BK = 32), M = 1, K = 1, a long K, a
/// rank-16 K and N.
const SHAPES: [(usize, usize, usize); 8] = [
    (1, 1, 1),
    (1, 4096, 576),
    (3, 5, 7),
    (17, 33, 65),
    (129, 70, 200),
    (64, 16, 4096),
    (300, 1000, 16),
    (130, 260, 40),
];

/// (alpha, beta); beta = 0 runs against a NaN-filled C.
const SCALES: [(f32, f32); 4] = [(1.0, 0.0), (0.5, 0.0), (1.0, 1.0), (-2.0, 0.25)];

fn values<T: Float>(n: usize, seed: u64) -> (Vec<T>, Vec<f64>) {
    let t: Vec<T> = test_data(n, seed, 1.0).into_iter().map(T::from_f32).collect();
    let r = t.iter().map(|v| f64::from(v.to_f32())).collect();
    (t, r)
}

/// One product on the GPU against the f64 reference of the same (rounded) inputs (`tile` None:
/// the one `gemm` picks); returns the relative error.
fn check_gemm<T: Float, O: Float>(
    gpu: &Gpu,
    layout: Layout,
    tile: Option<Tile>,
    (m, n, k): (usize, usize, usize),
    (alpha, beta): (f32, f32),
    seed: u64,
) -> f64 {
    let (a, ar) = values::<T>(m * k, seed);
    let (b, br) = values::<T>(n * k, seed + 1);
    let (c0, cr) =
        if beta == 0.0 { (vec![O::from_f32(f32::NAN); m * n], vec![0.0; m * n]) } else { values::<O>(m * n, seed + 2) };
    let (ta, tb) = layout.trans();
    let prod = matmul_fwd_ref(&ar, &br, m, k, n, ta, tb).unwrap();
    let want: Vec<f32> =
        prod.iter().zip(&cr).map(|(&p, &c)| (f64::from(alpha) * p + f64::from(beta) * c) as f32).collect();
    let (da, db) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
    let mut dc = gpu.upload(&c0).unwrap();
    match tile {
        Some(t) => gemm_with_tile(gpu, layout, t, m, n, k, &da, &db, &mut dc, alpha, beta).unwrap(),
        None => gemm(gpu, layout, m, n, k, &da, &db, &mut dc, alpha, beta).unwrap(),
    }
    let got: Vec<f32> = gpu.download(&dc).unwrap().into_iter().map(O::to_f32).collect();
    rel_err(&got, &want)
}

fn sweep<T: Float, O: Float>(tiles: &[Option<Tile>], tol: f64) {
    let gpu = common::gpu();
    let mut failures = Vec::new();
    let mut seed = 10;
    for layout in Layout::ALL {
        for (si, &shape) in SHAPES.iter().enumerate() {
            for &tile in tiles {
                // Every shape meets every alpha/beta pair across the layouts and tiles.
                for &ab in &[SCALES[si % 4], SCALES[(si + 1) % 4]] {
                    seed += 3;
                    let e = check_gemm::<T, O>(&gpu, layout, tile, shape, ab, seed);
                    if e.is_nan() || e > tol {
                        failures.push(format!("{layout:?} {tile:?} {shape:?} alpha,beta={ab:?}: rel err {e:.3e}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "tolerance {tol:e}:\n{}", failures.join("\n"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_f32_matches_reference() {
    sweep::<f32, f32>(&[None], TOL_F32);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_bf16_matches_reference_both_tiles() {
    sweep::<bf16, bf16>(&[Some(Tile::Large), Some(Tile::Small)], TOL_BF16);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_bf16_to_f32_matches_reference_both_tiles() {
    sweep::<bf16, f32>(&[Some(Tile::Large), Some(Tile::Small)], TOL_BF16_F32OUT);
}

/// Large enough for large tiles with split-K off on GPUs of up to 132 multiprocessors (9 × 16 =
/// 144 tiles, K ≥ 512); only some rows are checked, to keep the f64 reference cheap.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_picks_a_tile_and_matches_reference() {
    let gpu = common::gpu();
    let (m, n, k) = (1100, 4000, 520);
    let rows = [0, 1, 63, 64, 127, 128, 129, 511, 1024, 1099];
    for layout in Layout::ALL {
        let (a, ar) = values::<bf16>(m * k, 40);
        let (b, br) = values::<bf16>(n * k, 41);
        let (da, db) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
        let mut dc = gpu.upload(&vec![bf16::from_f32(f32::NAN); m * n]).unwrap();
        gemm(&gpu, layout, m, n, k, &da, &db, &mut dc, 1.0, 0.0).unwrap();
        let c = gpu.download(&dc).unwrap();
        let (lda, ldb) = layout.leading_dims(m, n, k);
        let at = |i: usize, p: usize| if layout == Layout::TN { ar[p * lda + i] } else { ar[i * lda + p] };
        let bt = |p: usize, j: usize| if layout == Layout::NT { br[j * ldb + p] } else { br[p * ldb + j] };
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for &i in &rows {
            for j in 0..n {
                want.push((0..k).map(|p| at(i, p) * bt(p, j)).sum::<f64>() as f32);
                got.push(c[i * n + j].to_f32());
            }
        }
        let e = rel_err(&got, &want);
        assert!(e <= TOL_BF16, "{layout:?} ({m}, {n}, {k}): {e:e}");
    }
}

/// Device copies at an element offset of 1: rows no longer 16-byte aligned (operands fall back to
/// element loads) and output pairs not 4/8-byte aligned (single stores).
fn check_offset_views<O: Float>(gpu: &Gpu, layout: Layout, tile: Tile, (m, n, k): (usize, usize, usize), tol: f64) {
    let (a, ar) = values::<bf16>(m * k, 5);
    let (b, br) = values::<bf16>(n * k, 6);
    let (c0, cr) = values::<O>(m * n, 7);
    let (alpha, beta) = (1.5f32, -0.5f32);
    let (ta, tb) = layout.trans();
    let prod = matmul_fwd_ref(&ar, &br, m, k, n, ta, tb).unwrap();
    let want: Vec<f32> =
        prod.iter().zip(&cr).map(|(&p, &c)| (f64::from(alpha) * p + f64::from(beta) * c) as f32).collect();
    let shifted = |v: &[bf16]| {
        let mut s = vec![bf16::ZERO];
        s.extend_from_slice(v);
        gpu.upload(&s).unwrap()
    };
    let (da, db): (CudaSlice<bf16>, CudaSlice<bf16>) = (shifted(&a), shifted(&b));
    let mut cs = vec![O::from_f32(0.0)];
    cs.extend_from_slice(&c0);
    let mut dc = gpu.upload(&cs).unwrap();
    {
        let mut cv = dc.slice_mut(1..);
        gemm_with_tile(gpu, layout, tile, m, n, k, &da.slice(1..), &db.slice(1..), &mut cv, alpha, beta).unwrap();
    }
    let got: Vec<f32> = gpu.download(&dc).unwrap().into_iter().map(O::to_f32).collect();
    assert_eq!(got[0], 0.0, "wrote before the view");
    let e = rel_err(&got[1..], &want);
    assert!(e <= tol, "{layout:?} {tile:?} ({m}, {n}, {k}) offset views: {e:e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_on_misaligned_views() {
    let gpu = common::gpu();
    for layout in Layout::ALL {
        for tile in [Tile::Large, Tile::Small] {
            for shape in [(72, 136, 96), (33, 17, 64)] {
                check_offset_views::<bf16>(&gpu, layout, tile, shape, TOL_BF16);
                check_offset_views::<f32>(&gpu, layout, tile, shape, TOL_BF16_F32OUT);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_rejects_bad_shapes() {
    let gpu = common::gpu();
    let a = gpu.zeros::<bf16>(6).unwrap();
    let b = gpu.zeros::<bf16>(6).unwrap();
    let mut c = gpu.zeros::<bf16>(4).unwrap();
    let is_shape = |r: Result<(), KernelError>| matches!(r, Err(KernelError::Shape { .. }));
    assert!(gemm(&gpu, Layout::NT, 2, 2, 3, &a, &b, &mut c, 1.0, 0.0).is_ok());
    assert!(is_shape(gemm(&gpu, Layout::NT, 2, 2, 4, &a, &b, &mut c, 1.0, 0.0)));
    assert!(is_shape(gemm(&gpu, Layout::NN, 3, 2, 3, &a, &b, &mut c, 1.0, 0.0)));
    assert!(is_shape(gemm(&gpu, Layout::TN, 2, 2, 3, &a, &b.slice(1..), &mut c, 1.0, 0.0)));
    assert!(is_shape(gemm(&gpu, Layout::NT, 0, 2, 3, &a, &b, &mut c, 1.0, 0.0)));
    assert!(is_shape(gemm(&gpu, Layout::NT, 2, 2, 0, &a, &b, &mut c, 1.0, 0.0)));
    assert!(is_shape(gemm(&gpu, Layout::NT, usize::MAX, 2, 3, &a, &b, &mut c, 1.0, 0.0)));
    let a32 = gpu.zeros::<f32>(6).unwrap();
    let b32 = gpu.zeros::<f32>(6).unwrap();
    assert!(is_shape(gemm(&gpu, Layout::NT, 2, 2, 3, &a32, &b32, &mut c, 1.0, 0.0)));
    gpu.sync().unwrap();
}

fn quantized(n: usize, k: usize, dtype: DType, double_quant: bool, seed: u64) -> Nf4Tensor {
    // Mostly small weights with a few large ones, and one all-zero block, as real layers have.
    let mut w = test_data(n * k, seed, 0.05);
    for (i, v) in w.iter_mut().enumerate() {
        if i % 97 == 5 {
            *v *= 20.0;
        }
    }
    for v in w.iter_mut().skip(64).take(64) {
        *v = 0.0;
    }
    let w: Vec<f32> = match dtype {
        DType::BF16 => w.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        DType::F16 => w.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
        _ => w,
    };
    Nf4Tensor::quantize(&w, Shape::new([n, k]).unwrap(), dtype, double_quant).unwrap()
}

fn dequant_mismatches<T: Float>(gpu: &Gpu, w: &Nf4Weight, want: &[u32], to_bits: impl Fn(T) -> u32) -> usize {
    let mut out = gpu.alloc::<T>(want.len()).unwrap();
    nf4_dequant(gpu, w, &mut out).unwrap();
    gpu.download(&out).unwrap().into_iter().zip(want).filter(|(g, w)| to_bits(*g) != **w).count()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn nf4_dequant_is_bit_exact() {
    let gpu = common::gpu();
    let mut failures = Vec::new();
    for (n, k) in [(3, 64), (7, 130), (3, 65), (7, 129), (40, 300)] {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            for dq in [false, true] {
                let t = quantized(n, k, dtype, dq, (n * k) as u64);
                let want = t.dequantize_rounded().unwrap();
                let w = Nf4Weight::upload(&gpu, &t).unwrap();
                assert_eq!((w.n(), w.k()), (n, k));
                assert_eq!(w.device_bytes(), t.storage_bytes());
                let bits32: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                let bits16: Vec<u32> = want.iter().map(|&v| u32::from(bf16::from_f32(v).to_bits())).collect();
                let e32 = dequant_mismatches::<f32>(&gpu, &w, &bits32, |v| v.to_bits());
                let e16 = dequant_mismatches::<bf16>(&gpu, &w, &bits16, |v| u32::from(v.to_bits()));
                if e32 + e16 > 0 {
                    failures.push(format!("({n}, {k}) {dtype} dq={dq}: {e32} f32 and {e16} bf16 elements differ"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn nf4_rejects_bad_input() {
    let gpu = common::gpu();
    let t = quantized(3, 64, DType::BF16, true, 1);
    let w = Nf4Weight::upload(&gpu, &t).unwrap();
    let mut short = gpu.zeros::<bf16>(3 * 64 - 1).unwrap();
    assert!(matches!(nf4_dequant(&gpu, &w, &mut short), Err(KernelError::Shape { .. })));
    let x = gpu.zeros::<bf16>(2 * 64).unwrap();
    let mut y = gpu.zeros::<bf16>(2 * 3).unwrap();
    assert!(nf4_matmul_nt(&gpu, &x, &w, &mut y, 2, 1.0, 0.0).is_ok());
    assert!(matches!(nf4_matmul_nt(&gpu, &x, &w, &mut y, 3, 1.0, 0.0), Err(KernelError::Shape { .. })));
    assert!(matches!(nf4_matmul_nn(&gpu, &x, &w, &mut y, 2, 1.0, 0.0), Err(KernelError::Shape { .. })));
    let mut bad = t.clone();
    bad.packed.pop();
    assert!(matches!(Nf4Weight::upload(&gpu, &bad), Err(KernelError::Shape { .. })));
    let flat = Nf4Tensor::quantize(&[1.0; 64], Shape::new([64]).unwrap(), DType::BF16, false).unwrap();
    assert!(matches!(Nf4Weight::upload(&gpu, &flat), Err(KernelError::Shape { .. })));
}

fn check_nf4_matmul<T: Float>(gpu: &Gpu, m: usize, t: &Nf4Tensor, tol: f64) -> (f64, f64) {
    let (n, k) = (t.shape.dims()[0], t.shape.dims()[1]);
    let w = Nf4Weight::upload(gpu, t).unwrap();
    let (x, xr) = values::<T>(m * k, 31);
    let (dy, dyr) = values::<T>(m * n, 32);
    let want_y: Vec<f32> = nf4_gemm_fwd_ref(&xr, t, m).unwrap().iter().map(|&v| v as f32).collect();
    let want_dx: Vec<f32> = nf4_gemm_bwd_ref(&dyr, t, m).unwrap().iter().map(|&v| v as f32).collect();
    let (dxs, dys) = (gpu.upload(&x).unwrap(), gpu.upload(&dy).unwrap());
    let mut y = gpu.upload(&vec![T::from_f32(f32::NAN); m * n]).unwrap();
    nf4_matmul_nt(gpu, &dxs, &w, &mut y, m, 1.0, 0.0).unwrap();
    let mut dx = gpu.upload(&vec![T::from_f32(f32::NAN); m * k]).unwrap();
    nf4_matmul_nn(gpu, &dys, &w, &mut dx, m, 1.0, 0.0).unwrap();
    let got_y: Vec<f32> = gpu.download(&y).unwrap().into_iter().map(T::to_f32).collect();
    let got_dx: Vec<f32> = gpu.download(&dx).unwrap().into_iter().map(T::to_f32).collect();
    let (ey, edx) = (rel_err(&got_y, &want_y), rel_err(&got_dx, &want_dx));
    assert!(ey <= tol && edx <= tol, "m={m} ({n}, {k}): y {ey:e}, dx {edx:e}, tolerance {tol:e}");
    (ey, edx)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn nf4_matmul_matches_reference() {
    let gpu = common::gpu();
    for (m, n, k, dq) in [(1, 70, 130, true), (33, 64, 576, false), (300, 1000, 64, true), (5, 7, 129, true)] {
        let t = quantized(n, k, DType::BF16, dq, 3);
        check_nf4_matmul::<bf16>(&gpu, m, &t, TOL_BF16);
        check_nf4_matmul::<f32>(&gpu, m, &t, TOL_F32);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn self_test_passes() {
    let gpu = common::gpu();
    let checks = gemm::self_test(&gpu).unwrap();
    assert_eq!(checks.len(), 17);
    for c in &checks {
        println!("{:34} {:36} rel err {:.2e} (tol {:.0e})", c.kernel, c.shape, c.rel_err, c.tol);
    }
    let failed: Vec<_> = checks.iter().filter(|c| !c.passed()).map(|c| c.kernel).collect();
    assert!(failed.is_empty(), "{failed:?}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bench_rows() {
    let gpu = common::gpu();
    for r in gemm::bench(&gpu).unwrap() {
        let (rate, unit) = r.rate();
        println!("BENCH {:32} {:32} {:9.1} us {:8.1} {unit}", r.kernel, r.shape, r.seconds * 1e6, rate);
    }
}
