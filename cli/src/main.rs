//! The `gristmill` command-line tool.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use gristmill::generate::{Generation, SamplingConfig, StopReason};
use gristmill::model::{BasePrecision, LlamaModel};
use gristmill::tokenizer::{ChatMessage, Tokenizer};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

mod gpu;

/// Fine-tune and run Llama-family models with QLoRA (NF4 base + LoRA), AdamW or GRIT, on one GPU
/// or on the CPU.
#[derive(Parser)]
#[command(name = "gristmill", version = gristmill::VERSION, about, long_about = None)]
struct Cli {
    /// Where to run: auto (the GPU when there is one), cpu, cuda or cuda:N. For `train` it
    /// overrides the configuration's `train.device`.
    #[arg(long, global = true)]
    device: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with a model directory (config.json, safetensors, tokenizer.json).
    Generate(GenerateArgs),
    /// Fine-tune a LoRA adapter (QLoRA: NF4 base by default) on a dataset.
    Train(Box<TrainArgs>),
    /// Score a model (with an optional adapter) on a dataset, greedy decoding: exact match of the
    /// final answer (GSM8K's "#### N" or the last number), or classification metrics when the
    /// reference answers form a closed label set; per-bucket scores when examples have a bucket.
    Eval {
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter directory.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Examples with gold answers (GSM8K-style or any format with a response).
        #[arg(long)]
        data: PathBuf,
        /// Prompt template (as for train): auto, alpaca, dolly, chat, plain or a custom one.
        #[arg(long, default_value = "auto")]
        template: String,
        #[arg(long)]
        max_examples: Option<usize>,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Print this many examples with the model's output.
        #[arg(long, default_value_t = 3)]
        show: usize,
        /// Write the metrics and every scored example here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// auto (classify when the reference answers are at most 20 distinct labels, each used twice
        /// on average), exact (exact match of the final answer) or classify.
        #[arg(long, default_value = "auto")]
        task: String,
        /// Score the base model too and print both side by side (needs --adapter).
        #[arg(long)]
        compare_base: bool,
    },
    /// Compare training runs: a summary table (steps, final train loss, final and best validation
    /// loss, tokens/s, peak memory, wall time) and every run's loss curves on one PNG.
    Compare {
        /// Training run directories (each with a metrics.jsonl).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Where to write the chart.
        #[arg(long, default_value = "compare.png")]
        out: PathBuf,
        /// Print the summaries as JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Train every point of a hyperparameter grid, one run after another, into OUT/<run-name>, then
    /// print the comparison table. Running it again skips finished runs and resumes an interrupted one.
    Sweep {
        /// The base configuration (TOML, as for train).
        #[arg(long)]
        config: PathBuf,
        /// The grid: space-separated axes of comma-separated values, e.g.
        /// "lr=1e-5,2e-5 batch=8,16 seed=42,1337". Short names: lr, batch, seed, r, alpha, dropout,
        /// epochs, steps, accum, warmup, wd, scheduler, optimizer, seq_len; or any section.key.
        #[arg(long)]
        grid: String,
        /// Directory of the runs (and sweep.json, compare.png).
        #[arg(long)]
        out: PathBuf,
        /// Override a configuration key in every run (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Representation drift of a run trained with train.track_hidden_every: linear CKA and cosine
    /// similarity of every layer's hidden states against step 0 (the base), per tracked step.
    Drift {
        /// The run directory.
        run: PathBuf,
        /// Where to write the chart (CKA by layer, a line per step).
        #[arg(long, default_value = "drift.png")]
        out: PathBuf,
        /// Print the report as JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Chat with a model (and optional adapter) in the terminal, with history and the model's chat
    /// template. Commands: /reset clears the history, /exit (or end of input) quits.
    Chat {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A system message.
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 512)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        #[arg(long, default_value_t = 0.9)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Merge a LoRA adapter into the full-precision base (W + s·B·A in the checkpoint's own dtype)
    /// and write an HF checkpoint: sharded safetensors, config, tokenizer.
    Merge {
        /// The base model directory: its original bf16/f16/f32 checkpoint, not a 4-bit copy.
        #[arg(long)]
        base: PathBuf,
        /// The PEFT adapter directory (e.g. a training run directory).
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Merge into a bitsandbytes 4-bit base anyway, dequantizing it first (lossy).
        #[arg(long)]
        allow_4bit: bool,
        /// Largest shard, in GB.
        #[arg(long, default_value_t = 5.0)]
        max_shard_gb: f64,
    },
    /// Write a synthetic dataset (GSM8K-style JSON Lines: question, worked answer ending in
    /// "#### N"): templated arithmetic word problems with exact answers.
    Synth {
        /// Number of problems.
        #[arg(long, default_value_t = 1000)]
        n: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output file (.jsonl).
        #[arg(long)]
        out: PathBuf,
    },
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
    /// Export an HF-layout Llama model (a merged one, say) as a GGUF file for llama.cpp: llama
    /// metadata, the byte-level BPE tokenizer, tensors under GGUF names.
    ExportGguf {
        /// The model directory (config.json, safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// The .gguf file to write.
        #[arg(long)]
        out: PathBuf,
        /// Type of the matrices (norms stay F32).
        #[arg(long = "type", value_enum, default_value_t = GgufType::F16)]
        ty: GgufType,
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
    /// Check the GPU: driver, device, PTX modules, every kernel against its CPU reference.
    /// Without a usable GPU it says why and succeeds (gristmill then runs on the CPU).
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks on the GPU.
    #[command(subcommand)]
    Bench(gpu::BenchCommand),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// A TOML configuration file (every option; flags and --set override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any configuration key: --set lora.r=8 --set optim.lr=1e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Base model directory (HF layout).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data: JSON or JSON Lines in Alpaca, Dolly, GSM8K, chat or paraphrase format (repeatable).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Validation data (otherwise the data is split 80/10/10).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Prompt template: auto, alpaca, dolly, chat, plain, or a custom "{field}" template.
    #[arg(long)]
    template: Option<String>,
    /// Run directory.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Pack several examples into each sequence (attention stays within each example).
    #[arg(long)]
    packing: bool,
    #[arg(long)]
    lora_r: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.
    #[arg(long, value_delimiter = ',')]
    target_modules: Vec<String>,
    #[arg(long)]
    lr: Option<f64>,
    /// linear, cosine or constant.
    #[arg(long)]
    scheduler: Option<String>,
    /// Warmup: a number of steps (10) or a ratio of the run (0.05).
    #[arg(long)]
    warmup: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
    /// adamw or grit (GRIT's fields go in the config's [grit] table, or --set grit.KEY=VALUE).
    #[arg(long)]
    optimizer: Option<String>,
    /// nf4 (QLoRA), bf16 or f32.
    #[arg(long)]
    base_precision: Option<String>,
    /// Continue from a checkpoint directory, or "latest" in the run directory.
    #[arg(long)]
    resume: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum GgufType {
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
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

/// The library reports through the `log` facade and never prints; the CLI shows its warnings and
/// notes on stderr, one line each, as `gristmill: …`.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.level() <= log::Level::Info && meta.target().starts_with("gristmill")
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let mut err = std::io::stderr().lock();
            // On a terminal, erase a partly drawn line (a progress bar) so the message stands alone.
            let clear = if err.is_terminal() { "\r\x1b[2K" } else { "" };
            // A closed stderr must not stop the program.
            let _ = writeln!(err, "{clear}gristmill: {}", record.args());
        }
    }

    fn flush(&self) {}
}

fn main() -> Result<()> {
    if log::set_logger(&StderrLogger).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let cli = Cli::parse();
    let dev = cli.device.as_deref();
    match cli.command {
        Command::Generate(args) => generate_cmd(args, dev),
        Command::Train(args) => train_cmd(*args, dev),
        Command::Synth { n, seed, out } => synth_cmd(n, seed, &out),
        Command::Chat { model, adapter, system, max_new_tokens, temperature, top_p, seed } => {
            let sampling = SamplingConfig { temperature, top_p, seed, max_new_tokens, ..Default::default() };
            chat_cmd(&model, adapter.as_deref(), system, &sampling, dev)
        }
        Command::Merge { base, adapter, out, allow_4bit, max_shard_gb } => {
            let opts = gristmill::merge::MergeOptions { allow_4bit, max_shard_bytes: (max_shard_gb * 1e9) as u64 };
            let r = gristmill::merge::merge_adapter(&base, &adapter, &out, &opts)?;
            if r.dequantized_4bit {
                eprintln!("note: the base was bitsandbytes 4-bit; it was dequantized before merging (lossy)");
            }
            println!(
                "merged {} modules into {} tensors, {:.1} MiB in {} shard(s) → {}",
                r.merged_modules,
                r.tensors,
                r.bytes as f64 / (1 << 20) as f64,
                r.shards,
                r.out.display()
            );
            Ok(())
        }
        Command::Eval {
            model,
            adapter,
            data,
            template,
            max_examples,
            max_new_tokens,
            show,
            json,
            task,
            compare_base,
        } => {
            let args = EvalArgs {
                model: &model,
                adapter: adapter.as_deref(),
                data: &data,
                template: &template,
                max_examples,
                max_new_tokens,
                show,
                json: json.as_deref(),
                task: task.parse()?,
                compare_base,
            };
            eval_cmd(&args, dev)
        }
        Command::Compare { runs, out, json } => compare_cmd(&runs, &out, json),
        Command::Drift { run, out, json } => {
            let r = gristmill::drift::drift(&run)?;
            r.plot(&out)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{} examples, hidden states {}; against step 0:", r.examples, r.reduction);
                print!("{}", r.table());
            }
            eprintln!("CKA by layer in {}", out.display());
            Ok(())
        }
        Command::Sweep { config, grid, out, sets } => sweep_cmd(&config, &grid, &out, sets, dev),
        Command::ExportGguf { model, out, ty } => {
            use gristmill::gguf_export::{ExportType, export_gguf};
            let ty = match ty {
                GgufType::F16 => ExportType::F16,
                GgufType::Bf16 => ExportType::Bf16,
                GgufType::Q8_0 => ExportType::Q8_0,
            };
            let s = export_gguf(&model, &out, ty)?;
            let types: Vec<String> = s.types.iter().map(|(k, v)| format!("{v} {k}")).collect();
            println!(
                "exported {} → {}: {} tensors ({}), {:.1} MiB",
                model.display(),
                out.display(),
                s.tensors,
                types.join(", "),
                s.bytes as f64 / (1 << 20) as f64
            );
            Ok(())
        }
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
        Command::Doctor { json } => gpu::doctor_cmd(json),
        Command::Bench(cmd) => gpu::bench_cmd(cmd),
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

/// The device `--device` names (auto when not given).
fn device(flag: Option<&str>) -> Result<gristmill::Device> {
    Ok(gristmill::Device::parse(flag.unwrap_or("auto"))?)
}

fn generate_cmd(a: GenerateArgs, dev: Option<&str>) -> Result<()> {
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
    tok.check_fits_model(model.cfg.vocab_size)?;
    if let Some(t) = &a.chat_template {
        let text = std::fs::read_to_string(t).with_context(|| format!("reading {}", t.display()))?;
        tok.with_chat_template(text);
    }
    if let Some(dir) = &a.adapter {
        let n = gristmill::adapter::load_peft_adapter(&mut model, dir)?;
        eprintln!("adapter {}: {n} modules", dir.display());
    }
    let device = device(dev)?;
    let runner = gristmill::generate::Runner::new(&device, &model)?;
    eprintln!(
        "loaded {} ({} layers, {:.0} MiB of weights) in {:.1}s on {device}",
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
        let g: Generation = runner.generate(&tok, &ids, &sampling, &mut |piece| match out
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

/// What `gristmill eval` was asked.
struct EvalArgs<'a> {
    model: &'a Path,
    adapter: Option<&'a Path>,
    data: &'a Path,
    template: &'a str,
    max_examples: Option<usize>,
    max_new_tokens: usize,
    show: usize,
    json: Option<&'a Path>,
    task: gristmill::eval::Task,
    compare_base: bool,
}

fn eval_cmd(a: &EvalArgs<'_>, dev: Option<&str>) -> Result<()> {
    use gristmill::data::{Format, Template, load_examples};
    if a.compare_base && a.adapter.is_none() {
        bail!("--compare-base needs --adapter (the base is compared with the base plus the adapter)");
    }
    let mut model = LlamaModel::load(a.model, BasePrecision::AsStored)?;
    let tok = Tokenizer::from_dir(a.model)?;
    tok.check_fits_model(model.cfg.vocab_size)?;
    let (mut examples, report) = load_examples(a.data, Format::Auto)?;
    if let Some(n) = a.max_examples {
        examples.truncate(n);
    }
    let template = Template::resolve(Some(a.template), &tok, report.format)?;
    let tty = std::io::stderr().is_terminal();
    let device = device(dev)?;
    let run = |model: &LlamaModel, what: &str| -> Result<gristmill::eval::ExactMatch> {
        let runner = gristmill::generate::Runner::new(&device, model)?;
        Ok(gristmill::eval::eval_on(&runner, &tok, &template, &examples, a.max_new_tokens, a.task, &mut |d, n| {
            if tty {
                eprint!("\rscoring {what} {d}/{n}");
                if d == n {
                    eprintln!();
                }
            }
        })?)
    };
    // (name, results) of each model scored.
    let mut results = Vec::new();
    if a.compare_base {
        results.push(("base".to_string(), run(&model, "base")?));
    }
    let name = match a.adapter {
        Some(dir) => {
            gristmill::adapter::load_peft_adapter(&mut model, dir)?;
            "adapter"
        }
        None => "model",
    };
    results.push((name.to_string(), run(&model, name)?));
    let (_, r) = &results[results.len() - 1];
    for item in r.items.iter().take(a.show) {
        println!("--- {}", item.prompt.trim_end());
        println!("{}", item.output.trim_end());
        println!(
            "[gold {}, predicted {}: {}]",
            item.gold,
            item.predicted.as_deref().unwrap_or("none"),
            if item.correct { "correct" } else { "wrong" }
        );
    }
    let who = match a.adapter {
        Some(ad) => format!("{} + adapter {}", a.model.display(), ad.display()),
        None => a.model.display().to_string(),
    };
    let task = if r.labels.is_empty() {
        "exact match of the final answer".to_string()
    } else {
        format!("classification over {} labels", r.labels.len())
    };
    println!(
        "{who}: {} examples, {task}; template {}; {:.1}s, {:.1} tok/s",
        r.n(),
        template.name(),
        r.seconds,
        r.new_tokens as f64 / r.seconds.max(1e-9)
    );
    let tables = results.iter().map(|(n, r)| Ok((n.clone(), r.metric_rows()?))).collect::<Result<Vec<_>>>()?;
    print!("{}", metric_table(&tables));
    if let Some(path) = a.json {
        let doc = if a.compare_base {
            let mut m = serde_json::Map::new();
            for (n, r) in &results {
                m.insert(n.clone(), r.to_json()?);
            }
            serde_json::Value::Object(m)
        } else {
            r.to_json()?
        };
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The metrics of one or more models side by side (with the difference to the first when there
/// are two); intervals in brackets.
fn metric_table(runs: &[(String, Vec<gristmill::eval::MetricRow>)]) -> String {
    let cell = |r: &gristmill::eval::MetricRow| match r.ci95 {
        Some((lo, hi)) => format!("{:.3} [{lo:.3}, {hi:.3}]", r.value),
        None => format!("{:.3}", r.value),
    };
    let mut header = vec!["metric".to_string()];
    header.extend(runs.iter().map(|(n, _)| n.clone()));
    if runs.len() == 2 {
        header.push("difference".into());
    }
    let mut rows = vec![header];
    for (i, first) in runs.first().map(|r| r.1.as_slice()).unwrap_or_default().iter().enumerate() {
        let mut line = vec![first.name.clone()];
        let values: Vec<Option<&gristmill::eval::MetricRow>> =
            runs.iter().map(|(_, rows)| rows.get(i).filter(|r| r.name == first.name)).collect();
        line.extend(values.iter().map(|v| v.map_or("-".into(), cell)));
        if let [Some(a), Some(b)] = values.as_slice() {
            line.push(format!("{:+.3}", b.value - a.value));
        }
        rows.push(line);
    }
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| if c == 0 { format!("{s:<w$}", w = widths[c]) } else { format!("{s:>w$}", w = widths[c]) })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn sweep_cmd(config: &Path, grid: &str, out: &Path, mut sets: Vec<String>, dev: Option<&str>) -> Result<()> {
    use gristmill::sweep::{Status, SweepHooks, parse_grid, points, run_sweep};
    let axes = parse_grid(grid)?;
    if let Some(d) = dev {
        sets.push(format!("train.device={d}"));
    }
    eprintln!("sweep: {} runs into {}", points(&axes).len(), out.display());
    let interrupt = gristmill::train::progress::interrupt_flag()?;
    let hooks = SweepHooks { on_step: None, interrupt: Some(interrupt), progress: true };
    let report = run_sweep(config, &axes, &sets, out, hooks)?;
    for (p, status) in &report.runs {
        let what = match status {
            Status::Trained => "trained",
            Status::Resumed => "resumed and finished",
            Status::Skipped => "already done",
            Status::Interrupted => "interrupted",
            Status::Pending => "not started",
        };
        eprintln!("  {}: {what}", p.name);
    }
    let png = out.join("compare.png");
    gristmill::compare::plot_runs(&png, &report.summaries)?;
    print!("{}", gristmill::compare::format_table(&report.summaries));
    eprintln!("loss curves in {}", png.display());
    if report.interrupted {
        eprintln!("interrupted: run the same command again to continue");
    }
    Ok(())
}

fn compare_cmd(runs: &[PathBuf], out: &Path, json: bool) -> Result<()> {
    let runs = gristmill::compare::summarize_runs(runs)?;
    gristmill::compare::plot_runs(out, &runs)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
    } else {
        print!("{}", gristmill::compare::format_table(&runs));
    }
    eprintln!("loss curves of {} run(s) in {}", runs.len(), out.display());
    Ok(())
}

fn chat_cmd(
    model_dir: &Path,
    adapter: Option<&Path>,
    system: Option<String>,
    sampling: &SamplingConfig,
    dev: Option<&str>,
) -> Result<()> {
    use std::io::BufRead;
    sampling.validate()?;
    let mut model = LlamaModel::load(model_dir, BasePrecision::AsStored)?;
    if let Some(dir) = adapter {
        gristmill::adapter::load_peft_adapter(&mut model, dir)?;
    }
    let tok = Tokenizer::from_dir(model_dir)?;
    tok.check_fits_model(model.cfg.vocab_size)?;
    if tok.chat_template().is_none() {
        bail!("{} has no chat template; use `gristmill generate` with a plain prompt", model_dir.display());
    }
    let device = device(dev)?;
    let runner = gristmill::generate::Runner::new(&device, &model)?;
    let fresh = || -> Vec<ChatMessage> { system.iter().map(|s| ChatMessage::new("system", s.clone())).collect() };
    let mut history = fresh();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut turn = 0u64;
    eprintln!("chatting with {} (/reset clears the history, /exit quits)", model_dir.display());
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = fresh();
                eprintln!("(history cleared)");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", line));
        let prompt = tok.apply_chat_template(&history, true)?;
        let ids = tok.encode(&prompt, false)?;
        if ids.len() >= model.cfg.max_position_embeddings {
            bail!("the conversation is longer than the model's context ({} tokens): /reset it", ids.len());
        }
        // A new seed each turn, derived from the user's, so that a conversation is reproducible.
        let cfg = SamplingConfig { seed: sampling.seed.wrapping_add(turn), ..sampling.clone() };
        turn += 1;
        let g = runner.generate(&tok, &ids, &cfg, &mut |piece| {
            out.write_all(piece.as_bytes()).and_then(|_| out.flush()).is_ok()
        })?;
        writeln!(out)?;
        history.push(ChatMessage::new("assistant", g.text.trim().to_string()));
    }
    Ok(())
}

fn synth_cmd(n: usize, seed: u64, out: &Path) -> Result<()> {
    let mut text = String::new();
    for ex in gristmill::data::synth::generate(n, seed) {
        let q = ex.field("question").unwrap_or_default();
        let a = ex.response().unwrap_or_default();
        text.push_str(&serde_json::json!({"question": q, "answer": a}).to_string());
        text.push('\n');
    }
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {n} problems to {}", out.display());
    Ok(())
}

fn train_cmd(a: TrainArgs, dev: Option<&str>) -> Result<()> {
    use gristmill::train::config::{TrainConfig, set_key};
    use toml::Value;
    let mut flags = toml::Table::new();
    let mut set = |k: &str, v: Value| set_key(&mut flags, k, v);
    let path = |p: &Path| Value::String(p.display().to_string());
    if let Some(m) = &a.model {
        set("model.path", path(m))?;
    }
    if !a.data.is_empty() {
        set("data.paths", Value::Array(a.data.iter().map(|p| path(p)).collect()))?;
    }
    if let Some(p) = &a.eval_data {
        set("data.eval_data", path(p))?;
    }
    if let Some(t) = &a.template {
        set("data.template", Value::String(t.clone()))?;
    }
    if let Some(o) = &a.out {
        set("output.dir", path(o))?;
    }
    if let Some(r) = &a.resume {
        set("output.resume", Value::String(r.clone()))?;
    }
    if let Some(d) = dev {
        set("train.device", Value::String(d.to_string()))?;
    }
    let int = |v: usize| Value::Integer(v as i64);
    for (k, v) in [
        ("train.max_steps", a.max_steps),
        ("train.batch_size", a.batch_size),
        ("train.grad_accum", a.grad_accum),
        ("data.max_seq_len", a.max_seq_len),
        ("lora.r", a.lora_r),
    ] {
        if let Some(v) = v {
            set(k, int(v))?;
        }
    }
    for (k, v) in
        [("train.epochs", a.epochs), ("lora.alpha", a.lora_alpha), ("lora.dropout", a.lora_dropout), ("optim.lr", a.lr)]
    {
        if let Some(v) = v {
            set(k, Value::Float(v))?;
        }
    }
    if let Some(s) = a.seed {
        set("train.seed", Value::Integer(s as i64))?;
    }
    for (k, v) in [
        ("optim.scheduler", &a.scheduler),
        ("optim.optimizer", &a.optimizer),
        ("model.base_precision", &a.base_precision),
    ] {
        if let Some(v) = v {
            set(k, Value::String(v.clone()))?;
        }
    }
    if let Some(w) = &a.warmup {
        if w.contains('.') {
            set("optim.warmup_ratio", Value::Float(w.parse().with_context(|| format!("--warmup {w}: not a number"))?))?;
        } else {
            set(
                "optim.warmup_steps",
                Value::Integer(w.parse().with_context(|| format!("--warmup {w}: not a number"))?),
            )?;
        }
    }
    if a.packing {
        set("data.packing", Value::Boolean(true))?;
    }
    if !a.target_modules.is_empty() {
        set("lora.target_modules", Value::Array(a.target_modules.iter().map(|m| Value::String(m.clone())).collect()))?;
    }
    let cfg = TrainConfig::load(a.config.as_deref(), &flags, &a.sets)?;
    let interrupt = gristmill::train::progress::interrupt_flag()?;
    let hooks = gristmill::train::trainer::Hooks { on_step: None, interrupt: Some(interrupt), progress: true };
    let out = gristmill::train::trainer::train(&cfg, hooks)?;
    let how = if out.interrupted {
        "interrupted; resume with --resume latest"
    } else if out.early_stopped {
        "stopped early"
    } else {
        "done"
    };
    println!(
        "{how}: {}/{} steps in {:.1}s ({:.0} tokens/s), last loss {:.4}{}",
        out.steps,
        out.total_steps,
        out.seconds,
        out.tokens as f64 / out.seconds.max(1e-9),
        out.last_loss,
        out.eval_loss.map(|e| format!(", validation loss {e:.4} (ppl {:.2})", e.exp())).unwrap_or_default()
    );
    println!("adapter, logs and loss.png in {}", out.run_dir.display());
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
