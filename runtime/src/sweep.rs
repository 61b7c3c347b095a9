//! Hyperparameter sweeps: the cartesian product of a grid of configuration values, trained one run
//! after another into `OUT/<run-name>`, resumable, summarized with [`crate::compare`].
//!
//! A grid is written `"lr=1e-5,2e-5 batch=8,16 seed=42,1337"`: space-separated axes, each a key and
//! comma-separated values. Keys are short names (`lr`, `batch`, `seed`, … see [`SHORT_NAMES`]) or
//! full `section.key` configuration names. Runs are named by their values (`lr1e-5_batch8_seed42`).
//!
//! `OUT/sweep.json` records which runs finished. Running the same sweep again skips those, resumes
//! an interrupted run from its latest checkpoint (the trainer's resume: same data order, optimizer
//! state and schedule), and starts over a run that stopped before its first checkpoint.

use crate::compare::{RunSummary, summarize_runs};
use crate::error::{Error, Result};
use crate::train::checkpoint::resolve_resume;
use crate::train::config::{TrainConfig, config_keys, suggest};
use crate::train::metrics::Record;
use crate::train::trainer::{Hooks, train};
use crate::util::{edit_distance, write_atomic};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Short axis names and the configuration keys they stand for.
pub const SHORT_NAMES: &[(&str, &str)] = &[
    ("lr", "optim.lr"),
    ("batch", "train.batch_size"),
    ("seed", "train.seed"),
    ("r", "lora.r"),
    ("rank", "lora.r"),
    ("alpha", "lora.alpha"),
    ("dropout", "lora.dropout"),
    ("epochs", "train.epochs"),
    ("steps", "train.max_steps"),
    ("accum", "train.grad_accum"),
    ("warmup", "optim.warmup_steps"),
    ("wd", "optim.weight_decay"),
    ("scheduler", "optim.scheduler"),
    ("optimizer", "optim.optimizer"),
    ("seq_len", "data.max_seq_len"),
];

/// One axis of a grid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Axis {
    /// The name as written (used in run names).
    pub name: String,
    /// The configuration key it sets.
    pub key: String,
    pub values: Vec<String>,
}

/// The configuration key an axis name stands for, or an error with a suggestion.
pub fn resolve_key(name: &str) -> Result<String> {
    if let Some((_, key)) = SHORT_NAMES.iter().find(|(s, _)| *s == name) {
        return Ok((*key).to_string());
    }
    if config_keys().any(|(k, _)| k == name) {
        return Ok(name.to_string());
    }
    let short = SHORT_NAMES.iter().map(|(s, _)| (*s, edit_distance(name, s))).min_by_key(|&(_, d)| d);
    let hint = match short {
        Some((s, d)) if d <= 1 && name.len() > 1 => Some(s.to_string()),
        _ => suggest(name).map(str::to_string),
    };
    let shorts: Vec<&str> = SHORT_NAMES.iter().map(|(s, _)| *s).collect();
    Err(Error::config(match hint {
        Some(h) => format!("unknown sweep key `{name}`; did you mean `{h}`?"),
        None => {
            format!("unknown sweep key `{name}`: use a short name ({}) or a full `section.key` name", shorts.join(", "))
        }
    }))
}

/// Parses a grid: `"lr=1e-5,2e-5 batch=8,16"`.
pub fn parse_grid(spec: &str) -> Result<Vec<Axis>> {
    let mut axes: Vec<Axis> = Vec::new();
    for part in spec.split_whitespace() {
        let Some((name, values)) = part.split_once('=') else {
            return Err(Error::config(format!("grid axis `{part}`: expected name=value1,value2,…")));
        };
        let key = resolve_key(name)?;
        let values: Vec<String> =
            values.split(',').map(str::trim).filter(|v| !v.is_empty()).map(String::from).collect();
        if values.is_empty() {
            return Err(Error::config(format!("grid axis `{part}` has no values")));
        }
        if let Some(a) = axes.iter().find(|a| a.key == key) {
            return Err(Error::config(format!("grid axes `{}` and `{name}` both set `{key}`", a.name)));
        }
        axes.push(Axis { name: name.to_string(), key, values });
    }
    if axes.is_empty() {
        return Err(Error::config("the grid is empty: give at least one axis, e.g. \"lr=1e-4,2e-4\"".to_string()));
    }
    Ok(axes)
}

