//! The HF `config.json` of the Llama family: `llama` (SmolLM, Llama 2/3), `mistral`, `qwen2`.
//!
//! These three share one architecture (pre-norm decoder, RMSNorm, RoPE in the rotate-half
//! layout, GQA attention, SwiGLU MLP) and differ only in the fields read here: biases, the rope
//! scaling, a sliding window. Anything that would change the math and that gristmill does not
//! implement is refused here with a message naming the field, rather than run wrongly later.
//!
//! Fields are read from a `serde_json::Value` by hand instead of a derived struct: HF configs
//! carry dozens of fields we ignore, write `null` for absent ones, renamed some across
//! transformers versions (`torch_dtype` → `dtype`, `rope_scaling` + `rope_theta` →
//! `rope_parameters`), and every error must name the field and the file.

use crate::error::{Error, Result};
use gristmill_core::DType;
use gristmill_core::ops::rope::{RopeConfig, RopeScaling, rope_inv_freq};
use serde_json::{Map, Value};
use std::path::Path;

/// The supported `model_type`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// `llama`: Llama 2/3, SmolLM/SmolLM2, TinyLlama…
    Llama,
    /// `mistral`: Mistral 7B (optionally with a sliding attention window).
    Mistral,
    /// `qwen2`: Qwen2 / Qwen2.5 (biases on q, k and v).
    Qwen2,
}

impl Arch {
    /// The HF `model_type`.
    pub const fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// The HF `architectures` entry of the causal-LM head.
    pub const fn hf_architecture(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    fn from_model_type(t: &str) -> Option<Self> {
        match t {
            "llama" => Some(Arch::Llama),
            "mistral" => Some(Arch::Mistral),
            "qwen2" => Some(Arch::Qwen2),
            _ => None,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// Close relatives of the Llama family that we mean to support: they get "not supported yet".
const NOT_YET: &[&str] = &["gemma", "gemma2", "gemma3", "qwen3"];

/// `quantization_config` of a bitsandbytes 4-bit checkpoint (`quant_method: "bitsandbytes"`,
/// `load_in_4bit: true`).
#[derive(Debug, Clone, PartialEq)]
pub struct BnbQuantConfig {
    /// `bnb_4bit_quant_type`: "nf4" (the only one the loader reads) or "fp4".
    pub quant_type: String,
    /// `bnb_4bit_use_double_quant`: whether the block scales are themselves quantized.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`: the dtype bitsandbytes dequantizes to for its GEMMs.
    pub compute_dtype: DType,
}

/// A Llama-family model configuration, in gristmill's names (HF's are in the comments).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// `num_hidden_layers`
    pub num_layers: usize,
    /// `num_attention_heads`
    pub num_heads: usize,
    /// `num_key_value_heads` (defaults to `num_attention_heads`: no GQA).
    pub num_kv_heads: usize,
    /// `head_dim` (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    /// `rope_theta` and `rope_scaling` (or transformers 5's `rope_parameters`).
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v (`attention_bias` for llama/mistral; always for qwen2).
    pub qkv_bias: bool,
    /// Bias on o (`attention_bias` for llama/mistral; never for qwen2).
    pub o_bias: bool,
    /// Biases on gate, up and down (`mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`, an int or a list in HF configs.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Attention window in tokens (mistral), `None` for full causal attention.
    pub sliding_window: Option<usize>,
    /// `torch_dtype` (`dtype` in transformers 5): what the weights were saved as.
    pub torch_dtype: Option<DType>,
    /// Set for bitsandbytes 4-bit checkpoints.
    pub bnb_4bit: Option<BnbQuantConfig>,
}

/// Reads fields of one config object, naming the file in every error.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::config(format!("{}: {msg}", self.path.display()))
    }

    fn unsupported(&self, msg: impl std::fmt::Display) -> Error {
        Error::Unsupported(format!("{}: {msg}", self.path.display()))
    }

    /// The value of `key`; `null` counts as absent, as HF writes it for unset fields.
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize_of(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(format!("field `{key}` should be a non-negative integer, found {v}")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.usize_of(key, v)).transpose()
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.err(format!("missing field `{key}`")))
    }

