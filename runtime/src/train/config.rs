//! The training configuration: one TOML file, grouped in tables.
//!
//! ```toml
//! [model]   path, base_precision
//! [data]    paths, format, template, eval_data, split, max_seq_len, packing, loss_on, buckets, …
//! [lora]    r, alpha, dropout, target_modules, rslora, init_seed
//! [optim]   optimizer, lr, weight_decay, beta1, beta2, eps, max_grad_norm, scheduler, warmup_…
//! [train]   epochs, max_steps, batch_size, grad_accum, seed, eval_every, save_every, …
//! [output]  dir, resume
//! [grit]    the GRIT optimizer's fields (docs/grit.md §7), read when optim.optimizer = "grit"
//! ```
//!
//! Every key is addressed by its dotted name everywhere: in the file (`[lora]` then `r = 8`), in
//! `--set lora.r=8`, and in error messages. There is one scheme only (no flat `lr=`): a flat or
//! foreign name (`lr`, `learning_rate`, `lora_rank`) is refused with the dotted key to use instead.
//! Only `model.path`, `data.paths` and `output.dir` have no default.
//!
//! Sources are merged key by key, later winning: the file, then the CLI's own flags (a
//! [`toml::Table`] the CLI builds with [`set_key`]), then each `--set key=value` in order.
//! Each source is checked against the key table below before merging, so an error names the
//! source it came from; serde only converts the result, and [`TrainConfig::validate`] checks
//! ranges and relations between fields.
//!
//! The `[grit]` table carries the GRIT optimizer's fields under the names of its reference
//! implementation (`kfac_update_freq`, `reprojection_k`, …), so a recipe written for it reads the
//! same here; its adapter shape is `[lora]`'s (`lora.r`, `lora.alpha`), as for AdamW.

use crate::data::{Format, Template, parse_buckets};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use toml::{Table, Value};

pub use crate::data::LossOn;

/// Storage of the frozen base weights during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BasePrecision {
    /// 4-bit NormalFloat with double quantization (QLoRA).
    Nf4,
    /// bf16 weights (plain LoRA).
    Bf16,
    /// f32 weights (the reference).
    F32,
}

/// The optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// AdamW with decoupled weight decay.
    #[serde(rename = "adamw")]
    AdamW,
    /// GRIT (docs/grit.md): K-FAC preconditioning in the adapters' rank space, Fisher-guided
    /// reprojection and rank adaptation, on top of AdamW; configured by `[grit]`.
    Grit,
}

/// The learning-rate schedule, as transformers defines it (see [`super::schedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    /// Linear warmup, then linear decay to 0 at the last step.
    Linear,
    /// Linear warmup, then half a cosine down to 0 at the last step.
    Cosine,
    /// Linear warmup, then constant.
    Constant,
}

/// `[model]`: the base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A directory with config.json, tokenizer.json and safetensors, or a .gguf file.
    pub path: PathBuf,
    /// How the frozen base weights are stored while training.
    #[serde(default = "default_base_precision")]
    pub base_precision: BasePrecision,
}

/// `[data]`: the training data and how examples become token sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Data files (JSON, JSONL); all are concatenated.
    pub paths: Vec<PathBuf>,
    /// Record format of the files (`alpaca`, `dolly`, `gsm8k`, `chat`, `paraphrase`); `auto` detects
    /// it from the first record.
    #[serde(default = "default_auto")]
    pub format: String,
    /// Prompt template (`alpaca`, `dolly`, `chat`, `plain`, or a custom string with `{field}`
    /// placeholders); `auto` takes the tokenizer's chat template when it has one.
    #[serde(default = "default_auto")]
    pub template: String,
    /// A separate evaluation file; when set, the eval share of `split` is not taken from `paths`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_data: Option<PathBuf>,
    /// Train / eval / test fractions of the data (summing to 1).
    #[serde(default = "default_split")]
    pub split: Vec<f64>,
    /// Longest sequence in tokens; longer examples are truncated.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Pack several short examples into one sequence.
    #[serde(default)]
    pub packing: bool,
    /// Which tokens the loss is computed on.
    #[serde(default = "default_loss_on")]
    pub loss_on: LossOn,
    /// For paraphrase-bucket data: the buckets to train on, as numbers and inclusive ranges
    /// (`"1-3"`, `"1,3,5"`); all when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<String>,
    /// For paraphrase-bucket data: train on each paraphrase's own answer instead of the original.
    #[serde(default)]
    pub use_paraphrase_answers: bool,
    /// Evaluate on at most this many examples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_max_examples: Option<usize>,
}

/// `[lora]`: the adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// Rank of each adapter.
    pub r: usize,
    /// Scale numerator: the update is `alpha / r · B·A` (`alpha / √r` with rslora).
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// Projections that get an adapter.
    pub target_modules: Vec<String>,
    /// Rank-stabilized scaling `alpha / √r`.
    pub rslora: bool,
    /// Seed of the adapters' initialization; the run's `train.seed` when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_seed: Option<u64>,
}

/// `[optim]`: the optimizer and the learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    /// The optimizer.
    pub optimizer: OptimizerKind,
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Adam's first-moment decay.
    pub beta1: f64,
    /// Adam's second-moment decay.
    pub beta2: f64,
    /// Adam's epsilon.
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// The learning-rate schedule.
    pub scheduler: SchedulerKind,
    /// Warmup in optimizer steps; exclusive with `warmup_ratio`.
    pub warmup_steps: usize,
    /// Warmup as a fraction of all optimizer steps (rounded up); exclusive with `warmup_steps`.
    pub warmup_ratio: f64,
}

/// `[train]`: the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Passes over the training data (fractions allowed).
    pub epochs: f64,
    /// Stop after this many optimizer steps; overrides `epochs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Seed of shuffling, dropout and (unless `lora.init_seed`) the adapters.
    pub seed: u64,
    /// Evaluate every this many optimizer steps; 0 = at the end of each epoch.
    pub eval_every: usize,
    /// Save a checkpoint every this many optimizer steps; 0 = only at the end.
    pub save_every: usize,
    /// Checkpoints kept (the best one is kept besides); 0 keeps all.
    pub keep_last: usize,
    /// Stop after this many evaluations without a better eval loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stopping_patience: Option<usize>,
    /// Log metrics every this many optimizer steps.
    pub log_every: usize,
    /// Where to train: `auto` (the GPU when there is one), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Activations on a GPU: `bf16` (fast) or `f32` (matches the CPU to f32 rounding).
    pub compute_dtype: String,
    /// A step whose loss or gradients are NaN or infinite is skipped (no update, counted in the
    /// log) instead of stopping the run.
    pub skip_nonfinite: bool,
    /// Record every layer's hidden states (mean over tokens) of `track_examples` validation
    /// examples at step 0 and every this many steps, for `gristmill drift`; 0 = off.
    pub track_hidden_every: usize,
    /// How many validation examples `track_hidden_every` records.
    pub track_examples: usize,
}

/// `[output]`: where the run goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// The run directory: checkpoints, metrics, the resolved config, the adapter.
    pub dir: PathBuf,
    /// Resume from this checkpoint directory, or `latest` for the newest one in `dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

/// How GRIT's preconditioner pairs the factors with the gradients (docs/grit.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GritPairing {
    /// The reference's: ∇A ← (Σa + λI)⁻¹ ∇A and ∇B ← ∇B (Σg + λI)⁻¹.
    Grit,
    /// Textbook per-matrix K-FAC: A with Σg, B with Σa.
    Kfac,
}

