//! LoRA adapters in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! PEFT names a module's factors `base_model.model.<module path>.lora_A.weight` (r, in) and
//! `…lora_B.weight` (out, r); older versions insert the adapter name (`lora_A.default.weight`).
//! The scale is `lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`.

use crate::error::{Error, Result};
use crate::model::{LlamaModel, LoraAdapter};
use crate::safetensors::{Checkpoint, write_safetensors};
use crate::util::write_atomic;
use gristmill_core::bnb::RawTensor;
use gristmill_core::ops::lora::lora_scale;
use serde::Deserialize;
use std::path::Path;

/// The fields of PEFT's `adapter_config.json` that change the math.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f32,
    #[serde(default)]
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub peft_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

/// PEFT allows a list of module names or one regular expression.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
    #[default]
    None,
}

impl AdapterConfig {
    /// Reads `dir/adapter_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
        if let Some(t) = &cfg.peft_type
            && t != "LORA"
        {
            return Err(Error::format(&path, format!("peft_type is `{t}`; gristmill reads LoRA adapters (LORA)")));
        }
        if cfg.fan_in_fan_out {
            return Err(Error::format(
                &path,
                "fan_in_fan_out is true: that is for GPT-2 style Conv1D layers, which Llama models do not have",
            ));
        }
        if cfg.r == 0 {
            return Err(Error::format(&path, "r is 0"));
        }
        Ok(cfg)
    }
}

/// PEFT's name prefix of module `module` of layer `i` (e.g. `…layers.3.mlp.up_proj`).
pub fn peft_module_path(i: usize, module: &str) -> String {
    let block = if matches!(module, "gate_proj" | "up_proj" | "down_proj") { "mlp" } else { "self_attn" };
    format!("base_model.model.model.layers.{i}.{block}.{module}")
}

/// Loads the PEFT adapter in `dir` onto `model`'s linear layers. Returns how many modules got one.
pub fn load_peft_adapter(model: &mut LlamaModel, dir: &Path) -> Result<usize> {
    let cfg = AdapterConfig::from_dir(dir)?;
    let weights = dir.join("adapter_model.safetensors");
    if !weights.exists() {
        return Err(Error::format(dir, "no adapter_model.safetensors (adapter_model.bin is not read: it is a pickle)"));
    }
    let ck = Checkpoint::open(&weights)?;
    attach_lora_tensors(model, &cfg, &ck, "", &weights)
}

/// Puts LoRA factors named as PEFT names them, behind `prefix`, from `ck` onto `model`. Every
/// LoRA tensor of `ck` under `prefix` must find its module, and every pair must have the shapes
/// the model and `cfg.r` imply. `origin` names the source in errors.
pub fn attach_lora_tensors(
    model: &mut LlamaModel,
    cfg: &AdapterConfig,
    ck: &Checkpoint,
    prefix: &str,
    origin: &Path,
) -> Result<usize> {
    let scale = lora_scale(cfg.lora_alpha, cfg.r, cfg.use_rslora)?;
    let r = cfg.r;
    let mut loaded = 0;
    let mut used = std::collections::BTreeSet::new();
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for (module, lin) in layer.linears_mut() {
            let path = format!("{prefix}{}", peft_module_path(i, module));
            let find = |which: &str| {
                [format!("{path}.{which}.weight"), format!("{path}.{which}.default.weight")]
                    .into_iter()
                    .find(|n| ck.contains(n))
            };
            let (Some(a_name), Some(b_name)) = (find("lora_A"), find("lora_B")) else { continue };
            let a = ck.to_f32(&a_name)?;
            let b = ck.to_f32(&b_name)?;
            if a.len() != r * lin.k {
                return Err(Error::tensor(
                    &a_name,
                    format!("has {} values; expected r × in = {r} × {}", a.len(), lin.k),
                ));
            }
            if b.len() != lin.n * r {
                return Err(Error::tensor(
                    &b_name,
                    format!("has {} values; expected out × r = {} × {r}", b.len(), lin.n),
                ));
            }
            used.insert(a_name);
            used.insert(b_name);
            lin.lora = Some(LoraAdapter { a, b, r, scale });
            loaded += 1;
        }
    }
    let unused: Vec<&str> = ck
        .names()
        .into_iter()
        .filter(|n| n.starts_with(prefix) && (n.contains("lora_A") || n.contains("lora_B")) && !used.contains(*n))
        .collect();
    if !unused.is_empty() {
        return Err(Error::format(
            origin,
            format!(
                "{} LoRA tensors match no module of this model (first: `{}`): the adapter was trained for another architecture or layer count",
                unused.len(),
                unused[0]
            ),
        ));
    }
    if loaded == 0 {
        return Err(Error::format(origin, "no LoRA tensors found"));
    }
    Ok(loaded)
}

/// What a fresh adapter looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    /// f64 so that the written adapter_config.json shows the value the user wrote (0.05, not
    /// 0.05000000074505806).
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    /// Module names (q_proj, …, down_proj) that get an adapter.
    pub target_modules: Vec<String>,
}

