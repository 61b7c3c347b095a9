//! A training data file in each format: the first byte picks the format (and whether paraphrase
//! answers are used), the rest is the file, JSON or JSON Lines.
#![no_main]

use gristmill::data::{Format, LoadOptions, load_examples_with};
use gristmill_fuzz::put;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let format = Format::ALL[usize::from(which) % Format::ALL.len()];
    let opts =
        LoadOptions { buckets: (which & 0x40 != 0).then(|| vec![1, 2]), use_paraphrase_answers: which & 0x80 != 0 };
    let path = put("data.jsonl", rest);
    if let Ok((examples, _report)) = load_examples_with(&path, format, &opts) {
        for ex in &examples {
            let _ = ex.response();
        }
    }
});
