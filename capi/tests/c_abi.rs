//! The C interface from C and from Rust: the header against the Rust definitions, the C example
//! built with the system C compiler against the shared library and run on the tiny model, and
//! training, saving and merging through the same functions.
//!
//! Without a C compiler (`$CC`, else `cc`) the C parts say so and pass, unless
//! `GRISTMILL_REQUIRE_CC` is set (CI sets it).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use gristmill_capi::*;
use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tiny() -> PathBuf {
    repo().join("tests/fixtures/tiny_llama")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gristmill-capi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn c_str(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

fn last_error() -> String {
    // SAFETY: read right after the failing call on this thread.
    unsafe { CStr::from_ptr(gristmill_last_error()) }.to_string_lossy().into_owned()
}

/// The C compiler, or None (and a note) when there is none and none is required.
fn compiler() -> Option<String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    match Command::new(&cc).arg("--version").output() {
        Ok(o) if o.status.success() => Some(cc),
        _ if std::env::var_os("GRISTMILL_REQUIRE_CC").is_some() => {
            panic!("no C compiler (`{cc}`), and GRISTMILL_REQUIRE_CC is set")
        }
        _ => {
            println!("skipping: no C compiler (`{cc}`; set CC)");
            None
        }
    }
}

/// The shared library cargo built beside this test (`cargo test` builds every crate type).
fn shared_library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let name = format!("{}gristmill_capi{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    [deps.join(&name), deps.parent().unwrap().join(&name)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found beside {}", exe.display()))
}

