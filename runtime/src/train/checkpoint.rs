//! Checkpoints in the run directory: `checkpoint-{step}/`, written so that none is ever seen half
//! done.
//!
//! A checkpoint is filled under a hidden temporary name, `.checkpoint-{step}.tmp`, and renamed to
//! `checkpoint-{step}` only once its writer returned successfully; a rename within one directory is
//! atomic, so a `checkpoint-{step}` directory is always complete. Replacing an existing one moves it
//! aside to `.checkpoint-{step}.old` first, and pruning renames to `.checkpoint-{step}.del` before
//! deleting, so an interruption at any point leaves either the old or the new checkpoint under its
//! name. [`CheckpointManager::new`] tidies what an interrupted run left: `.tmp` and `.del` are
//! removed, an `.old` whose replacement never arrived is put back.
//!
//! The best checkpoint (lowest eval loss, as the trainer decides) cannot be told from its name, so
//! its step is remembered in `checkpoints.json` in the run directory; pruning never deletes it.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const PREFIX: &str = "checkpoint-";
const INDEX: &str = "checkpoints.json";

/// The directory of the checkpoint of `step` in `run_dir`.
pub fn checkpoint_dir(run_dir: &Path, step: usize) -> PathBuf {
    run_dir.join(format!("{PREFIX}{step}"))
}

/// The step of a checkpoint directory named `checkpoint-{step}`; `None` for any other name.
pub fn checkpoint_step(dir: &Path) -> Option<usize> {
    let digits = dir.file_name()?.to_str()?.strip_prefix(PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The checkpoints in `run_dir` as (step, directory), oldest first; none when `run_dir` does not
/// exist. Temporary and half-deleted directories are not checkpoints and are not listed.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let entries = match std::fs::read_dir(run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(run_dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(run_dir, e))?;
        let path = entry.path();
        if let Some(step) = checkpoint_step(&path)
            && path.is_dir()
        {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint in `run_dir` (highest step), if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(run_dir)?.pop().map(|(_, p)| p))
}

/// The checkpoint directory `output.resume` names: `latest` is the newest one in `run_dir`, anything
/// else a path to a checkpoint directory.
pub fn resolve_resume(run_dir: &Path, resume: &str) -> Result<PathBuf> {
    if resume.trim() == "latest" {
        return latest(run_dir)?.ok_or_else(|| {
            Error::Invalid(format!("resume = latest: no checkpoint-* directory in {}", run_dir.display()))
        });
    }
    let path = PathBuf::from(resume);
    if !path.is_dir() {
        return Err(Error::Invalid(format!("resume: {} is not a checkpoint directory", path.display())));
    }
    Ok(path)
}

/// What `checkpoints.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    best_step: Option<usize>,
}

fn hidden(run_dir: &Path, step: usize, suffix: &str) -> PathBuf {
    run_dir.join(format!(".{PREFIX}{step}.{suffix}"))
}

/// Makes renames inside `dir` durable. Best effort: not every platform can open a directory for
/// syncing, and the rename itself has already happened.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn remove_dir(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| Error::io(to, e))
}

/// Saves checkpoints into a run directory and keeps the newest `keep_last` of them plus the best.
#[derive(Debug)]
pub struct CheckpointManager {
    run_dir: PathBuf,
    keep_last: usize,
    best: Option<usize>,
}

