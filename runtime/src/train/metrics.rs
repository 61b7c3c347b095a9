//! What a run logs: `metrics.jsonl` (one JSON object per line, appended as the run goes) and
//! `trainer_state.json` (where the run stands, rewritten at each checkpoint).
//!
//! Each line is written with one `write` call on an unbuffered file, so a crash loses at most the
//! line being written; [`read_metrics`] skips such a torn last line.

use crate::error::{Error, Result};
use crate::util::write_atomic;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One logged record: a training step, an evaluation, or both. Absent fields are left out of the
/// JSON; metrics without a field of their own (GRIT's, for one) go in `extra`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Optimizer steps done.
    pub step: usize,
    /// Epochs done, fractional.
    pub epoch: f64,
    /// Mean training loss over the steps since the last record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Learning rate of the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Global gradient norm before clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Training throughput: tokens (padding excluded) per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Memory in use on the device, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Evaluation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Evaluation perplexity, `exp(eval_loss)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_ppl: Option<f64>,
    /// Seconds since the run (or its resumption) started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    /// Any other metric, by name.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Record {
    /// A record of `step` at `epoch` with no metrics yet.
    pub fn new(step: usize, epoch: f64) -> Self {
        Record { step, epoch, ..Default::default() }
    }

    /// The numeric metrics of this record by name (`loss`, `eval_loss`, extra numbers…), without
    /// `step` and `epoch`: what goes to TensorBoard.
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let fixed = [
            ("loss", self.loss),
            ("lr", self.lr),
            ("grad_norm", self.grad_norm),
            ("tokens_per_s", self.tokens_per_s),
            ("memory_bytes", self.memory_bytes.map(|b| b as f64)),
            ("eval_loss", self.eval_loss),
            ("eval_ppl", self.eval_ppl),
        ];
        let mut out: Vec<(String, f64)> =
            fixed.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect();
        out.extend(self.extra.iter().filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v))));
        out
    }
}

/// Appends [`Record`]s to a `metrics.jsonl`, one line each, each on disk before `write` returns.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `path` for appending, creating it if needed.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        Ok(MetricsWriter { path, file })
    }

    /// Opens `path` to continue a run resumed from a checkpoint at `step`: records past `step` (logged
    /// after that checkpoint by the run that stopped) are dropped first, so the resumed run does not
    /// log those steps twice. The file is rewritten to a temporary name and renamed.
    pub fn resume(path: impl Into<PathBuf>, step: usize) -> Result<Self> {
        let path = path.into();
        if path.exists() {
            let kept: Vec<Record> = read_metrics(&path)?.into_iter().filter(|r| r.step <= step).collect();
            let mut text = String::new();
            for r in &kept {
                text.push_str(&to_line(r, &path)?);
            }
            write_atomic(&path, text.as_bytes())?;
        }
        Self::open(path)
    }

    /// Appends `record` as one line and flushes it.
    pub fn write(&mut self, record: &Record) -> Result<()> {
        let line = to_line(record, &self.path)?;
        // One write_all of the whole line on an unbuffered file: nothing sits in a user-space buffer.
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn to_line(record: &Record, path: &Path) -> Result<String> {
    let mut line = serde_json::to_string(record)
        .map_err(|e| Error::format(path, format!("cannot encode the record of step {}: {e}", record.step)))?;
    line.push('\n');
    Ok(line)
}

/// Reads every record of a `metrics.jsonl`. A last line without its newline (a write torn by a crash)
/// is skipped; any other bad line is an error naming its line number.
pub fn read_metrics(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut out = Vec::new();
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(line).map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))?;
        out.push(r);
    }
    Ok(out)
}

/// Where a run stands, as `trainer_state.json` (field names follow transformers' TrainerState where
/// it has one).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: usize,
    /// Epochs done, fractional.
    pub epoch: f64,
    /// The run's planned number of optimizer steps.
    pub max_steps: usize,
    /// Micro-batches taken from the data so far (to skip them when resuming mid-epoch).
    pub batches_seen: usize,
    /// Tokens trained on so far.
    pub num_input_tokens_seen: u64,
    /// Best evaluation loss so far.
    pub best_metric: Option<f64>,
    /// Step at which `best_metric` was reached.
    pub best_step: Option<usize>,
    /// Evaluations since the best one (for early stopping).
    pub evals_since_best: usize,
    /// Every record logged so far.
    pub log_history: Vec<Record>,
}

