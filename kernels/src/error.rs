//! Errors of the device runtime and the launchers.

use cudarc::driver::DriverError;

/// What can go wrong on the device.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    /// The driver library is missing or there is no usable GPU.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A launcher was given buffers or sizes that do not fit the kernel.
    #[error("{kernel}: {msg}")]
    Shape { kernel: &'static str, msg: String },
    /// An embedded PTX module or one of its functions could not be loaded.
    #[error("PTX module {module}: {msg}")]
    Module { module: &'static str, msg: String },
}

/// Result of the device runtime and the launchers.
pub type Result<T> = std::result::Result<T, KernelError>;

impl KernelError {
    /// A shape error of `kernel`.
    pub fn shape(kernel: &'static str, msg: impl Into<String>) -> Self {
        Self::Shape { kernel, msg: msg.into() }
    }

    /// Whether the device ran out of memory: an allocation (the stream-ordered pool included) or
    /// a launch that needed more than was free.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Self::Driver(DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)))
    }
}

/// Fails with a shape error unless `got == want`; `what` names the buffer or size.
pub fn check_len(kernel: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(KernelError::shape(kernel, format!("{what} has {got} elements, expected {want}")))
    }
}

/// Fails with a shape error unless `got >= want`.
pub fn check_min(kernel: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got >= want {
        Ok(())
    } else {
        Err(KernelError::shape(kernel, format!("{what} has {got} elements, needs at least {want}")))
    }
}

/// `n` as the i32 a kernel takes, or a shape error when it does not fit.
pub fn to_i32(kernel: &'static str, what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| KernelError::shape(kernel, format!("{what} = {n} does not fit in 32 bits")))
}
