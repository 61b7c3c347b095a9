//! The embedding API: a small facade over the runtime for programs that use gristmill as a
//! library. Load a model (with or without a LoRA adapter) with [`Model::load`], then
//! [`tokenize`](Model::tokenize), [`generate`](Model::generate) with a streaming callback,
//! [`score`](Model::score) a continuation; [`train`] an adapter with a step callback;
//! [`save_adapter`](Model::save_adapter); [`merge`] an adapter into its base.
//!
//! Everything returns [`Result`] with the runtime's typed [`Error`] ([`Error::kind`] sorts it
//! into an [`ErrorKind`]); nothing panics on input a caller controls and nothing is printed. What
//! the runtime has to say on its own — `auto` asked for a GPU and there is none, a run's setup
//! notes, Ctrl-C — goes to the [`log`] facade: install any logger to see it.
//!
//! ```
//! use gristmill::api::{LoadOptions, Model, SamplingConfig};
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny_llama");
//! let model = Model::load(dir, LoadOptions::default())?;
//!
//! // Greedy decoding of at most 8 tokens, streamed piece by piece.
//! let cfg = SamplingConfig { max_new_tokens: 8, ..Default::default() };
//! let mut streamed = String::new();
//! let out = model.generate("The answer is", &cfg, |piece| {
//!     streamed.push_str(piece);
//!     true // false stops the generation
//! })?;
//! assert_eq!(streamed, out.text);
//! assert!(out.ids.len() <= 8);
//!
//! // log P(continuation | prompt), summed over the continuation's tokens.
//! let logp = model.score("The answer is", " 42")?;
//! assert!(logp < 0.0);
//! # Ok::<(), gristmill::Error>(())
//! ```
//!
//! The rest of the crate stays available for what the facade leaves out: [`Model::llama`] and
//! [`Model::tokenizer`] give the model and tokenizer it wraps.

use crate::adapter::{ALL_MODULES, AdapterConfig, LoraSpec, load_peft_adapter, save_peft_adapter};
use crate::backend::{Backend, CpuBackend, decode_step};
use crate::generate::generate_on;
use crate::model::LlamaModel;
use crate::tokenizer::Tokenizer;
use crate::train::trainer::{self, Hooks};
use std::path::{Path, PathBuf};

pub use crate::device::Device;
pub use crate::error::{Error, Result};
pub use crate::generate::{Generation, SamplingConfig, StopReason};
pub use crate::merge::{MergeOptions, MergeReport};
pub use crate::model::BasePrecision;
pub use crate::tokenizer::ChatMessage;
pub use crate::train::config::TrainConfig;
pub use crate::train::metrics::Record;
pub use crate::train::trainer::TrainOutcome;

/// What kind of [`Error`] a call returned: for callers that branch on it (and for the C ABI's
/// error codes) without matching on the error's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A file could not be opened, read, mapped or written.
    Io,
    /// A file is not in the format it claims, or is damaged.
    Format,
    /// A tensor is missing, or has the wrong dtype or shape.
    Tensor,
    /// A model or training configuration is wrong.
    Config,
    /// Something gristmill does not do.
    Unsupported,
    /// The tokenizer or chat template failed.
    Tokenizer,
    /// A bad argument (a sampling setting, a prompt longer than the context, an empty prompt).
    Invalid,
    /// The core's checks (shapes, NF4, linear algebra).
    Core,
    /// The GPU: driver, kernel launch, or a launcher's shape check.
    Gpu,
}

// The kind lives beside the facade rather than in `error.rs`: it is the facade's vocabulary.
impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Format { .. } => ErrorKind::Format,
            Error::Tensor { .. } => ErrorKind::Tensor,
            Error::Config { .. } => ErrorKind::Config,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Tokenizer(_) => ErrorKind::Tokenizer,
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::Core(_) => ErrorKind::Core,
            #[cfg(feature = "cuda")]
            Error::Gpu(_) => ErrorKind::Gpu,
        }
    }
}