/// Compiles `sources` against the header and the shared library into `out`; panics with the
/// compiler's output when it fails.
fn compile(cc: &str, sources: &[&Path], out: &Path) {
    let lib = shared_library();
    let lib_dir = lib.parent().unwrap();
    let output = Command::new(cc)
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-o"])
        .arg(out)
        .args(sources)
        .arg("-I")
        .arg(repo().join("capi/include"))
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{cc} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The C example, compiled with `-Wall -Wextra -Werror -pedantic` against the header and the
/// shared library, loads the tiny model, streams a generation and scores two continuations.
#[test]
fn the_c_example_builds_and_runs() {
    let Some(cc) = compiler() else { return };
    let dir = tmp("example");
    let exe = dir.join("embed");
    compile(&cc, &[&repo().join("examples/c/embed.c")], &exe);
    let out = Command::new(&exe).arg(tiny()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the example failed ({}):\n{stdout}\n{stderr}", out.status);
    println!("{stdout}");
    assert!(stdout.starts_with(&format!("gristmill {}\n", env!("CARGO_PKG_VERSION"))), "{stdout}");
    assert!(stdout.contains("status 2 (GRISTMILL_ERR_IO)") && stdout.contains("/no/such/model"), "{stdout}");
    assert!(stdout.contains("context: 256 tokens"), "{stdout}");
    assert!(stdout.contains("new tokens in"), "{stdout}");
    assert_eq!(stdout.matches("log P(").count(), 2, "{stdout}");
    assert!(stdout.contains("NULL argument: continuation is NULL"), "{stdout}");
    assert!(stdout.trim_end().ends_with("done"), "{stdout}");
    // The example's usage line, without arguments.
    let usage = Command::new(&exe).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).ok();
}

/// Every function, constant and struct of lib.rs is in the header, with the same value, size
/// and field offsets (a C program prints what its compiler sees).
#[test]
fn the_header_matches_the_library() {
    let src = std::fs::read_to_string(repo().join("capi/src/lib.rs")).unwrap();
    let header = std::fs::read_to_string(repo().join("capi/include/gristmill.h")).unwrap();
    let mut defined = std::collections::BTreeSet::new();
    for line in src.lines() {
        let line = line.trim();
        if let Some(rest) =
            line.strip_prefix("pub extern \"C\" fn ").or(line.strip_prefix("pub unsafe extern \"C\" fn "))
        {
            defined.insert(rest[..rest.find('(').unwrap()].to_string());
        }
        if let Some(rest) = line.strip_prefix("pub const ") {
            let name = &rest[..rest.find(':').unwrap()];
            let value = rest[rest.find('=').unwrap() + 1..].trim().trim_end_matches(';');
            let define = format!("#define {name} {value}");
            assert!(header.lines().any(|l| l.starts_with(&define)), "gristmill.h lacks `{define}`");
        }
    }
    // Declarations: `gristmill_x(` outside comments and preprocessor lines.
    let mut declared = std::collections::BTreeSet::new();
    for line in header.lines().filter(|l| !(l.starts_with("/*") || l.starts_with(" *") || l.starts_with('#'))) {
        for (i, _) in line.match_indices("gristmill_") {
            let name: String = line[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if line[i + name.len()..].starts_with('(') {
                declared.insert(name);
            }
        }
    }
    assert_eq!(declared, defined, "functions of gristmill.h (left) and of capi/src/lib.rs (right)");

    let Some(cc) = compiler() else { return };
    let dir = tmp("layout");
    let c = dir.join("layout.c");
    let fields: &[(&str, &[&str])] = &[
        (
            "gristmill_sampling",
            &["temperature", "top_k", "top_p", "repetition_penalty", "seed", "max_new_tokens", "stop", "n_stop"],
        ),
        ("gristmill_generation", &["prompt_tokens", "new_tokens", "stop", "prefill_s", "decode_s"]),
        (
            "gristmill_step",
            &["step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "elapsed_s", "json"],
        ),
        (
            "gristmill_train_result",
            &["steps", "total_steps", "last_loss", "eval_loss", "seconds", "tokens", "interrupted", "early_stopped"],
        ),
    ];
    let mut prog =
        String::from("#include <stddef.h>\n#include <stdio.h>\n#include \"gristmill.h\"\nint main(void) {\n");
    for (ty, fs) in fields {
        prog.push_str(&format!("    printf(\"{ty} %zu\\n\", sizeof({ty}));\n"));
        for f in *fs {
            prog.push_str(&format!("    printf(\"{ty}.{f} %zu\\n\", offsetof({ty}, {f}));\n"));
        }
    }
    prog.push_str("    return 0;\n}\n");
    std::fs::write(&c, prog).unwrap();
    compile(&cc, &[&c], &dir.join("layout"));
    let out = Command::new(dir.join("layout")).output().unwrap();
    let got = String::from_utf8(out.stdout).unwrap();
    macro_rules! layout {
        ($($ty:ident: $($f:ident),+;)+) => {{
            let mut s = String::new();
            $(
                s.push_str(&format!("{} {}\n", stringify!($ty), std::mem::size_of::<$ty>()));
                $(s.push_str(&format!("{}.{} {}\n", stringify!($ty), stringify!($f), std::mem::offset_of!($ty, $f)));)+
            )+
            s
        }};
    }
    let want = layout! {
        gristmill_sampling: temperature, top_k, top_p, repetition_penalty, seed, max_new_tokens, stop, n_stop;
        gristmill_generation: prompt_tokens, new_tokens, stop, prefill_s, decode_s;
        gristmill_step: step, epoch, loss, lr, grad_norm, tokens_per_s, eval_loss, elapsed_s, json;
        gristmill_train_result: steps, total_steps, last_loss, eval_loss, seconds, tokens, interrupted, early_stopped;
    };
    assert_eq!(got, want);
    std::fs::remove_dir_all(&dir).ok();
}

unsafe extern "C" fn count_steps(step: *const gristmill_step, user: *mut c_void) -> bool {
    // SAFETY: the library passes a valid step, and `user` is the Vec this test handed over.
    let (step, seen) = unsafe { (&*step, &mut *user.cast::<Vec<(usize, f64, String)>>()) };
    // SAFETY: the JSON is valid during the callback.
    let json = unsafe { CStr::from_ptr(step.json) }.to_str().unwrap().to_string();
    seen.push((step.step, step.loss, json));
    step.step < 3
}

/// Training through the C functions, stopped by the step callback after three steps; the
/// adapter it wrote loads, is saved again, and merges.
#[test]
fn train_load_save_and_merge_through_the_c_functions() {
    let dir = tmp("train");
    let data = dir.join("data.jsonl");
    let lines: String = (1..=30)
        .map(|i| {
            format!("{{\"question\": \"What is {i} + 1?\", \"answer\": \"{i} + 1 = {}\\n#### {}\"}}\n", i + 1, i + 1)
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let run = dir.join("run");
    let sets: Vec<CString> = [
        format!("model.path={}", tiny().display()),
        format!("data.paths={}", data.display()),
        format!("output.dir={}", run.display()),
        "data.max_seq_len=64".into(),
        "train.max_steps=10".into(),
        "train.batch_size=2".into(),
        "train.device=cpu".into(),
        "lora.r=4".into(),
    ]
    .into_iter()
    .map(|s| CString::new(s).unwrap())
    .collect();
    let ptrs: Vec<*const c_char> = sets.iter().map(|s| s.as_ptr()).collect();
    let mut seen: Vec<(usize, f64, String)> = Vec::new();
    let mut result = gristmill_train_result::default();
    // SAFETY: valid strings, a callback matching its contract with `seen` as its user pointer.
    let st = unsafe {
        gristmill_train(
            std::ptr::null(),
            ptrs.as_ptr(),
            ptrs.len(),
            Some(count_steps),
            (&raw mut seen).cast(),
            &mut result,
        )
    };
    assert_eq!(st, GRISTMILL_OK, "{}", last_error());
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(seen.iter().all(|s| s.1.is_finite() && s.2.contains("\"loss\"")), "{seen:?}");
    assert_eq!((result.steps, result.total_steps, result.interrupted), (3, 10, true));

    // A bad key is a configuration error with its message.
    let bad = [c"lora.rank=4".as_ptr()];
    // SAFETY: as above, without a callback or result.
    let st =
        unsafe { gristmill_train(std::ptr::null(), bad.as_ptr(), 1, None, std::ptr::null_mut(), std::ptr::null_mut()) };
    assert_eq!(st, GRISTMILL_ERR_CONFIG);
    assert!(last_error().contains("lora.rank"), "{}", last_error());

    let mut model = std::ptr::null_mut();
    // SAFETY: valid strings and a writable handle slot.
    let st = unsafe {
        gristmill_model_load(
            c_str(&tiny()).as_ptr(),
            c_str(&run).as_ptr(),
            c"cpu".as_ptr(),
            GRISTMILL_PRECISION_NF4,
            &mut model,
        )
    };
    assert_eq!(st, GRISTMILL_OK, "{}", last_error());
    let saved = dir.join("saved");
    // SAFETY: a live handle and a valid string.
    assert_eq!(unsafe { gristmill_save_adapter(model, c_str(&saved).as_ptr()) }, GRISTMILL_OK, "{}", last_error());
    assert!(saved.join("adapter_model.safetensors").is_file());

    let mut lp = [0f64; 2];
    for (i, adapter) in [&run, &saved].into_iter().enumerate() {
        let mut m = std::ptr::null_mut();
        // SAFETY: as above; the handle is freed below.
        unsafe {
            let st =
                gristmill_model_load(c_str(&tiny()).as_ptr(), c_str(adapter).as_ptr(), std::ptr::null(), 1, &mut m);
            assert_eq!(st, GRISTMILL_OK, "{}", last_error());
            assert_eq!(gristmill_score(m, c"What is 2 + 1?".as_ptr(), c" 3".as_ptr(), &mut lp[i]), GRISTMILL_OK);
            gristmill_model_free(m);
        }
    }
    assert_eq!(lp[0], lp[1], "the saved adapter gives the trained one's scores");

    let merged = dir.join("merged");
    // SAFETY: valid strings.
    let st = unsafe { gristmill_merge(c_str(&tiny()).as_ptr(), c_str(&run).as_ptr(), c_str(&merged).as_ptr(), false) };
    assert_eq!(st, GRISTMILL_OK, "{}", last_error());
    assert!(merged.join("config.json").is_file());

    // SAFETY: the handle from above, freed once.
    unsafe { gristmill_model_free(model) };
    std::fs::remove_dir_all(&dir).ok();
}

unsafe extern "C" fn stop_at_once(_: *const c_char, _: usize, user: *mut c_void) -> bool {
    // SAFETY: `user` is the counter this test handed over.
    unsafe { *user.cast::<usize>() += 1 };
    false
}

/// Tokenizing round-trips; a callback that returns false stops generation at its first piece;
/// bad sampling settings and bad ids are errors with messages.
#[test]
fn tokenize_generate_and_errors() {
    let mut m = std::ptr::null_mut();
    // SAFETY: valid arguments throughout; every returned buffer is freed with its free function.
    unsafe {
        assert_eq!(
            gristmill_model_load(c_str(&tiny()).as_ptr(), std::ptr::null(), std::ptr::null(), 0, &mut m),
            GRISTMILL_OK
        );
        let (mut ids, mut n) = (std::ptr::null_mut(), 0usize);
        assert_eq!(gristmill_tokenize(m, c"hello world".as_ptr(), &mut ids, &mut n), GRISTMILL_OK);
        assert!(n > 0);
        let mut text = std::ptr::null_mut();
        assert_eq!(gristmill_detokenize(m, ids, n, &mut text), GRISTMILL_OK);
        assert_eq!(CStr::from_ptr(text).to_str().unwrap(), "hello world");
        gristmill_string_free(text);
        gristmill_tokens_free(ids, n);

        let bad_id = [100_000u32];
        assert_eq!(gristmill_detokenize(m, bad_id.as_ptr(), 1, &mut text), GRISTMILL_ERR_TOKENIZER, "{}", last_error());

        let mut cfg = std::mem::zeroed::<gristmill_sampling>();
        gristmill_sampling_default(&mut cfg);
        assert_eq!((cfg.temperature, cfg.top_p, cfg.max_new_tokens), (0.0, 1.0, 256));
        cfg.max_new_tokens = 16;
        cfg.temperature = 1.0;
        let (mut calls, mut info) = (0usize, gristmill_generation::default());
        let st = gristmill_generate(
            m,
            c"1 + 1 =".as_ptr(),
            &cfg,
            Some(stop_at_once),
            (&raw mut calls).cast(),
            &mut info,
            std::ptr::null_mut(),
        );
        assert_eq!(st, GRISTMILL_OK, "{}", last_error());
        if info.new_tokens < 16 && info.stop != GRISTMILL_STOP_CALLBACK {
            // The model ended before any text was handed out (EOS first): nothing to stop.
            assert_eq!(calls, 0);
        } else {
            assert_eq!((calls, info.stop), (1, GRISTMILL_STOP_CALLBACK));
        }

        cfg.top_p = 0.0;
        let st = gristmill_generate(
            m,
            c"1 + 1 =".as_ptr(),
            &cfg,
            None,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        assert_eq!(st, GRISTMILL_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("top-p"), "{}", last_error());

        let not_utf8 = [0xffu8 as c_char, 0];
        assert_eq!(gristmill_score(m, not_utf8.as_ptr(), c"x".as_ptr(), &mut 0.0), GRISTMILL_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("UTF-8"), "{}", last_error());
        assert_eq!(
            gristmill_model_load(c"x".as_ptr(), std::ptr::null(), std::ptr::null(), 7, &mut m),
            GRISTMILL_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            gristmill_model_load(c"x".as_ptr(), std::ptr::null(), c"tpu".as_ptr(), 0, &mut m),
            GRISTMILL_ERR_INVALID_ARGUMENT
        );
        gristmill_model_free(m);
    }
}
