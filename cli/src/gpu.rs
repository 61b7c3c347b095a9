//! `gristmill doctor` and `gristmill bench kernels`: the runtime gathers the reports
//! (`gristmill::doctor`), this prints them. Without a GPU both say so and succeed.

use anyhow::{Result, bail};
use clap::Subcommand;

/// What `gristmill bench` measures.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Every GPU kernel at a realistic size, after the device-copy bandwidth it is compared with.
    Kernels {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The NF4 kernels at training and decoding sizes (TFLOP/s, GB/s of weight read) beside the
    /// dequantize-then-GEMM stand-in; with --reference, each row's speed against bitsandbytes and
    /// cuBLAS on the same card.
    Nf4 {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// The reference stack's figures (`scripts/bench-ref-nf4.py --out FILE` on the GPU machine).
        #[arg(long)]
        reference: Option<std::path::PathBuf>,
    },
    /// Attention forward and forward + backward at training shapes (TFLOP/s of the causal
    /// products, the backward counted as 2.5 forwards) and decoding (GB/s); with --reference,
    /// each row's speed against PyTorch's scaled_dot_product_attention on the same card.
    Attention {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// SDPA's figures (`scripts/bench-ref-attention.py --out FILE` on the GPU machine).
        #[arg(long)]
        reference: Option<std::path::PathBuf>,
    },
}

pub fn doctor_cmd(json: bool) -> Result<()> {
    let r = gristmill::doctor::doctor();
    if json {
        println!("{}", serde_json::to_string_pretty(&r.to_json())?);
    } else {
        print!("{r}");
    }
    if !r.ok() {
        bail!("doctor: {} failure(s)", r.failures());
    }
    Ok(())
}

pub fn bench_cmd(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Kernels { json } => {
            let r = gristmill::doctor::bench_kernels();
            if json {
                println!("{}", serde_json::to_string_pretty(&r.to_json())?);
            } else {
                print!("{r}");
            }
            if !r.ok() {
                bail!("bench kernels: {} family(ies) failed", r.errors.len());
            }
            Ok(())
        }
        BenchCommand::Nf4 { json, reference } => nf4_bench(json, reference.as_deref()),
        BenchCommand::Attention { json, reference } => attention_bench(json, reference.as_deref()),
    }
}

/// One reference figure: seconds of cuBLAS on the dequantized weight and of bitsandbytes.
struct RefRow {
    cublas_s: f64,
    bnb_s: f64,
}

/// The reference JSON: its device line and its rows by key.
fn read_nf4_reference(path: &std::path::Path) -> Result<(String, std::collections::HashMap<String, RefRow>)> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
    let about = format!("{}, torch {}, bitsandbytes {}", field("device"), field("torch"), field("bitsandbytes"));
    let mut rows = std::collections::HashMap::new();
    let list =
        v.get("rows").and_then(|r| r.as_array()).with_context(|| format!("{}: no `rows` list", path.display()))?;
    for r in list {
        let (Some(key), Some(cublas_s), Some(bnb_s)) = (
            r.get("key").and_then(|x| x.as_str()),
            r.get("cublas_s").and_then(|x| x.as_f64()),
            r.get("bnb_s").and_then(|x| x.as_f64()),
        ) else {
            bail!("{}: a row without key, cublas_s and bnb_s: {r}", path.display());
        };
        rows.insert(key.to_string(), RefRow { cublas_s, bnb_s });
    }
    Ok((about, rows))
}