/// One point of the grid: its run name and (key, value) settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub name: String,
    pub settings: Vec<(String, String)>,
}

/// Every point of the grid, the last axis varying fastest.
pub fn points(axes: &[Axis]) -> Vec<Point> {
    let mut out = vec![(String::new(), Vec::new())];
    for a in axes {
        let leaf = a.name.rsplit('.').next().unwrap_or(&a.name);
        let mut next = Vec::with_capacity(out.len() * a.values.len());
        for (name, settings) in &out {
            for v in &a.values {
                let clean: String = v
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_') { c } else { '-' })
                    .collect();
                let n = if name.is_empty() { format!("{leaf}{clean}") } else { format!("{name}_{leaf}{clean}") };
                let mut s: Vec<(String, String)> = Vec::clone(settings);
                s.push((a.key.clone(), v.clone()));
                next.push((n, s));
            }
        }
        out = next;
    }
    out.into_iter().map(|(name, settings)| Point { name, settings }).collect()
}

/// What happened to one run of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Trained from the start in this invocation.
    Trained,
    /// Continued from its checkpoint in this invocation.
    Resumed,
    /// Finished by an earlier invocation.
    Skipped,
    /// Stopped early (Ctrl-C or the step callback); run the sweep again to continue.
    Interrupted,
    /// Not reached because the sweep was interrupted.
    Pending,
}

/// `OUT/sweep.json`: the grid and which runs are done.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Ledger {
    config: PathBuf,
    grid: Vec<Axis>,
    done: Vec<String>,
}

/// A step callback that also gets the run's name.
pub type StepCallback<'a> = &'a mut dyn FnMut(&str, &Record) -> bool;

/// What the caller can hook into a sweep.
#[derive(Default)]
pub struct SweepHooks<'a> {
    /// Called after every step of every run with the run's name; returning false interrupts the
    /// sweep (the run writes a checkpoint first).
    pub on_step: Option<StepCallback<'a>>,
    /// Set (e.g. by Ctrl-C) to interrupt the sweep after the current step.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Progress bars on stderr.
    pub progress: bool,
}

/// The result of a sweep.
#[derive(Debug, Clone)]
pub struct SweepReport {
    pub runs: Vec<(Point, Status)>,
    /// Summaries of the runs that have logs (the compare table's rows).
    pub summaries: Vec<RunSummary>,
    pub interrupted: bool,
}