    /// A required size that must also be positive.
    fn req_dim(&self, key: &str) -> Result<usize> {
        match self.req_usize(key)? {
            0 => Err(self.err(format!("field `{key}` must be positive, found 0"))),
            n => Ok(n),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.err(format!("field `{key}` should be a number, found {v}"))))
            .transpose()
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.err(format!("field `{key}` should be true or false, found {v}"))))
            .transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.err(format!("field `{key}` should be a string, found {v}"))))
            .transpose()
    }

    fn token_id(&self, key: &str, v: &Value) -> Result<u32> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.err(format!("field `{key}` should be a token id, found {v}")))
    }

    fn opt_token(&self, key: &str) -> Result<Option<u32>> {
        self.get(key).map(|v| self.token_id(key, v)).transpose()
    }

    fn sub(&self, key: &str) -> Result<Option<&Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(v) => Err(self.err(format!("field `{key}` should be an object, found {v}"))),
        }
    }
}

impl ModelConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and checks the text of a `config.json`; `path` only names it in errors.
    pub fn from_json_str(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let v: Value = serde_json::from_str(text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = &v else {
            return Err(Error::format(path, "a config.json must hold a JSON object"));
        };
        Self::from_object(&Fields { obj, path })
    }

    fn from_object(f: &Fields<'_>) -> Result<Self> {
        let model_type = f.opt_str("model_type")?.ok_or_else(|| f.err("missing field `model_type`"))?;
        let arch = Arch::from_model_type(model_type).ok_or_else(|| {
            let yet = if NOT_YET.contains(&model_type) { " yet" } else { "" };
            f.err(format!("model_type `{model_type}` is not supported{yet} (supported: llama, mistral, qwen2)"))
        })?;

        let act = f.opt_str("hidden_act")?.unwrap_or("silu");
        // transformers' ACT2FN maps both names to SiLU.
        if act != "silu" && act != "swish" {
            return Err(f.err(format!("hidden_act `{act}` is not supported: Llama-family MLPs use `silu`")));
        }

        let vocab_size = f.req_dim("vocab_size")?;
        let hidden_size = f.req_dim("hidden_size")?;
        let intermediate_size = f.req_dim("intermediate_size")?;
        let num_layers = f.req_dim("num_hidden_layers")?;
        let num_heads = f.req_dim("num_attention_heads")?;
        let num_kv_heads = match f.opt_usize("num_key_value_heads")? {
            None => num_heads,
            Some(0) => return Err(f.err("field `num_key_value_heads` must be positive, found 0")),
            Some(n) => n,
        };
        if num_heads % num_kv_heads != 0 {
            return Err(f.err(format!(
                "num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(f.err(format!(
                    "hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads}) \
                     and no head_dim is given"
                )));
            }
        };
        if head_dim == 0 || head_dim % 2 == 1 {
            return Err(f.err(format!("head_dim must be even and positive for RoPE, found {head_dim}")));
        }

        let rms_norm_eps = f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32;
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(f.err(format!("rms_norm_eps must be finite and positive, found {rms_norm_eps}")));
        }
        let rope = parse_rope(f, head_dim)?;

        // HF's per-architecture defaults for fields older configs omit.
        let default_ctx = match arch {
            Arch::Llama => 2048,
            Arch::Mistral => 4096 * 32,
            Arch::Qwen2 => 32768,
        };
        let max_position_embeddings = f.opt_usize("max_position_embeddings")?.unwrap_or(default_ctx);
        let tie_word_embeddings = f.opt_bool("tie_word_embeddings")?.unwrap_or(false);

        let (qkv_bias, o_bias, mlp_bias) = match arch {
            Arch::Qwen2 => (true, false, false),
            Arch::Llama | Arch::Mistral => {
                let attn = f.opt_bool("attention_bias")?.unwrap_or(false);
                (attn, attn, f.opt_bool("mlp_bias")?.unwrap_or(false))
            }
        };

        let sliding_window = match arch {
            Arch::Llama => None,
            Arch::Mistral => f.opt_usize("sliding_window")?,
            Arch::Qwen2 => {
                // Qwen2 windows only the layers from `max_window_layers` on, and only when
                // `use_sliding_window` is set (it is not, in every published Qwen2/2.5 config).
                let on = f.opt_bool("use_sliding_window")?.unwrap_or(false);
                let from = f.opt_usize("max_window_layers")?.unwrap_or(28);
                if on && from < num_layers {
                    return Err(f.unsupported(format!(
                        "qwen2 sliding-window attention on layers {from}..{num_layers} (use_sliding_window) \
                         is not supported"
                    )));
                }
                None
            }
        };

        let eos_token_ids = match f.get("eos_token_id") {
            None => Vec::new(),
            Some(Value::Array(a)) => a.iter().map(|v| f.token_id("eos_token_id", v)).collect::<Result<_>>()?,
            Some(v) => vec![f.token_id("eos_token_id", v)?],
        };

        // transformers 5 writes `dtype`; older versions `torch_dtype`.
        let dtype_key = if f.get("dtype").is_some() { "dtype" } else { "torch_dtype" };
        let torch_dtype = match f.opt_str(dtype_key)? {
            None => None,
            Some(s) => Some(parse_float_dtype(s).ok_or_else(|| {
                f.err(format!("{dtype_key} `{s}` is not supported (expected bfloat16, float16 or float32)"))
            })?),
        };

        let cfg = Self {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope,
            max_position_embeddings,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            bos_token_id: f.opt_token("bos_token_id")?,
            eos_token_ids,
            pad_token_id: f.opt_token("pad_token_id")?,
            sliding_window,
            torch_dtype,
            bnb_4bit: parse_quant(f)?,
        };
        // Sizes come from a file: make sure every count we derive from them fits in a usize.
        if cfg.checked_param_count().is_none() {
            return Err(f.err("the model's sizes overflow: parameter count does not fit in usize"));
        }
        Ok(cfg)
    }

    /// An HF-style `config.json` for this configuration; [`ModelConfig::from_json_str`] reads it
    /// back to the same value. (Combinations an architecture cannot express, such as qwen2
    /// without q/k/v biases, are written as the architecture has them.)
    pub fn to_hf_json(&self) -> Value {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("architectures", Value::from(vec![self.arch.hf_architecture()]));
        put("model_type", self.arch.model_type().into());
        put("vocab_size", self.vocab_size.into());
        put("hidden_size", self.hidden_size.into());
        put("intermediate_size", self.intermediate_size.into());
        put("num_hidden_layers", self.num_layers.into());
        put("num_attention_heads", self.num_heads.into());
        put("num_key_value_heads", self.num_kv_heads.into());
        put("head_dim", self.head_dim.into());
        put("hidden_act", "silu".into());
        put("rms_norm_eps", json_f32(self.rms_norm_eps));
        put("rope_theta", json_f32(self.rope.theta));
        let scaling = match self.rope.scaling {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => {
                serde_json::json!({ "rope_type": "linear", "factor": json_f32(factor) })
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                serde_json::json!({
                    "rope_type": "llama3",
                    "factor": json_f32(factor),
                    "low_freq_factor": json_f32(low_freq_factor),
                    "high_freq_factor": json_f32(high_freq_factor),
                    "original_max_position_embeddings": original_max_position_embeddings,
                })
            }
        };
        put("rope_scaling", scaling);
        put("max_position_embeddings", self.max_position_embeddings.into());
        put("tie_word_embeddings", self.tie_word_embeddings.into());
        match self.arch {
            Arch::Llama | Arch::Mistral => {
                // One flag covers q, k, v and o in HF: qkv_bias and o_bias go together here.
                put("attention_bias", self.qkv_bias.into());
                put("mlp_bias", self.mlp_bias.into());
            }
            Arch::Qwen2 => put("use_sliding_window", false.into()),
        }
        if self.arch == Arch::Mistral {
            put("sliding_window", self.sliding_window.into());
        }
        put("bos_token_id", self.bos_token_id.into());
        put(
            "eos_token_id",
            match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => (*one).into(),
                many => many.to_vec().into(),
            },
        );
        put("pad_token_id", self.pad_token_id.into());
        if let Some(d) = self.torch_dtype {
            put("torch_dtype", d.torch_name().into());
        }
        if let Some(q) = &self.bnb_4bit {
            put(
                "quantization_config",
                serde_json::json!({
                    "quant_method": "bitsandbytes",
                    "load_in_4bit": true,
                    "load_in_8bit": false,
                    "bnb_4bit_quant_type": q.quant_type,
                    "bnb_4bit_use_double_quant": q.double_quant,
                    "bnb_4bit_compute_dtype": q.compute_dtype.torch_name(),
                    "bnb_4bit_quant_storage": "uint8",
                }),
            );
        }
        Value::Object(m)
    }

    /// Width of the q projection's output: heads × head_dim.
    pub fn q_dim(&self) -> usize {
        self.num_heads.saturating_mul(self.head_dim)
    }

    /// Width of the k and v projections' outputs: kv heads × head_dim.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads.saturating_mul(self.head_dim)
    }

    /// (name, out features, in features) of the seven linear layers of one decoder layer, in
    /// HF module names (`self_attn.q_proj` → `q_proj`, `mlp.gate_proj` → `gate_proj`).
    pub fn linear_shapes(&self) -> Vec<(&'static str, usize, usize)> {
        let (c, f) = (self.hidden_size, self.intermediate_size);
        vec![
            ("q_proj", self.q_dim(), c),
            ("k_proj", self.kv_dim(), c),
            ("v_proj", self.kv_dim(), c),
            ("o_proj", c, self.q_dim()),
            ("gate_proj", f, c),
            ("up_proj", f, c),
            ("down_proj", c, f),
        ]
    }

    /// Number of parameters: embedding, per layer the seven projections (with their biases) and
    /// two norms, the final norm, and the lm_head when it is not tied to the embedding.
    /// (Saturates instead of overflowing; a parsed config is checked to fit.)
    pub fn param_count(&self) -> usize {
        self.checked_param_count().unwrap_or(usize::MAX)
    }

    fn checked_param_count(&self) -> Option<usize> {
        let c = self.hidden_size;
        let mul = |a: usize, b: usize| a.checked_mul(b);
        // q_dim/kv_dim saturate; check their products here so a saturated one is not counted.
        mul(self.num_heads, self.head_dim)?;
        let mut layer = 0usize;
        for (name, out, inp) in self.linear_shapes() {
            let bias = match name {
                "q_proj" | "k_proj" | "v_proj" => self.qkv_bias,
                "o_proj" => self.o_bias,
                _ => self.mlp_bias,
            };
            layer = layer.checked_add(mul(out, inp)?)?.checked_add(if bias { out } else { 0 })?;
        }
        layer = layer.checked_add(mul(2, c)?)?; // input and post-attention RMSNorm
        let embed = mul(self.vocab_size, c)?;
        let lm_head = if self.tie_word_embeddings { 0 } else { embed };
        mul(layer, self.num_layers)?.checked_add(embed)?.checked_add(c)?.checked_add(lm_head)
    }
}

