//! Sampling and generation.
//!
//! The logits processors follow transformers' order and definitions so that the same settings
//! mean the same thing: repetition penalty (on every token already in the sequence: divide a
//! positive logit by the penalty, multiply a negative one), then temperature, top-k, top-p.
//! Temperature 0 is greedy decoding (argmax; the first index wins ties).

use crate::backend::{Backend, CpuBackend, decode_step};
use crate::error::{Error, Result};
use crate::model::LlamaModel;
use crate::tokenizer::Tokenizer;
use gristmill_core::rng::Rng;
use std::time::Instant;

/// How to pick the next token and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p; 1 = off.
    pub top_p: f32,
    /// > 1 discourages repeating tokens already in the sequence; 1 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// Generation stops when the text ends with one of these (the stop string is not returned).
    pub stop: Vec<String>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            max_new_tokens: 256,
            stop: vec![],
        }
    }
}

impl SamplingConfig {
    /// Rejects settings that have no meaning, with the flag's name.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Invalid(format!("--temperature must be ≥ 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!("--top-p must be in (0, 1], got {}", self.top_p)));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(Error::Invalid(format!("--repetition-penalty must be > 0, got {}", self.repetition_penalty)));
        }
        Ok(())
    }
}

/// Picks tokens from logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplingConfig,
    rng: Rng,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Result<Self> {
        cfg.validate()?;
        let rng = Rng::new(cfg.seed);
        Ok(Self { cfg, rng })
    }

    /// The next token given the logits of the last position and the sequence so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = self.cfg.repetition_penalty;
        if p != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &id in history {
                if let Some(s) = seen.get_mut(id as usize)
                    && !*s
                {
                    *s = true;
                    let l = &mut logits[id as usize];
                    *l = if *l < 0.0 { *l * p } else { *l / p };
                }
            }
        }
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.cfg.temperature;
        // Candidates by descending logit; ties keep the lower id first.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        if self.cfg.top_k > 0 {
            idx.truncate(self.cfg.top_k.max(1));
        }
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f64> = idx.iter().map(|&i| f64::from((logits[i as usize] - max) * inv_t).exp()).collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if self.cfg.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= f64::from(self.cfg.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep.max(1));
            idx.truncate(keep.max(1));
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= z);
        }
        let u = self.rng.uniform();
        let mut cum = 0.0;
        for (&id, p) in idx.iter().zip(&probs) {
            cum += p;
            if u < cum {
                return id;
            }
        }
        idx[idx.len() - 1]
    }
}

/// Index of the largest logit (NaN never wins; the first index wins ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    /// The model's context is full.
    Context,
    /// The caller's callback asked to stop.
    Callback,
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The new tokens (without the prompt; EOS not included).
    pub ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    /// Seconds spent on the prompt (prefill) and on the new tokens.
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl Generation {
    /// New tokens per second of decoding.
    pub fn tokens_per_s(&self) -> f64 {
        if self.decode_s > 0.0 { self.ids.len() as f64 / self.decode_s } else { 0.0 }
    }
}

/// Generates a continuation of `prompt` (token ids), calling `on_text` with each newly decoded
/// piece of text; `on_text` returns false to stop early.
pub fn generate(
    model: &LlamaModel,
    tok: &Tokenizer,
    prompt: &[u32],
    cfg: &SamplingConfig,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    generate_on(&CpuBackend::new(model), tok, prompt, cfg, on_text)
}

/// A model on the device it generates on.
pub enum Runner<'a> {
    Cpu(CpuBackend<'a>),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::backend::cuda::CudaBackend>),
}

impl<'a> Runner<'a> {
    /// `model` on `device` (uploaded to a GPU: the host copy is no longer read).
    pub fn new(device: &crate::Device, model: &'a LlamaModel) -> Result<Self> {
        match device {
            crate::Device::Cpu => Ok(Runner::Cpu(CpuBackend::new(model))),
            #[cfg(feature = "cuda")]
            crate::Device::Cuda(gpu) => {
                Ok(Runner::Cuda(Box::new(crate::backend::cuda::CudaBackend::for_decoding(gpu.clone(), model)?)))
            }
        }
    }

    /// [`generate`] on this runner's device.
    pub fn generate(
        &self,
        tok: &Tokenizer,
        prompt: &[u32],
        cfg: &SamplingConfig,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        match self {
            Runner::Cpu(be) => generate_on(be, tok, prompt, cfg, on_text),
            #[cfg(feature = "cuda")]
            Runner::Cuda(be) => generate_on(&**be, tok, prompt, cfg, on_text),
        }
    }
}

