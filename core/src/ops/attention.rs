//! Causal grouped-query attention: the reference the flash-attention kernels are tested against.
//!
//! Layouts are those of the projections that feed attention, so no transpose is needed between
//! them: q and o are `(B, Tq, H, D)`, k and v are `(B, Tk, Hkv, D)`, lse is `(B, H, Tq)`.
//!
//! Query `i` sits at absolute position `Tk − Tq + i`: with `Tq == Tk` this is a training step,
//! with `Tq < Tk` it is decoding new tokens against a KV cache that already holds the earlier ones.
//! Query head `h` reads KV head `h / (H / Hkv)` (consecutive query heads share a KV head, as in
//! Llama's `repeat_kv`). A query at position `p` attends key `j` iff `j ≤ p` and, when segment ids
//! are given, `segments[b][j] == segments[b][p]`: packed examples never see each other, and padding
//! given a segment id of its own attends only to padding.
//!
//! The forward returns, besides `o`, `lse = log Σ_j exp(scale · q·k_j)` over the allowed keys. This
//! is the flash-attention convention: the backward rebuilds each probability as `exp(s − lse)`
//! instead of keeping the `Tq × Tk` matrix, which is exactly what the kernel must do.

use crate::error::{check_len, checked_product, invalid};
use crate::{Real, Result};
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// Dimensions of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Batch size B.
    pub b: usize,
    /// Number of queries Tq: the last Tq of the Tk positions.
    pub tq: usize,
    /// Number of keys and values Tk (the whole sequence, cache included).
    pub tk: usize,
    /// Query heads H.
    pub h: usize,
    /// Key/value heads Hkv; H must be a multiple of it.
    pub hkv: usize,
    /// Head dimension D.
    pub d: usize,
}

impl AttnShape {
    /// Checks the shape describes a well-formed call: no zero dimension, `H % Hkv == 0`,
    /// `Tq ≤ Tk`, and buffer sizes that fit in `usize`.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "attention";
        let dims = [("b", self.b), ("tq", self.tq), ("tk", self.tk), ("h", self.h), ("hkv", self.hkv), ("d", self.d)];
        for (what, n) in dims {
            if n == 0 {
                return Err(invalid(OP, what, "must be non-zero"));
            }
        }
        // Written without `%`/`is_multiple_of`: the latter is newer than the crate's MSRV.
        if self.h / self.hkv * self.hkv != self.h {
            return Err(invalid(
                OP,
                "hkv",
                format!("{} query heads cannot be split evenly over {} key/value heads", self.h, self.hkv),
            ));
        }
        if self.tq > self.tk {
            return Err(invalid(
                OP,
                "tq",
                format!(
                    "{} queries but only {} keys: queries must be the last tq of the tk positions",
                    self.tq, self.tk
                ),
            ));
        }
        self.q_len()?;
        self.kv_len()?;
        self.lse_len()?;
        checked_product(&[self.b, self.tk])?;
        Ok(())
    }

    /// Query heads per KV head, H / Hkv. Meaningful only for a validated shape.
    pub fn group(&self) -> usize {
        self.h / self.hkv.max(1)
    }

    /// Elements of q, o, dq and dO: B·Tq·H·D.
    pub fn q_len(&self) -> Result<usize> {
        checked_product(&[self.b, self.tq, self.h, self.d])
    }

    /// Elements of k, v, dk and dv: B·Tk·Hkv·D.
    pub fn kv_len(&self) -> Result<usize> {
        checked_product(&[self.b, self.tk, self.hkv, self.d])
    }

    /// Elements of lse: B·H·Tq.
    pub fn lse_len(&self) -> Result<usize> {
        checked_product(&[self.b, self.h, self.tq])
    }
}

/// Validates the shape and the lengths of the inputs both passes take.
fn check_inputs<T>(
    op: &'static str,
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &AttnShape,
    segments: Option<&[u32]>,
) -> Result<()> {
    shape.validate()?;
    check_len(op, "q", q.len(), shape.q_len()?)?;
    check_len(op, "k", k.len(), shape.kv_len()?)?;
    check_len(op, "v", v.len(), shape.kv_len()?)?;
    if let Some(seg) = segments {
        check_len(op, "segments", seg.len(), shape.b * shape.tk)?;
    }
    Ok(())
}

