//! The training loop: data → micro-batches → gradients → clipping → AdamW → logs, evaluations
//! and checkpoints, resumable at any checkpoint with the same data order and the same result.
//!
//! A run directory holds: `config.toml` (the resolved configuration), `metrics.jsonl`, a
//! TensorBoard event file, `checkpoint-N/` folders (adapter, optimizer state, batcher position,
//! trainer state), and at the end the adapter itself (`adapter_config.json`,
//! `adapter_model.safetensors`, PEFT's format), `trainer_state.json` and `loss.png`.

use super::checkpoint::{CheckpointManager, resolve_resume};
use super::config::{BasePrecision as CfgPrecision, OptimizerKind, TrainConfig};
use super::engine::{ComputeDtype, Engine};
use super::grit::{GritModule, GritState, GritStepLog};
use super::metrics::{MetricsWriter, Record, TrainerState};
use super::optim::{AdamW, lora_params};
use super::plot::{Series, plot_heatmap, plot_losses};
use super::progress::Progress;
use super::schedule::{lr_at, warmup_steps};
use super::step::Dropout;
use super::tfevents::EventWriter;
use crate::adapter::{AdapterConfig, LoraSpec, attach_lora_tensors, init_lora, save_peft_adapter};
use crate::data::{
    Batch, BatchOptions, Batcher, BatcherState, Example, LoadOptions, Template, TokenizeOptions, Tokenized,
    load_examples_with, split, tokenize_all,
};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::{BasePrecision, LlamaModel, Weight};
use crate::safetensors::{Checkpoint, write_safetensors};
use crate::tokenizer::Tokenizer;
use crate::util::write_atomic;
use gristmill_core::DType;
use gristmill_core::bnb::RawTensor;
use gristmill_core::ops::adamw::AdamWConfig;
use gristmill_core::rng::mix64;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    /// Optimizer steps done (counting those before a resume).
    pub steps: usize,
    pub total_steps: usize,
    /// Mean training loss of the last step.
    pub last_loss: f64,
    /// Validation loss at the end, when there is validation data.
    pub eval_loss: Option<f64>,
    pub seconds: f64,
    /// Non-padding tokens processed by this process.
    pub tokens: u64,
    /// Ctrl-C (or the step callback) stopped the run early; a checkpoint was written.
    pub interrupted: bool,
    /// Early stopping ended the run.
    pub early_stopped: bool,
    /// What the run reported while setting up (data, model, adapter, resume).
    pub notes: Vec<String>,
}

/// What the caller can hook into a run.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Called after every optimizer step with its record; returning false stops the run (a
    /// checkpoint is written first).
    pub on_step: Option<&'a mut dyn FnMut(&Record) -> bool>,
    /// Set (e.g. by Ctrl-C) to stop the run after the current step with a checkpoint.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// The data of a run, tokenized.
pub struct RunData {
    pub train: Vec<Tokenized>,
    pub val: Vec<Tokenized>,
    /// Held-out examples (the test part of the split), untokenized, for evaluation after training.
    pub test: Vec<Example>,
    pub template: Template,
    /// One line per file and split, for the log.
    pub report: Vec<String>,
}

