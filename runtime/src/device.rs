//! Where computation runs: the CPU, or one CUDA GPU through our kernels.
//!
//! The CUDA driver is loaded at run time, so the same binary starts everywhere: without a driver
//! or a GPU, [`Device::cuda_if_available`] says why in one logged line and picks the CPU.

use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use gristmill_kernels::Gpu;
#[cfg(feature = "cuda")]
use std::sync::Arc;

/// A compute device.
#[derive(Debug, Clone)]
pub enum Device {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Arc<Gpu>),
}

impl Device {
    /// GPU `ordinal`, or an error saying why there is none.
    #[cfg(feature = "cuda")]
    pub fn cuda(ordinal: usize) -> Result<Self> {
        Ok(Device::Cuda(Arc::new(Gpu::new(ordinal)?)))
    }

    /// GPU `ordinal`: this build has no CUDA backend.
    #[cfg(not(feature = "cuda"))]
    pub fn cuda(_ordinal: usize) -> Result<Self> {
        Err(Error::Unsupported("this build of gristmill has no CUDA backend (feature `cuda`)".into()))
    }

    /// GPU 0 when there is one, else the CPU — after one warning through the `log` facade that
    /// says why (the CLI shows it on stderr).
    pub fn cuda_if_available() -> Self {
        match Self::cuda(0) {
            Ok(d) => d,
            Err(e) => {
                log::warn!("no usable CUDA GPU ({e}); running on the CPU");
                Device::Cpu
            }
        }
    }

    /// `auto` (a GPU when there is one), `cpu`, `cuda` or `cuda:N`.
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim() {
            "auto" => Ok(Self::cuda_if_available()),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Self::cuda(0),
            s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Self::cuda(n),
                _ => Err(Error::Invalid(format!("unknown device `{s}`: expected auto, cpu, cuda or cuda:N"))),
            },
        }
    }

    pub fn is_cuda(&self) -> bool {
        !matches!(self, Device::Cpu)
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => write!(f, "cuda:{} ({})", g.info().ordinal, g.info().name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert!(matches!(Device::parse("cpu"), Ok(Device::Cpu)));
        assert!(Device::parse("tpu").is_err());
        assert!(Device::parse("cuda:x").is_err());
        assert_eq!(Device::Cpu.to_string(), "cpu");
    }

    /// Without a GPU (CI), auto falls back to the CPU and an explicit request is an error, not a
    /// panic; with one, both give it.
    #[test]
    fn auto_never_panics() {
        let auto = Device::parse("auto").unwrap();
        match Device::parse("cuda") {
            Ok(d) => assert!(d.is_cuda() && auto.is_cuda()),
            Err(e) => {
                assert!(!auto.is_cuda());
                assert!(!e.to_string().is_empty());
            }
        }
    }
}
