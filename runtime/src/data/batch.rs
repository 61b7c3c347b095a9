//! Batching tokenized examples for training: seeded shuffles, length-grouped dynamic padding or
//! packing, shifted targets, and a resumable position.
//!
//! An epoch's batches are a pure function of (examples, options, seed, epoch), so the batcher's
//! whole position is `(epoch, cursor, seed)`: restoring it replays exactly the batches an
//! uninterrupted run would have seen.

use gristmill_core::ops::cross_entropy::IGNORE_INDEX;
use gristmill_core::rng::{Rng, mix64};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

use super::split::{permutation, shuffle};
use super::tokenize::Tokenized;

/// How many batches' worth of examples are sorted by length together when grouping: wide enough
/// that batches are nearly uniform in length (little padding), narrow enough that which examples
/// meet in a batch still changes from epoch to epoch.
const GROUP_WINDOW: usize = 50;

/// Options of a [`Batcher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Rows per batch (the last batch of an epoch may have fewer).
    pub batch_size: usize,
    /// Pack several whole examples into each row of up to `max_len` tokens, instead of one
    /// example per row.
    pub packing: bool,
    /// Longest row, in tokens; longer examples are cut (tokenize with the same `max_len` so that
    /// nothing is cut here).
    pub max_len: usize,
    /// The seed of the shuffles.
    pub seed: u64,
    /// Without packing: batch examples of similar length together (within windows of
    /// 50 × `batch_size` shuffled examples) so that little padding is needed. Ignored when packing.
    pub group_by_length: bool,
}

impl BatchOptions {
    /// Padded, length-grouped batches (the default when not packing).
    pub fn new(batch_size: usize, max_len: usize, seed: u64) -> Self {
        BatchOptions { batch_size, packing: false, max_len, seed, group_by_length: true }
    }

    /// Packed batches.
    pub fn packed(batch_size: usize, max_len: usize, seed: u64) -> Self {
        BatchOptions { batch_size, packing: true, max_len, seed, group_by_length: false }
    }
}

/// One training batch. Every buffer is (B, T) row-major, padded to the longest row of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// B: rows.
    pub b: usize,
    /// T: tokens per row.
    pub t: usize,
    /// tokens: (B, T) input ids; padding is the pad id.
    pub tokens: Vec<u32>,
    /// targets: (B, T) the token to predict AT each position, already shifted: `targets[t] =
    /// tokens[t + 1]` when that token counts in the loss and belongs to the same example, else
    /// [`IGNORE_INDEX`]. The last token of each example, and all padding, is `IGNORE_INDEX`.
    pub targets: Vec<i64>,
    /// positions: (B, T) RoPE positions, restarting at 0 for each packed example; 0 on padding.
    pub positions: Vec<u32>,
    /// segments: (B, T) which example of its row a token belongs to (0, 1, ... in row order);
    /// padding gets its own id, one past the row's last example. Attention must stay within a
    /// segment (and be causal); padding attends to nothing that matters.
    pub segments: Vec<u32>,
    /// Positions whose target is not `IGNORE_INDEX` (the loss is a mean over these).
    pub n_targets: usize,
    /// Non-padding tokens.
    pub n_tokens: usize,
}

/// Where a [`Batcher`] is: enough to resume it exactly (store it in checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatcherState {
    /// The epoch in progress (from 0).
    pub epoch: u64,
    /// Batches of this epoch already handed out.
    pub cursor: usize,
    /// The seed of the shuffles.
    pub seed: u64,
}

/// Cuts tokenized examples into batches, epoch after epoch, forever: every example is in exactly
/// one batch of each epoch.
#[derive(Debug, Clone)]
pub struct Batcher {
    data: Vec<Tokenized>,
    pad_id: u32,
    opts: BatchOptions,
    epoch: u64,
    cursor: usize,
    /// The current epoch's batches: rows of example indices.
    plan: Vec<Vec<Vec<usize>>>,
}

impl Batcher {
    /// A batcher at the start of epoch 0. `pad_id` is the tokenizer's ([`crate::tokenizer::Tokenizer::pad_id`]);
    /// 0 when it has none (padding is never attended to nor a target, so its value does not matter
    /// beyond being a valid id).
    pub fn new(data: Vec<Tokenized>, pad_id: Option<u32>, opts: BatchOptions) -> Result<Self> {
        if data.is_empty() {
            return Err(Error::Invalid("no training examples to batch".into()));
        }
        if opts.batch_size == 0 {
            return Err(Error::Invalid("batch size 0: at least one row is needed".into()));
        }
        if opts.max_len < 2 {
            return Err(Error::Invalid(format!("max_len {}: at least 2 tokens are needed per row", opts.max_len)));
        }
        let mut data = data;
        for (i, ex) in data.iter_mut().enumerate() {
            if ex.ids.len() != ex.loss_mask.len() {
                return Err(Error::Invalid(format!(
                    "example {i}: {} ids but {} loss-mask entries",
                    ex.ids.len(),
                    ex.loss_mask.len()
                )));
            }
            ex.ids.truncate(opts.max_len);
            ex.loss_mask.truncate(opts.max_len);
        }
        let mut b = Batcher { data, pad_id: pad_id.unwrap_or(0), opts, epoch: 0, cursor: 0, plan: Vec::new() };
        b.plan = b.plan_epoch(opts.seed, 0);
        Ok(b)
    }

