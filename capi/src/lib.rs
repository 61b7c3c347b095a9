//! The C ABI of gristmill, declared in `include/gristmill.h` (written by hand and checked in; a
//! test compiles it and checks it against these definitions).
//!
//! The rules the header states, and how they are kept here:
//!
//! - Handles are opaque pointers, made by a `*_load` function and released by their `*_free`
//!   function; memory the library hands out (strings, token arrays) has its own free function.
//! - Strings are NUL-terminated UTF-8, in and out.
//! - Every function that can fail returns a status: `GRISTMILL_OK` (0) or an error code, with the
//!   message in [`gristmill_last_error`] (per thread, until the next failing call).
//! - Callbacks are C function pointers with a `void *user` handed back unchanged.
//! - No Rust panic crosses the boundary: every entry point runs its body under
//!   [`std::panic::catch_unwind`] and turns a panic into `GRISTMILL_ERR_INTERNAL`.
//!
//! ```c
//! gristmill_model *m;
//! if (gristmill_model_load("models/tiny", NULL, "cpu", GRISTMILL_PRECISION_AS_STORED, &m) != GRISTMILL_OK) {
//!     fprintf(stderr, "%s\n", gristmill_last_error());
//!     return 1;
//! }
//! ```
#![allow(non_camel_case_types)]

use gristmill::api::{self, BasePrecision, Device, ErrorKind, LoadOptions, MergeOptions, Model, Record, StopReason};
use std::any::Any;
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// What a function returns: `GRISTMILL_OK` or one of the `GRISTMILL_ERR_*` codes.
pub type gristmill_status = i32;

/// Success.
pub const GRISTMILL_OK: gristmill_status = 0;
/// A NULL or non-UTF-8 argument, an out-of-range value, a prompt longer than the context.
pub const GRISTMILL_ERR_INVALID_ARGUMENT: gristmill_status = 1;
/// A file could not be opened, read or written.
pub const GRISTMILL_ERR_IO: gristmill_status = 2;
/// A file is not in the format it claims, or is damaged.
pub const GRISTMILL_ERR_FORMAT: gristmill_status = 3;
/// A tensor is missing or has the wrong dtype or shape.
pub const GRISTMILL_ERR_TENSOR: gristmill_status = 4;
/// A model or training configuration is wrong.
pub const GRISTMILL_ERR_CONFIG: gristmill_status = 5;
/// Something gristmill does not do.
pub const GRISTMILL_ERR_UNSUPPORTED: gristmill_status = 6;
/// The tokenizer or the chat template failed, or a text holds a NUL byte.
pub const GRISTMILL_ERR_TOKENIZER: gristmill_status = 7;
/// The core's checks (shapes, NF4, linear algebra).
pub const GRISTMILL_ERR_CORE: gristmill_status = 8;
/// The GPU: driver, kernel launch.
pub const GRISTMILL_ERR_GPU: gristmill_status = 9;
/// A bug in gristmill (a caught panic); the message says where.
pub const GRISTMILL_ERR_INTERNAL: gristmill_status = 10;

/// `precision` of [`gristmill_model_load`]: the weights as the checkpoint stores them.
pub const GRISTMILL_PRECISION_AS_STORED: i32 = 0;
/// Every linear weight quantized to NF4 at load (QLoRA's base).
pub const GRISTMILL_PRECISION_NF4: i32 = 1;
/// Every linear weight dense f32.
pub const GRISTMILL_PRECISION_F32: i32 = 2;

/// [`gristmill_generation::stop`]: the model wrote its end-of-sequence token.
pub const GRISTMILL_STOP_EOS: i32 = 0;
/// A stop string appeared (it is not part of the text).
pub const GRISTMILL_STOP_STRING: i32 = 1;
/// `max_new_tokens` were generated.
pub const GRISTMILL_STOP_MAX_TOKENS: i32 = 2;
/// The model's context is full.
pub const GRISTMILL_STOP_CONTEXT: i32 = 3;
/// The text callback returned false.
pub const GRISTMILL_STOP_CALLBACK: i32 = 4;

/// A loaded model: opaque to C.
pub struct gristmill_model {
    model: Model,
}