/// `[grit]`: the GRIT optimizer (docs/grit.md). Defaults are the reference implementation's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GritSection {
    /// Recompute the damped inverses every this many optimizer steps.
    pub kfac_update_freq: usize,
    /// The damping λ added to both factors before inversion.
    pub kfac_damping: f64,
    /// Token rows a module's factors need before they are inverted or projected.
    pub kfac_min_samples: usize,
    /// Sample the factors on every this many backward passes (micro-batches).
    pub grit_cov_update_freq: usize,
    /// Reproject the adapters every this many optimizer steps.
    pub reprojection_freq: usize,
    /// Directions kept by the reprojection when rank adaptation is off.
    pub reprojection_k: usize,
    /// Project B on Σg's eigenvectors (else on Σa's).
    pub use_two_sided_reprojection: bool,
    /// Log the top eigenvalues of every module's factors at each reprojection.
    pub log_fisher_spectrum: bool,
    /// How many eigenvalues `log_fisher_spectrum` logs per module.
    pub log_top_eigs: usize,
    /// Draw the eigenvalue heat-map (modules × eigen-index) at each reprojection.
    pub log_eig_heatmaps: bool,
    /// Weight of the curvature regularizer tr(AᵀΣaA) + tr(BΣgBᵀ).
    pub lambda_kfac: f64,
    /// Weight of the reprojection regularizer ‖(I − Pa)A‖² + ‖B(I − Pg)‖².
    pub lambda_reproj: f64,
    /// Steps over which the regularizers ramp up linearly (0: full weight from the start).
    pub regularizer_warmup_steps: usize,
    /// No reprojection before this step.
    pub reprojection_warmup_steps: usize,
    /// No natural-gradient preconditioning before this step.
    pub ng_warmup_steps: usize,
    /// Rank adaptation starts at this step.
    pub rank_adaptation_start_step: usize,
    /// Choose each module's k by the energy threshold instead of `reprojection_k`.
    pub enable_rank_adaptation: bool,
    /// Fraction of Σa's trace the kept directions must hold.
    pub rank_adaptation_threshold: f64,
    /// The smallest k rank adaptation may choose.
    pub min_lora_rank: usize,
    /// 0: the factors are the equal-weight mean of every sample (the reference); in (0, 1): an
    /// exponential moving average with this decay.
    pub factor_decay: f64,
    /// Which factor preconditions which gradient.
    pub pairing: GritPairing,
    /// Replace λ by clip(0.001 + std(last 20 losses), 1e-6, 1e-2) once 10 losses exist.
    pub adaptive_damping: bool,
    /// Stretch (×1.5) or shrink (×0.75) both frequencies by the recent loss trend.
    pub adaptive_frequency: bool,
    /// Project AdamW's moments along with the adapters at each reprojection.
    pub project_optimizer_state: bool,
}

impl Default for GritSection {
    fn default() -> Self {
        GritSection {
            kfac_update_freq: 50,
            kfac_damping: 1e-3,
            kfac_min_samples: 64,
            grit_cov_update_freq: 15,
            reprojection_freq: 50,
            reprojection_k: 8,
            use_two_sided_reprojection: true,
            log_fisher_spectrum: true,
            log_top_eigs: 8,
            log_eig_heatmaps: true,
            lambda_kfac: 1e-5,
            lambda_reproj: 1e-4,
            regularizer_warmup_steps: 0,
            reprojection_warmup_steps: 0,
            ng_warmup_steps: 0,
            rank_adaptation_start_step: 0,
            enable_rank_adaptation: true,
            rank_adaptation_threshold: 0.99,
            min_lora_rank: 4,
            factor_decay: 0.0,
            pairing: GritPairing::Grit,
            adaptive_damping: false,
            adaptive_frequency: false,
            project_optimizer_state: false,
        }
    }
}

/// Everything a training run is configured by. Load it with [`TrainConfig::load`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `[model]`
    pub model: ModelSection,
    /// `[data]`
    pub data: DataSection,
    /// `[lora]`
    #[serde(default)]
    pub lora: LoraSection,
    /// `[optim]`
    #[serde(default)]
    pub optim: OptimSection,
    /// `[train]`
    #[serde(default)]
    pub train: TrainSection,
    /// `[output]`
    pub output: OutputSection,
    /// `[grit]`
    #[serde(default)]
    pub grit: GritSection,
}

fn default_base_precision() -> BasePrecision {
    BasePrecision::Nf4
}
fn default_auto() -> String {
    "auto".to_string()
}
fn default_split() -> Vec<f64> {
    crate::data::DEFAULT_SPLIT.to_vec()
}
fn default_max_seq_len() -> usize {
    512
}
fn default_loss_on() -> LossOn {
    LossOn::Response
}

/// The projections of a Llama-family block, in the order PEFT users list them.
pub const LLAMA_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: LLAMA_MODULES.iter().map(|s| s.to_string()).collect(),
            rslora: false,
            init_seed: None,
        }
    }
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            optimizer: OptimizerKind::AdamW,
            lr: 2e-4,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            scheduler: SchedulerKind::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            epochs: 1.0,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            seed: 42,
            eval_every: 0,
            save_every: 0,
            keep_last: 2,
            early_stopping_patience: None,
            log_every: 1,
            device: "auto".into(),
            compute_dtype: "bf16".into(),
            skip_nonfinite: false,
            track_hidden_every: 0,
            track_examples: 8,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The key table. serde knows the fields too, but not how to explain them: this table gives every
// key its type (to parse `--set` values and to word type errors), whether it is required, and a
// one-line description (for a CLI to list). A test keeps it in sync with the
// structs above.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Str,
    Path,
    Int,
    Float,
    Bool,
    Paths,
    Strs,
    Floats,
    Choice(&'static [&'static str]),
}

struct KeySpec {
    name: &'static str,
    kind: Kind,
    required: bool,
    doc: &'static str,
}

const fn key(name: &'static str, kind: Kind, doc: &'static str) -> KeySpec {
    KeySpec { name, kind, required: false, doc }
}

const fn required(name: &'static str, kind: Kind, doc: &'static str) -> KeySpec {
    KeySpec { name, kind, required: true, doc }
}

const SECTIONS: [&str; 7] = ["model", "data", "lora", "optim", "train", "output", "grit"];

