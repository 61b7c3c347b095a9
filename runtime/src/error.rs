//! The runtime's error type. Every message names the file, tensor or field at fault, what was
//! expected and what was found.

use std::path::PathBuf;

/// Result alias of the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read, mapped or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file is not in the format it claims, or is damaged.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },

    /// A tensor is missing, or has the wrong dtype or shape.
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },

    /// A model configuration field is missing, malformed or unsupported.
    #[error("config: {msg}")]
    Config { msg: String },

    /// Something gristmill does not do (yet), said plainly.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The tokenizer or chat template failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A bad argument from the caller (a sampling parameter, a prompt longer than the context).
    #[error("{0}")]
    Invalid(String),

    /// An error of the core (shapes, NF4, linear algebra).
    #[error(transparent)]
    Core(#[from] gristmill_core::Error),
    /// The GPU: driver, kernel launch or a launcher's shape check.
    #[cfg(feature = "cuda")]
    #[error("GPU: {0}")]
    Gpu(#[from] gristmill_kernels::KernelError),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// A format error in `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }

    /// A problem with the tensor `name`.
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor { name: name.into(), msg: msg.into() }
    }

    /// A problem with the model configuration.
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config { msg: msg.into() }
    }
}