/// The seven projections of a Llama layer, by PEFT's names.
pub const ALL_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Gives every targeted linear layer a fresh adapter with PEFT's initialisation: A uniform in
/// ±1/√d_in (kaiming_uniform with a = √5), B zero, so the model starts out unchanged. Layers
/// are visited in a fixed order, so the same seed gives the same adapter.
pub fn init_lora(model: &mut LlamaModel, spec: &LoraSpec, seed: u64) -> Result<usize> {
    for t in &spec.target_modules {
        if !ALL_MODULES.contains(&t.as_str()) {
            return Err(Error::Invalid(format!(
                "unknown target module `{t}` (Llama-family modules: {})",
                ALL_MODULES.join(", ")
            )));
        }
    }
    let scale = lora_scale(spec.alpha as f32, spec.r, spec.rslora)?;
    let mut rng = gristmill_core::rng::Rng::new(seed);
    let mut n = 0;
    for layer in &mut model.layers {
        for (module, lin) in layer.linears_mut() {
            if !spec.target_modules.iter().any(|t| t == module) {
                continue;
            }
            let a = gristmill_core::ops::lora::lora_init_a(&mut rng, spec.r, lin.k);
            let b = gristmill_core::ops::lora::lora_init_b(lin.n, spec.r);
            lin.lora = Some(LoraAdapter { a, b, r: spec.r, scale });
            n += 1;
        }
    }
    if n == 0 {
        return Err(Error::Invalid("no module received an adapter: check the target modules".into()));
    }
    Ok(n)
}

/// Writes the model's adapters as a PEFT adapter directory: `adapter_config.json` and
/// `adapter_model.safetensors` (f32 factors under PEFT's names), each written atomically.
pub fn save_peft_adapter(model: &LlamaModel, spec: &LoraSpec, base_model: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = Vec::new();
    let mut modules = std::collections::BTreeSet::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for (module, lin) in [
            ("q_proj", &layer.q),
            ("k_proj", &layer.k),
            ("v_proj", &layer.v),
            ("o_proj", &layer.o),
            ("gate_proj", &layer.gate),
            ("up_proj", &layer.up),
            ("down_proj", &layer.down),
        ] {
            let Some(l) = &lin.lora else { continue };
            modules.insert(module);
            let path = peft_module_path(i, module);
            let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
            tensors.push(RawTensor {
                name: format!("{path}.lora_A.weight"),
                dtype: gristmill_core::DType::F32,
                shape: vec![l.r, lin.k],
                data: std::borrow::Cow::Owned(bytes(&l.a)),
            });
            tensors.push(RawTensor {
                name: format!("{path}.lora_B.weight"),
                dtype: gristmill_core::DType::F32,
                shape: vec![lin.n, l.r],
                data: std::borrow::Cow::Owned(bytes(&l.b)),
            });
        }
    }
    if tensors.is_empty() {
        return Err(Error::Invalid("the model has no LoRA adapter to save".into()));
    }
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, Some(meta))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": modules.into_iter().collect::<Vec<_>>(),
        "use_rslora": spec.rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
        "revision": null,
    });
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::format(&path, e.to_string()))?;
    write_atomic(&path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BasePrecision;
    use crate::safetensors::write_safetensors;
    use gristmill_core::DType;
    use gristmill_core::bnb::RawTensor;
    use std::borrow::Cow;
    use std::path::PathBuf;

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_llama")
    }

    fn f32_tensor(name: String, shape: Vec<usize>, data: &[f32]) -> RawTensor<'static> {
        RawTensor {
            name,
            dtype: DType::F32,
            shape,
            data: Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        }
    }

    #[test]
    fn adapter_changes_exactly_the_adapted_path() {
        let dir = std::env::temp_dir().join(format!("gristmill-adapter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = LlamaModel::load(&fixture(), BasePrecision::F32).unwrap();
        let (r, c) = (2usize, model.cfg.hidden_size);
        let q_out = model.layers[0].q.n;
        let a: Vec<f32> = (0..r * c).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
        let b: Vec<f32> = (0..q_out * r).map(|i| ((i % 5) as f32 - 2.0) * 0.02).collect();
        let p = "base_model.model.model.layers.0.self_attn.q_proj";
        write_safetensors(
            &dir.join("adapter_model.safetensors"),
            &[
                f32_tensor(format!("{p}.lora_A.weight"), vec![r, c], &a),
                f32_tensor(format!("{p}.lora_B.weight"), vec![q_out, r], &b),
            ],
            None,
        )
        .unwrap();
        std::fs::write(
            dir.join("adapter_config.json"),
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "use_rslora": false}"#,
        )
        .unwrap();

        let mut adapted = model.clone();
        assert_eq!(load_peft_adapter(&mut adapted, &dir).unwrap(), 1);
        let lora = adapted.layers[0].q.lora.as_ref().unwrap();
        assert_eq!(lora.scale, 2.0);
        // The adapted q projection is the base one plus 2 · (x Aᵀ) Bᵀ.
        let x: Vec<f32> = (0..3 * c).map(|i| (i as f32 * 0.37).sin()).collect();
        let y0 = model.layers[0].q.forward(&x, 3).unwrap();
        let y1 = adapted.layers[0].q.forward(&x, 3).unwrap();
        for m in 0..3 {
            for j in 0..q_out {
                let u: Vec<f32> = (0..r).map(|k| (0..c).map(|i| x[m * c + i] * a[k * c + i]).sum()).collect();
                let d: f32 = (0..r).map(|k| u[k] * b[j * r + k]).sum();
                let got = y1[m * q_out + j] - y0[m * q_out + j];
                assert!((got - 2.0 * d).abs() < 1e-5, "({m}, {j}): {got} vs {}", 2.0 * d);
            }
        }
        // A rank that does not match the tensors is an error naming the tensor.
        std::fs::write(dir.join("adapter_config.json"), r#"{"r": 3, "lora_alpha": 4}"#).unwrap();
        let e = load_peft_adapter(&mut model.clone(), &dir).unwrap_err().to_string();
        assert!(e.contains("lora_A.weight") && e.contains("expected r × in = 3 × 96"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
