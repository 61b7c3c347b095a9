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
    #[error("GPU: {}", gpu_message(.0))]
    Gpu(#[from] gristmill_kernels::KernelError),
}

/// What running out of GPU memory tells the user: the settings that decide how much is needed.
pub const OUT_OF_MEMORY: &str = "out of GPU memory (CUDA_ERROR_OUT_OF_MEMORY). Lower train.batch_size \
(raise train.grad_accum to keep the effective batch), data.max_seq_len or lora.r; keep \
train.compute_dtype = \"bf16\" (f32 activations take twice the memory) and model.base_precision = \"nf4\"; \
when generating, shorten the prompt or --max-new-tokens. Other programs on the GPU (nvidia-smi) hold memory too";

#[cfg(feature = "cuda")]
fn gpu_message(e: &gristmill_kernels::KernelError) -> String {
    // The driver's own text for this error is a bare "out of memory"; what to change is more use.
    if e.is_out_of_memory() { OUT_OF_MEMORY.to_string() } else { e.to_string() }
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

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use cudarc::driver::DriverError;
    use cudarc::driver::sys::CUresult;

    #[test]
    fn out_of_gpu_memory_names_the_settings_to_lower() {
        // A synthetic driver error: displaying it never calls into the driver library.
        let e = Error::from(gristmill_kernels::KernelError::Driver(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY)));
        let msg = e.to_string();
        assert_eq!(msg, format!("GPU: {OUT_OF_MEMORY}"));
        for setting in ["train.batch_size", "data.max_seq_len", "train.compute_dtype", "train.grad_accum"] {
            assert!(msg.contains(setting), "{setting} missing from: {msg}");
        }
        let shape = Error::from(gristmill_kernels::KernelError::shape("gemm", "a has 3 elements, expected 4"));
        assert_eq!(shape.to_string(), "GPU: gemm: a has 3 elements, expected 4");
        assert!(!gristmill_kernels::KernelError::shape("gemm", "x").is_out_of_memory());
    }
}