/// Loads, splits and tokenizes the run's data as the configuration says.
pub fn prepare_data(cfg: &TrainConfig, tok: &Tokenizer) -> Result<RunData> {
    let format = cfg.data.format()?;
    let opts = LoadOptions { buckets: cfg.data.buckets()?, use_paraphrase_answers: cfg.data.use_paraphrase_answers };
    let mut report = Vec::new();
    let mut examples = Vec::new();
    let mut detected = format;
    for path in &cfg.data.paths {
        let (ex, rep) = load_examples_with(path, format, &opts)?;
        detected = rep.format;
        let mut line = format!("{}: {} examples ({} format)", path.display(), rep.examples, rep.format.name());
        for (why, c) in &rep.skipped {
            line.push_str(&format!("; skipped {} ({why}, first at line {})", c.count, c.first_line));
        }
        report.push(line);
        examples.extend(ex);
    }
    let template = Template::resolve(Some(cfg.data.template.as_str()), tok, detected)?;
    let (train, mut val, test) = match &cfg.data.eval_data {
        Some(p) => {
            let (ev, rep) = load_examples_with(p, format, &opts)?;
            report.push(format!("{}: {} validation examples", p.display(), rep.examples));
            (examples, ev, Vec::new())
        }
        None => {
            let r = &cfg.data.split;
            let ratios =
                [r.first().copied().unwrap_or(0.8), r.get(1).copied().unwrap_or(0.1), r.get(2).copied().unwrap_or(0.1)];
            split(examples, ratios, cfg.train.seed)
        }
    };
    if let Some(n) = cfg.data.eval_max_examples {
        val.truncate(n);
    }
    let topts = TokenizeOptions { max_len: cfg.data.max_seq_len, loss_on: cfg.data.loss_on, add_eos: true };
    let (train_tok, rep) = tokenize_all(tok, &template, &train, &topts)?;
    report.push(format!(
        "train: {} examples, {} tokens ({} in the loss), {} truncated, {} dropped with no loss token left; template {}",
        rep.kept,
        rep.tokens,
        rep.loss_tokens,
        rep.truncated,
        rep.dropped_no_loss,
        template.name()
    ));
    let (val_tok, vrep) = tokenize_all(tok, &template, &val, &topts)?;
    report.push(format!("validation: {} examples; held out for testing: {}", vrep.kept, test.len()));
    if train_tok.is_empty() {
        return Err(Error::Invalid("no training example is left after tokenization".into()));
    }
    Ok(RunData { train: train_tok, val: val_tok, test, template, report })
}

/// Loads the base model the configuration names, held at its base precision.
pub fn load_base(cfg: &TrainConfig) -> Result<LlamaModel> {
    let precision = match cfg.model.base_precision {
        CfgPrecision::Nf4 => BasePrecision::Nf4,
        CfgPrecision::Bf16 | CfgPrecision::F32 => BasePrecision::F32,
    };
    let mut model = LlamaModel::load(&cfg.model.path, precision)?;
    if cfg.model.base_precision == CfgPrecision::Bf16 {
        // A bf16 base: the dense weights are the bf16 values (exact when the checkpoint is bf16).
        for layer in &mut model.layers {
            for (_, lin) in layer.linears_mut() {
                if let Weight::Dense(w) = &mut lin.weight {
                    w.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
                }
            }
        }
    }
    Ok(model)
}

/// The adapter shape the configuration asks for.
pub fn lora_spec(cfg: &TrainConfig) -> LoraSpec {
    LoraSpec {
        r: cfg.lora.r,
        alpha: cfg.lora.alpha,
        dropout: cfg.lora.dropout,
        rslora: cfg.lora.rslora,
        target_modules: cfg.lora.target_modules.clone(),
    }
}

/// Mean loss over the validation set, in fixed order.
pub fn evaluate(
    engine: &Engine,
    model: &LlamaModel,
    val: &[Tokenized],
    batch_size: usize,
    max_len: usize,
    pad: Option<u32>,
) -> Result<Option<f64>> {
    if val.is_empty() {
        return Ok(None);
    }
    let opts = BatchOptions { batch_size, packing: false, max_len, seed: 0, group_by_length: false };
    let mut batcher = Batcher::new(val.to_vec(), pad, opts)?;
    let (mut sum, mut n) = (0f64, 0usize);
    for _ in 0..batcher.batches_per_epoch() {
        let s = engine.eval_loss(model, &batcher.next_batch())?;
        sum += s.loss_sum;
        n += s.n_targets;
    }
    Ok((n > 0).then(|| sum / n as f64))
}

