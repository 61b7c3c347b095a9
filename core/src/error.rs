//! The one error type of the core. Works without std: messages are built with `alloc`.

use alloc::string::String;

/// Result alias of the core.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// What can go wrong in the core. Every variant names the thing that was wrong, what was
/// expected and what was found, so that the runtime can pass it to a user unchanged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A buffer or dimension does not have the size the operation needs.
    #[error("{op}: `{what}` has the wrong size: expected {expected}, found {found}")]
    Shape { op: &'static str, what: &'static str, expected: usize, found: usize },

    /// An argument is outside the range the operation accepts.
    #[error("{op}: invalid `{what}`: {why}")]
    Invalid { op: &'static str, what: &'static str, why: String },

    /// Shape arithmetic (a product of dimensions, a byte count) does not fit in `usize`.
    #[error("shape arithmetic overflows usize: {0}")]
    Overflow(String),

    /// An element type name that gristmill does not know.
    #[error("unknown dtype `{0}` (known: F32, BF16, F16, U8, NF4)")]
    UnknownDType(String),

    /// Cholesky found a non-positive pivot: the matrix is not (numerically) positive definite.
    #[error("matrix is not positive definite: pivot {pivot} is {value:e}")]
    NotPositiveDefinite { pivot: usize, value: f64 },

    /// The Jacobi eigensolver did not reach its tolerance within its sweep budget.
    #[error("Jacobi eigendecomposition did not converge in {sweeps} sweeps (off-diagonal norm {off:e})")]
    NoConvergence { sweeps: usize, off: f64 },

    /// A bitsandbytes 4-bit tensor set is inconsistent or incomplete.
    #[error("bitsandbytes 4-bit `{tensor}`: {why}")]
    Bnb { tensor: String, why: String },
}

/// Checks that a buffer has exactly the length an operation needs.
#[inline]
pub fn check_len(op: &'static str, what: &'static str, found: usize, expected: usize) -> Result<()> {
    if found == expected { Ok(()) } else { Err(Error::Shape { op, what, expected, found }) }
}

/// Multiplies dimensions, failing instead of wrapping.
pub fn checked_product(dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d).ok_or_else(|| Error::Overflow(alloc::format!("product of {dims:?}")))
    })
}

/// An `Invalid` error with a formatted reason.
#[inline]
pub fn invalid(op: &'static str, what: &'static str, why: impl Into<String>) -> Error {
    Error::Invalid { op, what, why: why.into() }
}