/// The keys the query at absolute position `pos` of batch row `b` may attend, in increasing order.
/// Never empty: a query always attends to its own position.
fn allowed_keys(segments: Option<&[u32]>, b: usize, tk: usize, pos: usize) -> impl Iterator<Item = usize> + '_ {
    (0..=pos).filter(move |&j| segments.is_none_or(|s| s[b * tk + j] == s[b * tk + pos]))
}

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

/// Forward pass of causal grouped-query attention; returns `(o, lse)`.
///
/// q: (B, Tq, H, D); k: (B, Tk, Hkv, D); v: (B, Tk, Hkv, D); segments: (B, Tk) when given.
/// o: (B, Tq, H, D); lse: (B, H, Tq), natural log of the softmax denominator of the scaled scores.
/// `scale` multiplies q·k before the softmax (usually 1/√D).
pub fn attention_fwd_ref<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &AttnShape,
    scale: T,
    segments: Option<&[u32]>,
) -> Result<(Vec<T>, Vec<T>)> {
    check_inputs("attention_fwd_ref", q, k, v, shape, segments)?;
    let AttnShape { b: nb, tq, tk, h: nh, hkv, d } = *shape;
    let group = shape.group();
    let mut o = vec![T::ZERO; q.len()];
    let mut lse = vec![T::ZERO; shape.lse_len()?];
    let mut scores = vec![T::ZERO; tk];

    for b in 0..nb {
        for hh in 0..nh {
            let g = hh / group;
            for i in 0..tq {
                let pos = tk - tq + i;
                let qo = ((b * tq + i) * nh + hh) * d;
                let qi = &q[qo..qo + d];
                let kv_row = |j: usize| ((b * tk + j) * hkv + g) * d;

                // Subtracting the row maximum keeps every exponent ≤ 0, so nothing overflows;
                // the own position is always allowed, so it is a valid starting maximum.
                let mut m = scale * dot(qi, &k[kv_row(pos)..kv_row(pos) + d]);
                for j in allowed_keys(segments, b, tk, pos) {
                    let s = scale * dot(qi, &k[kv_row(j)..kv_row(j) + d]);
                    scores[j] = s;
                    m = m.max(s);
                }
                let sum: T = allowed_keys(segments, b, tk, pos).map(|j| (scores[j] - m).exp()).sum();
                let l = m + sum.ln();
                lse[(b * nh + hh) * tq + i] = l;

                // Normalising through lse (not through `sum`) is what the backward and the
                // kernel do; it keeps forward and backward probabilities identical.
                let oi = &mut o[qo..qo + d];
                for j in allowed_keys(segments, b, tk, pos) {
                    let p = (scores[j] - l).exp();
                    for (oe, &ve) in oi.iter_mut().zip(&v[kv_row(j)..kv_row(j) + d]) {
                        *oe += p * ve;
                    }
                }
            }
        }
    }
    Ok((o, lse))
}

