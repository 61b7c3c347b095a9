//! Comparing training runs: each run directory's `metrics.jsonl` (and `trainer_state.json` when the
//! run got that far) summarized in one table, and the loss curves of all runs on one chart.
//!
//! Everything is derived from what the trainer already logs: the throughput is the mean of the
//! logged steps' `tokens_per_s`, the peak memory the largest logged `memory_bytes`, and the wall
//! time the sum of the `elapsed_s` clocks of the run's segments (the clock restarts when a run is
//! resumed, so a drop in `elapsed_s` starts a new segment).

use crate::error::{Error, Result};
use crate::train::metrics::{Record, TrainerState, read_metrics};
use crate::train::plot::{Series, plot_losses};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What one run did, as `gristmill compare` reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// The run's name: its directory's name (its path when two runs share a name).
    pub name: String,
    pub dir: PathBuf,
    /// Optimizer steps done.
    pub steps: usize,
    /// Planned steps, when `trainer_state.json` says.
    pub max_steps: Option<usize>,
    /// Training loss of the last logged step.
    pub final_train_loss: Option<f64>,
    /// Validation loss of the last evaluation.
    pub final_val_loss: Option<f64>,
    /// Lowest validation loss, and its step.
    pub best_val_loss: Option<f64>,
    pub best_step: Option<usize>,
    /// Mean training throughput of the logged steps, tokens (padding excluded) per second.
    pub tokens_per_s: Option<f64>,
    /// Largest memory in use logged, bytes.
    pub peak_memory_bytes: Option<u64>,
    /// Seconds the run took, summed over its resumptions.
    pub wall_s: Option<f64>,
    /// (step, training loss) of every logged step.
    pub train_curve: Vec<(f64, f64)>,
    /// (step, validation loss) of every evaluation.
    pub val_curve: Vec<(f64, f64)>,
}

/// Reads a run directory's logs. A directory without `metrics.jsonl` is an error naming it.
pub fn summarize_run(dir: &Path) -> Result<RunSummary> {
    let path = dir.join("metrics.jsonl");
    if !path.is_file() {
        return Err(Error::Invalid(format!(
            "{} is not a training run directory: it has no metrics.jsonl",
            dir.display()
        )));
    }
    let records = read_metrics(&path)?;
    let state_path = dir.join("trainer_state.json");
    let state = if state_path.is_file() { Some(TrainerState::load(&state_path)?) } else { None };
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string());
    Ok(summarize_records(name, dir, &records, state.as_ref()))
}

/// The summary of a run's `records` (in logged order) and its trainer state, if any.
pub fn summarize_records(name: String, dir: &Path, records: &[Record], state: Option<&TrainerState>) -> RunSummary {
    let train_curve: Vec<(f64, f64)> = records.iter().filter_map(|r| r.loss.map(|l| (r.step as f64, l))).collect();
    let val_curve: Vec<(f64, f64)> = records.iter().filter_map(|r| r.eval_loss.map(|l| (r.step as f64, l))).collect();
    let best = val_curve
        .iter()
        .filter(|(_, l)| l.is_finite())
        .fold(None, |b: Option<(f64, f64)>, &(s, l)| if b.is_none_or(|(_, bl)| l < bl) { Some((s, l)) } else { b });
    let rates: Vec<f64> = records.iter().filter_map(|r| r.tokens_per_s).filter(|v| v.is_finite()).collect();
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    // Each resumption restarts the clock: sum the last reading of every segment.
    let mut wall: Option<f64> = None;
    let mut segment_last: Option<f64> = None;
    for e in records.iter().filter_map(|r| r.elapsed_s) {
        if let Some(prev) = segment_last
            && e < prev
        {
            *wall.get_or_insert(0.0) += prev;
        }
        segment_last = Some(e);
    }
    if let Some(last) = segment_last {
        *wall.get_or_insert(0.0) += last;
    }
    let steps = records.iter().map(|r| r.step).max().unwrap_or(0).max(state.map_or(0, |s| s.global_step));
    RunSummary {
        name,
        dir: dir.to_path_buf(),
        steps,
        max_steps: state.map(|s| s.max_steps).filter(|&m| m > 0),
        final_train_loss: train_curve.last().map(|p| p.1),
        final_val_loss: val_curve.last().map(|p| p.1),
        best_val_loss: best.map(|b| b.1),
        best_step: best.map(|b| b.0 as usize),
        tokens_per_s: mean(&rates),
        peak_memory_bytes: records.iter().filter_map(|r| r.memory_bytes).max(),
        wall_s: wall,
        train_curve,
        val_curve,
    }
}

