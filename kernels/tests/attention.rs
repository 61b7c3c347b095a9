//! Parity of the attention kernels with the f64 reference of gristmill-core on awkward shapes:
//! T = 1, ragged T, GQA ratios 1/3/4/8, D = 2…256, packed segments, decoding against a cache
//! (short, and long enough for the forward to split the keys), and the shape errors. bf16 at
//! D = 64 and 128 runs the flash kernels (the forward from 17 queries on); their own cases cover
//! every tile edge, and `sdpa_parity` compares them with PyTorch's SDPA when
//! GRISTMILL_SDPA_PARITY names a file from `scripts/bench-ref-attention.py --parity`.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use gristmill_core::ops::attention::{AttnShape, attention_bwd_ref, attention_fwd_ref};
use gristmill_kernels::attention::{attention_bwd, attention_fwd};
use gristmill_kernels::check::{rel_err, test_data};
use gristmill_kernels::{CudaSlice, Float, Gpu, KernelError, bf16};

/// Max error over max |reference|, per output and dtype (measured on an H200: f32 errors are a
/// few 1e-7, up to 5e-6 for o when the softmax is nearly one-hot).
const O_F32: f64 = 2e-5;
const LSE_F32: f64 = 1e-5;
const GRAD_F32: f64 = 2e-5;
/// bf16: the reference sees the same bf16-rounded inputs, so what is left is the rounding of
/// o and of the gradients to bf16 on the way out (half an ulp, at most 2⁻⁸ ≈ 3.9e-3 of the
/// value) and, in the flash kernels, the rounding of P to bf16 before P·V, as FlashAttention
/// does. Loosened from 5e-3 for the latter (the flash kernels measure up to 3.2e-3 on an H200).
const O_BF16: f64 = 6e-3;
/// lse is written in f32 even for bf16 inputs.
const LSE_BF16: f64 = 1e-5;
/// Gradients: the same output rounding, over sums in a different order than the reference, and
/// in the flash kernels P and dS rounded to bf16 before their products. Loosened from 6e-3 for
/// the latter (up to 4.8e-3 measured on an H200).
const GRAD_BF16: f64 = 1e-2;

fn shape(b: usize, tq: usize, tk: usize, h: usize, hkv: usize, d: usize) -> AttnShape {
    AttnShape { b, tq, tk, h, hkv, d }
}

fn upload<T: Float>(gpu: &Gpu, x: &[f64]) -> CudaSlice<T> {
    gpu.upload(&x.iter().map(|&y| T::from_f32(y as f32)).collect::<Vec<T>>()).unwrap()
}

fn download<T: Float>(gpu: &Gpu, x: &CudaSlice<T>) -> Vec<f32> {
    gpu.download(x).unwrap().into_iter().map(T::to_f32).collect()
}

/// Test data rounded through T, as f64.
fn data<T: Float>(n: usize, seed: u64, scale: f32) -> Vec<f64> {
    test_data(n, seed, scale).into_iter().map(|x| f64::from(T::from_f32(x).to_f32())).collect()
}

/// `rel_err` against the reference, or the largest |got| where the reference is exactly zero
/// (with a single key P = 1, so dq and dk vanish; the kernels leave f32 rounding residue there).
fn error(got: &[f32], want: &[f64]) -> f64 {
    if want.iter().all(|&w| w == 0.0) {
        // NaN must fail: f64::max would skip it.
        return got.iter().map(|&g| f64::from(g).abs()).fold(0.0, |m, g| if g.is_nan() || g > m { g } else { m });
    }
    rel_err(got, &want.iter().map(|&y| y as f32).collect::<Vec<f32>>())
}

