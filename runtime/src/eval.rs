//! Generation-based evaluation: exact match of the final answer (GSM8K's "#### N" convention,
//! numeric normalisation), greedy decoding.

use crate::backend::CpuBackend;
use crate::data::synth::{exact_match, extract_answer};
use crate::data::{Example, Template};
use crate::error::{Error, Result};
use crate::generate::{Runner, SamplingConfig};
use crate::model::LlamaModel;
use crate::tokenizer::Tokenizer;

/// One scored example.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredItem {
    pub prompt: String,
    pub gold: String,
    /// The full reference response (for text-overlap metrics).
    pub reference: String,
    /// What the model wrote.
    pub output: String,
    /// The answer extracted from it, if any.
    pub predicted: Option<String>,
    pub correct: bool,
}

/// Exact-match results.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExactMatch {
    pub items: Vec<ScoredItem>,
    pub correct: usize,
    /// Tokens generated in all.
    pub new_tokens: usize,
    pub seconds: f64,
}

impl ExactMatch {
    pub fn n(&self) -> usize {
        self.items.len()
    }

    /// Mean token F1, ROUGE-L and corpus BLEU of the outputs against the reference responses.
    pub fn overlap(&self) -> Result<(f64, f64, f64)> {
        let n = self.items.len().max(1) as f64;
        let f1 = self.items.iter().map(|i| crate::textmetrics::token_f1(&i.output, &i.reference)).sum::<f64>() / n;
        let rl = self.items.iter().map(|i| crate::textmetrics::rouge_l(&i.output, &i.reference)).sum::<f64>() / n;
        let preds: Vec<&str> = self.items.iter().map(|i| i.output.as_str()).collect();
        let refs: Vec<&str> = self.items.iter().map(|i| i.reference.as_str()).collect();
        Ok((f1, rl, crate::textmetrics::bleu(&preds, &refs)?))
    }

    /// The exact-match accuracy with a 95% percentile-bootstrap interval (1000 resamples).
    pub fn accuracy_ci(&self) -> (f64, f64, f64) {
        let scores: Vec<f64> = self.items.iter().map(|i| f64::from(u8::from(i.correct))).collect();
        crate::textmetrics::bootstrap_ci(&scores, 1000, 0, 0.95)
    }

    /// Fraction correct (0 when empty).
    pub fn accuracy(&self) -> f64 {
        if self.items.is_empty() { 0.0 } else { self.correct as f64 / self.items.len() as f64 }
    }
}

/// The gold answer of an example: its `gold` metadata, else the answer extracted from its response.
pub fn gold_answer(ex: &Example) -> Option<String> {
    ex.meta.get("gold").cloned().or_else(|| ex.response().and_then(extract_answer))
}

/// Generates greedily for each example's prompt (as `template` renders it) and scores the
/// extracted answer against the gold one. `progress(done, total)` is called after each example.
pub fn exact_match_eval(
    model: &LlamaModel,
    tok: &Tokenizer,
    template: &Template,
    examples: &[Example],
    max_new_tokens: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExactMatch> {
    exact_match_eval_on(&Runner::Cpu(CpuBackend::new(model)), tok, template, examples, max_new_tokens, progress)
}

/// [`exact_match_eval`] on the runner's device.
pub fn exact_match_eval_on(
    runner: &Runner<'_>,
    tok: &Tokenizer,
    template: &Template,
    examples: &[Example],
    max_new_tokens: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExactMatch> {
    let t0 = std::time::Instant::now();
    let mut out = ExactMatch::default();
    // A plain-text prompt has no end-of-turn token: stop where the model would start the next
    // question.
    let cfg =
        SamplingConfig { max_new_tokens, stop: vec!["\nQuestion:".into(), "\n\n\n".into()], ..Default::default() };
    for (i, ex) in examples.iter().enumerate() {
        let gold = gold_answer(ex)
            .ok_or_else(|| Error::Invalid(format!("example {} has no gold answer to compare with", i + 1)))?;
        let prompt = template.prompt(tok, ex)?;
        let add_special = !matches!(template, Template::Chat);
        let ids = tok.encode(&prompt, add_special)?;
        let g = runner.generate(tok, &ids, &cfg, &mut |_| true)?;
        out.new_tokens += g.ids.len();
        let predicted = extract_answer(&g.text);
        let correct = predicted.as_deref().is_some_and(|p| exact_match(p, &gold));
        out.correct += usize::from(correct);
        let reference = ex.response().unwrap_or_default().to_string();
        out.items.push(ScoredItem { prompt, gold, reference, output: g.text, predicted, correct });
        progress(i + 1, examples.len());
    }
    out.seconds = t0.elapsed().as_secs_f64();
    Ok(out)
}
