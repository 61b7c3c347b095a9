//! The committed PTX must have been built from the current sources: a .cu or .cuh edited without
//! running `scripts/build-ptx` fails here, on any machine (no GPU, no nvcc).

use gristmill_kernels::ptx::{MODULES, recorded_hash, source_hash};
use std::path::Path;

#[test]
fn every_ptx_matches_its_sources() {
    let cuda = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let mut headers: Vec<_> = std::fs::read_dir(&cuda)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cuh"))
        .collect();
    headers.sort_by_key(|p| p.file_name().unwrap().to_owned());
    let headers: Vec<Vec<u8>> = headers.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut stale = Vec::new();
    for m in MODULES {
        let cu = std::fs::read(cuda.join(format!("{}.cu", m.name))).unwrap();
        let mut parts: Vec<&[u8]> = vec![&cu];
        parts.extend(headers.iter().map(Vec::as_slice));
        let want = source_hash(&parts);
        for (arch, text) in [("compute_80", Some(m.sm80)), ("compute_90a", m.sm90a)] {
            let Some(text) = text else { continue };
            if recorded_hash(text) != Some(want.as_str()) {
                stale.push(format!("{} ({arch})", m.name));
            }
        }
    }
    assert!(stale.is_empty(), "stale PTX, run scripts/build-ptx: {stale:?}");
}

#[test]
fn every_source_is_embedded() {
    let cuda = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    for e in std::fs::read_dir(&cuda).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "cu") {
            let stem = p.file_stem().unwrap().to_str().unwrap();
            assert!(MODULES.iter().any(|m| m.name == stem), "{stem}.cu is not listed in kernels/src/ptx.rs");
        }
    }
}