/// Summaries of several runs; runs whose directory names collide are named by their full paths.
pub fn summarize_runs(dirs: &[PathBuf]) -> Result<Vec<RunSummary>> {
    let mut runs = dirs.iter().map(|d| summarize_run(d)).collect::<Result<Vec<_>>>()?;
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for r in &mut runs {
        if names.iter().filter(|n| **n == r.name).count() > 1 {
            r.name = r.dir.display().to_string();
        }
    }
    Ok(runs)
}

/// The summary table: one row per run, aligned columns, `-` where a run has no value.
pub fn format_table(runs: &[RunSummary]) -> String {
    let f4 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    let header = ["run", "steps", "train loss", "val loss", "best val (step)", "tokens/s", "peak mem", "wall"];
    let rows: Vec<[String; 8]> = runs
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                match r.max_steps {
                    Some(m) if m != r.steps => format!("{}/{m}", r.steps),
                    _ => r.steps.to_string(),
                },
                f4(r.final_train_loss),
                f4(r.final_val_loss),
                match (r.best_val_loss, r.best_step) {
                    (Some(l), Some(s)) => format!("{l:.4} ({s})"),
                    _ => "-".into(),
                },
                r.tokens_per_s.map_or("-".into(), |v| format!("{v:.0}")),
                r.peak_memory_bytes.map_or("-".into(), |b| format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)),
                r.wall_s.map_or("-".into(), format_duration),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut parts = Vec::with_capacity(cells.len());
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            // The run name reads best left-aligned, numbers right-aligned.
            parts.push(if i == 0 { format!("{c:<w$}") } else { format!("{c:>w$}") });
        }
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    for row in &rows {
        line(row);
    }
    out
}

/// `42.0s`, `3m05s`, `2h03m`.
fn format_duration(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        let m = (s / 60.0).floor();
        format!("{m:.0}m{:02.0}s", (s - 60.0 * m).floor())
    } else {
        let h = (s / 3600.0).floor();
        format!("{h:.0}h{:02.0}m", ((s - 3600.0 * h) / 60.0).floor())
    }
}

/// The chart's curves: each run's training loss (solid) and validation loss (dashed) in the run's
/// color, with one legend entry per run (the first of its curves carries the name).
pub fn loss_series(runs: &[RunSummary]) -> Vec<Series> {
    let mut out = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let mut name = Some(r.name.clone());
        if !r.train_curve.is_empty() {
            out.push(Series::new(name.take().unwrap_or_default(), r.train_curve.clone(), i));
        }
        if !r.val_curve.is_empty() {
            out.push(Series::new(name.take().unwrap_or_default(), r.val_curve.clone(), i).dashed());
        }
    }
    out
}

