//! Scores of a generation evaluation beyond exact match: classification metrics when the reference
//! answers form a closed set of labels, and per-bucket scores with the robustness gap when the
//! examples carry a `bucket` (the paraphrase-bucket format).
//!
//! Conventions (scikit-learn's where it has one): a class's precision is 0 when nothing was
//! predicted as it, its recall 0 when it has no gold example, F1 0 when precision + recall is 0.
//! Macro averages are unweighted means over the classes; micro averages pool the counts. An output
//! that matches no label counts as a miss of its gold class and as a prediction of no class, so
//! micro precision can exceed micro recall.

use crate::textmetrics::bootstrap_stat_ci;
use serde::Serialize;
use std::collections::BTreeMap;

/// At most this many distinct reference answers make a closed label set (for `--task auto`).
pub const MAX_AUTO_LABELS: usize = 20;

/// A label or an output as labels are compared: lowercased, whitespace collapsed, ASCII
/// punctuation trimmed from both ends.
pub fn normalize_label(s: &str) -> String {
    let words: Vec<&str> = s.split_whitespace().collect();
    words.join(" ").to_lowercase().trim_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace()).to_string()
}

/// The sorted distinct labels of `references` when they form a closed set: 2 to
/// [`MAX_AUTO_LABELS`] distinct (normalised) answers, each used twice on average. `None` otherwise
/// (free-form answers such as GSM8K solutions are nearly all distinct).
pub fn closed_label_set(references: &[&str]) -> Option<Vec<String>> {
    let labels = label_set(references);
    let n_distinct = labels.len();
    ((2..=MAX_AUTO_LABELS).contains(&n_distinct) && references.len() >= 2 * n_distinct).then_some(labels)
}

/// The sorted distinct normalised labels of `references` (empty ones left out).
pub fn label_set(references: &[&str]) -> Vec<String> {
    let mut labels: Vec<String> = references.iter().map(|r| normalize_label(r)).filter(|l| !l.is_empty()).collect();
    labels.sort();
    labels.dedup();
    labels
}

/// The label an output names: the whole output when it is a label, else the label found earliest
/// in it as whole words (the longest one at that place, so "not entailment" beats "entailment").
pub fn match_label(output: &str, labels: &[String]) -> Option<usize> {
    let out = normalize_label(output);
    if let Some(i) = labels.iter().position(|l| *l == out) {
        return Some(i);
    }
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut best: Option<(usize, usize, usize)> = None; // (position, -len as tie break, index)
    for (i, l) in labels.iter().enumerate() {
        if l.is_empty() {
            continue;
        }
        let first = out
            .match_indices(l.as_str())
            .find(|(at, _)| !word(out[..*at].chars().next_back()) && !word(out[at + l.len()..].chars().next()));
        if let Some((at, _)) = first {
            let better = match best {
                None => true,
                Some((bat, blen, _)) => at < bat || (at == bat && l.len() > blen),
            };
            if better {
                best = Some((at, l.len(), i));
            }
        }
    }
    best.map(|b| b.2)
}

/// One class's scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Gold examples of this class.
    pub support: usize,
    /// Outputs predicted as this class.
    pub predicted: usize,
}

/// Precision, recall and F1 of one positive class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Classification metrics of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassMetrics {
    pub n: usize,
    pub accuracy: f64,
    pub per_class: Vec<ClassScore>,
    pub macro_avg: Prf,
    pub micro_avg: Prf,
    /// With exactly two labels: the scores of the positive one (named in `positive`).
    pub binary: Option<Prf>,
    pub positive: Option<String>,
    /// Outputs that named no label.
    pub unmatched: usize,
}

fn prf(tp: usize, predicted: usize, support: usize) -> Prf {
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (p, r) = (ratio(tp, predicted), ratio(tp, support));
    Prf { precision: p, recall: r, f1: if p + r == 0.0 { 0.0 } else { 2.0 * p * r / (p + r) } }
}