impl TrainerState {
    /// Reads `trainer_state.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))
    }

    /// Writes it (pretty JSON) through a temporary file and a rename.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::format(path, e.to_string()))?;
        write_atomic(path, text.as_bytes())
    }

    /// Records an evaluation loss; returns whether it is the best so far (lower is better; NaN never
    /// is).
    pub fn observe_eval(&mut self, step: usize, eval_loss: f64) -> bool {
        let better = eval_loss.is_finite() && self.best_metric.is_none_or(|b| eval_loss < b);
        if better {
            self.best_metric = Some(eval_loss);
            self.best_step = Some(step);
            self.evals_since_best = 0;
        } else {
            self.evals_since_best += 1;
        }
        better
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gristmill-metrics-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn lines_are_appended_and_read_back() {
        let d = tmpdir("append");
        let p = d.join("metrics.jsonl");
        let mut w = MetricsWriter::open(&p).unwrap();
        let mut r = Record::new(1, 0.01);
        r.loss = Some(2.5);
        r.lr = Some(1e-4);
        w.write(&r).unwrap();
        let mut e = Record::new(2, 0.02);
        e.eval_loss = Some(2.0);
        e.extra.insert("grit_ng_ratio".into(), serde_json::json!(0.75));
        w.write(&e).unwrap();
        // Visible on disk without dropping the writer.
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert_eq!(text.lines().next().unwrap(), r#"{"step":1,"epoch":0.01,"loss":2.5,"lr":0.0001}"#);
        assert!(text.contains(r#""grit_ng_ratio":0.75"#));
        drop(w);
        // Reopening appends.
        let mut w = MetricsWriter::open(&p).unwrap();
        w.write(&Record::new(3, 0.03)).unwrap();
        let back = read_metrics(&p).unwrap();
        assert_eq!(back, vec![r, e.clone(), Record::new(3, 0.03)]);
        assert_eq!(e.scalars(), vec![("eval_loss".to_string(), 2.0), ("grit_ng_ratio".to_string(), 0.75)]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn torn_last_line_is_skipped_and_resume_drops_later_steps() {
        let d = tmpdir("torn");
        let p = d.join("metrics.jsonl");
        std::fs::write(&p, "{\"step\":1,\"epoch\":0.1}\n{\"step\":2,\"epoch\":0.2}\n{\"step\":3,\"ep").unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 2);
        std::fs::write(&p, "{\"step\":1,\"epoch\":0.1}\nnot json\n").unwrap();
        let e = read_metrics(&p).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        std::fs::write(
            &p,
            "{\"step\":1,\"epoch\":0.1}\n{\"step\":2,\"epoch\":0.2}\n{\"step\":3,\"epoch\":0.3}\n{\"ste",
        )
        .unwrap();
        let mut w = MetricsWriter::resume(&p, 2).unwrap();
        w.write(&Record::new(3, 0.31)).unwrap();
        let steps: Vec<(usize, f64)> = read_metrics(&p).unwrap().iter().map(|r| (r.step, r.epoch)).collect();
        assert_eq!(steps, vec![(1, 0.1), (2, 0.2), (3, 0.31)]);
        assert!(!d.join("metrics.jsonl.tmp").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn trainer_state_round_trips_and_tracks_the_best() {
        let d = tmpdir("state");
        let p = d.join("trainer_state.json");
        let mut s = TrainerState { global_step: 10, epoch: 0.5, max_steps: 20, ..Default::default() };
        assert!(s.observe_eval(5, 2.0));
        assert!(!s.observe_eval(10, 2.1));
        assert!(!s.observe_eval(10, f64::NAN));
        assert_eq!(s.evals_since_best, 2);
        assert!(s.observe_eval(15, 1.5));
        assert_eq!((s.best_metric, s.best_step, s.evals_since_best), (Some(1.5), Some(15), 0));
        let mut r = Record::new(10, 0.5);
        r.loss = Some(1.0);
        s.log_history.push(r);
        s.save(&p).unwrap();
        assert_eq!(TrainerState::load(&p).unwrap(), s);
        // Unknown and missing fields are tolerated (older or newer runs).
        std::fs::write(&p, r#"{"global_step": 3, "total_flos": 0}"#).unwrap();
        assert_eq!(TrainerState::load(&p).unwrap().global_step, 3);
        std::fs::write(&p, "{").unwrap();
        assert!(matches!(TrainerState::load(&p), Err(Error::Format { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