/// How to sample; [`gristmill_sampling_default`] fills in the defaults (greedy, 256 tokens).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct gristmill_sampling {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: u32,
    /// Nucleus sampling; 1 = off.
    pub top_p: f32,
    /// > 1 discourages repeats; 1 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
    pub max_new_tokens: u32,
    /// `n_stop` UTF-8 strings that end the generation; NULL when `n_stop` is 0.
    pub stop: *const *const c_char,
    pub n_stop: usize,
}

/// What a generation did.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct gristmill_generation {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// One of the `GRISTMILL_STOP_*` values.
    pub stop: i32,
    /// Seconds on the prompt and on the new tokens.
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// One optimizer step of a training run, as the step callback sees it. Metrics a step does not
/// have are NaN.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct gristmill_step {
    /// Optimizer steps done.
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub eval_loss: f64,
    pub elapsed_s: f64,
    /// The whole record as one JSON object (as in `metrics.jsonl`); valid during the callback.
    pub json: *const c_char,
}

/// How a training run ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct gristmill_train_result {
    pub steps: usize,
    pub total_steps: usize,
    pub last_loss: f64,
    /// NaN without validation data.
    pub eval_loss: f64,
    pub seconds: f64,
    pub tokens: u64,
    /// The step callback (or Ctrl-C) stopped the run; a checkpoint was written.
    pub interrupted: bool,
    pub early_stopped: bool,
}

/// Receives each new piece of generated text (`len` bytes of UTF-8, NUL-terminated); returns
/// false to stop.
pub type gristmill_text_fn = Option<unsafe extern "C" fn(piece: *const c_char, len: usize, user: *mut c_void) -> bool>;
/// Receives each optimizer step; returns false to stop the run (after a checkpoint).
pub type gristmill_step_fn = Option<unsafe extern "C" fn(step: *const gristmill_step, user: *mut c_void) -> bool>;
/// Receives each log message: `level` 1 = error … 5 = trace, the module it comes from, the text.
pub type gristmill_log_fn =
    Option<unsafe extern "C" fn(level: i32, target: *const c_char, message: *const c_char, user: *mut c_void)>;

// ---------------------------------------------------------------------------------------------
// Errors and the catch_unwind boundary.

/// A failed call: its status and message.
struct Failure {
    code: gristmill_status,
    msg: String,
}

type Outcome<T = ()> = Result<T, Failure>;

fn invalid(msg: impl Into<String>) -> Failure {
    Failure { code: GRISTMILL_ERR_INVALID_ARGUMENT, msg: msg.into() }
}

