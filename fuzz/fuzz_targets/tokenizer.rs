//! The tokenizer files: the first byte picks which of `tokenizer.json`, `tokenizer_config.json`
//! (special tokens, chat template) and `generation_config.json` gets the rest of the input; the
//! others are the tiny fixture model's. A tokenizer that loads then encodes, decodes and renders
//! its chat template.
#![no_main]

use gristmill::tokenizer::{ChatMessage, Tokenizer};
use gristmill_fuzz::{TOKENIZER_CONFIG, TOKENIZER_JSON, put};
use libfuzzer_sys::fuzz_target;
use std::sync::Once;

fuzz_target!(|data: &[u8]| {
    // The library contains the tokenizers crate's panics on malformed files (it turns them into
    // errors): replace the fuzzer's hook, which would abort on them before they are caught. A
    // panic that escapes the library still aborts: the fuzz_target wrapper catches it.
    static QUIET: Once = Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Some((&which, rest)) = data.split_first() else { return };
    let (tj, tc, gc) = match which % 3 {
        0 => (rest, TOKENIZER_CONFIG, None),
        1 => (TOKENIZER_JSON, rest, None),
        _ => (TOKENIZER_JSON, TOKENIZER_CONFIG, Some(rest)),
    };
    let tj = put("tokenizer.json", tj);
    let tc = put("tokenizer_config.json", tc);
    let gc = gc.map(|g| put("generation_config.json", g));
    let Ok(tok) = Tokenizer::from_files(&tj, Some(&tc), gc.as_deref()) else { return };
    if let Ok(ids) = tok.encode("Hello, world! 12 + 30 = 42", true) {
        let _ = tok.decode(&ids, false);
        let mut stream = tok.decode_stream(true);
        for id in ids {
            let _ = stream.step(id);
        }
        let _ = stream.flush();
    }
    let _ = tok.decode(&[0, 1, 2, u32::MAX], true);
    let msgs = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
    let _ = tok.apply_chat_template(&msgs, true);
});