/// `rope_theta` and the scaling, from `rope_parameters` (transformers 5) when present, else from
/// `rope_theta` and `rope_scaling`.
fn parse_rope(f: &Fields<'_>, head_dim: usize) -> Result<RopeConfig> {
    let (params, key) = match f.sub("rope_parameters")? {
        Some(p) => (Some(p), "rope_parameters"),
        None => (f.sub("rope_scaling")?, "rope_scaling"),
    };
    let p = params.map(|obj| Fields { obj, path: f.path });
    let field = |name: &str| format!("{key}.{name}");
    let theta_in_params = match &p {
        Some(p) if key == "rope_parameters" => {
            p.opt_f64("rope_theta").map_err(|_| f.err(format!("field `{}` should be a number", field("rope_theta"))))?
        }
        _ => None,
    };
    let theta = match theta_in_params {
        Some(t) => t,
        None => f.opt_f64("rope_theta")?.unwrap_or(10000.0),
    } as f32;

    let scaling = match &p {
        None => RopeScaling::None,
        Some(p) => {
            let kind = match p.opt_str("rope_type")? {
                Some(t) => Some(t),
                None => p.opt_str("type")?,
            };
            // A `rope_scaling` object without a type is malformed; `rope_parameters` may hold
            // only the theta.
            let kind = match kind {
                Some(k) => k,
                None if key == "rope_parameters" => "default",
                None => return Err(f.err(format!("field `{key}` has no `rope_type`"))),
            };
            let num = |name: &str| -> Result<f32> {
                match p.get(name) {
                    None => Err(f.err(format!("missing field `{}`", field(name)))),
                    Some(v) => v
                        .as_f64()
                        .map(|x| x as f32)
                        .ok_or_else(|| f.err(format!("field `{}` should be a number, found {v}", field(name)))),
                }
            };
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear { factor: num("factor")? },
                "llama3" => RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: match p.get("original_max_position_embeddings") {
                        None => {
                            return Err(f.err(format!("missing field `{}`", field("original_max_position_embeddings"))));
                        }
                        Some(v) => p.usize_of(&field("original_max_position_embeddings"), v)?,
                    },
                },
                "dynamic" | "yarn" | "longrope" | "su" | "mrope" => {
                    return Err(f.unsupported(format!(
                        "{key} type `{kind}` is not supported (supported: default, linear, llama3)"
                    )));
                }
                other => {
                    return Err(f.err(format!("{key} type `{other}` is unknown (supported: default, linear, llama3)")));
                }
            }
        }
    };
    let rope = RopeConfig { theta, head_dim, scaling };
    // The same checks of theta and the factors the model will make, made now so that a bad one
    // names the file. They do not depend on the head size, so check with the smallest one: the
    // real head_dim comes from the file and must not size an allocation before it is trusted.
    rope_inv_freq(&RopeConfig { head_dim: 2, ..rope }).map_err(|e| f.err(format!("rope: {e}")))?;
    Ok(rope)
}

