//! The `gristmill` command-line tool.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use gristmill::generate::{Generation, SamplingConfig, StopReason, generate};
use gristmill::model::{BasePrecision, LlamaModel};
use gristmill::tokenizer::{ChatMessage, Tokenizer};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Fine-tune and run Llama-family models with QLoRA (NF4 base + LoRA), AdamW or GRIT, on one GPU
/// or on the CPU.
#[derive(Parser)]
#[command(name = "gristmill", version = gristmill::VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with a model directory (config.json, safetensors, tokenizer.json).
    Generate(GenerateArgs),
    /// Import a GGUF model (llama architecture; F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors) as an HF-layout
    /// directory: model.safetensors, config.json, tokenizer.json, tokenizer_config.json.
    ImportGguf {
        /// The .gguf file.
        gguf: PathBuf,
        /// Output directory (created; existing files of the same names are replaced).
        #[arg(long)]
        out: PathBuf,
        /// dtype of the written weights.
        #[arg(long, value_enum, default_value_t = OutDType::Bf16)]
        dtype: OutDType,
    },
    /// Describe a checkpoint: architecture, parameters, dtypes, memory at NF4 and bf16.
    Inspect {
        /// A model directory, a .safetensors file or a model.safetensors.index.json.
        path: PathBuf,
        /// List every tensor (name, dtype, shape).
        #[arg(long)]
        tensors: bool,
    },
    /// Run the reference path end to end on an embedded default (no files, no GPU needed):
    /// NF4 quantization, the bitsandbytes layout, a QLoRA fit with AdamW, K-FAC algebra.
    Selfcheck {
        /// Seed of the random weights and data.
        #[arg(long, default_value_t = 3407)]
        seed: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OutDType {
    Bf16,
    F16,
    F32,
}

#[derive(Clone, Copy, ValueEnum)]
enum Precision {
    /// Dense weights in f32, bitsandbytes 4-bit weights in NF4.
    AsStored,
    /// Every linear weight in NF4 (quantized at load as bitsandbytes does).
    Nf4,
    /// Every linear weight in f32.
    F32,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model directory (HF layout: config.json, model.safetensors[.index.json], tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The prompt.
    #[arg(long, conflicts_with = "prompts_file", required_unless_present = "prompts_file")]
    prompt: Option<String>,
    /// A file of prompts: one per line, or JSON Lines with a "prompt" field.
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// A Jinja chat template file to use instead of the tokenizer's.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// How to hold the base model's linear weights.
    #[arg(long, value_enum, default_value_t = Precision::AsStored)]
    base_precision: Precision,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: keep the most likely tokens holding this probability (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// > 1 discourages repetition (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output ends with this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => generate_cmd(args),
        Command::ImportGguf { gguf, out, dtype } => import_gguf(&gguf, &out, dtype),
        Command::Inspect { path, tensors } => {
            let report = gristmill::inspect::inspect(&path)?;
            print!("{report}");
            if tensors {
                print!("{}", report.tensor_listing());
            }
            Ok(())
        }
        Command::Selfcheck { seed } => selfcheck(seed),
    }
}

fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        if line.trim_start().starts_with('{') {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
            match v.get("prompt").and_then(|p| p.as_str()) {
                Some(p) => prompts.push(p.to_string()),
                None => bail!("{}:{}: a JSON line needs a string field \"prompt\"", path.display(), i + 1),
            }
        } else {
            prompts.push(line.to_string());
        }
    }
    if prompts.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(prompts)
}

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    let sampling = SamplingConfig {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        max_new_tokens: a.max_new_tokens,
        stop: a.stop.clone(),
    };
    sampling.validate()?;
    let prompts = match (&a.prompt, &a.prompts_file) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(f)) => read_prompts(f)?,
        (None, None) => bail!("give --prompt or --prompts-file"),
    };
    let t0 = Instant::now();
    let base = match a.base_precision {
        Precision::AsStored => BasePrecision::AsStored,
        Precision::Nf4 => BasePrecision::Nf4,
        Precision::F32 => BasePrecision::F32,
    };
    let mut model = LlamaModel::load(&a.model, base)?;
    let mut tok = Tokenizer::from_dir(&a.model)?;
    if let Some(t) = &a.chat_template {
        let text = std::fs::read_to_string(t).with_context(|| format!("reading {}", t.display()))?;
        tok.with_chat_template(text);
    }
    if let Some(dir) = &a.adapter {
        let n = gristmill::adapter::load_peft_adapter(&mut model, dir)?;
        eprintln!("adapter {}: {n} modules", dir.display());
    }
    eprintln!(
        "loaded {} ({} layers, {:.0} MiB of weights) in {:.1}s on cpu",
        a.model.display(),
        model.cfg.num_layers,
        model.weight_bytes() as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );

    let stdout = std::io::stdout();
    for (i, prompt) in prompts.iter().enumerate() {
        let text = if a.chat {
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(ChatMessage::new("system", s.clone()));
            }
            msgs.push(ChatMessage::new("user", prompt.clone()));
            tok.apply_chat_template(&msgs, true)?
        } else {
            prompt.clone()
        };
        // A chat template writes its own special tokens; a plain prompt gets the tokenizer's BOS.
        let ids = tok.encode(&text, !a.chat)?;
        if prompts.len() > 1 {
            if i > 0 {
                println!();
            }
            println!("### prompt {}: {prompt}", i + 1);
        }
        let mut out = stdout.lock();
        let mut write_err = None;
        let g: Generation = generate(&model, &tok, &ids, &sampling, &mut |piece| match out
            .write_all(piece.as_bytes())
            .and_then(|_| out.flush())
        {
            Ok(()) => true,
            Err(e) => {
                write_err = Some(e);
                false
            }
        })?;
        if let Some(e) = write_err {
            // A closed pipe (`| head`) is the reader's choice, not a failure.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e).context("writing to stdout");
        }
        writeln!(out)?;
        let why = match g.stop {
            StopReason::Eos => "end of sequence",
            StopReason::StopString => "stop string",
            StopReason::MaxTokens => "--max-new-tokens",
            StopReason::Context => "context full",
            StopReason::Callback => "stopped",
        };
        eprintln!(
            "[{} prompt tokens in {:.2}s, {} new tokens at {:.1} tok/s, stop: {why}]",
            g.prompt_tokens,
            g.prefill_s,
            g.ids.len(),
            g.tokens_per_s()
        );
    }
    Ok(())
}

