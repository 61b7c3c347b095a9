//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) on the CPU, with a KV cache.
//!
//! One layer: RMSNorm → q, k, v projections (+ bias for Qwen2) → RoPE → causal grouped-query
//! attention over the cache → o projection → residual → RMSNorm → SwiGLU MLP → residual. The
//! element-wise ops are the core's references; the projections use the fast CPU GEMMs of
//! [`crate::cpu`], on dense f32 weights or on NF4 weights dequantized block by block.

use crate::config::ModelConfig;
use crate::cpu::{matmul_nt, nf4_matmul_nt};
use crate::error::{Error, Result};
use crate::safetensors::{Checkpoint, LoadAs, LoadedWeight};
use gristmill_core::nf4::Nf4Tensor;
use std::path::Path;

/// The weight of a linear layer.
#[derive(Debug, Clone)]
pub enum Weight {
    /// (N, K) f32.
    Dense(Vec<f32>),
    /// (N, K) NF4 (boxed: its double-quantization code book is 1 KiB inline).
    Nf4(Box<Nf4Tensor>),
}

/// A LoRA adapter on a linear layer: y += scale · (x Aᵀ) Bᵀ.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// a: (r, K)
    pub a: Vec<f32>,
    /// b: (N, r)
    pub b: Vec<f32>,
    pub r: usize,
    pub scale: f32,
}

/// y = x Wᵀ (+ bias) (+ LoRA) with W in the `nn.Linear` layout (out, in).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    /// bias: (N)
    pub bias: Option<Vec<f32>>,
    pub lora: Option<LoraAdapter>,
    /// out features
    pub n: usize,
    /// in features
    pub k: usize,
}

impl Linear {
    /// x: (M, K) → y: (M, N)
    pub fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut y = match &self.weight {
            Weight::Dense(w) => matmul_nt(x, w, m, self.k, self.n)?,
            Weight::Nf4(w) => nf4_matmul_nt(x, w, m)?,
        };
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.n) {
                row.iter_mut().zip(b).for_each(|(v, bv)| *v += bv);
            }
        }
        if let Some(l) = &self.lora {
            let u = matmul_nt(x, &l.a, m, self.k, l.r)?;
            let d = matmul_nt(&u, &l.b, m, l.r, self.n)?;
            y.iter_mut().zip(&d).for_each(|(v, dv)| *v += l.scale * dv);
        }
        Ok(y)
    }

    /// Bytes the weight occupies in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => 4 * w.len(),
            Weight::Nf4(w) => w.storage_bytes(),
        }
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// (C)
    pub attn_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// (C)
    pub mlp_norm: Vec<f32>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Layer {
    /// The linear layers by their PEFT/HF module names.
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        [
            ("q_proj", &mut self.q),
            ("k_proj", &mut self.k),
            ("v_proj", &mut self.v),
            ("o_proj", &mut self.o),
            ("gate_proj", &mut self.gate),
            ("up_proj", &mut self.up),
            ("down_proj", &mut self.down),
        ]
    }
}

/// How to hold the frozen linear weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BasePrecision {
    /// As the checkpoint stores them: dense weights in f32, bitsandbytes 4-bit ones in NF4.
    #[default]
    AsStored,
    /// Every linear weight in NF4 (dense ones quantized at load, as bitsandbytes would).
    Nf4,
    /// Every linear weight dense f32 (bitsandbytes 4-bit ones dequantized).
    F32,
}

/// The keys and values of past positions, per layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// per layer: (len, Hkv, D)
    k: Vec<Vec<f32>>,
    /// per layer: (len, Hkv, D)
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig) -> Self {
        Self { k: vec![Vec::new(); cfg.num_layers], v: vec![Vec::new(); cfg.num_layers], len: 0 }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything (a new sequence).
    pub fn clear(&mut self) {
        self.k.iter_mut().chain(self.v.iter_mut()).for_each(Vec::clear);
        self.len = 0;
    }

    /// Appends keys and values (t, Hkv, D) to layer `layer`; [`KvCache::advance`] counts them once
    /// every layer has.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        match (self.k.get_mut(layer), self.v.get_mut(layer)) {
            (Some(kc), Some(vc)) => {
                kc.extend_from_slice(k);
                vc.extend_from_slice(v);
                Ok(())
            }
            _ => Err(Error::Invalid(format!("KV cache has no layer {layer}"))),
        }
    }

    /// Counts t more positions.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Keys and values of layer `layer`: (len, Hkv, D) each.
    pub fn layer(&self, layer: usize) -> Result<(&[f32], &[f32])> {
        match (self.k.get(layer), self.v.get(layer)) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(Error::Invalid(format!("KV cache has no layer {layer}"))),
        }
    }
}

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    pub cfg: ModelConfig,
    /// (V, C)
    pub embed: Vec<f32>,
    pub layers: Vec<Layer>,
    /// (C)
    pub norm: Vec<f32>,
    /// None when the embeddings are tied.
    pub lm_head: Option<Linear>,
}