/// `quantization_config`: bitsandbytes 4-bit is read; other schemes are refused by name.
fn parse_quant(f: &Fields<'_>) -> Result<Option<BnbQuantConfig>> {
    let Some(obj) = f.sub("quantization_config")? else {
        return Ok(None);
    };
    let q = Fields { obj, path: f.path };
    let method = q.opt_str("quant_method")?.unwrap_or("bitsandbytes");
    if method != "bitsandbytes" {
        return Err(f.unsupported(format!(
            "quantization_config.quant_method `{method}` is not supported (gristmill reads bitsandbytes 4-bit)"
        )));
    }
    // transformers has written both spellings.
    let flag = |k: &str| -> Result<bool> {
        Ok(q.opt_bool(k)?.unwrap_or(false) || q.opt_bool(&format!("_{k}"))?.unwrap_or(false))
    };
    if !flag("load_in_4bit")? {
        if flag("load_in_8bit")? {
            return Err(f.unsupported("bitsandbytes 8-bit checkpoints are not supported (4-bit NF4 only)"));
        }
        return Ok(None);
    }
    // bitsandbytes' own defaults: fp4, no double quantization, float32 compute.
    let quant_type = q.opt_str("bnb_4bit_quant_type")?.unwrap_or("fp4").to_string();
    let double_quant = q.opt_bool("bnb_4bit_use_double_quant")?.unwrap_or(false);
    let compute_dtype = match q.opt_str("bnb_4bit_compute_dtype")? {
        None => DType::F32,
        Some(s) => parse_float_dtype(s)
            .ok_or_else(|| f.err(format!("quantization_config.bnb_4bit_compute_dtype `{s}` is not a float dtype")))?,
    };
    if let Some(storage) = q.opt_str("bnb_4bit_quant_storage")?
        && storage != "uint8"
    {
        return Err(f.unsupported(format!(
            "quantization_config.bnb_4bit_quant_storage `{storage}` is not supported (uint8 only)"
        )));
    }
    Ok(Some(BnbQuantConfig { quant_type, double_quant, compute_dtype }))
}

