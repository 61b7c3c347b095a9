//! CPU reference ops, forward and backward: the specification every GPU kernel is tested against.
//!
//! Conventions shared by every op here:
//! - Buffers are row-major slices with explicit dimensions; a doc line gives each shape, e.g.
//!   `x: (M, K)`. Letters: B T C H Hkv D V L r, and M N K for matrix products.
//! - Ops are generic over [`crate::Real`]: f32 in the library (f32 accumulation), f64 in tests.
//! - Every op checks every length and returns [`crate::Error`] instead of panicking; outputs are
//!   returned as fresh `Vec`s (the reference favours clarity over reuse).
//! - A backward takes the gradient of a scalar loss with respect to the op's outputs (`dy`) plus
//!   what the forward saved, and returns gradients with respect to its inputs and parameters.
//! - Names: `<op>_fwd_ref` / `<op>_bwd_ref`, matching kernel symbols `<op>_<fwd|bwd>_<dtype>`.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod lora;
pub mod matmul;
pub mod nf4_gemm;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
