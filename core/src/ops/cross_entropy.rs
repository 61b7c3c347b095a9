//! Softmax cross-entropy over the vocabulary, with an ignore index for masked targets
//! (prompt tokens, padding), as `torch.nn.functional.cross_entropy(..., ignore_index=-100)`.

use crate::error::{check_len, checked_product, invalid};
use crate::{Real, Result};
use alloc::vec::Vec;

/// The target value of rows that do not count, as in PyTorch and Hugging Face.
pub const IGNORE_INDEX: i64 = -100;

/// Result of the forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEntropy<T> {
    /// Σ over counted rows of lse − logit[target].
    pub loss_sum: T,
    /// Rows whose target is not the ignore index.
    pub n_counted: usize,
    /// lse: (N), log Σ exp(logits) of every row (ignored rows included), saved for the backward.
    pub lse: Vec<T>,
}

impl<T: Real> CrossEntropy<T> {
    /// The mean loss over counted rows; 0 when no row is counted. (PyTorch's mean reduction
    /// would give NaN there, 0/0; a batch whose targets are all masked should not poison the
    /// run, and its gradient is zero either way.)
    pub fn mean(&self) -> T {
        if self.n_counted == 0 { T::ZERO } else { self.loss_sum / T::from_usize(self.n_counted) }
    }
}

/// Validates the targets: every one is the ignore index or a class in [0, V).
fn check_targets(op: &'static str, targets: &[i64], v: usize, ignore_index: i64) -> Result<()> {
    for (row, &t) in targets.iter().enumerate() {
        if t != ignore_index && !(t >= 0 && (t as u64) < v as u64) {
            return Err(invalid(
                op,
                "targets",
                alloc::format!("targets[{row}] = {t} is neither {ignore_index} (ignored) nor in [0, {v})"),
            ));
        }
    }
    Ok(())
}

/// Checks the shared inputs of forward and backward.
fn check_inputs<T>(
    op: &'static str,
    logits: &[T],
    targets: &[i64],
    n: usize,
    v: usize,
    ignore_index: i64,
) -> Result<()> {
    // An empty vocabulary has no softmax (its log-sum-exp is −∞).
    if v == 0 {
        return Err(invalid(op, "v", "the vocabulary must be non-empty"));
    }
    check_len(op, "logits", logits.len(), checked_product(&[n, v])?)?;
    check_len(op, "targets", targets.len(), n)?;
    check_targets(op, targets, v, ignore_index)
}

/// Forward cross-entropy, summed over counted rows.
///
/// logits: (N, V)
/// targets: (N); `ignore_index` skips a row, any other value must be a class in [0, V)
/// returns loss_sum, n_counted and lse: (N)
///
/// The log-sum-exp is shifted by the row maximum so that logits of any magnitude are safe.
pub fn cross_entropy_fwd_ref<T: Real>(
    logits: &[T],
    targets: &[i64],
    n: usize,
    v: usize,
    ignore_index: i64,
) -> Result<CrossEntropy<T>> {
    check_inputs("cross_entropy_fwd_ref", logits, targets, n, v, ignore_index)?;
    let mut loss_sum = T::ZERO;
    let mut n_counted = 0;
    let mut lse = Vec::with_capacity(n);
    for (row, &t) in logits.chunks_exact(v).zip(targets) {
        let max = row.iter().fold(row[0], |m, &x| m.max(x));
        let sum: T = row.iter().map(|&x| (x - max).exp()).sum();
        let l = max + sum.ln();
        lse.push(l);
        if t != ignore_index {
            // check_inputs proved 0 <= t < V.
            loss_sum += l - row[t as usize];
            n_counted += 1;
        }
    }
    Ok(CrossEntropy { loss_sum, n_counted, lse })
}