impl From<gristmill::Error> for Failure {
    fn from(e: gristmill::Error) -> Self {
        let code = match e.kind() {
            ErrorKind::Io => GRISTMILL_ERR_IO,
            ErrorKind::Format => GRISTMILL_ERR_FORMAT,
            ErrorKind::Tensor => GRISTMILL_ERR_TENSOR,
            ErrorKind::Config => GRISTMILL_ERR_CONFIG,
            ErrorKind::Unsupported => GRISTMILL_ERR_UNSUPPORTED,
            ErrorKind::Tokenizer => GRISTMILL_ERR_TOKENIZER,
            ErrorKind::Invalid => GRISTMILL_ERR_INVALID_ARGUMENT,
            ErrorKind::Core => GRISTMILL_ERR_CORE,
            ErrorKind::Gpu => GRISTMILL_ERR_GPU,
            _ => GRISTMILL_ERR_INTERNAL,
        };
        Failure { code, msg: e.to_string() }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_last_error(msg: &str) {
    // A NUL inside the message would cut it short in C: show it instead.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(c));
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Runs the body of an entry point: its error becomes a status and the thread's last error, and
/// so does a panic, which never unwinds into C.
fn entry(body: impl FnOnce() -> Outcome) -> gristmill_status {
    // AssertUnwindSafe: after a panic nothing the body touched is used again by this call, and
    // the handles it reads are only read (`&Model`): a later call sees them as they were.
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => GRISTMILL_OK,
        Ok(Err(f)) => {
            set_last_error(&f.msg);
            f.code
        }
        Err(payload) => {
            set_last_error(&format!("internal error (a bug in gristmill): {}", panic_message(&*payload)));
            // Dropping the payload could panic in turn; forget it instead.
            std::mem::forget(payload);
            GRISTMILL_ERR_INTERNAL
        }
    }
}

/// [`entry`] for functions with nothing to report (the free functions): a panic is swallowed.
fn quiet(body: impl FnOnce()) {
    let _ = entry(|| {
        body();
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Arguments.

/// The string at `p`, which must not be NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid and unchanged for `'a`.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Outcome<&'a str> {
    // SAFETY: the caller's contract, passed on.
    unsafe { opt_text(p, what) }?.ok_or_else(|| invalid(format!("{what} is NULL")))
}

/// The string at `p`, or None for NULL.
///
/// # Safety
/// As [`text`].
unsafe fn opt_text<'a>(p: *const c_char, what: &str) -> Outcome<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: `p` is not NULL, and the caller promises a NUL-terminated string valid for 'a.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str().map(Some).map_err(|e| invalid(format!("{what} is not valid UTF-8: {e}")))
}

/// `n` strings at `p` (NULL allowed when `n` is 0).
///
/// # Safety
/// `p` is NULL or points to `n` pointers, each as [`text`] requires.
unsafe fn texts(p: *const *const c_char, n: usize, what: &str) -> Outcome<Vec<String>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL but its count is {n}")));
    }
    // SAFETY: `p` is not NULL and the caller promises `n` readable pointers there.
    let ptrs = unsafe { std::slice::from_raw_parts(p, n) };
    ptrs.iter()
        .enumerate()
        // SAFETY: each pointer is NULL or a valid string, as the caller promises.
        .map(|(i, &s)| unsafe { text(s, &format!("{what}[{i}]")) }.map(str::to_string))
        .collect()
}

/// The model behind a handle.
///
/// # Safety
/// `m` is NULL or a handle from [`gristmill_model_load`] not yet freed.
unsafe fn model<'a>(m: *const gristmill_model) -> Outcome<&'a Model> {
    // SAFETY: the caller promises a live handle or NULL; `as_ref` maps NULL to None.
    unsafe { m.as_ref() }.map(|h| &h.model).ok_or_else(|| invalid("the model handle is NULL"))
}

/// Fails when an out-pointer the call must write is NULL, before any work is done.
fn required<T>(p: *mut T, what: &str) -> Outcome<()> {
    if p.is_null() { Err(invalid(format!("{what} is NULL"))) } else { Ok(()) }
}

fn c_string(s: String, what: &str) -> Outcome<CString> {
    CString::new(s).map_err(|e| Failure {
        code: GRISTMILL_ERR_TOKENIZER,
        msg: format!("{what} holds a NUL byte at {}, which a C string cannot carry", e.nul_position()),
    })
}

fn nan_if_none(v: Option<f64>) -> f64 {
    v.unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------------------------
// The library.

/// The library's version, e.g. `"0.1.0"` (static; never freed).
#[unsafe(no_mangle)]
pub extern "C" fn gristmill_version() -> *const c_char {
    static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    VERSION.as_ptr().cast()
}

/// The message of the last call on this thread that failed, or NULL when none has. Valid until
/// the next failing call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn gristmill_last_error() -> *const c_char {
    catch_unwind(|| LAST_ERROR.with(|e| e.borrow().as_ref().map_or(std::ptr::null(), |c| c.as_ptr())))
        .unwrap_or(std::ptr::null())
}

/// Frees a string the library returned. NULL is ignored.
///
/// # Safety
/// `s` is NULL or a string from this library not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: the string came from `CString::into_raw` in this library and is freed once.
        quiet(|| drop(unsafe { CString::from_raw(s) }));
    }
}

/// Frees a token array the library returned (with its length). NULL is ignored.
///
/// # Safety
/// `ids` is NULL or an array from [`gristmill_tokenize`] not yet freed, and `n` its length.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_tokens_free(ids: *mut u32, n: usize) {
    if !ids.is_null() {
        // SAFETY: the array came from `Box::<[u32]>::into_raw` with length `n`, freed once.
        quiet(|| drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ids, n)) }));
    }
}

// ---------------------------------------------------------------------------------------------
// Logging.

#[derive(Clone, Copy)]
struct Sink {
    f: unsafe extern "C" fn(i32, *const c_char, *const c_char, *mut c_void),
    user: *mut c_void,
}

// SAFETY: the sink is only a function pointer and the caller's `user` pointer; the header asks the
// caller of gristmill_set_logger for a callback and a `user` that may be used from any thread.
unsafe impl Send for Sink {}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

