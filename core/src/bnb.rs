//! The safetensors layout bitsandbytes uses for 4-bit weights ("…-bnb-4bit" checkpoints).
//!
//! For a module `…q_proj` a checkpoint holds:
//! - `q_proj.weight`: U8 `(ceil(n/2), 1)`, the packed codes;
//! - `q_proj.weight.absmax`: U8 `(n_blocks)` when double-quantized, else F32;
//! - `q_proj.weight.nested_absmax`: F32 `(n_nested_blocks)` and `q_proj.weight.nested_quant_map`:
//!   F32 `(256)`, only when double-quantized;
//! - `q_proj.weight.quant_map`: F32 `(16)`, the NF4 code book;
//! - `q_proj.weight.quant_state.bitsandbytes__nf4`: U8 bytes of a JSON object with the original
//!   `shape`, `dtype`, `blocksize`, `quant_type` and, when double-quantized, `nested_blocksize`,
//!   `nested_dtype`, `nested_offset`.
//!
//! This module knows no file format: the runtime hands it tensors by name ([`TensorSource`]) and
//! writes the [`RawTensor`]s it returns, so it stays `no_std` and is tested without files.

use crate::dtype::DType;
use crate::error::Result;
use crate::nf4::{Absmax, DoubleQuant, NF4_CODE, Nf4Tensor, bnb_error};
use crate::shape::Shape;
use alloc::borrow::Cow;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// Suffix of the quant-state tensor of an NF4 weight.
pub const QUANT_STATE_SUFFIX: &str = "quant_state.bitsandbytes__nf4";

/// The tensor names bitsandbytes gives the pieces of one 4-bit weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BnbNames {
    pub weight: String,
    pub absmax: String,
    pub nested_absmax: String,
    pub nested_quant_map: String,
    pub quant_map: String,
    pub quant_state: String,
}

impl BnbNames {
    /// Names for the weight `{weight}` (e.g. `model.layers.0.self_attn.q_proj.weight`).
    pub fn for_weight(weight: &str) -> Self {
        Self {
            weight: weight.to_string(),
            absmax: format!("{weight}.absmax"),
            nested_absmax: format!("{weight}.nested_absmax"),
            nested_quant_map: format!("{weight}.nested_quant_map"),
            quant_map: format!("{weight}.quant_map"),
            quant_state: format!("{weight}.{QUANT_STATE_SUFFIX}"),
        }
    }

    /// Whether `name` is one of the side tensors of some 4-bit weight (not the weight itself).
    pub fn is_side_tensor(name: &str) -> bool {
        [".absmax", ".nested_absmax", ".nested_quant_map", ".quant_map"].iter().any(|s| name.ends_with(s))
            || name.ends_with(QUANT_STATE_SUFFIX)
    }
}

/// A tensor as a file stores it: name, dtype, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor<'a> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

/// Where the loader finds tensors by name (a safetensors file, a test map).
pub trait TensorSource {
    /// The tensor `name`, or `None` when the source has no such tensor.
    fn tensor(&self, name: &str) -> Option<RawTensor<'_>>;
}

impl TensorSource for [RawTensor<'_>] {
    fn tensor(&self, name: &str) -> Option<RawTensor<'_>> {
        self.iter().find(|t| t.name == name).map(|t| RawTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: Cow::Borrowed(&t.data),
        })
    }
}

/// The non-tensor part of a bitsandbytes quant state (its JSON object).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantState {
    pub quant_type: String,
    pub blocksize: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// (nested_blocksize, nested_offset) when the absmax is double-quantized.
    pub nested: Option<(usize, f32)>,
}

