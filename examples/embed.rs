//! Embedding gristmill in a Rust program through `gristmill::api`: load a model, stream a
//! generation, score two continuations.
//!
//! ```sh
//! cargo run -p gristmill --example embed                     # the tiny test model
//! cargo run -p gristmill --example embed -- MODEL_DIR [ADAPTER_DIR] [PROMPT]
//! ```

use gristmill::api::{Device, LoadOptions, Model, SamplingConfig};
use std::io::Write;
use std::path::PathBuf;

/// The library only logs; this example shows its log on stderr.
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("[{}] {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if log::set_logger(&Stderr).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_llama"), PathBuf::from);
    let adapter = args.next().filter(|a| !a.is_empty()).map(PathBuf::from);
    let prompt = args.next().unwrap_or_else(|| "Question: what is 12 + 30?\nAnswer:".to_string());

    // `auto`: the GPU when the driver finds one, else the CPU (with a logged line saying why).
    let opts = LoadOptions { adapter, device: Device::parse("auto")?, ..Default::default() };
    let model = Model::load(&dir, opts)?;
    println!("prompt ({} tokens): {prompt:?}", model.tokenize(&prompt)?.len());

    let cfg = SamplingConfig { temperature: 0.7, top_p: 0.9, seed: 1, max_new_tokens: 32, ..Default::default() };
    let mut stdout = std::io::stdout();
    let out = model.generate(&prompt, &cfg, |piece| {
        // Stop quietly when stdout is closed.
        stdout.write_all(piece.as_bytes()).and_then(|()| stdout.flush()).is_ok()
    })?;
    println!();
    println!("[{} new tokens, stop: {:?}, {:.1} tok/s]", out.ids.len(), out.stop, out.tokens_per_s());

    for continuation in [" 42", " 7"] {
        println!("log P({continuation:?} | prompt) = {:.3}", model.score(&prompt, continuation)?);
    }
    Ok(())
}
