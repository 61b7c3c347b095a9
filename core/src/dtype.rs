//! Element types and their storage sizes.

use crate::error::{Error, Result};
use alloc::string::ToString;

/// An element type of a tensor gristmill stores or computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    U8,
    /// 4-bit NormalFloat codes, two per byte (see [`crate::nf4`]).
    NF4,
}

impl DType {
    /// Storage size of one element in bits.
    pub const fn bits(self) -> usize {
        match self {
            DType::F32 => 32,
            DType::BF16 | DType::F16 => 16,
            DType::U8 => 8,
            DType::NF4 => 4,
        }
    }

    /// Bytes needed to store `n` elements (rounded up to whole bytes), or an overflow error.
    pub fn storage_bytes(self, n: usize) -> Result<usize> {
        n.checked_mul(self.bits())
            .map(|b| b.div_ceil(8))
            .ok_or_else(|| Error::Overflow(alloc::format!("{n} elements of {self}")))
    }

    /// Whether the type is a floating-point type used for activations or weights.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }

    /// The name safetensors uses (`NF4` has none there: it is stored as `U8`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::U8 => "U8",
            DType::NF4 => "NF4",
        }
    }

    /// Parses a safetensors / gristmill dtype name (case-insensitive; torch's names accepted too).
    pub fn parse(s: &str) -> Result<Self> {
        let l = s.to_ascii_lowercase();
        Ok(match l.as_str() {
            "f32" | "float32" | "float" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" | "half" => DType::F16,
            "u8" | "uint8" => DType::U8,
            "nf4" => DType::NF4,
            _ => return Err(Error::UnknownDType(s.to_string())),
        })
    }

    /// torch's name for the type, as bitsandbytes writes it into its quant-state JSON.
    pub const fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::U8 => "uint8",
            DType::NF4 => "nf4",
        }
    }
}

impl core::fmt::Display for DType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_names() {
        assert_eq!(DType::NF4.storage_bytes(7).unwrap(), 4);
        assert_eq!(DType::BF16.storage_bytes(3).unwrap(), 6);
        assert!(DType::F32.storage_bytes(usize::MAX).is_err());
        for d in [DType::F32, DType::BF16, DType::F16, DType::U8, DType::NF4] {
            assert_eq!(DType::parse(d.name()).unwrap(), d);
            assert_eq!(DType::parse(d.torch_name()).unwrap(), d);
        }
        let e = DType::parse("f8").unwrap_err();
        assert_eq!(alloc::format!("{e}"), "unknown dtype `f8` (known: F32, BF16, F16, U8, NF4)");
    }
}
