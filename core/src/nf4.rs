//! NF4: 4-bit NormalFloat quantization with double-quantized block scales, bit-compatible with
//! bitsandbytes (`quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)`).
//!
//! Format (see docs/nf4.md of the project):
//! - the weight (out × in, row-major) is flattened and cut into blocks of 64 values; each block
//!   has one scale, its absmax (max |w|);
//! - each value is multiplied by `1 / absmax` (a reciprocal rounded to f32, then a product rounded
//!   to f32: the order of the reference kernel, which decides ties) and mapped to the code of the
//!   [`NF4_CODE`] book whose decision interval holds it;
//! - two codes per byte, element 2j in the HIGH nibble, element 2j + 1 in the LOW nibble;
//! - double quantization: `offset = mean(absmax)`; the centered scales `absmax − offset` are
//!   quantized blockwise (256 per block) to 8 bits with the signed dynamic map
//!   ([`dynamic_map_signed`]), each 256-block keeping its own f32 `nested_absmax`;
//! - dequantization: `absmax = dyn[q8] · nested_absmax + offset` (two f32 roundings: a product,
//!   then a sum — GPU kernels must not contract them into an FMA), then `w = code[q4] · absmax`.

use crate::dtype::DType;
use crate::error::{Error, Result, check_len};
use crate::shape::Shape;
use alloc::vec::Vec;

/// Values per NF4 block (one absmax each).
pub const NF4_BLOCKSIZE: usize = 64;
/// Values per block of the second-level (8-bit) quantization of the absmax vector.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The NF4 code book, index → value (bitsandbytes' `quant_map` for "nf4").
///
/// Written with the reference's digits so each entry can be compared with its source; they
/// round to the same f32.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Decision thresholds between neighbouring codes, ascending, as the reference's quantization
/// tree compares them (f32 literals; these are the midpoints of the code book rounded the way the
/// reference rounded them, not recomputed midpoints: the last bit decides ties).
#[allow(clippy::excessive_precision)]
const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_400_499_343_9,
    -0.610_632_926_225_662_2,
    -0.459_995_269_775_390_6,
    -0.339_679_434_895_515_44,
    -0.234_607_405_960_559_84,
    -0.137_911_733_239_889_14,
    -0.045_525_018_125_772_476,
    0.039_790_149_778_127_67,
    0.120_255_250_483_751_3,
    0.203_521_251_678_466_8,
    0.292_013_771_831_989_3,
    0.389_312_535_524_368_3,
    0.501_663_416_624_069_2,
    0.642_786_920_070_648_2,
    0.861_478_418_111_801_1,
];