const KEYS: &[KeySpec] = &[
    required(
        "model.path",
        Kind::Path,
        "the base model: a directory with config.json, safetensors and tokenizer.json (import a GGUF with gristmill import-gguf)",
    ),
    key("model.base_precision", Kind::Choice(&["nf4", "bf16", "f32"]), "storage of the frozen base weights (nf4)"),
    required("data.paths", Kind::Paths, "training data files, JSON or JSONL"),
    key("data.format", Kind::Str, "record format of the data files (auto)"),
    key("data.template", Kind::Str, "prompt template (auto: the tokenizer's chat template)"),
    key("data.eval_data", Kind::Path, "a separate evaluation data file"),
    key("data.split", Kind::Floats, "train/eval/test fractions ([0.8, 0.1, 0.1])"),
    key("data.max_seq_len", Kind::Int, "longest sequence in tokens (512)"),
    key("data.packing", Kind::Bool, "pack short examples into one sequence (false)"),
    key("data.loss_on", Kind::Choice(&["response", "all"]), "tokens the loss is computed on (response)"),
    key("data.buckets", Kind::Str, "paraphrase buckets to train on: 1-3, 1,3,5 (all)"),
    key("data.use_paraphrase_answers", Kind::Bool, "train on each paraphrase's own answer (false)"),
    key("data.eval_max_examples", Kind::Int, "evaluate on at most this many examples"),
    key("lora.r", Kind::Int, "adapter rank (16)"),
    key("lora.alpha", Kind::Float, "adapter scale numerator (32)"),
    key("lora.dropout", Kind::Float, "dropout on the adapter input (0.05)"),
    key("lora.target_modules", Kind::Strs, "projections that get an adapter (all seven)"),
    key("lora.rslora", Kind::Bool, "rank-stabilized scale alpha/sqrt(r) (false)"),
    key("lora.init_seed", Kind::Int, "seed of the adapters' initialization (train.seed)"),
    key("optim.optimizer", Kind::Choice(&["adamw", "grit"]), "the optimizer (adamw)"),
    key("optim.lr", Kind::Float, "peak learning rate (2e-4)"),
    key("optim.weight_decay", Kind::Float, "decoupled weight decay (0)"),
    key("optim.beta1", Kind::Float, "Adam beta1 (0.9)"),
    key("optim.beta2", Kind::Float, "Adam beta2 (0.999)"),
    key("optim.eps", Kind::Float, "Adam epsilon (1e-8)"),
    key("optim.max_grad_norm", Kind::Float, "gradient-norm clipping, 0 = off (1.0)"),
    key("optim.scheduler", Kind::Choice(&["linear", "cosine", "constant"]), "learning-rate schedule (linear)"),
    key("optim.warmup_steps", Kind::Int, "warmup in optimizer steps (0)"),
    key("optim.warmup_ratio", Kind::Float, "warmup as a fraction of all steps (0)"),
    key("train.epochs", Kind::Float, "passes over the data (1)"),
    key("train.max_steps", Kind::Int, "stop after this many optimizer steps (overrides epochs)"),
    key("train.batch_size", Kind::Int, "sequences per micro-batch (4)"),
    key("train.grad_accum", Kind::Int, "micro-batches per optimizer step (1)"),
    key("train.seed", Kind::Int, "run seed (42)"),
    key("train.eval_every", Kind::Int, "evaluate every N steps, 0 = each epoch's end (0)"),
    key("train.save_every", Kind::Int, "checkpoint every N steps, 0 = at the end (0)"),
    key("train.keep_last", Kind::Int, "checkpoints kept besides the best, 0 = all (2)"),
    key("train.early_stopping_patience", Kind::Int, "stop after N evaluations without improvement"),
    key("train.log_every", Kind::Int, "log metrics every N steps (1)"),
    key("train.device", Kind::Str, "auto, cpu, cuda or cuda:N (auto: the GPU when there is one)"),
    key("train.compute_dtype", Kind::Choice(&["bf16", "f32"]), "activations on a GPU (bf16)"),
    key("train.skip_nonfinite", Kind::Bool, "skip a step with NaN/inf loss or gradients instead of stopping (false)"),
    key("train.track_hidden_every", Kind::Int, "record hidden states for gristmill drift every N steps, 0 = off (0)"),
    key("train.track_examples", Kind::Int, "validation examples whose hidden states are recorded (8)"),
    required("output.dir", Kind::Path, "the run directory"),
    key("output.resume", Kind::Str, "resume from a checkpoint directory, or `latest`"),
    key("grit.kfac_update_freq", Kind::Int, "invert the K-FAC factors every N steps (50)"),
    key("grit.kfac_damping", Kind::Float, "damping added before inversion (1e-3)"),
    key("grit.kfac_min_samples", Kind::Int, "token rows needed before a module's factors are used (64)"),
    key("grit.grit_cov_update_freq", Kind::Int, "sample the factors every N backward passes (15)"),
    key("grit.reprojection_freq", Kind::Int, "reproject the adapters every N steps (50)"),
    key("grit.reprojection_k", Kind::Int, "directions kept without rank adaptation (8)"),
    key("grit.use_two_sided_reprojection", Kind::Bool, "project B on the output-side factor (true)"),
    key("grit.log_fisher_spectrum", Kind::Bool, "log the factors' top eigenvalues (true)"),
    key("grit.log_top_eigs", Kind::Int, "eigenvalues logged per module (8)"),
    key("grit.log_eig_heatmaps", Kind::Bool, "draw the eigenvalue heat-map PNG (true)"),
    key("grit.lambda_kfac", Kind::Float, "curvature regularizer weight (1e-5)"),
    key("grit.lambda_reproj", Kind::Float, "reprojection regularizer weight (1e-4)"),
    key("grit.regularizer_warmup_steps", Kind::Int, "linear ramp of the regularizers (0)"),
    key("grit.reprojection_warmup_steps", Kind::Int, "no reprojection before this step (0)"),
    key("grit.ng_warmup_steps", Kind::Int, "no preconditioning before this step (0)"),
    key("grit.rank_adaptation_start_step", Kind::Int, "rank adaptation starts at this step (0)"),
    key("grit.enable_rank_adaptation", Kind::Bool, "choose k by the energy threshold (true)"),
    key("grit.rank_adaptation_threshold", Kind::Float, "energy the kept directions hold (0.99)"),
    key("grit.min_lora_rank", Kind::Int, "smallest k rank adaptation may choose (4)"),
    key("grit.factor_decay", Kind::Float, "0: cumulative mean of the factors; else EMA decay (0)"),
    key("grit.pairing", Kind::Choice(&["grit", "kfac"]), "which factor preconditions which gradient (grit)"),
    key("grit.adaptive_damping", Kind::Bool, "damping from the recent loss spread (false)"),
    key("grit.adaptive_frequency", Kind::Bool, "frequencies from the recent loss trend (false)"),
    key("grit.project_optimizer_state", Kind::Bool, "project AdamW moments at reprojection (false)"),
];

/// Every configuration key with a one-line description (default in parentheses), in file order.
pub fn config_keys() -> impl Iterator<Item = (&'static str, &'static str)> {
    KEYS.iter().map(|k| (k.name, k.doc))
}

fn spec(name: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.name == name)
}

/// Names other tools use (transformers' TrainingArguments, PEFT, the GRIT reference) that users
/// bring along, mapped to ours. Looked up by the last segment of an unknown key.
const ALIASES: &[(&str, &str)] = &[
    ("learning_rate", "optim.lr"),
    ("lr_scheduler_type", "optim.scheduler"),
    ("adam_beta1", "optim.beta1"),
    ("adam_beta2", "optim.beta2"),
    ("adam_epsilon", "optim.eps"),
    ("num_train_epochs", "train.epochs"),
    ("per_device_train_batch_size", "train.batch_size"),
    ("gradient_accumulation_steps", "train.grad_accum"),
    ("save_total_limit", "train.keep_last"),
    ("logging_steps", "train.log_every"),
    ("eval_steps", "train.eval_every"),
    ("save_steps", "train.save_every"),
    ("output_dir", "output.dir"),
    ("model_name_or_path", "model.path"),
    ("resume_from_checkpoint", "output.resume"),
    ("lora_rank", "lora.r"),
    ("rank", "lora.r"),
    ("lora_r", "lora.r"),
    ("lora_alpha", "lora.alpha"),
    ("lora_dropout", "lora.dropout"),
    ("use_rslora", "lora.rslora"),
    ("max_seq_length", "data.max_seq_len"),
    ("max_length", "data.max_seq_len"),
    ("precision", "model.base_precision"),
];

use crate::util::edit_distance;

