//! Parity of the fused NF4 kernels (tensor-core products, GEMV, LoRA) with their CPU references,
//! their shape checks, and (with GRISTMILL_NF4_PARITY naming the file scripts/bench-ref-nf4.py
//! writes on the GPU machine) bitsandbytes' own quantized bytes and output.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use gristmill_core::bnb::{RawTensor, from_bnb_tensors};
use gristmill_core::nf4::Nf4Tensor;
use gristmill_core::ops::nf4_gemm::{nf4_gemm_bwd_ref, nf4_gemm_fwd_ref};
use gristmill_core::{DType, Shape};
use gristmill_kernels::check::{rel_err, test_data};
use gristmill_kernels::nf4::{
    Dropout, GEMV_MAX_M, Lora, LoraGradsOut, Nf4Matrix, TOL_GEMM, TOL_GEMV_F32, TOL_LORA, lora_errs, nf4_gemm_bwd,
    nf4_gemm_fwd, nf4_gemm_fwd_tiled, nf4_gemv, nf4_lora_bwd, nf4_lora_fwd, test_weight,
};
use gristmill_kernels::{Float, Gpu, KernelError, bf16};
use std::borrow::Cow;

/// (M, N, K): M = 1, sizes ragged against the 256 × 128 tile, the 32-wide k-tile (K = 200 and 65
/// take the element-by-element path) and the 64-element quantization block, a long K, a wide N.
const SHAPES: [(usize, usize, usize); 5] =
    [(1, 64, 64), (3, 130, 200), (17, 576, 1536), (129, 1000, 65), (300, 4096, 576)];

/// (alpha, beta); beta = 0 runs against a NaN-filled output.
const SCALES: [(f32, f32); 3] = [(1.0, 0.0), (0.5, 0.0), (-1.5, 1.0)];

fn values<T: Float>(n: usize, seed: u64, scale: f32) -> (Vec<T>, Vec<f64>) {
    let t: Vec<T> = test_data(n, seed, scale).into_iter().map(T::from_f32).collect();
    let r = t.iter().map(|v| f64::from(v.to_f32())).collect();
    (t, r)
}

fn as_f32<T: Float>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// alpha · prod + beta · c0 (c0 ignored for beta = 0) as f32.
fn combine(prod: &[f64], c0: &[f64], alpha: f32, beta: f32) -> Vec<f32> {
    prod.iter()
        .zip(c0)
        .map(|(&p, &c)| (f64::from(alpha) * p + if beta == 0.0 { 0.0 } else { f64::from(beta) * c }) as f32)
        .collect()
}

