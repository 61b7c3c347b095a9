//! A single `.safetensors` file: header, offsets, dtypes, shapes, and decoding every small tensor.
#![no_main]

use gristmill::safetensors::Checkpoint;
use gristmill_fuzz::{DECODE_MAX, put};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = put("model.safetensors", data);
    let Ok(ck) = Checkpoint::open(&path) else { return };
    let names: Vec<String> = ck.names().into_iter().map(String::from).collect();
    for name in names {
        let small = ck.meta(&name).is_some_and(|m| m.numel() <= DECODE_MAX);
        if small {
            let _ = ck.get(&name);
            let _ = ck.to_f32(&name);
            let _ = ck.is_bnb_4bit(&name);
        }
    }
});
