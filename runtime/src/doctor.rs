//! `gristmill doctor` and `gristmill bench kernels`: what the GPU is, whether every embedded PTX
//! module loads, whether every kernel matches its CPU reference, and how fast each one runs.
//!
//! Both work without a GPU: the report then says why none is usable and that gristmill runs on the
//! CPU, and counts as passed (a machine without a GPU is not a broken install).
//!
//! The kernel families are listed once, in [`FAMILIES`]; each brings its own `self_test` and
//! `bench` (in `gristmill_kernels::<module>`), so this file never duplicates a kernel's check.
//! A family whose self-test fails with an error, or panics, becomes a failed line of the report:
//! the other families still run.

use gristmill_kernels::check::{BenchRow, Check, Work};
use gristmill_kernels::{CudaSlice, Gpu, attention, convert, elementwise, gemm, grit, loss, nf4, optim};
use serde::Serialize;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

type SelfTest = fn(&Gpu) -> gristmill_kernels::Result<Vec<Check>>;
type Bench = fn(&Gpu) -> gristmill_kernels::Result<Vec<BenchRow>>;

/// One kernel family: the PTX module it lives in, with its self-test and benchmark.
pub struct Family {
    /// The module name, as in `gristmill_kernels::ptx::MODULES`.
    pub module: &'static str,
    pub self_test: SelfTest,
    pub bench: Bench,
}

/// Every kernel family, one per embedded PTX module (a test keeps the two lists equal).
pub const FAMILIES: &[Family] = &[
    Family { module: "elementwise", self_test: elementwise::self_test, bench: elementwise::bench },
    Family { module: "gemm", self_test: gemm::self_test, bench: gemm::bench },
    Family { module: "attention", self_test: attention::self_test, bench: attention::bench },
    Family { module: "loss", self_test: loss::self_test, bench: loss::bench },
    Family { module: "optim", self_test: optim::self_test, bench: optim::bench },
    Family { module: "nf4", self_test: nf4::self_test, bench: nf4::bench },
    Family { module: "convert", self_test: convert::self_test, bench: convert::bench },
    Family { module: "grit", self_test: grit::self_test, bench: grit::bench },
];

/// Bytes of each buffer of the device-copy measurement (512 MiB: far beyond any cache).
pub const COPY_BYTES: usize = 512 << 20;

/// The device, as both reports describe it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceSummary {
    pub ordinal: usize,
    pub name: String,
    /// "9.0"
    pub compute_capability: String,
    pub multiprocessors: i32,
    pub total_mem_bytes: u64,
    pub free_mem_bytes: u64,
    /// The newest CUDA version the driver supports, "13.0".
    pub driver_cuda: String,
}

impl DeviceSummary {
    fn of(gpu: &Gpu) -> Self {
        let info = gpu.info();
        // Free memory now rather than when the context opened; the figure at opening will do if
        // the driver cannot say.
        let (free, total) = gpu.mem_info().unwrap_or((info.free_mem, info.total_mem));
        let (major, minor) = info.compute_capability;
        DeviceSummary {
            ordinal: info.ordinal,
            name: info.name.clone(),
            compute_capability: format!("{major}.{minor}"),
            multiprocessors: info.multiprocessors,
            total_mem_bytes: total as u64,
            free_mem_bytes: free as u64,
            driver_cuda: cuda_version(info.driver_version),
        }
    }
}

impl fmt::Display for DeviceSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "GPU {}: {}, compute capability {}, {} SMs",
            self.ordinal, self.name, self.compute_capability, self.multiprocessors
        )?;
        writeln!(f, "driver: supports CUDA {}", self.driver_cuda)?;
        writeln!(f, "memory: {} total, {} free", gib(self.total_mem_bytes), gib(self.free_mem_bytes))
    }
}

/// `cuDriverGetVersion`'s integer as "major.minor": 13000 → "13.0", 12040 → "12.4".
pub fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Whether one embedded PTX module loaded.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleLoad {
    pub module: &'static str,
    pub ok: bool,
    pub error: Option<String>,
}

