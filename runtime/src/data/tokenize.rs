//! Tokenization with loss masks.
//!
//! A rendered example is a list of text segments, each either trained on (the response, an
//! assistant turn) or not (the prompt, the template's markup). The whole text is tokenized at
//! once — that is the tokenization the model sees — and each boundary between segments is found
//! by tokenizing the text up to it and checking that those ids are a prefix of the whole.
//!
//! When a BPE merge crosses a boundary (a prompt ending in `"Answer: "` and a response `"72"`
//! merge into `" 72"`), no prefix of the whole text's ids spells the prompt. The example is then
//! tokenized piecewise: the ids of the prompt alone, followed by the ids of the response alone.
//! That is exactly what generation does (the prompt is tokenized on its own and the model
//! continues from it), so the model learns the continuation it will be asked for; such examples
//! are counted in [`TokenizeReport::boundary_merges`].

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

use super::format::Example;
use super::template::{Rendered, Template};

/// Which tokens carry the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    /// The response (and its EOS), or the assistant turns of a conversation.
    #[default]
    Response,
    /// Every token (continued pre-training on the rendered text).
    All,
}

/// Options of [`tokenize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// Longest sequence kept, in tokens; longer ones are cut from the right. At least 2.
    pub max_len: usize,
    /// Which tokens carry the loss.
    pub loss_on: LossOn,
    /// Append the tokenizer's first EOS id after the response (after the last assistant turn of a
    /// conversation), counted in the loss, unless the response's tokens already end with an EOS
    /// id (chat templates that close a turn with one, such as ChatML with `<|im_end|>` as EOS).
    /// Without it the model never learns to stop.
    pub add_eos: bool,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions { max_len: 1024, loss_on: LossOn::Response, add_eos: true }
    }
}

/// A tokenized example.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tokenized {
    /// ids: (T,) the token ids, BOS included when the tokenizer adds one.
    pub ids: Vec<u32>,
    /// loss_mask: (T,) true where the token is predicted (from the one before it) and counts in
    /// the loss. Always false at 0: nothing predicts the first token.
    pub loss_mask: Vec<bool>,
}

impl Tokenized {
    /// The number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The number of tokens that count in the loss.
    pub fn n_loss(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }
}

/// What [`tokenize_all`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenizeReport {
    /// Examples given.
    pub examples: usize,
    /// Examples kept.
    pub kept: usize,
    /// Examples dropped because no loss token survived truncation.
    pub dropped_no_loss: usize,
    /// Kept examples that were cut to `max_len`.
    pub truncated: usize,
    /// Examples tokenized piecewise because a BPE merge crossed a prompt/response boundary.
    pub boundary_merges: usize,
    /// Tokens of the kept examples.
    pub tokens: usize,
    /// Loss tokens of the kept examples.
    pub loss_tokens: usize,
    /// The longest kept example, in tokens.
    pub longest: usize,
}

impl std::fmt::Display for TokenizeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} examples kept ({} dropped with no loss token left, {} truncated, {} tokenized piecewise \
             at a BPE merge), {} tokens, {} in the loss, longest {}",
            self.kept,
            self.examples,
            self.dropped_no_loss,
            self.truncated,
            self.boundary_merges,
            self.tokens,
            self.loss_tokens,
            self.longest
        )
    }
}

/// Tokenizes one example with its loss mask. `None` when no loss token survives truncation (the
/// caller counts it); errors come from the template (a missing field, a chat example without the
/// chat template) or the tokenizer.
///
/// Text templates get the tokenizer's BOS in front when its `encode(.., true)` would add one
/// ([`Tokenizer::add_bos_token`]); chat templates write BOS themselves, so nothing is added. EOS
/// follows [`TokenizeOptions::add_eos`]. Sequences longer than `max_len` keep their first
/// `max_len` tokens.
pub fn tokenize(
    tok: &Tokenizer,
    template: &Template,
    example: &Example,
    opts: &TokenizeOptions,
) -> Result<Option<Tokenized>> {
    Ok(tokenize_one(tok, template, example, opts)?.tokens)
}

/// Tokenizes every example (in parallel, keeping their order), dropping those with no loss token
/// left (see [`tokenize`]). The first error, in example order, is returned.
pub fn tokenize_all(
    tok: &Tokenizer,
    template: &Template,
    examples: &[Example],
    opts: &TokenizeOptions,
) -> Result<(Vec<Tokenized>, TokenizeReport)> {
    // Examples are independent: tokenize them on all cores, in contiguous chunks so that the
    // output keeps the input order.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(examples.len().div_ceil(64)).max(1);
    let chunk = examples.len().div_ceil(threads).max(1);
    let results: Vec<Result<Vec<One>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = examples
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|ex| tokenize_one(tok, template, ex, opts)).collect()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Tokenizer("a tokenizing thread panicked".into()))))
            .collect()
    });
    let mut report = TokenizeReport { examples: examples.len(), ..Default::default() };
    let mut out = Vec::with_capacity(examples.len());
    for part in results {
        for one in part? {
            report.boundary_merges += usize::from(one.piecewise);
            match one.tokens {
                Some(t) => {
                    report.truncated += usize::from(one.truncated);
                    report.tokens += t.len();
                    report.loss_tokens += t.n_loss();
                    report.longest = report.longest.max(t.len());
                    out.push(t);
                }
                None => report.dropped_no_loss += 1,
            }
        }
    }
    report.kept = out.len();
    Ok((out, report))
}