impl CheckpointManager {
    /// Opens (creating it if needed) `run_dir`, cleans up what an interrupted save left behind, and
    /// reads which checkpoint is the best. `keep_last` 0 keeps every checkpoint.
    pub fn new(run_dir: impl Into<PathBuf>, keep_last: usize) -> Result<Self> {
        let run_dir = run_dir.into();
        std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
        for entry in std::fs::read_dir(&run_dir).map_err(|e| Error::io(&run_dir, e))? {
            let entry = entry.map_err(|e| Error::io(&run_dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name.strip_prefix('.').and_then(|n| n.strip_prefix(PREFIX)) else { continue };
            let Some((step, suffix)) = rest.split_once('.') else { continue };
            let Ok(step) = step.parse::<usize>() else { continue };
            match suffix {
                "tmp" | "del" => remove_dir(&entry.path())?,
                "old" => {
                    // Moved aside to be replaced: the replacement either landed (drop the old one)
                    // or did not (it is the checkpoint; put it back).
                    let fin = checkpoint_dir(&run_dir, step);
                    if fin.exists() { remove_dir(&entry.path())? } else { rename(&entry.path(), &fin)? }
                }
                _ => {}
            }
        }
        let index_path = run_dir.join(INDEX);
        let best = match std::fs::read_to_string(&index_path) {
            Ok(text) => {
                serde_json::from_str::<Index>(&text).map_err(|e| Error::format(&index_path, e.to_string()))?.best_step
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&index_path, e)),
        };
        Ok(CheckpointManager { run_dir, keep_last, best })
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The step of the best checkpoint, if one was saved as best.
    pub fn best_step(&self) -> Option<usize> {
        self.best
    }

    /// The checkpoints of this run, oldest first.
    pub fn list(&self) -> Result<Vec<(usize, PathBuf)>> {
        list_checkpoints(&self.run_dir)
    }

    /// Saves the checkpoint of `step`: `write` fills the directory it is given, which becomes
    /// `checkpoint-{step}` only if it succeeds (replacing an earlier checkpoint of that step). If
    /// `write` fails, nothing of it remains and its error is returned. Then older checkpoints beyond
    /// `keep_last` are deleted, except the best. Returns the checkpoint's directory.
    pub fn save(&mut self, step: usize, is_best: bool, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let tmp = hidden(&self.run_dir, step, "tmp");
        remove_dir(&tmp)?;
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        if let Err(e) = write(&tmp) {
            // The writer's error is the one worth reporting; should this cleanup fail too, `new`
            // removes the leftover on the next run.
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        sync_dir(&tmp);

        let fin = checkpoint_dir(&self.run_dir, step);
        if fin.exists() {
            let old = hidden(&self.run_dir, step, "old");
            remove_dir(&old)?;
            rename(&fin, &old)?;
            if let Err(e) = rename(&tmp, &fin) {
                let _ = std::fs::rename(&old, &fin);
                return Err(e);
            }
            remove_dir(&old)?;
        } else {
            rename(&tmp, &fin)?;
        }
        sync_dir(&self.run_dir);

        if is_best {
            self.best = Some(step);
            let index = Index { best_step: self.best };
            let path = self.run_dir.join(INDEX);
            let text = serde_json::to_string(&index).map_err(|e| Error::format(&path, e.to_string()))?;
            crate::util::write_atomic(&path, text.as_bytes())?;
        }
        self.prune()?;
        Ok(fin)
    }

    /// Deletes checkpoints beyond the newest `keep_last`, never the best one.
    fn prune(&self) -> Result<()> {
        if self.keep_last == 0 {
            return Ok(());
        }
        let all = self.list()?;
        let cut = all.len().saturating_sub(self.keep_last);
        for (step, path) in &all[..cut] {
            if Some(*step) == self.best {
                continue;
            }
            // Out of sight first, so a half-deleted directory never passes for a checkpoint.
            let del = hidden(&self.run_dir, *step, "del");
            remove_dir(&del)?;
            rename(path, &del)?;
            remove_dir(&del)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gristmill-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn write_marker(text: &'static str) -> impl FnOnce(&Path) -> Result<()> {
        move |dir: &Path| std::fs::write(dir.join("marker"), text).map_err(|e| Error::io(dir, e))
    }

    fn steps(m: &CheckpointManager) -> Vec<usize> {
        m.list().unwrap().into_iter().map(|(s, _)| s).collect()
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn keeps_the_last_and_the_best() {
        let d = run_dir("keep");
        let mut m = CheckpointManager::new(&d, 2).unwrap();
        assert_eq!(latest(&d).unwrap(), None);
        let p = m.save(10, false, write_marker("a")).unwrap();
        assert_eq!(p, d.join("checkpoint-10"));
        assert_eq!(std::fs::read_to_string(p.join("marker")).unwrap(), "a");
        m.save(20, true, write_marker("b")).unwrap();
        m.save(30, false, write_marker("c")).unwrap();
        assert_eq!(steps(&m), [20, 30]);
        m.save(40, false, write_marker("d")).unwrap();
        assert_eq!(steps(&m), [20, 30, 40], "the best (20) stays besides the last two");
        m.save(50, false, write_marker("e")).unwrap();
        assert_eq!(steps(&m), [20, 40, 50]);
        m.save(60, true, write_marker("f")).unwrap();
        assert_eq!(steps(&m), [50, 60], "20 is no longer the best");
        assert_eq!(m.best_step(), Some(60));
        assert_eq!(latest(&d).unwrap(), Some(d.join("checkpoint-60")));
        // The best survives a restart.
        let mut m = CheckpointManager::new(&d, 1).unwrap();
        assert_eq!(m.best_step(), Some(60));
        m.save(70, false, write_marker("g")).unwrap();
        m.save(80, false, write_marker("h")).unwrap();
        assert_eq!(steps(&m), [60, 80]);
        // Steps sort numerically, not as text.
        m.save(100, false, write_marker("i")).unwrap();
        assert_eq!(latest(&d).unwrap(), Some(d.join("checkpoint-100")));
        // keep_last 0 keeps everything.
        let mut m = CheckpointManager::new(&d, 0).unwrap();
        for s in [1, 2, 3] {
            m.save(s, false, write_marker("x")).unwrap();
        }
        assert_eq!(steps(&m), [1, 2, 3, 60, 100]);
        assert!(!entries(&d).iter().any(|e| e.starts_with('.')), "{:?}", entries(&d));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn failing_writer_leaves_nothing() {
        let d = run_dir("fail");
        let mut m = CheckpointManager::new(&d, 2).unwrap();
        m.save(5, false, write_marker("good")).unwrap();
        let r = m.save(10, false, |dir: &Path| {
            std::fs::write(dir.join("half"), "x").unwrap();
            Err(Error::Invalid("disk full".into()))
        });
        assert!(matches!(r, Err(Error::Invalid(ref m)) if m == "disk full"));
        assert_eq!(entries(&d), ["checkpoint-5"]);
        // A failing rewrite of an existing step keeps the old checkpoint.
        let r = m.save(5, false, |_: &Path| Err(Error::Invalid("no".into())));
        assert!(r.is_err());
        assert_eq!(std::fs::read_to_string(d.join("checkpoint-5/marker")).unwrap(), "good");
        assert_eq!(entries(&d), ["checkpoint-5"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn replacing_a_step_swaps_the_contents() {
        let d = run_dir("replace");
        let mut m = CheckpointManager::new(&d, 2).unwrap();
        m.save(5, false, write_marker("one")).unwrap();
        std::fs::write(d.join("checkpoint-5/stale"), "x").unwrap();
        m.save(5, false, write_marker("two")).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("checkpoint-5/marker")).unwrap(), "two");
        assert!(!d.join("checkpoint-5/stale").exists());
        assert_eq!(entries(&d), ["checkpoint-5"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn leftovers_are_cleaned_and_ignored() {
        let d = run_dir("leftovers");
        std::fs::create_dir_all(d.join(".checkpoint-30.tmp")).unwrap();
        std::fs::create_dir_all(d.join(".checkpoint-7.del")).unwrap();
        std::fs::create_dir_all(d.join("checkpoint-10")).unwrap();
        // Interrupted replacement of 20: the old one was moved aside, the new one never arrived.
        std::fs::create_dir_all(d.join(".checkpoint-20.old")).unwrap();
        std::fs::write(d.join(".checkpoint-20.old/marker"), "old").unwrap();
        // Interrupted replacement of 10 after the new one landed.
        std::fs::create_dir_all(d.join(".checkpoint-10.old")).unwrap();
        // Not ours: left alone.
        std::fs::create_dir_all(d.join("checkpoint-x")).unwrap();
        std::fs::write(d.join("checkpoint-99"), "a file, not a checkpoint").unwrap();
        assert_eq!(latest(&d).unwrap(), Some(d.join("checkpoint-10")), "tmp leftovers are not checkpoints");
        let m = CheckpointManager::new(&d, 5).unwrap();
        assert_eq!(entries(&d), ["checkpoint-10", "checkpoint-20", "checkpoint-99", "checkpoint-x"]);
        assert_eq!(std::fs::read_to_string(d.join("checkpoint-20/marker")).unwrap(), "old");
        assert_eq!(steps(&m), [10, 20]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn names_and_resume() {
        assert_eq!(checkpoint_step(Path::new("/r/checkpoint-120")), Some(120));
        assert_eq!(checkpoint_step(Path::new("checkpoint-")), None);
        assert_eq!(checkpoint_step(Path::new("checkpoint-1a")), None);
        assert_eq!(checkpoint_step(Path::new("checkpoint-+1")), None);
        assert_eq!(checkpoint_step(Path::new(".checkpoint-1.tmp")), None);
        let d = run_dir("resume");
        assert_eq!(latest(&d).unwrap(), None, "a missing run dir has no checkpoints");
        let e = resolve_resume(&d, "latest").unwrap_err().to_string();
        assert!(e.contains("no checkpoint"), "{e}");
        let mut m = CheckpointManager::new(&d, 3).unwrap();
        m.save(3, false, write_marker("x")).unwrap();
        m.save(4, false, write_marker("x")).unwrap();
        assert_eq!(resolve_resume(&d, "latest").unwrap(), d.join("checkpoint-4"));
        let p = d.join("checkpoint-3");
        assert_eq!(resolve_resume(&d, p.to_str().unwrap()).unwrap(), p);
        assert!(resolve_resume(&d, "/nonexistent/checkpoint-3").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
