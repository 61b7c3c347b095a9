//! Throughput of the CPU matrix products of `gristmill::cpu` on the SmolLM2-135M training shapes.
//!
//! `cargo run --release -p gristmill --example cpu_gemm_bench [-- THREADS]`
//!
//! M = 256 tokens; (N, K) = each projection's (out, in) and the lm_head. For every shape it times:
//! - nt:      y (M, N) = x (M, K) · Wᵀ, W (N, K)          (forward)
//! - nn:      dx (M, K) = dy (M, N) · W                  (input gradient)
//! - tn:      dW (N, K) = dyᵀ · x, dy (M, N), x (M, K)   (weight gradient; K of the product = M)
//! - nf4 nt / nf4 nn: the same with W in NF4 (bf16 origin, double quant), dequantized on the fly.
//!
//! Each figure is 2·M·N·K / (median time) after one warm-up run, in GFLOP/s. The plain-loop
//! reference of gristmill-core is timed on one small shape for scale: it is the spec, not a
//! contender.
//!
//! For comparison, the hand-written AVX2 dot-product kernel that `matmul_nt` / `nf4_matmul_nt` used
//! before gemm measured 25–28 GFLOP/s (nt) and 21–25 GFLOP/s (nf4 nt) on these shapes with 2
//! threads on the 2-core AVX-512 development VM; gemm runs at 70–150 there (shared, noisy cores).
//! gemm is built without its `x86-v4` feature, so it uses AVX2 kernels even where AVX-512 exists;
//! with `x86-v4` (run-time detected, safe elsewhere) the same binary measured about 1.5–2× faster.

use gristmill::cpu;
use gristmill_core::nf4::Nf4Tensor;
use gristmill_core::ops::matmul::{Trans, matmul_fwd_ref};
use gristmill_core::ops::nf4_gemm::nf4_gemm_fwd_ref;
use gristmill_core::rng::Rng;
use gristmill_core::{DType, Shape};
use std::error::Error;
use std::hint::black_box;
use std::time::Instant;

type BoxResult<T> = Result<T, Box<dyn Error>>;

/// Median seconds of `f` over up to 30 runs or about 1 s, after one warm-up run.
fn median_secs<E: Into<Box<dyn Error>>>(mut f: impl FnMut() -> Result<Vec<f32>, E>) -> BoxResult<f64> {
    black_box(f().map_err(Into::into)?);
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < 3 || (times.len() < 30 && start.elapsed().as_secs_f64() < 1.0) {
        let t = Instant::now();
        black_box(f().map_err(Into::into)?);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn gflops(m: usize, n: usize, k: usize, secs: f64) -> f64 {
    2.0 * (m * n * k) as f64 / secs / 1e9
}

fn randv(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn main() -> BoxResult<()> {
    if let Some(t) = std::env::args().nth(1) {
        cpu::set_threads(t.parse()?);
    }
    let mut rng = Rng::new(7);
    let m = 256;
    println!("gristmill::cpu products, {} thread(s), M = {m}, GFLOP/s (median)", cpu::threads());
    println!("{:>14} {:>8} {:>8} {:>8} {:>8} {:>8}", "(N, K)", "nt", "nn", "tn", "nf4 nt", "nf4 nn");
    for &(n, k) in &[(576usize, 576usize), (192, 576), (1536, 576), (576, 1536), (49152, 576)] {
        let x = randv(&mut rng, m * k);
        let w = randv(&mut rng, n * k);
        let dy = randv(&mut rng, m * n);
        let wq = Nf4Tensor::quantize(&w, Shape::new([n, k])?, DType::BF16, true)?;
        let nt = median_secs(|| cpu::matmul_nt(&x, &w, m, k, n))?;
        let nn = median_secs(|| cpu::matmul_nn(&dy, &w, m, n, k))?;
        let tn = median_secs(|| cpu::matmul_tn(&dy, &x, n, m, k))?;
        let qnt = median_secs(|| cpu::nf4_matmul_nt(&x, &wq, m))?;
        let qnn = median_secs(|| cpu::nf4_matmul_nn(&dy, &wq, m))?;
        println!(
            "{:>14} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            format!("({n}, {k})"),
            gflops(m, n, k, nt),
            gflops(m, n, k, nn),
            gflops(m, n, k, tn),
            gflops(m, n, k, qnt),
            gflops(m, n, k, qnn)
        );
    }

    // The references on a small shape (their plain loops would take minutes on the ones above).
    let (m, k, n) = (64, 576, 192);
    let x = randv(&mut rng, m * k);
    let w = randv(&mut rng, n * k);
    let wq = Nf4Tensor::quantize(&w, Shape::new([n, k])?, DType::BF16, true)?;
    let r = median_secs(|| matmul_fwd_ref(&x, &w, m, k, n, Trans::N, Trans::T))?;
    let rq = median_secs(|| nf4_gemm_fwd_ref(&x, &wq, m))?;
    let f = median_secs(|| cpu::matmul_nt(&x, &w, m, k, n))?;
    let fq = median_secs(|| cpu::nf4_matmul_nt(&x, &wq, m))?;
    println!("\nM = {m}, (N, K) = ({n}, {k}), GFLOP/s:");
    println!(
        "  matmul_fwd_ref (plain loop) {:>7.2}   cpu::matmul_nt     {:>7.1}",
        gflops(m, n, k, r),
        gflops(m, n, k, f)
    );
    println!(
        "  nf4_gemm_fwd_ref            {:>7.2}   cpu::nf4_matmul_nt {:>7.1}",
        gflops(m, n, k, rq),
        gflops(m, n, k, fq)
    );
    Ok(())
}