impl LlamaModel {
    /// Loads `dir` (config.json + safetensors) holding the linear weights as `base` says.
    pub fn load(dir: &Path, base: BasePrecision) -> Result<Self> {
        let cfg = ModelConfig::from_file(dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint(cfg, &ckpt, base)
    }

    /// Builds the model from an opened checkpoint.
    pub fn from_checkpoint(cfg: ModelConfig, ckpt: &Checkpoint, base: BasePrecision) -> Result<Self> {
        let c = cfg.hidden_size;
        let vector = |name: &str, len: usize| -> Result<Vec<f32>> {
            let v = ckpt.to_f32(name)?;
            if v.len() != len {
                return Err(Error::tensor(name, format!("has {} elements, expected {len}", v.len())));
            }
            Ok(v)
        };
        // QLoRA quantizes the decoder's projections only: the LM head stays dense (as
        // bitsandbytes leaves it) unless the checkpoint itself stores it in 4 bits.
        let linear_as = |prefix: &str, n: usize, k: usize, has_bias: bool, base: BasePrecision| -> Result<Linear> {
            let name = format!("{prefix}.weight");
            let as_ = match base {
                BasePrecision::Nf4 => LoadAs::Nf4,
                BasePrecision::F32 => LoadAs::F32,
                BasePrecision::AsStored if ckpt.is_bnb_4bit(&name) => LoadAs::Nf4,
                BasePrecision::AsStored => LoadAs::F32,
            };
            let weight = match ckpt.load_weight(&name, as_)? {
                LoadedWeight::F32 { shape, data } => {
                    if shape != [n, k] {
                        return Err(Error::tensor(&name, format!("has shape {shape:?}, expected [{n}, {k}]")));
                    }
                    Weight::Dense(data)
                }
                LoadedWeight::Nf4(t) => {
                    if t.shape.dims() != [n, k] {
                        return Err(Error::tensor(&name, format!("has shape {}, expected [{n}, {k}]", t.shape)));
                    }
                    Weight::Nf4(Box::new(t))
                }
            };
            let bias = if has_bias { Some(vector(&format!("{prefix}.bias"), n)?) } else { None };
            Ok(Linear { weight, bias, lora: None, n, k })
        };
        let linear = |prefix: &str, n: usize, k: usize, has_bias: bool| linear_as(prefix, n, k, has_bias, base);
        let (h, hkv, d, f) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                attn_norm: vector(&format!("{p}.input_layernorm.weight"), c)?,
                q: linear(&format!("{p}.self_attn.q_proj"), h * d, c, cfg.qkv_bias)?,
                k: linear(&format!("{p}.self_attn.k_proj"), hkv * d, c, cfg.qkv_bias)?,
                v: linear(&format!("{p}.self_attn.v_proj"), hkv * d, c, cfg.qkv_bias)?,
                o: linear(&format!("{p}.self_attn.o_proj"), c, h * d, cfg.o_bias)?,
                mlp_norm: vector(&format!("{p}.post_attention_layernorm.weight"), c)?,
                gate: linear(&format!("{p}.mlp.gate_proj"), f, c, cfg.mlp_bias)?,
                up: linear(&format!("{p}.mlp.up_proj"), f, c, cfg.mlp_bias)?,
                down: linear(&format!("{p}.mlp.down_proj"), c, f, cfg.mlp_bias)?,
            });
        }
        let embed = vector("model.embed_tokens.weight", cfg.vocab_size * c)?;
        let norm = vector("model.norm.weight", c)?;
        let lm_head = if cfg.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            None
        } else {
            let head_base = if base == BasePrecision::Nf4 { BasePrecision::AsStored } else { base };
            Some(linear_as("lm_head", cfg.vocab_size, c, false, head_base)?)
        };
        Ok(Self { cfg, embed, layers, norm, lm_head })
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.cfg)
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let lin: usize = self
            .layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .chain(self.lm_head.as_ref())
            .map(Linear::weight_bytes)
            .sum();
        lin + 4 * (self.embed.len() + self.norm.len() + self.layers.len() * 2 * self.cfg.hidden_size)
    }

    /// Runs `tokens` (one sequence) after the positions already in `cache`, appending to it.
    /// Returns the logits of every new position (T, V) when `all_logits`, else of the last (1, V).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<Vec<f32>> {
        crate::backend::decode_step(&crate::backend::CpuBackend::new(self), tokens, cache, all_logits)
    }
}