impl QuantState {
    /// The JSON bitsandbytes writes (`json.dumps` of its dict: same key order, `", "` and `": "`
    /// separators, floats as Python's `repr`), so a file we write is byte-identical to its own.
    pub fn to_json(&self) -> String {
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [",
            self.quant_type,
            self.blocksize,
            self.dtype.torch_name()
        );
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            s.push_str(&d.to_string());
        }
        s.push(']');
        if let Some((nb, off)) = self.nested {
            s.push_str(&format!(
                ", \"nested_blocksize\": {nb}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(f64::from(off))
            ));
        }
        s.push('}');
        s
    }

    /// Parses the quant-state JSON of the 4-bit weight `tensor` (named in errors).
    pub fn parse(tensor: &str, bytes: &[u8]) -> Result<Self> {
        let text = core::str::from_utf8(bytes).map_err(|_| bnb_error(tensor, "quant state is not UTF-8"))?;
        let obj = match json::parse(text).map_err(|e| bnb_error(tensor, format!("quant state JSON: {e}")))? {
            json::Value::Object(o) => o,
            _ => return Err(bnb_error(tensor, "quant state JSON is not an object")),
        };
        let get = |k: &str| obj.get(k).ok_or_else(|| bnb_error(tensor, format!("quant state has no `{k}`")));
        let uint = |k: &str| -> Result<usize> {
            match get(k)? {
                json::Value::Number(n) if *n >= 0.0 && *n == libm::floor(*n) && *n < 1e15 => Ok(*n as usize),
                v => Err(bnb_error(tensor, format!("quant state `{k}` should be a non-negative integer, found {v:?}"))),
            }
        };
        let string = |k: &str| -> Result<String> {
            match get(k)? {
                json::Value::String(s) => Ok(s.clone()),
                v => Err(bnb_error(tensor, format!("quant state `{k}` should be a string, found {v:?}"))),
            }
        };
        let quant_type = string("quant_type")?;
        if quant_type != "nf4" {
            return Err(bnb_error(
                tensor,
                format!("quant_type is `{quant_type}`; gristmill reads nf4 only (fp4 is not supported)"),
            ));
        }
        let dtype = DType::parse(&string("dtype")?)?;
        let shape = match get("shape")? {
            json::Value::Array(a) => a
                .iter()
                .map(|v| match v {
                    json::Value::Number(n) if *n >= 0.0 && *n == libm::floor(*n) && *n < 1e15 => Ok(*n as usize),
                    _ => Err(bnb_error(tensor, format!("quant state `shape` has a bad entry {v:?}"))),
                })
                .collect::<Result<Vec<_>>>()?,
            v => return Err(bnb_error(tensor, format!("quant state `shape` should be a list, found {v:?}"))),
        };
        let nested = if obj.contains_key("nested_blocksize") {
            let off = match get("nested_offset")? {
                json::Value::Number(n) => *n as f32,
                v => {
                    return Err(bnb_error(
                        tensor,
                        format!("quant state `nested_offset` should be a number, found {v:?}"),
                    ));
                }
            };
            Some((uint("nested_blocksize")?, off))
        } else {
            None
        };
        Ok(Self { quant_type, blocksize: uint("blocksize")?, dtype, shape, nested })
    }
}

/// The tensors that store `t` under the weight name `weight`, in bitsandbytes' layout.
pub fn to_bnb_tensors(weight: &str, t: &Nf4Tensor) -> Result<Vec<RawTensor<'static>>> {
    t.validate()?;
    let names = BnbNames::for_weight(weight);
    let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut out = alloc::vec![RawTensor {
        name: names.weight,
        dtype: DType::U8,
        shape: alloc::vec![t.packed.len(), 1],
        data: Cow::Owned(t.packed.clone()),
    }];
    let nested = match &t.absmax {
        Absmax::F32(a) => {
            out.push(RawTensor {
                name: names.absmax,
                dtype: DType::F32,
                shape: alloc::vec![a.len()],
                data: Cow::Owned(f32_bytes(a)),
            });
            None
        }
        Absmax::Double(d) => {
            out.push(RawTensor {
                name: names.absmax,
                dtype: DType::U8,
                shape: alloc::vec![d.q.len()],
                data: Cow::Owned(d.q.clone()),
            });
            out.push(RawTensor {
                name: names.nested_absmax,
                dtype: DType::F32,
                shape: alloc::vec![d.nested_absmax.len()],
                data: Cow::Owned(f32_bytes(&d.nested_absmax)),
            });
            out.push(RawTensor {
                name: names.nested_quant_map,
                dtype: DType::F32,
                shape: alloc::vec![256],
                data: Cow::Owned(f32_bytes(&d.code)),
            });
            Some((d.nested_blocksize, d.offset))
        }
    };
    out.push(RawTensor {
        name: names.quant_map,
        dtype: DType::F32,
        shape: alloc::vec![16],
        data: Cow::Owned(f32_bytes(&NF4_CODE)),
    });
    let qs = QuantState {
        quant_type: "nf4".into(),
        blocksize: t.blocksize,
        dtype: t.dtype,
        shape: t.shape.dims().to_vec(),
        nested,
    };
    let json = qs.to_json().into_bytes();
    out.push(RawTensor {
        name: names.quant_state,
        dtype: DType::U8,
        shape: alloc::vec![json.len()],
        data: Cow::Owned(json),
    });
    Ok(out)
}

