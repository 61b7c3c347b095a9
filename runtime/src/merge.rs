//! Merging a LoRA adapter into the full-precision base: W' = W + s·B·A, written as an HF
//! checkpoint (sharded safetensors, config, tokenizer) that loads anywhere without the adapter.
//!
//! The merge happens on the weights as the original checkpoint stores them (bf16, f16 or f32),
//! never on the 4-bit copy training used: merging into a 4-bit base would bake its quantization
//! error into every merged weight. A bitsandbytes 4-bit base is refused unless the caller asks,
//! and then it is dequantized first (to the dtype its quant state records) and the report says so.

use crate::adapter::{AdapterConfig, peft_module_path};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::safetensors::{Checkpoint, LoadAs, LoadedWeight, SafetensorsStreamWriter};
use crate::util::write_atomic;
use gristmill_core::DType;
use gristmill_core::bnb::BnbNames;
use gristmill_core::ops::lora::lora_scale;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// How to merge.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeOptions {
    /// Dequantize a bitsandbytes 4-bit base and merge into that (lossy; off by default).
    pub allow_4bit: bool,
    /// Largest shard in bytes (transformers' default is 5 GB).
    pub max_shard_bytes: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self { allow_4bit: false, max_shard_bytes: 5_000_000_000 }
    }
}

/// What a merge did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    pub out: PathBuf,
    /// Linear weights that received their adapter's update.
    pub merged_modules: usize,
    pub tensors: usize,
    pub bytes: u64,
    pub shards: usize,
    /// The base was bitsandbytes 4-bit and was dequantized first.
    pub dequantized_4bit: bool,
}

/// One output tensor: its name, dtype and shape, and where it comes from.
struct Planned {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    /// (A, B) names of the adapter factors to merge, if any.
    lora: Option<(String, String)>,
    /// Stored as bitsandbytes 4-bit in the base.
    nf4: bool,
}

/// Converts f32 values to `dtype`'s little-endian bytes (round to nearest even).
fn to_bytes(values: &[f32], dtype: DType) -> Result<Vec<u8>> {
    Ok(match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        DType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        other => return Err(Error::Unsupported(format!("merging into {other} weights"))),
    })
}

