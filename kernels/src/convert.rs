//! Launchers of kernels/cuda/convert.cu: f32 ↔ bf16.

use crate::check::{self, BenchRow, Check, Work};
use crate::error::{Result, check_len};
use crate::launch::{Float, grid_1d, ptr, ptr_mut};
use crate::{Gpu, bf16};
use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

/// y = x converted to D (round to nearest even into bf16; exact into f32; a copy when S = D).
/// x, y: (n)
pub fn cast<S: Float, D: Float>(gpu: &Gpu, x: &impl DevicePtr<S>, y: &mut impl DevicePtrMut<D>) -> Result<()> {
    const K: &str = "cast";
    check_len(K, "y", y.len(), x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let name = match (S::IS_BF16, D::IS_BF16) {
        (false, true) => "cast_fwd_f32_bf16",
        (true, false) => "cast_fwd_bf16_f32",
        _ => {
            // Same type: S and D are the same type, so the bytes copy as they are.
            let (src, dst) = (ptr(gpu, x), ptr_mut(gpu, y));
            // SAFETY: both buffers hold x.len() elements of the same size (checked above), on
            // this context; the copy is ordered on the one stream.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    dst,
                    src,
                    x.len() * std::mem::size_of::<S>(),
                    gpu.stream().cu_stream(),
                )
            }?;
            return Ok(());
        }
    };
    let n = x.len() as i64;
    let f = gpu.function("convert", name)?;
    let (px, py) = (ptr(gpu, x), ptr_mut(gpu, y));
    // One thread per 8 elements over the whole vector: many loads in flight, no tail loop.
    let cfg = grid_1d(x.len().div_ceil(8), 256);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&px).arg(&py).arg(&n);
    // SAFETY: the kernel reads n elements of x and writes n of y; both hold n (checked above).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Both directions on ragged, misaligned sizes: f32 → bf16 must round exactly as half does.
pub fn self_test(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    for n in [1usize, 7, 8, 1003] {
        let host = check::test_data(n + 1, n as u64, 3.0);
        let x = gpu.upload(&host)?;
        let mut y = gpu.zeros::<bf16>(n)?;
        cast::<f32, bf16>(gpu, &x.slice(1..), &mut y)?;
        let got: Vec<f32> = gpu.download(&y)?.iter().map(|v| v.to_f32()).collect();
        let want: Vec<f32> = host[1..].iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        out.push(Check {
            kernel: "cast_fwd_f32_bf16",
            shape: format!("n = {n}, offset 1"),
            rel_err: check::rel_err(&got, &want),
            tol: 0.0,
        });
        let mut back = gpu.zeros::<f32>(n)?;
        cast::<bf16, f32>(gpu, &y, &mut back)?;
        let got = gpu.download(&back)?;
        out.push(Check {
            kernel: "cast_fwd_bf16_f32",
            shape: format!("n = {n}"),
            rel_err: check::rel_err(&got, &want),
            tol: 0.0,
        });
    }
    Ok(out)
}

/// 4096 × 4096 elements each way.
pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    let n = 4096 * 4096;
    let x = gpu.upload(&check::test_data(n, 1, 1.0))?;
    let mut y = gpu.zeros::<bf16>(n)?;
    let mut z = gpu.zeros::<f32>(n)?;
    let t1 = check::time_median(gpu, 5, 20, || cast::<f32, bf16>(gpu, &x, &mut y))?;
    let t2 = check::time_median(gpu, 5, 20, || cast::<bf16, f32>(gpu, &y, &mut z))?;
    let shape = "n=4096x4096".to_string();
    Ok(vec![
        BenchRow { kernel: "cast_fwd_f32_bf16", shape: shape.clone(), seconds: t1, work: Work::Bytes(6.0 * n as f64) },
        BenchRow { kernel: "cast_fwd_bf16_f32", shape, seconds: t2, work: Work::Bytes(6.0 * n as f64) },
    ])
}