/// One kernel's self-test result.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    pub module: &'static str,
    pub kernel: &'static str,
    pub shape: String,
    /// max |gpu − ref| / max |ref|; null in JSON when not finite (a NaN or a length mismatch).
    pub rel_err: f64,
    pub tol: f64,
    pub ok: bool,
}

/// A kernel family whose self-test or benchmark returned an error (or panicked).
#[derive(Debug, Clone, Serialize)]
pub struct FamilyError {
    pub module: &'static str,
    pub error: String,
}

/// Why no GPU is used: the one line both reports print instead of a device.
fn no_gpu_reason() -> Result<Gpu, String> {
    if !gristmill_kernels::driver_present() {
        return Err("the NVIDIA driver library (libcuda.so) could not be loaded".into());
    }
    Gpu::new(0).map_err(|e| e.to_string())
}

/// What `gristmill doctor` found.
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    pub gristmill: &'static str,
    /// Set when there is no usable GPU: why.
    pub no_gpu: Option<String>,
    pub device: Option<DeviceSummary>,
    /// One entry per embedded module.
    pub ptx: Vec<ModuleLoad>,
    pub checks: Vec<CheckRow>,
    /// Families whose self-test returned no checks (none written yet).
    pub untested: Vec<&'static str>,
    pub errors: Vec<FamilyError>,
}

impl DoctorReport {
    /// True without a GPU; with one, when every module loads and every check passes.
    pub fn ok(&self) -> bool {
        self.failures() == 0
    }

    /// Modules that did not load, checks that failed and families that erred.
    pub fn failures(&self) -> usize {
        self.ptx.iter().filter(|m| !m.ok).count() + self.checks.iter().filter(|c| !c.ok).count() + self.errors.len()
    }

    /// The report as JSON (the same fields, plus `ok`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "gristmill": self.gristmill,
            "ok": self.ok(),
            "no_gpu": self.no_gpu,
            "device": self.device,
            "ptx": self.ptx,
            "checks": self.checks,
            "untested": self.untested,
            "errors": self.errors,
        })
    }

    fn verdict(&self) -> String {
        if let Some(why) = &self.no_gpu {
            return format!("no usable CUDA GPU: {why}");
        }
        let n = self.checks.len();
        let untested = if self.untested.is_empty() {
            String::new()
        } else {
            format!("; no self-test yet: {}", self.untested.join(", "))
        };
        if self.ok() {
            format!(
                "verdict: ok: {} PTX modules load, {n} kernel checks match their CPU references{untested}",
                self.ptx.len()
            )
        } else {
            let bad_ptx = self.ptx.iter().filter(|m| !m.ok).count();
            let bad = self.checks.iter().filter(|c| !c.ok).count();
            format!(
                "verdict: FAILED: {bad} of {n} kernel checks, {bad_ptx} of {} PTX modules, {} families with errors{untested}",
                self.ptx.len(),
                self.errors.len()
            )
        }
    }
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "gristmill {} doctor", self.gristmill)?;
        let Some(dev) = &self.device else {
            writeln!(f, "{}", self.verdict())?;
            return writeln!(f, "gristmill runs on the CPU here: every command works, through the reference kernels");
        };
        write!(f, "{dev}")?;
        let loaded = self.ptx.iter().filter(|m| m.ok).count();
        let names: Vec<&str> = self.ptx.iter().map(|m| m.module).collect();
        writeln!(f, "PTX modules: {loaded} of {} load ({})", self.ptx.len(), names.join(", "))?;
        for m in self.ptx.iter().filter(|m| !m.ok) {
            writeln!(f, "  FAIL {}: {}", m.module, m.error.as_deref().unwrap_or("?"))?;
        }
        writeln!(f)?;
        writeln!(f, "self-test: every kernel against its CPU reference (rel err = max |gpu − ref| / max |ref|)")?;
        let rows: Vec<Vec<String>> = self
            .checks
            .iter()
            .map(|c| {
                vec![
                    c.kernel.to_string(),
                    c.shape.clone(),
                    format!("{:.2e}", c.rel_err),
                    format!("{:.0e}", c.tol),
                    if c.ok { "ok" } else { "FAIL" }.to_string(),
                ]
            })
            .collect();
        write!(f, "{}", table(&["kernel", "shape", "rel err", "tol", ""], &[false, false, true, true, false], &rows))?;
        for e in &self.errors {
            writeln!(f, "FAIL {}: {}", e.module, e.error)?;
        }
        writeln!(f)?;
        writeln!(f, "{}", self.verdict())
    }
}