/// Merges the PEFT adapter in `adapter` into the model in `base` and writes the result to `out`.
pub fn merge_adapter(base: &Path, adapter: &Path, out: &Path, opts: &MergeOptions) -> Result<MergeReport> {
    // The base must be a model gristmill knows (the same checks as loading it).
    ModelConfig::from_file(base.join("config.json"))?;
    let ck = Checkpoint::open(base)?;
    let acfg = AdapterConfig::from_dir(adapter)?;
    let apath = adapter.join("adapter_model.safetensors");
    let ad = Checkpoint::open(&apath)?;
    let scale = lora_scale(acfg.lora_alpha, acfg.r, acfg.use_rslora)?;

    // Plan every output tensor before writing anything, so that a problem stops the merge early.
    let mut plan = Vec::new();
    let mut used_lora = std::collections::BTreeSet::new();
    let mut any_4bit = false;
    for name in ck.names() {
        if BnbNames::is_side_tensor(name) {
            continue;
        }
        let nf4 = ck.is_bnb_4bit(name);
        any_4bit |= nf4;
        let (dtype, shape) = if nf4 {
            match ck.load_weight(name, LoadAs::Nf4)? {
                LoadedWeight::Nf4(t) => (t.dtype, t.shape.dims().to_vec()),
                LoadedWeight::F32 { shape, .. } => (DType::F32, shape),
            }
        } else {
            let t = ck.get(name)?;
            (t.dtype, t.shape.to_vec())
        };
        // model.layers.{i}.{self_attn|mlp}.{module}.weight gets its adapter when there is one.
        let lora = name.strip_prefix("model.layers.").and_then(|rest| {
            let (i, rest) = rest.split_once('.')?;
            let i: usize = i.parse().ok()?;
            let module = rest.strip_suffix(".weight")?.rsplit('.').next()?;
            let path = peft_module_path(i, module);
            let find = |which: &str| {
                [format!("{path}.{which}.weight"), format!("{path}.{which}.default.weight")]
                    .into_iter()
                    .find(|n| ad.contains(n))
            };
            Some((find("lora_A")?, find("lora_B")?))
        });
        if let Some((a, b)) = &lora {
            used_lora.insert(a.clone());
            used_lora.insert(b.clone());
        }
        plan.push(Planned { name: name.to_string(), dtype, shape, lora, nf4 });
    }
    if any_4bit && !opts.allow_4bit {
        return Err(Error::Invalid(format!(
            "{} is a bitsandbytes 4-bit checkpoint: merging into it would bake the quantization error into every \
             merged weight. Merge into the original bf16/f32 checkpoint, or pass --allow-4bit to dequantize first",
            base.display()
        )));
    }
    let unused: Vec<&str> = ad
        .names()
        .into_iter()
        .filter(|n| (n.contains("lora_A") || n.contains("lora_B")) && !used_lora.contains(*n))
        .collect();
    if !unused.is_empty() {
        return Err(Error::format(
            &apath,
            format!(
                "{} LoRA tensors match no weight of {} (first: `{}`): the adapter belongs to another model",
                unused.len(),
                base.display(),
                unused[0]
            ),
        ));
    }
    let merged_modules = plan.iter().filter(|p| p.lora.is_some()).count();
    if merged_modules == 0 {
        return Err(Error::format(&apath, "no LoRA tensors to merge"));
    }

    // Shards of at most max_shard_bytes, in name order (a tensor larger than that gets its own).
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, p) in plan.iter().enumerate() {
        let bytes = p.dtype.storage_bytes(p.shape.iter().product())? as u64;
        if size > 0 && size + bytes > opts.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        if let Some(last) = shards.last_mut() {
            last.push(i);
        }
        size += bytes;
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let n_shards = shards.len();
    let file_name = |k: usize| {
        if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n_shards:05}.safetensors", k + 1)
        }
    };
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (k, shard) in shards.iter().enumerate() {
        let path = out.join(file_name(k));
        let list = shard.iter().map(|&i| (plan[i].name.clone(), plan[i].dtype, plan[i].shape.clone())).collect();
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let mut w = SafetensorsStreamWriter::create(&path, list, Some(meta))?;
        let by_name: HashMap<&str, &Planned> = shard.iter().map(|&i| (plan[i].name.as_str(), &plan[i])).collect();
        let order: Vec<String> = w.names().map(str::to_string).collect();
        for name in order {
            let p = by_name.get(name.as_str()).ok_or_else(|| Error::tensor(&name, "not planned"))?;
            let bytes = match (&p.lora, p.nf4) {
                (None, false) => ck.get(&p.name)?.data.to_vec(),
                _ => {
                    let mut wv = match ck.load_weight(&p.name, LoadAs::F32)? {
                        LoadedWeight::F32 { data, .. } => data,
                        LoadedWeight::Nf4(t) => t.dequantize()?,
                    };
                    if let Some((a_name, b_name)) = &p.lora {
                        add_lora(&mut wv, &p.shape, &ad.to_f32(a_name)?, &ad.to_f32(b_name)?, acfg.r, scale, &p.name)?;
                    }
                    to_bytes(&wv, p.dtype)?
                }
            };
            total += bytes.len() as u64;
            weight_map.insert(name.clone(), file_name(k));
            w.write_tensor(&name, &bytes)?;
        }
        w.finish()?;
    }
    if n_shards > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = out.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).map_err(|e| Error::format(&path, e.to_string()))?;
        write_atomic(&path, text.as_bytes())?;
    }
    // The config without its quantization section (the merged model is plain), and the tokenizer.
    let cpath = base.join("config.json");
    let text = std::fs::read_to_string(&cpath).map_err(|e| Error::io(&cpath, e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&cpath, e.to_string()))?;
    if let Some(obj) = config.as_object_mut() {
        obj.remove("quantization_config");
    }
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::format(&cpath, e.to_string()))?;
    write_atomic(&out.join("config.json"), text.as_bytes())?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        let src = base.join(f);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            write_atomic(&out.join(f), &bytes)?;
        }
    }
    Ok(MergeReport {
        out: out.to_path_buf(),
        merged_modules,
        tensors: plan.len(),
        bytes: total,
        shards: n_shards,
        dequantized_4bit: any_4bit,
    })
}

