//! Training data: formats, prompt templates, tokenization with loss masks, splits, batching, and
//! a synthetic arithmetic task for demos.
//!
//! The pipeline, in the order a trainer runs it:
//!
//! 1. [`load_examples`] reads JSON (an array) or JSON Lines in one of the [`Format`]s into
//!    [`Example`]s, skipping bad records and counting them by reason in a [`LoadReport`];
//! 2. [`split`] shuffles by seed and cuts train/validation/test (80/10/10 by default,
//!    [`DEFAULT_SPLIT`]);
//! 3. a [`Template`] (chosen by name, or by [`Template::auto`]) renders each example to text and
//!    [`tokenize`] turns it into ids with a loss mask ([`Tokenized`]);
//! 4. a [`Batcher`] cuts the tokenized examples into [`Batch`]es, padded by length group or packed,
//!    with shifted targets, and can be checkpointed and resumed ([`BatcherState`]).
//!
//! [`synth`] makes GSM8K-style arithmetic word problems and scores answers (`#### N`).
//!
//! What a trainer must know:
//!
//! - [`Batch::targets`] is already shifted: the cross-entropy at position `t` compares the logits
//!   computed at `t` with `targets[t]`, which is the id at `t + 1` when that token is in the loss
//!   and in the same example, else `IGNORE_INDEX` (-100). Never shift again. The loss is the sum
//!   over targets divided by [`Batch::n_targets`] (summed over micro-batches when accumulating).
//! - Attention must be causal *and* within a segment ([`Batch::segments`]); positions restart at 0
//!   for each packed example. Padding has a segment of its own and no targets.
//! - [`Tokenized::loss_mask`] marks tokens that are *predicted* (so index 0 is always false); a
//!   BPE merge across the prompt/response boundary makes [`tokenize`] fall back to tokenizing
//!   prompt and response separately (the generation-time tokenization of the prompt), counted
//!   in [`TokenizeReport::boundary_merges`].
//! - A [`Batcher`] rolls over to the next epoch right after an epoch's last batch; its
//!   [`BatcherState`] is all it takes to resume (the examples and options must be the same).

mod batch;
mod format;
mod split;
mod template;
mod tokenize;

pub mod synth;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

pub use batch::{Batch, BatchOptions, Batcher, BatcherState};
pub use format::{
    Example, ExampleKind, Format, LoadOptions, LoadReport, SkipCount, load_examples, load_examples_with, parse_buckets,
};
pub use split::{DEFAULT_SPLIT, split};
pub use template::{Rendered, Template};
pub use tokenize::{LossOn, TokenizeOptions, TokenizeReport, Tokenized, tokenize, tokenize_all};