/// How to load a [`Model`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`), such
    /// as a training run's directory.
    pub adapter: Option<PathBuf>,
    /// Where to run. The CPU by default; [`Device::parse`]`("auto")` takes the GPU when there is
    /// one.
    pub device: Device,
    /// How to hold the frozen linear weights (as the checkpoint stores them by default).
    pub base_precision: BasePrecision,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { adapter: None, device: Device::Cpu, base_precision: BasePrecision::AsStored }
    }
}

/// A loaded model with its tokenizer (and adapter), on its device.
///
/// The methods take `&self`: one model serves any number of generations and scores in turn,
/// each with its own KV cache.
pub struct Model {
    model: LlamaModel,
    tok: Tokenizer,
    dir: PathBuf,
    device: Device,
    /// The loaded adapter's shape and origin, for [`Model::save_adapter`].
    adapter: Option<(LoraSpec, String)>,
    /// The weights uploaded for decoding when the device is a GPU.
    #[cfg(feature = "cuda")]
    gpu: Option<Box<crate::backend::cuda::CudaBackend>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("dir", &self.dir)
            .field("layers", &self.model.cfg.num_layers)
            .field("device", &self.device)
            .field("adapter", &self.adapter.as_ref().map(|(s, _)| s.r))
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads the model directory `dir` (`config.json`, safetensors, `tokenizer.json`), applies
    /// the adapter when `opts` names one, and moves the weights to `opts.device`.
    ///
    /// ```
    /// use gristmill::api::{BasePrecision, ErrorKind, LoadOptions, Model};
    ///
    /// let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
    /// let opts = LoadOptions {
    ///     adapter: Some(format!("{fixtures}/peft_adapter").into()),
    ///     base_precision: BasePrecision::Nf4,
    ///     ..Default::default()
    /// };
    /// let model = Model::load(format!("{fixtures}/tiny_llama"), opts)?;
    /// assert!(model.has_adapter());
    ///
    /// let missing = Model::load("/no/such/model", LoadOptions::default()).unwrap_err();
    /// assert_eq!(missing.kind(), ErrorKind::Io);
    /// # Ok::<(), gristmill::Error>(())
    /// ```
    pub fn load(dir: impl AsRef<Path>, opts: LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let mut model = LlamaModel::load(dir, opts.base_precision)?;
        let tok = Tokenizer::from_dir(dir)?;
        tok.check_fits_model(model.cfg.vocab_size)?;
        let adapter = match &opts.adapter {
            Some(a) => {
                let n = load_peft_adapter(&mut model, a)?;
                log::info!("adapter {}: {n} modules", a.display());
                Some(adapter_spec(&model, a)?)
            }
            None => None,
        };
        #[cfg(feature = "cuda")]
        let gpu = match &opts.device {
            Device::Cuda(g) => Some(Box::new(crate::backend::cuda::CudaBackend::for_decoding(g.clone(), &model)?)),
            Device::Cpu => None,
        };
        log::info!(
            "loaded {} ({} layers, {:.0} MiB of weights) on {}",
            dir.display(),
            model.cfg.num_layers,
            model.weight_bytes() as f64 / (1 << 20) as f64,
            opts.device
        );
        Ok(Self {
            model,
            tok,
            dir: dir.to_path_buf(),
            device: opts.device,
            adapter,
            #[cfg(feature = "cuda")]
            gpu,
        })
    }

    /// The model as the rest of the crate knows it (weights held on the host).
    pub fn llama(&self) -> &LlamaModel {
        &self.model
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    /// Where the model runs.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The longest sequence (prompt plus new tokens) the model takes.
    pub fn context_len(&self) -> usize {
        self.model.cfg.max_position_embeddings
    }

    /// Whether an adapter was loaded with the model.
    pub fn has_adapter(&self) -> bool {
        self.adapter.is_some()
    }

    /// The ids of `text` as a plain prompt: with the special tokens the tokenizer adds (BOS for
    /// most Llama models). Special tokens written in the text (`<|im_start|>`) become their ids.
    ///
    /// ```
    /// # use gristmill::api::{LoadOptions, Model};
    /// # let model = Model::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny_llama"), LoadOptions::default())?;
    /// let ids = model.tokenize("hello world")?;
    /// assert_eq!(model.detokenize(&ids)?, "hello world");
    /// # Ok::<(), gristmill::Error>(())
    /// ```
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.tok.encode(text, true)
    }

