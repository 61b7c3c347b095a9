//! A training configuration, TOML: parsed, checked, and written back.
#![no_main]

use gristmill::train::config::TrainConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = TrainConfig::from_toml_str(text) {
        let _ = cfg.validate();
        if let Ok(back) = cfg.to_toml_string() {
            // What we write must read back.
            if let Err(e) = TrainConfig::from_toml_str(&back) {
                panic!("the written configuration does not read back: {e}\n{back}");
            }
        }
        let _ = cfg.data.format();
        let _ = cfg.data.buckets();
        let _ = cfg.lora.scaling();
    }
});