/// The positive class of a two-label task: a label that reads as "yes" (yes, true, positive, 1,
/// entailment, correct), else the second in sorted order.
pub fn positive_label(labels: &[String]) -> Option<usize> {
    if labels.len() != 2 {
        return None;
    }
    const POSITIVE: [&str; 6] = ["yes", "true", "positive", "1", "entailment", "correct"];
    Some(labels.iter().position(|l| POSITIVE.contains(&l.as_str())).unwrap_or(1))
}

/// Metrics of the examples `idx` (indices into `gold` and `pred`; repeats allowed, as in a bootstrap
/// resample). `gold[i]` is a label index, `pred[i]` the matched label if any.
pub fn classification_metrics_of(
    labels: &[String],
    gold: &[usize],
    pred: &[Option<usize>],
    idx: &[usize],
) -> ClassMetrics {
    let k = labels.len();
    let (mut tp, mut predicted, mut support) = (vec![0usize; k], vec![0usize; k], vec![0usize; k]);
    let mut unmatched = 0;
    for &i in idx {
        let g = gold[i];
        support[g] += 1;
        match pred[i] {
            Some(p) => {
                predicted[p] += 1;
                tp[p] += usize::from(p == g);
            }
            None => unmatched += 1,
        }
    }
    let per_class: Vec<ClassScore> = (0..k)
        .map(|c| {
            let s = prf(tp[c], predicted[c], support[c]);
            ClassScore {
                label: labels[c].clone(),
                precision: s.precision,
                recall: s.recall,
                f1: s.f1,
                support: support[c],
                predicted: predicted[c],
            }
        })
        .collect();
    let mean = |f: fn(&ClassScore) -> f64| if k == 0 { 0.0 } else { per_class.iter().map(f).sum::<f64>() / k as f64 };
    let macro_avg = Prf { precision: mean(|c| c.precision), recall: mean(|c| c.recall), f1: mean(|c| c.f1) };
    let total_tp: usize = tp.iter().sum();
    let micro_avg = prf(total_tp, predicted.iter().sum(), support.iter().sum());
    let pos = positive_label(labels);
    ClassMetrics {
        n: idx.len(),
        accuracy: if idx.is_empty() { 0.0 } else { total_tp as f64 / idx.len() as f64 },
        binary: pos.map(|p| prf(tp[p], predicted[p], support[p])),
        positive: pos.map(|p| labels[p].clone()),
        per_class,
        macro_avg,
        micro_avg,
        unmatched,
    }
}

/// A 95% percentile-bootstrap interval: (low, high).
pub type Ci = (f64, f64);

/// [`ClassMetrics`] of every example with 95% bootstrap intervals (1000 resamples, seed 0) of the
/// accuracy, macro F1, micro F1 and the binary F1.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassReport {
    #[serde(flatten)]
    pub metrics: ClassMetrics,
    pub accuracy_ci95: Ci,
    pub macro_f1_ci95: Ci,
    pub micro_f1_ci95: Ci,
    pub binary_f1_ci95: Option<Ci>,
}

/// Scores `pred` against `gold` over `labels`, with bootstrap intervals.
pub fn classification_report(labels: &[String], gold: &[usize], pred: &[Option<usize>]) -> ClassReport {
    let n = gold.len().min(pred.len());
    let all: Vec<usize> = (0..n).collect();
    let metrics = classification_metrics_of(labels, gold, pred, &all);
    let ci = |f: fn(&ClassMetrics) -> f64| {
        let (_, lo, hi) =
            bootstrap_stat_ci(n, 1000, 0, 0.95, |idx| f(&classification_metrics_of(labels, gold, pred, idx)));
        (lo, hi)
    };
    ClassReport {
        accuracy_ci95: ci(|m| m.accuracy),
        macro_f1_ci95: ci(|m| m.macro_avg.f1),
        micro_f1_ci95: ci(|m| m.micro_avg.f1),
        binary_f1_ci95: metrics.binary.map(|_| ci(|m| m.binary.map_or(0.0, |b| b.f1))),
        metrics,
    }
}

/// One bucket's score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BucketScore {
    pub bucket: String,
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// This bucket's accuracy minus the first bucket's.
    pub vs_first: f64,
}

