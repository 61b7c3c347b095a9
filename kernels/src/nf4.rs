//! Launchers of kernels/cuda/nf4.cu.

use crate::Gpu;
use crate::check::{BenchRow, Check};
use crate::error::Result;

/// Every kernel of this module against its CPU reference on small, awkward shapes.
pub fn self_test(_gpu: &Gpu) -> Result<Vec<Check>> {
    Ok(Vec::new())
}

/// Every kernel of this module at realistic sizes.
pub fn bench(_gpu: &Gpu) -> Result<Vec<BenchRow>> {
    Ok(Vec::new())
}
