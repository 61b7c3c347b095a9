//! Bad input, and the exact message a user sees for it: truncated and corrupt files, wrong dtypes
//! and shapes, an adapter or a tokenizer that does not match the base, data with missing fields or
//! empty responses (skipped and counted), a prompt or a training length beyond the model's
//! context, and a configuration with unknown keys. Each message names the file, tensor or field,
//! what was expected and what was found. docs/reliability.md lists them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{fixtures, tmp, write_synth_data};
use gristmill::adapter::load_peft_adapter;
use gristmill::api::{LoadOptions, Model, SamplingConfig};
use gristmill::core::DType;
use gristmill::core::bnb::RawTensor;
use gristmill::data::{Format, load_examples};
use gristmill::gguf::GgufFile;
use gristmill::model::{BasePrecision, LlamaModel};
use gristmill::safetensors::{Checkpoint, write_safetensors};
use gristmill::train::config::TrainConfig;
use gristmill::train::trainer::{Hooks, train};
use std::path::{Path, PathBuf};

/// A copy of a fixture directory in `tmp(name)`.
fn copy_fixture(fixture: &str, name: &str) -> PathBuf {
    let dir = tmp(name);
    for e in std::fs::read_dir(fixtures().join(fixture)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

fn err<T>(r: gristmill::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Rewrites the safetensors file `path` with `edit` applied to each tensor.
fn rewrite(path: &Path, edit: impl Fn(&mut RawTensor<'static>)) {
    let ck = Checkpoint::open(path).unwrap();
    let mut tensors: Vec<RawTensor<'static>> = ck
        .metas()
        .map(|m| m.name.to_string())
        .collect::<Vec<_>>()
        .into_iter()
        .map(|name| {
            let t = ck.get(&name).unwrap();
            RawTensor { name: name.clone(), dtype: t.dtype, shape: t.shape.to_vec(), data: t.data.to_vec().into() }
        })
        .collect();
    drop(ck);
    tensors.iter_mut().for_each(&edit);
    write_safetensors(path, &tensors, None).unwrap();
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let dir = copy_fixture("tiny_llama", "trunc");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let p = path.display();
    assert_eq!(
        err(LlamaModel::load(&dir, BasePrecision::F32)),
        format!(
            "{p}: tensor `model.layers.0.mlp.up_proj.weight`: data_offsets [192192, 230592] point past the end of \
             the data (221348 bytes follow the header): the file is truncated or its header is wrong"
        )
    );

    std::fs::write(&path, &bytes[..5]).unwrap();
    assert_eq!(
        err(Checkpoint::open(&path)),
        format!("{p}: 5 bytes is too short for a safetensors file (8-byte header length)")
    );

    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bad).unwrap();
    assert_eq!(
        err(Checkpoint::open(&path)),
        format!(
            "{p}: header length field says 18446744073709551615 bytes, over the safetensors limit of 100000000: \
             not a safetensors file, or a damaged one"
        )
    );

    let mut bad = bytes.clone();
    bad[8] = b'!';
    std::fs::write(&path, &bad).unwrap();
    assert_eq!(
        err(Checkpoint::open(&path)),
        format!("{p}: header is not a valid safetensors JSON header: expected value at line 1 column 1")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrong_dtype_and_shape() {
    let dir = copy_fixture("tiny_llama", "dtype");
    rewrite(&dir.join("model.safetensors"), |t| {
        if t.name == "model.norm.weight" {
            t.dtype = DType::U8;
            t.shape = vec![t.data.len()];
        }
    });
    assert_eq!(
        err(LlamaModel::load(&dir, BasePrecision::F32)),
        "tensor `model.norm.weight`: is U8, not a float tensor (F32, BF16 or F16)"
    );

    let dir = copy_fixture("tiny_llama", "shape");
    rewrite(&dir.join("model.safetensors"), |t| {
        if t.name == "model.layers.1.self_attn.k_proj.weight" {
            t.shape = vec![t.shape[1], t.shape[0]];
        }
    });
    assert_eq!(
        err(LlamaModel::load(&dir, BasePrecision::F32)),
        "tensor `model.layers.1.self_attn.k_proj.weight`: has shape [96, 32], expected [32, 96]"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn adapter_that_does_not_match_the_base() {
    let model_dir = fixtures().join("tiny_llama");
    let mut model = LlamaModel::load(&model_dir, BasePrecision::F32).unwrap();
    let dir = copy_fixture("peft_adapter", "rank");
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, text.replace("\"r\": 4", "\"r\": 8")).unwrap();
    assert_eq!(
        err(load_peft_adapter(&mut model, &dir)),
        "tensor `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`: has 384 values; expected r × in = 8 × 96"
    );

    // Modules the base does not have (a fused qkv_proj, as Phi-3 names it).
    std::fs::write(&cfg_path, &text).unwrap();
    let weights = dir.join("adapter_model.safetensors");
    rewrite(&weights, |t| t.name = t.name.replace("q_proj", "qkv_proj"));
    let mut model = LlamaModel::load(&model_dir, BasePrecision::F32).unwrap();
    assert_eq!(
        err(load_peft_adapter(&mut model, &dir)),
        format!(
            "{}: 4 LoRA tensors match no module of this model (first: \
             `base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight`): the adapter was trained for \
             another architecture or layer count",
            weights.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tokenizer_that_does_not_match_the_model() {
    let dir = copy_fixture("tiny_llama", "tok");
    let path = dir.join("tokenizer.json");
    let mut tj: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    tj["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
        "id": 300, "content": "<|extra|>", "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": true
    }));
    std::fs::write(&path, tj.to_string()).unwrap();
    assert_eq!(
        err(Model::load(&dir, LoadOptions::default())),
        "tokenizer: the tokenizer does not match the model: its token `<|extra|>` has id 300 (301 tokens), but the \
         model's vocab_size is 300 (ids 0..300); use the tokenizer files of the model's own directory"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn data_with_missing_fields_and_empty_responses_is_skipped_and_counted() {
    let dir = tmp("bad-data");
    let path = dir.join("alpaca.jsonl");
    let rows = [
        r#"{"instruction": "Add 2 and 3.", "input": "", "output": "5"}"#,
        r#"{"instruction": "Name a colour.", "input": ""}"#,
        r#"{"instruction": "Say nothing.", "input": "", "output": ""}"#,
        r#"{"instruction": "Say nothing, twice.", "input": "", "output": "   "}"#,
        r#"["not", "an", "object"]"#,
        r#"{"instruction": "Add 1 and 1.", "output": "2"}"#,
    ];
    std::fs::write(&path, rows.join("\n")).unwrap();
    let (examples, report) = load_examples(&path, Format::Alpaca).unwrap();
    assert_eq!(examples.len(), 2);
    assert_eq!(report.n_skipped(), 4);
    let skipped: Vec<(String, usize, usize)> =
        report.skipped.iter().map(|(why, c)| (why.clone(), c.count, c.first_line)).collect();
    assert_eq!(
        skipped,
        vec![
            ("empty `output`".to_string(), 2, 3),
            ("missing field `output`".to_string(), 1, 2),
            ("not a JSON object (found a list)".to_string(), 1, 5)
        ]
    );

    // Nothing usable at all is an error that lists why.
    std::fs::write(&path, rows[1..5].join("\n")).unwrap();
    assert_eq!(
        err(load_examples(&path, Format::Alpaca)),
        format!(
            "{}: no usable record among 4 (format alpaca); 2 × empty `output` (first at line 2); 1 × missing field \
             `output` (first at line 1); 1 × not a JSON object (found a list) (first at line 4)",
            path.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn longer_than_the_context() {
    let model = Model::load(fixtures().join("tiny_llama"), LoadOptions::default()).unwrap();
    let prompt = "one two three four five six seven eight nine ten ".repeat(40);
    let r = model.generate(&prompt, &SamplingConfig::default(), |_| true);
    assert_eq!(err(r), "the prompt has 1400 tokens but the model's context is 256: shorten it");

    let dir = tmp("bad-ctx");
    let data = write_synth_data(&dir);
    let text = format!(
        "[model]\npath = {:?}\n[data]\npaths = [{:?}]\nmax_seq_len = 1024\n[train]\nmax_steps = 1\n[output]\ndir = {:?}\n",
        fixtures().join("tiny_llama"),
        data,
        dir.join("run")
    );
    let cfg = TrainConfig::from_toml_str(&text).unwrap();
    assert_eq!(
        err(train(&cfg, Hooks::default())),
        format!(
            "data.max_seq_len = 1024 is longer than the model's context (256, max_position_embeddings in {}): set \
             data.max_seq_len to 256 or less (longer examples are truncated and counted)",
            fixtures().join("tiny_llama").join("config.json").display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn configuration_with_unknown_keys_suggests_the_right_one() {
    let base = "[model]\npath = \"m\"\n[data]\npaths = [\"d.jsonl\"]\n[output]\ndir = \"r\"\n";
    let e = |extra: &str| err(TrainConfig::from_toml_str(&format!("{base}{extra}")));
    assert_eq!(
        e("[train]\nbatch_sise = 4\n"),
        "config: unknown key `train.batch_sise` in the config; did you mean `train.batch_size`?"
    );
    assert_eq!(
        e("[optim]\nlearning_rate = 1e-4\n"),
        "config: unknown key `optim.learning_rate` in the config; did you mean `optim.lr`?"
    );
    assert_eq!(e("[trian]\nseed = 1\n"), "config: unknown table `[trian]` in the config; did you mean `[train]`?");
    assert_eq!(
        e("[train]\nbatch_size = \"four\"\n"),
        "config: `train.batch_size` in the config must be a non-negative integer, found a string `\"four\"`"
    );
    // A flat key before any table.
    let flat = err(TrainConfig::from_toml_str(&format!("lr = 1e-4\n{base}")));
    assert_eq!(flat, "config: unknown key `lr` in the config; did you mean `optim.lr`?");
}

#[test]
fn truncated_and_foreign_gguf() {
    let dir = tmp("bad-gguf");
    let path = dir.join("model.gguf");
    std::fs::write(&path, b"GGUF\x03\0\0\0").unwrap();
    assert_eq!(
        err(GgufFile::open(&path)),
        format!("{}: truncated: 8 bytes, a GGUF header alone is 24", path.display())
    );
    let mut header = b"GGUF".to_vec();
    header.extend(3u32.to_le_bytes());
    header.extend(0u64.to_le_bytes()); // tensors
    header.extend(1u64.to_le_bytes()); // one metadata entry, missing
    std::fs::write(&path, &header).unwrap();
    assert_eq!(
        err(GgufFile::open(&path)),
        format!("{}: key/value count 1 cannot fit in the 0 bytes after the header (at byte 16)", path.display())
    );
    std::fs::write(&path, b"PK\x03\x04 this is a zip file, not a model....").unwrap();
    assert_eq!(
        err(GgufFile::open(&path)),
        format!("{}: not a GGUF file: it starts with [50, 4b, 03, 04], GGUF files with \"GGUF\"", path.display())
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
