//! Exporting an HF-layout Llama checkpoint (a merged model, say) as a GGUF file that llama.cpp and
//! [`crate::gguf::import_gguf`] read: llama architecture metadata, the byte-level BPE tokenizer
//! (`tokenizer.ggml.*`, the keys the importer reads), and the tensors under GGUF names with Q and K
//! rows permuted into the interleaved order ggml's RoPE uses.
//!
//! Tensor types: 1-D tensors (norms) and `rope_freqs` are always F32, as llama.cpp writes them;
//! matrices take the requested type. Q8_0 is llama.cpp's block format (32 values: an f16 scale
//! `d = max|x| / 127` and 32 × i8 `round(x / d)`); a matrix whose rows are not a whole number of
//! blocks falls back to F16, as llama.cpp's converter does.
//!
//! The file is streamed: the header (sizes known from shapes and types) first, then one tensor at a
//! time converted and written, so the memory needed is about one tensor. It is written under a
//! temporary name and renamed when complete.

use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use crate::gguf::{GgmlType, permute_qk, pre_tokenizer};
use crate::safetensors::Checkpoint;
use crate::tokenizer::Tokenizer;
use gristmill_core::ops::rope::RopeScaling;
use half::{bf16, f16};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// The type of the exported matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportType {
    F16,
    Bf16,
    Q8_0,
}

