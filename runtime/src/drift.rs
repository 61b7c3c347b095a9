//! Representation drift: how far fine-tuning moves each layer's hidden states away from the base
//! model's.
//!
//! With `train.track_hidden_every = N` the trainer records, at step 0 (the base: LoRA B starts at
//! zero) and every N steps, the output of every decoder layer (the residual stream after the layer)
//! for the first `train.track_examples` validation examples, **averaged over each example's
//! tokens**: one C-vector per (layer, example). Records are appended to `hidden_states.f32` in the
//! run directory (little-endian f32, one record per tracked step laid out (L, K, C)), described by
//! `hidden_states.json`; `gristmill drift` maps the file into memory and compares every step with
//! step 0, layer by layer, by linear CKA (over the K examples) and the mean cosine similarity of
//! each example's vectors.

use crate::backend::{CpuBackend, decode_step_observed};
use crate::data::Tokenized;
use crate::error::{Error, Result};
use crate::model::LlamaModel;
use crate::train::plot::{Series, plot_lines};
use crate::util::write_atomic;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

const DATA_FILE: &str = "hidden_states.f32";
const INDEX_FILE: &str = "hidden_states.json";

/// `hidden_states.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiddenIndex {
    pub layers: usize,
    pub examples: usize,
    pub hidden: usize,
    /// How each example's token states were reduced.
    pub reduction: String,
    /// The step of each record, in file order.
    pub steps: Vec<usize>,
}

impl HiddenIndex {
    fn record_len(&self) -> usize {
        self.layers * self.examples * self.hidden
    }
}

/// Every layer's output, averaged over the tokens of `ids`: (L, C).
pub fn layer_means(model: &LlamaModel, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
    let be = CpuBackend::new(model);
    let mut cache = model.new_cache();
    let c = model.cfg.hidden_size;
    let mut out = vec![vec![0f32; c]; model.cfg.num_layers];
    let t = ids.len().max(1) as f32;
    decode_step_observed(&be, ids, &mut cache, false, &mut |layer, x: &Vec<f32>| {
        for row in x.chunks(c) {
            for (o, v) in out[layer].iter_mut().zip(row) {
                *o += v / t;
            }
        }
    })?;
    Ok(out)
}

/// Records hidden states during a run.
pub struct HiddenTracker {
    dir: PathBuf,
    every: usize,
    examples: Vec<Vec<u32>>,
    index: HiddenIndex,
}

impl HiddenTracker {
    /// A tracker for `run_dir` recording every `every` steps (None when `every` is 0 or there is no
    /// validation example), on the first `k` of `val`. A run resumed at `step` keeps the records up
    /// to it and drops later ones (logged by the run that stopped).
    pub fn open(
        run_dir: &Path,
        model: &LlamaModel,
        every: usize,
        k: usize,
        val: &[Tokenized],
        step: usize,
    ) -> Result<Option<Self>> {
        let examples: Vec<Vec<u32>> = val.iter().take(k).map(|t| t.ids.clone()).collect();
        if every == 0 || examples.is_empty() {
            return Ok(None);
        }
        let fresh = HiddenIndex {
            layers: model.cfg.num_layers,
            examples: examples.len(),
            hidden: model.cfg.hidden_size,
            reduction: "mean over tokens".into(),
            steps: Vec::new(),
        };
        let ipath = run_dir.join(INDEX_FILE);
        let mut index = fresh.clone();
        if step > 0 && ipath.is_file() {
            let old = read_index(&ipath)?;
            if (old.layers, old.examples, old.hidden) == (fresh.layers, fresh.examples, fresh.hidden) {
                index.steps = old.steps.into_iter().take_while(|&s| s <= step).collect();
            }
        }
        let tracker = HiddenTracker { dir: run_dir.to_path_buf(), every, examples, index };
        // Drop records past the resumption point (or all, on a fresh run).
        let keep = (tracker.index.steps.len() * tracker.index.record_len() * 4) as u64;
        let dpath = run_dir.join(DATA_FILE);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&dpath)
            .map_err(|e| Error::io(&dpath, e))?;
        f.set_len(keep).map_err(|e| Error::io(&dpath, e))?;
        tracker.save_index()?;
        Ok(Some(tracker))
    }

    /// Whether `step` should be recorded and is not yet.
    pub fn due(&self, step: usize) -> bool {
        step.is_multiple_of(self.every) && !self.index.steps.contains(&step)
    }

    /// Appends the states of `model` as step `step`.
    pub fn record(&mut self, step: usize, model: &LlamaModel) -> Result<()> {
        let (l, k, c) = (self.index.layers, self.index.examples, self.index.hidden);
        let mut rec = vec![0f32; l * k * c];
        for (e, ids) in self.examples.iter().enumerate() {
            for (layer, v) in layer_means(model, ids)?.into_iter().enumerate() {
                let at = (layer * k + e) * c;
                rec[at..at + c].copy_from_slice(&v);
            }
        }
        let dpath = self.dir.join(DATA_FILE);
        let mut f = std::fs::OpenOptions::new().append(true).open(&dpath).map_err(|e| Error::io(&dpath, e))?;
        let bytes: Vec<u8> = rec.iter().flat_map(|v| v.to_le_bytes()).collect();
        f.write_all(&bytes).map_err(|e| Error::io(&dpath, e))?;
        self.index.steps.push(step);
        self.save_index()
    }

    fn save_index(&self) -> Result<()> {
        let p = self.dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&self.index).map_err(|e| Error::format(&p, e.to_string()))?;
        write_atomic(&p, text.as_bytes())
    }
}

