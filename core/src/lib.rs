//! gristmill-core: the specification of gristmill in code.
//!
//! Everything here is plain loops over slices, `no_std` + `alloc`, so that it builds for any target
//! and reads as the definition the GPU kernels are tested against:
//!
//! - [`dtype`] and [`shape`]: element types and shapes with checked arithmetic;
//! - [`nf4`]: NF4 4-bit quantization with double-quantized block scales, bit-compatible with
//!   bitsandbytes, and [`bnb`]: its safetensors layout;
//! - [`ops`]: reference forward and backward passes of every op of a Llama-family training step;
//! - [`linalg`]: small dense SPD algebra (Cholesky, inverse, Jacobi eigendecomposition) for K-FAC;
//! - [`rng`]: a small deterministic generator for initialisation, dropout masks and tests.
//!
//! Every op is generic over [`Real`] (f32 and f64): the library runs in f32 with f32 accumulation,
//! tests run the same code in f64 to check gradients against finite differences.
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod bnb;
pub mod dtype;
pub mod error;
pub mod linalg;
pub mod nf4;
pub mod ops;
pub mod real;
pub mod rng;
pub mod shape;

#[cfg(test)]
pub(crate) mod testutil;

pub use dtype::DType;
pub use error::{Error, Result};
pub use real::Real;
pub use shape::Shape;