/// Backward cross-entropy: dlogits = scale · (softmax(logits) − onehot(target)) on counted rows,
/// exactly 0 on ignored rows.
///
/// logits: (N, V)
/// targets: (N)
/// lse: (N), from the forward
/// returns dlogits: (N, V)
///
/// `scale` is dL/d(loss_sum): pass dloss for a summed loss, and dloss / n_counted for the mean
/// loss ([`CrossEntropy::mean`]); with gradient accumulation over micro-batches, divide by the
/// token count of the whole accumulated batch instead, so every token weighs the same.
pub fn cross_entropy_bwd_ref<T: Real>(
    logits: &[T],
    targets: &[i64],
    lse: &[T],
    n: usize,
    v: usize,
    ignore_index: i64,
    scale: T,
) -> Result<Vec<T>> {
    const OP: &str = "cross_entropy_bwd_ref";
    check_inputs(OP, logits, targets, n, v, ignore_index)?;
    check_len(OP, "lse", lse.len(), n)?;
    let mut d = alloc::vec![T::ZERO; logits.len()];
    for (((row, drow), &t), &l) in logits.chunks_exact(v).zip(d.chunks_exact_mut(v)).zip(targets).zip(lse) {
        if t == ignore_index {
            continue;
        }
        for (dj, &x) in drow.iter_mut().zip(row) {
            *dj = scale * (x - l).exp();
        }
        drow[t as usize] -= scale;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, numeric_grad, randn};

    #[test]
    fn hand_computed_forward_and_backward() {
        // Row 0: logits [0, 0, ln 2], target 2: lse = ln(1 + 1 + 2) = ln 4, loss = ln 4 − ln 2 = ln 2.
        // Row 1: logits [1000, 1000, 1000], target 0: lse = 1000 + ln 3, loss = ln 3 (a naive
        //        exp would overflow, even in f64).
        // Row 2: ignored.
        // loss_sum = ln 2 + ln 3 = ln 6 = 1.791759469228055, mean = ln 6 / 2 = 0.8958797346140275.
        let l2 = libm::log(2.0);
        let logits = [0.0, 0.0, l2, 1000.0, 1000.0, 1000.0, 5.0, -3.0, 0.5];
        let targets = [2, 0, IGNORE_INDEX];
        let ce = cross_entropy_fwd_ref(&logits, &targets, 3, 3, IGNORE_INDEX).unwrap();
        assert_eq!(ce.n_counted, 2);
        // Row 1 goes through lse ≈ 1003 and back, so only ~1e-13 absolute survives.
        assert_close("loss_sum", &[ce.loss_sum], &[1.791759469228055], 1e-12);
        assert_close("mean", &[ce.mean()], &[0.8958797346140275], 1e-12);
        assert_close("lse", &ce.lse[..2], &[libm::log(4.0), 1000.0 + libm::log(3.0)], 1e-15);
        // Softmax of row 0 is [1/4, 1/4, 1/2], of row 1 [1/3, 1/3, 1/3]; with scale 2:
        // row 0: 2·([1/4, 1/4, 1/2] − [0, 0, 1]) = [0.5, 0.5, −1]
        // row 1: 2·([1/3, 1/3, 1/3] − [1, 0, 0]) = [−4/3, 2/3, 2/3]; row 2: zeros.
        let d = cross_entropy_bwd_ref(&logits, &targets, &ce.lse, 3, 3, IGNORE_INDEX, 2.0).unwrap();
        let want = [0.5, 0.5, -1.0, -4.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0, 0.0, 0.0, 0.0];
        assert_close("dlogits", &d, &want, 1e-12);

        // The same in f32: the max shift keeps row 1 finite; lse ≈ 1001 holds only ~6e-5 of
        // absolute precision in f32, which bounds how well its loss can come back.
        let l32: Vec<f32> = logits.iter().map(|&x| x as f32).collect();
        let ce32 = cross_entropy_fwd_ref(&l32, &targets, 3, 3, IGNORE_INDEX).unwrap();
        assert!((ce32.loss_sum - 1.7917595).abs() < 1e-4, "{}", ce32.loss_sum);
    }

    #[test]
    fn nothing_counted_gives_zero_mean() {
        let ce = cross_entropy_fwd_ref(&[1.0f32, 2.0], &[IGNORE_INDEX], 1, 2, IGNORE_INDEX).unwrap();
        assert_eq!((ce.n_counted, ce.loss_sum, ce.mean()), (0, 0.0, 0.0));
        let empty = cross_entropy_fwd_ref::<f64>(&[], &[], 0, 5, IGNORE_INDEX).unwrap();
        assert_eq!(empty.mean(), 0.0);
    }

    #[test]
    fn backward_matches_finite_difference() {
        let mut rng = Rng::new(61);
        for (n, v) in [(1, 1), (1, 5), (3, 7), (7, 3), (13, 5), (5, 13)] {
            // About one row in three is ignored; the first row always counts.
            let targets: Vec<i64> = (0..n)
                .map(|i| if i > 0 && rng.below(3) == 0 { IGNORE_INDEX } else { rng.below(v as u64) as i64 })
                .collect();
            let logits = randn(&mut rng, n * v, 2.0);
            let scale = rng.normal();
            let ce = cross_entropy_fwd_ref(&logits, &targets, n, v, IGNORE_INDEX).unwrap();
            let d = cross_entropy_bwd_ref(&logits, &targets, &ce.lse, n, v, IGNORE_INDEX, scale).unwrap();
            let nd = numeric_grad(&logits, 1e-6, |x| {
                scale * cross_entropy_fwd_ref(x, &targets, n, v, IGNORE_INDEX).unwrap().loss_sum
            });
            assert_close(&alloc::format!("dlogits {n}x{v}"), &d, &nd, 1e-6);
            for (r, &t) in targets.iter().enumerate() {
                if t == IGNORE_INDEX {
                    assert!(d[r * v..(r + 1) * v].iter().all(|&g| g == 0.0), "ignored row {r}");
                }
            }

            // The mean loss: scale = 1 / n_counted.
            let k = ce.n_counted as f64;
            let dm = cross_entropy_bwd_ref(&logits, &targets, &ce.lse, n, v, IGNORE_INDEX, 1.0 / k).unwrap();
            let nm =
                numeric_grad(&logits, 1e-6, |x| cross_entropy_fwd_ref(x, &targets, n, v, IGNORE_INDEX).unwrap().mean());
            assert_close(&alloc::format!("dmean {n}x{v}"), &dm, &nm, 1e-6);
        }
    }

    #[test]
    fn a_custom_ignore_index_is_honoured() {
        // With ignore_index 0, class 0 cannot be a target and −100 becomes an ordinary bad value.
        let logits = [0.0f64, 1.0, 2.0, 3.0];
        let ce = cross_entropy_fwd_ref(&logits, &[0, 1], 2, 2, 0).unwrap();
        assert_eq!(ce.n_counted, 1);
        assert!(cross_entropy_fwd_ref(&logits, &[1, IGNORE_INDEX], 2, 2, 0).is_err());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = [0.0f64; 6];
        let ok = [0, 1];
        assert!(matches!(cross_entropy_fwd_ref(&x[..5], &ok, 2, 3, IGNORE_INDEX), Err(Error::Shape { .. })));
        assert!(matches!(cross_entropy_fwd_ref(&x, &ok[..1], 2, 3, IGNORE_INDEX), Err(Error::Shape { .. })));
        assert!(matches!(cross_entropy_fwd_ref::<f64>(&[], &[], 0, 0, IGNORE_INDEX), Err(Error::Invalid { .. })));
        for bad in [3, -1, -99, i64::MAX, i64::MIN] {
            let e = cross_entropy_fwd_ref(&x, &[0, bad], 2, 3, IGNORE_INDEX).unwrap_err();
            let msg = alloc::format!("{e}");
            assert!(msg.contains("targets[1]") && msg.contains(&alloc::format!("{bad}")), "{msg}");
        }
        assert!(matches!(cross_entropy_bwd_ref(&x, &ok, &x[..1], 2, 3, IGNORE_INDEX, 1.0), Err(Error::Shape { .. })));
        assert!(matches!(
            cross_entropy_bwd_ref(&x, &[0, 3], &x[..2], 2, 3, IGNORE_INDEX, 1.0),
            Err(Error::Invalid { .. })
        ));
    }
}
