//! `gristmill inspect PATH`: what a checkpoint holds and what it would cost to load.
//!
//! Reads only headers (the tensors stay mapped, never touched) and the `config.json` beside the
//! checkpoint when there is one, so it is instant even on a 16 GB model.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::safetensors::Checkpoint;
use gristmill_core::bnb::{BnbNames, QUANT_STATE_SUFFIX, QuantState};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// Bits per weight of NF4 with double-quantized scales: 4-bit codes, one 8-bit scale per 64
/// weights, one f32 scale of scales per 256 blocks (see docs/nf4.md).
pub const NF4_BITS_PER_WEIGHT: f64 = 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0);

/// The linear layers QLoRA quantizes; everything else (embeddings, norms, lm_head) stays bf16.
const LINEAR_SUFFIXES: [&str; 7] = [
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
];

/// What became of the `config.json` beside the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigStatus {
    Found(ModelConfig),
    /// There is none: the report covers tensors only.
    Missing,
    /// There is one, but it could not be used; the message says why.
    Invalid(String),
}

/// Tensor count and data bytes of one dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DTypeStats {
    pub tensors: usize,
    pub bytes: usize,
}

/// One line of the tensor listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    /// The dtype as the file names it (`BF16`, `U8`, `I64`…).
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: usize,
    /// For a bitsandbytes 4-bit weight, the shape of the weight it encodes.
    pub nf4_shape: Option<Vec<usize>>,
}

/// The report `gristmill inspect` prints ([`fmt::Display`]); [`Inspection::tensors`] lists every
/// tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    /// The path inspected.
    pub path: PathBuf,
    /// The safetensors files (one, or the shards).
    pub files: Vec<PathBuf>,
    pub config: ConfigStatus,
    /// Tensor count and data bytes per stored dtype, by dtype name.
    pub by_dtype: BTreeMap<String, DTypeStats>,
    /// Parameters the tensors hold: a 4-bit weight counts at its original shape, its scales and
    /// quant state not at all.
    pub params: usize,
    /// Of those, the parameters of the linear layers (q, k, v, o, gate, up, down).
    pub linear_params: usize,
    /// Number of weights stored bitsandbytes-4-bit.
    pub bnb_4bit_weights: usize,
    /// Memory of the weights with the linear layers in NF4 and the rest bf16, bytes.
    pub nf4_bytes: u64,
    /// Memory of the weights all in bf16, bytes.
    pub bf16_bytes: u64,
    tensors: Vec<TensorEntry>,
}

impl Inspection {
    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// Whether the checkpoint holds bitsandbytes 4-bit weights.
    pub fn is_bnb_4bit(&self) -> bool {
        self.bnb_4bit_weights > 0
    }

    /// Number of tensors.
    pub fn n_tensors(&self) -> usize {
        self.tensors.len()
    }