    /// The text of `ids`, special tokens left out.
    pub fn detokenize(&self, ids: &[u32]) -> Result<String> {
        self.tok.decode(ids, true)
    }

    /// The ids of a conversation rendered by the model's chat template, ending with the header of
    /// the assistant's turn: a prompt for [`Model::generate_tokens`].
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        // The template writes its own special tokens.
        self.tok.encode(&self.tok.apply_chat_template(messages, true)?, false)
    }

    /// Continues `prompt` (tokenized by [`Model::tokenize`]) as `cfg` says, calling `on_text`
    /// with each new piece of text as it is decoded; `on_text` returns false to stop. The pieces
    /// add up to the returned [`Generation::text`] (a stop string is never handed out).
    pub fn generate(
        &self,
        prompt: &str,
        cfg: &SamplingConfig,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        self.generate_tokens(&self.tokenize(prompt)?, cfg, on_text)
    }

    /// [`Model::generate`] from token ids.
    pub fn generate_tokens(
        &self,
        prompt: &[u32],
        cfg: &SamplingConfig,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        #[cfg(feature = "cuda")]
        if let Some(be) = &self.gpu {
            return generate_on(&**be, &self.tok, prompt, cfg, &mut on_text);
        }
        generate_on(&CpuBackend::new(&self.model), &self.tok, prompt, cfg, &mut on_text)
    }

    /// The log-likelihood of `continuation` after `prompt`: the sum over the continuation's tokens
    /// of log P(token | everything before it), in nats. The prompt is tokenized as by
    /// [`Model::tokenize`]; the continuation on its own, without special tokens, and appended —
    /// so write the space that separates it from the prompt at its start (`" Paris"`). An empty
    /// continuation scores 0.
    ///
    /// ```
    /// # use gristmill::api::{LoadOptions, Model};
    /// # let model = Model::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny_llama"), LoadOptions::default())?;
    /// // Two tokens are less likely than the first of them alone.
    /// let one = model.score("1 + 1 =", " 2")?;
    /// let two = model.score("1 + 1 =", " 2 2")?;
    /// assert!(two < one && one < 0.0);
    /// # Ok::<(), gristmill::Error>(())
    /// ```
    pub fn score(&self, prompt: &str, continuation: &str) -> Result<f64> {
        self.score_tokens(&self.tokenize(prompt)?, &self.tok.encode(continuation, false)?)
    }

    /// [`Model::score`] from token ids. The prompt must have at least one token: the first
    /// token of the continuation needs something to follow.
    pub fn score_tokens(&self, prompt: &[u32], continuation: &[u32]) -> Result<f64> {
        #[cfg(feature = "cuda")]
        if let Some(be) = &self.gpu {
            return score_on(&**be, prompt, continuation);
        }
        score_on(&CpuBackend::new(&self.model), prompt, continuation)
    }

    /// Writes the adapter the model was loaded with to `dir` in PEFT's format
    /// (`adapter_config.json` + `adapter_model.safetensors`, f32 factors).
    pub fn save_adapter(&self, dir: impl AsRef<Path>) -> Result<()> {
        let Some((spec, base)) = &self.adapter else {
            return Err(Error::Invalid("the model has no adapter to save: load one with LoadOptions::adapter".into()));
        };
        save_peft_adapter(&self.model, spec, base, dir.as_ref())
    }
}