/// The valid key a user most likely meant by `unknown` (a dotted key or a bare name).
pub(crate) fn suggest(unknown: &str) -> Option<&'static str> {
    let leaf = unknown.rsplit('.').next().unwrap_or(unknown);
    if let Some((_, to)) = ALIASES.iter().find(|(from, _)| *from == leaf) {
        return Some(to);
    }
    let leaf_of = |name: &'static str| name.rsplit('.').next().unwrap_or(name);
    let near = (leaf.chars().count() / 3).max(2);
    // A typo within the right table (`data.path`, `train.batchsize`) first…
    if let Some((section, _)) = unknown.split_once('.') {
        let same = KEYS
            .iter()
            .filter(|k| k.name.split_once('.').map(|(s, _)| s) == Some(section))
            .map(|k| (k.name, edit_distance(leaf, leaf_of(k.name))))
            .min_by_key(|&(_, d)| d);
        if let Some((name, d)) = same
            && d <= near
        {
            return Some(name);
        }
    }
    // …then the right name in the wrong table (`train.lr`) or in none (`lr`)…
    if let Some(k) = KEYS.iter().find(|k| leaf_of(k.name) == leaf) {
        return Some(k.name);
    }
    // …then the closest name anywhere.
    let (best, dist) = KEYS.iter().map(|k| (k.name, edit_distance(leaf, leaf_of(k.name)))).min_by_key(|&(_, d)| d)?;
    (dist <= near).then_some(best)
}

fn unknown_key_msg(key: &str, origin: &str) -> String {
    if let Some(s) = suggest(key) {
        return format!("unknown key `{key}` {origin}; did you mean `{s}`?");
    }
    // No close match: list what the table has, or the tables.
    let section = key.split_once('.').map(|(s, _)| s).filter(|s| SECTIONS.contains(s));
    match section {
        Some(section) => {
            let fields: Vec<&str> =
                KEYS.iter().filter_map(|k| k.name.strip_prefix(section)?.strip_prefix('.')).collect();
            format!("unknown key `{key}` {origin}; the keys of [{section}] are {}", fields.join(", "))
        }
        None => format!("unknown key `{key}` {origin}; keys are `table.key`, with tables {}", SECTIONS.join(", ")),
    }
}

