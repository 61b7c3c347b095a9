//! The device runtime: one CUDA context and stream, a caching allocator, embedded modules loaded
//! once on first use, host↔device copies and event timing.
//!
//! Everything runs on one stream, so kernels and copies are ordered without events between them;
//! cudarc's per-buffer event tracking (meant for several streams) is switched off. Memory comes
//! from the driver's stream-ordered allocator (`cuMemAllocAsync`) with the device's default pool
//! told to keep freed memory (release threshold = ∞): after the first training step, buffers of
//! the same sizes are handed back from the pool without a driver round trip — a caching
//! allocator with no code of ours to get wrong.

use crate::error::{KernelError, Result};
use crate::ptx::{self, PtxModule};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits,
    sys,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Whether the CUDA driver library can be loaded. Always call this before anything else of
/// cudarc: with dynamic loading, a missing library panics on first use.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library and reports whether that worked.
    unsafe { sys::is_culib_present() }
}

/// What `gristmill doctor` reports of a device.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor)
    pub compute_capability: (i32, i32),
    pub total_mem: usize,
    pub free_mem: usize,
    /// CUDA version the driver supports, e.g. 13000 for 13.0.
    pub driver_version: i32,
    pub multiprocessors: i32,
}

/// One GPU: context, stream and the loaded modules.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: GpuInfo,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({}: {})", self.info.ordinal, self.info.name)
    }
}

impl Gpu {
    /// Opens GPU `ordinal`, or says why there is none (no driver library, no device, a driver
    /// too old for the embedded PTX, a GPU older than compute capability 8.0).
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(KernelError::NoDevice("the CUDA driver library (libcuda.so) was not found".into()));
        }
        let count = CudaContext::device_count().map_err(|e| KernelError::NoDevice(format!("cuInit failed: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(KernelError::NoDevice(format!("GPU {ordinal} requested, the driver sees {count}")));
        }
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: one stream only, and every buffer of this crate is used on it: the ordering the
        // events would enforce is already the stream's order.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = ctx.compute_capability()?;
        if major < 8 {
            return Err(KernelError::NoDevice(format!(
                "{} has compute capability {major}.{minor}; gristmill's kernels need 8.0 (Ampere) or newer",
                ctx.name()?
            )));
        }
        let mut driver_version = 0i32;
        // SAFETY: writes one int through a valid pointer.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }.result()?;
        let (free_mem, total_mem) = ctx.mem_get_info()?;
        let multiprocessors = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let info = GpuInfo {
            ordinal,
            name: ctx.name()?,
            compute_capability: (major, minor),
            total_mem,
            free_mem,
            driver_version,
            multiprocessors,
        };
        if ctx.has_async_alloc() {
            keep_freed_memory(&ctx)?;
        }
        Ok(Self { ctx, stream, info, modules: Mutex::new(HashMap::new()), functions: Mutex::new(HashMap::new()) })
    }

    /// The device as it was when opened (free memory is read again by [`Gpu::mem_info`]).
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// (free, total) bytes of device memory now.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    /// Whether the Hopper PTX (compute_90a) of a module can run here.
    pub fn is_hopper(&self) -> bool {
        self.info.compute_capability == (9, 0)
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch and copy of this crate goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Loads `module` (once) and returns its kernel `name` (cached).
    pub fn function(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        let mut fns = self.functions.lock().map_err(|_| poisoned(module))?;
        if let Some(f) = fns.get(&(module, name)) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f =
            m.load_function(name).map_err(|e| KernelError::Module { module, msg: format!("no kernel {name}: {e}") })?;
        fns.insert((module, name), f.clone());
        Ok(f)
    }

    fn module(&self, name: &'static str) -> Result<Arc<CudaModule>> {
        let mut mods = self.modules.lock().map_err(|_| poisoned(name))?;
        if let Some(m) = mods.get(name) {
            return Ok(m.clone());
        }
        let pm: &PtxModule =
            ptx::module(name).ok_or(KernelError::Module { module: name, msg: "not embedded".into() })?;
        let src = match (self.is_hopper(), pm.sm90a) {
            (true, Some(h)) => h,
            _ => pm.sm80,
        };
        let m = self.ctx.load_module(Ptx::from_src(src)).map_err(|e| KernelError::Module {
            module: name,
            msg: format!("the driver could not load it ({e}); PTX from nvcc 13.0 needs driver 580 or newer"),
        })?;
        mods.insert(name, m.clone());
        Ok(m)
    }

    /// Loads every embedded module; an error names the first that fails.
    pub fn load_all(&self) -> Result<()> {
        for m in ptx::MODULES {
            self.module(m.name)?;
        }
        Ok(())
    }

    /// A zeroed buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros::<T>(n)?)
    }

    /// A buffer of `n` elements whose contents are undefined until written.
    pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the memory is uninitialized; every caller writes it fully before reading (the
        // kernels that take an output overwrite every element of it).
        Ok(unsafe { self.stream.alloc::<T>(n) }?)
    }

    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(host)?)
    }

    /// Copies `host` into the existing buffer `dst` (same length).
    pub fn upload_into<T: DeviceRepr>(&self, host: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
        if host.len() != dst.len() {
            return Err(KernelError::shape("upload_into", format!("{} host elements into {}", host.len(), dst.len())));
        }
        Ok(self.stream.memcpy_htod(host, dst)?)
    }

    /// Copies a device buffer (or view) to a new host vector; waits for the stream.
    pub fn download<T: DeviceRepr + Default + Clone, S: DevicePtr<T>>(&self, src: &S) -> Result<Vec<T>> {
        Ok(self.stream.clone_dtoh(src)?)
    }

    /// Waits until everything queued on the stream has run.
    pub fn sync(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// An event for timing (recorded with [`Gpu::record`]).
    pub fn event(&self) -> Result<CudaEvent> {
        Ok(self.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?)
    }

    /// Records `ev` on the stream.
    pub fn record(&self, ev: &CudaEvent) -> Result<()> {
        Ok(ev.record(&self.stream)?)
    }
}

fn poisoned(module: &'static str) -> KernelError {
    KernelError::Module { module, msg: "a thread panicked while loading it".into() }
}

/// Tells the device's default memory pool to keep memory freed into it instead of returning it
/// to the driver at every synchronization.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer and the device handle comes from a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result()?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the release-threshold attribute takes a pointer to a u64, which `threshold` is.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()?;
    Ok(())
}
