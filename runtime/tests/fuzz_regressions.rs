//! Every input in fuzz/regressions/TARGET/ (each one crashed a fuzz target once, see
//! docs/reliability.md) replayed through the same entry point as the target, in the ordinary
//! test suite: each must now load or fail with an error, never panic. Inputs of a target are
//! laid out as the target reads them (a leading selector byte where it has one).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{fixtures, tmp};
use gristmill::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

fn regressions(target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions").join(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(d) => d.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// As the `tokenizer` fuzz target: the first byte picks which of the three files the rest is.
fn load_tokenizer_input(dir: &Path, data: &[u8]) -> gristmill::Result<Tokenizer> {
    let fx = fixtures().join("tiny_llama");
    let (&which, rest) = data.split_first().unwrap();
    let put = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let tj = std::fs::read(fx.join("tokenizer.json")).unwrap();
    let tc = std::fs::read(fx.join("tokenizer_config.json")).unwrap();
    let (tj, tc, gc) = match which % 3 {
        0 => (rest, &tc[..], None),
        1 => (&tj[..], rest, None),
        _ => (&tj[..], &tc[..], Some(rest)),
    };
    let tj = put("tokenizer.json", tj);
    let tc = put("tokenizer_config.json", tc);
    let gc = gc.map(|g| put("generation_config.json", g));
    Tokenizer::from_files(&tj, Some(&tc), gc.as_deref())
}

#[test]
fn tokenizer_regressions_are_errors_not_panics() {
    let files = regressions("tokenizer");
    assert!(!files.is_empty(), "fuzz/regressions/tokenizer holds the inputs found so far");
    let dir = tmp("fuzz-regressions-tokenizer");
    for f in files {
        let data = std::fs::read(&f).unwrap();
        let r = load_tokenizer_input(&dir, &data);
        assert!(r.is_err(), "{} loads: it was chosen because it is malformed", f.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_decoder_with_invalid_utf8_is_reported_with_its_position() {
    // The first input the tokenizer target found: the tokenizers library panicked on a byte that
    // is not UTF-8 inside the `decoder` section.
    let f = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/tokenizer/decoder-invalid-utf8");
    let dir = tmp("fuzz-regression-decoder");
    let e = load_tokenizer_input(&dir, &std::fs::read(f).unwrap()).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: not a valid tokenizer.json: invalid JSON: invalid unicode code point at line 1 column 664",
            dir.join("tokenizer.json").display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_precompiled_charsmap_is_an_error_not_a_panic() {
    // The tokenizers library expects (panics) when a Precompiled normalizer's map does not parse.
    let dir = tmp("fuzz-regression-precompiled");
    let mut tj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("tiny_llama/tokenizer.json")).unwrap()).unwrap();
    tj["normalizer"] = serde_json::json!({"type": "Precompiled", "precompiled_charsmap": "AAAA"});
    let mut data = vec![0u8];
    data.extend(tj.to_string().bytes());
    let e = load_tokenizer_input(&dir, &data).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: not a valid tokenizer.json: the tokenizers library failed on it (Precompiled: Error(\"Cannot parse \
             precompiled_charsmap\", line: 0, column: 0))",
            dir.join("tokenizer.json").display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
