//! What every launcher shares: the element types kernels are instantiated for, raw pointers of
//! buffers and views, and launch geometry.
//!
//! A launcher looks like this:
//!
//! ```ignore
//! pub fn swiglu_fwd<T: Float>(gpu: &Gpu, g: &impl DevicePtr<T>, u: &impl DevicePtr<T>,
//!                             out: &mut impl DevicePtrMut<T>) -> Result<()> {
//!     const K: &str = "swiglu_fwd";
//!     check_len(K, "u", u.len(), g.len())?;            // every size checked before launching
//!     check_len(K, "out", out.len(), g.len())?;
//!     let n = to_i32(K, "n", g.len())?;
//!     let f = gpu.function("elementwise", T::pick("swiglu_fwd_f32", "swiglu_fwd_bf16"))?;
//!     let (pg, pu, po) = (ptr(gpu, g), ptr(gpu, u), ptr_mut(gpu, out));
//!     let mut b = gpu.stream().launch_builder(&f);
//!     b.arg(&pg).arg(&pu).arg(&po).arg(&n);
//!     // SAFETY: the kernel reads n elements of g and u and writes n of out; all three hold n.
//!     unsafe { b.launch(grid_1d(g.len(), 256)) }?;
//!     Ok(())
//! }
//! ```

use crate::Gpu;
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, ValidAsZeroBits, sys};
use half::bf16;

/// An element type kernels are instantiated for: f32 or bf16.
pub trait Float: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static {
    /// Whether this is bf16.
    const IS_BF16: bool;
    /// `f32_name` or `bf16_name` after the type.
    fn pick(f32_name: &'static str, bf16_name: &'static str) -> &'static str {
        if Self::IS_BF16 { bf16_name } else { f32_name }
    }
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even for bf16.
    fn from_f32(x: f32) -> Self;
}

impl Float for f32 {
    const IS_BF16: bool = false;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Float for bf16 {
    const IS_BF16: bool = true;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// The device address of a buffer or view, to pass to a kernel.
///
/// Event tracking is off in [`Gpu`] (one stream), so the guard cudarc returns does nothing and
/// is dropped at once.
pub fn ptr<T>(gpu: &Gpu, s: &impl DevicePtr<T>) -> sys::CUdeviceptr {
    s.device_ptr(gpu.stream()).0
}

/// The device address of a buffer or view the kernel writes.
pub fn ptr_mut<T>(gpu: &Gpu, s: &mut impl DevicePtrMut<T>) -> sys::CUdeviceptr {
    s.device_ptr_mut(gpu.stream()).0
}

/// One thread per element, `block` threads a block.
pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).clamp(1, i32::MAX as usize) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// `rows` blocks of `block` threads (one block a row).
pub fn grid_rows(rows: usize, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}
