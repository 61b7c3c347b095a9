//! A sharded checkpoint's `model.safetensors.index.json`, beside one valid shard.
#![no_main]

use gristmill::core::DType;
use gristmill::core::bnb::RawTensor;
use gristmill::safetensors::{Checkpoint, write_safetensors};
use gristmill_fuzz::scratch;
use libfuzzer_sys::fuzz_target;
use std::sync::Once;

fuzz_target!(|data: &[u8]| {
    static SHARD: Once = Once::new();
    SHARD.call_once(|| {
        let bytes: Vec<u8> = [1f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = RawTensor { name: "w".into(), dtype: DType::F32, shape: vec![2], data: bytes.into() };
        let shard = scratch().join("model-00001-of-00001.safetensors");
        write_safetensors(&shard, &[t], None).unwrap_or_else(|e| panic!("writing the shard: {e}"));
    });
    let path = gristmill_fuzz::put("model.safetensors.index.json", data);
    if let Ok(ck) = Checkpoint::open(&path) {
        for name in ck.names().into_iter().map(String::from).collect::<Vec<_>>() {
            let _ = ck.to_f32(&name);
        }
    }
});