/// Forward and backward of one case on the GPU against the f64 reference of the same inputs.
/// `q_scale` is the range of q (larger: peakier softmax).
fn case<T: Float>(gpu: &Gpu, s: AttnShape, segments: Option<&[u32]>, seed: u64, q_scale: f32) {
    let (tol_o, tol_lse, tol_grad) =
        if T::IS_BF16 { (O_BF16, LSE_BF16, GRAD_BF16) } else { (O_F32, LSE_F32, GRAD_F32) };
    let (nq, nkv) = (s.q_len().unwrap(), s.kv_len().unwrap());
    let q = data::<T>(nq, seed, q_scale);
    let k = data::<T>(nkv, seed + 1, 2.0);
    let v = data::<T>(nkv, seed + 2, 1.0);
    let d_o = data::<T>(nq, seed + 3, 1.0);
    let scale = 1.0 / (s.d as f32).sqrt();

    let (gq, gk, gv, gdo) = (upload::<T>(gpu, &q), upload::<T>(gpu, &k), upload::<T>(gpu, &v), upload::<T>(gpu, &d_o));
    let seg = segments.map(|sg| gpu.upload(sg).unwrap());
    let mut o = gpu.zeros::<T>(nq).unwrap();
    let mut lse = gpu.zeros::<f32>(s.lse_len().unwrap()).unwrap();
    attention_fwd(gpu, &gq, &gk, &gv, &mut o, &mut lse, &s, scale, seg.as_ref()).unwrap();
    let (mut dq, mut dk, mut dv) =
        (gpu.zeros::<T>(nq).unwrap(), gpu.zeros::<T>(nkv).unwrap(), gpu.zeros::<T>(nkv).unwrap());
    attention_bwd(gpu, &gq, &gk, &gv, &o, &lse, &gdo, &mut dq, &mut dk, &mut dv, &s, scale, seg.as_ref()).unwrap();

    let (o_gpu, lse_gpu) = (download(gpu, &o), gpu.download(&lse).unwrap());
    let (o_ref, lse_ref) = attention_fwd_ref(&q, &k, &v, &s, f64::from(scale), segments).unwrap();
    // The backward reference starts from the forward the GPU computed, as the kernels do.
    let o64: Vec<f64> = o_gpu.iter().map(|&x| f64::from(x)).collect();
    let lse64: Vec<f64> = lse_gpu.iter().map(|&x| f64::from(x)).collect();
    let (dq_ref, dk_ref, dv_ref) =
        attention_bwd_ref(&q, &k, &v, &o64, &lse64, &d_o, &s, f64::from(scale), segments).unwrap();

    let errs = [
        ("o", error(&o_gpu, &o_ref), tol_o),
        ("lse", error(&lse_gpu, &lse_ref), tol_lse),
        ("dq", error(&download(gpu, &dq), &dq_ref), tol_grad),
        ("dk", error(&download(gpu, &dk), &dk_ref), tol_grad),
        ("dv", error(&download(gpu, &dv), &dv_ref), tol_grad),
    ];
    let dtype = if T::IS_BF16 { "bf16" } else { "f32" };
    let report: Vec<String> = errs.iter().map(|(w, e, _)| format!("{w} {e:.2e}")).collect();
    println!("{dtype} {s:?} seg={}: {}", segments.is_some(), report.join(", "));
    for (what, err, tol) in errs {
        assert!(err <= tol, "{dtype} {s:?}: {what} error {err:.3e} > {tol:.1e}");
    }
}