/// Forwards the `log` facade's records to the C callback.
struct CLogger;

impl log::Log for CLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        SINK.lock().is_ok_and(|s| s.is_some())
    }

    fn log(&self, record: &log::Record<'_>) {
        // Copied out, so that the callback runs without the lock (it may set another logger).
        let sink = *SINK.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sink) = sink else { return };
        let target = CString::new(record.target().replace('\0', "")).unwrap_or_default();
        let message = CString::new(record.args().to_string().replace('\0', "\\0")).unwrap_or_default();
        // SAFETY: the function pointer and `user` are what gristmill_set_logger was given, callable
        // from any thread by its contract; both strings live until the call returns.
        unsafe { (sink.f)(record.level() as i32, target.as_ptr(), message.as_ptr(), sink.user) };
    }

    fn flush(&self) {}
}

/// Sends the library's log messages up to `max_level` (0 = off, 1 = error, 2 = warn, 3 = info,
/// 4 = debug, 5 = trace) to `callback`; a NULL callback turns logging off. Without a logger the
/// library says nothing. Fails when the process already has another logger for Rust's `log`
/// facade.
///
/// # Safety
/// `callback` must be safe to call from any thread with `user` until it is replaced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_set_logger(
    callback: gristmill_log_fn,
    user: *mut c_void,
    max_level: i32,
) -> gristmill_status {
    entry(|| {
        let level = match max_level {
            0 => log::LevelFilter::Off,
            1 => log::LevelFilter::Error,
            2 => log::LevelFilter::Warn,
            3 => log::LevelFilter::Info,
            4 => log::LevelFilter::Debug,
            5 => log::LevelFilter::Trace,
            n => return Err(invalid(format!("max_level must be 0 (off) to 5 (trace), got {n}"))),
        };
        static INSTALLED: OnceLock<bool> = OnceLock::new();
        if !*INSTALLED.get_or_init(|| log::set_logger(&CLogger).is_ok()) {
            return Err(invalid("another logger is already installed for Rust's `log` facade in this process"));
        }
        *SINK.lock().unwrap_or_else(|p| p.into_inner()) = callback.map(|f| Sink { f, user });
        log::set_max_level(if callback.is_some() { level } else { log::LevelFilter::Off });
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Models.

/// Loads the model directory `dir` (config.json, safetensors, tokenizer.json) with the PEFT
/// adapter in `adapter` (NULL for none) on `device` (`"cpu"`, `"auto"`, `"cuda"`, `"cuda:N"`;
/// NULL is the CPU), holding its linear weights as `precision` (`GRISTMILL_PRECISION_*`) says.
/// On success `*out` is a handle to free with [`gristmill_model_free`].
///
/// # Safety
/// Strings are NULL or NUL-terminated; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_model_load(
    dir: *const c_char,
    adapter: *const c_char,
    device: *const c_char,
    precision: i32,
    out: *mut *mut gristmill_model,
) -> gristmill_status {
    entry(|| {
        required(out, "out")?;
        // SAFETY: the caller's contract on the strings.
        let (dir, adapter, device) =
            unsafe { (text(dir, "dir")?, opt_text(adapter, "adapter")?, opt_text(device, "device")?) };
        let base_precision = match precision {
            GRISTMILL_PRECISION_AS_STORED => BasePrecision::AsStored,
            GRISTMILL_PRECISION_NF4 => BasePrecision::Nf4,
            GRISTMILL_PRECISION_F32 => BasePrecision::F32,
            p => return Err(invalid(format!("precision must be 0 (as stored), 1 (NF4) or 2 (f32), got {p}"))),
        };
        let device = match device {
            Some(d) => Device::parse(d)?,
            None => Device::Cpu,
        };
        let opts = LoadOptions { adapter: adapter.map(Into::into), device, base_precision };
        let handle = Box::new(gristmill_model { model: Model::load(dir, opts)? });
        // SAFETY: `out` is not NULL (checked above) and writable by the caller's contract.
        unsafe { out.write(Box::into_raw(handle)) };
        Ok(())
    })
}

/// Frees a model. NULL is ignored.
///
/// # Safety
/// `m` is NULL or a handle from [`gristmill_model_load`] not yet freed, and no call is using it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_model_free(m: *mut gristmill_model) {
    if !m.is_null() {
        // SAFETY: the handle came from `Box::into_raw` in gristmill_model_load and is freed once.
        quiet(|| drop(unsafe { Box::from_raw(m) }));
    }
}

/// The model's context length in tokens (0 for a NULL handle).
///
/// # Safety
/// `m` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_model_context_len(m: *const gristmill_model) -> usize {
    // SAFETY: the caller's contract on `m`.
    catch_unwind(AssertUnwindSafe(|| unsafe { model(m) }.map_or(0, Model::context_len))).unwrap_or(0)
}