/// The NF4 code of a normalized value: the number of thresholds strictly below it.
///
/// Equal to the reference's binary decision tree for every input, NaN included (every comparison
/// is false, giving code 0: an all-zero block, whose scaled values are 0·∞ = NaN, stores code 0
/// and dequantizes to −0.0, as the reference does).
#[inline]
pub fn nf4_code_of(x: f32) -> u8 {
    // Branch-free count: the tree in the reference is the same partition searched in 4 steps.
    NF4_THRESHOLDS.iter().map(|&t| (x > t) as u8).sum()
}

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`: 7 exponent bits,
/// 8 bits in all), the code book of the second-level quantization: 256 values, ascending.
///
/// Each decade 10^(i−6), i = 0..7, holds 2^i values on each side of zero — the midpoints of
/// `linspace(0.1, 1, 2^i + 1)` scaled by the decade — plus 0 and 1. The reference builds it with
/// vectorized f32 arithmetic whose rounding depends on how its CPU kernels split the work, so a
/// recomputation differs from it in the last bit of 38 entries; these are the exact f32 bits it
/// stores in checkpoints (read from the golden fixture `nf4_golden.safetensors`,
/// `w.nested_code`). The test `dynamic_map_matches_its_formula` checks every entry against the
/// formula to two ulps.
pub fn dynamic_map_signed() -> [f32; 256] {
    DYNAMIC_MAP_SIGNED_BITS.map(f32::from_bits)
}

const DYNAMIC_MAP_SIGNED_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The 8-bit code of `x` in an ascending 256-entry code book, as the reference's blockwise
/// quantizer picks it: a 7-step binary search from the middle, then the nearer of the two
/// neighbours by comparing against their f32 midpoint (ties go to the entry found by the search).
pub fn code8_of(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    // Indices are < 256 by construction of the search (127 ± 127 at most).
    if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint { upper_pivot as u8 } else { pivot as u8 }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint { lower_pivot as u8 } else { pivot as u8 }
    }
}

/// Blockwise absmax: max |x| per block of `blocksize` (the last block may be short).
pub fn block_absmax(x: &[f32], blocksize: usize) -> Vec<f32> {
    x.chunks(blocksize).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect()
}

/// Blockwise 8-bit quantization with a 256-entry code book: returns (codes, per-block absmax).
pub fn quantize_blockwise_8bit(x: &[f32], code: &[f32; 256], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let absmax = block_absmax(x, blocksize);
    let mut q = Vec::with_capacity(x.len());
    for (block, &am) in x.chunks(blocksize).zip(&absmax) {
        let inv = 1.0f32 / am;
        q.extend(block.iter().map(|&v| code8_of(code, v * inv)));
    }
    (q, absmax)
}

/// Inverse of [`quantize_blockwise_8bit`]: `code[q] · absmax[block]`, one f32 rounding.
pub fn dequantize_blockwise_8bit(q: &[u8], absmax: &[f32], code: &[f32; 256], blocksize: usize) -> Result<Vec<f32>> {
    check_len("dequantize_blockwise_8bit", "absmax", absmax.len(), q.len().div_ceil(blocksize))?;
    Ok(q.chunks(blocksize).zip(absmax).flat_map(|(b, &am)| b.iter().map(move |&c| code[c as usize] * am)).collect())
}

/// The absmax vector stored double-quantized: 8-bit codes of `absmax − offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// (n_blocks) 8-bit codes into `code`.
    pub q: Vec<u8>,
    /// (ceil(n_blocks / nested_blocksize)) f32 scale of each nested block.
    pub nested_absmax: Vec<f32>,
    /// The 256-entry code book (bitsandbytes' `nested_quant_map`).
    pub code: [f32; 256],
    pub nested_blocksize: usize,
    /// mean of the original absmax vector, added back after decoding.
    pub offset: f32,
}

/// How the per-block scales of an NF4 tensor are stored.
// The double-quantized variant carries its 1 KiB code book inline: one per weight matrix, so
// boxing it would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// Plain f32 scales (`compress_statistics=False`).
    F32(Vec<f32>),
    /// Double-quantized scales (`compress_statistics=True`, the QLoRA default).
    Double(DoubleQuant),
}

/// A weight quantized to NF4.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Logical shape of the weight, e.g. (out, in).
    pub shape: Shape,
    /// dtype of the weight before quantization (what dequantization gives back).
    pub dtype: DType,
    /// (ceil(numel / 2)) packed codes, element 2j in the high nibble.
    pub packed: Vec<u8>,
    pub blocksize: usize,
    pub absmax: Absmax,
}

impl Nf4Tensor {
    /// Quantizes `values` (row-major, `shape`) to NF4 with blocks of [`NF4_BLOCKSIZE`].
    ///
    /// `values` are the weight converted to f32 (exactly, from bf16/f16); `dtype` records what
    /// they were. `double_quant` selects bitsandbytes' `compress_statistics`.
    pub fn quantize(values: &[f32], shape: Shape, dtype: DType, double_quant: bool) -> Result<Self> {
        Self::quantize_with_blocksize(values, shape, dtype, NF4_BLOCKSIZE, double_quant)
    }