/// The shape of the adapter in `dir`, now attached to `model`, and the base it names.
fn adapter_spec(model: &LlamaModel, dir: &Path) -> Result<(LoraSpec, String)> {
    let cfg = AdapterConfig::from_dir(dir)?;
    // `AdapterConfig` holds alpha as f32 and has no dropout: take both as written, so that a
    // saved copy says what the original said.
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
    let number = |key: &str| raw.get(key).and_then(serde_json::Value::as_f64);
    let target_modules = ALL_MODULES
        .iter()
        .enumerate()
        .filter(|&(j, _)| {
            model.layers.iter().any(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down][j].lora.is_some())
        })
        .map(|(_, m)| m.to_string())
        .collect();
    let spec = LoraSpec {
        r: cfg.r,
        alpha: number("lora_alpha").unwrap_or(f64::from(cfg.lora_alpha)),
        dropout: number("lora_dropout").unwrap_or(0.0),
        rslora: cfg.use_rslora,
        target_modules,
    };
    let base = cfg.base_model_name_or_path.unwrap_or_else(|| dir.display().to_string());
    Ok((spec, base))
}

/// Σ log P(continuation[i] | prompt, continuation[..i]) on backend `be`.
fn score_on<B: Backend>(be: &B, prompt: &[u32], continuation: &[u32]) -> Result<f64> {
    let Some((&last, head)) = continuation.split_last() else {
        return Ok(0.0);
    };
    if prompt.is_empty() {
        return Err(Error::Invalid(
            "score: the prompt has no tokens, so the continuation's first token has no context".into(),
        ));
    }
    let v = be.cfg().vocab_size;
    let mut cache = be.new_cache()?;
    // The prompt's last row predicts the continuation's first token; the continuation without its
    // last token predicts the rest: only those n rows of logits are computed.
    let mut rows = decode_step(be, prompt, &mut cache, false)?;
    if !head.is_empty() {
        rows.extend(decode_step(be, head, &mut cache, true)?);
    }
    let targets = head.iter().chain(std::iter::once(&last));
    rows.chunks_exact(v).zip(targets).map(|(row, &id)| log_softmax_at(row, id)).sum()
}

/// log softmax(logits)[id], accumulated in f64.
fn log_softmax_at(logits: &[f32], id: u32) -> Result<f64> {
    let Some(&x) = logits.get(id as usize) else {
        return Err(Error::Invalid(format!("token id {id} is outside the vocabulary of {}", logits.len())));
    };
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(f64::from(l)));
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    Ok(f64::from(x) - max - sum.ln())
}

/// Trains a LoRA adapter as `config` says (see [`TrainConfig`]), writing the run directory
/// `config.output.dir`: checkpoints, metrics, and at the end the adapter, which
/// [`LoadOptions::adapter`] loads. `on_step` gets each optimizer step's [`Record`] (loss, learning
/// rate, gradient norm, throughput, and the evaluation loss when there was one); returning false
/// stops the run after a checkpoint ([`TrainOutcome::interrupted`]).
///
/// Nothing is drawn on the terminal; the run's setup notes ([`TrainOutcome::notes`]) also go to
/// the log.
///
/// ```
/// use gristmill::api::{TrainConfig, train};
///
/// let tmp = std::env::temp_dir().join(format!("gristmill-doc-train-{}", std::process::id()));
/// std::fs::create_dir_all(&tmp)?;
/// // A handful of arithmetic word problems, GSM8K-style.
/// let data: String = (1..=24)
///     .map(|i| format!("{{\"question\": \"What is {i} + {i}?\", \"answer\": \"{i} + {i} = {}\\n#### {}\"}}\n", 2 * i, 2 * i))
///     .collect();
/// std::fs::write(tmp.join("data.jsonl"), data)?;
/// let config = TrainConfig::from_toml_str(&format!(
///     r#"
///     [model]
///     path = "{model}"
///     [data]
///     paths = ["{data}"]
///     max_seq_len = 64
///     [train]
///     max_steps = 3
///     batch_size = 2
///     [output]
///     dir = "{run}"
///     "#,
///     model = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny_llama"),
///     data = tmp.join("data.jsonl").display(),
///     run = tmp.join("run").display(),
/// ))?;
///
/// let mut losses = Vec::new();
/// let outcome = train(&config, |record| {
///     losses.extend(record.loss);
///     record.step < 2 // stop early, after the second step
/// })?;
/// assert_eq!(losses.len(), 2);
/// assert!(outcome.interrupted && outcome.run_dir.join("adapter_model.safetensors").is_file());
/// # std::fs::remove_dir_all(&tmp)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn train(config: &TrainConfig, mut on_step: impl FnMut(&Record) -> bool) -> Result<TrainOutcome> {
    let hooks = Hooks { on_step: Some(&mut on_step), interrupt: None, progress: false };
    let outcome = trainer::train(config, hooks)?;
    for note in &outcome.notes {
        log::info!("{note}");
    }
    Ok(outcome)
}