fn read_index(p: &Path) -> Result<HiddenIndex> {
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(p, e.to_string()))
}

/// Linear CKA between two sets of `n` representations, `x`: (n, cx) and `y`: (n, cy), through the
/// centered Gram matrices: ⟨Kx, Ky⟩_F / (‖Kx‖_F ‖Ky‖_F). 1 for representations equal up to a
/// rotation and an isotropic scale; 0 when either is constant.
pub fn linear_cka(x: &[f32], y: &[f32], n: usize) -> f64 {
    let gram = |a: &[f32]| -> Vec<f64> {
        let c = a.len() / n.max(1);
        // Center each feature over the n examples.
        let mut mean = vec![0f64; c];
        for row in a.chunks(c) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += f64::from(*v) / n as f64;
            }
        }
        let centered: Vec<f64> =
            a.chunks(c).flat_map(|r| r.iter().zip(&mean).map(|(v, m)| f64::from(*v) - m)).collect();
        let mut g = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                g[i * n + j] = (0..c).map(|f| centered[i * c + f] * centered[j * c + f]).sum();
            }
        }
        g
    };
    if n == 0 || x.is_empty() || y.is_empty() {
        return 0.0;
    }
    let (gx, gy) = (gram(x), gram(y));
    let dot: f64 = gx.iter().zip(&gy).map(|(a, b)| a * b).sum();
    let nx: f64 = gx.iter().map(|a| a * a).sum::<f64>().sqrt();
    let ny: f64 = gy.iter().map(|a| a * a).sum::<f64>().sqrt();
    if nx == 0.0 || ny == 0.0 { 0.0 } else { dot / (nx * ny) }
}

/// Mean over the `n` rows of the cosine similarity of `x`'s row and `y`'s (0 for a zero row).
pub fn mean_cosine(x: &[f32], y: &[f32], n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let c = x.len() / n;
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f64 = a.iter().zip(b).map(|(u, v)| f64::from(*u) * f64::from(*v)).sum();
        let na: f64 = a.iter().map(|u| f64::from(*u).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|u| f64::from(*u).powi(2)).sum::<f64>().sqrt();
        if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na * nb) }
    };
    x.chunks(c).zip(y.chunks(c)).map(|(a, b)| cos(a, b)).sum::<f64>() / n as f64
}

/// Drift of every tracked step against step 0: `cka[s][l]`, `cosine[s][l]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftReport {
    pub steps: Vec<usize>,
    pub layers: usize,
    pub examples: usize,
    pub reduction: String,
    pub cka: Vec<Vec<f64>>,
    pub cosine: Vec<Vec<f64>>,
}