/// The ids of `text` as a plain prompt (with the special tokens the tokenizer adds, BOS for most
/// models): `*n_ids` ids at `*ids`, to free with [`gristmill_tokens_free`].
///
/// # Safety
/// `m` is a live handle; `text` NUL-terminated; `ids` and `n_ids` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_tokenize(
    m: *const gristmill_model,
    text_: *const c_char,
    ids: *mut *mut u32,
    n_ids: *mut usize,
) -> gristmill_status {
    entry(|| {
        required(ids, "ids")?;
        required(n_ids, "n_ids")?;
        // SAFETY: the caller's contract on `m` and `text_`.
        let (model, s) = unsafe { (model(m)?, text(text_, "text")?) };
        let v: Box<[u32]> = model.tokenize(s)?.into_boxed_slice();
        let n = v.len();
        // SAFETY: both out-pointers are non-NULL (checked) and writable by contract.
        unsafe {
            n_ids.write(n);
            ids.write(Box::into_raw(v).cast());
        }
        Ok(())
    })
}

/// The text of `n` ids (special tokens left out), to free with [`gristmill_string_free`].
///
/// # Safety
/// `m` is a live handle; `ids` points to `n` ids (NULL allowed when `n` is 0); `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_detokenize(
    m: *const gristmill_model,
    ids: *const u32,
    n: usize,
    out: *mut *mut c_char,
) -> gristmill_status {
    entry(|| {
        required(out, "out")?;
        // SAFETY: the caller's contract on `m`.
        let model = unsafe { model(m)? };
        let ids: &[u32] = match (ids.is_null(), n) {
            (_, 0) => &[],
            (true, _) => return Err(invalid(format!("ids is NULL but n is {n}"))),
            // SAFETY: `ids` is not NULL and points to `n` ids by contract.
            (false, _) => unsafe { std::slice::from_raw_parts(ids, n) },
        };
        let s = c_string(model.detokenize(ids)?, "the text")?;
        // SAFETY: `out` is non-NULL (checked) and writable by contract.
        unsafe { out.write(s.into_raw()) };
        Ok(())
    })
}

/// Fills `cfg` with the defaults: greedy, no top-k/top-p/penalty, seed 0, 256 new tokens, no
/// stop strings.
///
/// # Safety
/// `cfg` is NULL (ignored) or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_sampling_default(cfg: *mut gristmill_sampling) {
    let d = api::SamplingConfig::default();
    let v = gristmill_sampling {
        temperature: d.temperature,
        top_k: u32::try_from(d.top_k).unwrap_or(u32::MAX),
        top_p: d.top_p,
        repetition_penalty: d.repetition_penalty,
        seed: d.seed,
        max_new_tokens: u32::try_from(d.max_new_tokens).unwrap_or(u32::MAX),
        stop: std::ptr::null(),
        n_stop: 0,
    };
    if !cfg.is_null() {
        // SAFETY: `cfg` is not NULL and writable by contract.
        unsafe { cfg.write(v) };
    }
}