    /// [`Nf4Tensor::quantize`] with another block size (bitsandbytes allows 32…4096; the
    /// kernels of gristmill assume 64, so other sizes are for reading foreign checkpoints).
    pub fn quantize_with_blocksize(
        values: &[f32],
        shape: Shape,
        dtype: DType,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        check_len("Nf4Tensor::quantize", "values", values.len(), shape.numel())?;
        if blocksize == 0 || !blocksize.is_multiple_of(2) {
            return Err(crate::error::invalid(
                "Nf4Tensor::quantize",
                "blocksize",
                alloc::format!("{blocksize} is not a positive even number"),
            ));
        }
        if !dtype.is_float() {
            return Err(crate::error::invalid(
                "Nf4Tensor::quantize",
                "dtype",
                alloc::format!("{dtype} is not a float type"),
            ));
        }
        let absmax = block_absmax(values, blocksize);
        let mut packed = alloc::vec![0u8; values.len().div_ceil(2)];
        for (bi, (block, &am)) in values.chunks(blocksize).zip(&absmax).enumerate() {
            let inv = 1.0f32 / am;
            for (j, &v) in block.iter().enumerate() {
                let idx = bi * blocksize + j;
                let c = nf4_code_of(v * inv);
                packed[idx / 2] |= if idx.is_multiple_of(2) { c << 4 } else { c };
            }
        }
        // An odd element count leaves a low nibble over: the reference quantizes the zero it pads
        // the last block with (code 7, or code 0 when that block's absmax is 0 and 0·∞ is NaN).
        if values.len() % 2 == 1 {
            let inv_last = 1.0f32 / absmax.last().copied().unwrap_or(0.0);
            if let Some(b) = packed.last_mut() {
                *b |= nf4_code_of(0.0 * inv_last);
            }
        }
        let absmax = if double_quant { Absmax::Double(double_quantize(&absmax)) } else { Absmax::F32(absmax) };
        Ok(Self { shape, dtype, packed, blocksize, absmax })
    }

    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    pub fn n_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// The NF4 code of element `i`.
    #[inline]
    pub fn code_at(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) { byte >> 4 } else { byte & 0x0F }
    }

    /// The per-block scales as f32, decoding double quantization.
    pub fn absmax_f32(&self) -> Result<Vec<f32>> {
        match &self.absmax {
            Absmax::F32(a) => Ok(a.clone()),
            Absmax::Double(d) => {
                let mut a = dequantize_blockwise_8bit(&d.q, &d.nested_absmax, &d.code, d.nested_blocksize)?;
                for v in &mut a {
                    *v += d.offset;
                }
                Ok(a)
            }
        }
    }

    /// Dequantizes to f32 (`code[q] · absmax`, one rounding). Convert to bf16 with round-to-nearest
    /// to get what the reference's dequantize returns for a bf16 weight.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        self.validate()?;
        let absmax = self.absmax_f32()?;
        Ok((0..self.numel()).map(|i| NF4_CODE[self.code_at(i) as usize] * absmax[i / self.blocksize]).collect())
    }

    /// Dequantizes and rounds to the weight's original dtype (round-to-nearest-even), returned as
    /// f32: exactly the values a bf16/f16 GEMM sees after the reference stack dequantizes.
    pub fn dequantize_rounded(&self) -> Result<Vec<f32>> {
        let mut w = self.dequantize()?;
        match self.dtype {
            DType::BF16 => w.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
            DType::F16 => w.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
            _ => {}
        }
        Ok(w)
    }

    /// Checks that every buffer has the size the shape and block sizes imply.
    pub fn validate(&self) -> Result<()> {
        let op = "Nf4Tensor";
        if self.blocksize == 0 {
            return Err(crate::error::invalid(op, "blocksize", "0"));
        }
        check_len(op, "packed", self.packed.len(), self.numel().div_ceil(2))?;
        let nb = self.n_blocks();
        match &self.absmax {
            Absmax::F32(a) => check_len(op, "absmax", a.len(), nb),
            Absmax::Double(d) => {
                check_len(op, "absmax", d.q.len(), nb)?;
                if d.nested_blocksize == 0 {
                    return Err(crate::error::invalid(op, "nested_blocksize", "0"));
                }
                check_len(op, "nested_absmax", d.nested_absmax.len(), nb.div_ceil(d.nested_blocksize))
            }
        }
    }

    /// Bytes of device memory the quantized weight and its scales take.
    pub fn storage_bytes(&self) -> usize {
        let scales = match &self.absmax {
            Absmax::F32(a) => 4 * a.len(),
            Absmax::Double(d) => d.q.len() + 4 * d.nested_absmax.len() + 4 * 256 + 4,
        };
        self.packed.len() + scales
    }
}

