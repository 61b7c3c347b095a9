//! Rotary position embedding in the Hugging Face "rotate half" layout, with Llama-3 scaling.
//!
//! Dimension `i < D/2` of a head is paired with dimension `i + D/2` (not with `2i + 1` as in the
//! original Meta layout): HF checkpoints permute the q/k projections so that this pairing is the
//! right one, and gristmill loads HF checkpoints.
//!
//! Frequencies, angles and cos/sin are computed in f32, in the same order of operations as
//! transformers, so that tables agree with the reference to the last bit or two. Large positions
//! make angles of thousands of radians; doing them in f64 here would be "more accurate" but would
//! disagree with the model as it was trained.

use crate::error::{check_len, checked_product, invalid};
use crate::{Real, Result};
use alloc::vec::Vec;
use core::cmp::Ordering;

/// How the rotary frequencies are rescaled to extend the context (HF `rope_scaling`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor` (HF `"linear"`).
    Linear { factor: f32 },
    /// Llama 3.1 scaling (HF `"llama3"`): low frequencies divided by `factor`, high frequencies
    /// kept, and a smooth blend of the two in between.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
}

/// Rotary embedding parameters of a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// Base of the frequencies (HF `rope_theta`), e.g. 500000 for Llama 3.
    pub theta: f32,
    /// Head dimension D; must be even.
    pub head_dim: usize,
    pub scaling: RopeScaling,
}

/// Per-token cos/sin tables.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTables {
    /// D/2: the number of rotated pairs per head.
    pub half: usize,
    /// cos: (N, D/2)
    pub cos: Vec<f32>,
    /// sin: (N, D/2)
    pub sin: Vec<f32>,
}

fn check_factor(what: &'static str, f: f32) -> Result<()> {
    if f.is_finite() && f > 0.0 {
        Ok(())
    } else {
        Err(invalid("rope_inv_freq", what, alloc::format!("must be finite and positive, got {f}")))
    }
}

/// Inverse frequencies of the rotary pairs.
///
/// returns inv_freq: (D/2)
///
/// inv_freq[i] = 1 / theta^(2i/D), then rescaled by `cfg.scaling`; see [`RopeScaling`].
pub fn rope_inv_freq(cfg: &RopeConfig) -> Result<Vec<f32>> {
    const OP: &str = "rope_inv_freq";
    let d = cfg.head_dim;
    if d == 0 || d % 2 == 1 {
        return Err(invalid(OP, "head_dim", alloc::format!("must be even and non-zero, got {d}")));
    }
    check_factor("theta", cfg.theta)?;
    // transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all float32.
    let base: Vec<f32> = (0..d / 2).map(|i| 1.0 / libm::powf(cfg.theta, (2 * i) as f32 / d as f32)).collect();
    match cfg.scaling {
        RopeScaling::None => Ok(base),
        RopeScaling::Linear { factor } => {
            check_factor("factor", factor)?;
            Ok(base.into_iter().map(|f| f / factor).collect())
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            check_factor("factor", factor)?;
            check_factor("low_freq_factor", low_freq_factor)?;
            check_factor("high_freq_factor", high_freq_factor)?;
            // The blend divides by their difference; HF only warns here, we refuse.
            if high_freq_factor <= low_freq_factor {
                return Err(invalid(
                    OP,
                    "high_freq_factor",
                    alloc::format!("must exceed low_freq_factor ({high_freq_factor} <= {low_freq_factor})"),
                ));
            }
            if original_max_position_embeddings == 0 {
                return Err(invalid(OP, "original_max_position_embeddings", "must be non-zero"));
            }
            let orig = original_max_position_embeddings as f32;
            let low_freq_wavelen = orig / low_freq_factor;
            let high_freq_wavelen = orig / high_freq_factor;
            let span = high_freq_factor - low_freq_factor;
            Ok(base
                .into_iter()
                .map(|inv| {
                    let wavelen = core::f32::consts::TAU / inv;
                    let llama = if wavelen > low_freq_wavelen { inv / factor } else { inv };
                    let smooth = (orig / wavelen - low_freq_factor) / span;
                    let smoothed = (1.0 - smooth) * llama / factor + smooth * llama;
                    // transformers writes `~(wavelen < high) * ~(wavelen > low)`: negated
                    // comparisons, so an incomparable (NaN) wavelength counts as medium there too.
                    let medium = wavelen.partial_cmp(&high_freq_wavelen) != Some(Ordering::Less)
                        && wavelen.partial_cmp(&low_freq_wavelen) != Some(Ordering::Greater);
                    if medium { smoothed } else { llama }
                })
                .collect())
        }
    }
}