/// Runs the doctor: the device, every module's load, every family's self-test.
pub fn doctor() -> DoctorReport {
    let mut r = DoctorReport {
        gristmill: crate::VERSION,
        no_gpu: None,
        device: None,
        ptx: Vec::new(),
        checks: Vec::new(),
        untested: Vec::new(),
        errors: Vec::new(),
    };
    let gpu = match no_gpu_reason() {
        Ok(g) => g,
        Err(why) => {
            r.no_gpu = Some(why);
            return r;
        }
    };
    r.device = Some(DeviceSummary::of(&gpu));
    r.ptx = module_loads(&gpu);
    for fam in FAMILIES {
        match guarded(fam.module, || (fam.self_test)(&gpu)) {
            Ok(checks) if checks.is_empty() => r.untested.push(fam.module),
            Ok(checks) => r.checks.extend(checks.into_iter().map(|c| CheckRow {
                module: fam.module,
                kernel: c.kernel,
                ok: c.passed(),
                shape: c.shape,
                rel_err: c.rel_err,
                tol: c.tol,
            })),
            Err(e) => r.errors.push(e),
        }
    }
    r
}

/// Whether each embedded module loads. [`Gpu::load_all`] loads them in order and stops at the
/// first that fails: those before it loaded, it failed, those after it were not tried.
fn module_loads(gpu: &Gpu) -> Vec<ModuleLoad> {
    use gristmill_kernels::KernelError;
    let names = gristmill_kernels::ptx::MODULES.iter().map(|m| m.name);
    let (failed, msg) = match gpu.load_all() {
        Ok(()) => return names.map(|module| ModuleLoad { module, ok: true, error: None }).collect(),
        Err(KernelError::Module { module, msg }) => (Some(module), msg),
        // Not a module's own fault (the context is broken): every module is unverified.
        Err(e) => (None, e.to_string()),
    };
    let mut past = failed.is_none();
    names
        .map(|module| {
            if Some(module) == failed {
                past = true;
                ModuleLoad { module, ok: false, error: Some(msg.clone()) }
            } else if past {
                let why = failed.map_or_else(|| msg.clone(), |f| format!("not tried: {f} failed first"));
                ModuleLoad { module, ok: false, error: Some(why) }
            } else {
                ModuleLoad { module, ok: true, error: None }
            }
        })
        .collect()
}

/// Runs `f`, turning an error or a panic into a [`FamilyError`] of `module`.
fn guarded<T>(
    module: &'static str,
    f: impl FnOnce() -> gristmill_kernels::Result<T>,
) -> std::result::Result<T, FamilyError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(FamilyError { module, error: e.to_string() }),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Err(FamilyError { module, error: format!("panicked: {msg}") })
        }
    }
}

/// The nominal dense bf16 tensor-core peak of a GPU, in TFLOP/s, from its name (spec-sheet
/// figures without sparsity); `None` for a card not in the table.
pub fn nominal_bf16_peak_tflops(name: &str) -> Option<f64> {
    // Most specific first: the PCIe and NVL boards run lower clocks and power than SXM.
    const TABLE: &[(&str, f64)] = &[
        ("H100 PCIe", 756.0),
        ("H100 NVL", 835.0),
        ("H200 NVL", 835.0),
        ("H100", 989.0),
        ("H200", 989.0),
        ("A100", 312.0),
    ];
    TABLE.iter().find(|(pat, _)| name.contains(pat)).map(|&(_, t)| t)
}