/// w += scale · B·A, in f32.
///
/// w: (N, K); a: (r, K); b: (N, r).
fn add_lora(w: &mut [f32], shape: &[usize], a: &[f32], b: &[f32], r: usize, scale: f32, name: &str) -> Result<()> {
    let (n, k) = match *shape {
        [n, k] => (n, k),
        _ => return Err(Error::tensor(name, format!("shape {shape:?} is not a matrix"))),
    };
    if a.len() != r * k || b.len() != n * r {
        return Err(Error::tensor(
            name,
            format!(
                "the adapter's factors ({} and {} values) do not fit a ({n}, {k}) weight at rank {r}",
                a.len(),
                b.len()
            ),
        ));
    }
    let delta = crate::cpu::matmul_nn(b, a, n, r, k)?;
    w.iter_mut().zip(&delta).for_each(|(x, d)| *x += scale * d);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BasePrecision, LlamaModel};
    use crate::util::TempDir;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    fn logits(model: &LlamaModel, ids: &[u32]) -> Vec<f32> {
        model.forward(ids, &mut model.new_cache(), true).unwrap()
    }

    #[test]
    fn merged_model_gives_base_plus_adapter_logits() {
        let tmp = TempDir::new("merge");
        let adapter = fixtures().join("peft_adapter");
        // Small shards, so that the sharded layout and its index are exercised.
        let opts = MergeOptions { max_shard_bytes: 150_000, ..Default::default() };
        let r = merge_adapter(&fixtures().join("tiny_llama"), &adapter, tmp.path(), &opts).unwrap();
        assert_eq!(r.merged_modules, 14);
        assert!(r.shards > 1 && !r.dequantized_4bit);
        assert!(tmp.path().join("model.safetensors.index.json").is_file());
        assert!(tmp.path().join("tokenizer.json").is_file());

        let mut unmerged = LlamaModel::load(&fixtures().join("tiny_llama"), BasePrecision::F32).unwrap();
        crate::adapter::load_peft_adapter(&mut unmerged, &adapter).unwrap();
        let merged = LlamaModel::load(tmp.path(), BasePrecision::F32).unwrap();
        assert!(merged.layers.iter().all(|l| l.q.lora.is_none()));
        let ids = [3u32, 141, 59, 26, 5, 35, 89, 7];
        let (a, b) = (logits(&unmerged, &ids), logits(&merged, &ids));
        // The merged weights are rounded back to the checkpoint's bf16: bf16 tolerance.
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        eprintln!("merged vs base + adapter: max |Δlogit| {d:.2e}, logits up to {scale:.2}");
        assert!(d <= 0.02 * scale, "max |Δlogit| {d} (logits up to {scale})");
    }

    #[test]
    fn a_4bit_base_is_refused_unless_asked() {
        let tmp = TempDir::new("merge4");
        let base = fixtures().join("tiny_llama_bnb4");
        let adapter = fixtures().join("peft_adapter");
        let e = merge_adapter(&base, &adapter, tmp.path(), &MergeOptions::default()).unwrap_err().to_string();
        assert!(e.contains("bitsandbytes 4-bit") && e.contains("--allow-4bit"), "{e}");
        assert!(!tmp.path().join("model.safetensors").exists(), "nothing written");
        let opts = MergeOptions { allow_4bit: true, ..Default::default() };
        let r = merge_adapter(&base, &adapter, tmp.path(), &opts).unwrap();
        assert!(r.dequantized_4bit && r.shards == 1);
        let merged = LlamaModel::load(tmp.path(), BasePrecision::AsStored).unwrap();
        assert!(matches!(merged.layers[0].q.weight, crate::model::Weight::Dense(_)));
        let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
        assert!(!cfg.contains("quantization_config"));
    }
}