/// Reads the 4-bit weight `weight` from `src`, checking every piece against the quant state.
pub fn from_bnb_tensors(weight: &str, src: &(impl TensorSource + ?Sized)) -> Result<Nf4Tensor> {
    let names = BnbNames::for_weight(weight);
    let need = |n: &str| src.tensor(n).ok_or_else(|| bnb_error(weight, format!("missing tensor `{n}`")));
    let qs_t = need(&names.quant_state)?;
    let qs = QuantState::parse(weight, &qs_t.data)?;
    let shape = Shape::new(qs.shape.clone())?;
    let n = shape.numel();
    if qs.blocksize == 0 || !qs.blocksize.is_multiple_of(2) {
        return Err(bnb_error(weight, format!("blocksize {} is not a positive even number", qs.blocksize)));
    }
    let n_blocks = n.div_ceil(qs.blocksize);

    let w = need(&names.weight)?;
    expect_u8_len(weight, &w, n.div_ceil(2))?;

    let qm = need(&names.quant_map)?;
    let code = f32_values(weight, &qm, 16)?;
    if code.iter().zip(NF4_CODE.iter()).any(|(a, b)| a.to_bits() != b.to_bits()) {
        return Err(bnb_error(weight, "quant_map is not the NF4 code book"));
    }

    let am = need(&names.absmax)?;
    let absmax = match qs.nested {
        None => Absmax::F32(f32_values(weight, &am, n_blocks)?),
        Some((nested_blocksize, offset)) => {
            if nested_blocksize == 0 {
                return Err(bnb_error(weight, "nested_blocksize is 0"));
            }
            expect_u8_len(weight, &am, n_blocks)?;
            let nested_absmax = f32_values(weight, &need(&names.nested_absmax)?, n_blocks.div_ceil(nested_blocksize))?;
            let nested_code = f32_values(weight, &need(&names.nested_quant_map)?, 256)?;
            let mut code = [0f32; 256];
            code.copy_from_slice(&nested_code);
            Absmax::Double(DoubleQuant { q: am.data.into_owned(), nested_absmax, code, nested_blocksize, offset })
        }
    };
    let t = Nf4Tensor { shape, dtype: qs.dtype, packed: w.data.into_owned(), blocksize: qs.blocksize, absmax };
    t.validate()?;
    Ok(t)
}

fn expect_u8_len(weight: &str, t: &RawTensor<'_>, len: usize) -> Result<()> {
    if t.dtype != DType::U8 {
        return Err(bnb_error(weight, format!("`{}` should be U8, found {}", t.name, t.dtype)));
    }
    if t.data.len() != len {
        return Err(bnb_error(
            weight,
            format!("`{}` should hold {len} bytes for the quant state's shape, found {}", t.name, t.data.len()),
        ));
    }
    Ok(())
}