fn import_gguf(gguf: &Path, out: &Path, dtype: OutDType) -> Result<()> {
    let dtype = match dtype {
        OutDType::Bf16 => gristmill::core::DType::BF16,
        OutDType::F16 => gristmill::core::DType::F16,
        OutDType::F32 => gristmill::core::DType::F32,
    };
    let t0 = Instant::now();
    let opts = gristmill::gguf::ImportOptions { dtype };
    let mut last = 0usize;
    let tty = std::io::stderr().is_terminal();
    let summary = gristmill::gguf::import_gguf(gguf, out, &opts, &mut |done, total| {
        // One line that redraws itself: a progress bar without a dependency (terminals only).
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if tty && (pct != last || done == total) {
            last = pct;
            let bar = "#".repeat(pct / 4);
            eprint!("\rimporting [{bar:<25}] {done}/{total} tensors");
            if done == total {
                eprintln!();
            }
        }
    })?;
    let types: Vec<String> = summary.source_types.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!(
        "imported {} → {}: {} tensors ({}), {:.1} M parameters, {:.0} MiB written in {:.1}s{}",
        gguf.display(),
        out.display(),
        summary.tensors,
        types.join(", "),
        summary.parameters as f64 / 1e6,
        summary.output_bytes as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64(),
        if summary.tied_embeddings { "; embeddings tied" } else { "" }
    );
    Ok(())
}

fn selfcheck(seed: u64) -> Result<()> {
    println!("gristmill {} selfcheck on {} (seed {seed})", gristmill::VERSION, gristmill::Device::Cpu);
    let checks = gristmill::selfcheck::run(seed);
    let width = checks.iter().map(|c| c.name.chars().count()).max().unwrap_or(0);
    for c in &checks {
        let status = if c.ok { "ok  " } else { "FAIL" };
        println!("{status} {:<width$}  {:>6.2}s  {}", c.name, c.seconds, c.measured);
        if !c.ok {
            println!("     {:<width$}           expected: {}", "", c.bound);
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    println!("selfcheck: {} passed, {} failed", checks.len() - failed, failed);
    if failed > 0 {
        bail!("{failed} self-check(s) failed");
    }
    Ok(())
}