fn rss_bytes() -> Option<u64> {
    // Resident set size from /proc (Linux); elsewhere memory is not reported.
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const BATCHER_FILE: &str = "batcher.json";
const STATE_FILE: &str = "trainer_state.json";

fn f32_tensor(name: String, data: &[f32]) -> RawTensor<'static> {
    RawTensor {
        name,
        dtype: DType::F32,
        shape: vec![data.len()],
        data: Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

/// Writes everything a resume needs into `dir`.
#[allow(clippy::too_many_arguments)]
fn write_checkpoint(
    dir: &Path,
    model: &LlamaModel,
    spec: &LoraSpec,
    base: &str,
    opt: &AdamW,
    batcher: &BatcherState,
    state: &TrainerState,
    grit: Option<&GritState>,
) -> Result<()> {
    save_peft_adapter(model, spec, base, dir)?;
    if let Some(g) = grit {
        g.save(dir)?;
    }
    let mut t = Vec::with_capacity(2 * opt.m.len());
    for (i, (m, v)) in opt.m.iter().zip(&opt.v).enumerate() {
        t.push(f32_tensor(format!("exp_avg.{i}"), m));
        t.push(f32_tensor(format!("exp_avg_sq.{i}"), v));
    }
    let mut meta = std::collections::HashMap::new();
    meta.insert("step".to_string(), opt.step.to_string());
    write_safetensors(&dir.join(OPTIMIZER_FILE), &t, Some(meta))?;
    let b = serde_json::to_string_pretty(batcher).map_err(|e| Error::format(dir, e.to_string()))?;
    write_atomic(&dir.join(BATCHER_FILE), b.as_bytes())?;
    state.save(&dir.join(STATE_FILE))
}

/// Restores adapter, optimizer, batcher and trainer state from a checkpoint directory.
fn read_checkpoint(
    dir: &Path,
    model: &mut LlamaModel,
    opt: &mut AdamW,
    batcher: &mut Batcher,
    grit: Option<&mut GritState>,
) -> Result<TrainerState> {
    if let Some(g) = grit {
        g.load(dir).map_err(|e| {
            Error::Invalid(format!(
                "{e}\n{} was not written by a GRIT run (or is damaged); resume it with optim.optimizer = \"adamw\"",
                dir.display()
            ))
        })?;
    }
    let cfg = AdapterConfig::from_dir(dir)?;
    let weights = dir.join("adapter_model.safetensors");
    attach_lora_tensors(model, &cfg, &Checkpoint::open(&weights)?, "", &weights)?;
    let path = dir.join(OPTIMIZER_FILE);
    let ck = Checkpoint::open(&path)?;
    for i in 0..opt.m.len() {
        let m = ck.to_f32(&format!("exp_avg.{i}"))?;
        let v = ck.to_f32(&format!("exp_avg_sq.{i}"))?;
        if m.len() != opt.m[i].len() || v.len() != opt.v[i].len() {
            return Err(Error::format(
                &path,
                format!("moment {i} has {} values, the adapter needs {}", m.len(), opt.m[i].len()),
            ));
        }
        opt.m[i] = m;
        opt.v[i] = v;
    }
    let state = TrainerState::load(&dir.join(STATE_FILE))?;
    opt.step = state.global_step as u64;
    let bpath = dir.join(BATCHER_FILE);
    let text = std::fs::read_to_string(&bpath).map_err(|e| Error::io(&bpath, e))?;
    let bs: BatcherState = serde_json::from_str(&text).map_err(|e| Error::format(&bpath, e.to_string()))?;
    batcher.restore(bs)?;
    Ok(state)
}

/// GRIT's logs beyond metrics.jsonl: `grit.jsonl` (one line per inversion and reprojection, with
/// per-module λ, k and top eigenvalues), eigenvalue heat maps, and TensorBoard spectra.
struct GritLog {
    file: std::fs::File,
    dir: PathBuf,
}

impl GritLog {
    fn open(dir: &Path, append: bool) -> Result<Self> {
        let path = dir.join("grit.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(GritLog { file, dir: dir.to_path_buf() })
    }

    fn line(&mut self, v: serde_json::Value) -> Result<()> {
        use std::io::Write;
        let path = self.dir.join("grit.jsonl");
        self.file.write_all(format!("{v}\n").as_bytes()).map_err(|e| Error::io(&path, e))
    }

    /// Adds GRIT's scalars to `rec` and writes the step's events.
    fn record(
        &mut self,
        step: usize,
        g: &GritState,
        l: &GritStepLog,
        rec: &mut Record,
        events: &mut EventWriter,
    ) -> Result<()> {
        use serde_json::json;
        let mut put = |k: &str, v: f64| {
            rec.extra.insert(k.into(), json!(v));
        };
        if let Some(r) = l.ng_ratio {
            put("grit_ng_ratio", r);
        }
        put("grit_reg_loss", l.reg_loss);
        put("grit_damping", l.damping);
        put("grit_ready_modules", l.ready_modules as f64);
        put("grit_effective_param_ratio", g.effective_param_ratio());
        if let Some(lams) = &l.inverted {
            let used: Vec<f64> = lams.iter().filter(|&&x| x > 0.0).map(|&x| f64::from(x)).collect();
            if !used.is_empty() {
                put("grit_lambda_mean", used.iter().sum::<f64>() / used.len() as f64);
                put("grit_lambda_max", used.iter().copied().fold(0.0, f64::max));
                let base = l.damping.max(gristmill_core::linalg::MIN_DAMPING) * 1.0001;
                put("grit_lambda_escalations", used.iter().filter(|&&x| x > base).count() as f64);
            }
            let failed = lams.iter().filter(|&&x| x < 0.0).count();
            self.line(
                json!({"step": step, "event": "invert", "damping": l.damping, "lambda": lams, "failed": failed}),
            )?;
        }
        if let Some(rp) = &l.reprojected {
            let ks: Vec<f64> = rp.k.iter().map(|&k| k as f64).collect();
            put("grit_k_mean", ks.iter().sum::<f64>() / ks.len().max(1) as f64);
            let top = rp.eigs_a.iter().filter_map(|v| v.first()).fold(0f32, |a, &b| a.max(b));
            put("grit_top_eig_a_max", f64::from(top));
            let names: Vec<&str> = g.modules.iter().map(|m| m.name.as_str()).collect();
            let mut ev = json!({"step": step, "event": "reproject", "k": rp.k,
                "effective_param_ratio": rp.effective_param_ratio, "modules": names});
            if g.cfg.log_fisher_spectrum {
                let n = g.cfg.log_top_eigs;
                let top =
                    |v: &Vec<Vec<f32>>| -> Vec<Vec<f32>> { v.iter().map(|e| e[..n.min(e.len())].to_vec()).collect() };
                let (ta, tg) = (top(&rp.eigs_a), top(&rp.eigs_g));
                let mut scalars: Vec<(String, f64)> = Vec::new();
                for (mi, m) in g.modules.iter().enumerate() {
                    for (j, v) in ta[mi].iter().enumerate() {
                        scalars.push((format!("grit_eig_a/{}/{j}", m.name), f64::from(*v)));
                    }
                    for (j, v) in tg[mi].iter().enumerate() {
                        scalars.push((format!("grit_eig_g/{}/{j}", m.name), f64::from(*v)));
                    }
                    scalars.push((format!("grit_k/{}", m.name), rp.k[mi] as f64));
                }
                ev["top_eigs_a"] = json!(ta);
                ev["top_eigs_g"] = json!(tg);
                let refs: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                events.add_scalars(step, &refs)?;
            }
            self.line(ev)?;
            if g.cfg.log_eig_heatmaps {
                let title = format!("GRIT: eigenvalues of the input factor at step {step}");
                let path = self.dir.join(format!("grit-eigs-step-{step}.png"));
                plot_heatmap(&path, &title, "eigen-index (descending)", "module", &rp.eigs_a)?;
            }
        }
        Ok(())
    }
}

/// The error that stops a run at `step` for a NaN or infinite loss or gradient (`what`), naming
/// the last checkpoint, which the step did not touch.
fn nonfinite_error(what: &str, step: usize, ckpts: &CheckpointManager) -> Result<Error> {
    let last = match ckpts.list()?.last() {
        Some((s, p)) => format!("checkpoint-{s} ({}); resume from it with --resume latest", p.display()),
        None => "none (no checkpoint was written yet)".into(),
    };
    Ok(Error::Invalid(format!(
        "step {step}: {what}: stopping, the adapter was not updated. The last good checkpoint is {last}. \
         Lower optim.lr or optim.max_grad_norm, check the data, or set train.skip_nonfinite = true to skip such steps"
    )))
}

/// Trains a LoRA adapter as `cfg` says and writes the run directory.
pub fn train(cfg: &TrainConfig, hooks: Hooks<'_>) -> Result<TrainOutcome> {
    cfg.validate()?;
    let t_start = Instant::now();
    let run_dir = cfg.output.dir.clone();
    std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    let mut progress = hooks.progress.then(|| Progress::stderr(0));
    // The library does not print on its own: messages go to the progress display when the caller
    // asked for one, and are returned in the outcome either way.
    let mut notes: Vec<String> = Vec::new();
    let mut say = |p: &mut Option<Progress>, msg: &str| {
        if let Some(p) = p {
            p.message(msg);
        }
        notes.push(msg.to_string());
    };

    let tok = Tokenizer::from_dir(&cfg.model.path)?;
    let mut model = load_base(cfg)?;
    tok.check_fits_model(model.cfg.vocab_size)?;
    let ctx = model.cfg.max_position_embeddings;
    if cfg.data.max_seq_len > ctx {
        return Err(Error::Invalid(format!(
            "data.max_seq_len = {} is longer than the model's context ({ctx}, max_position_embeddings in {}): \
             set data.max_seq_len to {ctx} or less (longer examples are truncated and counted)",
            cfg.data.max_seq_len,
            cfg.model.path.join("config.json").display()
        )));
    }
    say(
        &mut progress,
        &format!(
            "model {}: {} layers, base {:?}, {:.0} MiB of weights",
            cfg.model.path.display(),
            model.cfg.num_layers,
            cfg.model.base_precision,
            model.weight_bytes() as f64 / (1 << 20) as f64
        ),
    );
    let data = prepare_data(cfg, &tok)?;
    for line in &data.report {
        say(&mut progress, line);
    }
    let spec = lora_spec(cfg);
    let n_mod = init_lora(&mut model, &spec, cfg.lora_init_seed())?;
    let n_params: usize = lora_params(&model).iter().map(|p| p.len()).sum();
    say(
        &mut progress,
        &format!("LoRA r={} alpha={} on {n_mod} modules: {n_params} trainable parameters", spec.r, spec.alpha),
    );

    let bopts = BatchOptions {
        batch_size: cfg.train.batch_size,
        packing: cfg.data.packing,
        max_len: cfg.data.max_seq_len,
        seed: cfg.train.seed,
        group_by_length: !cfg.data.packing,
    };
    let mut batcher = Batcher::new(data.train.clone(), tok.pad_id(), bopts)?;
    let accum = cfg.train.grad_accum;
    let steps_per_epoch = batcher.batches_per_epoch().div_ceil(accum).max(1);
    let total = match cfg.train.max_steps {
        Some(s) => s,
        None => ((cfg.train.epochs * steps_per_epoch as f64).ceil() as usize).max(1),
    };
    let warmup = warmup_steps(&cfg.optim, total);
    let adam = AdamWConfig {
        lr: cfg.optim.lr as f32,
        beta1: cfg.optim.beta1 as f32,
        beta2: cfg.optim.beta2 as f32,
        eps: cfg.optim.eps as f32,
        weight_decay: cfg.optim.weight_decay as f32,
    };
    let mut opt = AdamW::new(adam, &model)?;
    let mut grit = (cfg.optim.optimizer == OptimizerKind::Grit).then(|| {
        let modules = super::step::lora_slots(&model)
            .into_iter()
            .map(|(i, name, lin)| GritModule { name: format!("layers.{i}.{name}"), d_in: lin.k, d_out: lin.n })
            .collect();
        GritState::new(&cfg.grit, spec.r, modules)
    });
    let base_name = cfg.model.path.display().to_string();

    let mut ckpts = CheckpointManager::new(&run_dir, cfg.train.keep_last)?;
    let mut state = TrainerState { max_steps: total, ..Default::default() };
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = match &cfg.output.resume {
        Some(r) => {
            let dir = resolve_resume(&run_dir, r)?;
            state = read_checkpoint(&dir, &mut model, &mut opt, &mut batcher, grit.as_mut())?;
            state.max_steps = total;
            say(&mut progress, &format!("resumed from {} at step {}", dir.display(), state.global_step));
            MetricsWriter::resume(&metrics_path, state.global_step)?
        }
        None => MetricsWriter::open(&metrics_path)?,
    };
    let device = Device::parse(&cfg.train.device)?;
    let dtype = ComputeDtype::parse(&cfg.train.compute_dtype)?;
    let mut engine = Engine::with_dtype(&device, &model, &opt, dtype)?;
    let on = if engine.is_cuda() {
        format!("{device}, {} activations", cfg.train.compute_dtype)
    } else {
        device.to_string()
    };
    say(&mut progress, &format!("training on {on}"));
    if let Some(g) = &grit {
        say(
            &mut progress,
            &format!(
                "optimizer GRIT: {} modules, factors sampled every {} backward passes, inverted every {} steps (λ {}), reprojected every {} steps",
                g.modules.len(),
                g.cfg.grit_cov_update_freq,
                g.cfg.kfac_update_freq,
                g.cfg.kfac_damping,
                g.cfg.reprojection_freq
            ),
        );
    }
    let mut grit_log = match &grit {
        Some(_) => Some(GritLog::open(&run_dir, cfg.output.resume.is_some())?),
        None => None,
    };
    write_atomic(&run_dir.join("config.toml"), cfg.to_toml_string()?.as_bytes())?;
    let mut events = EventWriter::new(&run_dir)?;
    let mut hidden = crate::drift::HiddenTracker::open(
        &run_dir,
        &model,
        cfg.train.track_hidden_every,
        cfg.train.track_examples,
        &data.val,
        state.global_step,
    )?;
    if let Some(h) = hidden.as_mut().filter(|h| h.due(state.global_step)) {
        h.record(state.global_step, &model)?;
    }
    if let Some(p) = &mut progress {
        *p = Progress::stderr(total);
    }

    let dropout = cfg.lora.dropout as f32;
    let mut on_step = hooks.on_step;
    let (mut last_loss, mut tokens, mut interrupted, mut early) = (f64::NAN, 0u64, false, false);
    let mut skipped = 0usize;
    let mut last_eval = None;
    let eval_every = if cfg.train.eval_every > 0 { cfg.train.eval_every } else { steps_per_epoch };
    let pad = tok.pad_id();
    while state.global_step < total {
        let step = state.global_step;
        let t0 = Instant::now();
        let micro: Vec<Batch> = (0..accum).map(|_| batcher.next_batch()).collect();
        let n_targets: usize = micro.iter().map(|b| b.n_targets).sum();
        engine.zero_grads()?;
        let mut loss_sum = 0.0;
        if n_targets > 0 {
            let scale = 1.0 / n_targets as f32;
            for (i, mb) in micro.iter().enumerate() {
                let drop = (dropout > 0.0).then(|| Dropout {
                    p: dropout,
                    seed: mix64(cfg.train.seed ^ mix64((step * accum + i) as u64 + 1)),
                });
                loss_sum += match grit.as_mut() {
                    Some(g) => engine.micro_step_grit(&model, mb, scale, drop, g)?.loss_sum,
                    None => engine.micro_step(&model, mb, scale, drop)?.loss_sum,
                };
            }
        }
        let loss = loss_sum / n_targets.max(1) as f64;
        let lr = lr_at(cfg.optim.scheduler, step, warmup, total, cfg.optim.lr as f32);
        // A NaN or infinite loss or gradient takes no step (the engine leaves the adapter and the
        // optimizer as they were); the run stops, or skips the step when asked to.
        let max_norm = cfg.optim.max_grad_norm as f32;
        let (grad_norm, glog) = match grit.as_mut() {
            _ if !loss.is_finite() => (f32::NAN, None),
            Some(g) => {
                let (n, l) = engine.grit_optimizer_step(&mut model, &mut opt, lr, max_norm, g, step + 1, loss)?;
                (n, Some(l))
            }
            None => (engine.optimizer_step(&mut model, &mut opt, lr, max_norm)?, None),
        };
        let nonfinite = if !loss.is_finite() {
            Some(format!("the loss is {loss}"))
        } else {
            (!grad_norm.is_finite()).then(|| format!("the gradient norm is {grad_norm}"))
        };
        if let Some(what) = &nonfinite {
            if !cfg.train.skip_nonfinite {
                return Err(nonfinite_error(what, step + 1, &ckpts)?);
            }
            skipped += 1;
            let msg =
                format!("step {}: {what}; the step is skipped ({skipped} so far, train.skip_nonfinite)", step + 1);
            match &mut progress {
                Some(p) => p.message(&msg),
                None => log::warn!("{msg}"),
            }
        }

        state.global_step += 1;
        state.batches_seen += accum;
        let step_tokens: u64 = micro.iter().map(|b| b.n_tokens as u64).sum();
        tokens += step_tokens;
        state.num_input_tokens_seen += step_tokens;
        state.epoch = state.batches_seen as f64 / batcher.batches_per_epoch().max(1) as f64;
        last_loss = loss;
        let dt = t0.elapsed().as_secs_f64();
        let mut rec = Record::new(state.global_step, state.epoch);
        rec.loss = loss.is_finite().then_some(loss);
        rec.lr = Some(f64::from(lr));
        rec.grad_norm = grad_norm.is_finite().then_some(f64::from(grad_norm));
        rec.tokens_per_s = Some(step_tokens as f64 / dt.max(1e-9));
        rec.memory_bytes = rss_bytes();
        rec.elapsed_s = Some(t_start.elapsed().as_secs_f64());
        if let (Some(gl), Some(g), Some(l)) = (grit_log.as_mut(), grit.as_ref(), glog.as_ref()) {
            gl.record(state.global_step, g, l, &mut rec, &mut events)?;
        }

        if let Some(h) = hidden.as_mut().filter(|h| h.due(state.global_step)) {
            engine.sync_to_host(&mut model, &mut opt)?;
            h.record(state.global_step, &model)?;
        }

        let at_end = state.global_step == total;
        let mut is_best = false;
        if !data.val.is_empty()
            && (state.global_step.is_multiple_of(eval_every) || at_end)
            && let Some(ev) = evaluate(&engine, &model, &data.val, cfg.train.batch_size, cfg.data.max_seq_len, pad)?
        {
            {
                rec.eval_loss = Some(ev);
                rec.eval_ppl = Some(ev.exp());
                is_best = state.observe_eval(state.global_step, ev);
                last_eval = Some(ev);
                if let Some(p) = cfg.train.early_stopping_patience {
                    early = state.evals_since_best >= p;
                }
            }
        }
        if state.global_step.is_multiple_of(cfg.train.log_every.max(1)) || at_end || rec.eval_loss.is_some() {
            metrics.write(&rec)?;
            let scalars: Vec<(String, f64)> = rec.scalars();
            let refs: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            events.add_scalars(state.global_step, &refs)?;
            state.log_history.push(rec.clone());
        }
        if let Some(p) = &mut progress {
            p.update(state.global_step, loss, f64::from(lr), rec.tokens_per_s.unwrap_or(0.0));
            if let Some(ev) = rec.eval_loss {
                p.message(&format!("step {}: eval loss {ev:.4} (ppl {:.2})", state.global_step, ev.exp()));
            }
        }
        if let Some(cb) = on_step.as_mut()
            && !cb(&rec)
        {
            interrupted = true;
        }
        if hooks.interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
            interrupted = true;
        }
        let save_now = (cfg.train.save_every > 0 && state.global_step.is_multiple_of(cfg.train.save_every))
            || at_end
            || interrupted
            || early
            || is_best;
        if save_now {
            engine.sync_to_host(&mut model, &mut opt)?;
            if let Some(g) = grit.as_mut() {
                engine.sync_grit(g)?;
            }
            let bstate = batcher.state();
            ckpts.save(state.global_step, is_best, |dir| {
                write_checkpoint(dir, &model, &spec, &base_name, &opt, &bstate, &state, grit.as_ref())
            })?;
        }
        if interrupted || early {
            break;
        }
    }
    if let Some(p) = &mut progress {
        p.finish();
    }
    if skipped > 0 {
        notes.push(format!("{skipped} steps skipped for a NaN or infinite loss or gradient"));
    }
    // The run's result: the adapter at the run directory's root, and the summary files.
    engine.sync_to_host(&mut model, &mut opt)?;
    save_peft_adapter(&model, &spec, &base_name, &run_dir)?;
    state.save(&run_dir.join(STATE_FILE))?;
    let train_pts: Vec<(f64, f64)> =
        state.log_history.iter().filter_map(|r| r.loss.map(|l| (r.step as f64, l))).collect();
    let val_pts: Vec<(f64, f64)> =
        state.log_history.iter().filter_map(|r| r.eval_loss.map(|l| (r.step as f64, l))).collect();
    let mut series = vec![Series::new("train", train_pts, 0)];
    if !val_pts.is_empty() {
        series.push(Series::new("validation", val_pts, 1));
    }
    plot_losses(&run_dir.join("loss.png"), "loss", &series)?;
    Ok(TrainOutcome {
        run_dir,
        steps: state.global_step,
        total_steps: total,
        last_loss,
        eval_loss: last_eval,
        seconds: t_start.elapsed().as_secs_f64(),
        tokens,
        interrupted,
        early_stopped: early,
        notes,
    })
}
