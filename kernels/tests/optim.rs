//! Parity of the optimizer kernels with `gristmill_core::ops::adamw` (AdamW bit-exact) and with
//! f64 sums (Σ x², L2 norm).
// The helpers below are test code too; a failed call should fail the test loudly.
#![allow(clippy::unwrap_used)]

mod common;

use gristmill_core::ops::adamw::AdamWConfig;
use gristmill_kernels::optim::{
    adamw_parity, adamw_step, l2_norm, scale, scale_parity, sum_squares, sum_squares_parity, tol,
};

#[test]
#[ignore = "needs a CUDA GPU"]
fn adamw_is_bit_exact() {
    let gpu = common::gpu();
    for n in [1, 1000, 100_003] {
        for wd in [0.0, 0.01] {
            for grad_mul in [1.0, 0.37] {
                // Offset 1 puts the buffers off their 16-byte alignment: the scalar path.
                for offset in [0, 1] {
                    let cfg = AdamWConfig { weight_decay: wd, ..AdamWConfig::default() };
                    let e = adamw_parity(&gpu, n, offset, 3, &cfg, grad_mul).unwrap();
                    assert_eq!(e, tol::EXACT, "n={n} wd={wd} grad_mul={grad_mul} offset={offset}: rel_err {e:e}");
                }
            }
        }
    }
    // torch's other lerp branch (1 − β1 ≥ 0.5).
    let cfg = AdamWConfig { lr: 3e-4, beta1: 0.25, beta2: 0.95, eps: 1e-6, weight_decay: 0.1 };
    assert_eq!(adamw_parity(&gpu, 1000, 0, 3, &cfg, 1.0).unwrap(), tol::EXACT);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sum_squares_and_norm_match_f64() {
    let gpu = common::gpu();
    for n in [1, 1023, (1 << 20) + 7] {
        for offset in [0, 1, 3] {
            let (ss, norm) = sum_squares_parity(&gpu, n, offset).unwrap();
            println!("n={n} offset={offset}: sum_squares {ss:.2e}, l2_norm {norm:.2e}");
            assert!(
                ss <= tol::SUM_SQUARES_F32 && norm <= tol::SUM_SQUARES_F32,
                "n={n} offset={offset}: {ss:e} {norm:e}"
            );
        }
    }
    // Deterministic: the same bits every time.
    let x = gpu.upload(&gristmill_kernels::check::test_data(3_000_001, 4, 1.0)).unwrap();
    let first = l2_norm(&gpu, &x).unwrap();
    for _ in 0..5 {
        assert_eq!(l2_norm(&gpu, &x).unwrap().to_bits(), first.to_bits());
    }
    // Empty: 0 (a view: the driver refuses 0-byte allocations).
    assert_eq!(l2_norm(&gpu, &x.slice(0..0)).unwrap(), 0.0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn scale_is_exact() {
    let gpu = common::gpu();
    for n in [1, 3, 1023, 100_003] {
        for offset in [0, 1, 2] {
            assert_eq!(scale_parity(&gpu, n, offset, 0.37).unwrap(), tol::EXACT, "n={n} offset={offset}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn optim_shape_errors() {
    let gpu = common::gpu();
    let cfg = AdamWConfig::default();
    let (mut p, g, mut m, mut v) = (
        gpu.zeros::<f32>(8).unwrap(),
        gpu.zeros::<f32>(8).unwrap(),
        gpu.zeros::<f32>(8).unwrap(),
        gpu.zeros::<f32>(8).unwrap(),
    );
    assert!(adamw_step(&gpu, &mut p, &g, &mut m, &mut v, 1, &cfg, 1.0).is_ok());
    assert!(adamw_step(&gpu, &mut p, &g, &mut m, &mut v, 0, &cfg, 1.0).is_err());
    assert!(adamw_step(&gpu, &mut p, &g.slice(1..), &mut m, &mut v, 1, &cfg, 1.0).is_err());
    assert!(adamw_step(&gpu, &mut p, &g, &mut m.slice_mut(..7), &mut v, 1, &cfg, 1.0).is_err());
    assert!(adamw_step(&gpu, &mut p, &g, &mut m, &mut v.slice_mut(2..), 1, &cfg, 1.0).is_err());
    let bad = AdamWConfig { beta1: 1.0, ..cfg };
    assert!(adamw_step(&gpu, &mut p, &g, &mut m, &mut v, 1, &bad, 1.0).is_err());
    let mut out2 = gpu.zeros::<f32>(2).unwrap();
    assert!(sum_squares(&gpu, &g, &mut out2).is_err());
    assert!(scale(&gpu, &mut p.slice_mut(0..0), 2.0).is_ok());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn optim_self_test_and_bench() {
    let gpu = common::gpu();
    for c in gristmill_kernels::optim::self_test(&gpu).unwrap() {
        println!("self-test {} {}: rel_err {:.3e} tol {:.1e}", c.kernel, c.shape, c.rel_err, c.tol);
        assert!(c.passed(), "{c:?}");
    }
    for r in gristmill_kernels::optim::bench(&gpu).unwrap() {
        let (rate, unit) = r.rate();
        println!("bench {} {}: {:.1} µs, {rate:.0} {unit}", r.kernel, r.shape, r.seconds * 1e6);
    }
}
