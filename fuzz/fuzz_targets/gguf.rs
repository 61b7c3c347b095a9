//! A GGUF file: header, metadata, tensor table, the tokenizer built from its vocabulary, and
//! dequantizing every small tensor.
#![no_main]

use gristmill::gguf::{GgufFile, tokenizer_json};
use gristmill_fuzz::{DECODE_MAX, put};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = put("model.gguf", data);
    let Ok(f) = GgufFile::open(&path) else { return };
    let _ = tokenizer_json(&f);
    for info in f.tensors() {
        if info.shape().iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_some_and(|n| n <= DECODE_MAX) {
            let _ = f.tensor_data(info);
            let _ = f.dequantize(info);
        }
    }
});
