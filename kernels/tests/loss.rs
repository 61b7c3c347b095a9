//! Parity of the cross-entropy kernels with `gristmill_core::ops::cross_entropy` (f64 reference
//! on the same, bf16-rounded where the kernel is bf16, logits).
// The helpers below are test code too; a failed call should fail the test loudly.
#![allow(clippy::unwrap_used)]

mod common;

use gristmill_kernels::bf16;
use gristmill_kernels::check::test_data;
use gristmill_kernels::loss::{CrossEntropyErrors, cross_entropy_fwd_bwd, cross_entropy_parity, test_targets, tol};
use gristmill_kernels::{Float, Gpu};

/// (N, V): one row, tiny rows (misaligned row starts for every dtype), ragged V, the SmolLM2 and
/// the Llama-3 vocabularies.
const SHAPES: &[(usize, usize)] = &[(1, 1), (3, 5), (7, 1000), (33, 49_152), (4, 128_256)];

fn check<T: Float>(what: &str, e: CrossEntropyErrors, grad: bool) {
    let (stats, grad_tol) = if T::IS_BF16 {
        (tol::CROSS_ENTROPY_BF16, tol::CROSS_ENTROPY_BF16_GRAD)
    } else {
        (tol::CROSS_ENTROPY_F32, tol::CROSS_ENTROPY_F32)
    };
    println!("{what}: {e:?}");
    assert!(e.loss <= stats, "{what}: loss {e:?}");
    assert!(e.loss_sum <= stats, "{what}: loss sum {e:?}");
    assert!(e.lse <= stats, "{what}: lse {e:?}");
    if grad {
        assert!(e.dlogits <= grad_tol, "{what}: dlogits {e:?}");
    } else {
        assert_eq!(e.dlogits, 0.0, "{what}: the forward changed the logits");
    }
}