/// The device-copy measurement every memory-bound row is compared with.
#[derive(Debug, Clone, Serialize)]
pub struct CopyBandwidth {
    /// Bytes read plus written by one copy.
    pub bytes: f64,
    /// Median time of one copy.
    pub seconds: f64,
    pub gb_per_s: f64,
}

/// One benchmark row with its rate and how close it comes to the device's limit.
#[derive(Debug, Clone, Serialize)]
pub struct BenchLine {
    pub module: &'static str,
    pub kernel: &'static str,
    pub shape: String,
    pub seconds: f64,
    /// GB/s or TFLOP/s, per `unit`.
    pub rate: f64,
    pub unit: &'static str,
    /// Percent of the measured copy bandwidth (GB/s rows) or of the nominal bf16 peak (TFLOP/s
    /// rows); `None` when that figure is unknown.
    pub percent: Option<f64>,
}

impl BenchLine {
    fn of(module: &'static str, row: &BenchRow, copy_gbs: Option<f64>, peak_tflops: Option<f64>) -> Self {
        let (rate, unit) = row.rate();
        let limit = match row.work {
            Work::Bytes(_) => copy_gbs,
            Work::Flops(_) => peak_tflops,
        };
        BenchLine {
            module,
            kernel: row.kernel,
            shape: row.shape.clone(),
            seconds: row.seconds,
            rate,
            unit,
            percent: limit.filter(|l| *l > 0.0).map(|l| 100.0 * rate / l),
        }
    }
}

/// What `gristmill bench kernels` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub gristmill: &'static str,
    pub no_gpu: Option<String>,
    pub device: Option<DeviceSummary>,
    pub copy: Option<CopyBandwidth>,
    /// The nominal dense bf16 peak of this GPU, when it is in the table.
    pub peak_bf16_tflops: Option<f64>,
    pub rows: Vec<BenchLine>,
    /// Families with no benchmark rows (none written yet).
    pub unmeasured: Vec<&'static str>,
    /// The copy measurement's error (module "copy") and every family's.
    pub errors: Vec<FamilyError>,
}

impl BenchReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "gristmill": self.gristmill,
            "ok": self.ok(),
            "no_gpu": self.no_gpu,
            "device": self.device,
            "copy": self.copy,
            "peak_bf16_tflops": self.peak_bf16_tflops,
            "peak_is_nominal": true,
            "rows": self.rows,
            "unmeasured": self.unmeasured,
            "errors": self.errors,
        })
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "gristmill {} bench kernels", self.gristmill)?;
        let Some(dev) = &self.device else {
            writeln!(f, "no usable CUDA GPU: {}", self.no_gpu.as_deref().unwrap_or("?"))?;
            return writeln!(f, "nothing to measure: gristmill runs on the CPU here");
        };
        write!(f, "{dev}")?;
        match &self.copy {
            Some(c) => writeln!(
                f,
                "device copy (cuMemcpyDtoD of {} MiB; read + written bytes): {:.0} GB/s, {:.1} µs",
                COPY_BYTES >> 20,
                c.gb_per_s,
                c.seconds * 1e6
            )?,
            None => writeln!(f, "device copy: not measured")?,
        }
        match self.peak_bf16_tflops {
            Some(p) => writeln!(f, "dense bf16 peak: {p:.0} TFLOP/s (nominal, from the spec sheet; not measured)")?,
            None => writeln!(f, "dense bf16 peak: n/a (this GPU is not in the table of nominal peaks)")?,
        }
        writeln!(f)?;
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let of = if r.unit == "GB/s" { "of copy" } else { "of peak" };
                vec![
                    r.kernel.to_string(),
                    r.shape.clone(),
                    format!("{:.1}", r.seconds * 1e6),
                    format!("{:.1} {}", r.rate, r.unit),
                    r.percent.map_or_else(|| "n/a".to_string(), |p| format!("{p:.1}% {of}")),
                ]
            })
            .collect();
        write!(
            f,
            "{}",
            table(&["kernel", "shape", "time µs", "rate", "% of limit"], &[false, false, true, true, true], &rows)
        )?;
        if !self.unmeasured.is_empty() {
            writeln!(f, "no benchmark yet: {}", self.unmeasured.join(", "))?;
        }
        for e in &self.errors {
            writeln!(f, "FAIL {}: {}", e.module, e.error)?;
        }
        writeln!(f, "memory-bound rows: % of the measured device copy; compute rows: % of the nominal dense bf16 peak")
    }
}