fn unknown_section_msg(section: &str, origin: &str) -> String {
    // `[optimizer]`, `[training]`, `[out]`: a table name that extends or shortens ours.
    let close = SECTIONS
        .iter()
        .map(|s| {
            let d = if section.starts_with(s) || s.starts_with(section) { 0 } else { edit_distance(section, s) };
            (*s, d)
        })
        .min_by_key(|&(_, d)| d);
    match close {
        Some((s, d)) if d <= 2 => format!("unknown table `[{section}]` {origin}; did you mean `[{s}]`?"),
        _ => format!(
            "unknown table `[{section}]` {origin}; the tables are {}",
            SECTIONS.map(|s| format!("[{s}]")).join(" ")
        ),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

fn expected(kind: Kind) -> String {
    match kind {
        Kind::Str => "a string".into(),
        Kind::Path => "a path (string)".into(),
        Kind::Int => "a non-negative integer".into(),
        Kind::Float => "a number".into(),
        Kind::Bool => "true or false".into(),
        Kind::Paths => "an array of paths".into(),
        Kind::Strs => "an array of strings".into(),
        Kind::Floats => "an array of numbers".into(),
        Kind::Choice(c) => format!("one of {}", c.join(", ")),
    }
}

/// Checks (and normalizes: a single path where a list is expected becomes a list of one) the value
/// of one key. Returns the message on a mismatch.
fn check_value(name: &str, kind: Kind, v: &mut Value, origin: &str) -> std::result::Result<(), String> {
    let ok = match (kind, &*v) {
        (Kind::Str | Kind::Path, Value::String(_)) => true,
        (Kind::Int, Value::Integer(i)) => *i >= 0,
        (Kind::Float, Value::Integer(_) | Value::Float(_)) => true,
        (Kind::Bool, Value::Boolean(_)) => true,
        (Kind::Paths | Kind::Strs, Value::String(_)) => {
            *v = Value::Array(vec![v.clone()]);
            true
        }
        (Kind::Paths | Kind::Strs, Value::Array(a)) => a.iter().all(|x| matches!(x, Value::String(_))),
        (Kind::Floats, Value::Array(a)) => a.iter().all(|x| matches!(x, Value::Integer(_) | Value::Float(_))),
        (Kind::Choice(choices), Value::String(s)) => {
            if choices.contains(&s.as_str()) {
                true
            } else {
                let close = choices.iter().map(|c| (*c, edit_distance(s, c))).min_by_key(|&(_, d)| d);
                let hint = match close {
                    Some((c, d)) if d <= 2 => format!(" (did you mean `{c}`?)"),
                    _ => String::new(),
                };
                return Err(format!("`{name}` {origin} must be {}, found `{s}`{hint}", expected(kind)));
            }
        }
        _ => false,
    };
    if ok { Ok(()) } else { Err(format!("`{name}` {origin} must be {}, found {} `{v}`", expected(kind), type_name(v))) }
}

/// Checks every key of one source (`origin` says which, for the message) against the key table,
/// collecting all problems into one error.
fn check_source(t: &mut Table, origin: &str) -> Result<()> {
    let mut errors = Vec::new();
    for (section, v) in t.iter_mut() {
        if !SECTIONS.contains(&section.as_str()) {
            // A top-level scalar is most likely a flat key (`lr = 1e-4`): suggest its dotted name.
            if matches!(v, Value::Table(_)) {
                errors.push(unknown_section_msg(section, origin));
            } else {
                errors.push(unknown_key_msg(section, origin));
            }
            continue;
        }
        let Value::Table(st) = v else {
            errors.push(format!("`{section}` {origin} must be a table ([{section}]), found {}", type_name(v)));
            continue;
        };
        for (k, val) in st.iter_mut() {
            let name = format!("{section}.{k}");
            match spec(&name) {
                Some(s) => {
                    if let Err(e) = check_value(&name, s.kind, val, origin) {
                        errors.push(e);
                    }
                }
                None => errors.push(unknown_key_msg(&name, origin)),
            }
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(Error::config(errors.join("\n"))) }
}

/// Merges `over` into `base`, key by key (tables recursively, everything else replaced).
fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Sets the dotted `key` (e.g. `lora.r`) in `table`, creating the section table as needed. For the
/// CLI to turn its own flags (`--lr`, `--out`) into the table [`TrainConfig::load`] merges.
pub fn set_key(table: &mut Table, key: &str, value: Value) -> Result<()> {
    let Some((section, field)) = key.split_once('.') else {
        return Err(Error::config(unknown_key_msg(key, "in the flags")));
    };
    let entry = table.entry(section.to_string()).or_insert_with(|| Value::Table(Table::new()));
    match entry {
        Value::Table(t) => {
            t.insert(field.to_string(), value);
            Ok(())
        }
        other => Err(Error::config(format!("`{section}` must be a table, found {}", type_name(other)))),
    }
}

/// Strips one pair of matching quotes, so `--set data.template='"chatml"'` and `=chatml` agree.
fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && ((s.starts_with('"') && s.ends_with('"')) || (s.starts_with('\'') && s.ends_with('\''))) {
        if let Ok(Value::String(v)) = s.parse::<Value>() {
            return v;
        }
        return s[1..s.len() - 1].to_string();
    }
    s.to_string()
}

/// Parses a `--set` value for a key of type `kind`. Strings need no quotes; lists are a TOML array
/// or comma-separated (`q_proj,v_proj`, `[q_proj, v_proj]`, `0.9,0.1,0`).
fn parse_set_value(raw: &str, kind: Kind) -> Option<Value> {
    let raw = raw.trim();
    match kind {
        Kind::Str | Kind::Path | Kind::Choice(_) => Some(Value::String(unquote(raw))),
        Kind::Int | Kind::Float | Kind::Bool => raw.parse::<Value>().ok(),
        Kind::Paths | Kind::Strs | Kind::Floats => {
            if raw.starts_with('[')
                && let Ok(v @ Value::Array(_)) = raw.parse::<Value>()
            {
                return Some(v);
            }
            let inner = raw.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(raw);
            let items = inner.split(',').map(str::trim).filter(|s| !s.is_empty());
            if kind == Kind::Floats {
                items.map(|s| s.parse::<Value>().ok()).collect::<Option<Vec<_>>>().map(Value::Array)
            } else {
                Some(Value::Array(items.map(|s| Value::String(unquote(s))).collect()))
            }
        }
    }
}

/// Applies one `--set key=value` to `table`. An empty value (`--set train.max_steps=`) removes an
/// optional key, so a field set by the file can be unset again (an explicit `""` is an empty string).
fn apply_set(table: &mut Table, set: &str) -> Result<()> {
    let Some((key, raw)) = set.split_once('=') else {
        return Err(Error::config(format!("--set expects key=value, found `{set}`")));
    };
    let key = key.trim();
    let origin = format!("in `--set {set}`");
    if SECTIONS.contains(&key) {
        return Err(Error::config(format!("`{key}` is a table; set one of its keys, e.g. `--set {key}.…=…`")));
    }
    let Some(s) = spec(key) else {
        return Err(Error::config(unknown_key_msg(key, &origin)));
    };
    let Some((section, field)) = key.split_once('.') else {
        return Err(Error::config(unknown_key_msg(key, &origin)));
    };
    if raw.trim().is_empty() && !s.required {
        if let Some(Value::Table(t)) = table.get_mut(section) {
            t.remove(field);
        }
        return Ok(());
    }
    let mut value = parse_set_value(raw, s.kind).ok_or_else(|| {
        Error::config(format!("`{key}` {origin} must be {}, found `{}`", expected(s.kind), raw.trim()))
    })?;
    check_value(key, s.kind, &mut value, &origin).map_err(Error::config)?;
    set_key(table, key, value)
}

impl TrainConfig {
    /// Loads the configuration from `file` (if any), then the CLI's `flags` (a table of dotted keys
    /// built with [`set_key`]), then each `--set key=value` in `sets`, later sources winning key by
    /// key; then checks it with [`TrainConfig::validate`].
    pub fn load(file: Option<&Path>, flags: &Table, sets: &[String]) -> Result<Self> {
        let mut table = Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let mut t: Table = text.parse().map_err(|e: toml::de::Error| Error::format(path, e.to_string()))?;
            check_source(&mut t, &format!("in {}", path.display()))?;
            merge(&mut table, t);
        }
        let mut flags = flags.clone();
        check_source(&mut flags, "in the command-line flags")?;
        merge(&mut table, flags);
        for set in sets {
            apply_set(&mut table, set)?;
        }
        Self::from_table(table)
    }

    /// Parses a configuration from TOML text (as [`TrainConfig::load`] does a file), and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let mut t: Table = text.parse().map_err(|e: toml::de::Error| Error::config(e.to_string()))?;
        check_source(&mut t, "in the config")?;
        Self::from_table(t)
    }

    fn from_table(table: Table) -> Result<Self> {
        let missing: Vec<String> = KEYS
            .iter()
            .filter(|k| k.required)
            .filter(|k| {
                let (section, field) = k.name.split_once('.').unwrap_or((k.name, ""));
                !matches!(table.get(section), Some(Value::Table(t)) if t.contains_key(field))
            })
            .map(|k| format!("missing `{}`, {}; set it in the config file or with `--set {}=…`", k.name, k.doc, k.name))
            .collect();
        if !missing.is_empty() {
            return Err(Error::config(missing.join("\n")));
        }
        let cfg: TrainConfig =
            Value::Table(table).try_into().map_err(|e: toml::de::Error| Error::config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges and relations between fields, reporting every problem at once.
    pub fn validate(&self) -> Result<()> {
        let mut e: Vec<String> = Vec::new();
        let mut check = |ok: bool, msg: String| {
            if !ok {
                e.push(msg);
            }
        };
        let (d, l, o, t) = (&self.data, &self.lora, &self.optim, &self.train);

        check(!self.model.path.as_os_str().is_empty(), "`model.path` is empty".into());
        check(!d.paths.is_empty(), "`data.paths` is empty: give at least one data file".into());
        check(d.paths.iter().all(|p| !p.as_os_str().is_empty()), "`data.paths` has an empty path".into());
        if d.split.len() != 3 {
            check(false, format!("`data.split` must have 3 fractions (train, eval, test), found {}", d.split.len()));
        } else {
            let sum: f64 = d.split.iter().sum();
            check(
                d.split.iter().all(|x| (0.0..=1.0).contains(x)),
                format!("`data.split` fractions must be in [0, 1], found {:?}", d.split),
            );
            check(d.split[0] > 0.0, "`data.split` leaves no training data (the first fraction is 0)".into());
            check((sum - 1.0).abs() <= 1e-6, format!("`data.split` must sum to 1, found {:?} (sum {sum})", d.split));
        }
        check(d.max_seq_len >= 2, format!("`data.max_seq_len` must be ≥ 2, found {}", d.max_seq_len));
        if let Err(err) = d.buckets() {
            check(false, format!("`data.buckets`: {err}"));
        }
        if let Err(err) = d.format() {
            check(false, format!("`data.format`: {err}"));
        }
        if !d.template.trim().eq_ignore_ascii_case("auto")
            && let Err(err) = Template::parse(&d.template)
        {
            check(false, format!("`data.template`: {err}"));
        }
        check(d.eval_max_examples != Some(0), "`data.eval_max_examples` must be ≥ 1 (leave it unset for all)".into());

        check(l.r >= 1, format!("`lora.r` must be ≥ 1, found {}", l.r));
        check(l.alpha.is_finite() && l.alpha > 0.0, format!("`lora.alpha` must be > 0, found {}", l.alpha));
        check((0.0..1.0).contains(&l.dropout), format!("`lora.dropout` must be in [0, 1), found {}", l.dropout));
        check(!l.target_modules.is_empty(), "`lora.target_modules` is empty: give at least one projection".into());
        for (i, m) in l.target_modules.iter().enumerate() {
            if !LLAMA_MODULES.contains(&m.as_str()) {
                let close = LLAMA_MODULES.iter().map(|c| (*c, edit_distance(m, c))).min_by_key(|&(_, d)| d);
                let hint = match close {
                    Some((c, dist)) if dist <= 3 => format!("; did you mean `{c}`?"),
                    _ => format!("; the projections are {}", LLAMA_MODULES.join(", ")),
                };
                check(false, format!("`lora.target_modules` has unknown projection `{m}`{hint}"));
            } else if l.target_modules[..i].contains(m) {
                check(false, format!("`lora.target_modules` lists `{m}` twice"));
            }
        }

        check(o.lr.is_finite() && o.lr > 0.0, format!("`optim.lr` must be > 0, found {}", o.lr));
        check(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            format!("`optim.weight_decay` must be ≥ 0, found {}", o.weight_decay),
        );
        check((0.0..1.0).contains(&o.beta1), format!("`optim.beta1` must be in [0, 1), found {}", o.beta1));
        check((0.0..1.0).contains(&o.beta2), format!("`optim.beta2` must be in [0, 1), found {}", o.beta2));
        check(o.eps.is_finite() && o.eps > 0.0, format!("`optim.eps` must be > 0, found {}", o.eps));
        check(
            o.max_grad_norm.is_finite() && o.max_grad_norm >= 0.0,
            format!("`optim.max_grad_norm` must be ≥ 0 (0 turns clipping off), found {}", o.max_grad_norm),
        );
        check(
            (0.0..1.0).contains(&o.warmup_ratio),
            format!("`optim.warmup_ratio` must be in [0, 1), found {}", o.warmup_ratio),
        );
        check(
            o.warmup_steps == 0 || o.warmup_ratio == 0.0,
            format!(
                "`optim.warmup_steps` ({}) and `optim.warmup_ratio` ({}) are both set; set only one",
                o.warmup_steps, o.warmup_ratio
            ),
        );

        if t.max_steps.is_none() {
            check(t.epochs.is_finite() && t.epochs > 0.0, format!("`train.epochs` must be > 0, found {}", t.epochs));
        } else {
            check(t.epochs.is_finite() && t.epochs >= 0.0, format!("`train.epochs` must be ≥ 0, found {}", t.epochs));
        }
        check(t.max_steps != Some(0), "`train.max_steps` must be ≥ 1 (leave it unset to train by epochs)".into());
        check(t.batch_size >= 1, format!("`train.batch_size` must be ≥ 1, found {}", t.batch_size));
        check(t.grad_accum >= 1, format!("`train.grad_accum` must be ≥ 1, found {}", t.grad_accum));
        check(t.log_every >= 1, format!("`train.log_every` must be ≥ 1, found {}", t.log_every));
        let dev = t.device.trim();
        check(
            matches!(dev, "auto" | "cpu" | "cuda" | "gpu")
                || dev.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok()),
            format!("`train.device` must be auto, cpu, cuda or cuda:N, found `{dev}`"),
        );
        check(
            matches!(t.compute_dtype.as_str(), "bf16" | "f32"),
            format!("`train.compute_dtype` must be bf16 or f32, found `{}`", t.compute_dtype),
        );
        check(
            t.early_stopping_patience != Some(0),
            "`train.early_stopping_patience` must be ≥ 1 (leave it unset to never stop early)".into(),
        );

        let g = &self.grit;
        for (name, v) in [
            ("kfac_update_freq", g.kfac_update_freq),
            ("grit_cov_update_freq", g.grit_cov_update_freq),
            ("reprojection_freq", g.reprojection_freq),
            ("reprojection_k", g.reprojection_k),
            ("min_lora_rank", g.min_lora_rank),
        ] {
            check(v >= 1, format!("`grit.{name}` must be ≥ 1, found {v}"));
        }
        for (name, v) in
            [("kfac_damping", g.kfac_damping), ("lambda_kfac", g.lambda_kfac), ("lambda_reproj", g.lambda_reproj)]
        {
            check(v.is_finite() && v >= 0.0, format!("`grit.{name}` must be ≥ 0, found {v}"));
        }
        check(
            g.rank_adaptation_threshold > 0.0 && g.rank_adaptation_threshold <= 1.0,
            format!("`grit.rank_adaptation_threshold` must be in (0, 1], found {}", g.rank_adaptation_threshold),
        );
        check(
            (0.0..1.0).contains(&g.factor_decay),
            format!("`grit.factor_decay` must be in [0, 1) (0: cumulative mean), found {}", g.factor_decay),
        );

        check(!self.output.dir.as_os_str().is_empty(), "`output.dir` is empty".into());
        check(
            self.output.resume.as_deref().is_none_or(|r| !r.trim().is_empty()),
            "`output.resume` is empty: give a checkpoint directory or `latest`".into(),
        );

        if e.is_empty() { Ok(()) } else { Err(Error::config(e.join("\n"))) }
    }

    /// The resolved configuration as TOML, for the run directory's `config.toml`; loading it again
    /// gives the same configuration.
    pub fn to_toml_string(&self) -> Result<String> {
        let body = toml::to_string(self).map_err(|e| Error::config(format!("cannot write the config: {e}")))?;
        Ok(format!("# gristmill {} training configuration, as resolved for this run\n\n{body}", crate::VERSION))
    }

    /// The seed of the adapters' initialization: `lora.init_seed`, else `train.seed`.
    pub fn lora_init_seed(&self) -> u64 {
        self.lora.init_seed.unwrap_or(self.train.seed)
    }
}

impl LoraSection {
    /// The factor the adapter's output is multiplied by: `alpha / r`, or `alpha / √r` with rslora.
    pub fn scaling(&self) -> f64 {
        let r = self.r.max(1) as f64;
        if self.rslora { self.alpha / r.sqrt() } else { self.alpha / r }
    }
}

impl DataSection {
    /// The selected paraphrase buckets (`"1-3"`, `"1,3,5"`, `"1-2,5"`), sorted; `None` when unset (all).
    pub fn buckets(&self) -> Result<Option<Vec<u32>>> {
        self.buckets.as_deref().map(parse_buckets).transpose()
    }

    /// The record format named by `format` (`auto` included).
    pub fn format(&self) -> Result<Format> {
        self.format.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[model]\npath = \"m\"\n[data]\npaths = [\"d.jsonl\"]\n[output]\ndir = \"out\"\n";

    fn load_str(text: &str, sets: &[&str]) -> Result<TrainConfig> {
        let dir = std::env::temp_dir().join(format!("gristmill-cfg-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(&path, text).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let r = TrainConfig::load(Some(&path), &Table::new(), &sets);
        std::fs::remove_dir_all(&dir).unwrap();
        r
    }

    fn unique() -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    fn err(r: Result<TrainConfig>) -> String {
        match r {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn with(sets: &[&str]) -> Result<TrainConfig> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let mut t: Table = MIN.parse().unwrap();
        check_source(&mut t, "x").unwrap();
        for s in &sets {
            apply_set(&mut t, s)?;
        }
        TrainConfig::from_table(t)
    }

    #[test]
    fn defaults() {
        let c = TrainConfig::from_toml_str(MIN).unwrap();
        assert_eq!(c.model.path, PathBuf::from("m"));
        assert_eq!(c.model.base_precision, BasePrecision::Nf4);
        assert_eq!(c.data.paths, vec![PathBuf::from("d.jsonl")]);
        assert_eq!(c.data.format, "auto");
        assert_eq!(c.data.template, "auto");
        assert_eq!(c.data.split, vec![0.8, 0.1, 0.1]);
        assert_eq!(c.data.max_seq_len, 512);
        assert!(!c.data.packing);
        assert_eq!(c.data.loss_on, LossOn::Response);
        assert_eq!(c.data.buckets, None);
        assert_eq!(c.lora, LoraSection::default());
        assert_eq!(c.lora.r, 16);
        assert_eq!(c.lora.alpha, 32.0);
        assert_eq!(c.lora.target_modules.len(), 7);
        assert_eq!(c.optim, OptimSection::default());
        assert_eq!(c.optim.lr, 2e-4);
        assert_eq!(c.optim.scheduler, SchedulerKind::Linear);
        assert_eq!(c.train, TrainSection::default());
        assert_eq!(c.train.seed, 42);
        assert_eq!(c.train.keep_last, 2);
        assert_eq!(c.output.dir, PathBuf::from("out"));
        assert_eq!(c.output.resume, None);
        assert_eq!(c.lora_init_seed(), 42);
        assert_eq!(c.lora.scaling(), 2.0);
    }

    #[test]
    fn key_table_matches_the_structs() {
        // Every field of a fully populated config is in KEYS, and every key in KEYS is a field.
        let mut c = TrainConfig::from_toml_str(MIN).unwrap();
        c.data.eval_data = Some("e.jsonl".into());
        c.data.buckets = Some("1-3".into());
        c.data.eval_max_examples = Some(5);
        c.lora.init_seed = Some(1);
        c.train.max_steps = Some(10);
        c.train.early_stopping_patience = Some(3);
        c.output.resume = Some("latest".into());
        let t = Table::try_from(&c).unwrap();
        let mut found: Vec<String> = Vec::new();
        for (s, v) in &t {
            for k in v.as_table().unwrap().keys() {
                found.push(format!("{s}.{k}"));
            }
        }
        let keys: Vec<String> = KEYS.iter().map(|k| k.name.to_string()).collect();
        assert_eq!(found.len(), keys.len());
        for k in &keys {
            assert!(found.contains(k), "{k} is in KEYS but not a field");
        }
        // And each value passes its own kind check.
        let mut t2 = t.clone();
        check_source(&mut t2, "x").unwrap();
        assert_eq!(config_keys().count(), KEYS.len());
    }

    #[test]
    fn file_then_flags_then_sets() {
        let text = format!("{MIN}[lora]\nr = 4\nalpha = 8\n[optim]\nlr = 1e-3\n");
        let dir = std::env::temp_dir().join(format!("gristmill-cfg-prec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(&path, text).unwrap();
        let mut flags = Table::new();
        set_key(&mut flags, "lora.r", Value::Integer(8)).unwrap();
        set_key(&mut flags, "optim.lr", Value::Float(5e-4)).unwrap();
        let sets = vec!["optim.lr=1e-4".to_string(), "train.seed=7".to_string()];
        let c = TrainConfig::load(Some(&path), &flags, &sets).unwrap();
        assert_eq!(c.lora.r, 8, "flags override the file");
        assert_eq!(c.lora.alpha, 8.0, "untouched file keys stay");
        assert_eq!(c.optim.lr, 1e-4, "--set overrides flags");
        assert_eq!(c.train.seed, 7);
        assert_eq!(c.lora_init_seed(), 7);
        // Later --set wins over an earlier one.
        let sets = vec!["lora.r=2".to_string(), "lora.r=3".to_string()];
        assert_eq!(TrainConfig::load(Some(&path), &flags, &sets).unwrap().lora.r, 3);
        // No file at all: flags and sets give the required keys.
        let mut flags = Table::new();
        set_key(&mut flags, "model.path", Value::String("m".into())).unwrap();
        set_key(&mut flags, "output.dir", Value::String("o".into())).unwrap();
        let c = TrainConfig::load(None, &flags, &["data.paths=a.jsonl,b.jsonl".to_string()]).unwrap();
        assert_eq!(c.data.paths, vec![PathBuf::from("a.jsonl"), PathBuf::from("b.jsonl")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn set_values_parse_as_toml_or_bare_strings() {
        let c = with(&[
            "lora.r=8",
            "optim.lr=3e-5",
            "train.epochs=2",
            "data.packing=true",
            "data.template=chat",
            "data.format=\"alpaca\"",
            "data.buckets=1-3",
            "lora.target_modules=[q_proj, v_proj]",
            "data.split=[0.9, 0.1, 0]",
            "optim.scheduler=cosine",
            "model.base_precision=bf16",
            "output.resume=latest",
            "model.path=/a/b=c",
        ])
        .unwrap();
        assert_eq!(c.lora.r, 8);
        assert_eq!(c.optim.lr, 3e-5);
        assert_eq!(c.train.epochs, 2.0);
        assert!(c.data.packing);
        assert_eq!(c.data.template, "chat");
        assert_eq!(c.data.format, "alpaca");
        assert_eq!(c.data.buckets().unwrap(), Some(vec![1, 2, 3]));
        assert_eq!(c.lora.target_modules, vec!["q_proj", "v_proj"]);
        assert_eq!(c.data.split, vec![0.9, 0.1, 0.0]);
        assert_eq!(c.optim.scheduler, SchedulerKind::Cosine);
        assert_eq!(c.model.base_precision, BasePrecision::Bf16);
        assert_eq!(c.output.resume.as_deref(), Some("latest"));
        assert_eq!(c.model.path, PathBuf::from("/a/b=c"));
        let c = with(&["lora.target_modules=q_proj,k_proj", "data.split=0.7,0.2,0.1", "optim.optimizer=grit"]).unwrap();
        assert_eq!(c.lora.target_modules, vec!["q_proj", "k_proj"]);
        assert_eq!(c.data.split, vec![0.7, 0.2, 0.1]);
        assert_eq!(c.optim.optimizer, OptimizerKind::Grit);
        // An empty value unsets an optional key.
        let c = with(&["train.max_steps=100", "train.max_steps=", "data.format=chat", "data.format="]).unwrap();
        assert_eq!(c.train.max_steps, None);
        assert_eq!(c.data.format, "auto");
    }

    #[test]
    fn unknown_keys_suggest_the_right_one() {
        let e = err(load_str(&format!("{MIN}[lora]\nrank = 8\n"), &[]));
        assert!(e.contains("unknown key `lora.rank`") && e.contains("did you mean `lora.r`?"), "{e}");
        assert!(e.contains("run.toml"), "names the file: {e}");
        let e = err(with(&["lr=1e-4"]));
        assert!(e.contains("unknown key `lr`") && e.contains("`optim.lr`"), "{e}");
        let e = err(with(&["train.lr=1e-4"]));
        assert!(e.contains("did you mean `optim.lr`?"), "{e}");
        let e = err(with(&["optim.learning_rate=1e-4"]));
        assert!(e.contains("did you mean `optim.lr`?"), "{e}");
        let e = err(with(&["train.batchsize=2"]));
        assert!(e.contains("did you mean `train.batch_size`?"), "{e}");
        let e = err(with(&["optim.warmup_step=2"]));
        assert!(e.contains("did you mean `optim.warmup_steps`?"), "{e}");
        let e = err(with(&["lora.xyzzy_plugh=2"]));
        assert!(e.contains("unknown key `lora.xyzzy_plugh`") && !e.contains("did you mean"), "{e}");
        assert!(e.contains("the keys of [lora] are r, alpha, dropout, target_modules, rslora, init_seed"), "{e}");
        let e = err(with(&["xyzzy_plugh=2"]));
        assert!(e.contains("with tables model, data, lora, optim, train, output"), "{e}");
        let e = err(load_str(&format!("{MIN}[optimizer]\nlr = 1e-4\n"), &[]));
        assert!(e.contains("unknown table `[optimizer]`") && e.contains("`[optim]`"), "{e}");
        let e = err(load_str(&format!("lr = 1e-4\n{MIN}"), &[]));
        assert!(e.contains("unknown key `lr`") && e.contains("`optim.lr`"), "{e}");
        // GRIT's fields, as its reference names them, are read from [grit]; typos get a suggestion.
        let c = load_str(&format!("{MIN}[grit]\nkfac_damping = 1e-5\nreprojection_k = 4\npairing = \"kfac\"\n"), &[])
            .unwrap();
        assert_eq!((c.grit.kfac_damping, c.grit.reprojection_k, c.grit.pairing), (1e-5, 4, GritPairing::Kfac));
        assert_eq!(c.grit.kfac_update_freq, 50, "the reference's defaults fill the rest");
        let e = err(load_str(&format!("{MIN}[grit]\nkfac_dampening = 1e-3\n"), &[]));
        assert!(e.contains("`grit.kfac_damping`"), "{e}");
        let e = err(load_str(&format!("{MIN}[grit]\nfactor_decay = 1.5\nreprojection_freq = 0\n"), &[]));
        assert!(e.contains("`grit.factor_decay`") && e.contains("`grit.reprojection_freq`"), "{e}");
        // Several problems are reported together.
        let e = err(load_str(&format!("{MIN}[lora]\nrank = 8\nalfa = 3\n"), &[]));
        assert!(e.contains("`lora.r`") && e.contains("`lora.alpha`"), "{e}");
        let e = err(with(&["lora.r"]));
        assert!(e.contains("key=value"), "{e}");
        let e = err(with(&["lora=8"]));
        assert!(e.contains("is a table"), "{e}");
    }

    #[test]
    fn type_errors_name_key_and_value() {
        let e = err(with(&["lora.r=eight"]));
        assert!(e.contains("`lora.r`") && e.contains("non-negative integer") && e.contains("eight"), "{e}");
        let e = err(with(&["lora.r=-1"]));
        assert!(e.contains("`lora.r`") && e.contains("non-negative"), "{e}");
        let e = err(with(&["optim.scheduler=cosin"]));
        assert!(e.contains("did you mean `cosine`?"), "{e}");
        let e = err(with(&["data.loss_on=prompt"]));
        assert!(e.contains("one of response, all"), "{e}");
        let e = err(load_str(&format!("{MIN}[train]\nbatch_size = \"4\"\n"), &[]));
        assert!(e.contains("`train.batch_size`") && e.contains("found a string"), "{e}");
        let e = err(load_str(&format!("{MIN}[train]\nbatch_size = 2.5\n"), &[]));
        assert!(e.contains("`train.batch_size`") && e.contains("found a float"), "{e}");
        let e = err(load_str("[model]\npath = 3\n[data]\npaths=[\"a\"]\n[output]\ndir=\"o\"\n", &[]));
        assert!(e.contains("`model.path`"), "{e}");
        let e = err(load_str(&format!("lora = 3\n{MIN}"), &[]));
        assert!(e.contains("`lora`") && e.contains("table"), "{e}");
        // A single path where a list is expected is accepted.
        let c = load_str("[model]\npath=\"m\"\n[data]\npaths=\"one.jsonl\"\n[output]\ndir=\"o\"\n", &[]).unwrap();
        assert_eq!(c.data.paths, vec![PathBuf::from("one.jsonl")]);
    }

    #[test]
    fn syntax_errors_and_missing_file() {
        let e = err(load_str("[model\npath = 1", &[]));
        assert!(e.contains("run.toml"), "{e}");
        let r = TrainConfig::load(Some(Path::new("/nonexistent/gristmill.toml")), &Table::new(), &[]);
        assert!(matches!(r, Err(Error::Io { .. })));
    }

    #[test]
    fn missing_required_keys() {
        let e = err(TrainConfig::from_toml_str("[model]\npath = \"m\"\n"));
        assert!(e.contains("missing `data.paths`") && e.contains("missing `output.dir`"), "{e}");
        assert!(!e.contains("missing `model.path`"), "{e}");
        assert!(e.contains("`--set output.dir=…`"), "{e}");
    }

    #[test]
    fn validation_rules() {
        let cases: &[(&[&str], &str)] = &[
            (&["lora.r=0"], "`lora.r` must be ≥ 1"),
            (&["lora.alpha=0"], "`lora.alpha` must be > 0"),
            (&["lora.dropout=1"], "`lora.dropout` must be in [0, 1)"),
            (&["lora.dropout=-0.1"], "`lora.dropout` must be in [0, 1)"),
            (&["lora.target_modules=[]"], "`lora.target_modules` is empty"),
            (&["lora.target_modules=q_proj,qproj"], "did you mean `q_proj`?"),
            (&["lora.target_modules=q_proj,q_proj"], "lists `q_proj` twice"),
            (&["optim.lr=0"], "`optim.lr` must be > 0"),
            (&["optim.lr=nan"], "`optim.lr` must be > 0"),
            (&["optim.weight_decay=-1"], "`optim.weight_decay` must be ≥ 0"),
            (&["optim.beta1=1"], "`optim.beta1` must be in [0, 1)"),
            (&["optim.beta2=1.5"], "`optim.beta2` must be in [0, 1)"),
            (&["optim.eps=0"], "`optim.eps` must be > 0"),
            (&["optim.max_grad_norm=-1"], "`optim.max_grad_norm` must be ≥ 0"),
            (&["optim.warmup_ratio=1"], "`optim.warmup_ratio` must be in [0, 1)"),
            (&["optim.warmup_ratio=0.1", "optim.warmup_steps=5"], "set only one"),
            (&["data.split=[0.8, 0.1]"], "must have 3 fractions"),
            (&["data.split=[0.8, 0.1, 0.2]"], "must sum to 1"),
            (&["data.split=[1.2, -0.1, -0.1]"], "must be in [0, 1]"),
            (&["data.split=[0, 0.5, 0.5]"], "leaves no training data"),
            (&["data.max_seq_len=1"], "`data.max_seq_len` must be ≥ 2"),
            (&["data.buckets=a"], "`data.buckets`: bucket selection `a`"),
            (&["data.format=alpacca"], "`data.format`: unknown data format `alpacca`"),
            (&["data.template=nonsense"], "`data.template`: unknown prompt template `nonsense`"),
            (&["data.eval_max_examples=0"], "`data.eval_max_examples` must be ≥ 1"),
            (&["data.paths=[]"], "`data.paths` is empty"),
            (&["train.epochs=0"], "`train.epochs` must be > 0"),
            (&["train.max_steps=0"], "`train.max_steps` must be ≥ 1"),
            (&["train.batch_size=0"], "`train.batch_size` must be ≥ 1"),
            (&["train.grad_accum=0"], "`train.grad_accum` must be ≥ 1"),
            (&["train.log_every=0"], "`train.log_every` must be ≥ 1"),
            (&["train.early_stopping_patience=0"], "`train.early_stopping_patience` must be ≥ 1"),
            (&["output.dir="], "`output.dir` is empty"),
            (&["output.resume=''"], "`output.resume` is empty"),
        ];
        for (sets, want) in cases {
            let e = err(with(sets));
            assert!(e.contains(want), "{sets:?}: expected `{want}` in `{e}`");
        }
        // Boundary values that are fine.
        with(&["lora.dropout=0", "optim.max_grad_norm=0", "train.epochs=0", "train.max_steps=5"]).unwrap();
        with(&[
            "data.split=[1, 0, 0]",
            "data.buckets=1,3-4",
            "data.format=Dolly",
            "data.template=### Q: {question}\\n",
            "optim.warmup_ratio=0.1",
            "train.keep_last=0",
        ])
        .unwrap();
        // All problems at once.
        let e = err(with(&["lora.r=0", "optim.lr=0"]));
        assert!(e.contains("`lora.r`") && e.contains("`optim.lr`"), "{e}");
    }

    #[test]
    fn resolved_toml_round_trips() {
        let mut c = with(&["lora.r=8", "data.buckets=1-3", "train.max_steps=9", "optim.scheduler=cosine"]).unwrap();
        c.lora.init_seed = Some(5);
        let text = c.to_toml_string().unwrap();
        assert!(text.starts_with("# gristmill"));
        assert!(text.contains("[lora]") && text.contains("r = 8"), "{text}");
        let back = TrainConfig::from_toml_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn scaling_and_helpers() {
        let c = with(&["lora.r=16", "lora.alpha=16", "lora.rslora=true"]).unwrap();
        assert_eq!(c.lora.scaling(), 4.0);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(suggest("lora.rank"), Some("lora.r"));
        assert_eq!(suggest("num_train_epochs"), Some("train.epochs"));
        assert_eq!(suggest("data.path"), Some("data.paths"), "the same table first");
        assert_eq!(suggest("lr"), Some("optim.lr"));
        assert_eq!(suggest("train.lr"), Some("optim.lr"));
        assert_eq!(suggest("train.warmup_step"), Some("optim.warmup_steps"));
        assert_eq!(suggest("lora.targets"), None);
    }
}