/// Backward pass of causal grouped-query attention; returns `(dq, dk, dv)`.
///
/// q: (B, Tq, H, D); k: (B, Tk, Hkv, D); v: (B, Tk, Hkv, D); o: (B, Tq, H, D) and
/// lse: (B, H, Tq) from the forward; d_o: (B, Tq, H, D); segments: (B, Tk) when given.
/// dq: (B, Tq, H, D); dk: (B, Tk, Hkv, D); dv: (B, Tk, Hkv, D). `scale` and `segments` must be the
/// forward's.
///
/// With P = softmax(S), S = scale·QKᵀ: dV = Pᵀ dO, dP = dO Vᵀ, dS = P∘(dP − Di) where
/// Di = Σ_j P_ij dP_ij = rowsum(dO∘O), dQ = scale·dS K, dK = scale·dSᵀ Q. A KV head receives the sum
/// over the query heads of its group, since each of them read it.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_ref<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    d_o: &[T],
    shape: &AttnShape,
    scale: T,
    segments: Option<&[u32]>,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    const OP: &str = "attention_bwd_ref";
    check_inputs(OP, q, k, v, shape, segments)?;
    check_len(OP, "o", o.len(), shape.q_len()?)?;
    check_len(OP, "lse", lse.len(), shape.lse_len()?)?;
    check_len(OP, "d_o", d_o.len(), shape.q_len()?)?;
    let AttnShape { b: nb, tq, tk, h: nh, hkv, d } = *shape;
    let group = shape.group();
    let mut dq = vec![T::ZERO; q.len()];
    let mut dk = vec![T::ZERO; k.len()];
    let mut dv = vec![T::ZERO; v.len()];

    for b in 0..nb {
        for hh in 0..nh {
            let g = hh / group;
            for i in 0..tq {
                let pos = tk - tq + i;
                let qo = ((b * tq + i) * nh + hh) * d;
                let qi = &q[qo..qo + d];
                let doi = &d_o[qo..qo + d];
                // Σ_j P_ij dP_ij equals dO_i·O_i because O_i = Σ_j P_ij V_j: one dot product of
                // length D instead of a pass over the row, the trick flash attention relies on.
                let di = dot(doi, &o[qo..qo + d]);
                let l = lse[(b * nh + hh) * tq + i];
                for j in allowed_keys(segments, b, tk, pos) {
                    let ko = ((b * tk + j) * hkv + g) * d;
                    let kj = &k[ko..ko + d];
                    let vj = &v[ko..ko + d];
                    let p = (scale * dot(qi, kj) - l).exp();
                    let dp = dot(doi, vj);
                    let ds = p * (dp - di);
                    for e in 0..d {
                        dq[qo + e] += scale * ds * kj[e];
                        dk[ko + e] += scale * ds * qi[e];
                        dv[ko + e] += p * doi[e];
                    }
                }
            }
        }
    }
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, dot as dot64, numeric_grad, randn};

    fn shape(b: usize, tq: usize, tk: usize, h: usize, hkv: usize, d: usize) -> AttnShape {
        AttnShape { b, tq, tk, h, hkv, d }
    }

    #[test]
    fn forward_hand_case_training_d1() {
        // B = 1, H = Hkv = 1, D = 1, Tq = Tk = 2, scale = 1.
        // q = [5, 1], k = [0, ln 3], v = [2, 6].
        // Query 0 (position 0) sees key 0 only: s = 5·0 = 0, lse = 0, o = v0 = 2.
        // Query 1 sees keys 0, 1: s = [1·0, 1·ln 3] = [0, ln 3]; Σ exp = 1 + 3 = 4, lse = ln 4;
        // P = [1/4, 3/4]; o = 2/4 + 3·6/4 = 0.5 + 4.5 = 5.
        let ln3 = 3f64.ln();
        let (o, lse) =
            attention_fwd_ref(&[5.0, 1.0], &[0.0, ln3], &[2.0, 6.0], &shape(1, 2, 2, 1, 1, 1), 1.0, None).unwrap();
        assert_close("o", &o, &[2.0, 5.0], 1e-14);
        assert_close("lse", &lse, &[0.0, 4f64.ln()], 1e-14);

        // Segments [0, 1]: query 1 may no longer see key 0, so s = [ln 3], lse = ln 3, o = v1 = 6;
        // query 0 is unchanged.
        let (o, lse) =
            attention_fwd_ref(&[5.0, 1.0], &[0.0, ln3], &[2.0, 6.0], &shape(1, 2, 2, 1, 1, 1), 1.0, Some(&[0, 1]))
                .unwrap();
        assert_close("o (segments)", &o, &[2.0, 6.0], 1e-14);
        assert_close("lse (segments)", &lse, &[0.0, ln3], 1e-14);
    }

    #[test]
    fn forward_hand_case_decode_d2() {
        // B = 1, H = Hkv = 1, D = 2, Tq = 1, Tk = 2, scale = 0.5. The single query sits at
        // position Tk − Tq + 0 = 1, so it sees both cached keys.
        // q = [2, 0]; k0 = [0, 1], k1 = [ln 3, 5] (the second component meets q's 0 and is ignored).
        // s0 = 0.5·(2·0 + 0·1) = 0, s1 = 0.5·(2 ln 3 + 0·5) = ln 3; lse = ln(1 + 3) = ln 4;
        // P = [1/4, 3/4]; v0 = [1, 0], v1 = [0, 1] → o = [1/4, 3/4].
        let ln3 = 3f64.ln();
        let (o, lse) = attention_fwd_ref(
            &[2.0, 0.0],
            &[0.0, 1.0, ln3, 5.0],
            &[1.0, 0.0, 0.0, 1.0],
            &shape(1, 1, 2, 1, 1, 2),
            0.5,
            None,
        )
        .unwrap();
        assert_close("o", &o, &[0.25, 0.75], 1e-14);
        assert_close("lse", &lse, &[4f64.ln()], 1e-14);
    }

    /// Checks dq, dk, dv against central differences of L = <o, w>.
    fn grad_check(s: AttnShape, segments: Option<&[u32]>, seed: u64) {
        let mut rng = Rng::new(seed);
        let q = randn(&mut rng, s.q_len().unwrap(), 0.8);
        let k = randn(&mut rng, s.kv_len().unwrap(), 0.8);
        let v = randn(&mut rng, s.kv_len().unwrap(), 1.0);
        let w = randn(&mut rng, s.q_len().unwrap(), 1.0);
        let scale = 1.0 / (s.d as f64).sqrt();

        let (o, lse) = attention_fwd_ref(&q, &k, &v, &s, scale, segments).unwrap();
        let (dq, dk, dv) = attention_bwd_ref(&q, &k, &v, &o, &lse, &w, &s, scale, segments).unwrap();

        let loss =
            |q: &[f64], k: &[f64], v: &[f64]| dot64(&attention_fwd_ref(q, k, v, &s, scale, segments).unwrap().0, &w);
        let h = 1e-6;
        assert_close("dq", &dq, &numeric_grad(&q, h, |x| loss(x, &k, &v)), 1e-6);
        assert_close("dk", &dk, &numeric_grad(&k, h, |x| loss(&q, x, &v)), 1e-6);
        assert_close("dv", &dv, &numeric_grad(&v, h, |x| loss(&q, &k, x)), 1e-6);
    }

    #[test]
    fn gradients_mha_ratio_1() {
        grad_check(shape(2, 4, 4, 2, 2, 3), None, 1);
    }

    #[test]
    fn gradients_gqa_ratio_3() {
        grad_check(shape(1, 5, 5, 6, 2, 5), None, 2);
    }

    #[test]
    fn gradients_gqa_ratio_4() {
        grad_check(shape(2, 3, 3, 4, 1, 6), None, 3);
    }

    #[test]
    fn gradients_single_token() {
        // T = 1: the softmax has one entry, P = 1, so dq and dk are exactly zero.
        grad_check(shape(2, 1, 1, 3, 1, 3), None, 4);
    }

    #[test]
    fn gradients_decode_against_cache() {
        grad_check(shape(2, 2, 7, 4, 2, 3), None, 5);
        grad_check(shape(1, 1, 5, 3, 3, 7), None, 6);
    }

    #[test]
    fn gradients_packed_segments() {
        // Row 0 packs three examples; row 1 has two and ends in padding with a segment of its own.
        let seg = [0, 0, 1, 1, 1, 2, 5, 5, 5, 9, 9, 9];
        grad_check(shape(2, 6, 6, 4, 2, 3), Some(&seg), 7);
        // Decoding with segments: only the last three positions query.
        grad_check(shape(2, 3, 6, 3, 1, 5), Some(&seg), 8);
    }

    #[test]
    fn packed_segments_match_separate_sequences() {
        let s = shape(2, 7, 7, 4, 2, 3);
        let seg: [u32; 14] = [0, 0, 0, 1, 1, 2, 2, 4, 4, 4, 4, 4, 7, 7];
        let mut rng = Rng::new(11);
        let q = randn(&mut rng, s.q_len().unwrap(), 1.0);
        let k = randn(&mut rng, s.kv_len().unwrap(), 1.0);
        let v = randn(&mut rng, s.kv_len().unwrap(), 1.0);
        let scale = 0.6;
        let (o, lse) = attention_fwd_ref(&q, &k, &v, &s, scale, Some(&seg)).unwrap();

        let (qrow, kvrow) = (s.h * s.d, s.hkv * s.d);
        for b in 0..s.b {
            let mut start = 0;
            while start < s.tk {
                let mut end = start + 1;
                while end < s.tk && seg[b * s.tk + end] == seg[b * s.tk + start] {
                    end += 1;
                }
                // The segment alone, as its own batch of one starting at position 0.
                let t = end - start;
                let sub = shape(1, t, t, s.h, s.hkv, s.d);
                let at = |x: &[f64], row: usize| x[(b * s.tk + start) * row..(b * s.tk + end) * row].to_vec();
                let (o1, lse1) =
                    attention_fwd_ref(&at(&q, qrow), &at(&k, kvrow), &at(&v, kvrow), &sub, scale, None).unwrap();
                assert_close("o of segment", &at(&o, qrow), &o1, 1e-13);
                for hh in 0..s.h {
                    let packed = &lse[(b * s.h + hh) * s.tq + start..(b * s.h + hh) * s.tq + end];
                    assert_close("lse of segment", packed, &lse1[hh * t..(hh + 1) * t], 1e-13);
                }
                start = end;
            }
        }
    }

    #[test]
    fn gqa_equals_mha_with_repeated_kv() {
        // H = 6, Hkv = 2: query heads 0..3 read KV head 0 and 3..6 read KV head 1 (h / group,
        // not h % Hkv). Repeating each KV head per query head must give the same o, and dk/dv of
        // the grouped call must be the sums of the repeated call's over each group.
        let g = shape(2, 3, 5, 6, 2, 4);
        let m = AttnShape { hkv: 6, ..g };
        let mut rng = Rng::new(12);
        let q = randn(&mut rng, g.q_len().unwrap(), 1.0);
        let k = randn(&mut rng, g.kv_len().unwrap(), 1.0);
        let v = randn(&mut rng, g.kv_len().unwrap(), 1.0);
        let d_o = randn(&mut rng, g.q_len().unwrap(), 1.0);
        let repeat = |x: &[f64]| -> Vec<f64> {
            let mut out = Vec::new();
            for row in x.chunks(g.hkv * g.d) {
                for hh in 0..g.h {
                    let kv = hh / g.group();
                    out.extend_from_slice(&row[kv * g.d..(kv + 1) * g.d]);
                }
            }
            out
        };
        let (kr, vr) = (repeat(&k), repeat(&v));
        let (o, lse) = attention_fwd_ref(&q, &k, &v, &g, 0.5, None).unwrap();
        let (or, lser) = attention_fwd_ref(&q, &kr, &vr, &m, 0.5, None).unwrap();
        assert_close("o", &o, &or, 1e-13);
        assert_close("lse", &lse, &lser, 1e-13);

        let (dq, dk, dv) = attention_bwd_ref(&q, &k, &v, &o, &lse, &d_o, &g, 0.5, None).unwrap();
        let (dqr, dkr, dvr) = attention_bwd_ref(&q, &kr, &vr, &or, &lser, &d_o, &m, 0.5, None).unwrap();
        assert_close("dq", &dq, &dqr, 1e-13);
        let reduce = |x: &[f64]| -> Vec<f64> {
            let mut out = vec![0.0; k.len()];
            for (r, row) in x.chunks(g.h * g.d).enumerate() {
                for hh in 0..g.h {
                    let kv = hh / g.group();
                    for e in 0..g.d {
                        out[(r * g.hkv + kv) * g.d + e] += row[hh * g.d + e];
                    }
                }
            }
            out
        };
        assert_close("dk", &dk, &reduce(&dkr), 1e-13);
        assert_close("dv", &dv, &reduce(&dvr), 1e-13);
    }

    #[test]
    fn large_scores_stay_finite() {
        // Scores around ±2000 overflow a naive exp in f32 and f64 alike.
        let s = shape(1, 3, 3, 1, 1, 2);
        let q = [30.0f32, 30.0, -30.0, 20.0, 25.0, -30.0];
        let k = [40.0f32, 40.0, -35.0, 30.0, 35.0, -40.0];
        let v = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let (o, lse) = attention_fwd_ref(&q, &k, &v, &s, 1.0, None).unwrap();
        assert!(o.iter().chain(&lse).all(|x| x.is_finite()), "o {o:?} lse {lse:?}");
        // Query 0 sees only key 0: o0 = v0 exactly.
        assert_eq!(&o[0..2], &[1.0, 2.0]);
        let (dq, dk, dv) = attention_bwd_ref(&q, &k, &v, &o, &lse, &v, &s, 1.0, None).unwrap();
        assert!(dq.iter().chain(&dk).chain(&dv).all(|x| x.is_finite()));
    }

    #[test]
    fn f32_agrees_with_f64() {
        let s = shape(2, 3, 5, 4, 2, 5);
        let mut rng = Rng::new(13);
        let q = randn(&mut rng, s.q_len().unwrap(), 1.0);
        let k = randn(&mut rng, s.kv_len().unwrap(), 1.0);
        let v = randn(&mut rng, s.kv_len().unwrap(), 1.0);
        let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
        let (o64, _) = attention_fwd_ref(&q, &k, &v, &s, 0.4, None).unwrap();
        let (o32, _) = attention_fwd_ref(&f(&q), &f(&k), &f(&v), &s, 0.4f32, None).unwrap();
        let o32: Vec<f64> = o32.iter().map(|&x| x as f64).collect();
        assert_close("o f32", &o32, &o64, 1e-5);
    }

    #[test]
    fn invalid_shapes_are_errors() {
        for bad in [
            shape(0, 1, 1, 1, 1, 1),
            shape(1, 0, 1, 1, 1, 1),
            shape(1, 1, 0, 1, 1, 1),
            shape(1, 1, 1, 0, 1, 1),
            shape(1, 1, 1, 1, 0, 1),
            shape(1, 1, 1, 1, 1, 0),
            shape(1, 1, 1, 4, 3, 1),
            shape(1, 3, 2, 1, 1, 1),
            shape(usize::MAX, 2, 2, 2, 1, 2),
        ] {
            assert!(bad.validate().is_err(), "{bad:?} accepted");
        }
        assert!(shape(2, 3, 5, 6, 3, 7).validate().is_ok());
        // An invalid shape is refused before any buffer is touched.
        assert!(attention_fwd_ref::<f64>(&[], &[], &[], &shape(1, 1, 1, 4, 3, 1), 1.0, None).is_err());
    }

    #[test]
    fn bad_lengths_are_errors() {
        let s = shape(2, 2, 3, 2, 1, 2);
        let (nq, nkv, nl) = (s.q_len().unwrap(), s.kv_len().unwrap(), s.lse_len().unwrap());
        let (q, k, v) = (vec![0.1; nq], vec![0.2; nkv], vec![0.3; nkv]);
        let seg = vec![0u32; 6];
        let is_shape = |r: Result<(Vec<f64>, Vec<f64>)>, what: &str| {
            assert!(matches!(r, Err(Error::Shape { what: w, .. }) if w == what), "{what}");
        };
        is_shape(attention_fwd_ref(&q[1..], &k, &v, &s, 1.0, None), "q");
        is_shape(attention_fwd_ref(&q, &k[1..], &v, &s, 1.0, None), "k");
        is_shape(attention_fwd_ref(&q, &k, &[0.0; 1], &s, 1.0, None), "v");
        is_shape(attention_fwd_ref(&q, &k, &v, &s, 1.0, Some(&seg[1..])), "segments");

        let (o, lse) = attention_fwd_ref(&q, &k, &v, &s, 1.0, Some(&seg)).unwrap();
        let d_o = vec![1.0; nq];
        assert!(attention_bwd_ref(&q, &k, &v, &o, &lse, &d_o, &s, 1.0, Some(&seg)).is_ok());
        assert!(attention_bwd_ref(&q[1..], &k, &v, &o, &lse, &d_o, &s, 1.0, None).is_err());
        assert!(attention_bwd_ref(&q, &k, &v[1..], &o, &lse, &d_o, &s, 1.0, None).is_err());
        assert!(attention_bwd_ref(&q, &k, &v, &o[1..], &lse, &d_o, &s, 1.0, None).is_err());
        assert!(attention_bwd_ref(&q, &k, &v, &o, &lse[..nl - 1], &d_o, &s, 1.0, None).is_err());
        assert!(attention_bwd_ref(&q, &k, &v, &o, &lse, &d_o[1..], &s, 1.0, None).is_err());
        assert!(attention_bwd_ref(&q, &k, &v, &o, &lse, &d_o, &s, 1.0, Some(&seg[..5])).is_err());
    }
}