/// Measures the device copy, then runs every family's benchmark.
pub fn bench_kernels() -> BenchReport {
    let mut r = BenchReport {
        gristmill: crate::VERSION,
        no_gpu: None,
        device: None,
        copy: None,
        peak_bf16_tflops: None,
        rows: Vec::new(),
        unmeasured: Vec::new(),
        errors: Vec::new(),
    };
    let gpu = match no_gpu_reason() {
        Ok(g) => g,
        Err(why) => {
            r.no_gpu = Some(why);
            return r;
        }
    };
    let dev = DeviceSummary::of(&gpu);
    r.peak_bf16_tflops = nominal_bf16_peak_tflops(&dev.name);
    r.device = Some(dev);
    match guarded("copy", || copy_bandwidth(&gpu)) {
        Ok(c) => r.copy = Some(c),
        Err(e) => r.errors.push(e),
    }
    let copy_gbs = r.copy.as_ref().map(|c| c.gb_per_s);
    for fam in FAMILIES {
        match guarded(fam.module, || (fam.bench)(&gpu)) {
            Ok(rows) if rows.is_empty() => r.unmeasured.push(fam.module),
            Ok(rows) => {
                r.rows.extend(rows.iter().map(|row| BenchLine::of(fam.module, row, copy_gbs, r.peak_bf16_tflops)))
            }
            Err(e) => r.errors.push(e),
        }
    }
    r
}