/// A torch float dtype name (`bfloat16`, `torch.float16`…).
fn parse_float_dtype(s: &str) -> Option<DType> {
    DType::parse(s.strip_prefix("torch.").unwrap_or(s)).ok().filter(|d| d.is_float())
}

/// An f32 as the shortest decimal that reads back to it (1e-5, not 9.999999747378752e-06).
fn json_f32(x: f32) -> Value {
    x.to_string().parse::<f64>().ok().and_then(serde_json::Number::from_f64).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA_32_1B: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64,
      "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
      "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
      "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
      "rms_norm_eps": 1e-05,
      "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256
    }"#;

    const SMOLLM2_135M: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
      "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": true,
      "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
      "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
      "rms_norm_eps": 1e-05, "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000,
      "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
      "use_cache": true, "vocab_size": 49152
    }"#;

    const QWEN2_05B: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
      "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
      "intermediate_size": 4864, "max_position_embeddings": 131072, "max_window_layers": 24,
      "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
      "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
      "sliding_window": 131072, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers_version": "4.40.1", "use_cache": true, "use_sliding_window": false,
      "vocab_size": 151936
    }"#;

    const MISTRAL_7B: &str = r#"{
      "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
      "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
      "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
      "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
      "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
      "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0",
      "use_cache": true, "vocab_size": 32000
    }"#;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(text, "m/config.json")
    }

    /// `base` with `edits` applied (`null` removes a key).
    fn edited(base: &str, edits: serde_json::Value) -> String {
        let mut v: Value = serde_json::from_str(base).unwrap();
        for (k, e) in edits.as_object().unwrap() {
            if e.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = e.clone();
            }
        }
        v.to_string()
    }

    fn err(text: &str) -> String {
        format!("{}", parse(text).unwrap_err())
    }

    #[test]
    fn llama_3_2_1b() {
        let c = parse(LLAMA_32_1B).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!((c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers), (128256, 2048, 8192, 16));
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (32, 8, 64));
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(
            c.rope,
            RopeConfig {
                theta: 500000.0,
                head_dim: 64,
                scaling: RopeScaling::Llama3 {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192
                }
            }
        );
        assert!(c.tie_word_embeddings);
        assert!(!c.qkv_bias && !c.o_bias && !c.mlp_bias);
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.as_slice(), c.pad_token_id),
            (Some(128000), &[128001, 128008, 128009][..], None)
        );
        assert_eq!((c.max_position_embeddings, c.sliding_window, c.torch_dtype), (131072, None, Some(DType::BF16)));
        assert_eq!(c.param_count(), 1_235_814_400);
        assert_eq!(c.bnb_4bit, None);
    }

    #[test]
    fn smollm2_135m() {
        let c = parse(SMOLLM2_135M).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!((c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers), (49152, 576, 1536, 30));
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
        assert_eq!(c.rope, RopeConfig { theta: 100000.0, head_dim: 64, scaling: RopeScaling::None });
        assert!(c.tie_word_embeddings);
        assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice(), c.pad_token_id), (Some(1), &[2][..], Some(2)));
        assert_eq!(c.param_count(), 134_515_008);
        assert_eq!(
            c.linear_shapes(),
            [
                ("q_proj", 576, 576),
                ("k_proj", 192, 576),
                ("v_proj", 192, 576),
                ("o_proj", 576, 576),
                ("gate_proj", 1536, 576),
                ("up_proj", 1536, 576),
                ("down_proj", 576, 1536)
            ]
        );
    }

    #[test]
    fn qwen2_0_5b() {
        let c = parse(QWEN2_05B).unwrap();
        assert_eq!(c.arch, Arch::Qwen2);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (14, 2, 64));
        assert!(c.qkv_bias && !c.o_bias && !c.mlp_bias);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.rope.theta, 1_000_000.0);
        // use_sliding_window is false: full attention however large sliding_window is.
        assert_eq!(c.sliding_window, None);
        assert_eq!(c.param_count(), 494_032_768);
        // With the window switched on for some layers, we refuse rather than attend wrongly.
        let e = err(&edited(QWEN2_05B, serde_json::json!({"use_sliding_window": true, "max_window_layers": 21})));
        assert_eq!(
            e,
            "unsupported: m/config.json: qwen2 sliding-window attention on layers 21..24 (use_sliding_window) is not supported"
        );
    }

    #[test]
    fn mistral_7b() {
        let c = parse(MISTRAL_7B).unwrap();
        assert_eq!(c.arch, Arch::Mistral);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (32, 8, 128));
        assert_eq!(c.sliding_window, Some(4096));
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.param_count(), 7_241_732_096);
    }

    #[test]
    fn defaults_and_variants() {
        // No num_key_value_heads, head_dim or rope_theta: MHA, hidden/heads, 10000.
        let c = parse(&edited(
            SMOLLM2_135M,
            serde_json::json!({"num_key_value_heads": null, "rope_theta": null, "eos_token_id": null, "hidden_act": null}),
        ))
        .unwrap();
        assert_eq!((c.num_kv_heads, c.head_dim, c.rope.theta), (9, 64, 10000.0));
        assert!(c.eos_token_ids.is_empty());
        // attention_bias and mlp_bias on llama.
        let c = parse(&edited(SMOLLM2_135M, serde_json::json!({"attention_bias": true, "mlp_bias": true}))).unwrap();
        assert!(c.qkv_bias && c.o_bias && c.mlp_bias);
        let plain = parse(SMOLLM2_135M).unwrap().param_count();
        assert_eq!(c.param_count() - plain, 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576));
        // Old `type` key, linear scaling.
        let c = parse(&edited(SMOLLM2_135M, serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}})))
            .unwrap();
        assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        let c = parse(&edited(SMOLLM2_135M, serde_json::json!({"rope_scaling": {"rope_type": "default"}}))).unwrap();
        assert_eq!(c.rope.scaling, RopeScaling::None);
        // transformers 5: rope_parameters holds theta and the scaling; dtype replaces torch_dtype.
        let c = parse(&edited(
            LLAMA_32_1B,
            serde_json::json!({
                "rope_scaling": null, "rope_theta": null, "torch_dtype": null, "dtype": "float16",
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                    "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}
            }),
        ))
        .unwrap();
        assert_eq!(c.rope, parse(LLAMA_32_1B).unwrap().rope);
        assert_eq!(c.torch_dtype, Some(DType::F16));
        let c = parse(&edited(
            SMOLLM2_135M,
            serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}),
        ))
        .unwrap();
        assert_eq!(c.rope, RopeConfig { theta: 100000.0, head_dim: 64, scaling: RopeScaling::None });
    }

    #[test]
    fn bnb_quantization_config() {
        let q = serde_json::json!({"quantization_config": {
            "_load_in_4bit": true, "_load_in_8bit": false, "bnb_4bit_compute_dtype": "bfloat16",
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
            "llm_int8_enable_fp32_cpu_offload": false, "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": null, "llm_int8_threshold": 6.0, "load_in_4bit": true,
            "load_in_8bit": false, "quant_method": "bitsandbytes"}});
        let c = parse(&edited(LLAMA_32_1B, q)).unwrap();
        assert_eq!(
            c.bnb_4bit,
            Some(BnbQuantConfig { quant_type: "nf4".into(), double_quant: true, compute_dtype: DType::BF16 })
        );
        let e =
            err(&edited(LLAMA_32_1B, serde_json::json!({"quantization_config": {"quant_method": "gptq", "bits": 4}})));
        assert_eq!(
            e,
            "unsupported: m/config.json: quantization_config.quant_method `gptq` is not supported (gristmill reads bitsandbytes 4-bit)"
        );
        let e = err(&edited(
            LLAMA_32_1B,
            serde_json::json!({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": true}}),
        ));
        assert_eq!(e, "unsupported: m/config.json: bitsandbytes 8-bit checkpoints are not supported (4-bit NF4 only)");
    }

    #[test]
    fn exact_error_messages() {
        let e = err(&edited(SMOLLM2_135M, serde_json::json!({"model_type": "gpt2"})));
        assert_eq!(e, "config: m/config.json: model_type `gpt2` is not supported (supported: llama, mistral, qwen2)");
        let e = err(&edited(SMOLLM2_135M, serde_json::json!({"model_type": "gemma2"})));
        assert_eq!(
            e,
            "config: m/config.json: model_type `gemma2` is not supported yet (supported: llama, mistral, qwen2)"
        );
        let e = err(&edited(SMOLLM2_135M, serde_json::json!({"model_type": null})));
        assert_eq!(e, "config: m/config.json: missing field `model_type`");
        let e = err(&edited(SMOLLM2_135M, serde_json::json!({"hidden_size": null})));
        assert_eq!(e, "config: m/config.json: missing field `hidden_size`");
        let e = err(&edited(SMOLLM2_135M, serde_json::json!({"intermediate_size": "1536"})));
        assert_eq!(
            e,
            "config: m/config.json: field `intermediate_size` should be a non-negative integer, found \"1536\""
        );
        let e = err(&edited(SMOLLM2_135M, serde_json::json!({"num_hidden_layers": 0})));
        assert_eq!(e, "config: m/config.json: field `num_hidden_layers` must be positive, found 0");
        for (kind, word) in [("dynamic", "dynamic"), ("yarn", "yarn"), ("longrope", "longrope")] {
            let e = err(&edited(SMOLLM2_135M, serde_json::json!({"rope_scaling": {"rope_type": kind, "factor": 4.0}})));
            assert_eq!(
                e,
                format!(
                    "unsupported: m/config.json: rope_scaling type `{word}` is not supported (supported: default, linear, llama3)"
                )
            );
        }
        let e = err(&edited(SMOLLM2_135M, serde_json::json!({"rope_scaling": {"rope_type": "wobbly"}})));
        assert_eq!(
            e,
            "config: m/config.json: rope_scaling type `wobbly` is unknown (supported: default, linear, llama3)"
        );
        let e = err(&edited(SMOLLM2_135M, serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})));
        assert_eq!(e, "config: m/config.json: missing field `rope_scaling.low_freq_factor`");
        let e = err(&edited(SMOLLM2_135M, serde_json::json!({"num_key_value_heads": 2})));
        assert_eq!(e, "config: m/config.json: num_attention_heads (9) must be a multiple of num_key_value_heads (2)");
        let e = err(&edited(SMOLLM2_135M, serde_json::json!({"num_attention_heads": 7, "num_key_value_heads": 7})));
        assert_eq!(
            e,
            "config: m/config.json: hidden_size (576) is not divisible by num_attention_heads (7) and no head_dim is given"
        );
        let e = err(&edited(SMOLLM2_135M, serde_json::json!({"hidden_act": "gelu"})));
        assert_eq!(e, "config: m/config.json: hidden_act `gelu` is not supported: Llama-family MLPs use `silu`");
        let e = err(&edited(SMOLLM2_135M, serde_json::json!({"vocab_size": 1u64 << 40, "hidden_size": 576u64 << 30})));
        assert_eq!(e, "config: m/config.json: the model's sizes overflow: parameter count does not fit in usize");
        let e = err(&edited(
            SMOLLM2_135M,
            serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}}),
        ));
        assert!(e.starts_with("config: m/config.json: rope: ") && e.contains("high_freq_factor"), "{e}");
        assert_eq!(err("[1, 2]"), "m/config.json: a config.json must hold a JSON object");
        assert!(err("{").starts_with("m/config.json: invalid JSON: "));
        let e = format!("{}", ModelConfig::from_file("/nonexistent/config.json").unwrap_err());
        assert!(e.starts_with("/nonexistent/config.json: "), "{e}");
    }

    #[test]
    fn hf_json_round_trips() {
        let bnb = edited(
            LLAMA_32_1B,
            serde_json::json!({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "bfloat16"}}),
        );
        let linear = edited(SMOLLM2_135M, serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.5}}));
        let biased =
            edited(SMOLLM2_135M, serde_json::json!({"attention_bias": true, "mlp_bias": true, "torch_dtype": null}));
        for text in [LLAMA_32_1B, SMOLLM2_135M, QWEN2_05B, MISTRAL_7B, &bnb, &linear, &biased] {
            let c = parse(text).unwrap();
            let j = c.to_hf_json();
            assert_eq!(j["architectures"][0], c.arch.hf_architecture());
            let back = ModelConfig::from_json_str(&j.to_string(), "<gguf>").unwrap();
            assert_eq!(back, c, "{j}");
        }
        let j = parse(SMOLLM2_135M).unwrap().to_hf_json();
        // Floats are written as their shortest f32 decimal.
        assert_eq!(j["rms_norm_eps"].as_f64(), Some(1e-5));
        assert_eq!(j["rope_scaling"], Value::Null);
        assert_eq!(j["eos_token_id"], 2);
        let j = parse(LLAMA_32_1B).unwrap().to_hf_json();
        assert_eq!(j["rope_scaling"]["rope_type"], "llama3");
        assert_eq!(j["eos_token_id"], serde_json::json!([128001, 128008, 128009]));
    }
}
