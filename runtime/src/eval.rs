//! Generation-based evaluation, greedy decoding: exact match of the final answer (GSM8K's "#### N"
//! convention, numeric normalisation), or classification when the reference answers form a closed
//! label set (see [`crate::scores`]); per-bucket scores when the examples carry a `bucket`.

use crate::backend::CpuBackend;
use crate::data::synth::{exact_match, extract_answer};
use crate::data::{Example, Template};
use crate::error::{Error, Result};
use crate::generate::{Runner, SamplingConfig};
use crate::model::LlamaModel;
use crate::scores::{
    BucketReport, ClassReport, bucket_report, classification_report, closed_label_set, label_set, match_label,
    normalize_label,
};
use crate::tokenizer::Tokenizer;
use std::str::FromStr;

/// What an evaluation scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Task {
    /// Classification when the reference answers form a closed label set
    /// ([`crate::scores::closed_label_set`]), else exact match.
    #[default]
    Auto,
    /// Exact match of the final answer.
    ExactMatch,
    /// The output's label against the reference answer's.
    Classify,
}

impl FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Task::Auto),
            "exact" | "exact-match" => Ok(Task::ExactMatch),
            "classify" => Ok(Task::Classify),
            _ => Err(Error::Invalid(format!("unknown evaluation task `{s}`: expected auto, exact or classify"))),
        }
    }
}

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
    /// The example's `bucket`, if it has one.
    pub bucket: Option<String>,
}

/// Results of a generation evaluation (exact match, or classification when `labels` is not empty).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExactMatch {
    pub items: Vec<ScoredItem>,
    pub correct: usize,
    /// Tokens generated in all.
    pub new_tokens: usize,
    pub seconds: f64,
    /// The label set of a classification (gold and predicted answers are labels); empty for exact
    /// match.
    pub labels: Vec<String>,
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

    /// Classification metrics with bootstrap intervals, for a classification.
    pub fn classification(&self) -> Option<ClassReport> {
        if self.labels.is_empty() {
            return None;
        }
        let index = |l: &str| self.labels.iter().position(|x| x == l);
        let mut gold = Vec::with_capacity(self.items.len());
        let mut pred = Vec::with_capacity(self.items.len());
        for i in &self.items {
            // Gold answers are labels by construction; one that is not cannot be scored as a class.
            if let Some(g) = index(&i.gold) {
                gold.push(g);
                pred.push(i.predicted.as_deref().and_then(index));
            }
        }
        Some(classification_report(&self.labels, &gold, &pred))
    }

    /// Accuracy per bucket and the robustness gap, when examples carry a bucket.
    pub fn buckets(&self) -> Option<BucketReport> {
        let items: Vec<(Option<&str>, bool)> = self.items.iter().map(|i| (i.bucket.as_deref(), i.correct)).collect();
        bucket_report(&items)
    }

    /// Fraction correct (0 when empty).
    pub fn accuracy(&self) -> f64 {
        if self.items.is_empty() { 0.0 } else { self.correct as f64 / self.items.len() as f64 }
    }
}

/// One line of an evaluation's summary: a metric, its value and its 95% bootstrap interval.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MetricRow {
    pub name: String,
    pub value: f64,
    pub ci95: Option<(f64, f64)>,
}

fn row(name: impl Into<String>, value: f64, ci95: Option<(f64, f64)>) -> MetricRow {
    MetricRow { name: name.into(), value, ci95 }
}

