//! What `gristmill doctor` and `gristmill bench kernels` gather from every kernel family: a
//! self-test result against the CPU reference, and a benchmark row.

use crate::Gpu;
use crate::error::Result;
use cudarc::driver::CudaEvent;

/// One kernel's self-test on small shapes against its CPU reference.
#[derive(Debug, Clone)]
pub struct Check {
    /// Kernel symbol, e.g. `rmsnorm_fwd_bf16`.
    pub kernel: &'static str,
    /// The shape tested, for the report.
    pub shape: String,
    /// max |gpu − ref| / (max |ref| + tiny), the figure compared with `tol`.
    pub rel_err: f64,
    pub tol: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.rel_err.is_finite() && self.rel_err <= self.tol
    }
}

/// max |a − b| / max(max |b|, 1e-30): the error figure of every parity check.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let mut num = 0f64;
    let mut den = 0f64;
    for (&g, &w) in got.iter().zip(want) {
        let d = (f64::from(g) - f64::from(w)).abs();
        // NaN anywhere makes the check fail.
        if d.is_nan() {
            return f64::INFINITY;
        }
        num = num.max(d);
        den = den.max(f64::from(w).abs());
    }
    num / den.max(1e-30)
}

/// What a benchmark measured: a memory-bound kernel reports bytes moved, a compute-bound one FLOPs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Work {
    /// Bytes read plus written by one call.
    Bytes(f64),
    /// Floating-point operations of one call.
    Flops(f64),
}

/// One benchmark result.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub kernel: &'static str,
    pub shape: String,
    /// Median time of one call, in seconds.
    pub seconds: f64,
    pub work: Work,
}

impl BenchRow {
    /// GB/s or TFLOP/s, with its unit.
    pub fn rate(&self) -> (f64, &'static str) {
        match self.work {
            Work::Bytes(b) => (b / self.seconds / 1e9, "GB/s"),
            Work::Flops(f) => (f / self.seconds / 1e12, "TFLOP/s"),
        }
    }
}

/// Times `f` with CUDA events: `warmup` untimed calls, then `iters` samples; returns the median
/// time of one call in seconds.
///
/// A sample times several calls back to back (enough for about half a millisecond), as kernels
/// run inside a training step: one call of a 20 µs kernel between two events would mostly
/// measure the launch and the events themselves.
pub fn time_median(gpu: &Gpu, warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let (start, stop): (CudaEvent, CudaEvent) = (gpu.event()?, gpu.event()?);
    let mut sample = |reps: usize| -> Result<f64> {
        gpu.record(&start)?;
        for _ in 0..reps {
            f()?;
        }
        gpu.record(&stop)?;
        stop.synchronize()?;
        Ok(f64::from(start.elapsed_ms(&stop)?) / 1e3 / reps as f64)
    };
    let one = sample(1)?;
    let reps = ((SAMPLE_S / one.max(1e-7)).ceil() as usize).clamp(1, 200);
    let mut s = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        s.push(sample(reps)?);
    }
    s.sort_by(f64::total_cmp);
    Ok(s[s.len() / 2])
}

/// Length of one timing sample of [`time_median`], in seconds.
const SAMPLE_S: f64 = 5e-4;

/// Deterministic test data in [−scale, scale): a cheap hash of the index, so that every run and
/// the CPU reference see the same values.
pub fn test_data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let z = gristmill_core::rng::mix64(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}