impl ExportType {
    fn ggml(self) -> GgmlType {
        match self {
            ExportType::F16 => GgmlType::F16,
            ExportType::Bf16 => GgmlType::BF16,
            ExportType::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            ExportType::F16 => 1,
            ExportType::Q8_0 => 7,
            ExportType::Bf16 => 32,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    pub tensors: usize,
    pub bytes: u64,
    /// Tensors per GGUF type.
    pub types: BTreeMap<String, usize>,
}

const ALIGNMENT: u64 = 32;

// GGUF metadata value types.
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

/// A metadata value, encoded.
struct Kv {
    key: String,
    ty: u32,
    bytes: Vec<u8>,
}

fn gstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn kv_u32(key: &str, v: u32) -> Kv {
    Kv { key: key.into(), ty: T_U32, bytes: v.to_le_bytes().to_vec() }
}

fn kv_f32(key: &str, v: f32) -> Kv {
    Kv { key: key.into(), ty: T_F32, bytes: v.to_le_bytes().to_vec() }
}

fn kv_bool(key: &str, v: bool) -> Kv {
    Kv { key: key.into(), ty: T_BOOL, bytes: vec![u8::from(v)] }
}

fn kv_str(key: &str, v: &str) -> Kv {
    let mut bytes = Vec::new();
    gstr(&mut bytes, v);
    Kv { key: key.into(), ty: T_STRING, bytes }
}

fn kv_strs(key: &str, v: &[String]) -> Kv {
    let mut bytes = T_STRING.to_le_bytes().to_vec();
    bytes.extend_from_slice(&(v.len() as u64).to_le_bytes());
    for s in v {
        gstr(&mut bytes, s);
    }
    Kv { key: key.into(), ty: T_ARRAY, bytes }
}

fn kv_i32s(key: &str, v: &[i32]) -> Kv {
    let mut bytes = T_I32.to_le_bytes().to_vec();
    bytes.extend_from_slice(&(v.len() as u64).to_le_bytes());
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    Kv { key: key.into(), ty: T_ARRAY, bytes }
}

/// Q8_0 blocks of `x` (a multiple of 32 values), as llama.cpp's `quantize_row_q8_0_ref`.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for block in x.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        // `round` rounds half away from zero, as C's roundf.
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// Llama-3 RoPE scaling as llama.cpp's per-frequency divisors (`rope_freqs.weight`), from HF's
/// `_compute_llama3_parameters`.
fn llama3_divisors(theta: f64, head_dim: usize, factor: f64, lo: f64, hi: f64, original: f64) -> Vec<f32> {
    let (low_wl, high_wl) = (original / lo, original / hi);
    (0..head_dim / 2)
        .map(|i| {
            let inv_freq = theta.powf(-((2 * i) as f64) / head_dim as f64);
            let wl = 2.0 * std::f64::consts::PI / inv_freq;
            if wl < high_wl {
                1.0
            } else if wl > low_wl {
                factor as f32
            } else {
                let s = (original / wl - lo) / (hi - lo);
                (1.0 / ((1.0 - s) / factor + s)) as f32
            }
        })
        .collect()
}

/// One tensor to write: its GGUF name, dims (fastest first), type, and where its values come from.
struct Plan {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    source: Source,
}

enum Source {
    /// An HF tensor, permuted over this many heads when Some.
    Hf(String, Option<usize>),
    Values(Vec<f32>),
}

fn nbytes(ty: GgmlType, n: u64) -> u64 {
    n / ty.block_size() * ty.type_size()
}

/// The tokenizer metadata: vocabulary, token types, merges, pre-tokenizer, special ids.
fn tokenizer_kvs(dir: &Path, tok: &Tokenizer) -> Result<Vec<Kv>> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let j: Value = serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
    let model = &j["model"];
    if model["type"] != "BPE" {
        return Err(Error::Unsupported(format!(
            "{}: tokenizer model {}: GGUF export writes byte-level BPE only",
            path.display(),
            model["type"]
        )));
    }
    let mut tokens: BTreeMap<u64, (String, i32)> = BTreeMap::new();
    if let Some(vocab) = model["vocab"].as_object() {
        for (t, id) in vocab {
            let id = id.as_u64().ok_or_else(|| Error::format(&path, format!("vocab entry {t:?} has no integer id")))?;
            tokens.insert(id, (t.clone(), 1));
        }
    }
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(Error::format(&path, format!("added token without id or content: {a}")));
        };
        // llama.cpp's token types: 3 control (special), 4 user-defined.
        let ty = if a["special"].as_bool().unwrap_or(false) { 3 } else { 4 };
        tokens.insert(id, (content.to_string(), ty));
    }
    let n = tokens.keys().next_back().map_or(0, |m| m + 1);
    let mut list = Vec::with_capacity(n as usize);
    let mut types = Vec::with_capacity(n as usize);
    for id in 0..n {
        let (t, ty) = tokens.remove(&id).unwrap_or_else(|| (format!("[PAD{id}]"), 5));
        list.push(t);
        types.push(ty);
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) if p.len() == 2 => Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?)),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or_else(|| Error::format(&path, "merges are neither \"a b\" strings nor [a, b] pairs"))?;
    // The pre-tokenizer family whose HF form this tokenizer has.
    let null = Value::Null;
    let (norm, pre_tok) = (j.get("normalizer").unwrap_or(&null), j.get("pre_tokenizer").unwrap_or(&null));
    let pre = ["smollm", "gpt-2", "llama-bpe", "qwen2"]
        .into_iter()
        .find(|p| pre_tokenizer(p).is_ok_and(|(n, t)| &n == norm && &t == pre_tok))
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: a pre-tokenizer GGUF has no name for (supported: SmolLM, GPT-2, Llama 3, Qwen2)",
                path.display()
            ))
        })?;
    let mut kvs = vec![
        kv_str("tokenizer.ggml.model", "gpt2"),
        kv_str("tokenizer.ggml.pre", pre),
        kv_strs("tokenizer.ggml.tokens", &list),
        kv_i32s("tokenizer.ggml.token_type", &types),
        kv_strs("tokenizer.ggml.merges", &merges),
        kv_bool("tokenizer.ggml.add_bos_token", tok.add_bos_token()),
        kv_bool("tokenizer.ggml.add_eos_token", tok.add_eos_token()),
    ];
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", tok.bos_id()),
        ("tokenizer.ggml.eos_token_id", tok.eos_ids().first().copied()),
        ("tokenizer.ggml.padding_token_id", tok.pad_id()),
        ("tokenizer.ggml.unknown_token_id", tok.unk_id()),
    ] {
        if let Some(id) = id {
            kvs.push(kv_u32(key, id));
        }
    }
    if let Some(t) = tok.chat_template() {
        kvs.push(kv_str("tokenizer.chat_template", t));
    }
    Ok(kvs)
}