/// Runs the grid `axes` over the configuration file `config` (plus `sets`, `key=value` applied to
/// every run, e.g. the device) into `out`, skipping finished runs and resuming interrupted ones.
pub fn run_sweep(
    config: &Path,
    axes: &[Axis],
    sets: &[String],
    out: &Path,
    mut hooks: SweepHooks<'_>,
) -> Result<SweepReport> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let ledger_path = out.join("sweep.json");
    let mut ledger = if ledger_path.is_file() {
        let text = std::fs::read_to_string(&ledger_path).map_err(|e| Error::io(&ledger_path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format(&ledger_path, e.to_string()))?
    } else {
        Ledger::default()
    };
    ledger.config = config.to_path_buf();
    ledger.grid = axes.to_vec();
    let save = |l: &Ledger| -> Result<()> {
        let text = serde_json::to_string_pretty(l).map_err(|e| Error::format(&ledger_path, e.to_string()))?;
        write_atomic(&ledger_path, text.as_bytes())
    };
    let grid = points(axes);
    // Check every point's configuration before training anything: a bad value fails at once.
    let mut configs = Vec::with_capacity(grid.len());
    for p in &grid {
        let mut s: Vec<String> = sets.to_vec();
        s.extend(p.settings.iter().map(|(k, v)| format!("{k}={v}")));
        s.push(format!("output.dir={}", out.join(&p.name).display()));
        configs.push(TrainConfig::load(Some(config), &toml::Table::new(), &s)?);
    }
    let mut runs = Vec::with_capacity(grid.len());
    let mut interrupted = false;
    for (p, mut cfg) in grid.into_iter().zip(configs) {
        if interrupted {
            runs.push((p, Status::Pending));
            continue;
        }
        if ledger.done.contains(&p.name) {
            runs.push((p, Status::Skipped));
            continue;
        }
        let dir = &cfg.output.dir;
        let resume = dir.is_dir() && resolve_resume(dir, "latest").is_ok();
        if resume {
            cfg.output.resume = Some("latest".into());
        } else if dir.exists() {
            // Stopped before its first checkpoint: nothing to resume, and its partial logs would be
            // appended to.
            std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let name = p.name.clone();
        let mut cb = hooks.on_step.as_deref_mut();
        let mut step = |r: &Record| cb.as_mut().is_none_or(|f| f(&name, r));
        let run_hooks =
            Hooks { on_step: Some(&mut step), interrupt: hooks.interrupt.clone(), progress: hooks.progress };
        let outcome = train(&cfg, run_hooks)?;
        if outcome.interrupted {
            interrupted = true;
            runs.push((p, Status::Interrupted));
        } else {
            ledger.done.push(p.name.clone());
            save(&ledger)?;
            runs.push((p, if resume { Status::Resumed } else { Status::Trained }));
        }
    }
    save(&ledger)?;
    let dirs: Vec<PathBuf> =
        runs.iter().map(|(p, _)| out.join(&p.name)).filter(|d| d.join("metrics.jsonl").is_file()).collect();
    let summaries = summarize_runs(&dirs)?;
    Ok(SweepReport { runs, summaries, interrupted })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_parse_and_expand() {
        let axes = parse_grid("lr=1e-5,2e-5  batch=8,16 train.seed=42,1337,2024").unwrap();
        assert_eq!(
            axes.iter().map(|a| a.key.as_str()).collect::<Vec<_>>(),
            ["optim.lr", "train.batch_size", "train.seed"]
        );
        let pts = points(&axes);
        assert_eq!(pts.len(), 12);
        assert_eq!(pts[0].name, "lr1e-5_batch8_seed42");
        assert_eq!(pts[1].name, "lr1e-5_batch8_seed1337");
        assert_eq!(pts[11].name, "lr2e-5_batch16_seed2024");
        assert_eq!(
            pts[11].settings,
            [
                ("optim.lr".into(), "2e-5".into()),
                ("train.batch_size".into(), "16".into()),
                ("train.seed".into(), "2024".into())
            ]
        );
        // Names stay unique and safe as directory names.
        let pts = points(&parse_grid("lora.target_modules=q_proj/v_proj").unwrap());
        assert_eq!(pts[0].name, "target_modulesq_proj-v_proj");
    }

    #[test]
    fn bad_grids_say_what_is_wrong() {
        let e = parse_grid("lrr=1e-4").unwrap_err().to_string();
        assert!(e.contains("did you mean `lr`?"), "{e}");
        let e = parse_grid("optim.learning_rate=1e-4").unwrap_err().to_string();
        assert!(e.contains("did you mean `optim.lr`?"), "{e}");
        let e = parse_grid("batch_size=4").unwrap_err().to_string();
        assert!(e.contains("did you mean `train.batch_size`?"), "{e}");
        let e = parse_grid("xyzzy=1").unwrap_err().to_string();
        assert!(e.contains("short name (lr, batch, seed"), "{e}");
        for bad in ["lr", "lr=", "", "lr=1 optim.lr=2"] {
            assert!(parse_grid(bad).is_err(), "{bad:?}");
        }
    }
}
