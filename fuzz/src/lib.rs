//! What the fuzz targets share: the loaders read files (most map them), so each input is written
//! to a file in a scratch directory of this process and the real entry point opens it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A directory of this process under the system temporary directory, made once.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gristmill-fuzz-{}", std::process::id()));
        // A fuzz run cannot go on without it: failing loudly here is right.
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        dir
    })
}

/// Writes `bytes` to `name` in the scratch directory and returns its path.
pub fn put(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// Tensors no larger than this are decoded in full; larger ones only have their header checked
/// (a fuzzer's file claims what it likes, and decoding gigabytes would just be slow).
pub const DECODE_MAX: usize = 1 << 16;

/// The tiny fixture model's tokenizer files, for targets that fuzz one file of a set.
pub const TOKENIZER_JSON: &[u8] = include_bytes!("../../tests/fixtures/tiny_llama/tokenizer.json");
pub const TOKENIZER_CONFIG: &[u8] = include_bytes!("../../tests/fixtures/tiny_llama/tokenizer_config.json");