/// Writes the HF-layout Llama model in `model_dir` as the GGUF file `out`, matrices in `ty`.
pub fn export_gguf(model_dir: &Path, out: &Path, ty: ExportType) -> Result<ExportSummary> {
    let cfg = ModelConfig::from_file(model_dir.join("config.json"))?;
    if cfg.arch == Arch::Qwen2 || cfg.qkv_bias || cfg.o_bias || cfg.mlp_bias {
        return Err(Error::Unsupported(format!(
            "{}: GGUF export writes the llama architecture (no biases); this model is {:?}",
            model_dir.display(),
            cfg.arch
        )));
    }
    if cfg.bnb_4bit.is_some() {
        return Err(Error::Unsupported(format!(
            "{}: a bitsandbytes 4-bit checkpoint; export the full-precision (merged) model",
            model_dir.display()
        )));
    }
    let tok = Tokenizer::from_dir(model_dir)?;
    let ck = Checkpoint::open(model_dir)?;
    let rope = cfg.rope;
    let mut kvs = vec![
        kv_str("general.architecture", "llama"),
        kv_str("general.name", &model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
        kv_u32("general.alignment", ALIGNMENT as u32),
        kv_u32("general.file_type", ty.file_type()),
        kv_u32("llama.context_length", cfg.max_position_embeddings as u32),
        kv_u32("llama.embedding_length", cfg.hidden_size as u32),
        kv_u32("llama.block_count", cfg.num_layers as u32),
        kv_u32("llama.feed_forward_length", cfg.intermediate_size as u32),
        kv_u32("llama.attention.head_count", cfg.num_heads as u32),
        kv_u32("llama.attention.head_count_kv", cfg.num_kv_heads as u32),
        kv_f32("llama.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps),
        kv_f32("llama.rope.freq_base", rope.theta),
        kv_u32("llama.rope.dimension_count", cfg.head_dim as u32),
        kv_u32("llama.vocab_size", cfg.vocab_size as u32),
    ];
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size {
        kvs.push(kv_u32("llama.attention.key_length", cfg.head_dim as u32));
        kvs.push(kv_u32("llama.attention.value_length", cfg.head_dim as u32));
    }
    let mut plan = Vec::new();
    let dims2 = |name: &str| -> Result<Vec<u64>> {
        let t = ck.get(name)?;
        match t.shape {
            [r, c] => Ok(vec![*c as u64, *r as u64]),
            [n] => Ok(vec![*n as u64]),
            s => Err(Error::tensor(name, format!("expected a vector or a matrix, found shape {s:?}"))),
        }
    };
    match rope.scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            kvs.push(kv_str("llama.rope.scaling.type", "linear"));
            kvs.push(kv_f32("llama.rope.scaling.factor", factor));
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let div = llama3_divisors(
                f64::from(rope.theta),
                cfg.head_dim,
                f64::from(factor),
                f64::from(low_freq_factor),
                f64::from(high_freq_factor),
                original_max_position_embeddings as f64,
            );
            kvs.push(kv_u32("llama.rope.scaling.original_context_length", original_max_position_embeddings as u32));
            // Not llama.cpp keys (it needs only the divisors), but with few frequencies in the blend
            // the divisors alone do not determine HF's parameters: the importer reads these.
            kvs.push(kv_f32("llama.rope.scaling.low_freq_factor", low_freq_factor));
            kvs.push(kv_f32("llama.rope.scaling.high_freq_factor", high_freq_factor));
            plan.push(Plan {
                name: "rope_freqs.weight".into(),
                dims: vec![div.len() as u64],
                ty: GgmlType::F32,
                source: Source::Values(div),
            });
        }
    }
    kvs.extend(tokenizer_kvs(model_dir, &tok)?);

    let mut add = |gguf: String, hf: String, heads: Option<usize>| -> Result<()> {
        let dims = dims2(&hf)?;
        let t = if dims.len() == 1 {
            GgmlType::F32
        } else if ty == ExportType::Q8_0 && !dims[0].is_multiple_of(32) {
            GgmlType::F16
        } else {
            ty.ggml()
        };
        plan.push(Plan { name: gguf, dims, ty: t, source: Source::Hf(hf, heads) });
        Ok(())
    };
    add("token_embd.weight".into(), "model.embed_tokens.weight".into(), None)?;
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}.");
        for (g, h, heads) in [
            ("attn_norm", "input_layernorm", None),
            ("attn_q", "self_attn.q_proj", Some(cfg.num_heads)),
            ("attn_k", "self_attn.k_proj", Some(cfg.num_kv_heads)),
            ("attn_v", "self_attn.v_proj", None),
            ("attn_output", "self_attn.o_proj", None),
            ("ffn_norm", "post_attention_layernorm", None),
            ("ffn_gate", "mlp.gate_proj", None),
            ("ffn_up", "mlp.up_proj", None),
            ("ffn_down", "mlp.down_proj", None),
        ] {
            add(format!("blk.{l}.{g}.weight"), format!("{p}{h}.weight"), heads)?;
        }
    }
    add("output_norm.weight".into(), "model.norm.weight".into(), None)?;
    if !cfg.tie_word_embeddings {
        add("output.weight".into(), "lm_head.weight".into(), None)?;
    }

    // Header: magic, version 3, counts, key/values, tensor infos, padding.
    let mut head = b"GGUF".to_vec();
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(plan.len() as u64).to_le_bytes());
    head.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for kv in &kvs {
        gstr(&mut head, &kv.key);
        head.extend_from_slice(&kv.ty.to_le_bytes());
        head.extend_from_slice(&kv.bytes);
    }
    let mut offset = 0u64;
    let mut types = BTreeMap::new();
    for p in &plan {
        gstr(&mut head, &p.name);
        head.extend_from_slice(&(p.dims.len() as u32).to_le_bytes());
        for d in &p.dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&p.ty.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + nbytes(p.ty, p.dims.iter().product())).next_multiple_of(ALIGNMENT);
        *types.entry(p.ty.name().to_string()).or_insert(0usize) += 1;
    }
    head.resize((head.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);

    let tmp = crate::util::tmp_path(out);
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = std::io::BufWriter::new(file);
    let io = |e| Error::io(&tmp, e);
    let result = (|| -> Result<u64> {
        w.write_all(&head).map_err(io)?;
        let mut written = head.len() as u64;
        for p in plan {
            let values = match p.source {
                Source::Values(v) => v,
                Source::Hf(name, heads) => {
                    let v = ck.to_f32(&name)?;
                    match heads {
                        Some(h) => permute_qk(&v, p.dims[1] as usize, p.dims[0] as usize, h, &name)?,
                        None => v,
                    }
                }
            };
            let bytes: Vec<u8> = match p.ty {
                GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                GgmlType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
                GgmlType::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes()).collect(),
                _ => quantize_q8_0(&values),
            };
            let padded = (bytes.len() as u64).next_multiple_of(ALIGNMENT);
            w.write_all(&bytes).map_err(io)?;
            w.write_all(&vec![0u8; (padded - bytes.len() as u64) as usize]).map_err(io)?;
            written += padded;
        }
        w.flush().map_err(io)?;
        w.get_ref().sync_all().map_err(io)?;
        Ok(written)
    })();
    match result {
        Ok(bytes) => {
            std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
            Ok(ExportSummary { tensors: types.values().sum(), bytes, types })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::unpermute_qk;

    #[test]
    fn q8_0_blocks_by_hand() {
        let mut x = vec![0f32; 64];
        x[0] = 127.0;
        x[1] = -63.5; // half away from zero: -64
        x[2] = 0.4;
        x[3] = 0.5; // 1
        // Second block all zero: scale 0, quants 0.
        let b = quantize_q8_0(&x);
        assert_eq!(b.len(), 68);
        assert_eq!(f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(), 1.0);
        assert_eq!(&b[2..6], &[127u8, (-64i8) as u8, 0, 1]);
        assert_eq!(&b[34..68], &[0u8; 34]);
        // Read back by the importer's dequantizer: each value within half a step (plus the f16
        // rounding of the step, times at most 127).
        let y: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let back = crate::gguf::dequantize(GgmlType::Q8_0, &quantize_q8_0(&y), 64, "y").unwrap();
        for (blk, (a, b)) in y.chunks(32).zip(back.chunks(32)).enumerate() {
            let step = a.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (u, v) in a.iter().zip(b) {
                assert!((u - v).abs() <= (0.5 + 127.0 / 2048.0) * step * 1.001, "block {blk}: {u} vs {v}");
            }
        }
    }

    #[test]
    fn permutation_inverts_the_importers() {
        let (rows, cols, heads) = (12, 3, 2);
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let p = permute_qk(&w, rows, cols, heads, "w").unwrap();
        assert_ne!(p, w);
        // Head 0 (6 rows): GGUF rows 0,1,2,3,4,5 are HF rows 0,3,1,4,2,5.
        assert_eq!(&p[3..6], &w[9..12]);
        assert_eq!(unpermute_qk(&p, rows, cols, heads, "w").unwrap(), w);
        assert!(permute_qk(&w, rows, cols, 5, "w").is_err());
    }

    #[test]
    fn llama3_divisors_follow_hf() {
        // theta 1e4, D 16, factor 8, lo 1, hi 4, L 32: wavelengths 6.3 (kept), 19.9 (blend), 62.8+.
        let d = llama3_divisors(1e4, 16, 8.0, 1.0, 4.0, 32.0);
        assert_eq!(d.len(), 8);
        assert_eq!(d[0], 1.0);
        let wl = 2.0 * std::f64::consts::PI * 1e4f64.powf(2.0 / 16.0);
        let s = (32.0 / wl - 1.0) / 3.0;
        assert!((f64::from(d[1]) - 1.0 / ((1.0 - s) / 8.0 + s)).abs() < 1e-6);
        assert!(d[2..].iter().all(|&v| v == 8.0));
    }
}