/// Generates a continuation of `prompt` (tokenized as [`gristmill_tokenize`] does) as `cfg`
/// says (NULL: the defaults), calling `on_text(piece, len, user)` with each new piece of text
/// (NULL: no streaming). Optional outputs: `info` (NULL to skip) and the whole text in `*text`
/// (NULL to skip; free it with [`gristmill_string_free`]).
///
/// # Safety
/// `m` is a live handle; strings NUL-terminated; `cfg` NULL or valid with `n_stop` readable
/// strings; `info` and `text` NULL or writable. `on_text` must not free the model.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_generate(
    m: *const gristmill_model,
    prompt: *const c_char,
    cfg: *const gristmill_sampling,
    on_text: gristmill_text_fn,
    user: *mut c_void,
    info: *mut gristmill_generation,
    text_out: *mut *mut c_char,
) -> gristmill_status {
    entry(|| {
        // SAFETY: the caller's contract on `m`, `prompt` and `cfg`.
        let (model, prompt, cfg) = unsafe { (model(m)?, text(prompt, "prompt")?, cfg.as_ref()) };
        let mut sampling = api::SamplingConfig::default();
        if let Some(c) = cfg {
            sampling = api::SamplingConfig {
                temperature: c.temperature,
                top_k: c.top_k as usize,
                top_p: c.top_p,
                repetition_penalty: c.repetition_penalty,
                seed: c.seed,
                max_new_tokens: c.max_new_tokens as usize,
                // SAFETY: `stop` holds `n_stop` strings by contract.
                stop: unsafe { texts(c.stop, c.n_stop, "cfg.stop")? },
            };
        }
        let mut buf: Vec<u8> = Vec::new();
        let g = model.generate(prompt, &sampling, |piece| {
            let Some(f) = on_text else { return true };
            buf.clear();
            buf.extend_from_slice(piece.as_bytes());
            buf.push(0);
            // SAFETY: a C callback given by the caller for this call, with its own `user`; the
            // piece is NUL-terminated and lives until it returns.
            unsafe { f(buf.as_ptr().cast(), piece.len(), user) }
        })?;
        // Everything that can fail first: out-parameters are written only on success.
        let text = if text_out.is_null() { None } else { Some(c_string(g.text, "the generated text")?) };
        if !info.is_null() {
            let stop = match g.stop {
                StopReason::Eos => GRISTMILL_STOP_EOS,
                StopReason::StopString => GRISTMILL_STOP_STRING,
                StopReason::MaxTokens => GRISTMILL_STOP_MAX_TOKENS,
                StopReason::Context => GRISTMILL_STOP_CONTEXT,
                StopReason::Callback => GRISTMILL_STOP_CALLBACK,
            };
            let v = gristmill_generation {
                prompt_tokens: g.prompt_tokens,
                new_tokens: g.ids.len(),
                stop,
                prefill_s: g.prefill_s,
                decode_s: g.decode_s,
            };
            // SAFETY: `info` is not NULL and writable by contract.
            unsafe { info.write(v) };
        }
        if let Some(s) = text {
            // SAFETY: `text_out` is not NULL (text is Some only then) and writable by contract.
            unsafe { text_out.write(s.into_raw()) };
        }
        Ok(())
    })
}

/// The log-likelihood (natural log, summed over tokens) of `continuation` after `prompt`. The
/// continuation is tokenized on its own, without special tokens: start it with the space that
/// separates it from the prompt (`" Paris"`).
///
/// # Safety
/// `m` is a live handle; strings NUL-terminated; `logprob` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_score(
    m: *const gristmill_model,
    prompt: *const c_char,
    continuation: *const c_char,
    logprob: *mut f64,
) -> gristmill_status {
    entry(|| {
        required(logprob, "logprob")?;
        // SAFETY: the caller's contract on `m` and the strings.
        let (model, p, c) = unsafe { (model(m)?, text(prompt, "prompt")?, text(continuation, "continuation")?) };
        let v = model.score(p, c)?;
        // SAFETY: `logprob` is non-NULL (checked) and writable by contract.
        unsafe { logprob.write(v) };
        Ok(())
    })
}

/// Writes the adapter the model was loaded with to `dir`, in PEFT's format.
///
/// # Safety
/// `m` is a live handle; `dir` NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_save_adapter(m: *const gristmill_model, dir: *const c_char) -> gristmill_status {
    entry(|| {
        // SAFETY: the caller's contract on `m` and `dir`.
        let (model, dir) = unsafe { (model(m)?, text(dir, "dir")?) };
        Ok(model.save_adapter(dir)?)
    })
}

// ---------------------------------------------------------------------------------------------
// Training and merging.