/// Scores per bucket and the robustness gap.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BucketReport {
    /// In bucket order (numeric when every bucket is a number).
    pub buckets: Vec<BucketScore>,
    /// Highest minus lowest bucket accuracy.
    pub gap: f64,
    /// Examples without a bucket (left out of the table).
    pub unbucketed: usize,
}

/// Accuracy per bucket of `(bucket, correct)` pairs; `None` when no example has a bucket.
pub fn bucket_report(items: &[(Option<&str>, bool)]) -> Option<BucketReport> {
    let mut by: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut unbucketed = 0;
    for (b, ok) in items {
        match b {
            Some(b) => {
                let e = by.entry((*b).to_string()).or_default();
                e.0 += 1;
                e.1 += usize::from(*ok);
            }
            None => unbucketed += 1,
        }
    }
    if by.is_empty() {
        return None;
    }
    let mut rows: Vec<(String, usize, usize)> = by.into_iter().map(|(b, (n, c))| (b, n, c)).collect();
    if rows.iter().all(|r| r.0.parse::<f64>().is_ok()) {
        rows.sort_by(|a, b| a.0.parse::<f64>().unwrap_or(0.0).total_cmp(&b.0.parse::<f64>().unwrap_or(0.0)));
    }
    let acc = |n: usize, c: usize| c as f64 / n.max(1) as f64;
    let first = acc(rows[0].1, rows[0].2);
    let buckets: Vec<BucketScore> = rows
        .into_iter()
        .map(|(bucket, n, correct)| BucketScore {
            bucket,
            n,
            correct,
            accuracy: acc(n, correct),
            vs_first: acc(n, correct) - first,
        })
        .collect();
    let (lo, hi) =
        buckets.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), b| (lo.min(b.accuracy), hi.max(b.accuracy)));
    Some(BucketReport { buckets, gap: hi - lo, unbucketed })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    fn labels(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn label_sets_and_matching() {
        assert_eq!(normalize_label("  Positive.\n"), "positive");
        assert_eq!(normalize_label("Not   Entailment!"), "not entailment");
        let refs = ["positive", "Negative", "positive.", "negative", "neutral", "neutral"];
        assert_eq!(closed_label_set(&refs), Some(labels(&["negative", "neutral", "positive"])));
        // Every answer distinct: not a closed set; one label: not a classification.
        assert_eq!(closed_label_set(&["1", "2", "3", "4"]), None);
        assert_eq!(closed_label_set(&["yes", "yes", "yes"]), None);
        let many: Vec<String> = (0..21).flat_map(|i| [format!("l{i}"), format!("l{i}")]).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(closed_label_set(&many), None);

        let l = labels(&["entailment", "neutral", "not entailment"]);
        assert_eq!(match_label("Neutral", &l), Some(1));
        assert_eq!(match_label("The answer is: not entailment.", &l), Some(2));
        assert_eq!(match_label("entailment, not neutral", &l), Some(0));
        // Whole words only.
        assert_eq!(match_label("neutrality", &l), None);
        assert_eq!(match_label("", &l), None);
    }

    #[test]
    fn three_class_metrics_by_hand() {
        // labels a, b, c. gold: a a a b b c; pred: a a b b none c.
        let l = labels(&["a", "b", "c"]);
        let gold = [0, 0, 0, 1, 1, 2];
        let pred = [Some(0), Some(0), Some(1), Some(1), None, Some(2)];
        let r = classification_report(&l, &gold, &pred);
        let m = &r.metrics;
        close(m.accuracy, 4.0 / 6.0);
        assert_eq!(m.unmatched, 1);
        // a: tp 2, predicted 2, support 3 → p 1, r 2/3, f1 0.8.
        let a = &m.per_class[0];
        close(a.precision, 1.0);
        close(a.recall, 2.0 / 3.0);
        close(a.f1, 0.8);
        assert_eq!((a.support, a.predicted), (3, 2));
        // b: tp 1, predicted 2, support 2 → p 1/2, r 1/2, f1 1/2.
        close(m.per_class[1].f1, 0.5);
        // c: tp 1, predicted 1, support 1 → all 1.
        close(m.per_class[2].f1, 1.0);
        close(m.macro_avg.precision, (1.0 + 0.5 + 1.0) / 3.0);
        close(m.macro_avg.recall, (2.0 / 3.0 + 0.5 + 1.0) / 3.0);
        close(m.macro_avg.f1, (0.8 + 0.5 + 1.0) / 3.0);
        // Micro: tp 4 of 5 predictions, of 6 gold → p 0.8, r 2/3, f1 8/11.
        close(m.micro_avg.precision, 0.8);
        close(m.micro_avg.recall, 4.0 / 6.0);
        close(m.micro_avg.f1, 8.0 / 11.0);
        assert_eq!(m.binary, None);
        // The intervals hold the observed values and lie within [0, 1].
        for (v, (lo, hi)) in
            [(m.accuracy, r.accuracy_ci95), (m.macro_avg.f1, r.macro_f1_ci95), (m.micro_avg.f1, r.micro_f1_ci95)]
        {
            assert!(0.0 <= lo && lo <= v && v <= hi && hi <= 1.0, "{lo} {v} {hi}");
            assert!(hi > lo);
        }
    }

    #[test]
    fn binary_metrics_by_hand() {
        let l = labels(&["no", "yes"]);
        assert_eq!(positive_label(&l), Some(1));
        assert_eq!(positive_label(&labels(&["false", "true"])), Some(1));
        assert_eq!(positive_label(&labels(&["1", "0"])), Some(0));
        assert_eq!(positive_label(&labels(&["cat", "dog"])), Some(1));
        // gold: y y y n n; pred: y n y y n → tp 2, fp 1, fn 1 → p 2/3, r 2/3, f1 2/3.
        let gold = [1, 1, 1, 0, 0];
        let pred = [Some(1), Some(0), Some(1), Some(1), Some(0)];
        let r = classification_report(&l, &gold, &pred);
        let b = r.metrics.binary.unwrap();
        close(b.precision, 2.0 / 3.0);
        close(b.recall, 2.0 / 3.0);
        close(b.f1, 2.0 / 3.0);
        assert_eq!(r.metrics.positive.as_deref(), Some("yes"));
        close(r.metrics.accuracy, 0.6);
        // Every prediction a label: micro P = R = F1 = accuracy.
        close(r.metrics.micro_avg.f1, 0.6);
        let (lo, hi) = r.binary_f1_ci95.unwrap();
        assert!(lo <= b.f1 && b.f1 <= hi);
        // A class never predicted has precision 0, not NaN.
        let r = classification_report(&l, &gold, &[Some(1); 5]);
        assert_eq!(r.metrics.per_class[0].precision, 0.0);
        assert_eq!(r.metrics.per_class[0].predicted, 0);
    }

    #[test]
    fn buckets_and_gap_by_hand() {
        let items = [
            (Some("10"), true),
            (Some("2"), true),
            (Some("2"), false),
            (Some("1"), true),
            (Some("1"), true),
            (Some("10"), false),
            (Some("10"), false),
            (None, true),
        ];
        let r = bucket_report(&items).unwrap();
        // Numeric order: 1, 2, 10 (not "1", "10", "2").
        let names: Vec<&str> = r.buckets.iter().map(|b| b.bucket.as_str()).collect();
        assert_eq!(names, ["1", "2", "10"]);
        close(r.buckets[0].accuracy, 1.0);
        close(r.buckets[1].accuracy, 0.5);
        close(r.buckets[2].accuracy, 1.0 / 3.0);
        close(r.buckets[1].vs_first, -0.5);
        close(r.buckets[2].vs_first, -2.0 / 3.0);
        close(r.gap, 2.0 / 3.0);
        assert_eq!(r.unbucketed, 1);
        assert_eq!(bucket_report(&[(None, true)]), None);
        // Names that are not numbers keep their sorted order.
        let r = bucket_report(&[(Some("b"), true), (Some("a"), false)]).unwrap();
        assert_eq!(r.buckets[0].bucket, "a");
        close(r.gap, 1.0);
    }
}