/// cos/sin tables for the given per-token positions.
///
/// positions: (N); packed sequences restart at 0 at each document boundary
/// returns cos, sin: (N, D/2)
pub fn rope_tables(cfg: &RopeConfig, positions: &[u32]) -> Result<RopeTables> {
    let inv_freq = rope_inv_freq(cfg)?;
    let half = inv_freq.len();
    let len = checked_product(&[positions.len(), half])?;
    let mut cos = Vec::with_capacity(len);
    let mut sin = Vec::with_capacity(len);
    for &p in positions {
        // transformers forms the angle as an f32 outer product of positions and inv_freq.
        let pf = p as f32;
        for &f in &inv_freq {
            let a = pf * f;
            cos.push(libm::cosf(a));
            sin.push(libm::sinf(a));
        }
    }
    Ok(RopeTables { half, cos, sin })
}

/// Checks a table set against (N, H, D) and returns D/2.
fn check_tables(op: &'static str, t: &RopeTables, n: usize, d: usize) -> Result<usize> {
    if d == 0 || d % 2 == 1 {
        return Err(invalid(op, "d", alloc::format!("head dimension must be even and non-zero, got {d}")));
    }
    let half = d / 2;
    check_len(op, "tables.half", t.half, half)?;
    let len = checked_product(&[n, half])?;
    check_len(op, "tables.cos", t.cos.len(), len)?;
    check_len(op, "tables.sin", t.sin.len(), len)?;
    Ok(half)
}

/// Rotates every (i, i + D/2) pair of every head by the angle of its token, `sign` = 1 for the
/// rotation and -1 for its transpose (the inverse, as the rotation is orthogonal).
fn rotate<T: Real>(op: &'static str, x: &[T], t: &RopeTables, n: usize, h: usize, d: usize, sign: T) -> Result<Vec<T>> {
    let half = check_tables(op, t, n, d)?;
    check_len(op, "x", x.len(), checked_product(&[n, h, d])?)?;
    let mut y = alloc::vec![T::ZERO; x.len()];
    for tok in 0..n {
        let cs = &t.cos[tok * half..(tok + 1) * half];
        let sn = &t.sin[tok * half..(tok + 1) * half];
        for head in 0..h {
            let base = (tok * h + head) * d;
            let (xs, ys) = (&x[base..base + d], &mut y[base..base + d]);
            for i in 0..half {
                let (c, s) = (T::from_f32(cs[i]), sign * T::from_f32(sn[i]));
                let (x1, x2) = (xs[i], xs[i + half]);
                ys[i] = x1 * c - x2 * s;
                ys[i + half] = x2 * c + x1 * s;
            }
        }
    }
    Ok(y)
}

/// Forward RoPE: for i < D/2, y[i] = x[i]·cos − x[i+D/2]·sin, y[i+D/2] = x[i+D/2]·cos + x[i]·sin.
///
/// x: (N, H, D)
/// tables: cos, sin (N, D/2)
/// returns y: (N, H, D)
pub fn rope_fwd_ref<T: Real>(x: &[T], tables: &RopeTables, n: usize, h: usize, d: usize) -> Result<Vec<T>> {
    rotate("rope_fwd_ref", x, tables, n, h, d, T::ONE)
}

