//! Parity of the GRIT kernels with `gristmill_core::linalg` (damped inverses, Jacobi, rank and
//! projectors) and with f64 sums (gram statistics, rank-space products, regularizer values);
//! determinism of the gram statistics; in-place products.
// The helpers below are test code too; a failed call should fail the test loudly.
#![allow(clippy::unwrap_used)]

mod common;

use gristmill_core::linalg;
use gristmill_kernels::bf16;
use gristmill_kernels::grit::{
    RankOp, RankRule, Side, Slot, SlotTable, damped_inverse_parity, eigh_parity, gram_parity, kfac_damped_inverse,
    kfac_gram, projector_parity, ragged_layout, rank_apply, rank_apply_in_place, rank_apply_parity, rank_projector,
    rank_quadratic_parity, tol,
};

const RANKS: [usize; 5] = [1, 5, 16, 17, 64];

#[test]
#[ignore = "needs a CUDA GPU"]
fn gram_matches_f64_and_is_deterministic() {
    let gpu = common::gpu();
    for r in RANKS {
        for m in [1usize, 63, 1000, 4099] {
            let (e, exact) = gram_parity::<f32>(&gpu, m, r).unwrap();
            let (eb, exact_b) = gram_parity::<bf16>(&gpu, m, r).unwrap();
            println!("kfac_gram M={m} r={r}: f32 {e:.2e}, bf16 {eb:.2e}");
            assert!(e <= tol::GRAM && eb <= tol::GRAM, "M={m} r={r}: {e:e} {eb:e}");
            assert!(exact && exact_b, "M={m} r={r}: not symmetric or not reproducible");
        }
    }
    // M beyond 128 tiles: blocks take several tiles each.
    let (e, exact) = gram_parity::<bf16>(&gpu, 16384 + 5, 16).unwrap();
    assert!(e <= tol::GRAM && exact, "M=16389: {e:e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn damped_inverse_climbs_the_ladder_like_the_reference() {
    let gpu = common::gpu();
    for r in RANKS {
        for s in [1usize, 3, 113] {
            for lambda in [1e-3f32, 1e-2] {
                let e = damped_inverse_parity(&gpu, s, r, lambda).unwrap();
                println!("kfac_damped_inverse S={s} r={r} λ={lambda}: {e:.2e}");
                assert!(e <= tol::INVERSE, "S={s} r={r} λ={lambda}: {e:e}");
            }
        }
    }
    // λ below the floor is raised to 1e-6, as in the reference (λ = 0 here).
    assert!(damped_inverse_parity(&gpu, 7, 4, 0.0).unwrap() <= tol::INVERSE);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn jacobi_matches_the_reference() {
    let gpu = common::gpu();
    for r in RANKS {
        for s in [1usize, 3, 113] {
            let (ew, ev, ok) = eigh_parity(&gpu, s, r).unwrap();
            println!("eigh_jacobi S={s} r={r}: values {ew:.2e}, vectors {ev:.2e}");
            assert!(ok, "S={s} r={r}: not converged");
            assert!(ew <= tol::EIGENVALUES, "S={s} r={r}: values {ew:e}");
            assert!(ev <= tol::EIGENVECTORS, "S={s} r={r}: vectors {ev:e}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn projectors_and_ranks_match_the_reference() {
    let gpu = common::gpu();
    for r in RANKS {
        for s in [1usize, 3, 113] {
            let rules = [
                RankRule::Fixed(8),
                RankRule::Fixed(0),
                RankRule::Energy { threshold: 0.99, min_rank: 4 },
                RankRule::Energy { threshold: 0.5, min_rank: 1 },
            ];
            for rule in &rules {
                let e = projector_parity(&gpu, s, r, rule, None).unwrap();
                assert!(e <= tol::PROJECTOR, "S={s} r={r} {rule:?}: {e:e}");
            }
            let given: Vec<i32> = (0..s as i32).map(|i| i % 70 - 3).collect();
            let dk = gpu.upload(&given).unwrap();
            let e = projector_parity(&gpu, s, r, &RankRule::Given(dk.as_view()), Some(&given)).unwrap();
            assert!(e <= tol::PROJECTOR, "S={s} r={r} given: {e:e}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rank_apply_matches_f64_in_and_out_of_place() {
    let gpu = common::gpu();
    for r in RANKS {
        for s in [1usize, 3, 11] {
            for side in [Side::A, Side::B, Side::Both] {
                let e = rank_apply_parity(&gpu, s, r, side).unwrap();
                assert!(e <= tol::APPLY, "S={s} r={r} {side:?}: {e:e}");
            }
            let e = rank_quadratic_parity(&gpu, s, r).unwrap();
            assert!(e <= tol::QUADRATIC, "S={s} r={r} quadratic: {e:e}");
        }
    }
}

/// Projecting twice with the same P changes nothing more (P² = P), in place; elements between
/// the slots are never touched.
#[test]
#[ignore = "needs a CUDA GPU"]
fn in_place_projection_is_idempotent_and_stays_in_its_slots() {
    let gpu = common::gpu();
    let (r, s) = (16usize, 5usize);
    let (layout, len) = ragged_layout(s, r);
    let table = SlotTable::new(&gpu, r, &layout).unwrap();
    let eig = gristmill_kernels::grit::eigh_cases(s, r);
    let da = gpu.upload(&eig).unwrap();
    let (mut w, mut v, mut info) =
        (gpu.zeros::<f32>(s * r).unwrap(), gpu.zeros::<f32>(s * r * r).unwrap(), gpu.zeros::<i32>(s).unwrap());
    gristmill_kernels::grit::eigh_jacobi(
        &gpu,
        &da,
        s,
        r,
        linalg::JACOBI_TOL_F32,
        linalg::JACOBI_MAX_SWEEPS,
        &mut w,
        &mut v,
        &mut info,
    )
    .unwrap();
    let (mut p, mut k) = (gpu.zeros::<f32>(s * r * r).unwrap(), gpu.zeros::<i32>(s).unwrap());
    rank_projector(&gpu, &w, &v, s, r, &RankRule::Fixed(6), &mut p, &mut k).unwrap();
    let x = gristmill_kernels::check::test_data(len, 3, 1.0);
    let mut buf = gpu.upload(&x).unwrap();
    let op = RankOp::left_right(p.as_view(), p.as_view());
    rank_apply_in_place(&gpu, &table, &mut buf, &op).unwrap();
    let once = gpu.download(&buf).unwrap();
    rank_apply_in_place(&gpu, &table, &mut buf, &op).unwrap();
    let twice = gpu.download(&buf).unwrap();
    let e = gristmill_kernels::check::rel_err(&twice, &once);
    assert!(e < 1e-5, "P·P·A ≠ P·A: {e:e}");
    let mut inside = vec![false; len];
    for sl in &layout {
        inside[sl.a_off..sl.a_off + r * sl.k].iter_mut().for_each(|b| *b = true);
        inside[sl.b_off..sl.b_off + sl.n * r].iter_mut().for_each(|b| *b = true);
    }
    for i in 0..len {
        if !inside[i] {
            assert_eq!(once[i].to_bits(), x[i].to_bits(), "element {i} outside the slots changed");
        }
    }
    // Out of place into a copy gives the same bits as in place.
    let src = gpu.upload(&x).unwrap();
    let mut dst = gpu.upload(&x).unwrap();
    rank_apply(&gpu, &table, &src, &mut dst, &op).unwrap();
    let out = gpu.download(&dst).unwrap();
    assert!(out.iter().zip(&once).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn grit_shape_errors() {
    let gpu = common::gpu();
    let (m, r) = (10usize, 4usize);
    let u = gpu.zeros::<f32>(m * r).unwrap();
    let w = gpu.zeros::<f32>(m).unwrap();
    let mut su = gpu.zeros::<f32>(r * r).unwrap();
    let mut sv = gpu.zeros::<f32>(r * r).unwrap();
    assert!(kfac_gram(&gpu, &u, &u, &w, m, r, &mut su, &mut sv).is_ok());
    assert!(kfac_gram(&gpu, &u, &u, &w, m + 1, r, &mut su, &mut sv).is_err());
    assert!(kfac_gram(&gpu, &u, &u.slice(1..), &w, m, r, &mut su, &mut sv).is_err());
    assert!(kfac_gram(&gpu, &u, &u, &w.slice(1..), m, r, &mut su, &mut sv).is_err());
    assert!(kfac_gram(&gpu, &u, &u, &w, m, r, &mut su.slice_mut(1..), &mut sv).is_err());
    let big = gpu.zeros::<f32>(65 * 65).unwrap();
    let mut out = gpu.zeros::<f32>(65 * 65).unwrap();
    let mut out2 = gpu.zeros::<f32>(65 * 65).unwrap();
    assert!(kfac_gram(&gpu, &big, &big, &w.slice(..1), 1, 65, &mut out, &mut out2).is_err());

    let s = 3usize;
    let sa = gpu.zeros::<f32>(s * r * r).unwrap();
    let n = gpu.zeros::<f32>(s).unwrap();
    let (mut ia, mut ig, mut lu) =
        (gpu.zeros::<f32>(s * r * r).unwrap(), gpu.zeros::<f32>(s * r * r).unwrap(), gpu.zeros::<f32>(s).unwrap());
    assert!(kfac_damped_inverse(&gpu, &sa, &sa, &n, 1.0, s, r, 1e-3, &mut ia, &mut ig, &mut lu).is_ok());
    assert!(kfac_damped_inverse(&gpu, &sa, &sa, &n, 1.0, s, r, f32::NAN, &mut ia, &mut ig, &mut lu).is_err());
    assert!(kfac_damped_inverse(&gpu, &sa, &sa, &n.slice(1..), 1.0, s, r, 1e-3, &mut ia, &mut ig, &mut lu).is_err());
    assert!(
        kfac_damped_inverse(&gpu, &sa, &sa, &n, 1.0, s, r, 1e-3, &mut ia, &mut ig, &mut lu.slice_mut(1..)).is_err()
    );
    assert!(kfac_damped_inverse(&gpu, &sa, &sa, &n, 1.0, s, 0, 1e-3, &mut ia, &mut ig, &mut lu).is_err());

    // Overlapping slots, zero widths and ranks out of range are refused before anything launches.
    let a = Slot { a_off: 0, b_off: 64, k: 16, n: 16 };
    assert!(SlotTable::new(&gpu, 4, &[a]).is_ok());
    assert!(SlotTable::new(&gpu, 4, &[Slot { b_off: 63, ..a }]).is_err());
    assert!(SlotTable::new(&gpu, 4, &[a, Slot { a_off: 128, b_off: 100, k: 1, n: 1 }]).is_err());
    assert!(SlotTable::new(&gpu, 4, &[Slot { k: 0, ..a }]).is_err());
    assert!(SlotTable::new(&gpu, 65, &[a]).is_err());
    let table = SlotTable::new(&gpu, 4, &[a]).unwrap();
    assert_eq!(table.min_len(), 128);
    let x = gpu.zeros::<f32>(127).unwrap();
    let mut y = gpu.zeros::<f32>(128).unwrap();
    let m = gpu.zeros::<f32>(16).unwrap();
    let short = gpu.zeros::<f32>(15).unwrap();
    assert!(rank_apply(&gpu, &table, &x, &mut y, &RankOp::left_right(m.as_view(), m.as_view())).is_err());
    assert!(rank_apply(&gpu, &table, &y.clone(), &mut y, &RankOp::left_right(short.as_view(), m.as_view())).is_err());
    assert!(rank_apply(&gpu, &table, &y.clone(), &mut y, &RankOp::left_right(m.as_view(), m.as_view())).is_ok());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn grit_self_test_and_bench() {
    let gpu = common::gpu();
    for c in gristmill_kernels::grit::self_test(&gpu).unwrap() {
        println!("self-test {} {}: rel_err {:.3e} tol {:.1e}", c.kernel, c.shape, c.rel_err, c.tol);
        assert!(c.passed(), "{c:?}");
    }
    for r in gristmill_kernels::grit::bench(&gpu).unwrap() {
        let (rate, unit) = r.rate();
        println!("bench {} {}: {:.1} µs, {rate:.0} {unit}", r.kernel, r.shape, r.seconds * 1e6);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sanitize_zeroes_non_finite_values_and_clamps() {
    use gristmill_kernels::grit;
    let gpu = common::gpu();
    for n in [1, 5, 1031, 70_001] {
        assert_eq!(grit::sanitize_parity(&gpu, n).unwrap(), 0.0, "n = {n}");
    }
}