fn parity<T: Float>(gpu: &Gpu, scale: f32) {
    for &(n, v) in SHAPES {
        // Every third row ignored (none when N = 1, so that the one row counts).
        let targets = test_targets(n, v, 3, n as u64 * 7 + v as u64);
        let logits = test_data(n * v, v as u64, scale);
        for grad in [None, Some(1.0 / n as f32), Some(-2.5)] {
            let what = format!("{} N={n} V={v} ±{scale} grad {grad:?}", if T::IS_BF16 { "bf16" } else { "f32" });
            let e = cross_entropy_parity::<T>(gpu, &logits, &targets, v, grad).unwrap();
            check::<T>(&what, e, grad.is_some());
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cross_entropy_f32_matches_reference() {
    let gpu = common::gpu();
    parity::<f32>(&gpu, 4.0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cross_entropy_bf16_matches_reference() {
    let gpu = common::gpu();
    parity::<bf16>(&gpu, 4.0);
}

/// Logits in ±80: exp(80) overflows neither the online sum nor the gradient.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cross_entropy_is_stable_for_large_logits() {
    let gpu = common::gpu();
    parity::<f32>(&gpu, 80.0);
    parity::<bf16>(&gpu, 80.0);
}

/// Rows of one value repeated (a flat softmax) and a single dominant logit.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cross_entropy_extreme_rows() {
    let gpu = common::gpu();
    let v = 1001;
    let mut logits = vec![3.0f32; 2 * v];
    logits[v + 17] = 90.0;
    let targets = [5, 17];
    for grad in [None, Some(1.0)] {
        check::<f32>(
            "flat/peaked f32",
            cross_entropy_parity::<f32>(&gpu, &logits, &targets, v, grad).unwrap(),
            grad.is_some(),
        );
        check::<bf16>(
            "flat/peaked bf16",
            cross_entropy_parity::<bf16>(&gpu, &logits, &targets, v, grad).unwrap(),
            grad.is_some(),
        );
    }
}

/// Targets outside [0, V) other than −100 (which the host should have refused) are ignored rows:
/// same loss, lse and gradient as −100, and nothing outside the buffers touched.
#[test]
#[ignore = "needs a CUDA GPU"]
fn out_of_range_targets_are_ignored() {
    let gpu = common::gpu();
    let (n, v) = (6, 300);
    let logits = test_data(n * v, 77, 5.0);
    let bad = [3, v as i32, -1, i32::MAX, i32::MIN, 299];
    let as_ignored: Vec<i32> = bad.iter().map(|&t| if (0..v as i32).contains(&t) { t } else { -100 }).collect();
    let run = |targets: &[i32]| {
        // A guard of 64 elements on each side of the logits.
        let mut buf = gpu.upload(&[vec![7.0f32; 64], logits.clone(), vec![7.0f32; 64]].concat()).unwrap();
        let t = gpu.upload(targets).unwrap();
        let (mut loss, mut lse) = (gpu.zeros::<f32>(n).unwrap(), gpu.zeros::<f32>(n).unwrap());
        cross_entropy_fwd_bwd(&gpu, &mut buf.slice_mut(64..64 + n * v), &t, &mut loss, &mut lse, n, v, Some(0.5))
            .unwrap();
        (gpu.download(&buf).unwrap(), gpu.download(&loss).unwrap(), gpu.download(&lse).unwrap())
    };
    let (got, want) = (run(&bad), run(&as_ignored));
    assert_eq!(got, want);
    assert!(got.0[..64].iter().chain(&got.0[64 + n * v..]).all(|&x| x == 7.0), "wrote outside the logits");
    assert!(got.0[64 + v..64 + 2 * v].iter().all(|&x| x.to_bits() == 0), "ignored row not zeroed");
}

/// Bad shapes are errors, not launches.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cross_entropy_shape_errors() {
    let gpu = common::gpu();
    let mut logits = gpu.zeros::<bf16>(12).unwrap();
    let t = gpu.zeros::<i32>(3).unwrap();
    let (mut loss, mut lse) = (gpu.zeros::<f32>(3).unwrap(), gpu.zeros::<f32>(3).unwrap());
    assert!(cross_entropy_fwd_bwd(&gpu, &mut logits, &t, &mut loss, &mut lse, 3, 4, None).is_ok());
    assert!(cross_entropy_fwd_bwd(&gpu, &mut logits, &t, &mut loss, &mut lse, 3, 5, None).is_err());
    assert!(cross_entropy_fwd_bwd(&gpu, &mut logits, &t, &mut loss, &mut lse, 4, 3, None).is_err());
    assert!(cross_entropy_fwd_bwd(&gpu, &mut logits, &t, &mut loss, &mut lse, 12, 0, None).is_err());
    assert!(cross_entropy_fwd_bwd(&gpu, &mut logits, &t, &mut loss.slice_mut(..2), &mut lse, 3, 4, None).is_err());
    assert!(cross_entropy_fwd_bwd(&gpu, &mut logits, &t, &mut loss, &mut lse.slice_mut(1..), 3, 4, None).is_err());
    assert!(cross_entropy_fwd_bwd(&gpu, &mut logits, &t, &mut loss, &mut lse, usize::MAX, 2, None).is_err());
    // N = 0 launches nothing and succeeds (views: the driver refuses 0-byte allocations).
    let r = cross_entropy_fwd_bwd(
        &gpu,
        &mut logits.slice_mut(0..0),
        &t.slice(0..0),
        &mut loss.slice_mut(0..0),
        &mut lse.slice_mut(0..0),
        0,
        7,
        Some(1.0),
    );
    assert!(r.is_ok(), "{r:?}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn loss_self_test_and_bench() {
    let gpu = common::gpu();
    for c in gristmill_kernels::loss::self_test(&gpu).unwrap() {
        println!("self-test {} {}: rel_err {:.3e} tol {:.1e}", c.kernel, c.shape, c.rel_err, c.tol);
        assert!(c.passed(), "{c:?}");
    }
    for r in gristmill_kernels::loss::bench(&gpu).unwrap() {
        let (rate, unit) = r.rate();
        println!("bench {} {}: {:.1} µs, {rate:.0} {unit}", r.kernel, r.shape, r.seconds * 1e6);
    }
}