/// Backward RoPE: the transposed rotation, dx[i] = dy[i]·cos + dy[i+D/2]·sin,
/// dx[i+D/2] = dy[i+D/2]·cos − dy[i]·sin.
///
/// dy: (N, H, D)
/// tables: cos, sin (N, D/2)
/// returns dx: (N, H, D)
pub fn rope_bwd_ref<T: Real>(dy: &[T], tables: &RopeTables, n: usize, h: usize, d: usize) -> Result<Vec<T>> {
    rotate("rope_bwd_ref", dy, tables, n, h, d, -T::ONE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, dot, numeric_grad, randn};

    const LLAMA31: RopeConfig = RopeConfig {
        theta: 500000.0,
        head_dim: 128,
        scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        },
    };

    fn rel(a: f32, b: f64) -> f64 {
        (a as f64 - b).abs() / b.abs()
    }

    #[test]
    fn hand_computed_rotation() {
        // D = 4: pairs (x0, x2) and (x1, x3). Pair 0 turns by the angle with cos 0.6, sin 0.8;
        // pair 1 by 90° (cos 0, sin 1). x = [1, 2, 3, 4]:
        // y0 = 1·0.6 − 3·0.8 = −1.8, y2 = 3·0.6 + 1·0.8 = 2.6
        // y1 = 2·0 − 4·1 = −4,      y3 = 4·0 + 2·1 = 2
        let t = RopeTables { half: 2, cos: alloc::vec![0.6, 0.0], sin: alloc::vec![0.8, 1.0] };
        let y = rope_fwd_ref(&[1.0f64, 2.0, 3.0, 4.0], &t, 1, 1, 4).unwrap();
        // 0.6 and 0.8 are rounded to f32 in the table, hence the loose tolerance.
        assert_close("y", &y, &[-1.8, -4.0, 2.6, 2.0], 1e-7);
        // The backward undoes it.
        let x = rope_bwd_ref(&y, &t, 1, 1, 4).unwrap();
        assert_close("x", &x, &[1.0, 2.0, 3.0, 4.0], 1e-7);
    }

    #[test]
    fn hand_computed_tables() {
        // theta 10000, D 4: inv_freq = [1, 10000^(-1/2)] = [1, 0.01].
        // Position 2: cos(2) = −0.4161468365, sin(2) = 0.9092974268,
        //             cos(0.02) = 0.9998000067, sin(0.02) = 0.0199986667.
        // Packed positions [0, 2, 0]: rows 0 and 2 are the identity rotation.
        let cfg = RopeConfig { theta: 10000.0, head_dim: 4, scaling: RopeScaling::None };
        let t = rope_tables(&cfg, &[0, 2, 0]).unwrap();
        assert_eq!(t.half, 2);
        assert_eq!(&t.cos[0..2], &[1.0, 1.0]);
        assert_eq!(&t.sin[0..2], &[0.0, 0.0]);
        assert_eq!(t.cos[0..2], t.cos[4..6]);
        let want_cos = [-0.4161468365471424, 0.9998000066665778];
        let want_sin = [0.9092974268256817, 0.01999866669333308];
        for i in 0..2 {
            assert!(rel(t.cos[2 + i], want_cos[i]) < 1e-6, "cos {i}: {}", t.cos[2 + i]);
            assert!(rel(t.sin[2 + i], want_sin[i]) < 1e-6, "sin {i}: {}", t.sin[2 + i]);
        }
        // Linear scaling by 2 halves every frequency: position 2 then looks like position 1.
        let lin = RopeConfig { scaling: RopeScaling::Linear { factor: 2.0 }, ..cfg };
        let t2 = rope_tables(&lin, &[2]).unwrap();
        assert!(rel(t2.cos[0], libm::cos(1.0)) < 1e-6 && rel(t2.sin[1], libm::sin(0.01)) < 1e-6);
    }

    #[test]
    fn llama31_inv_freq_matches_hand_derivation() {
        // In f64: inv_freq[i] = 500000^(−i/64); wavelen = 2π / inv_freq; low-frequency wavelength
        // 8192/1 = 8192, high-frequency wavelength 8192/4 = 2048.
        // i = 0:  inv 1, wavelen 6.28 < 2048: high frequency, kept: 1.
        // i = 1:  inv 0.8146172338565447, wavelen 7.71: kept.
        // i = 28: inv 0.003211445994752591, wavelen 1956.5 < 2048: kept (last high one).
        // i = 29: inv 0.0026160992529250353, wavelen 2401.7: medium,
        //         smooth = (8192/2401.74 − 1)/3 = 0.803621042099634,
        //         result = (1 − s)·inv/8 + s·inv = 0.002166570763503359.
        // i = 30: inv 0.0021311195369119653, wavelen 2948.3: medium, s = 0.5928492950029659,
        //         result 0.0013718935677611381.
        // i = 34: inv 0.0009384738703573802, wavelen 6695.1: medium, s = 0.07452656416074303,
        //         result 0.0001785078127679964.
        // i = 35: inv 0.0007644969883171747, wavelen 8218.7 > 8192: low frequency, inv/8 =
        //         9.556212353964683e-05.
        // i = 63: inv 2.455140791131609e-06, low: 3.068925988914511e-07.
        let f = rope_inv_freq(&LLAMA31).unwrap();
        assert_eq!(f.len(), 64);
        let want: [(usize, f64); 8] = [
            (0, 1.0),
            (1, 0.8146172338565447),
            (28, 0.003211445994752591),
            (29, 0.002166570763503359),
            (30, 0.0013718935677611381),
            (34, 0.0001785078127679964),
            (35, 9.556212353964683e-05),
            (63, 3.068925988914511e-07),
        ];
        for (i, w) in want {
            assert!(rel(f[i], w) < 1e-6, "inv_freq[{i}] = {} vs {w} (rel {:e})", f[i], rel(f[i], w));
        }
        // Every branch is hit where the derivation says: compared with unscaled frequencies,
        // 0..=28 are unchanged, 29..=34 are strictly between inv/8 and inv, 35..=63 are inv/8.
        let plain = rope_inv_freq(&RopeConfig { scaling: RopeScaling::None, ..LLAMA31 }).unwrap();
        for i in 0..64 {
            let (g, p) = (f[i], plain[i]);
            match i {
                0..=28 => assert_eq!(g, p, "high {i}"),
                29..=34 => assert!(g < p && g > p / 8.0, "medium {i}: {g} vs {p}"),
                _ => assert_eq!(g, p / 8.0, "low {i}"),
            }
        }
    }

    #[test]
    fn rotation_preserves_pair_norms() {
        let mut rng = Rng::new(41);
        let (n, h, d) = (5, 3, 10);
        let pos: Vec<u32> = (0..n).map(|_| rng.below(100_000) as u32).collect();
        let t = rope_tables(&LLAMA31_SMALL, &pos).unwrap();
        let x = randn(&mut rng, n * h * d, 1.0);
        let y = rope_fwd_ref(&x, &t, n, h, d).unwrap();
        for v in 0..n * h {
            for i in 0..d / 2 {
                let (a, b) = (v * d + i, v * d + i + d / 2);
                let nx = x[a] * x[a] + x[b] * x[b];
                let ny = y[a] * y[a] + y[b] * y[b];
                // cos² + sin² is 1 only to f32 precision.
                assert!((nx - ny).abs() <= 1e-6 * nx.max(1.0), "pair {v}/{i}: {nx} vs {ny}");
            }
        }
    }

    /// Llama-3.1 scaling on a small head: its five frequencies hit the high and low branches.
    const LLAMA31_SMALL: RopeConfig = RopeConfig { head_dim: 10, ..LLAMA31 };

    #[test]
    fn backward_matches_finite_difference() {
        let mut rng = Rng::new(42);
        for (n, h, d) in [(1, 1, 2), (3, 5, 6), (7, 3, 10), (13, 1, 14)] {
            // Packed positions: a second document restarts at 0 halfway through.
            let pos: Vec<u32> = (0..n).map(|i| if i < n / 2 { i as u32 * 997 } else { (i - n / 2) as u32 }).collect();
            let cfg = RopeConfig { head_dim: d, ..LLAMA31 };
            let t = rope_tables(&cfg, &pos).unwrap();
            let x = randn(&mut rng, n * h * d, 1.0);
            let w = randn(&mut rng, n * h * d, 1.0);
            let dx = rope_bwd_ref(&w, &t, n, h, d).unwrap();
            let nx = numeric_grad(&x, 1e-6, |x| dot(&rope_fwd_ref(x, &t, n, h, d).unwrap(), &w));
            assert_close(&alloc::format!("dx {n}x{h}x{d}"), &dx, &nx, 1e-7);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let bad_d = RopeConfig { head_dim: 7, ..LLAMA31 };
        assert!(matches!(rope_inv_freq(&bad_d), Err(Error::Invalid { .. })));
        assert!(matches!(rope_inv_freq(&RopeConfig { head_dim: 0, ..LLAMA31 }), Err(Error::Invalid { .. })));
        let inverted = RopeConfig {
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 4.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
            ..LLAMA31
        };
        assert!(matches!(rope_inv_freq(&inverted), Err(Error::Invalid { .. })));
        let zero = RopeConfig { scaling: RopeScaling::Linear { factor: 0.0 }, ..LLAMA31 };
        assert!(matches!(rope_tables(&zero, &[0]), Err(Error::Invalid { .. })));

        let t = rope_tables(&LLAMA31_SMALL, &[0, 1]).unwrap();
        let x = [0.0f64; 40];
        assert!(matches!(rope_fwd_ref(&x[..39], &t, 2, 2, 10), Err(Error::Shape { .. })));
        assert!(matches!(rope_fwd_ref(&x[..30], &t, 3, 1, 10), Err(Error::Shape { .. })));
        assert!(matches!(rope_fwd_ref(&x[..24], &t, 2, 2, 6), Err(Error::Shape { .. })));
        assert!(matches!(rope_bwd_ref(&x[..18], &t, 2, 1, 9), Err(Error::Invalid { .. })));
        let short = RopeTables { half: 5, cos: t.cos.clone(), sin: t.sin[..9].to_vec() };
        assert!(matches!(rope_bwd_ref(&x, &short, 2, 2, 10), Err(Error::Shape { .. })));
    }
}