/// Device-to-device copy of [`COPY_BYTES`]: the bandwidth a memory-bound kernel can hope for.
fn copy_bandwidth(gpu: &Gpu) -> gristmill_kernels::Result<CopyBandwidth> {
    let src: CudaSlice<u8> = gpu.zeros(COPY_BYTES)?;
    let mut dst: CudaSlice<u8> = gpu.zeros(COPY_BYTES)?;
    let stream = gpu.stream().clone();
    let seconds = gristmill_kernels::check::time_median(gpu, 3, 20, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    let bytes = 2.0 * COPY_BYTES as f64;
    Ok(CopyBandwidth { bytes, seconds, gb_per_s: bytes / seconds / 1e9 })
}

/// A plain-text table: a header, a rule, the rows; `right` aligns a column to the right.
fn table(header: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, cell) in cells.enumerate() {
            let pad = width[i].saturating_sub(cell.chars().count());
            if i > 0 {
                s.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                s.push_str(&" ".repeat(pad));
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.push_str(&" ".repeat(pad));
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&mut header.iter().copied());
    out.push_str(&line(&mut width.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>().iter().map(String::as_str)));
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_module_is_a_family() {
        let embedded: Vec<&str> = gristmill_kernels::ptx::MODULES.iter().map(|m| m.name).collect();
        let families: Vec<&str> = FAMILIES.iter().map(|f| f.module).collect();
        assert_eq!(embedded, families);
    }

    #[test]
    fn driver_versions_read_as_major_minor() {
        assert_eq!(cuda_version(13000), "13.0");
        assert_eq!(cuda_version(12040), "12.4");
        assert_eq!(cuda_version(12090), "12.9");
    }

    #[test]
    fn nominal_peaks_by_name() {
        assert_eq!(nominal_bf16_peak_tflops("NVIDIA H100 80GB HBM3"), Some(989.0));
        assert_eq!(nominal_bf16_peak_tflops("NVIDIA H200"), Some(989.0));
        assert_eq!(nominal_bf16_peak_tflops("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(nominal_bf16_peak_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(nominal_bf16_peak_tflops("NVIDIA GeForce RTX 4090"), None);
    }

    #[test]
    fn bench_lines_compare_with_the_right_limit() {
        let mem = BenchRow { kernel: "k_bf16", shape: "(4096, 4096)".into(), seconds: 1e-5, work: Work::Bytes(2e7) };
        let l = BenchLine::of("elementwise", &mem, Some(4000.0), Some(989.0));
        assert_eq!(l.unit, "GB/s");
        assert!((l.rate / 2000.0 - 1.0).abs() < 1e-12);
        assert!((l.percent.unwrap() / 50.0 - 1.0).abs() < 1e-12);
        let flops = BenchRow { kernel: "g_bf16", shape: "M=N=K=4096".into(), seconds: 1e-3, work: Work::Flops(5e11) };
        let l = BenchLine::of("gemm", &flops, Some(4000.0), None);
        assert_eq!(l.unit, "TFLOP/s");
        assert!((l.rate / 500.0 - 1.0).abs() < 1e-12);
        assert_eq!(l.percent, None);
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["kernel", "err"],
            &[false, true],
            &[vec!["a".into(), "1.0".into()], vec!["longer_name".into(), "10.25".into()]],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "kernel         err");
        assert_eq!(lines[1], "-----------  -----");
        assert_eq!(lines[2], "a              1.0");
        assert_eq!(lines[3], "longer_name  10.25");
    }

    #[test]
    fn a_failed_check_fails_the_doctor() {
        let mut r = DoctorReport {
            gristmill: "0",
            no_gpu: None,
            device: None,
            ptx: vec![ModuleLoad { module: "elementwise", ok: true, error: None }],
            checks: vec![CheckRow {
                module: "elementwise",
                kernel: "x_fwd_f32",
                shape: "(3, 5)".into(),
                rel_err: 1e-7,
                tol: 1e-6,
                ok: true,
            }],
            untested: vec!["gemm"],
            errors: Vec::new(),
        };
        assert!(r.ok());
        assert!(r.verdict().starts_with("verdict: ok"), "{}", r.verdict());
        r.checks[0].ok = false;
        assert!(!r.ok());
        assert!(r.verdict().contains("FAILED: 1 of 1 kernel checks"), "{}", r.verdict());
        let j = r.to_json();
        assert_eq!(j["ok"], false);
        assert_eq!(j["checks"][0]["kernel"], "x_fwd_f32");
    }

    #[test]
    fn panics_and_errors_become_family_errors() {
        let e = guarded::<()>("gemm", || panic!("boom")).unwrap_err();
        assert_eq!((e.module, e.error.as_str()), ("gemm", "panicked: boom"));
        let e = guarded::<()>("loss", || Err(gristmill_kernels::KernelError::shape("k", "bad"))).unwrap_err();
        assert_eq!(e.error, "k: bad");
    }

    /// Whatever the machine: without a GPU the reports say why and pass; with one they list the
    /// device. (CI has none, so there this checks the CPU path.)
    #[test]
    fn doctor_reports_the_machine_it_runs_on() {
        let r = doctor();
        assert_eq!(r.no_gpu.is_some(), r.device.is_none());
        let text = r.to_string();
        if let Some(why) = &r.no_gpu {
            assert!(r.ok());
            assert!(!why.is_empty());
            assert!(text.contains("no usable CUDA GPU"), "{text}");
            assert!(text.contains("runs on the CPU"), "{text}");
            assert_eq!(r.to_json()["ok"], true);
        } else {
            assert!(text.contains("PTX modules"), "{text}");
        }
    }
}