/// A training configuration read from a TOML file (when given), then `key=value` overrides
/// applied in order — as `gristmill train --config FILE --set key=value …` reads it — and
/// validated. [`TrainConfig::from_toml_str`] reads one from text.
///
/// ```
/// use gristmill::api::{ErrorKind, train_config};
///
/// let sets = ["model.path=m", "data.paths=a.jsonl,b.jsonl", "output.dir=run", "lora.r=8"].map(String::from);
/// let config = train_config(None, &sets)?;
/// assert_eq!((config.lora.r, config.data.paths.len()), (8, 2));
/// let e = train_config(None, &["lora.rank=8".to_string()]).unwrap_err();
/// assert_eq!(e.kind(), ErrorKind::Config);
/// # Ok::<(), gristmill::Error>(())
/// ```
pub fn train_config(file: Option<&Path>, sets: &[String]) -> Result<TrainConfig> {
    TrainConfig::load(file, &toml::Table::new(), sets)
}

/// Merges the PEFT adapter `adapter` into the full-precision model `base` (W + s·B·A in the
/// checkpoint's own dtype) and writes an HF checkpoint to `out` that loads without the adapter.
///
/// ```
/// use gristmill::api::{LoadOptions, MergeOptions, Model, merge};
///
/// let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
/// let out = std::env::temp_dir().join(format!("gristmill-doc-merge-{}", std::process::id()));
/// let report =
///     merge(format!("{fixtures}/tiny_llama"), format!("{fixtures}/peft_adapter"), &out, &MergeOptions::default())?;
/// assert_eq!(report.merged_modules, 14);
/// let merged = Model::load(&out, LoadOptions::default())?;
/// assert!(!merged.has_adapter());
/// # std::fs::remove_dir_all(&out).ok();
/// # Ok::<(), gristmill::Error>(())
/// ```
pub fn merge(
    base: impl AsRef<Path>,
    adapter: impl AsRef<Path>,
    out: impl AsRef<Path>,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let report = crate::merge::merge_adapter(base.as_ref(), adapter.as_ref(), out.as_ref(), opts)?;
    if report.dequantized_4bit {
        log::warn!("the base was bitsandbytes 4-bit; it was dequantized before merging (lossy)");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    /// Embedders (and the C interface) share a model between threads.
    #[test]
    fn a_model_is_send_and_sync() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Model>();
    }

    fn tiny() -> Model {
        Model::load(fixtures().join("tiny_llama"), LoadOptions::default()).unwrap()
    }

    /// The score is the log-softmax of a full forward pass over prompt + continuation, read at
    /// the continuation's tokens.
    #[test]
    fn score_is_the_sum_of_log_probabilities() {
        let model = tiny();
        let (prompt, cont) = ([5u32, 17, 42], [99u32, 7, 123, 4]);
        let all: Vec<u32> = prompt.iter().chain(&cont).copied().collect();
        let m = model.llama();
        let logits = m.forward(&all, &mut m.new_cache(), true).unwrap();
        let v = m.cfg.vocab_size;
        let mut want = 0f64;
        for (i, &id) in cont.iter().enumerate() {
            let row = &logits[(prompt.len() + i - 1) * v..][..v];
            let z: f64 = row.iter().map(|&l| f64::from(l).exp()).sum();
            want += f64::from(row[id as usize]) - z.ln();
        }
        let got = model.score_tokens(&prompt, &cont).unwrap();
        assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{got} vs {want}");
        assert_eq!(model.score_tokens(&prompt, &[]).unwrap(), 0.0);
        // One token: only the prompt's last row.
        let one = model.score_tokens(&prompt, &cont[..1]).unwrap();
        assert!(one < 0.0 && one > got);
    }

    #[test]
    fn bad_input_is_an_error_of_its_kind() {
        let model = tiny();
        let e = model.score_tokens(&[], &[1]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        let v = model.llama().cfg.vocab_size as u32;
        assert_eq!(model.score_tokens(&[1], &[v]).unwrap_err().kind(), ErrorKind::Invalid);
        assert_eq!(model.score_tokens(&[v], &[1]).unwrap_err().kind(), ErrorKind::Invalid);
        let long = vec![1u32; model.context_len() + 1];
        assert_eq!(model.score_tokens(&long, &[1]).unwrap_err().kind(), ErrorKind::Invalid);
        assert_eq!(model.save_adapter(std::env::temp_dir()).unwrap_err().kind(), ErrorKind::Invalid);
        let bad = Model::load(fixtures(), LoadOptions::default()).unwrap_err();
        assert_eq!(bad.kind(), ErrorKind::Io, "{bad}");
    }

    /// Streamed pieces add up to the text; a callback returning false stops at once; the same
    /// seed gives the same text.
    #[test]
    fn generation_streams_and_stops() {
        let model = tiny();
        let cfg = SamplingConfig { temperature: 0.8, seed: 3, max_new_tokens: 12, ..Default::default() };
        let mut pieces = Vec::new();
        let g = model
            .generate("What is 2 + 2?", &cfg, |p| {
                pieces.push(p.to_string());
                true
            })
            .unwrap();
        assert_eq!(pieces.concat(), g.text);
        assert_eq!(model.generate("What is 2 + 2?", &cfg, |_| true).unwrap().text, g.text);
        if g.ids.len() > 1 && pieces.len() > 1 {
            let mut calls = 0;
            let stopped = model
                .generate("What is 2 + 2?", &cfg, |_| {
                    calls += 1;
                    false
                })
                .unwrap();
            assert_eq!((stopped.stop, calls), (StopReason::Callback, 1));
        }
    }

    /// A loaded adapter saved again is the same adapter: same factors, same logits.
    #[test]
    fn a_saved_adapter_loads_to_the_same_model() {
        let adapter = fixtures().join("peft_adapter");
        let opts = LoadOptions { adapter: Some(adapter.clone()), ..Default::default() };
        let model = Model::load(fixtures().join("tiny_llama"), opts).unwrap();
        let out = std::env::temp_dir().join(format!("gristmill-api-save-{}", std::process::id()));
        model.save_adapter(&out).unwrap();
        let again = Model::load(
            fixtures().join("tiny_llama"),
            LoadOptions { adapter: Some(out.clone()), ..Default::default() },
        )
        .unwrap();
        let ids = [3u32, 141, 59, 26];
        let (a, b) =
            (model.score_tokens(&ids[..2], &ids[2..]).unwrap(), again.score_tokens(&ids[..2], &ids[2..]).unwrap());
        assert_eq!(a, b);
        let (orig, saved) = (AdapterConfig::from_dir(&adapter).unwrap(), AdapterConfig::from_dir(&out).unwrap());
        assert_eq!((orig.r, orig.lora_alpha, orig.use_rslora), (saved.r, saved.lora_alpha, saved.use_rslora));
        std::fs::remove_dir_all(&out).ok();
    }
}
