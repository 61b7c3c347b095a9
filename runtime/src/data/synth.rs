//! A synthetic task for demos and tests: templated arithmetic word problems with exact integer
//! answers, written the way GSM8K writes them (a short worked solution ending in `#### N`), and
//! the answer extraction and exact-match scoring used to evaluate them (and GSM8K itself).
//!
//! Numbers stay small (sums under 100, products under 150) so that a small model fine-tuned for a
//! few minutes can learn the task.

use gristmill_core::rng::Rng;

use super::format::Example;

const NAMES: [(&str, &str); 10] = [
    ("Ava", "she"),
    ("Ben", "he"),
    ("Chloe", "she"),
    ("Dan", "he"),
    ("Emma", "she"),
    ("Finn", "he"),
    ("Grace", "she"),
    ("Hugo", "he"),
    ("Isla", "she"),
    ("Jack", "he"),
];

const ITEMS: [&str; 10] =
    ["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards", "balloons", "stamps"];

/// The templates, in the order `generate` cycles through them.
pub const TEMPLATES: [&str; 6] = ["buy", "give", "share", "packs", "price", "buy_share"];

/// `n` problems from `seed`, as GSM8K-style examples: prompt field `question`, response the worked
/// answer ending in `#### N`; `meta` holds the `template` and the `gold` answer N. The templates
/// take turns so that every one is represented; everything else is drawn from the seed.
pub fn generate(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let template = TEMPLATES[i % TEMPLATES.len()];
            let (question, answer, gold) = problem(template, &mut rng);
            let mut ex = Example::prompt_response([("question", question.as_str())], &answer);
            ex.meta.insert("template".into(), template.into());
            ex.meta.insert("gold".into(), gold.to_string());
            ex
        })
        .collect()
}

/// Uniform in `lo..=hi`.
fn range(rng: &mut Rng, lo: u64, hi: u64) -> u64 {
    lo + rng.below(hi - lo + 1)
}

/// Capitalises a pronoun at the start of a sentence.
fn cap(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

/// One problem: (question, worked answer, the number).
fn problem(template: &str, rng: &mut Rng) -> (String, String, u64) {
    let who = rng.below(NAMES.len() as u64) as usize;
    let (name, pron) = NAMES[who];
    // A friend other than the protagonist.
    let friend = NAMES[(who + 1 + rng.below(NAMES.len() as u64 - 1) as usize) % NAMES.len()].0;
    let item = ITEMS[rng.below(ITEMS.len() as u64) as usize];
    let pc = cap(pron);
    let poss = if pron == "she" { "her" } else { "his" };
    match template {
        "buy" => {
            let (a, b) = (range(rng, 3, 40), range(rng, 2, 30));
            let c = a + b;
            (
                format!("{name} has {a} {item}. {pc} buys {b} more {item}. How many {item} does {name} have now?"),
                format!(
                    "{name} starts with {a} {item} and buys {b} more, so {pron} has {a} + {b} = {c} {item}.\n#### {c}"
                ),
                c,
            )
        }
        "give" => {
            let a = range(rng, 10, 60);
            let b = range(rng, 1, a - 1);
            let c = a - b;
            (
                format!(
                    "{name} has {a} {item} and gives {b} of them to {friend}. How many {item} does {name} have left?"
                ),
                format!(
                    "{name} gives away {b} of {poss} {a} {item}, so {pron} has {a} - {b} = {c} {item} left.\n#### {c}"
                ),
                c,
            )
        }
        "share" => {
            let (k, each) = (range(rng, 2, 8), range(rng, 2, 12));
            let total = k * each;
            (
                format!(
                    "{name} has {total} {item} and shares them equally among {k} friends. How many {item} does each \
                     friend get?"
                ),
                format!("Each friend gets {total} / {k} = {each} {item}.\n#### {each}"),
                each,
            )
        }
        "packs" => {
            let (p, q) = (range(rng, 2, 6), range(rng, 3, 10));
            let pq = p * q;
            let r = range(rng, 1, pq - 1);
            let c = pq - r;
            (
                format!(
                    "{name} buys {p} packs of {item} with {q} {item} in each pack. {pc} gives {r} {item} to {friend}. \
                     How many {item} does {name} have left?"
                ),
                format!(
                    "{name} buys {p} x {q} = {pq} {item}.\nAfter giving {r} away, {pron} has {pq} - {r} = {c} {item}.\n#### {c}"
                ),
                c,
            )
        }
        "price" => {
            let (n, price) = (range(rng, 2, 9), range(rng, 2, 15));
            let total = n * price;
            (
                format!("{name} buys {n} {item} that cost ${price} each. How much money does {name} spend?"),
                format!("{name} spends {n} x ${price} = ${total}.\n#### {total}"),
                total,
            )
        }
        // "buy_share": an addition, then a division.
        _ => {
            let (k, each) = (range(rng, 2, 6), range(rng, 2, 10));
            let total = k * each;
            let a = range(rng, 1, total - 1);
            let b = total - a;
            (
                format!(
                    "{name} has {a} {item} and buys {b} more. {pc} then shares all of them equally among {k} friends. \
                     How many {item} does each friend get?"
                ),
                format!(
                    "{name} has {a} + {b} = {total} {item}.\nEach friend gets {total} / {k} = {each} {item}.\n#### {each}"
                ),
                each,
            )
        }
    }
}

/// The final answer in a solution: the number after the last `####` (GSM8K's marker), else the
/// last number in the text. Normalised so that equal numbers compare equal as strings: thousands
/// separators and `$` dropped (`"$1,234"` → `"1234"`), trailing fractional zeros dropped
/// (`"5.0"` → `"5"`, `"2.50"` → `"2.5"`), leading zeros dropped, `"-0"` → `"0"`. A `-` directly
/// before a number makes it negative unless a letter or digit precedes the `-` (`"3-4"` is two
/// numbers). `None` when the text has no number.
pub fn extract_answer(text: &str) -> Option<String> {
    if let Some(i) = text.rfind("####")
        && let Some(n) = numbers(&text[i + 4..]).into_iter().next()
    {
        return Some(n);
    }
    numbers(text).pop()
}

/// Whether a prediction's answer equals the gold answer (both through [`extract_answer`], so the
/// gold may be a full GSM8K solution or just the number).
pub fn exact_match(pred: &str, gold: &str) -> bool {
    match (extract_answer(pred), extract_answer(gold)) {
        (Some(p), Some(g)) => p == g,
        _ => false,
    }
}

/// Every number in `text`, normalised, in order.
fn numbers(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !digit(i) {
            i += 1;
            continue;
        }
        let negative = i >= 1 && b[i - 1] == b'-' && (i < 2 || !b[i - 2].is_ascii_alphanumeric());
        let mut int = String::new();
        while digit(i) {
            int.push(char::from(b[i]));
            i += 1;
            // A thousands separator: a comma followed by exactly three digits.
            if b.get(i) == Some(&b',') && digit(i + 1) && digit(i + 2) && digit(i + 3) && !digit(i + 4) {
                i += 1;
            }
        }
        let mut frac = String::new();
        if b.get(i) == Some(&b'.') && digit(i + 1) {
            i += 1;
            while digit(i) {
                frac.push(char::from(b[i]));
                i += 1;
            }
        }
        let int = int.trim_start_matches('0');
        let int = if int.is_empty() { "0" } else { int };
        let frac = frac.trim_end_matches('0');
        let mut n = if frac.is_empty() { int.to_string() } else { format!("{int}.{frac}") };
        if negative && n != "0" {
            n.insert(0, '-');
        }
        out.push(n);
    }
    out
}