/// Trains a LoRA adapter. The configuration is the TOML file `config_path` (NULL for none) with
/// the `n_sets` overrides `sets` (`"key=value"`, as `gristmill train --set`) applied in order;
/// `model.path`, `data.paths` and `output.dir` must be set by one or the other. `on_step` (NULL
/// allowed) gets each optimizer step and returns false to stop the run early; `result` (NULL
/// allowed) receives how it ended. The adapter lands in `output.dir`.
///
/// # Safety
/// Strings NUL-terminated; `sets` NULL or `n_sets` readable strings; `result` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_train(
    config_path: *const c_char,
    sets: *const *const c_char,
    n_sets: usize,
    on_step: gristmill_step_fn,
    user: *mut c_void,
    result: *mut gristmill_train_result,
) -> gristmill_status {
    entry(|| {
        // SAFETY: the caller's contract on the strings.
        let (path, sets) = unsafe { (opt_text(config_path, "config_path")?, texts(sets, n_sets, "sets")?) };
        let config = api::train_config(path.map(Path::new), &sets)?;
        let outcome = api::train(&config, |r: &Record| {
            let Some(f) = on_step else { return true };
            // A record always serializes (numbers and strings); an empty object if not.
            let json = CString::new(serde_json::to_string(r).unwrap_or_default().replace('\0', "")).unwrap_or_default();
            let step = gristmill_step {
                step: r.step,
                epoch: r.epoch,
                loss: nan_if_none(r.loss),
                lr: nan_if_none(r.lr),
                grad_norm: nan_if_none(r.grad_norm),
                tokens_per_s: nan_if_none(r.tokens_per_s),
                eval_loss: nan_if_none(r.eval_loss),
                elapsed_s: nan_if_none(r.elapsed_s),
                json: json.as_ptr(),
            };
            // SAFETY: a C callback given by the caller for this call, with its own `user`; `step`
            // and its JSON live until it returns.
            unsafe { f(&step, user) }
        })?;
        if !result.is_null() {
            let v = gristmill_train_result {
                steps: outcome.steps,
                total_steps: outcome.total_steps,
                last_loss: outcome.last_loss,
                eval_loss: nan_if_none(outcome.eval_loss),
                seconds: outcome.seconds,
                tokens: outcome.tokens,
                interrupted: outcome.interrupted,
                early_stopped: outcome.early_stopped,
            };
            // SAFETY: `result` is not NULL and writable by contract.
            unsafe { result.write(v) };
        }
        Ok(())
    })
}

/// Merges the PEFT adapter `adapter` into the full-precision model `base` and writes an HF
/// checkpoint to `out`. A bitsandbytes 4-bit base is refused unless `allow_4bit`.
///
/// # Safety
/// Strings NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gristmill_merge(
    base: *const c_char,
    adapter: *const c_char,
    out: *const c_char,
    allow_4bit: bool,
) -> gristmill_status {
    entry(|| {
        // SAFETY: the caller's contract on the strings.
        let (base, adapter, out) = unsafe { (text(base, "base")?, text(adapter, "adapter")?, text(out, "out")?) };
        let opts = MergeOptions { allow_4bit, ..Default::default() };
        api::merge(base, adapter, out, &opts)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_code_and_message() {
        let status = entry(|| panic!("boom"));
        assert_eq!(status, GRISTMILL_ERR_INTERNAL);
        // SAFETY: the pointer is this thread's last error, read before any other call.
        let msg = unsafe { CStr::from_ptr(gristmill_last_error()) }.to_str().unwrap();
        assert!(msg.contains("boom") && msg.contains("bug in gristmill"), "{msg}");
        quiet(|| panic!("swallowed"));
    }

    #[test]
    fn null_arguments_are_refused() {
        let mut m = std::ptr::null_mut();
        // SAFETY: NULL strings are allowed by the contract (and refused).
        let s = unsafe { gristmill_model_load(std::ptr::null(), std::ptr::null(), std::ptr::null(), 0, &mut m) };
        assert_eq!(s, GRISTMILL_ERR_INVALID_ARGUMENT);
        assert!(m.is_null());
        let mut lp = 0.0;
        // SAFETY: a NULL model handle is allowed by the contract (and refused).
        let s = unsafe { gristmill_score(std::ptr::null(), c"a".as_ptr(), c"b".as_ptr(), &mut lp) };
        assert_eq!(s, GRISTMILL_ERR_INVALID_ARGUMENT);
        // SAFETY: freeing NULL is a no-op.
        unsafe {
            gristmill_model_free(std::ptr::null_mut());
            gristmill_string_free(std::ptr::null_mut());
            gristmill_tokens_free(std::ptr::null_mut(), 0);
        }
    }
}
