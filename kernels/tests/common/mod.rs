//! Shared by the GPU parity tests (each is `#[ignore = "needs a CUDA GPU"]`).
#![allow(dead_code)]

use gristmill_kernels::Gpu;

/// GPU 0, or a panic that says why there is none (these tests only run with --include-ignored,
/// on a machine that has one).
pub fn gpu() -> Gpu {
    match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => panic!("GPU test run without a usable GPU: {e}"),
    }
}