/// Draws every run's training and validation loss on one PNG at `path`.
pub fn plot_runs(path: &Path, runs: &[RunSummary]) -> Result<()> {
    plot_losses(path, "loss: train solid, validation dashed", &loss_series(runs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::metrics::MetricsWriter;
    use crate::train::plot::{COLORS, HEIGHT, WIDTH, decode_png};
    use crate::util::TempDir;

    /// A run directory with `steps` logged steps (loss `start - 0.1·step`), an evaluation every 2
    /// steps, and a resumption after step `resume_after` (the elapsed clock restarts there).
    fn fake_run(root: &Path, name: &str, steps: usize, start: f64, resume_after: usize) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = MetricsWriter::open(dir.join("metrics.jsonl")).unwrap();
        for s in 1..=steps {
            let mut r = Record::new(s, s as f64 / steps as f64);
            r.loss = Some(start - 0.1 * s as f64);
            r.tokens_per_s = Some(100.0 * s as f64);
            r.memory_bytes = Some(1000 + (s as u64 % 3) * 500);
            // 2 s a step; restarts at 0 after the resumption point.
            let t = if s <= resume_after { 2.0 * s as f64 } else { 2.0 * (s - resume_after) as f64 };
            r.elapsed_s = Some(t);
            if s % 2 == 0 {
                // Validation dips at step 2 then rises: best is the first.
                r.eval_loss = Some(start - 0.5 + 0.01 * s as f64);
            }
            w.write(&r).unwrap();
        }
        dir
    }

    #[test]
    fn summary_fields_come_from_the_logs() {
        let t = TempDir::new("compare-summary");
        let dir = fake_run(t.path(), "a", 6, 3.0, 4);
        let s = summarize_run(&dir).unwrap();
        assert_eq!(s.name, "a");
        assert_eq!(s.steps, 6);
        assert_eq!(s.max_steps, None);
        assert!((s.final_train_loss.unwrap() - 2.4).abs() < 1e-12);
        assert!((s.final_val_loss.unwrap() - 2.56).abs() < 1e-12);
        assert!((s.best_val_loss.unwrap() - 2.52).abs() < 1e-12);
        assert_eq!(s.best_step, Some(2));
        // Mean of 100..=600.
        assert!((s.tokens_per_s.unwrap() - 350.0).abs() < 1e-9);
        assert_eq!(s.peak_memory_bytes, Some(2000));
        // 8 s before the resumption, 4 s after.
        assert!((s.wall_s.unwrap() - 12.0).abs() < 1e-12);
        assert_eq!(s.train_curve.len(), 6);
        assert_eq!(s.val_curve.iter().map(|p| p.0).collect::<Vec<_>>(), [2.0, 4.0, 6.0]);

        // trainer_state.json adds the planned steps.
        let state = TrainerState { global_step: 6, max_steps: 10, ..Default::default() };
        state.save(&dir.join("trainer_state.json")).unwrap();
        let s = summarize_run(&dir).unwrap();
        assert_eq!(s.max_steps, Some(10));
        let table = format_table(&[s]);
        assert!(table.lines().nth(1).unwrap().contains("6/10"), "{table}");
    }

    #[test]
    fn not_a_run_directory_is_an_error_naming_it() {
        let t = TempDir::new("compare-missing");
        let e = summarize_run(&t.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("metrics.jsonl"), "{e}");
    }

    #[test]
    fn table_has_a_row_per_run_and_colliding_names_get_paths() {
        let t = TempDir::new("compare-table");
        let a = fake_run(t.path(), "run", 4, 3.0, 10);
        let b = fake_run(&t.path().join("other"), "run", 2, 2.0, 10);
        let c = fake_run(t.path(), "empty", 0, 2.0, 10);
        let runs = summarize_runs(&[a.clone(), b.clone(), c]).unwrap();
        assert_eq!(runs[0].name, a.display().to_string());
        assert_eq!(runs[1].name, b.display().to_string());
        assert_eq!(runs[2].name, "empty");
        let table = format_table(&runs);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("run") && lines[0].contains("tokens/s") && lines[0].contains("wall"));
        // Run a: 4 steps, final train loss 2.6, best validation 2.52 at step 2, 8.0 s.
        for cell in ["4", "2.6000", "2.5400", "2.5200 (2)", "250", "8.0s"] {
            assert!(lines[1].split("  ").any(|c| c.trim() == cell), "{cell} in {}", lines[1]);
        }
        // The empty run shows dashes, not zeros.
        assert!(lines[3].contains(" - "), "{}", lines[3]);
        let json = serde_json::to_value(&runs).unwrap();
        assert_eq!(json[0]["steps"], 4);
        assert_eq!(json[2]["final_train_loss"], serde_json::Value::Null);
        assert_eq!(format_duration(185.0), "3m05s");
        assert_eq!(format_duration(7380.0), "2h03m");
    }

    #[test]
    fn chart_has_every_run_in_its_color() {
        let t = TempDir::new("compare-plot");
        let dirs: Vec<PathBuf> =
            (0..3).map(|i| fake_run(t.path(), &format!("r{i}"), 10, 3.0 + i as f64, 100)).collect();
        let runs = summarize_runs(&dirs).unwrap();
        let series = loss_series(&runs);
        assert_eq!(series.len(), 6);
        // One legend entry per run: the training curve is named, the dashed validation curve not.
        assert!(series.iter().filter(|s| s.dashed).all(|s| s.name.is_empty()));
        assert_eq!(
            series.iter().filter(|s| !s.name.is_empty()).map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["r0", "r1", "r2"]
        );
        let png = t.path().join("compare.png");
        plot_runs(&png, &runs).unwrap();
        let (w, h, px) = decode_png(&std::fs::read(&png).unwrap());
        assert_eq!((w, h), (WIDTH, HEIGHT));
        let background = px[0];
        assert!(px.iter().any(|p| *p != background));
        for (i, color) in COLORS.iter().enumerate().take(3) {
            let n = px.iter().filter(|p| *p == color).count();
            // Curves, not just the legend swatch (25×3 pixels).
            assert!(n > 200, "run {i}: {n} pixels of its color");
        }
        assert_eq!(px.iter().filter(|p| **p == COLORS[3]).count(), 0, "a fourth color with three runs");
    }
}
