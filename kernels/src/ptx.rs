//! The embedded PTX modules.
//!
//! Every module is one `kernels/cuda/<name>.cu` compiled by `scripts/build-ptx` for `compute_80`
//! (any GPU from Ampere on; the driver JIT-compiles it for the card at hand) and, when the source
//! asks for it, a second time for `compute_90a` (Hopper-only instructions: wgmma, TMA). Each .ptx
//! starts with a line `// gristmill source hash: <16 hex digits>`: FNV-1a 64 of the module's .cu
//! followed by every `kernels/cuda/*.cuh` in name order, so a test can tell when a source changed
//! without its PTX being rebuilt ([`source_hash`]).

/// One embedded module.
#[derive(Debug, Clone, Copy)]
pub struct PtxModule {
    /// File stem: `kernels/cuda/<name>.cu`.
    pub name: &'static str,
    /// PTX for compute_80.
    pub sm80: &'static str,
    /// PTX for compute_90a, for modules with Hopper-only kernels.
    pub sm90a: Option<&'static str>,
}

/// Every module, in load order.
pub const MODULES: &[PtxModule] = &[
    PtxModule {
        name: "elementwise",
        sm80: include_str!("../ptx/elementwise.ptx"),
        sm90a: Some(include_str!("../ptx/elementwise.sm90a.ptx")),
    },
    PtxModule { name: "gemm", sm80: include_str!("../ptx/gemm.ptx"), sm90a: None },
    PtxModule {
        name: "attention",
        sm80: include_str!("../ptx/attention.ptx"),
        sm90a: Some(include_str!("../ptx/attention.sm90a.ptx")),
    },
    PtxModule { name: "loss", sm80: include_str!("../ptx/loss.ptx"), sm90a: None },
    PtxModule { name: "optim", sm80: include_str!("../ptx/optim.ptx"), sm90a: None },
    PtxModule { name: "nf4", sm80: include_str!("../ptx/nf4.ptx"), sm90a: None },
    PtxModule { name: "convert", sm80: include_str!("../ptx/convert.ptx"), sm90a: None },
    PtxModule { name: "grit", sm80: include_str!("../ptx/grit.ptx"), sm90a: None },
];

/// The module called `name`.
pub fn module(name: &str) -> Option<&'static PtxModule> {
    MODULES.iter().find(|m| m.name == name)
}

/// Prefix of the first line of every generated .ptx.
pub const HASH_PREFIX: &str = "// gristmill source hash: ";

/// The hash recorded in a .ptx text's first line.
pub fn recorded_hash(ptx: &str) -> Option<&str> {
    ptx.lines().next()?.strip_prefix(HASH_PREFIX).map(str::trim)
}

/// FNV-1a 64 over `parts` in order, as 16 lowercase hex digits (what `scripts/build-ptx` writes).
pub fn source_hash(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}
