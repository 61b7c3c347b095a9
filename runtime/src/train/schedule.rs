//! Learning-rate schedules, exactly as transformers defines them.
//!
//! `get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup` (num_cycles 0.5) and
//! `get_constant_schedule_with_warmup` are `LambdaLR` multipliers of the 0-based scheduler step:
//! the k-th optimizer update (k = 0, 1, …) uses `base_lr · lambda(k)`. With warmup the first update
//! therefore runs at lr 0 — surprising, but it is what users compare loss curves against, so it is
//! kept. The arithmetic is done in f64 as Python does, and only the result is rounded to f32.

use super::config::{OptimSection, SchedulerKind};

/// The multiplier of the base learning rate at 0-based optimizer step `step`, for a run of `total`
/// optimizer steps of which the first `warmup` warm up.
pub fn lr_lambda(kind: SchedulerKind, step: usize, warmup: usize, total: usize) -> f64 {
    let (step_f, warmup_f, total_f) = (step as f64, warmup as f64, total as f64);
    if step < warmup {
        return step_f / warmup_f.max(1.0);
    }
    // Past `total` the linear one stays at 0 and the cosine one rises again, as in transformers.
    let after = (total_f - warmup_f).max(1.0);
    match kind {
        SchedulerKind::Constant => 1.0,
        SchedulerKind::Linear => ((total_f - step_f) / after).max(0.0),
        SchedulerKind::Cosine => {
            let progress = (step_f - warmup_f) / after;
            let num_cycles = 0.5;
            (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())).max(0.0)
        }
    }
}

/// The learning rate of the optimizer update at 0-based step `step`: `base_lr · lr_lambda(…)`.
pub fn lr_at(kind: SchedulerKind, step: usize, warmup: usize, total: usize, base_lr: f32) -> f32 {
    (f64::from(base_lr) * lr_lambda(kind, step, warmup, total)) as f32
}

/// The warmup length in optimizer steps for a run of `total` steps: `warmup_steps` when set, else
/// `ceil(warmup_ratio · total)` computed in f64 as transformers does (so 0.07 × 100 gives 8, as
/// there).
pub fn warmup_steps(cfg: &OptimSection, total: usize) -> usize {
    if cfg.warmup_steps > 0 { cfg.warmup_steps } else { (total as f64 * cfg.warmup_ratio).ceil() as usize }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn linear_with_warmup() {
        let l = |s| lr_lambda(SchedulerKind::Linear, s, 2, 10);
        close(l(0), 0.0);
        close(l(1), 0.5);
        close(l(2), 1.0);
        close(l(3), 7.0 / 8.0);
        close(l(6), 0.5);
        close(l(9), 1.0 / 8.0);
        close(l(10), 0.0);
        close(l(12), 0.0);
    }

    #[test]
    fn linear_without_warmup() {
        let l = |s| lr_lambda(SchedulerKind::Linear, s, 0, 4);
        close(l(0), 1.0);
        close(l(1), 0.75);
        close(l(3), 0.25);
        // total == warmup: the max(1, …) guard keeps it finite.
        close(lr_lambda(SchedulerKind::Linear, 3, 3, 3), 0.0);
        close(lr_lambda(SchedulerKind::Linear, 0, 0, 0), 0.0);
    }

    #[test]
    fn cosine_with_warmup() {
        let l = |s| lr_lambda(SchedulerKind::Cosine, s, 2, 10);
        close(l(0), 0.0);
        close(l(1), 0.5);
        close(l(2), 1.0);
        // progress 1/8: 0.5 (1 + cos(π/8))
        close(l(3), 0.5 * (1.0 + (std::f64::consts::PI / 8.0).cos()));
        close(l(4), 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2));
        close(l(6), 0.5);
        close(l(10), 0.0);
        // Past the end the half cosine turns back up, as transformers' does.
        close(l(14), 0.5);
    }

    #[test]
    fn constant_with_warmup() {
        let l = |s| lr_lambda(SchedulerKind::Constant, s, 4, 10);
        close(l(0), 0.0);
        close(l(1), 0.25);
        close(l(3), 0.75);
        close(l(4), 1.0);
        close(l(100), 1.0);
        close(lr_lambda(SchedulerKind::Constant, 0, 0, 10), 1.0);
    }

    #[test]
    fn lr_scales_the_base() {
        assert_eq!(lr_at(SchedulerKind::Linear, 0, 2, 10, 2e-4), 0.0);
        assert_eq!(lr_at(SchedulerKind::Linear, 1, 2, 10, 2e-4), 1e-4);
        assert_eq!(lr_at(SchedulerKind::Linear, 6, 2, 10, 2e-4), 1e-4);
        assert_eq!(lr_at(SchedulerKind::Constant, 5, 0, 10, 3e-5), 3e-5);
    }

    #[test]
    fn warmup_resolution() {
        let mut o = OptimSection::default();
        assert_eq!(warmup_steps(&o, 100), 0);
        o.warmup_ratio = 0.1;
        assert_eq!(warmup_steps(&o, 100), 10);
        assert_eq!(warmup_steps(&o, 95), 10, "9.5 rounds up");
        o.warmup_ratio = 0.07;
        assert_eq!(warmup_steps(&o, 100), 8, "100 × 0.07 is 7.000000000000001 in f64, as in Python");
        o.warmup_ratio = 0.0;
        o.warmup_steps = 5;
        assert_eq!(warmup_steps(&o, 100), 5);
    }
}