    /// The next batch. After an epoch's last batch the batcher moves on to the next epoch (with a
    /// new shuffle) at once: [`Batcher::epoch`] then already reads the next one.
    pub fn next_batch(&mut self) -> Batch {
        if self.cursor >= self.plan.len() {
            self.epoch += 1;
            self.cursor = 0;
            self.plan = self.plan_epoch(self.opts.seed, self.epoch);
        }
        let batch = self.build(self.cursor);
        self.cursor += 1;
        // Roll over now rather than on the next call, so that the state after an epoch's last
        // batch already reads "next epoch, batch 0".
        if self.cursor == self.plan.len() {
            self.epoch += 1;
            self.cursor = 0;
            self.plan = self.plan_epoch(self.opts.seed, self.epoch);
        }
        batch
    }

    /// The number of batches in the current epoch. Fixed for padded batching; with packing it
    /// can differ by one or two between epochs, as the shuffle changes how well rows fill.
    pub fn batches_per_epoch(&self) -> usize {
        self.plan.len()
    }

    /// The epoch in progress (from 0).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The number of examples.
    pub fn n_examples(&self) -> usize {
        self.data.len()
    }

    /// Where the batcher is.
    pub fn state(&self) -> BatcherState {
        BatcherState { epoch: self.epoch, cursor: self.cursor, seed: self.opts.seed }
    }

    /// Moves the batcher to `state` (taken from a batcher over the same examples and options):
    /// the batches that follow are those that followed when the state was taken.
    pub fn restore(&mut self, state: BatcherState) -> Result<()> {
        let plan = self.plan_epoch(state.seed, state.epoch);
        if state.cursor > plan.len() {
            return Err(Error::Invalid(format!(
                "batcher state: batch {} of epoch {}, which has only {} batches (did the data or the batch options \
                 change since the checkpoint?)",
                state.cursor,
                state.epoch,
                plan.len()
            )));
        }
        self.opts.seed = state.seed;
        self.epoch = state.epoch;
        self.cursor = state.cursor;
        self.plan = plan;
        Ok(())
    }

    /// The batches of `epoch`: a shuffle seeded by (seed, epoch), then grouping or packing.
    fn plan_epoch(&self, seed: u64, epoch: u64) -> Vec<Vec<Vec<usize>>> {
        // Mixing both through SplitMix keeps nearby seeds and epochs from giving related streams.
        let mut rng = Rng::new(mix64(seed) ^ mix64(epoch.wrapping_add(0x632B_E59B_D9B4_E019)));
        let order = permutation(self.data.len(), &mut rng);
        let bs = self.opts.batch_size;
        let len = |i: usize| self.data[i].len();
        if self.opts.packing {
            return self.pack(&order);
        }
        if !self.opts.group_by_length {
            return order.chunks(bs).map(|c| c.iter().map(|&i| vec![i]).collect()).collect();
        }
        let mut batches: Vec<Vec<Vec<usize>>> = Vec::with_capacity(self.data.len().div_ceil(bs));
        for window in order.chunks(GROUP_WINDOW * bs) {
            let mut w = window.to_vec();
            // Stable: equal lengths keep their shuffled order.
            w.sort_by_key(|&i| std::cmp::Reverse(len(i)));
            batches.extend(w.chunks(bs).map(|c| c.iter().map(|&i| vec![i]).collect()));
        }
        // Otherwise every window would start with its longest batch.
        shuffle(&mut batches, &mut rng);
        batches
    }

    /// Packs examples, in `order`, into batches of rows of at most `max_len` tokens: each example
    /// goes into the first row of the batch being filled that has room, or a new row; when the
    /// batch has all its rows and none has room, it is closed and a new one begun.
    fn pack(&self, order: &[usize]) -> Vec<Vec<Vec<usize>>> {
        let (bs, max_len) = (self.opts.batch_size, self.opts.max_len);
        let mut batches = Vec::new();
        let mut rows: Vec<Vec<usize>> = Vec::with_capacity(bs);
        let mut fill: Vec<usize> = Vec::with_capacity(bs);
        for &i in order {
            let n = self.data[i].len();
            if let Some(r) = fill.iter().position(|&f| f + n <= max_len) {
                rows[r].push(i);
                fill[r] += n;
                continue;
            }
            if rows.len() == bs {
                batches.push(std::mem::take(&mut rows));
                fill.clear();
            }
            rows.push(vec![i]);
            fill.push(n);
        }
        if !rows.is_empty() {
            batches.push(rows);
        }
        batches
    }

    /// Lays out batch `k` of the current plan.
    fn build(&self, k: usize) -> Batch {
        let rows: &[Vec<usize>] = self.plan.get(k).map_or(&[], Vec::as_slice);
        let b = rows.len();
        let t = rows.iter().map(|r| r.iter().map(|&i| self.data[i].len()).sum::<usize>()).max().unwrap_or(0);
        // tokens, targets, positions, segments: (B, T), initialised as padding.
        let mut tokens = vec![self.pad_id; b * t];
        let mut targets = vec![IGNORE_INDEX; b * t];
        let mut positions = vec![0u32; b * t];
        let mut segments = vec![0u32; b * t];
        let (mut n_targets, mut n_tokens) = (0, 0);
        for (r, row) in rows.iter().enumerate() {
            let mut off = r * t;
            for (s, &i) in row.iter().enumerate() {
                let ex = &self.data[i];
                let n = ex.len();
                for j in 0..n {
                    tokens[off + j] = ex.ids[j];
                    positions[off + j] = j as u32;
                    segments[off + j] = s as u32;
                    // The prediction made at j is of token j + 1, of this example only.
                    if j + 1 < n && ex.loss_mask[j + 1] {
                        targets[off + j] = i64::from(ex.ids[j + 1]);
                        n_targets += 1;
                    }
                }
                off += n;
                n_tokens += n;
            }
            segments[off..(r + 1) * t].fill(row.len() as u32);
        }
        Batch { b, t, tokens, targets, positions, segments, n_targets, n_tokens }
    }
}