/// [`generate`] on any backend (the model already on its device).
pub fn generate_on<B: Backend>(
    be: &B,
    tok: &Tokenizer,
    prompt: &[u32],
    cfg: &SamplingConfig,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let mcfg = be.cfg();
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt has no tokens".into()));
    }
    let ctx = mcfg.max_position_embeddings;
    if prompt.len() >= ctx {
        return Err(Error::Invalid(format!(
            "the prompt has {} tokens but the model's context is {ctx}: shorten it",
            prompt.len()
        )));
    }
    let mut sampler = Sampler::new(cfg.clone())?;
    let mut cache = be.new_cache()?;
    let mut history: Vec<u32> = prompt.to_vec();
    let mut stream = tok.decode_stream(true);
    let mut text = String::new();
    // Text not yet handed to the callback: held back while it could be the start of a stop string.
    let mut held = 0usize;
    let max_stop = cfg.stop.iter().map(String::len).max().unwrap_or(0);

    // Embedding tables are often padded past the tokenizer's vocabulary (to a multiple of 64 or
    // 128); those rows were never trained and have no text, so they are never sampled.
    let unused: Vec<usize> = (0..mcfg.vocab_size).filter(|&id| tok.id_to_token(id as u32).is_none()).collect();

    let t0 = Instant::now();
    let mut logits = decode_step(be, prompt, &mut cache, false)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut ids = Vec::new();
    let stop = loop {
        if ids.len() >= cfg.max_new_tokens {
            break StopReason::MaxTokens;
        }
        for &u in &unused {
            logits[u] = f32::NEG_INFINITY;
        }
        let id = sampler.sample(&mut logits, &history);
        if tok.is_eos(id) {
            break StopReason::Eos;
        }
        ids.push(id);
        history.push(id);
        if let Some(piece) = stream.step(id)? {
            text.push_str(&piece);
            if let Some(pos) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(pos);
                if pos > held && !on_text(&text[held..]) {
                    break StopReason::Callback;
                }
                break StopReason::StopString;
            }
            // Everything except a possible stop-string prefix at the end can go out now.
            let mut safe = text.len().saturating_sub(max_stop.saturating_sub(1));
            while !text.is_char_boundary(safe) {
                safe -= 1;
            }
            if safe > held {
                let keep_going = on_text(&text[held..safe]);
                held = safe;
                if !keep_going {
                    break StopReason::Callback;
                }
            }
        }
        if be.cache_len(&cache) >= ctx {
            break StopReason::Context;
        }
        logits = decode_step(be, &[id], &mut cache, false)?;
    };
    if stop != StopReason::StopString && stop != StopReason::Callback {
        if let Some(rest) = stream.flush()? {
            text.push_str(&rest);
        }
        if text.len() > held {
            on_text(&text[held..]);
        }
    }
    Ok(Generation { ids, text, stop, prompt_tokens: prompt.len(), prefill_s, decode_s: t1.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32, rp: f32) -> Sampler {
        Sampler::new(SamplingConfig {
            temperature,
            top_k,
            top_p,
            repetition_penalty: rp,
            seed: 1,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn greedy_and_repetition_penalty() {
        let mut s = sampler(0.0, 0, 1.0, 1.0);
        assert_eq!(s.sample(&mut [0.1, 2.0, 2.0, -1.0], &[]), 1);
        // Penalty 2 on token 1 (2.0 → 1.0) and token 3 (−1 → −2): token 2 wins.
        let mut s = sampler(0.0, 0, 1.0, 2.0);
        let mut l = [0.1, 2.0, 1.5, -1.0];
        assert_eq!(s.sample(&mut l, &[1, 3, 1]), 2);
        assert_eq!(l, [0.1, 1.0, 1.5, -2.0]);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.0]), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        // Probabilities ∝ e^{3,2,1,0}: 0.644, 0.237, 0.087, 0.032.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = sampler(1.0, 2, 1.0, 1.0);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[s.sample(&mut logits.clone(), &[]) as usize] += 1;
        }
        assert_eq!(counts[2] + counts[3], 0, "top-k 2 never samples beyond the 2 best");
        // Renormalised: 0.731 / 0.269.
        assert!((counts[0] as f64 / 4000.0 - 0.731).abs() < 0.03, "{counts:?}");
        // top-p 0.85: 0.644 + 0.237 = 0.881 ≥ 0.85 keeps two tokens.
        let mut s = sampler(1.0, 0, 0.85, 1.0);
        let mut seen = [false; 4];
        for _ in 0..2000 {
            seen[s.sample(&mut logits.clone(), &[]) as usize] = true;
        }
        assert_eq!(seen, [true, true, false, false]);
        // top-p below the best probability keeps only the best.
        let mut s = sampler(1.0, 0, 0.5, 1.0);
        assert!((0..200).all(|_| s.sample(&mut logits.clone(), &[]) == 0));
    }

    #[test]
    fn same_seed_same_samples() {
        let logits = [0.5f32, 0.4, 0.3, 0.2, 0.1];
        let draw = |seed| {
            let mut s = Sampler::new(SamplingConfig { temperature: 1.0, seed, ..Default::default() }).unwrap();
            (0..50).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let e = SamplingConfig { top_p: 0.0, ..Default::default() }.validate().unwrap_err();
        assert_eq!(e.to_string(), "--top-p must be in (0, 1], got 0");
        assert!(SamplingConfig { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(SamplingConfig { repetition_penalty: 0.0, ..Default::default() }.validate().is_err());
    }
}
