//! Train/validation/test splits.

use gristmill_core::rng::Rng;

/// The split a trainer uses when no validation file is given: 80% train, 10% validation, 10%
/// test.
pub const DEFAULT_SPLIT: [f64; 3] = [0.8, 0.1, 0.1];

/// Shuffles `items` with `seed` and cuts them into (train, validation, test) in the proportions
/// of `ratios` (normalised by their sum; a negative or non-finite ratio counts as 0, and all zero
/// puts everything in train). The validation and test sizes are rounded to the nearest item and
/// train gets the rest, so every item lands in exactly one part. The same items, ratios and seed
/// always give the same split.
pub fn split<T>(items: Vec<T>, ratios: [f64; 3], seed: u64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let n = items.len();
    let r = ratios.map(|x| if x.is_finite() && x > 0.0 { x } else { 0.0 });
    let sum: f64 = r.iter().sum();
    let count = |x: f64| if sum > 0.0 { ((x / sum) * n as f64).round() as usize } else { 0 };
    let n_val = count(r[1]).min(n);
    let n_test = count(r[2]).min(n - n_val);
    let n_train = n - n_val - n_test;

    let mut items: Vec<Option<T>> = items.into_iter().map(Some).collect();
    let order = permutation(n, &mut Rng::new(seed));
    let mut take =
        |range: std::ops::Range<usize>| -> Vec<T> { order[range].iter().filter_map(|&i| items[i].take()).collect() };
    let train = take(0..n_train);
    let val = take(n_train..n_train + n_val);
    let test = take(n_train + n_val..n);
    (train, val, test)
}

/// A uniformly random permutation of `0..n` (Fisher–Yates).
pub(crate) fn permutation(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    shuffle(&mut p, rng);
    p
}

/// Shuffles in place (Fisher–Yates).
pub(crate) fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}