fn both(s: AttnShape, segments: Option<&[u32]>, seed: u64) {
    let gpu = common::gpu();
    case::<f32>(&gpu, s, segments, seed, 2.0);
    case::<bf16>(&gpu, s, segments, seed, 2.0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn single_token() {
    both(shape(2, 1, 1, 4, 2, 64), None, 1);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn ragged_t37_smollm2_heads() {
    // SmolLM2: 9 query heads over 3 KV heads, D = 64.
    both(shape(1, 37, 37, 9, 3, 64), None, 2);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gqa_8_to_1_d128() {
    both(shape(2, 37, 37, 8, 1, 128), None, 3);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn mha_ratio_1() {
    both(shape(1, 50, 50, 4, 4, 128), None, 4);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gqa_4_to_1_d80() {
    both(shape(2, 33, 33, 8, 2, 80), None, 5);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn head_dims_2_6_and_256() {
    both(shape(1, 19, 19, 3, 1, 2), None, 6);
    both(shape(2, 21, 21, 2, 2, 6), None, 7);
    // D = 256: the largest tiles, over 48 KiB of shared memory.
    both(shape(1, 40, 40, 2, 1, 256), None, 8);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn longer_sequence_splits_and_tiles() {
    // 300 rows: several key tiles, several query tiles per dk/dv block, and few enough blocks that
    // the forward splits the keys.
    both(shape(1, 300, 300, 4, 2, 128), None, 9);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn packed_segments() {
    // Row 0: three examples; row 1: two and padding with a segment id of its own; row 2: ids
    // that are not contiguous (the mask only compares ids).
    let t = 45;
    let mut seg = Vec::with_capacity(3 * t);
    seg.extend((0..t).map(|j| {
        if j < 12 {
            0
        } else if j < 30 {
            1
        } else {
            2
        }
    }));
    seg.extend((0..t).map(|j| {
        if j < 20 {
            4
        } else if j < 38 {
            5
        } else {
            99
        }
    }));
    seg.extend((0..t).map(|j| (j % 3) as u32));
    both(shape(3, t, t, 6, 2, 64), Some(&seg), 10);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_against_a_cache() {
    for tq in 1..=5 {
        both(shape(2, tq, 40, 8, 2, 128), None, 20 + tq as u64);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_against_a_long_cache_splits_the_keys() {
    both(shape(1, 1, 700, 4, 1, 64), None, 30);
    both(shape(1, 4, 700, 9, 3, 64), None, 31);
    // Segments with a split: row 1's cache holds an earlier example the queries must not see.
    let seg: Vec<u32> = (0..2 * 300).map(|j| if (300..450).contains(&j) { 1 } else { 2 }).collect();
    both(shape(2, 3, 300, 4, 2, 80), Some(&seg), 32);
}

/// Packed rows for the flash tests: row 0 two long examples (whole key tiles of one example,
/// which the kernels skip for the other's rows), row 1 three and padding, row 2 ids that are not
/// contiguous.
fn packed(b: usize, t: usize) -> Vec<u32> {
    let mut seg = Vec::with_capacity(b * t);
    for row in 0..b {
        seg.extend((0..t).map(|j| match row % 3 {
            0 => u32::from(j >= t * 9 / 20),
            1 => {
                if j < t / 4 {
                    7
                } else if j < t / 2 {
                    8
                } else if j < t * 7 / 8 {
                    9
                } else {
                    1000
                }
            }
            _ => (j % 3) as u32,
        }));
    }
    seg
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn flash_ragged_lengths_and_gqa_ratios() {
    let gpu = common::gpu();
    for d in [64, 128] {
        for (t, h, hkv) in [(1, 4, 4), (37, 9, 3), (129, 8, 2), (300, 8, 1)] {
            case::<bf16>(&gpu, shape(2, t, t, h, hkv, d), None, 100 + t as u64, 2.0);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn flash_packed_segments() {
    let gpu = common::gpu();
    for (t, d) in [(300, 64), (257, 128), (45, 64)] {
        let seg = packed(3, t);
        case::<bf16>(&gpu, shape(3, t, t, 8, 2, d), Some(&seg), 200 + t as u64, 2.0);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn flash_queries_after_a_cache() {
    // More than the decode threshold of queries against a longer cache: the causal edge shifts.
    let gpu = common::gpu();
    case::<bf16>(&gpu, shape(2, 40, 300, 8, 2, 128), None, 300, 2.0);
    case::<bf16>(&gpu, shape(1, 17, 200, 9, 3, 64), None, 301, 2.0);
    let seg: Vec<u32> = (0..2 * 300).map(|j| if (300..450).contains(&j) { 1 } else { 2 }).collect();
    case::<bf16>(&gpu, shape(2, 130, 300, 4, 4, 64), Some(&seg), 302, 2.0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn flash_views_off_a_16_byte_boundary_take_the_simt_path() {
    // A view starting 2 elements in: pair-aligned (allowed), not 16-byte aligned (no flash).
    let gpu = common::gpu();
    let s = shape(1, 40, 40, 4, 2, 64);
    let (nq, nkv) = (s.q_len().unwrap(), s.kv_len().unwrap());
    let big = upload::<bf16>(&gpu, &data::<bf16>(nq + 2, 400, 2.0));
    let q = big.slice(2..);
    let (k, v) =
        (upload::<bf16>(&gpu, &data::<bf16>(nkv, 401, 2.0)), upload::<bf16>(&gpu, &data::<bf16>(nkv, 402, 1.0)));
    let (mut o1, mut l1) = (gpu.zeros::<bf16>(nq).unwrap(), gpu.zeros::<f32>(s.lse_len().unwrap()).unwrap());
    attention_fwd(&gpu, &q, &k, &v, &mut o1, &mut l1, &s, 0.125, None).unwrap();
    let q2 = gpu.upload(&gpu.download(&q).unwrap()).unwrap();
    let (mut o2, mut l2) = (gpu.zeros::<bf16>(nq).unwrap(), gpu.zeros::<f32>(s.lse_len().unwrap()).unwrap());
    attention_fwd(&gpu, &q2, &k, &v, &mut o2, &mut l2, &s, 0.125, None).unwrap();
    let e = rel_err(&download(&gpu, &o1), &download(&gpu, &o2));
    assert!(e <= 2.0 * O_BF16, "SIMT and flash forward differ by {e:.2e}");
}

/// The tensor `name` of a safetensors file as f32 (bf16, f32 or i64 stored), with its shape.
fn safetensor(bytes: &[u8], name: &str) -> (Vec<f32>, Vec<usize>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let at = header.find(&format!("\"{name}\":")).unwrap_or_else(|| panic!("no tensor {name}"));
    let entry = &header[at..at + header[at..].find('}').unwrap()];
    let list = |key: &str| -> Vec<usize> {
        let i = entry.find(key).unwrap() + key.len();
        let j = i + entry[i..].find(']').unwrap();
        entry[i..j].split(',').filter(|x| !x.trim().is_empty()).map(|x| x.trim().parse().unwrap()).collect()
    };
    let dims = list("\"shape\":[");
    let offs = list("\"data_offsets\":[");
    let raw = &bytes[8 + n + offs[0]..8 + n + offs[1]];
    let vals = if entry.contains("\"BF16\"") {
        raw.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
    } else if entry.contains("\"F32\"") {
        raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    } else {
        raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect()
    };
    (vals, dims)
}

/// Ours against PyTorch's scaled_dot_product_attention (is_causal, enable_gqa, bf16) on the
/// cases `scripts/bench-ref-attention.py --parity FILE` wrote on the GPU machine.
#[test]
#[ignore = "needs a CUDA GPU"]
fn sdpa_parity() {
    let Ok(path) = std::env::var("GRISTMILL_SDPA_PARITY") else {
        println!("GRISTMILL_SDPA_PARITY is not set: nothing to compare");
        return;
    };
    let bytes = std::fs::read(&path).unwrap();
    let gpu = common::gpu();
    for c in 0.. {
        let key = format!("case{c}.");
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        if !std::str::from_utf8(&bytes[8..8 + header_len]).unwrap().contains(&format!("\"{key}shape\"")) {
            assert!(c > 0, "{path}: no cases");
            break;
        }
        let t = |n: &str| safetensor(&bytes, &format!("{key}{n}")).0;
        let dims: Vec<usize> = t("shape").into_iter().map(|x| x as usize).collect();
        let s = shape(dims[0], dims[1], dims[2], dims[3], dims[4], dims[5]);
        let up = |x: &[f32]| gpu.upload(&x.iter().map(|&y| bf16::from_f32(y)).collect::<Vec<_>>()).unwrap();
        let (q, k, v, d_o) = (up(&t("q")), up(&t("k")), up(&t("v")), up(&t("do")));
        let scale = 1.0 / (s.d as f32).sqrt();
        let mut o = gpu.zeros::<bf16>(s.q_len().unwrap()).unwrap();
        let mut lse = gpu.zeros::<f32>(s.lse_len().unwrap()).unwrap();
        attention_fwd(&gpu, &q, &k, &v, &mut o, &mut lse, &s, scale, None).unwrap();
        let (mut dq, mut dk, mut dv) = (
            gpu.zeros::<bf16>(s.q_len().unwrap()).unwrap(),
            gpu.zeros::<bf16>(s.kv_len().unwrap()).unwrap(),
            gpu.zeros::<bf16>(s.kv_len().unwrap()).unwrap(),
        );
        attention_bwd(&gpu, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv, &s, scale, None).unwrap();
        // Both sides are bf16 kernels with their own roundings: twice ours against the exact.
        let errs = [
            ("o", rel_err(&download(&gpu, &o), &t("o")), 2.0 * O_BF16),
            ("dq", rel_err(&download(&gpu, &dq), &t("dq")), 2.0 * GRAD_BF16),
            ("dk", rel_err(&download(&gpu, &dk), &t("dk")), 2.0 * GRAD_BF16),
            ("dv", rel_err(&download(&gpu, &dv), &t("dv")), 2.0 * GRAD_BF16),
        ];
        let report: Vec<String> = errs.iter().map(|(w, e, _)| format!("{w} {e:.2e}")).collect();
        println!("sdpa {s:?}: {}", report.join(", "));
        for (what, err, tol) in errs {
            assert!(err <= tol, "{s:?}: {what} differs from SDPA by {err:.3e} > {tol:.1e}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn large_scores_stay_accurate() {
    // q in [−16, 16): scores of several hundred, a softmax close to one-hot.
    let gpu = common::gpu();
    case::<f32>(&gpu, shape(1, 64, 64, 2, 1, 64), None, 40, 16.0);
    case::<bf16>(&gpu, shape(1, 64, 64, 2, 1, 64), None, 40, 16.0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn backward_is_deterministic() {
    let gpu = common::gpu();
    let s = shape(2, 70, 70, 8, 2, 64);
    let (nq, nkv) = (s.q_len().unwrap(), s.kv_len().unwrap());
    let g = |n, seed| upload::<bf16>(&gpu, &data::<bf16>(n, seed, 1.0));
    let (q, k, v, d_o) = (g(nq, 50), g(nkv, 51), g(nkv, 52), g(nq, 53));
    let mut o = gpu.zeros::<bf16>(nq).unwrap();
    let mut lse = gpu.zeros::<f32>(s.lse_len().unwrap()).unwrap();
    attention_fwd(&gpu, &q, &k, &v, &mut o, &mut lse, &s, 0.125, None).unwrap();
    let run = || {
        let (mut dq, mut dk, mut dv) = (gpu.zeros(nq).unwrap(), gpu.zeros(nkv).unwrap(), gpu.zeros(nkv).unwrap());
        attention_bwd::<bf16>(&gpu, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv, &s, 0.125, None).unwrap();
        [gpu.download(&dq).unwrap(), gpu.download(&dk).unwrap(), gpu.download(&dv).unwrap()]
    };
    let (a, b) = (run(), run());
    for (x, y) in a.iter().zip(&b) {
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bad_shapes_are_errors_not_launches() {
    let gpu = common::gpu();
    let is_shape = |r: gristmill_kernels::Result<()>, what: &str| {
        assert!(matches!(r, Err(KernelError::Shape { .. })), "{what}: {r:?}");
    };
    for (s, what) in [(shape(1, 4, 4, 2, 1, 300), "D = 300"), (shape(1, 4, 4, 6, 4, 64), "H = 6 over Hkv = 4")] {
        // Buffers sized for the shape as given, so only the shape rule can refuse it.
        let (nq, nkv, nl) = (s.b * s.tq * s.h * s.d, s.b * s.tk * s.hkv * s.d, s.b * s.h * s.tq);
        let (q, k, v) = (gpu.zeros::<f32>(nq).unwrap(), gpu.zeros::<f32>(nkv).unwrap(), gpu.zeros::<f32>(nkv).unwrap());
        let (mut o, mut lse) = (gpu.zeros::<f32>(nq).unwrap(), gpu.zeros::<f32>(nl).unwrap());
        is_shape(attention_fwd(&gpu, &q, &k, &v, &mut o, &mut lse, &s, 1.0, None), what);
        let (mut dq, mut dk, mut dv) =
            (gpu.zeros::<f32>(nq).unwrap(), gpu.zeros(nkv).unwrap(), gpu.zeros(nkv).unwrap());
        is_shape(attention_bwd(&gpu, &q, &k, &v, &o, &lse, &o, &mut dq, &mut dk, &mut dv, &s, 1.0, None), what);
    }

    // A buffer of the wrong length, segments of the wrong length, a view at an odd element.
    let s = shape(1, 4, 4, 2, 1, 64);
    let (nq, nkv, nl) = (s.b * s.tq * s.h * s.d, s.b * s.tk * s.hkv * s.d, s.b * s.h * s.tq);
    let (q, k, v) =
        (gpu.zeros::<bf16>(nq).unwrap(), gpu.zeros::<bf16>(nkv).unwrap(), gpu.zeros::<bf16>(nkv + 1).unwrap());
    let (mut o, mut lse) = (gpu.zeros::<bf16>(nq).unwrap(), gpu.zeros::<f32>(nl).unwrap());
    is_shape(attention_fwd(&gpu, &q, &k, &v, &mut o, &mut lse, &s, 1.0, None), "v too long");
    let v_odd = v.slice(1..);
    is_shape(attention_fwd(&gpu, &q, &k, &v_odd, &mut o, &mut lse, &s, 1.0, None), "v at an odd element");
    let v_ok = v.slice(..nkv);
    let seg = gpu.upload(&[0u32; 3]).unwrap();
    is_shape(attention_fwd(&gpu, &q, &k, &v_ok, &mut o, &mut lse, &s, 1.0, Some(&seg)), "segments");
    assert!(attention_fwd(&gpu, &q, &k, &v_ok, &mut o, &mut lse, &s, 1.0, None).is_ok());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn self_test_passes() {
    let gpu = common::gpu();
    let checks = gristmill_kernels::attention::self_test(&gpu).unwrap();
    assert_eq!(checks.len(), 13);
    for c in &checks {
        println!("{} {}: {:.2e} (tol {:.0e})", c.kernel, c.shape, c.rel_err, c.tol);
        assert!(c.passed(), "{c:?}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bench_runs() {
    let gpu = common::gpu();
    for r in gristmill_kernels::attention::bench(&gpu).unwrap() {
        let (rate, unit) = r.rate();
        println!("BENCH {} {}: {:.3} ms, {rate:.2} {unit}", r.kernel, r.shape, r.seconds * 1e3);
    }
}