/// `gristmill bench nf4`: the nf4 family's benchmark rows, each with its speed against the
/// reference stack's on the same shape (their time over ours: above 1 is faster than them).
fn nf4_bench(json: bool, reference: Option<&std::path::Path>) -> Result<()> {
    let refs = reference.map(read_nf4_reference).transpose()?;
    let gpu = match gristmill::Device::cuda(0) {
        Ok(gristmill::Device::Cuda(g)) => g,
        Ok(_) => bail!("bench nf4: no CUDA device"),
        Err(e) => {
            println!("bench nf4: no usable GPU ({e}); nothing to measure");
            return Ok(());
        }
    };
    let fam = gristmill::doctor::FAMILIES
        .iter()
        .find(|f| f.module == "nf4")
        .ok_or_else(|| anyhow::anyhow!("bench nf4: the nf4 kernel family is not registered"))?;
    let rows = (fam.bench)(&gpu)?;
    let device = gpu.info().name.clone();
    let ratio =
        |key: &str, secs: f64| refs.as_ref().and_then(|(_, m)| m.get(key)).map(|r| (r.bnb_s / secs, r.cublas_s / secs));
    // The fused LoRA forward against the NF4 product alone at the same (M, N, K).
    let lora_overhead = |shape: &str, secs: f64| -> Option<f64> {
        let base = shape.strip_prefix("lora-fwd ")?.split(" r=").next()?;
        let plain = rows.iter().find(|r| r.kernel == "nf4_gemm_fwd_bf16" && r.shape == format!("fwd {base}"))?;
        Some(secs / plain.seconds)
    };
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let (rate, unit) = r.rate();
                let rr = ratio(&r.shape, r.seconds);
                serde_json::json!({
                    "kernel": r.kernel, "shape": r.shape, "seconds": r.seconds, "rate": rate, "unit": unit,
                    "vs_bnb": rr.map(|x| x.0), "vs_cublas": rr.map(|x| x.1),
                    "vs_nf4_gemm_alone": lora_overhead(&r.shape, r.seconds),
                })
            })
            .collect();
        let report = serde_json::json!({
            "device": device, "reference": refs.as_ref().map(|(about, _)| about.clone()), "rows": out,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("gristmill bench nf4 on {device}");
    if let Some((about, _)) = &refs {
        println!("reference: {about} (ratios: their time / ours, above 1 = gristmill faster)");
    }
    println!("{:<20} {:<46} {:>10} {:>16} {:>8} {:>9}", "kernel", "shape", "time", "rate", "vs bnb", "vs cuBLAS");
    for r in &rows {
        let (rate, unit) = r.rate();
        let (b, c) = match ratio(&r.shape, r.seconds) {
            Some((b, c)) => (format!("{b:.2}×"), format!("{c:.2}×")),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<20} {:<46} {:>7.3} ms {:>8.1} {:<7} {:>8} {:>9}",
            r.kernel,
            r.shape,
            r.seconds * 1e3,
            rate,
            unit,
            b,
            c
        );
    }
    for r in &rows {
        if let Some(x) = lora_overhead(&r.shape, r.seconds) {
            println!("fused LoRA forward {}: {x:.3}× the NF4 product alone (target ≤ 1.10)", r.shape);
        }
    }
    Ok(())
}

/// SDPA's figures by (kernel, shape), in seconds, and the line that says where they come from.
type AttentionRefs = (String, std::collections::HashMap<(String, String), f64>);

/// The JSON of `scripts/bench-ref-attention.py`.
fn read_attention_reference(path: &std::path::Path) -> Result<AttentionRefs> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
    let about = format!("SDPA on {}, torch {}", field("device"), field("torch"));
    let list =
        v.get("rows").and_then(|r| r.as_array()).with_context(|| format!("{}: no `rows` list", path.display()))?;
    let mut rows = std::collections::HashMap::new();
    for r in list {
        let text_of = |k: &str| r.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let (Some(kernel), Some(shape), Some(seconds)) =
            (text_of("kernel"), text_of("shape"), r.get("seconds").and_then(|x| x.as_f64()))
        else {
            bail!("{}: a row without kernel, shape and seconds: {r}", path.display());
        };
        rows.insert((kernel, shape), seconds);
    }
    Ok((about, rows))
}

/// `gristmill bench attention`: the attention family's benchmark rows, each with its speed against
/// SDPA's on the same shape (SDPA's time over ours: above 1 is faster than SDPA).
fn attention_bench(json: bool, reference: Option<&std::path::Path>) -> Result<()> {
    let refs = reference.map(read_attention_reference).transpose()?;
    let gpu = match gristmill::Device::cuda(0) {
        Ok(gristmill::Device::Cuda(g)) => g,
        Ok(_) => bail!("bench attention: no CUDA device"),
        Err(e) => {
            println!("bench attention: no usable GPU ({e}); nothing to measure");
            return Ok(());
        }
    };
    let fam = gristmill::doctor::FAMILIES
        .iter()
        .find(|f| f.module == "attention")
        .ok_or_else(|| anyhow::anyhow!("bench attention: the attention kernel family is not registered"))?;
    let rows = (fam.bench)(&gpu)?;
    let device = gpu.info().name.clone();
    let vs_sdpa = |kernel: &str, shape: &str, seconds: f64| {
        refs.as_ref().and_then(|(_, m)| m.get(&(kernel.to_string(), shape.to_string()))).map(|r| r / seconds)
    };
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let (rate, unit) = r.rate();
                serde_json::json!({
                    "kernel": r.kernel, "shape": r.shape, "seconds": r.seconds, "rate": rate, "unit": unit,
                    "vs_sdpa": vs_sdpa(r.kernel, &r.shape, r.seconds),
                })
            })
            .collect();
        let report = serde_json::json!({
            "device": device, "reference": refs.as_ref().map(|(about, _)| about.clone()), "rows": out,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("gristmill bench attention on {device}");
    if let Some((about, _)) = &refs {
        println!("reference: {about} (ratio: its time / ours, above 1 = gristmill faster)");
    }
    println!("{:<24} {:<40} {:>10} {:>16} {:>8}", "kernel", "shape", "time", "rate", "vs SDPA");
    for r in &rows {
        let (rate, unit) = r.rate();
        let ratio = vs_sdpa(r.kernel, &r.shape, r.seconds).map_or("-".to_string(), |x| format!("{x:.2}×"));
        println!("{:<24} {:<40} {:>7.3} ms {:>8.1} {:<7} {:>8}", r.kernel, r.shape, r.seconds * 1e3, rate, unit, ratio);
    }
    Ok(())
}