/// Second-level quantization of a block-scale vector (bitsandbytes' `compress_statistics`).
pub fn double_quantize(absmax: &[f32]) -> DoubleQuant {
    // The reference's mean is its sum times the f32 reciprocal of the count (two roundings, not a
    // correctly rounded division): the golden fixtures show the difference in the last bit. The
    // sum is taken in f64 and rounded once; sums of bf16-valued scales are exact in f32 anyway.
    let offset = if absmax.is_empty() {
        0.0
    } else {
        (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() as f32) * (1.0f32 / absmax.len() as f32)
    };
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let code = dynamic_map_signed();
    let (q, nested_absmax) = quantize_blockwise_8bit(&centered, &code, NESTED_BLOCKSIZE);
    DoubleQuant { q, nested_absmax, code, nested_blocksize: NESTED_BLOCKSIZE, offset }
}

/// A readable error for NF4 tensor sets; used by the safetensors layout helpers.
pub(crate) fn bnb_error(tensor: &str, why: impl Into<alloc::string::String>) -> Error {
    Error::Bnb { tensor: tensor.into(), why: why.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn thresholds_sit_between_codes() {
        for i in 0..15 {
            let t = NF4_THRESHOLDS[i];
            assert!(NF4_CODE[i] < t && t < NF4_CODE[i + 1]);
            let mid = (f64::from(NF4_CODE[i]) + f64::from(NF4_CODE[i + 1])) / 2.0;
            assert!((f64::from(t) - mid).abs() < 1e-6, "threshold {i} is not the midpoint");
        }
        // Every code maps to itself, and the decision boundaries go to the lower code (strict >).
        for (i, &c) in NF4_CODE.iter().enumerate() {
            assert_eq!(nf4_code_of(c) as usize, i);
        }
        for (i, &t) in NF4_THRESHOLDS.iter().enumerate() {
            assert_eq!(nf4_code_of(t) as usize, i);
            assert_eq!(nf4_code_of(f32::from_bits(t.to_bits()).next_up()) as usize, i + 1);
        }
        assert_eq!(nf4_code_of(f32::NAN), 0);
        assert_eq!(nf4_code_of(-2.0), 0);
        assert_eq!(nf4_code_of(2.0), 15);
    }

    #[test]
    fn nf4_code_is_the_nearest_code() {
        let mut rng = Rng::new(11);
        for _ in 0..100_000 {
            let x = rng.uniform_in(-1.0, 1.0) as f32;
            let q = nf4_code_of(x) as usize;
            let best = NF4_CODE.iter().map(|&c| (c - x).abs()).fold(f32::INFINITY, f32::min);
            // Nearest up to the rounding of the reference's threshold literals.
            assert!((NF4_CODE[q] - x).abs() <= best + 1e-7, "x={x} code {q}");
        }
    }

    /// torch.linspace(start, end, steps) in f32 as its scalar CPU path computes it.
    fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
        if steps == 1 {
            return alloc::vec![start];
        }
        let step = (end - start) / (steps - 1) as f32;
        let half = steps / 2;
        (0..steps)
            .map(|i| if i < half { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 })
            .collect()
    }

    #[test]
    fn dynamic_map_matches_its_formula() {
        let mut data: Vec<f32> = Vec::new();
        for i in 0..7i32 {
            let b = linspace_f32(0.1, 1.0, (1usize << i) + 1);
            let decade = libm::pow(10.0, f64::from(i - 6)) as f32;
            for w in b.windows(2) {
                let mean = (w[0] + w[1]) / 2.0;
                data.push(decade * mean);
                data.push(-decade * mean);
            }
        }
        data.push(0.0);
        data.push(1.0);
        data.sort_by(|a, b| a.partial_cmp(b).unwrap());
        for (i, (&t, &f)) in dynamic_map_signed().iter().zip(&data).enumerate() {
            let ulps = (t.to_bits() as i64 - f.to_bits() as i64).abs();
            assert!(ulps <= 2, "entry {i}: table {t:e} vs formula {f:e} ({ulps} ulps)");
        }
    }

    #[test]
    fn dynamic_map_shape() {
        let m = dynamic_map_signed();
        assert!(m.windows(2).all(|w| w[0] < w[1]), "strictly ascending");
        assert_eq!(m[255], 1.0);
        assert_eq!(m.iter().filter(|&&v| v == 0.0).count(), 1);
        assert_eq!(m.iter().filter(|&&v| v < 0.0).count(), 127);
        // Largest magnitude below 1 is the last midpoint of linspace(0.1, 1, 65): 0.99296875.
        assert!((m[254] - 0.992_968_75).abs() < 1e-6);
        assert!((m[0] + 0.992_968_75).abs() < 1e-6);
        // Smallest magnitude: 1e-6 · 0.55.
        let pos_min = m.iter().copied().filter(|&v| v > 0.0).fold(f32::INFINITY, f32::min);
        assert!((pos_min - 0.55e-6).abs() < 1e-12);
        // Hand-checked entries of the second decade: 1e-5 · {0.325, 0.775}.
        assert!(m.iter().any(|&v| (v - 0.325e-5).abs() < 1e-11));
        assert!(m.iter().any(|&v| (v - 0.775e-5).abs() < 1e-11));
    }

    #[test]
    fn code8_is_nearest() {
        let m = dynamic_map_signed();
        let mut rng = Rng::new(5);
        for _ in 0..50_000 {
            let x = rng.uniform_in(-1.0, 1.0) as f32;
            let q = code8_of(&m, x) as usize;
            let best = m.iter().map(|&c| (c - x).abs()).fold(f32::INFINITY, f32::min);
            // Up to the f32 rounding of the midpoint a tie is decided by.
            assert!((m[q] - x).abs() <= best + 2e-7, "x={x} got {} best {best}", (m[q] - x).abs());
        }
        for (i, &c) in m.iter().enumerate() {
            assert_eq!(code8_of(&m, c) as usize, i, "code {i} maps to itself");
        }
    }

    #[test]
    fn hand_packed_block() {
        // Four values, absmax 2: normalized to -1, 0, 0.5, 1 → codes 0, 7, 12 (|0.5 − 0.4407| =
        // 0.0593 < |0.5626 − 0.5| = 0.0626), 15; packed high nibble first.
        let t = Nf4Tensor::quantize(&[-2.0, 0.0, 1.0, 2.0], Shape::new([2, 2]).unwrap(), DType::F32, false).unwrap();
        assert_eq!(t.packed, [0x07, 0xCF]);
        assert_eq!(t.absmax, Absmax::F32(alloc::vec![2.0]));
        assert_eq!(t.dequantize().unwrap(), [-2.0, 0.0, NF4_CODE[12] * 2.0, 2.0]);
        // An odd element count pads the last low nibble with the code of 0 (7).
        let t = Nf4Tensor::quantize(&[1.0, -1.0, 1.0], Shape::new([3]).unwrap(), DType::BF16, false).unwrap();
        assert_eq!(t.packed, [0xF0, 0xF7]);
    }

    #[test]
    fn zero_block_round_trips_to_zero() {
        let t = Nf4Tensor::quantize(&[0.0; 64], Shape::new([64]).unwrap(), DType::F32, true).unwrap();
        assert!(t.dequantize().unwrap().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn round_trip_error_within_half_spacing() {
        // Ragged: 3 full blocks and a partial one; double quantization over 2 nested blocks.
        let mut rng = Rng::new(42);
        for &(rows, cols, dq) in &[(7usize, 37usize, false), (13, 64, true), (300, 129, true)] {
            let n = rows * cols;
            let w: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.02) as f32).collect();
            let t = Nf4Tensor::quantize(&w, Shape::new([rows, cols]).unwrap(), DType::BF16, dq).unwrap();
            t.validate().unwrap();
            let absmax_true = block_absmax(&w, NF4_BLOCKSIZE);
            let absmax = t.absmax_f32().unwrap();
            let back = t.dequantize().unwrap();
            for (i, (&x, &y)) in w.iter().zip(&back).enumerate() {
                let b = i / NF4_BLOCKSIZE;
                let xn = x / absmax_true[b];
                let q = nf4_code_of(xn) as usize;
                // Half the spacing of the code interval the value fell in, in weight units.
                let lo = if q > 0 { NF4_CODE[q] - NF4_CODE[q - 1] } else { 0.0 };
                let hi = if q < 15 { NF4_CODE[q + 1] - NF4_CODE[q] } else { 0.0 };
                let half = 0.5 * lo.max(hi) * absmax_true[b];
                // Scale error from double quantization adds |code| · |Δabsmax| ≤ |Δabsmax|.
                let scale_err = (absmax[b] - absmax_true[b]).abs();
                assert!((x - y).abs() <= half + scale_err + 1e-7, "elem {i}: {x} vs {y}");
            }
            if dq {
                // 8-bit dynamic codes keep the scales within a fraction of a percent.
                for (a, b) in absmax.iter().zip(&absmax_true) {
                    assert!((a - b).abs() <= 0.02 * b + 1e-6, "absmax {a} vs {b}");
                }
                if n > 30_000 {
                    // The fixed 1 KiB nested code book dominates small tensors; large ones approach 4.127.
                    let bits = t.storage_bytes() as f64 * 8.0 / n as f64;
                    assert!(bits < 4.4, "{bits} bits per weight");
                }
            } else {
                assert_eq!(absmax, absmax_true);
            }
        }
    }

    #[test]
    fn blockwise_8bit_round_trip() {
        let mut rng = Rng::new(3);
        let x: Vec<f32> = (0..1000).map(|_| rng.uniform_in(-3.0, 3.0) as f32).collect();
        let code = dynamic_map_signed();
        let (q, am) = quantize_blockwise_8bit(&x, &code, 256);
        assert_eq!(am.len(), 4);
        let back = dequantize_blockwise_8bit(&q, &am, &code, 256).unwrap();
        for (a, b) in x.iter().zip(&back) {
            // The dynamic map's coarsest step near 1 is 1/64 of the decade: ≤ 1/128 relative to absmax.
            assert!((a - b).abs() <= 3.0 / 128.0 + 1e-6);
        }
        assert!(dequantize_blockwise_8bit(&q, &am[..3], &code, 256).is_err());
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(Nf4Tensor::quantize(&[1.0; 5], Shape::new([2, 3]).unwrap(), DType::F32, true).is_err());
        assert!(Nf4Tensor::quantize(&[1.0; 6], Shape::new([2, 3]).unwrap(), DType::U8, true).is_err());
        let mut t = Nf4Tensor::quantize(&[1.0; 6], Shape::new([2, 3]).unwrap(), DType::F32, true).unwrap();
        t.packed.pop();
        assert!(t.dequantize().is_err());
    }
}