/// Reads a run's `hidden_states.*` (memory-mapped) and compares each step with the first record.
pub fn drift(run_dir: &Path) -> Result<DriftReport> {
    let ipath = run_dir.join(INDEX_FILE);
    if !ipath.is_file() {
        return Err(Error::Invalid(format!(
            "{} has no {INDEX_FILE}: train with train.track_hidden_every = N to record hidden states",
            run_dir.display()
        )));
    }
    let index = read_index(&ipath)?;
    let dpath = run_dir.join(DATA_FILE);
    let file = std::fs::File::open(&dpath).map_err(|e| Error::io(&dpath, e))?;
    // SAFETY: the map is read-only and lives only in this function; the trainer appends to the file
    // but never rewrites bytes already written, and the length is checked before any read.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&dpath, e))?;
    let rec = index.record_len();
    let need = index.steps.len() * rec * 4;
    if map.len() < need || rec == 0 {
        return Err(Error::format(&dpath, format!("{} bytes, the index describes {need}", map.len())));
    }
    if index.steps.first() != Some(&0) {
        return Err(Error::format(&ipath, "the first record is not step 0 (the base model)"));
    }
    let record = |i: usize| -> Vec<f32> {
        map[i * rec * 4..(i + 1) * rec * 4]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let base = record(0);
    let (k, c) = (index.examples, index.hidden);
    let layer = |r: &[f32], l: usize| r[l * k * c..(l + 1) * k * c].to_vec();
    let (mut cka, mut cosine) = (Vec::new(), Vec::new());
    for i in 0..index.steps.len() {
        let r = record(i);
        cka.push((0..index.layers).map(|l| linear_cka(&layer(&base, l), &layer(&r, l), k)).collect());
        cosine.push((0..index.layers).map(|l| mean_cosine(&layer(&base, l), &layer(&r, l), k)).collect());
    }
    Ok(DriftReport { steps: index.steps, layers: index.layers, examples: k, reduction: index.reduction, cka, cosine })
}

impl DriftReport {
    /// One row per (step, layer): CKA and cosine against step 0.
    pub fn table(&self) -> String {
        let mut out = format!("{:>6}  {:>5}  {:>9}  {:>9}\n", "step", "layer", "CKA", "cosine");
        for (i, s) in self.steps.iter().enumerate() {
            for l in 0..self.layers {
                out.push_str(&format!("{s:>6}  {l:>5}  {:>9.6}  {:>9.6}\n", self.cka[i][l], self.cosine[i][l]));
            }
        }
        out
    }

    /// CKA against step 0 by layer, one line for each of up to 8 tracked steps (evenly spaced, the
    /// last included).
    pub fn plot(&self, path: &Path) -> Result<()> {
        let n = self.steps.len();
        let mut pick: Vec<usize> = (0..8.min(n)).map(|j| if n <= 8 { j } else { j * (n - 1) / 7 }).collect();
        pick.dedup();
        let series: Vec<Series> = pick
            .iter()
            .enumerate()
            .map(|(j, &i)| {
                let pts = self.cka[i].iter().enumerate().map(|(l, v)| (l as f64, *v)).collect();
                Series::new(format!("step {}", self.steps[i]), pts, j)
            })
            .collect();
        plot_lines(path, "linear CKA against the base, by layer", "layer", "CKA", &series)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cka_and_cosine_by_hand() {
        // 3 examples × 2 features.
        let x = [1.0f32, 0.0, 0.0, 2.0, -1.0, 1.0];
        assert!((linear_cka(&x, &x, 3) - 1.0).abs() < 1e-12);
        // A rotation by 90° and a scale by 3 leave CKA at 1; cosine sees the rotation.
        let y: Vec<f32> = x.chunks(2).flat_map(|r| [-3.0 * r[1], 3.0 * r[0]]).collect();
        assert!((linear_cka(&x, &y, 3) - 1.0).abs() < 1e-12);
        assert!(mean_cosine(&x, &y, 3).abs() < 1e-12);
        // A shift of every example leaves CKA (centered) at 1.
        let z: Vec<f32> = x.iter().map(|v| v + 5.0).collect();
        assert!((linear_cka(&x, &z, 3) - 1.0).abs() < 1e-12);
        // One feature each, already centered: a = [1, 0, -1], b = [1, 1, -2]. The Gram matrices are
        // outer products, so CKA = (a·b)² / (|a|²|b|²) = 3² / (2·6) = 0.75.
        let (a, b) = ([1.0f32, 0.0, -1.0], [1.0f32, 1.0, -2.0]);
        assert!((linear_cka(&a, &b, 3) - 0.75).abs() < 1e-12);
        // Constant representations have no structure: 0.
        assert_eq!(linear_cka(&[1.0, 1.0, 1.0], &a, 3), 0.0);
        // Cosine: rows (1,0)·(1,1)/√2 = 1/√2 and (0,2)·(0,1) = 1 → mean (1/√2 + 1)/2.
        let c = mean_cosine(&[1.0, 0.0, 0.0, 2.0], &[1.0, 1.0, 0.0, 1.0], 2);
        assert!((c - (std::f64::consts::FRAC_1_SQRT_2 + 1.0) / 2.0).abs() < 1e-12);
    }
}
