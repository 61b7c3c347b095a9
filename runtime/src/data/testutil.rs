//! Test helpers: temporary directories and a small byte-level BPE tokenizer.

use serde_json::json;

use crate::tokenizer::{CHATML_TEMPLATE, Tokenizer};

pub(crate) use crate::util::TempDir;

/// GPT-2's byte-to-character map of byte-level BPE.
fn byte_chars() -> Vec<char> {
    (0..=255u8).map(crate::gguf::byte_char).collect()
}

/// Merges: " 7" (so that a prompt ending in a space and a response starting with 7 merge across
/// the boundary), "hello", " w", "or".
const MERGES: [&str; 7] = ["Ġ 7", "h e", "l l", "he ll", "hell o", "Ġ w", "o r"];
pub const SPECIALS: [&str; 5] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"];

fn vocab() -> Vec<String> {
    let mut v: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    for m in MERGES {
        v.push(m.replace(' ', ""));
    }
    v
}

/// The id of a special token of the test tokenizer.
pub fn sid(name: &str) -> u32 {
    (vocab().len() + SPECIALS.iter().position(|s| *s == name).unwrap()) as u32
}

fn tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> =
        vocab().into_iter().enumerate().map(|(i, t)| (t, json!(i))).collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .map(|s| {
            json!({"id": sid(s), "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": MERGES}
    })
}

fn load(name: &str, tc: serde_json::Value) -> Tokenizer {
    let dir = TempDir::new(name);
    dir.file("tokenizer.json", &tokenizer_json().to_string());
    dir.file("tokenizer_config.json", &tc.to_string());
    Tokenizer::from_dir(dir.path()).unwrap()
}

/// A ChatML tokenizer: EOS `<|im_end|>` (so turns end with an EOS id), pad `<|endoftext|>`, no
/// BOS.
pub fn chatml_tokenizer() -> Tokenizer {
    load(
        "chatml",
        json!({"bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "chat_template": CHATML_TEMPLATE}),
    )
}

/// A ChatML template whose EOS is not the end-of-turn token (`</s>`), for the EOS-append rule.
pub fn chatml_other_eos_tokenizer() -> Tokenizer {
    load("chatml-eos", json!({"bos_token": null, "eos_token": "</s>", "chat_template": CHATML_TEMPLATE}))
}

/// A Llama-style tokenizer without a chat template: BOS `<s>` added, EOS `</s>`, no pad token
/// (padding falls back to EOS).
pub fn plain_tokenizer() -> Tokenizer {
    load("plain", json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true, "add_eos_token": false}))
}