    /// The tensor listing as aligned text: name, dtype, shape (and the encoded shape of 4-bit
    /// weights), one tensor a line.
    pub fn tensor_listing(&self) -> String {
        let width = self.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for t in &self.tensors {
            let mut line = format!("{:width$}  {:<5} {}", t.name, t.dtype, dims(&t.shape));
            if let Some(s) = &t.nf4_shape {
                line.push_str(&format!("  (NF4 of {})", dims(s)));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Inspects a checkpoint file, shard index or directory; the `config.json` beside it (in the
/// directory, or beside the file) is read when present.
pub fn inspect(path: impl AsRef<Path>) -> Result<Inspection> {
    let path = path.as_ref();
    let ck = Checkpoint::open(path)?;
    let dir = if path.is_dir() { path } else { path.parent().unwrap_or_else(|| Path::new(".")) };
    let cfg_path = dir.join("config.json");
    let config = if cfg_path.is_file() {
        match ModelConfig::from_file(&cfg_path) {
            Ok(c) => ConfigStatus::Found(c),
            Err(e) => ConfigStatus::Invalid(e.to_string()),
        }
    } else {
        ConfigStatus::Missing
    };
    Ok(of_checkpoint(path, &ck, config))
}

fn of_checkpoint(path: &Path, ck: &Checkpoint, config: ConfigStatus) -> Inspection {
    // A 4-bit weight is known by its quant state; its other pieces are not parameters.
    let bnb: BTreeSet<&str> =
        ck.names().into_iter().filter_map(|n| n.strip_suffix(QUANT_STATE_SUFFIX)?.strip_suffix('.')).collect();
    let side: BTreeSet<String> = bnb
        .iter()
        .flat_map(|w| {
            let n = BnbNames::for_weight(w);
            [n.absmax, n.nested_absmax, n.nested_quant_map, n.quant_map, n.quant_state]
        })
        .collect();

    let mut by_dtype: BTreeMap<String, DTypeStats> = BTreeMap::new();
    let mut tensors = Vec::with_capacity(ck.len());
    let (mut params, mut linear_params) = (0usize, 0usize);
    for m in ck.metas() {
        let s = by_dtype.entry(m.st_dtype.to_string()).or_default();
        s.tensors += 1;
        s.bytes = s.bytes.saturating_add(m.nbytes);

        let nf4_shape = bnb.contains(m.name).then(|| bnb_shape(ck, m.name, m.nbytes));
        if !side.contains(m.name) {
            let n = match &nf4_shape {
                Some(s) => s.iter().fold(1usize, |a, &d| a.saturating_mul(d)),
                None => m.numel(),
            };
            params = params.saturating_add(n);
            let linear =
                nf4_shape.is_some() || (m.shape.len() == 2 && LINEAR_SUFFIXES.iter().any(|s| m.name.ends_with(s)));
            if linear {
                linear_params = linear_params.saturating_add(n);
            }
        }
        tensors.push(TensorEntry {
            name: m.name.to_string(),
            dtype: m.st_dtype.to_string(),
            shape: m.shape.to_vec(),
            bytes: m.nbytes,
            nf4_shape,
        });
    }
    let other = params - linear_params;
    let nf4_bytes = (linear_params as f64 * NF4_BITS_PER_WEIGHT / 8.0).ceil() as u64 + 2 * other as u64;
    Inspection {
        path: path.to_path_buf(),
        files: ck.files().to_vec(),
        config,
        by_dtype,
        params,
        linear_params,
        bnb_4bit_weights: bnb.len(),
        nf4_bytes,
        bf16_bytes: 2 * params as u64,
        tensors,
    }
}

/// The shape a 4-bit weight encodes, from its quant state; when that cannot be read, the two
/// codes per stored byte (the report is still useful, and loading will name the problem).
fn bnb_shape(ck: &Checkpoint, weight: &str, packed_bytes: usize) -> Vec<usize> {
    let state = ck.get(&BnbNames::for_weight(weight).quant_state).ok();
    match state.and_then(|t| QuantState::parse(weight, t.data).ok()) {
        Some(qs) => qs.shape,
        None => vec![packed_bytes.saturating_mul(2)],
    }
}

/// `[576, 1536]`.
fn dims(shape: &[usize]) -> String {
    format!("[{}]", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", "))
}

/// 134515008 → `134,515,008`.
fn grouped(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in binary units: `512 B`, `78.3 MiB`, `1.24 GiB`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    match u {
        0 => format!("{bytes} B"),
        _ if v >= 100.0 => format!("{v:.0} {}", UNITS[u]),
        _ if v >= 10.0 => format!("{v:.1} {}", UNITS[u]),
        _ => format!("{v:.2} {}", UNITS[u]),
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "checkpoint    {}", self.path.display())?;
        let names: Vec<String> = self
            .files
            .iter()
            .map(|p| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned()))
            .collect();
        let total: usize = self.by_dtype.values().map(|s| s.bytes).fold(0, usize::saturating_add);
        if names.len() <= 3 {
            writeln!(f, "files         {} ({} of tensor data)", names.join(", "), human(total as u64))?;
        } else {
            writeln!(
                f,
                "files         {} shards: {} … {} ({} of tensor data)",
                names.len(),
                names[0],
                names[names.len() - 1],
                human(total as u64)
            )?;
        }
        match &self.config {
            ConfigStatus::Found(c) => {
                let mut line = format!(
                    "{} ({}): {} layers, hidden {}, intermediate {}, heads {}/{} × {}, vocab {}, context {}",
                    c.arch,
                    c.arch.hf_architecture(),
                    c.num_layers,
                    c.hidden_size,
                    c.intermediate_size,
                    c.num_heads,
                    c.num_kv_heads,
                    c.head_dim,
                    c.vocab_size,
                    c.max_position_embeddings
                );
                if c.tie_word_embeddings {
                    line.push_str(", tied embeddings");
                }
                if let Some(w) = c.sliding_window {
                    line.push_str(&format!(", sliding window {w}"));
                }
                writeln!(f, "architecture  {line}")?;
            }
            ConfigStatus::Missing => writeln!(f, "architecture  unknown: no config.json")?,
            ConfigStatus::Invalid(e) => writeln!(f, "architecture  unknown: {e}")?,
        }
        let mut params = grouped(self.params);
        if let ConfigStatus::Found(c) = &self.config {
            let want = c.param_count();
            if want != self.params {
                params.push_str(&format!(" (the config implies {})", grouped(want)));
            }
        }
        writeln!(f, "parameters    {params}, {} in linear layers", grouped(self.linear_params))?;
        let dtypes: Vec<String> =
            self.by_dtype.iter().map(|(d, s)| format!("{d} × {} ({})", s.tensors, human(s.bytes as u64))).collect();
        writeln!(f, "tensors       {}: {}", self.tensors.len(), dtypes.join(", "))?;
        if self.is_bnb_4bit() {
            writeln!(f, "4-bit         yes: {} bitsandbytes NF4 weights", self.bnb_4bit_weights)?;
        } else {
            writeln!(f, "4-bit         no")?;
        }
        writeln!(
            f,
            "memory        {} with an NF4 base (linear layers at {:.3} bits/weight, the rest bf16); {} in bf16",
            human(self.nf4_bytes),
            NF4_BITS_PER_WEIGHT,
            human(self.bf16_bytes)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::write_safetensors;
    use gristmill_core::bnb::{RawTensor, to_bnb_tensors};
    use gristmill_core::nf4::Nf4Tensor;
    use gristmill_core::{DType, Shape};
    use std::borrow::Cow;

    const TINY: &str = r#"{"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": true, "torch_dtype": "bfloat16"}"#;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("gristmill-inspect-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Every tensor of TINY, bf16, the linear weights 4-bit when `bnb`.
    fn tiny_tensors(bnb: bool) -> Vec<RawTensor<'static>> {
        let cfg = ModelConfig::from_json_str(TINY, "tiny").unwrap();
        let bf16 = |name: String, shape: Vec<usize>| {
            let n: usize = shape.iter().product();
            let data = (0..n).flat_map(|i| half::bf16::from_f32((i % 7) as f32 * 0.1 - 0.3).to_le_bytes()).collect();
            RawTensor { name, dtype: DType::BF16, shape, data: Cow::Owned(data) }
        };
        let mut out =
            vec![bf16("model.embed_tokens.weight".into(), vec![32, 16]), bf16("model.norm.weight".into(), vec![16])];
        for l in 0..cfg.num_layers {
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                out.push(bf16(format!("model.layers.{l}.{norm}.weight"), vec![16]));
            }
            for (name, o, i) in cfg.linear_shapes() {
                let group = if ["gate_proj", "up_proj", "down_proj"].contains(&name) { "mlp" } else { "self_attn" };
                let full = format!("model.layers.{l}.{group}.{name}.weight");
                if bnb {
                    let v: Vec<f32> = (0..o * i).map(|k| (k % 5) as f32 - 2.0).collect();
                    let t = Nf4Tensor::quantize(&v, Shape::new([o, i]).unwrap(), DType::BF16, true).unwrap();
                    out.extend(to_bnb_tensors(&full, &t).unwrap());
                } else {
                    out.push(bf16(full, vec![o, i]));
                }
            }
        }
        out
    }

    #[test]
    fn dense_checkpoint_with_config() {
        let dir = TempDir::new("dense");
        write_safetensors(&dir.0.join("model.safetensors"), &tiny_tensors(false), None).unwrap();
        std::fs::write(dir.0.join("config.json"), TINY).unwrap();
        let r = inspect(&dir.0).unwrap();
        let ConfigStatus::Found(cfg) = &r.config else { panic!("{:?}", r.config) };
        // Tied embeddings: the tensors hold exactly what the config counts.
        assert_eq!(r.params, cfg.param_count());
        // Per layer: q 16×16, k, v 8×16, o 16×16, gate, up 24×16, down 16×24.
        let linear = 2 * (256 + 128 + 128 + 256 + 3 * 384);
        assert_eq!(r.linear_params, linear);
        assert_eq!(r.params, linear + 32 * 16 + 16 + 2 * 2 * 16);
        assert_eq!(r.n_tensors(), 2 + 2 * 9);
        assert_eq!(r.by_dtype["BF16"], DTypeStats { tensors: 20, bytes: 2 * r.params });
        assert!(!r.is_bnb_4bit());
        assert_eq!(r.bf16_bytes, 2 * r.params as u64);
        assert_eq!(r.nf4_bytes, (linear as f64 * 4.126953125 / 8.0).ceil() as u64 + 2 * (r.params - linear) as u64);
        let text = r.to_string();
        assert!(text.contains("architecture  llama (LlamaForCausalLM): 2 layers, hidden 16, intermediate 24, heads 4/2 × 4, vocab 32, context 64, tied embeddings"), "{text}");
        assert!(
            text.contains(&format!("parameters    {}, {} in linear layers", grouped(r.params), grouped(linear))),
            "{text}"
        );
        assert!(text.contains("tensors       20: BF16 × 20"), "{text}");
        assert!(text.contains("4-bit         no"), "{text}");
        assert!(text.contains("at 4.127 bits/weight"), "{text}");
        let listing = r.tensor_listing();
        assert_eq!(listing.lines().count(), 20);
        assert!(
            listing.lines().any(|l| l.starts_with("model.embed_tokens.weight") && l.ends_with("BF16  [32, 16]")),
            "{listing}"
        );
    }

    #[test]
    fn bnb_checkpoint_without_config() {
        let dir = TempDir::new("bnb");
        let file = dir.0.join("model.safetensors");
        write_safetensors(&file, &tiny_tensors(true), None).unwrap();
        let r = inspect(&file).unwrap();
        assert_eq!(r.config, ConfigStatus::Missing);
        assert!(r.is_bnb_4bit());
        assert_eq!(r.bnb_4bit_weights, 14);
        // Same parameters as the dense model: 4-bit weights count at their encoded shape.
        let dense = TempDir::new("bnb-dense");
        write_safetensors(&dense.0.join("model.safetensors"), &tiny_tensors(false), None).unwrap();
        let d = inspect(&dense.0).unwrap();
        assert_eq!((r.params, r.linear_params, r.nf4_bytes), (d.params, d.linear_params, d.nf4_bytes));
        assert!(r.by_dtype.contains_key("U8") && r.by_dtype.contains_key("F32"));
        let text = r.to_string();
        assert!(text.contains("architecture  unknown: no config.json"), "{text}");
        assert!(text.contains("4-bit         yes: 14 bitsandbytes NF4 weights"), "{text}");
        let listing = r.tensor_listing();
        assert!(listing.contains("model.layers.0.mlp.down_proj.weight"), "{listing}");
        assert!(
            listing.lines().any(|l| l.contains("mlp.down_proj.weight ") && l.ends_with("(NF4 of [16, 24])")),
            "{listing}"
        );

        // A broken config.json is reported, not fatal.
        std::fs::write(dir.0.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
        let r = inspect(&dir.0).unwrap();
        assert!(matches!(&r.config, ConfigStatus::Invalid(e) if e.contains("model_type `gpt2` is not supported")));
    }

    #[test]
    fn number_formats() {
        assert_eq!(grouped(134_515_008), "134,515,008");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.50 KiB");
        assert_eq!(human(269_030_016), "257 MiB");
        assert_eq!(human(3 << 30), "3.00 GiB");
    }
}