impl ExactMatch {
    /// The summary: exact match (or accuracy, macro/micro/binary precision, recall and F1 and each
    /// class's F1 for a classification), the text-overlap metrics, and each bucket's accuracy with
    /// the robustness gap when there are buckets.
    pub fn metric_rows(&self) -> Result<Vec<MetricRow>> {
        let mut rows = Vec::new();
        let (acc, lo, hi) = self.accuracy_ci();
        match self.classification() {
            None => rows.push(row("exact match", acc, Some((lo, hi)))),
            Some(c) => {
                let m = &c.metrics;
                rows.push(row("accuracy", m.accuracy, Some(c.accuracy_ci95)));
                rows.push(row("macro precision", m.macro_avg.precision, None));
                rows.push(row("macro recall", m.macro_avg.recall, None));
                rows.push(row("macro F1", m.macro_avg.f1, Some(c.macro_f1_ci95)));
                rows.push(row("micro precision", m.micro_avg.precision, None));
                rows.push(row("micro recall", m.micro_avg.recall, None));
                rows.push(row("micro F1", m.micro_avg.f1, Some(c.micro_f1_ci95)));
                if let (Some(b), Some(p)) = (m.binary, &m.positive) {
                    rows.push(row(format!("binary precision ({p})"), b.precision, None));
                    rows.push(row(format!("binary recall ({p})"), b.recall, None));
                    rows.push(row(format!("binary F1 ({p})"), b.f1, c.binary_f1_ci95));
                }
                for k in &m.per_class {
                    rows.push(row(format!("F1 {} (n={})", k.label, k.support), k.f1, None));
                }
                rows.push(row("no label in output", m.unmatched as f64 / m.n.max(1) as f64, None));
            }
        }
        let (f1, rouge, bleu) = self.overlap()?;
        rows.push(row("token F1", f1, None));
        rows.push(row("ROUGE-L", rouge, None));
        rows.push(row("BLEU", bleu / 100.0, None));
        if let Some(b) = self.buckets() {
            for k in &b.buckets {
                rows.push(row(format!("bucket {} (n={})", k.bucket, k.n), k.accuracy, None));
            }
            for k in b.buckets.iter().skip(1) {
                rows.push(row(format!("bucket {} vs {}", k.bucket, b.buckets[0].bucket), k.vs_first, None));
            }
            rows.push(row("robustness gap (max-min)", b.gap, None));
        }
        Ok(rows)
    }

    /// Everything as JSON: the summary rows, the classification and bucket reports, and every
    /// scored example.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let (acc, lo, hi) = self.accuracy_ci();
        let (f1, rouge, bleu) = self.overlap()?;
        let items: Vec<serde_json::Value> = self
            .items
            .iter()
            .map(|i| {
                serde_json::json!({"prompt": i.prompt, "gold": i.gold, "output": i.output, "predicted": i.predicted,
                    "correct": i.correct, "bucket": i.bucket})
            })
            .collect();
        Ok(serde_json::json!({
            "task": if self.labels.is_empty() { "exact" } else { "classify" },
            "exact_match": acc, "exact_match_ci95": [lo, hi], "correct": self.correct, "n": self.n(),
            "token_f1": f1, "rouge_l": rouge, "bleu": bleu,
            "metrics": self.metric_rows()?,
            "classification": self.classification(),
            "buckets": self.buckets(),
            "items": items,
        }))
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
    eval_on(runner, tok, template, examples, max_new_tokens, Task::ExactMatch, progress)
}

/// The label set `task` scores `examples` with: empty for exact match.
pub fn task_labels(examples: &[Example], task: Task) -> Result<Vec<String>> {
    let refs: Vec<&str> = examples.iter().map(|e| e.response().unwrap_or_default()).collect();
    match task {
        Task::ExactMatch => Ok(Vec::new()),
        Task::Auto => Ok(closed_label_set(&refs).unwrap_or_default()),
        Task::Classify => {
            let labels = label_set(&refs);
            if labels.len() < 2 {
                return Err(Error::Invalid(format!(
                    "classification needs at least two distinct reference answers; found {}",
                    labels.len()
                )));
            }
            Ok(labels)
        }
    }
}