/// One example's tokens and how they were made.
struct One {
    tokens: Option<Tokenized>,
    truncated: bool,
    piecewise: bool,
}

/// A piece of rendered text and whether it is trained on.
struct Segment {
    text: String,
    loss: bool,
}

fn tokenize_one(tok: &Tokenizer, template: &Template, example: &Example, opts: &TokenizeOptions) -> Result<One> {
    if opts.max_len < 2 {
        return Err(Error::Invalid(format!("max_len {}: at least 2 tokens are needed to predict one", opts.max_len)));
    }
    // Chat templates write BOS themselves; for plain text it is added as `encode` would.
    let (segments, bos) = match template.render(example)? {
        Rendered::Text { prompt, response } => {
            let bos = if tok.add_bos_token() { tok.bos_id() } else { None };
            (vec![Segment { text: prompt, loss: false }, Segment { text: response, loss: true }], bos)
        }
        Rendered::Chat(msgs) => (chat_segments(tok, &msgs)?, None),
    };
    let (mut ids, ends, piecewise) = encode_segments(tok, &segments)?;
    // loss_mask: (T,) per token, from the segment it belongs to.
    let mut mask = Vec::with_capacity(ids.len() + 2);
    let mut start = 0;
    for (seg, &end) in segments.iter().zip(&ends) {
        mask.extend(std::iter::repeat_n(seg.loss, end - start));
        start = end;
    }
    if opts.add_eos {
        // After the last trained segment, unless its tokens already end with an EOS id.
        let last = segments.iter().rposition(|s| s.loss);
        if let Some(k) = last {
            let (start, end) = (if k == 0 { 0 } else { ends[k - 1] }, ends[k]);
            if end == start || !tok.is_eos(ids[end - 1]) {
                let eos = *tok.eos_ids().first().ok_or_else(|| {
                    Error::Tokenizer(
                        "add_eos is set but the tokenizer has no EOS token (tokenizer_config's `eos_token` or \
                         generation_config's `eos_token_id`)"
                            .into(),
                    )
                })?;
                ids.insert(end, eos);
                mask.insert(end, true);
            }
        }
    }
    if let Some(bos) = bos {
        ids.insert(0, bos);
        mask.insert(0, false);
    }
    if opts.loss_on == LossOn::All {
        mask.iter_mut().for_each(|m| *m = true);
    }
    if let Some(first) = mask.first_mut() {
        *first = false;
    }
    let truncated = ids.len() > opts.max_len;
    ids.truncate(opts.max_len);
    mask.truncate(opts.max_len);
    let tokens = mask.iter().any(|&m| m).then_some(Tokenized { ids, loss_mask: mask });
    Ok(One { tokens, truncated, piecewise })
}

/// Cuts a rendered conversation into segments: each assistant turn's text from the end of the
/// generation prompt before it through its end-of-turn marker is trained on; the whitespace the
/// template writes after that marker is not (the model is never asked to produce it: generation
/// stops at the marker).
fn chat_segments(tok: &Tokenizer, msgs: &[crate::tokenizer::ChatMessage]) -> Result<Vec<Segment>> {
    let full = tok.apply_chat_template(msgs, false)?;
    let mut segments = Vec::new();
    let mut done = 0;
    for (i, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        // The text the model is given before this turn, and the text through the turn.
        let before = tok.apply_chat_template(&msgs[..i], true)?;
        let through = tok.apply_chat_template(&msgs[..=i], false)?;
        if !full.starts_with(&before)
            || !full.starts_with(&through)
            || before.len() < done
            || through.len() < before.len()
        {
            return Err(Error::Tokenizer(format!(
                "the chat template does not render the conversation prefix by prefix (at message {i}): cannot tell \
                 which text is the assistant's"
            )));
        }
        let end = before.len() + through[before.len()..].trim_end().len();
        segments.push(Segment { text: full[done..before.len()].to_string(), loss: false });
        segments.push(Segment { text: full[before.len()..end].to_string(), loss: true });
        done = end;
    }
    segments.push(Segment { text: full[done..].to_string(), loss: false });
    Ok(segments)
}

/// Tokenizes the concatenated segments; returns the ids, the end (exclusive token index) of each
/// segment, and whether the piecewise fallback was taken (see the module docs).
fn encode_segments(tok: &Tokenizer, segments: &[Segment]) -> Result<(Vec<u32>, Vec<usize>, bool)> {
    let full_text: String = segments.iter().map(|s| s.text.as_str()).collect();
    let ids = tok.encode(&full_text, false)?;
    let mut ends = Vec::with_capacity(segments.len());
    let mut prefix = String::with_capacity(full_text.len());
    let mut consistent = true;
    for (k, seg) in segments.iter().enumerate() {
        prefix.push_str(&seg.text);
        if k + 1 == segments.len() {
            ends.push(ids.len());
            break;
        }
        let p = tok.encode(&prefix, false)?;
        if !ids.starts_with(&p) || p.len() < ends.last().copied().unwrap_or(0) {
            consistent = false;
            break;
        }
        ends.push(p.len());
    }
    if consistent {
        return Ok((ids, ends, false));
    }
    let mut ids = Vec::with_capacity(ids.len() + 4);
    let mut ends = Vec::with_capacity(segments.len());
    for seg in segments {
        ids.extend(tok.encode(&seg.text, false)?);
        ends.push(ids.len());
    }
    Ok((ids, ends, true))
}