/// The starting output: NaN for beta = 0 (must not be read), else test data.
fn start<T: Float>(n: usize, beta: f32, seed: u64) -> (Vec<T>, Vec<f64>) {
    if beta == 0.0 { (vec![T::from_f32(f32::NAN); n], vec![0.0; n]) } else { values::<T>(n, seed, 1.0) }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fwd {
    Tiled,
    Auto,
}

fn check_fwd(
    gpu: &Gpu,
    (m, n, k): (usize, usize, usize),
    dq: bool,
    (alpha, beta): (f32, f32),
    path: Fwd,
    seed: u64,
) -> f64 {
    let wq = test_weight(n, k, seed, dq).unwrap();
    let w = Nf4Matrix::upload(gpu, &wq).unwrap();
    let (x, xr) = values::<bf16>(m * k, seed + 1, 1.0);
    let (y0, yr) = start::<bf16>(m * n, beta, seed + 2);
    let want = combine(&nf4_gemm_fwd_ref(&xr, &wq, m).unwrap(), &yr, alpha, beta);
    let dx = gpu.upload(&x).unwrap();
    let mut dy = gpu.upload(&y0).unwrap();
    match path {
        Fwd::Tiled => nf4_gemm_fwd_tiled(gpu, &dx, &w, &mut dy, m, alpha, beta).unwrap(),
        Fwd::Auto => nf4_gemm_fwd(gpu, &dx, &w, &mut dy, m, alpha, beta).unwrap(),
    }
    rel_err(&as_f32(&gpu.download(&dy).unwrap()), &want)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn forward_matches_reference() {
    let gpu = common::gpu();
    let mut failures = Vec::new();
    let mut seed = 100;
    for (si, &shape) in SHAPES.iter().enumerate() {
        for dq in [true, false] {
            for path in [Fwd::Tiled, Fwd::Auto] {
                seed += 7;
                let ab = SCALES[(si + usize::from(dq) + 2 * usize::from(path == Fwd::Auto)) % SCALES.len()];
                let e = check_fwd(&gpu, shape, dq, ab, path, seed);
                println!("fwd {shape:?} double_quant={dq} {path:?} alpha,beta={ab:?}: {e:.2e}");
                if e.is_nan() || e > TOL_GEMM {
                    failures.push(format!("{shape:?} dq={dq} {path:?} {ab:?}: {e:.3e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "nf4_gemm_fwd off: {failures:#?}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn backward_matches_reference() {
    let gpu = common::gpu();
    let mut failures = Vec::new();
    let mut seed = 200;
    for (si, &(m, n, k)) in SHAPES.iter().enumerate() {
        for dq in [true, false] {
            seed += 7;
            let (alpha, beta) = SCALES[(si + usize::from(dq)) % SCALES.len()];
            let wq = test_weight(n, k, seed, dq).unwrap();
            let w = Nf4Matrix::upload(&gpu, &wq).unwrap();
            let (dy, dyr) = values::<bf16>(m * n, seed + 1, 1.0);
            let (dx0, dxr) = start::<bf16>(m * k, beta, seed + 2);
            let want = combine(&nf4_gemm_bwd_ref(&dyr, &wq, m).unwrap(), &dxr, alpha, beta);
            let ddy = gpu.upload(&dy).unwrap();
            let mut ddx = gpu.upload(&dx0).unwrap();
            nf4_gemm_bwd(&gpu, &ddy, &w, &mut ddx, m, alpha, beta).unwrap();
            let e = rel_err(&as_f32(&gpu.download(&ddx).unwrap()), &want);
            println!("bwd {:?} double_quant={dq} alpha,beta={:?}: {e:.2e}", (m, n, k), (alpha, beta));
            if e.is_nan() || e > TOL_GEMM {
                failures.push(format!("{:?} dq={dq}: {e:.3e}", (m, n, k)));
            }
        }
    }
    assert!(failures.is_empty(), "nf4_gemm_bwd off: {failures:#?}");
}

/// The GEMV for every M it takes, f32 and bf16, on K that take the fast path (multiples of 32)
/// and the element-by-element one, and with x at an odd offset (not 16-byte aligned).
fn gemv_sweep<T: Float>(tol: f64) {
    let gpu = common::gpu();
    let mut failures = Vec::new();
    let n = 70;
    for (ki, k) in [96usize, 4096, 200, 65, 1].into_iter().enumerate() {
        let wq = test_weight(n, k, 300 + ki as u64, ki % 2 == 0).unwrap();
        let w = Nf4Matrix::upload(&gpu, &wq).unwrap();
        for m in 1..=GEMV_MAX_M {
            let (alpha, beta) = SCALES[m % SCALES.len()];
            let (x, xr) = values::<T>(m * k + 1, 400 + m as u64, 1.0);
            let (y0, yr) = start::<T>(m * n, beta, 500 + m as u64);
            let misaligned = m % 4 == 3;
            let xr = if misaligned { &xr[1..] } else { &xr[..m * k] };
            let want = combine(&nf4_gemm_fwd_ref(xr, &wq, m).unwrap(), &yr, alpha, beta);
            let dx = gpu.upload(&x).unwrap();
            let mut dy = gpu.upload(&y0).unwrap();
            if misaligned {
                nf4_gemv(&gpu, &dx.slice(1..), &w, &mut dy, m, alpha, beta).unwrap();
            } else {
                nf4_gemv(&gpu, &dx.slice(..m * k), &w, &mut dy, m, alpha, beta).unwrap();
            }
            let e = rel_err(&as_f32(&gpu.download(&dy).unwrap()), &want);
            if e.is_nan() || e > tol {
                failures.push(format!("M={m} N={n} K={k} misaligned={misaligned}: {e:.3e}"));
            }
        }
    }
    assert!(failures.is_empty(), "nf4_gemv ({}) off: {failures:#?}", if T::IS_BF16 { "bf16" } else { "f32" });
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemv_f32_matches_reference() {
    gemv_sweep::<f32>(TOL_GEMV_F32);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemv_bf16_matches_reference() {
    gemv_sweep::<bf16>(TOL_GEMM);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn lora_forward_and_backward_match_reference() {
    let gpu = common::gpu();
    let mut failures = Vec::new();
    // Every rank instantiation (16, 32, 64) with ragged ranks, with and without dropout.
    let cases = [
        ((1, 64, 64), 1),
        ((3, 130, 200), 8),
        ((17, 576, 1536), 16),
        ((129, 1000, 65), 24),
        ((300, 512, 576), 64),
        ((70, 96, 4096), 40),
    ];
    for (ci, &((m, n, k), r)) in cases.iter().enumerate() {
        for dropout in [None, Some(Dropout { seed: 1000 + ci as u64, p: 0.2 })] {
            let lora = Lora { r, scale: if r == 64 { 0.5 } else { 2.0 }, dropout };
            let e = lora_errs(&gpu, m, n, k, &lora).unwrap();
            println!("lora {:?} r={r} dropout={}: {e:?}", (m, n, k), dropout.is_some());
            for (what, v) in [("y", e.y), ("u", e.u), ("dx", e.dx), ("da", e.da), ("db", e.db), ("v", e.v)] {
                if v.is_nan() || v > TOL_LORA {
                    failures.push(format!("{:?} r={r} dropout={}: {what} {v:.3e}", (m, n, k), dropout.is_some()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "fused LoRA off: {failures:#?}");
}

/// dx_beta = grad_beta = 1 add to what the outputs held.
#[test]
#[ignore = "needs a CUDA GPU"]
fn lora_backward_accumulates() {
    let gpu = common::gpu();
    let (m, n, k, r) = (33, 96, 128, 8);
    let w = Nf4Matrix::upload(&gpu, &test_weight(n, k, 600, true).unwrap()).unwrap();
    let up = |len: usize, seed: u64, scale: f32| gpu.upload(&values::<bf16>(len, seed, scale).0).unwrap();
    let (x, a, b, dy) = (up(m * k, 601, 1.0), up(r * k, 602, 0.1), up(n * r, 603, 0.1), up(m * n, 604, 1.0));
    let lora = Lora { r, scale: 2.0, dropout: Some(Dropout { seed: 9, p: 0.3 }) };
    let mut y = gpu.zeros::<bf16>(m * n).unwrap();
    let mut u = gpu.zeros::<bf16>(m * r).unwrap();
    nf4_lora_fwd(&gpu, &x, &w, &a, &b, &lora, &mut y, &mut u, m).unwrap();
    let run = |dx0: &[bf16], g0: f32, beta: f32| {
        let mut dx = gpu.upload(dx0).unwrap();
        let mut da = gpu.upload(&vec![g0; r * k]).unwrap();
        let mut db = gpu.upload(&vec![g0; n * r]).unwrap();
        let mut v = gpu.zeros::<bf16>(m * r).unwrap();
        let out = LoraGradsOut { dx: &mut dx, da: &mut da, db: &mut db, v: &mut v, dx_beta: beta, grad_beta: beta };
        nf4_lora_bwd(&gpu, &x, &w, &a, &b, &lora, &u, &dy, m, out).unwrap();
        (gpu.download(&dx).unwrap(), gpu.download(&da).unwrap(), gpu.download(&db).unwrap())
    };
    let (dx1, da1, db1) = run(&vec![bf16::from_f32(f32::NAN); m * k], f32::NAN, 0.0);
    let (dx2, da2, db2) = run(&vec![bf16::from_f32(0.25); m * k], 0.5, 1.0);
    for (i, (a, b)) in dx1.iter().zip(&dx2).enumerate() {
        // dx1 holds the new value rounded to bf16, dx2 the sum rounded once: they differ by the
        // roundings of the addends (2⁻⁹ of each), not of the (possibly cancelling) sum.
        let want = a.to_f32() + 0.25;
        let tol = (a.to_f32().abs() + 0.25) * 2f32.powi(-8);
        assert!((b.to_f32() - want).abs() <= tol, "dx[{i}]: {b} vs {want}");
    }
    for (a, b) in da1.iter().zip(&da2).chain(db1.iter().zip(&db2)) {
        assert!((b - (a + 0.5)).abs() <= 1e-5 * (1.0 + a.abs()), "{b} vs {a} + 0.5");
    }
}

fn shape_error<T: std::fmt::Debug>(r: Result<T, KernelError>) {
    match r {
        Err(KernelError::Shape { .. }) => {}
        other => panic!("expected a shape error, got {other:?}"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bad_shapes_are_refused() {
    let gpu = common::gpu();
    let (m, n, k, r) = (4, 64, 96, 8);
    let w = Nf4Matrix::upload(&gpu, &test_weight(n, k, 700, true).unwrap()).unwrap();
    let x = gpu.zeros::<bf16>(m * k).unwrap();
    let mut y = gpu.zeros::<bf16>(m * n).unwrap();
    shape_error(nf4_gemm_fwd(&gpu, &x.slice(1..), &w, &mut y, m, 1.0, 0.0));
    shape_error(nf4_gemm_fwd_tiled(&gpu, &x, &w, &mut y, m + 1, 1.0, 0.0));
    shape_error(nf4_gemm_fwd_tiled(&gpu, &x.slice(..0), &w, &mut y.slice_mut(..0), 0, 1.0, 0.0));
    let mut wrong = gpu.zeros::<bf16>(m * n).unwrap();
    shape_error(nf4_gemm_bwd(&gpu, &y, &w, &mut wrong, m, 1.0, 0.0));
    shape_error(nf4_gemv(&gpu, &x, &w, &mut y, 0, 1.0, 0.0));
    let x17 = gpu.zeros::<bf16>(17 * k).unwrap();
    let mut y17 = gpu.zeros::<bf16>(17 * n).unwrap();
    shape_error(nf4_gemv(&gpu, &x17, &w, &mut y17, 17, 1.0, 0.0));

    let a = gpu.zeros::<bf16>(r * k).unwrap();
    let b = gpu.zeros::<bf16>(n * r).unwrap();
    let mut u = gpu.zeros::<bf16>(m * r).unwrap();
    let ok = Lora { r, scale: 1.0, dropout: None };
    nf4_lora_fwd(&gpu, &x, &w, &a, &b, &ok, &mut y, &mut u, m).unwrap();
    for bad in [
        Lora { r: 0, ..ok },
        Lora { r: 65, ..ok },
        Lora { r: 9, ..ok },
        Lora { dropout: Some(Dropout { seed: 1, p: 1.0 }), ..ok },
        Lora { dropout: Some(Dropout { seed: 1, p: f32::NAN }), ..ok },
    ] {
        shape_error(nf4_lora_fwd(&gpu, &x, &w, &a, &b, &bad, &mut y, &mut u, m));
    }
    // A and B swapped.
    shape_error(nf4_lora_fwd(&gpu, &x, &w, &b, &a, &ok, &mut y, &mut u, m));
    let (mut dx, mut da, mut db, mut v) = (
        gpu.zeros::<bf16>(m * k).unwrap(),
        gpu.zeros::<f32>(r * k).unwrap(),
        gpu.zeros::<f32>(n * r).unwrap(),
        gpu.zeros::<bf16>(m * r).unwrap(),
    );
    let mut short = gpu.zeros::<f32>(r * k - 1).unwrap();
    let out = LoraGradsOut { dx: &mut dx, da: &mut short, db: &mut db, v: &mut v, dx_beta: 0.0, grad_beta: 0.0 };
    shape_error(nf4_lora_bwd(&gpu, &x, &w, &a, &b, &ok, &u, &y, m, out));
    let out = LoraGradsOut { dx: &mut dx, da: &mut da, db: &mut db, v: &mut v, dx_beta: 0.0, grad_beta: 0.0 };
    nf4_lora_bwd(&gpu, &x, &w, &a, &b, &ok, &u, &y, m, out).unwrap();

    // Weights the kernels do not take: f32-origin values, a non-power-of-two block, a 3-D shape.
    let vals = test_data(n * k, 1, 0.05);
    let f32w = Nf4Tensor::quantize(&vals, Shape::new([n, k]).unwrap(), DType::F32, true).unwrap();
    shape_error(Nf4Matrix::upload(&gpu, &f32w));
    let odd = Nf4Tensor::quantize_with_blocksize(&vals, Shape::new([n, k]).unwrap(), DType::BF16, 96, false).unwrap();
    shape_error(Nf4Matrix::upload(&gpu, &odd));
    let cube = Nf4Tensor::quantize(&vals, Shape::new([2, n / 2, k]).unwrap(), DType::BF16, true).unwrap();
    shape_error(Nf4Matrix::upload(&gpu, &cube));
}

// ---------------------------------------------------------------------------------------------
// bitsandbytes parity

/// A JSON value of a safetensors header.
#[derive(Debug)]
enum Json {
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
    Other,
}

fn parse_json(b: &[u8], i: &mut usize) -> Json {
    let ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    ws(i);
    match b[*i] {
        b'{' => {
            *i += 1;
            let mut kv = Vec::new();
            loop {
                ws(i);
                if b[*i] == b'}' {
                    *i += 1;
                    return Json::Obj(kv);
                }
                let Json::Str(key) = parse_json(b, i) else { panic!("object key at byte {i}") };
                ws(i);
                assert_eq!(b[*i], b':');
                *i += 1;
                kv.push((key, parse_json(b, i)));
                ws(i);
                if b[*i] == b',' {
                    *i += 1;
                }
            }
        }
        b'[' => {
            *i += 1;
            let mut v = Vec::new();
            loop {
                ws(i);
                if b[*i] == b']' {
                    *i += 1;
                    return Json::Arr(v);
                }
                v.push(parse_json(b, i));
                ws(i);
                if b[*i] == b',' {
                    *i += 1;
                }
            }
        }
        b'"' => {
            *i += 1;
            let start = *i;
            while b[*i] != b'"' {
                *i += if b[*i] == b'\\' { 2 } else { 1 };
            }
            *i += 1;
            Json::Str(String::from_utf8(b[start..*i - 1].to_vec()).unwrap())
        }
        c if c == b'-' || c.is_ascii_digit() => {
            let start = *i;
            while *i < b.len() && matches!(b[*i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                *i += 1;
            }
            Json::Num(std::str::from_utf8(&b[start..*i]).unwrap().parse().unwrap())
        }
        _ => {
            while *i < b.len() && b[*i].is_ascii_alphabetic() {
                *i += 1;
            }
            Json::Other
        }
    }
}

/// Every tensor of a safetensors file.
fn read_safetensors(bytes: &[u8]) -> Vec<RawTensor<'_>> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data = &bytes[8 + n..];
    let Json::Obj(entries) = parse_json(&bytes[8..8 + n], &mut 0) else { panic!("header is not an object") };
    let mut out = Vec::new();
    for (name, info) in entries {
        let Json::Obj(fields) = info else { continue };
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        let (Some(Json::Str(dtype)), Some(Json::Arr(shape)), Some(Json::Arr(offs))) =
            (get("dtype"), get("shape"), get("data_offsets"))
        else {
            continue;
        };
        let num = |v: &Json| match v {
            Json::Num(x) => *x as usize,
            other => panic!("not a number: {other:?}"),
        };
        let (s, e) = (num(&offs[0]), num(&offs[1]));
        out.push(RawTensor {
            name,
            dtype: DType::parse(dtype).unwrap(),
            shape: shape.iter().map(num).collect(),
            data: Cow::Borrowed(&data[s..e]),
        });
    }
    out
}

fn bf16_values(t: &RawTensor<'_>) -> Vec<bf16> {
    assert_eq!(t.dtype, DType::BF16, "{}", t.name);
    t.data.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect()
}

/// bitsandbytes quantized a weight (nf4, double-quantized scales, blocksize 64), dequantized it
/// and multiplied: our decoding of its bytes must equal its dequantized weight bit for bit, and
/// our products its output within the bf16 band.
#[test]
#[ignore = "needs a CUDA GPU"]
fn bitsandbytes_parity() {
    let Ok(path) = std::env::var("GRISTMILL_NF4_PARITY") else {
        println!("GRISTMILL_NF4_PARITY is not set (scripts/bench-ref-nf4.py --parity FILE writes the file): skipped");
        return;
    };
    let bytes = std::fs::read(&path).unwrap();
    let tensors = read_safetensors(&bytes);
    let find = |name: &str| tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"));
    let wq = from_bnb_tensors("w.weight", tensors.as_slice()).unwrap();
    let (n, k) = (wq.shape.dims()[0], wq.shape.dims()[1]);
    let deq = bf16_values(find("w_dequantized"));
    let ours = wq.dequantize_rounded().unwrap();
    let differ = ours.iter().zip(&deq).filter(|(a, b)| bf16::from_f32(**a).to_bits() != b.to_bits()).count();
    println!("bitsandbytes parity: W ({n}, {k}); dequantized values differing from bitsandbytes': {differ}");
    assert_eq!(differ, 0, "our decoding of bitsandbytes' bytes differs in {differ} of {} values", deq.len());

    let gpu = common::gpu();
    let w = Nf4Matrix::upload(&gpu, &wq).unwrap();
    let x = bf16_values(find("x"));
    let y_bnb = bf16_values(find("y"));
    let m = x.len() / k;
    assert_eq!(y_bnb.len(), m * n);
    let xr: Vec<f64> = x.iter().map(|v| f64::from(v.to_f32())).collect();
    let y_ref: Vec<f32> = nf4_gemm_fwd_ref(&xr, &wq, m).unwrap().into_iter().map(|v| v as f32).collect();
    let dx = gpu.upload(&x).unwrap();
    let mut dy = gpu.zeros::<bf16>(m * n).unwrap();
    nf4_gemm_fwd_tiled(&gpu, &dx, &w, &mut dy, m, 1.0, 0.0).unwrap();
    let got = as_f32(&gpu.download(&dy).unwrap());
    let bnb = as_f32(&y_bnb);
    let (e_bnb, e_ref, e_bnb_ref) = (rel_err(&got, &bnb), rel_err(&got, &y_ref), rel_err(&bnb, &y_ref));
    println!(
        "  tiled M={m}: vs bitsandbytes {e_bnb:.2e}, vs f64 reference {e_ref:.2e} (bitsandbytes vs reference {e_bnb_ref:.2e})"
    );
    // Decoding: the first rows through the GEMV.
    let md = 4.min(m);
    let mut dyd = gpu.zeros::<bf16>(md * n).unwrap();
    nf4_gemv(&gpu, &dx.slice(..md * k), &w, &mut dyd, md, 1.0, 0.0).unwrap();
    let e_gemv = rel_err(&as_f32(&gpu.download(&dyd).unwrap()), &bnb[..md * n]);
    println!("  GEMV M={md}: vs bitsandbytes {e_gemv:.2e}");
    // Two bf16 roundings of sums taken in different orders: the bf16 band, twice.
    let tol = 2.0 * TOL_GEMM;
    assert!(e_bnb <= tol && e_gemv <= tol && e_ref <= TOL_GEMM, "{e_bnb} {e_gemv} {e_ref}");
}