/// Generates greedily for each example's prompt (as `template` renders it) and scores the output as
/// `task` says. `progress(done, total)` is called after each example.
pub fn eval_on(
    runner: &Runner<'_>,
    tok: &Tokenizer,
    template: &Template,
    examples: &[Example],
    max_new_tokens: usize,
    task: Task,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExactMatch> {
    let t0 = std::time::Instant::now();
    let mut out = ExactMatch { labels: task_labels(examples, task)?, ..Default::default() };
    // A plain-text prompt has no end-of-turn token: stop where the model would start the next
    // question.
    let cfg =
        SamplingConfig { max_new_tokens, stop: vec!["\nQuestion:".into(), "\n\n\n".into()], ..Default::default() };
    for (i, ex) in examples.iter().enumerate() {
        let reference = ex.response().unwrap_or_default().to_string();
        let gold = if out.labels.is_empty() {
            gold_answer(ex)
                .ok_or_else(|| Error::Invalid(format!("example {} has no gold answer to compare with", i + 1)))?
        } else {
            normalize_label(&reference)
        };
        let prompt = template.prompt(tok, ex)?;
        let add_special = !matches!(template, Template::Chat);
        let ids = tok.encode(&prompt, add_special)?;
        let g = runner.generate(tok, &ids, &cfg, &mut |_| true)?;
        out.new_tokens += g.ids.len();
        let (predicted, correct) = if out.labels.is_empty() {
            let p = extract_answer(&g.text);
            let ok = p.as_deref().is_some_and(|p| exact_match(p, &gold));
            (p, ok)
        } else {
            let p = match_label(&g.text, &out.labels).map(|k| out.labels[k].clone());
            let ok = p.as_deref() == Some(gold.as_str());
            (p, ok)
        };
        out.correct += usize::from(correct);
        let bucket = ex.meta.get("bucket").cloned();
        out.items.push(ScoredItem { prompt, gold, reference, output: g.text, predicted, correct, bucket });
        progress(i + 1, examples.len());
    }
    out.seconds = t0.elapsed().as_secs_f64();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(gold: &str, output: &str, labels: &[String], bucket: Option<&str>) -> ScoredItem {
        let predicted = match_label(output, labels).map(|k| labels[k].clone());
        let correct = predicted.as_deref() == Some(gold);
        ScoredItem {
            prompt: String::new(),
            gold: gold.into(),
            reference: gold.into(),
            output: output.into(),
            predicted,
            correct,
            bucket: bucket.map(str::to_string),
        }
    }

    #[test]
    fn classification_rows_and_json_by_hand() {
        let labels: Vec<String> = ["no", "yes"].iter().map(|s| s.to_string()).collect();
        // gold y y n n; outputs y, "I think no", y, gibberish → correct, wrong, wrong, wrong(unmatched).
        let items = vec![
            item("yes", "Yes.", &labels, Some("1")),
            item("yes", "I think no", &labels, Some("1")),
            item("no", "yes", &labels, Some("2")),
            item("no", "hmm", &labels, Some("2")),
        ];
        let correct = items.iter().filter(|i| i.correct).count();
        let r = ExactMatch { items, correct, new_tokens: 0, seconds: 1.0, labels };
        assert_eq!(correct, 1);
        let rows = r.metric_rows().unwrap();
        let get = |name: &str| rows.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("{name}: {rows:?}"));
        assert_eq!(get("accuracy").value, 0.25);
        // yes: tp 1, predicted 2, support 2 → F1 0.5; no: tp 0 → F1 0; macro 0.25.
        assert_eq!(get("binary F1 (yes)").value, 0.5);
        assert_eq!(get("F1 no (n=2)").value, 0.0);
        assert_eq!(get("macro F1").value, 0.25);
        // Micro: tp 1 of 3 predictions, of 4 gold → p 1/3, r 1/4.
        assert!((get("micro precision").value - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(get("micro recall").value, 0.25);
        assert_eq!(get("no label in output").value, 0.25);
        // Bucket 1: 1 of 2; bucket 2: 0 of 2.
        assert_eq!(get("bucket 1 (n=2)").value, 0.5);
        assert_eq!(get("bucket 2 vs 1").value, -0.5);
        assert_eq!(get("robustness gap (max-min)").value, 0.5);
        let j = r.to_json().unwrap();
        assert_eq!(j["task"], "classify");
        assert_eq!(j["classification"]["positive"], "yes");
        assert_eq!(j["buckets"]["buckets"][1]["correct"], 0);
        assert_eq!(j["items"][3]["predicted"], serde_json::Value::Null);
    }

    #[test]
    fn task_choice() {
        let ex = |r: &str| Example::prompt_response([("instruction", "q")], r);
        let cls: Vec<Example> = ["yes", "no", "Yes", "no."].iter().map(|r| ex(r)).collect();
        assert_eq!(task_labels(&cls, Task::Auto).unwrap(), ["no", "yes"]);
        assert!(task_labels(&cls, Task::ExactMatch).unwrap().is_empty());
        let free: Vec<Example> = ["#### 1", "#### 2", "#### 3"].iter().map(|r| ex(r)).collect();
        assert!(task_labels(&free, Task::Auto).unwrap().is_empty());
        assert_eq!(task_labels(&free, Task::Classify).unwrap().len(), 3);
        assert!(task_labels(&[ex("a"), ex("a")], Task::Classify).is_err());
        assert_eq!("classify".parse::<Task>().unwrap(), Task::Classify);
        assert!("bogus".parse::<Task>().is_err());
    }
}