fn f32_values(weight: &str, t: &RawTensor<'_>, len: usize) -> Result<Vec<f32>> {
    if t.dtype != DType::F32 {
        return Err(bnb_error(weight, format!("`{}` should be F32, found {}", t.name, t.dtype)));
    }
    if t.data.len() != 4 * len {
        return Err(bnb_error(
            weight,
            format!("`{}` should hold {len} f32 values, found {} bytes", t.name, t.data.len()),
        ));
    }
    Ok(t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional for exponents in
/// [-4, 16), scientific (`1e-05`, `1.5e+16`) otherwise.
pub fn python_float_repr(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "d.ddde-x".
    let sci = format!("{v:e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let neg = mant.starts_with('-');
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// A small JSON reader, enough for quant states and for tests; the runtime uses serde_json for
/// everything else.
mod json {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    pub enum Value {
        Null,
        Bool(bool),
        Number(f64),
        String(String),
        Array(Vec<Value>),
        Object(BTreeMap<String, Value>),
    }

    /// Nesting deeper than this is refused: the input is hostile or not a quant state.
    const MAX_DEPTH: usize = 32;

    pub fn parse(s: &str) -> core::result::Result<Value, String> {
        let mut p = Parser { b: s.as_bytes(), i: 0 };
        let v = p.value(0)?;
        p.ws();
        if p.i != p.b.len() {
            return Err(format!("trailing characters at byte {}", p.i));
        }
        Ok(v)
    }

    struct Parser<'a> {
        b: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
                self.i += 1;
            }
        }

        fn eat(&mut self, c: u8) -> core::result::Result<(), String> {
            self.ws();
            if self.b.get(self.i) == Some(&c) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!("expected `{}` at byte {}", c as char, self.i))
            }
        }

        fn value(&mut self, depth: usize) -> core::result::Result<Value, String> {
            if depth > MAX_DEPTH {
                return Err("nesting too deep".into());
            }
            self.ws();
            match self.b.get(self.i) {
                None => Err("unexpected end of input".into()),
                Some(b'{') => {
                    self.i += 1;
                    let mut m = BTreeMap::new();
                    self.ws();
                    if self.b.get(self.i) == Some(&b'}') {
                        self.i += 1;
                        return Ok(Value::Object(m));
                    }
                    loop {
                        self.ws();
                        let k = self.string()?;
                        self.eat(b':')?;
                        let v = self.value(depth + 1)?;
                        m.insert(k, v);
                        self.ws();
                        match self.b.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b'}') => {
                                self.i += 1;
                                return Ok(Value::Object(m));
                            }
                            _ => return Err(format!("expected `,` or `}}` at byte {}", self.i)),
                        }
                    }
                }
                Some(b'[') => {
                    self.i += 1;
                    let mut a = Vec::new();
                    self.ws();
                    if self.b.get(self.i) == Some(&b']') {
                        self.i += 1;
                        return Ok(Value::Array(a));
                    }
                    loop {
                        a.push(self.value(depth + 1)?);
                        self.ws();
                        match self.b.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                return Ok(Value::Array(a));
                            }
                            _ => return Err(format!("expected `,` or `]` at byte {}", self.i)),
                        }
                    }
                }
                Some(b'"') => Ok(Value::String(self.string()?)),
                Some(b't') => self.word("true", Value::Bool(true)),
                Some(b'f') => self.word("false", Value::Bool(false)),
                Some(b'n') => self.word("null", Value::Null),
                Some(b'N') => self.word("NaN", Value::Number(f64::NAN)),
                Some(b'I') => self.word("Infinity", Value::Number(f64::INFINITY)),
                Some(_) => self.number(),
            }
        }

        fn word(&mut self, w: &str, v: Value) -> core::result::Result<Value, String> {
            if self.b[self.i..].starts_with(w.as_bytes()) {
                self.i += w.len();
                Ok(v)
            } else {
                Err(format!("unexpected character at byte {}", self.i))
            }
        }

        fn number(&mut self) -> core::result::Result<Value, String> {
            let start = self.i;
            if self.b[self.i..].starts_with(b"-Infinity") {
                self.i += 9;
                return Ok(Value::Number(f64::NEG_INFINITY));
            }
            while self.i < self.b.len() && matches!(self.b[self.i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                self.i += 1;
            }
            let s = core::str::from_utf8(&self.b[start..self.i]).map_err(|_| "bad number".to_string())?;
            s.parse::<f64>().map(Value::Number).map_err(|_| format!("bad number `{s}` at byte {start}"))
        }

        fn string(&mut self) -> core::result::Result<String, String> {
            self.eat(b'"')?;
            let mut out = String::new();
            loop {
                let c = *self.b.get(self.i).ok_or("unterminated string")?;
                self.i += 1;
                match c {
                    b'"' => return Ok(out),
                    b'\\' => {
                        let e = *self.b.get(self.i).ok_or("unterminated escape")?;
                        self.i += 1;
                        match e {
                            b'"' => out.push('"'),
                            b'\\' => out.push('\\'),
                            b'/' => out.push('/'),
                            b'n' => out.push('\n'),
                            b't' => out.push('\t'),
                            b'r' => out.push('\r'),
                            b'b' => out.push('\u{8}'),
                            b'f' => out.push('\u{c}'),
                            b'u' => {
                                let hex = self.b.get(self.i..self.i + 4).ok_or("short \\u escape")?;
                                let hex = core::str::from_utf8(hex).map_err(|_| "bad \\u escape")?;
                                let cp = u32::from_str_radix(hex, 16).map_err(|_| "bad \\u escape")?;
                                self.i += 4;
                                out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                            }
                            _ => return Err(format!("bad escape at byte {}", self.i - 1)),
                        }
                    }
                    _ => {
                        // Copy one whole UTF-8 sequence (the input is valid UTF-8).
                        let start = self.i - 1;
                        let len = match c {
                            0x00..=0x7f => 1,
                            0xc0..=0xdf => 2,
                            0xe0..=0xef => 3,
                            _ => 4,
                        };
                        let end = (start + len).min(self.b.len());
                        out.push_str(core::str::from_utf8(&self.b[start..end]).map_err(|_| "bad UTF-8")?);
                        self.i = end;
                    }
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_and_refuses() {
            let v = parse(r#" {"a": [1, 2.5e-3, -3], "b": "x\"y\u00e9", "c": {"d": null, "e": true}} "#).unwrap();
            let Value::Object(o) = v else { panic!("not an object") };
            assert_eq!(
                o["a"],
                Value::Array(alloc::vec![Value::Number(1.0), Value::Number(2.5e-3), Value::Number(-3.0)])
            );
            assert_eq!(o["b"], Value::String("x\"y\u{e9}".into()));
            for bad in ["", "{", "{\"a\" 1}", "[1,]", "\"abc", "{} x", "[1 2]"] {
                assert!(parse(bad).is_err(), "{bad:?} should fail");
            }
            let deep = "[".repeat(100) + &"]".repeat(100);
            assert!(parse(&deep).is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn python_repr_matches() {
        for (v, s) in [
            (0.1, "0.1"),
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123456.0, "123456.0"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (f64::from(0.012_345_679_f32), "0.012345679104328156"),
        ] {
            assert_eq!(python_float_repr(v), s, "{v}");
        }
    }

    #[test]
    fn quant_state_json_round_trip() {
        let qs = QuantState {
            quant_type: "nf4".into(),
            blocksize: 64,
            dtype: DType::BF16,
            shape: alloc::vec![128, 64],
            nested: Some((256, 0.0123)),
        };
        let j = qs.to_json();
        assert!(j.starts_with(r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 64], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0"#), "{j}");
        assert_eq!(QuantState::parse("w", j.as_bytes()).unwrap(), qs);
        let e = QuantState::parse("w", br#"{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [2]}"#)
            .unwrap_err();
        assert!(format!("{e}").contains("fp4"), "{e}");
        let e = QuantState::parse("w", br#"{"quant_type": "nf4", "dtype": "bfloat16", "shape": [2]}"#).unwrap_err();
        assert_eq!(format!("{e}"), "bitsandbytes 4-bit `w`: quant state has no `blocksize`");
    }

    #[test]
    fn tensors_round_trip_and_errors_name_the_tensor() {
        let mut rng = Rng::new(9);
        for dq in [true, false] {
            let w: Vec<f32> = (0..(40 * 33)).map(|_| rng.normal() as f32).collect();
            let t = Nf4Tensor::quantize(&w, Shape::new([40, 33]).unwrap(), DType::BF16, dq).unwrap();
            let raw = to_bnb_tensors("m.q_proj.weight", &t).unwrap();
            assert_eq!(raw.len(), if dq { 6 } else { 4 });
            assert_eq!(raw[0].shape, [660, 1]);
            assert!(raw.iter().skip(1).all(|r| BnbNames::is_side_tensor(&r.name)));
            let back = from_bnb_tensors("m.q_proj.weight", raw.as_slice()).unwrap();
            assert_eq!(back, t);

            // Drop the absmax: the message names the missing tensor.
            let missing: Vec<RawTensor<'_>> = raw.iter().filter(|r| !r.name.ends_with(".absmax")).cloned().collect();
            let e = from_bnb_tensors("m.q_proj.weight", missing.as_slice()).unwrap_err();
            assert_eq!(format!("{e}"), "bitsandbytes 4-bit `m.q_proj.weight`: missing tensor `m.q_proj.weight.absmax`");

            // Truncate the packed weight.
            let mut short = raw.clone();
            short[0].data.to_mut().pop();
            let e = from_bnb_tensors("m.q_proj.weight", short.as_slice()).unwrap_err();
            assert!(format!("{e}").contains("should hold 660 bytes"), "{e}");
        }
    }
}
