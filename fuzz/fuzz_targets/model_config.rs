//! A model's `config.json`.
#![no_main]

use gristmill::config::ModelConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = ModelConfig::from_json_str(text, "config.json") {
        let _ = cfg.param_count();
        let _ = cfg.linear_shapes();
        let _ = cfg.to_hf_json();
    }
});
