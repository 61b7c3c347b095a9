// nf4: the NF4 linear layer computed from the 4-bit weight itself, and the LoRA adapter fused
// around it. No kernel here writes a dequantized copy of W to global memory: each one reads the
// packed codes and block scales and expands them in shared memory or registers.
//
// Weight format (gristmill_core::nf4, bitsandbytes-compatible): W (N, K) flattened row-major,
// element i = n·K + k; code of i in byte i / 2, the HIGH nibble for even i; block b = i / bs
// (bs = blocksize, a power of two) has the scale
//   absmax[b]                                       plain f32, or
//   dyn[q8[b]] · nested[b / nbs] + offset           double quantization (two f32 roundings, a
//                                                   product then a sum: never contracted to FMA)
// and w_i = bf16_rn(NF4[code_i] · scale_b) (one f32 product, then round-to-nearest-even): exactly
// Nf4Tensor::dequantize_rounded of a bf16 weight. Every product below multiplies those bf16
// values in bf16 × bf16 → f32 (tensor cores) or f32 FMAs, with f32 accumulation.
//
// Expansion ("LUT in registers"): a thread that owns a run of codes of one block builds the 16
// possible outputs T[q] = bf16_rn(NF4[q] · scale) once (16 FMULs, 8 packs), splits them into a
// plane of low bytes and a plane of high bytes (4 + 4 registers), and turns each 4 codes into 4
// bf16 with byte permutes (prmt): 3-bit selectors pick from entries 0-7 and 8-15, the selectors'
// top bits (sign-replicated by prmt into byte masks) choose between the two. No shared-memory
// lookups, so the GEMV is not bound by shared-memory bandwidth.
//
// ---------------------------------------------------------------------------------------------
// nf4_gemm_fwd_bf16 — Y (M, N) = alpha · (X Wᵀ + s · U Bᵀ) + beta · Y
//   X (M, K) bf16; W (N, K) NF4; optional LoRA term: U (M, r) bf16, B (N, r) bf16, r ≤ 64, scale s
//   (U null: no term). beta == 0 never reads Y.
// nf4_gemm_bwd_bf16 — dX (M, K) = alpha · (dY W + s · ((V A) ∘ mask)) + beta · dX
//   dY (M, N) bf16; W (N, K) NF4; optional LoRA term: V (M, r) bf16, A (r, K) bf16, mask the
//   inverted-dropout mask of X (element m·K + k, regenerated from the seed as
//   gristmill_core::ops::lora::dropout_mask_ref: 0 when u < p, else keep = 1/(1 − p); p = 0: none).
//   Math: mma.sync m16n8k16 bf16 → f32. alpha, beta, s and the mask are applied in f32 to the f32
//   sums, one rounding to bf16 at the store.
//   Geometry: grid (ceil(M / 256), ceil(Nout / 128)), Nout = N (fwd) or K (bwd); 256 threads as
//   4 × 2 warps of 64 × 64 outputs; k-tiles of 32 along the reduction (K fwd, N bwd).
//   Shared memory (88 KiB dynamic + 1 KiB static): 4 stages of {the activation tile 256 × 32
//   bf16, the packed weight tile 2 KiB} filled by cp.async, and 2 buffers of the expanded weight
//   tile (8 KiB each: fwd 128 rows n × 32 k, bwd 32 rows n × 128 k — the weight keeps its own
//   orientation, so the forward reads it with ldmatrix and the backward with ldmatrix.trans).
//   Rows are 16-byte chunks XOR-swizzled by row, so 8-row ldmatrix phases hit 8 bank groups.
//   Pipeline, one barrier a k-tile: iteration kt issues the copies of tile kt + 3, then multiplies
//   tile kt and, between its two mma steps, expands the codes of tile kt + 1 (copied two
//   iterations earlier) into the other weight buffer — one basic block, so the compiler
//   interleaves the expansion with the products. Block scales are loaded into registers two
//   tiles ahead. Each thread expands 16 codes of one block a k-tile (fast path: a compile-time
//   instantiation, chosen once a launch).
//   Fast path: K % 32 == 0 (every 16-byte run of codes is one row and one block). Otherwise
//   (fast = 0) the weight tile is expanded element by element from global memory, with bounds
//   checks, in the same place of the pipeline. The activation tile is copied in 16-byte chunks
//   when its rows are 16-byte aligned (vec_a), else element by element.
//   LoRA term: after the main loop the stage memory holds U (256 × 64) and B (128 × 64) — or V
//   and A (64 × 128) — zero-padded past r; a warp adds, one pair of 8-column tiles at a time,
//   s · Σ_r (f32 sums of mma) to its accumulators (times the mask, regenerated per element).
//
// nf4_gemv_fwd_{f32,bf16} — Y (M, N) = alpha · X Wᵀ + beta · Y for M ≤ 16 (decoding).
//   Reads the weight once, in 16-byte loads. Block: 8 warps, 16 rows of W (two groups of 8).
//   A warp takes chunks of 128 k (chunk c = warp, warp + 8, …); lane (g = lane / 4, t = lane % 4)
//   loads 32 codes (16 bytes) of row g of each group at k = 128c + 32t and expands them in
//   registers. The 32 codes are the lane's B fragments of 8 mma m16n8k16 steps: the sum over k
//   does not depend on which k a fragment slot stands for, so slot (t, j) of step s is taken to be
//   k = 128c + 32t + 4s + j, and the A fragments (X rows g and g + 8, 16-byte loads; zeros past M)
//   follow the same map. f32 X is split into bf16 hi + lo (two mma a step: the W values are
//   exact in bf16, so only the 2⁻¹⁷ of x beyond hi + lo is lost). Warps' partial sums meet in
//   shared memory; 256 threads write the 16 × 16 outputs. Fast path: K % 32 == 0, bs ≥ 32, X
//   16-byte aligned; otherwise element by element with bounds checks.
//
// lora_down_{nt,nn}_r{16,32,64}_fwd_bf16 — ws[z] (M, RP) f32 = partial sums of P = (Q ∘ mask) R
//   over the z-th range of c. Q (M, C) bf16; R is (r, C) bf16 (nt: P = Q Rᵀ, U = (X∘mask) Aᵀ) or
//   (C, r) (nn: P = Q R, V = dY B); RP = r rounded up to 16, 32 or 64. The mask (p > 0) is
//   applied to Q's A fragments after ldmatrix (each Q element is read once, so hashed once) and
//   rounded to bf16. Geometry: grid (ceil(M / 64), splits), 4 warps of 16 rows × RP, k-tiles of
//   64, 4 cp.async stages (64 KiB). lora_down_finish_fwd_bf16 sums the splits in a fixed order
//   and writes P (M, r) bf16.
//
// lora_grad_r{16,32,64}_bwd_bf16 — ws[z] (RP, C) f32 = partial sums of Pᵀ (Q ∘ mask) over the
//   z-th range of rows m. P (M, r) bf16, Q (M, C) bf16: dA = s · Vᵀ (X ∘ mask) and
//   dB = s · dYᵀ U. The mask is applied to Q's B fragments (each Q element hashed once).
//   Geometry: grid (ceil(C / 128), splits), 4 warps of RP × 32, k-tiles of 32 rows, 4 stages
//   (48 KiB). lora_grad_finish_bwd_f32 writes out = s · Σ_z ws[z] + beta · out in f32, (r, C)
//   or, with trans, (C, r).
#include "common.cuh"

namespace {

// ---------------------------------------------------------------------------------------------
// Instructions

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N> __device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void sts128(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

__device__ __forceinline__ uint2 lds64(uint32_t addr) {
    uint2 v;
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
    return v;
}

__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm4_t(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d += a · b, m16n8k16, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// (lo, hi) rounded to bf16 (nearest even), lo in the low half: the register layout of a pair of
// consecutive elements.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

// ---------------------------------------------------------------------------------------------
// Shared-memory tiles: rows of CH 16-byte chunks, chunk index XOR-swizzled by the row. Rows of
// 4 chunks (64 bytes) share a 128-byte bank line in pairs, so their key changes every second row.

template <int CH> __device__ __forceinline__ uint32_t tile_at(uint32_t base, int r, int c) {
    static_assert(CH == 4 || CH % 8 == 0, "tile rows are 4 or a multiple of 8 chunks");
    const int sc = CH == 4 ? (c ^ ((r >> 1) & 3)) : (c ^ (r & 7));
    return base + (uint32_t)((r * CH + sc) * 16);
}

// Rows [row0, row0 + R) × chunks [0, NCH) of 8 bf16 from column col0 of a row-major matrix
// (rows × cols, leading dimension ld) into a tile of CH chunks a row; zeros outside the matrix.
// vec: 16-byte cp.async (rows 16-byte aligned); else element by element, synchronously.
template <int R, int NCH, int CH, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t dst, const __nv_bfloat16* __restrict__ g, int ld, int row0, int col0,
                                          int rows, int cols, bool vec) {
    constexpr int TOTAL = R * NCH;
#pragma unroll
    for (int i = 0; i < (TOTAL + THREADS - 1) / THREADS; ++i) {
        const int idx = (int)threadIdx.x + i * THREADS;
        if (TOTAL % THREADS != 0 && idx >= TOTAL) break;
        const int r = idx / NCH, c = idx % NCH;
        const int gr = row0 + r, gc = col0 + c * 8;
        const uint32_t d = tile_at<CH>(dst, r, c);
        if (vec) {
            const int valid = gr < rows ? min(max(cols - gc, 0), 8) : 0;
            cp_async16(d, valid > 0 ? g + ((size_t)gr * ld + gc) : g, valid * 2);
        } else {
            const unsigned short* s = reinterpret_cast<const unsigned short*>(g) + ((size_t)gr * ld + gc);
            uint32_t w[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool in = gr < rows;
                const uint32_t lo = (in && gc + 2 * e < cols) ? s[2 * e] : 0u;
                const uint32_t hi = (in && gc + 2 * e + 1 < cols) ? s[2 * e + 1] : 0u;
                w[e] = lo | (hi << 16);
            }
            sts128(d, w[0], w[1], w[2], w[3]);
        }
    }
}

// Rows [row0, row0 + R) × chunks [0, nch) (8 bf16 each, from column col0) of a row-major
// (rows, cols) bf16 matrix with leading dimension ld, into a tile of CH chunks a row; zeros outside
// the matrix. Sizes known at run time: the LoRA factors' tiles, read once a block. Issues its
// copies without committing them.
template <int CH, int THREADS>
__device__ __forceinline__ void load_chunks(uint32_t dst, const __nv_bfloat16* __restrict__ g, int ld, int row0, int R,
                                            int rows, int col0, int nch, int cols, bool vec) {
    for (int idx = threadIdx.x; idx < R * nch; idx += THREADS) {
        const int r = idx / nch, c = idx % nch;
        const int gr = row0 + r, gc = col0 + c * 8;
        const uint32_t d = tile_at<CH>(dst, r, c);
        if (vec) {
            const int valid = gr < rows ? min(max(cols - gc, 0), 8) : 0;
            cp_async16(d, valid > 0 ? g + ((size_t)gr * ld + gc) : g, valid * 2);
        } else {
            const unsigned short* s = reinterpret_cast<const unsigned short*>(g) + ((size_t)gr * ld + gc);
            uint32_t w[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool in = gr < rows;
                const uint32_t lo = (in && gc + 2 * e < cols) ? s[2 * e] : 0u;
                const uint32_t hi = (in && gc + 2 * e + 1 < cols) ? s[2 * e + 1] : 0u;
                w[e] = lo | (hi << 16);
            }
            sts128(d, w[0], w[1], w[2], w[3]);
        }
    }
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---------------------------------------------------------------------------------------------
// Dropout mask, bit-identical to gristmill_core::ops::lora::dropout_uniform

constexpr unsigned long long GOLDEN = 0x9E3779B97F4A7C15ull;

__device__ __forceinline__ uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The factor of the element whose counter is ctr = key + (i + 1)·γ: consecutive elements'
// counters differ by γ, so a thread steps from one to the next with additions.
__device__ __forceinline__ float drop_at(uint64_t ctr, float p, float keep) {
    const float u = float(mix(ctr) >> 40) * (1.f / 16777216.f);
    return u < p ? 0.f : keep;
}

// bf16 pair (elements with counters ctr_lo, ctr_hi) × their factors, rounded back to bf16.
__device__ __forceinline__ uint32_t drop_pair(uint32_t v, uint64_t ctr_lo, uint64_t ctr_hi, float p, float keep) {
    return pack_bf16(bf16_lo(v) * drop_at(ctr_lo, p, keep), bf16_hi(v) * drop_at(ctr_hi, p, keep));
}

// ---------------------------------------------------------------------------------------------
// NF4 codes and scales

// gristmill_core::nf4::NF4_CODE as f32 bits.
__constant__ uint32_t NF4_BITS[16] = {
    0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu, 0xbdba7871u, 0x00000000u,
    0x3da2faffu, 0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au, 0x3ee1a4b8u, 0x3f1007abu, 0x3f3913b3u, 0x3f800000u,
};

__device__ __forceinline__ float nf4_code(uint32_t q) { return __uint_as_float(NF4_BITS[q]); }

struct Nf4 {
    const uint8_t* packed;
    const float* absmax;  // plain scales, or null
    const uint8_t* q8;    // double quantization: codes of the scales, or null
    const float* nested;
    float offset;
    int bs_log2;   // log2 blocksize
    int nbs_log2;  // log2 nested blocksize
};

// What a scale needs from global memory, loaded ahead of its use.
struct ScaleRaw {
    uint32_t q;
    float v;
    bool ok;
};

__device__ __forceinline__ ScaleRaw scale_load(const Nf4& w, long long block, bool ok) {
    ScaleRaw s{0u, 0.f, ok};
    if (!ok) return s;
    if (w.q8 != nullptr) {
        s.q = __ldg(w.q8 + block);
        s.v = __ldg(w.nested + (block >> w.nbs_log2));
    } else {
        s.v = __ldg(w.absmax + block);
    }
    return s;
}

// The block scale (0 outside the weight, so padding expands to zeros).
__device__ __forceinline__ float scale_of(const Nf4& w, const float* dyn, ScaleRaw s) {
    if (!s.ok) return 0.f;
    return w.q8 != nullptr ? __fadd_rn(__fmul_rn(dyn[s.q], s.v), w.offset) : s.v;
}

// Element i of W as a float holding a bf16 value, read and scaled alone (the slow path).
__device__ __forceinline__ float nf4_element(const Nf4& w, const float* dyn, long long i) {
    const uint32_t byte = __ldg(w.packed + (i >> 1));
    const uint32_t q = (i & 1) ? (byte & 15u) : (byte >> 4);
    const float s = scale_of(w, dyn, scale_load(w, i >> w.bs_log2, true));
    return __bfloat162float(__float2bfloat16_rn(__fmul_rn(nf4_code(q), s)));
}

// T[q] = bf16_rn(NF4[q] · scale) as two byte planes: lo[i] holds the low bytes of T[4i..4i+3],
// hi[i] their high bytes.
struct Lut {
    uint32_t lo[4], hi[4];
};

__device__ __forceinline__ Lut make_lut(float scale) {
    uint32_t p[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) p[j] = pack_bf16(__fmul_rn(nf4_code(2 * j), scale), __fmul_rn(nf4_code(2 * j + 1), scale));
    Lut t;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        t.lo[i] = prmt(p[2 * i], p[2 * i + 1], 0x6420);
        t.hi[i] = prmt(p[2 * i], p[2 * i + 1], 0x7531);
    }
    return t;
}

// 8 codes (4 packed bytes, first element in the high nibble of the low byte) → 8 bf16 in element
// order: out[j] holds elements 2j (low half) and 2j + 1.
__device__ __forceinline__ void expand8(const Lut& t, uint32_t w, uint32_t (&out)[4]) {
    const uint32_t up = w << 4;  // moves each low nibble's top bit to its byte's sign bit
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        // Nibbles of bytes 2h, 2h + 1: elements 4h + 1, 4h, 4h + 3, 4h + 2.
        const uint32_t sel = (h == 0 ? w : w >> 16) & 0x7777u;
        const uint32_t mask = prmt(up, w, h == 0 ? 0xD9C8u : 0xFBEAu);  // 0xff where the code is ≥ 8
        const uint32_t a = prmt(t.lo[0], t.lo[1], sel), b = prmt(t.lo[2], t.lo[3], sel);
        const uint32_t c = prmt(t.hi[0], t.hi[1], sel), d = prmt(t.hi[2], t.hi[3], sel);
        const uint32_t lo = (a & ~mask) | (b & mask), hi = (c & ~mask) | (d & mask);
        out[2 * h] = prmt(lo, hi, 0x4051);
        out[2 * h + 1] = prmt(lo, hi, 0x6273);
    }
}

// ---------------------------------------------------------------------------------------------
// Epilogue store

// C[row, col], C[row, col + 1] = alpha · v + beta · C for the columns below ncols (row < rows
// checked by the caller); one 4-byte store when the pair is aligned.
__device__ __forceinline__ void store2(__nv_bfloat16* C, int ncols, int row, int col, float v0, float v1, float alpha,
                                       float beta) {
    __nv_bfloat16* p = C + ((size_t)row * ncols + col);
    if (col + 1 < ncols && (reinterpret_cast<uintptr_t>(p) & 3) == 0) {
        auto* pv = reinterpret_cast<__nv_bfloat162*>(p);
        float r0 = alpha * v0, r1 = alpha * v1;
        if (beta != 0.f) {
            const __nv_bfloat162 old = *pv;
            r0 += beta * __low2float(old);
            r1 += beta * __high2float(old);
        }
        *pv = __floats2bfloat162_rn(r0, r1);
    } else {
        if (col < ncols) p[0] = __float2bfloat16_rn(alpha * v0 + (beta != 0.f ? beta * __bfloat162float(p[0]) : 0.f));
        if (col + 1 < ncols)
            p[1] = __float2bfloat16_rn(alpha * v1 + (beta != 0.f ? beta * __bfloat162float(p[1]) : 0.f));
    }
}

// ---------------------------------------------------------------------------------------------
// NF4 GEMM (tensor cores), forward and backward

constexpr int G_BM = 256, G_BN = 128, G_BK = 32, G_STAGES = 4, G_THREADS = 256;
constexpr int G_WARPS_N = 2, G_WM = 64, G_WN = 64, G_MT = G_WM / 16, G_NT = G_WN / 8, G_KK = G_BK / 16;
static_assert(G_KK == 2, "a k-tile's two mma steps each expand one half of a thread's codes");
constexpr uint32_t G_A_BYTES = G_BM * G_BK * 2;       // activation tile
constexpr uint32_t G_RAW_BYTES = G_BN * G_BK / 2;     // packed weight tile
constexpr uint32_t G_STAGE_BYTES = G_A_BYTES + G_RAW_BYTES;
constexpr uint32_t G_WD_BYTES = G_BN * G_BK * 2;      // expanded weight tile
constexpr uint32_t G_SMEM = G_STAGES * G_STAGE_BYTES + 2 * G_WD_BYTES;
static_assert(G_SMEM == 90112, "kernels/src/nf4.rs GEMM_SMEM");
// The LoRA term's tiles reuse the stage memory.
static_assert(G_BM * 64 * 2 + 64 * G_BN * 2 <= G_STAGES * G_STAGE_BYTES, "LoRA tiles fit the stages");

template <bool BWD, bool FAST>
__device__ __forceinline__ void nf4_gemm_body(const __nv_bfloat16* __restrict__ A, const Nf4 w, const float* dyn,
                                              __nv_bfloat16* __restrict__ C, int M, int N, int K, float alpha,
                                              float beta, int vec_a, const __nv_bfloat16* __restrict__ lu,
                                              const __nv_bfloat16* __restrict__ lw, int r, float s, uint64_t seed,
                                              float p, float keep) {
    // C (M, NO) = A (M, KR) · op(W): the forward reduces over K, the backward over N.
    const int KR = BWD ? N : K, NO = BWD ? K : N;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t s0 = smem_addr(smem), wd0 = s0 + G_STAGES * G_STAGE_BYTES;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int m0 = blockIdx.x * G_BM, n0 = blockIdx.y * G_BN;
    const int wm0 = (warp / G_WARPS_N) * G_WM, wn0 = (warp % G_WARPS_N) * G_WN;

    // The expanded weight tile: fwd 128 rows (n) × 4 chunks (32 k); bwd 32 rows (n) × 16 chunks
    // (128 k). This thread expands chunks (d_row, d_ch) and (d_row, d_ch + 1): 16 codes of one
    // block, 8 bytes at d_raw of the packed tile (rows of 16 or 64 bytes).
    constexpr int WD_CH = BWD ? G_BN / 8 : G_BK / 8;
    const int d_row = BWD ? tid >> 3 : tid >> 1;
    const int d_ch = BWD ? 2 * (tid & 7) : 2 * (tid & 1);
    const uint32_t d_raw = d_row * (BWD ? 64 : 16) + d_ch * 4;
    auto d_coords = [&](int kt, int& n, int& k) {
        if (BWD) {
            n = kt * G_BK + d_row;
            k = n0 + d_ch * 8;
        } else {
            n = n0 + d_row;
            k = kt * G_BK + d_ch * 8;
        }
    };

    auto load_stage = [&](int stage, int kt) {
        const uint32_t sa = s0 + stage * G_STAGE_BYTES;
        const int k0 = kt * G_BK;
        load_tile<G_BM, G_BK / 8, G_BK / 8, G_THREADS>(sa, A, KR, m0, k0, M, KR, vec_a);
        if (FAST && tid < 128) {
            // fwd: 128 rows × 16 bytes; bwd: 32 rows × 4 × 16 bytes (32 codes each).
            int n, k;
            uint32_t off;
            if (BWD) {
                n = k0 + (tid >> 2);
                k = n0 + 32 * (tid & 3);
                off = (tid >> 2) * 64 + (tid & 3) * 16;
            } else {
                n = n0 + tid;
                k = k0;
                off = tid * 16;
            }
            const bool ok = n < N && k < K;
            const uint8_t* src = ok ? w.packed + (((long long)n * K + k) >> 1) : w.packed;
            cp_async16(sa + G_A_BYTES + off, src, ok ? 16 : 0);
        }
    };

    auto fetch_scale = [&](int kt) {
        int n, k;
        d_coords(kt, n, k);
        const bool ok = n < N && k < K;
        return scale_load(w, ok ? (((long long)n * K + k) >> w.bs_log2) : 0, ok);
    };

    // Codes → bf16 of one 8-code half (h) of this thread's run, into weight buffer buf.
    auto expand_half = [&](const Lut& t, uint32_t raw, int buf, int h) {
        uint32_t o[4];
        expand8(t, raw, o);
        sts128(tile_at<WD_CH>(wd0 + buf * G_WD_BYTES, d_row, d_ch + h), o[0], o[1], o[2], o[3]);
    };
    // The slow path: every code and scale read from global memory, with bounds checks.
    auto expand_generic = [&](int kt, int buf) {
        int n, k;
        d_coords(kt, n, k);
        uint32_t o[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            float v[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int kk = k + 2 * j + h;
                v[h] = (n < N && kk < K) ? nf4_element(w, dyn, (long long)n * K + kk) : 0.f;
            }
            o[j] = pack_bf16(v[0], v[1]);
        }
        const uint32_t dst = wd0 + buf * G_WD_BYTES;
        sts128(tile_at<WD_CH>(dst, d_row, d_ch), o[0], o[1], o[2], o[3]);
        sts128(tile_at<WD_CH>(dst, d_row, d_ch + 1), o[4], o[5], o[6], o[7]);
    };
    auto raw_of = [&](int stage) { return lds64(s0 + stage * G_STAGE_BYTES + G_A_BYTES + d_raw); };

    float acc[G_MT][G_NT][4];
#pragma unroll
    for (int i = 0; i < G_MT; ++i)
#pragma unroll
        for (int j = 0; j < G_NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    // Fragments of step kk of the tile at (sa, sw) into buffer buf.
    uint32_t af[2][G_MT][4], bfr[2][G_NT][2];
    auto load_frags = [&](int buf, uint32_t sa, uint32_t sw, int kk) {
#pragma unroll
        for (int i = 0; i < G_MT; ++i)
            ldsm4(af[buf][i], tile_at<G_BK / 8>(sa, wm0 + 16 * i + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
        for (int q = 0; q < G_NT / 2; ++q) {
            uint32_t r4[4];
            if (BWD) {
                ldsm4_t(r4, tile_at<WD_CH>(sw, kk * 16 + (((lane >> 3) & 1) << 3) + (lane & 7),
                                           (wn0 + 16 * q) / 8 + (lane >> 4)));
            } else {
                ldsm4(r4, tile_at<WD_CH>(sw, wn0 + 16 * q + ((lane >> 4) << 3) + (lane & 7), kk * 2 + ((lane >> 3) & 1)));
            }
            bfr[buf][2 * q][0] = r4[0];
            bfr[buf][2 * q][1] = r4[1];
            bfr[buf][2 * q + 1][0] = r4[2];
            bfr[buf][2 * q + 1][1] = r4[3];
        }
    };

    const int KT = (KR + G_BK - 1) / G_BK;
#pragma unroll
    for (int st = 0; st < G_STAGES - 1; ++st) {
        if (st < KT) load_stage(st, st);
        cp_commit();
    }
    // Block scales are loaded two tiles ahead: `pending` holds tile kt + 1's at iteration kt.
    ScaleRaw pending{0u, 0.f, false};
    float first = 0.f;
    if (FAST) {
        first = scale_of(w, dyn, fetch_scale(0));
        pending = fetch_scale(1);
    }
    cp_wait<G_STAGES - 3>();  // tiles 0 and 1 have landed
    __syncthreads();
    if (FAST) {
        const uint2 raw = raw_of(0);
        const Lut t = make_lut(first);
        expand_half(t, raw.x, 0, 0);
        expand_half(t, raw.y, 0, 1);
    } else {
        expand_generic(0, 0);
    }
    __syncthreads();

    for (int kt = 0; kt < KT; ++kt) {
        const int next = kt + G_STAGES - 1;
        if (next < KT) load_stage(next % G_STAGES, next);
        cp_commit();
        float scale = 0.f;
        uint2 raw = make_uint2(0u, 0u);
        if (FAST) {
            scale = scale_of(w, dyn, pending);
            pending = fetch_scale(kt + 2);
            // Tile kt + 1's codes (past the last tile: stale bytes expanded into the buffer no
            // one reads, which keeps the loop below free of branches).
            raw = raw_of((kt + 1) % G_STAGES);
        }
        const uint32_t sa = s0 + (kt % G_STAGES) * G_STAGE_BYTES, sw = wd0 + (kt & 1) * G_WD_BYTES;
        const int nbuf = (kt + 1) & 1;
        // One basic block: the expansion of tile kt + 1 interleaves with the products of tile kt.
        // The other weight buffer was last read in iteration kt − 1, before its barrier.
        load_frags(0, sa, sw, 0);
        Lut t;
        if (FAST) t = make_lut(scale);
#pragma unroll
        for (int kk = 0; kk < G_KK; ++kk) {
            if (kk + 1 < G_KK) load_frags((kk + 1) & 1, sa, sw, kk + 1);
#pragma unroll
            for (int i = 0; i < G_MT; ++i)
#pragma unroll
                for (int j = 0; j < G_NT; ++j) mma16816(acc[i][j], af[kk & 1][i], bfr[kk & 1][j][0], bfr[kk & 1][j][1]);
            if (FAST) expand_half(t, kk == 0 ? raw.x : raw.y, nbuf, kk);
        }
        if (!FAST && kt + 1 < KT) expand_generic(kt + 1, nbuf);
        cp_wait<G_STAGES - 3>();
        __syncthreads();
    }

    if (lu != nullptr) {
        // fwd: + s · U Bᵀ (U tile 256 × 64, B tile 128 rows × 64). bwd: + s · mask ∘ (V A) (V tile
        // 256 × 64, A tile 64 rows (rank) × 128 columns (k)). The stages are free: every copy has
        // landed (the last waits) and every warp is past the last barrier.
        cp_wait<0>();
        __syncthreads();
        const uint32_t su = s0, sv = s0 + G_BM * 64 * 2;
        const int ksteps = (r + 15) / 16;
        // Only the 16·ksteps rank columns the products read; zeros past r.
        load_chunks<8, G_THREADS>(su, lu, r, m0, G_BM, M, 0, 2 * ksteps, r, aligned16(lu) && r % 8 == 0);
        if (BWD) {
            // A (r, K): rank rows 0 .. 16·ksteps, columns n0 .. n0 + 127.
            load_chunks<G_BN / 8, G_THREADS>(sv, lw, K, 0, 16 * ksteps, r, n0, G_BN / 8, K, aligned16(lw) && K % 8 == 0);
        } else {
            load_chunks<8, G_THREADS>(sv, lw, r, n0, G_BN, N, 0, 2 * ksteps, r, aligned16(lw) && r % 8 == 0);
        }
        cp_commit();
        cp_wait<0>();
        __syncthreads();
        const uint64_t key = mix(seed);
        const uint64_t rows8 = 8ull * (unsigned long long)K * GOLDEN;  // counter step of 8 rows
#pragma unroll
        for (int q = 0; q < G_NT / 2; ++q) {
            float tmp[G_MT][2][4];
#pragma unroll
            for (int i = 0; i < G_MT; ++i)
#pragma unroll
                for (int e = 0; e < 2; ++e)
#pragma unroll
                    for (int x = 0; x < 4; ++x) tmp[i][e][x] = 0.f;
            for (int ks = 0; ks < ksteps; ++ks) {
                uint32_t b4[4];
                if (BWD) {
                    ldsm4_t(b4, tile_at<G_BN / 8>(sv, ks * 16 + (((lane >> 3) & 1) << 3) + (lane & 7),
                                                  (wn0 + 16 * q) / 8 + (lane >> 4)));
                } else {
                    ldsm4(b4, tile_at<8>(sv, wn0 + 16 * q + ((lane >> 4) << 3) + (lane & 7), ks * 2 + ((lane >> 3) & 1)));
                }
#pragma unroll
                for (int i = 0; i < G_MT; ++i) {
                    uint32_t a4[4];
                    ldsm4(a4, tile_at<8>(su, wm0 + 16 * i + (lane & 15), ks * 2 + (lane >> 4)));
                    mma16816(tmp[i][0], a4, b4[0], b4[1]);
                    mma16816(tmp[i][1], a4, b4[2], b4[3]);
                }
            }
            // Element (row, col)'s mask counter is key + (row·K + col + 1)·γ: from this thread's
            // first element the others are whole multiples of γ and 8·K·γ away.
            const int row0 = m0 + wm0 + (lane >> 2), col0 = n0 + wn0 + 16 * q + 2 * (lane & 3);
            const uint64_t base = key + ((unsigned long long)row0 * K + col0 + 1) * GOLDEN;
#pragma unroll
            for (int i = 0; i < G_MT; ++i)
#pragma unroll
                for (int e = 0; e < 2; ++e)
#pragma unroll
                    for (int x = 0; x < 4; ++x) {
                        float f = s;
                        if (BWD && p > 0.f) {
                            const uint64_t ctr =
                                base + (uint64_t)(2 * i + (x >> 1)) * rows8 + (uint64_t)(8 * e + (x & 1)) * GOLDEN;
                            f *= drop_at(ctr, p, keep);
                        }
                        acc[i][2 * q + e][x] += f * tmp[i][e][x];
                    }
        }
    }

    // Accumulator x = 0, 1 at (row lane / 4, columns 2 · (lane % 4) + 0, 1); x = 2, 3 eight rows below.
#pragma unroll
    for (int i = 0; i < G_MT; ++i) {
#pragma unroll
        for (int j = 0; j < G_NT; ++j) {
            const int row = m0 + wm0 + 16 * i + (lane >> 2);
            const int col = n0 + wn0 + 8 * j + 2 * (lane & 3);
            if (row < M) store2(C, NO, row, col, acc[i][j][0], acc[i][j][1], alpha, beta);
            if (row + 8 < M) store2(C, NO, row + 8, col, acc[i][j][2], acc[i][j][3], alpha, beta);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NF4 GEMV (decoding, M ≤ 16)

constexpr int V_WARPS = 8, V_GROUPS = 2, V_ROWS = 8 * V_GROUPS, V_THREADS = 32 * V_WARPS;

// X fragments of one lane for the 8 steps of a chunk: rows g and g + 8 (when present), k = kb +
// 4s + {0, 1} (a0 / a1) and kb + 4s + {2, 3} (a2 / a3). f32 X gives hi and lo halves.
template <typename T> struct XFrag;

template <> struct XFrag<__nv_bfloat16> {
    static constexpr int PARTS = 1;
    uint32_t v[2][16];  // [row g / g + 8][2s + {0: k 4s..4s+1, 1: 4s+2..4s+3}]
    __device__ void load(const __nv_bfloat16* X, int M, int K, int g, int kb, bool fast) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = g + 8 * h;
            if (fast) {
                if (m < M && kb < K) {
                    const uint4* p = reinterpret_cast<const uint4*>(X + ((size_t)m * K + kb));
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const uint4 u = __ldg(p + i);
                        v[h][4 * i] = u.x;
                        v[h][4 * i + 1] = u.y;
                        v[h][4 * i + 2] = u.z;
                        v[h][4 * i + 3] = u.w;
                    }
                } else {
#pragma unroll
                    for (int i = 0; i < 16; ++i) v[h][i] = 0u;
                }
            } else {
                const unsigned short* s = reinterpret_cast<const unsigned short*>(X);
#pragma unroll
                for (int i = 0; i < 16; ++i) {
                    const int k = kb + 2 * i;
                    const uint32_t lo = (m < M && k < K) ? s[(size_t)m * K + k] : 0u;
                    const uint32_t hi = (m < M && k + 1 < K) ? s[(size_t)m * K + k + 1] : 0u;
                    v[h][i] = lo | (hi << 16);
                }
            }
        }
    }
    __device__ void frag(int s, int part, uint32_t (&a)[4]) const {
        (void)part;
        a[0] = v[0][2 * s];
        a[1] = v[1][2 * s];
        a[2] = v[0][2 * s + 1];
        a[3] = v[1][2 * s + 1];
    }
};

template <> struct XFrag<float> {
    static constexpr int PARTS = 2;
    uint32_t v[2][2][16];  // [hi / lo][row][pair]
    __device__ void set(int h, int i, float x0, float x1) {
        const uint32_t hi = pack_bf16(x0, x1);
        v[0][h][i] = hi;
        v[1][h][i] = pack_bf16(x0 - bf16_lo(hi), x1 - bf16_hi(hi));
    }
    __device__ void load(const float* X, int M, int K, int g, int kb, bool fast) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = g + 8 * h;
            if (fast) {
                const bool ok = m < M && kb < K;
                const float4* p = reinterpret_cast<const float4*>(X + (ok ? (size_t)m * K + kb : 0));
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float4 u = ok ? __ldg(p + i) : make_float4(0.f, 0.f, 0.f, 0.f);
                    set(h, 2 * i, u.x, u.y);
                    set(h, 2 * i + 1, u.z, u.w);
                }
            } else {
#pragma unroll
                for (int i = 0; i < 16; ++i) {
                    const int k = kb + 2 * i;
                    const float x0 = (m < M && k < K) ? X[(size_t)m * K + k] : 0.f;
                    const float x1 = (m < M && k + 1 < K) ? X[(size_t)m * K + k + 1] : 0.f;
                    set(h, i, x0, x1);
                }
            }
        }
    }
    __device__ void frag(int s, int part, uint32_t (&a)[4]) const {
        a[0] = v[part][0][2 * s];
        a[1] = v[part][1][2 * s];
        a[2] = v[part][0][2 * s + 1];
        a[3] = v[part][1][2 * s + 1];
    }
};

template <typename T>
__device__ __forceinline__ void nf4_gemv(const T* __restrict__ X, const Nf4 w, const float* __restrict__ code8,
                                         T* __restrict__ Y, int M, int N, int K, float alpha, float beta, int fast) {
    __shared__ float dyn[256];
    __shared__ float red[V_WARPS][V_GROUPS][4][32];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    if (w.q8 != nullptr)
        for (int i = tid; i < 256; i += V_THREADS) dyn[i] = code8[i];
    __syncthreads();
    const int n0 = blockIdx.x * V_ROWS;
    float acc[V_GROUPS][4];
#pragma unroll
    for (int G = 0; G < V_GROUPS; ++G)
#pragma unroll
        for (int x = 0; x < 4; ++x) acc[G][x] = 0.f;

    const int chunks = (K + 127) / 128;
    // Fast path: the packed codes and scales of chunk c + 8 are loaded while chunk c is expanded.
    uint4 raw[2][V_GROUPS];
    ScaleRaw sc[2][V_GROUPS];
    auto fetch = [&](int c, int slot) {
        const int kb = c * 128 + 32 * t;
#pragma unroll
        for (int G = 0; G < V_GROUPS; ++G) {
            const int n = n0 + 8 * G + g;
            const bool ok = c < chunks && n < N && kb < K;
            const long long i0 = (long long)n * K + kb;
            raw[slot][G] = ok ? __ldg(reinterpret_cast<const uint4*>(w.packed + (i0 >> 1))) : make_uint4(0u, 0u, 0u, 0u);
            sc[slot][G] = scale_load(w, ok ? (i0 >> w.bs_log2) : 0, ok);
        }
    };
    if (fast) fetch(warp, 0);

    for (int c = warp; c < chunks; c += V_WARPS) {
        const int kb = c * 128 + 32 * t;
        if (fast) fetch(c + V_WARPS, 1);
        // X first: its loads are in flight while the codes are expanded.
        XFrag<T> xf;
        xf.load(X, M, K, g, kb, fast != 0);
        // One group at a time: its 32 codes become B fragments and meet the shared X fragments.
#pragma unroll
        for (int G = 0; G < V_GROUPS; ++G) {
            uint32_t b[16];
            if (fast) {
                const Lut lut = make_lut(scale_of(w, dyn, sc[0][G]));
                const uint32_t words[4] = {raw[0][G].x, raw[0][G].y, raw[0][G].z, raw[0][G].w};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    uint32_t o[4];
                    expand8(lut, words[j], o);
#pragma unroll
                    for (int e = 0; e < 4; ++e) b[4 * j + e] = o[e];
                }
                raw[0][G] = raw[1][G];
                sc[0][G] = sc[1][G];
            } else {
                const int n = n0 + 8 * G + g;
#pragma unroll
                for (int i = 0; i < 16; ++i) {
                    float v[2];
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int k = kb + 2 * i + h;
                        v[h] = (n < N && k < K) ? nf4_element(w, dyn, (long long)n * K + k) : 0.f;
                    }
                    b[i] = pack_bf16(v[0], v[1]);
                }
            }
#pragma unroll
            for (int st = 0; st < 8; ++st) {
#pragma unroll
                for (int part = 0; part < XFrag<T>::PARTS; ++part) {
                    uint32_t a[4];
                    xf.frag(st, part, a);
                    mma16816(acc[G], a, b[2 * st], b[2 * st + 1]);
                }
            }
        }
    }

#pragma unroll
    for (int G = 0; G < V_GROUPS; ++G)
#pragma unroll
        for (int x = 0; x < 4; ++x) red[warp][G][x][lane] = acc[G][x];
    __syncthreads();
    // Thread → (group, accumulator slot, lane): 2 × 4 × 32 = 256.
    const int G = tid >> 7, x = (tid >> 5) & 3, l = tid & 31;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < V_WARPS; ++v) sum += red[v][G][x][l];
    const int m = (l >> 2) + 8 * (x >> 1);
    const int n = n0 + 8 * G + 2 * (l & 3) + (x & 1);
    if (m < M && n < N) {
        T* py = Y + ((size_t)m * N + n);
        *py = from_f32<T>(alpha * sum + (beta != 0.f ? beta * to_f32(*py) : 0.f));
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA rank-side products

constexpr int L_BM = 64, L_BK = 64, L_STAGES = 4, L_THREADS = 128;
constexpr uint32_t L_Q_BYTES = L_BM * L_BK * 2, L_R_BYTES = 64 * L_BK * 2, L_STAGE_BYTES = L_Q_BYTES + L_R_BYTES;
static_assert(L_STAGES * L_STAGE_BYTES == 65536, "kernels/src/nf4.rs DOWN_SMEM");

// ws[z] (M, RP) = Σ over this split's c of (Q ∘ mask)[m, c] · R(c, j).
template <int RP, bool R_KC>
__device__ __forceinline__ void lora_down(const __nv_bfloat16* __restrict__ Q, const __nv_bfloat16* __restrict__ R,
                                          float* __restrict__ ws, int M, int C, int r, int c_per_split, int vec_q,
                                          int vec_r, uint64_t seed, float p, float keep) {
    constexpr int NT8 = RP / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t s0 = smem_addr(smem);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int m0 = blockIdx.x * L_BM;
    const int c_begin = blockIdx.y * c_per_split;
    const int c_len = min(C - c_begin, c_per_split);
    const uint64_t key = mix(seed);
    const uint64_t rows8 = 8ull * (unsigned long long)C * GOLDEN;  // counter step of 8 rows

    auto load_stage = [&](int stage, int kt) {
        const uint32_t sq = s0 + stage * L_STAGE_BYTES, sr = sq + L_Q_BYTES;
        const int c0 = c_begin + kt * L_BK;
        load_tile<L_BM, L_BK / 8, L_BK / 8, L_THREADS>(sq, Q, C, m0, c0, M, C, vec_q);
        if (R_KC) {
            load_tile<RP, L_BK / 8, L_BK / 8, L_THREADS>(sr, R, C, 0, c0, r, C, vec_r);
        } else {
            load_tile<L_BK, RP / 8, 8, L_THREADS>(sr, R, r, c0, 0, C, r, vec_r);
        }
    };

    float acc[NT8][4];
#pragma unroll
    for (int j = 0; j < NT8; ++j)
#pragma unroll
        for (int x = 0; x < 4; ++x) acc[j][x] = 0.f;

    const int KT = (c_len + L_BK - 1) / L_BK;
#pragma unroll
    for (int st = 0; st < L_STAGES - 1; ++st) {
        if (st < KT) load_stage(st, st);
        cp_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        cp_wait<L_STAGES - 2>();
        __syncthreads();
        const int next = kt + L_STAGES - 1;
        if (next < KT) load_stage(next % L_STAGES, next);
        cp_commit();
        const uint32_t sq = s0 + (kt % L_STAGES) * L_STAGE_BYTES, sr = sq + L_Q_BYTES;
        const int c0 = c_begin + kt * L_BK;
#pragma unroll
        for (int kk = 0; kk < L_BK / 16; ++kk) {
            uint32_t a[4];
            ldsm4(a, tile_at<8>(sq, 16 * warp + (lane & 15), kk * 2 + (lane >> 4)));
            if (p > 0.f) {
                // a[x]: row 16·warp + lane/4 (+8 for odd x), columns 2·(lane%4) (+8 for x ≥ 2),
                // each a pair of consecutive columns.
                const int row = m0 + 16 * warp + (lane >> 2);
                const int col = c0 + kk * 16 + 2 * (lane & 3);
                const uint64_t base = key + ((unsigned long long)row * C + col + 1) * GOLDEN;
#pragma unroll
                for (int x = 0; x < 4; ++x) {
                    const uint64_t ctr = base + (x & 1) * rows8 + (x >> 1) * (8 * GOLDEN);
                    a[x] = drop_pair(a[x], ctr, ctr + GOLDEN, p, keep);
                }
            }
#pragma unroll
            for (int q = 0; q < NT8 / 2; ++q) {
                uint32_t b[4];
                if (R_KC) {
                    ldsm4(b, tile_at<8>(sr, 16 * q + ((lane >> 4) << 3) + (lane & 7), kk * 2 + ((lane >> 3) & 1)));
                } else {
                    ldsm4_t(b, tile_at<8>(sr, kk * 16 + (((lane >> 3) & 1) << 3) + (lane & 7), 2 * q + (lane >> 4)));
                }
                mma16816(acc[2 * q], a, b[0], b[1]);
                mma16816(acc[2 * q + 1], a, b[2], b[3]);
            }
        }
    }

    float* out = ws + (size_t)blockIdx.y * M * RP;
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
        const int row = m0 + 16 * warp + (lane >> 2);
        const int col = 8 * j + 2 * (lane & 3);
        if (row < M) *reinterpret_cast<float2*>(out + (size_t)row * RP + col) = make_float2(acc[j][0], acc[j][1]);
        if (row + 8 < M)
            *reinterpret_cast<float2*>(out + (size_t)(row + 8) * RP + col) = make_float2(acc[j][2], acc[j][3]);
    }
}

constexpr int R_BC = 128, R_BK = 32, R_STAGES = 4, R_THREADS = 128;
constexpr uint32_t R_P_BYTES = R_BK * 64 * 2, R_Q_BYTES = R_BK * R_BC * 2, R_STAGE_BYTES = R_P_BYTES + R_Q_BYTES;
static_assert(R_STAGES * R_STAGE_BYTES == 49152, "kernels/src/nf4.rs GRAD_SMEM");

// ws[z] (RP, C) = Σ over this split's m of P[m, j] · (Q ∘ mask)[m, c].
template <int RP>
__device__ __forceinline__ void lora_grad(const __nv_bfloat16* __restrict__ P, const __nv_bfloat16* __restrict__ Q,
                                          float* __restrict__ ws, int M, int C, int r, int m_per_split, int vec_p,
                                          int vec_q, uint64_t seed, float p, float keep) {
    constexpr int MT = RP / 16, NT8 = 4;  // a warp: RP rows × 32 columns
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t s0 = smem_addr(smem);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int c0 = blockIdx.x * R_BC;
    const int m_begin = blockIdx.y * m_per_split;
    const int m_len = min(M - m_begin, m_per_split);
    const uint64_t key = mix(seed);
    const uint64_t row1 = (unsigned long long)C * GOLDEN, rows8 = 8 * row1;  // counter steps of 1 and 8 rows

    auto load_stage = [&](int stage, int kt) {
        const uint32_t sp = s0 + stage * R_STAGE_BYTES, sq = sp + R_P_BYTES;
        const int mk = m_begin + kt * R_BK;
        load_tile<R_BK, RP / 8, 8, R_THREADS>(sp, P, r, mk, 0, M, r, vec_p);
        load_tile<R_BK, R_BC / 8, R_BC / 8, R_THREADS>(sq, Q, C, mk, c0, M, C, vec_q);
    };

    float acc[MT][NT8][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT8; ++j)
#pragma unroll
            for (int x = 0; x < 4; ++x) acc[i][j][x] = 0.f;

    const int KT = (m_len + R_BK - 1) / R_BK;
#pragma unroll
    for (int st = 0; st < R_STAGES - 1; ++st) {
        if (st < KT) load_stage(st, st);
        cp_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        cp_wait<R_STAGES - 2>();
        __syncthreads();
        const int next = kt + R_STAGES - 1;
        if (next < KT) load_stage(next % R_STAGES, next);
        cp_commit();
        const uint32_t sp = s0 + (kt % R_STAGES) * R_STAGE_BYTES, sq = sp + R_P_BYTES;
        const int mk = m_begin + kt * R_BK;
#pragma unroll
        for (int kk = 0; kk < R_BK / 16; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i)
                ldsm4_t(a[i], tile_at<8>(sp, kk * 16 + ((lane >> 4) << 3) + (lane & 7), 2 * i + ((lane >> 3) & 1)));
#pragma unroll
            for (int q = 0; q < NT8 / 2; ++q) {
                uint32_t b[4];
                ldsm4_t(b, tile_at<R_BC / 8>(sq, kk * 16 + (((lane >> 3) & 1) << 3) + (lane & 7),
                                             (32 * warp + 16 * q) / 8 + (lane >> 4)));
                if (p > 0.f) {
                    // b[2e2 + e]: column 8·(2q + e2) + lane/4 of the warp's 32, rows 2·(lane%4) + 8e
                    // and the row below it.
                    const int row = mk + kk * 16 + 2 * (lane & 3);
                    const int col = c0 + 32 * warp + 16 * q + (lane >> 2);
                    const uint64_t base = key + ((unsigned long long)row * C + col + 1) * GOLDEN;
#pragma unroll
                    for (int x = 0; x < 4; ++x) {
                        const uint64_t ctr = base + (x & 1) * rows8 + (x >> 1) * (8 * GOLDEN);
                        b[x] = drop_pair(b[x], ctr, ctr + row1, p, keep);
                    }
                }
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    mma16816(acc[i][2 * q], a[i], b[0], b[1]);
                    mma16816(acc[i][2 * q + 1], a[i], b[2], b[3]);
                }
            }
        }
    }

    float* out = ws + (size_t)blockIdx.y * RP * C;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT8; ++j) {
            const int row = 16 * i + (lane >> 2);
            const int col = c0 + 32 * warp + 8 * j + 2 * (lane & 3);
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                const int cc = col + (x & 1);
                if (cc < C) out[(size_t)(row + 8 * (x >> 1)) * C + cc] = acc[i][j][x];
            }
        }
}

// The fast path (K % 32 == 0) and the element-by-element one, chosen once a launch.
template <bool BWD>
__device__ __forceinline__ void nf4_gemm(const __nv_bfloat16* A, const Nf4 w, const float* code8, __nv_bfloat16* C,
                                         int M, int N, int K, float alpha, float beta, int vec_a, int fast,
                                         const __nv_bfloat16* lu, const __nv_bfloat16* lw, int r, float s,
                                         uint64_t seed, float p, float keep) {
    __shared__ float dyn[256];
    if (w.q8 != nullptr)
        for (int i = threadIdx.x; i < 256; i += G_THREADS) dyn[i] = code8[i];
    // dyn is first read after the pipeline prologue's barrier.
    if (fast) {
        nf4_gemm_body<BWD, true>(A, w, dyn, C, M, N, K, alpha, beta, vec_a, lu, lw, r, s, seed, p, keep);
    } else {
        nf4_gemm_body<BWD, false>(A, w, dyn, C, M, N, K, alpha, beta, vec_a, lu, lw, r, s, seed, p, keep);
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points

#define NF4_ARGS                                                                                             \
    const uint8_t *packed, const float *absmax, const uint8_t *q8, const float *nested, const float *code8,   \
        float offset, int bs_log2, int nbs_log2
#define NF4_MAKE Nf4{packed, absmax, q8, nested, offset, bs_log2, nbs_log2}

GM_KERNEL void __launch_bounds__(G_THREADS, 1)
    nf4_gemm_fwd_bf16(const __nv_bfloat16* X, NF4_ARGS, __nv_bfloat16* Y, int M, int N, int K, float alpha,
                      float beta, int vec_a, int fast, const __nv_bfloat16* U, const __nv_bfloat16* B, int r,
                      float s) {
    nf4_gemm<false>(X, NF4_MAKE, code8, Y, M, N, K, alpha, beta, vec_a, fast, U, B, r, s, 0ull, 0.f, 1.f);
}

GM_KERNEL void __launch_bounds__(G_THREADS, 1)
    nf4_gemm_bwd_bf16(const __nv_bfloat16* dY, NF4_ARGS, __nv_bfloat16* dX, int M, int N, int K, float alpha,
                      float beta, int vec_a, int fast, const __nv_bfloat16* V, const __nv_bfloat16* A, int r, float s,
                      unsigned long long seed, float p, float keep) {
    nf4_gemm<true>(dY, NF4_MAKE, code8, dX, M, N, K, alpha, beta, vec_a, fast, V, A, r, s, seed, p, keep);
}

#define NF4_GEMV(name, T, MIN_BLOCKS)                                                                         \
    GM_KERNEL void __launch_bounds__(V_THREADS, MIN_BLOCKS)                                                    \
        name(const T* X, NF4_ARGS, T* Y, int M, int N, int K, float alpha, float beta, int fast) {             \
        nf4_gemv<T>(X, NF4_MAKE, code8, Y, M, N, K, alpha, beta, fast);                                        \
    }

NF4_GEMV(nf4_gemv_fwd_f32, float, 1)
NF4_GEMV(nf4_gemv_fwd_bf16, __nv_bfloat16, 2)

#define LORA_DOWN(name, RP, R_KC)                                                                             \
    GM_KERNEL void __launch_bounds__(L_THREADS)                                                                \
        name(const __nv_bfloat16* Q, const __nv_bfloat16* R, float* ws, int M, int C, int r, int c_per_split,  \
             int vec_q, int vec_r, unsigned long long seed, float p, float keep) {                             \
        lora_down<RP, R_KC>(Q, R, ws, M, C, r, c_per_split, vec_q, vec_r, seed, p, keep);                      \
    }

LORA_DOWN(lora_down_nt_r16_fwd_bf16, 16, true)
LORA_DOWN(lora_down_nt_r32_fwd_bf16, 32, true)
LORA_DOWN(lora_down_nt_r64_fwd_bf16, 64, true)
LORA_DOWN(lora_down_nn_r16_fwd_bf16, 16, false)
LORA_DOWN(lora_down_nn_r32_fwd_bf16, 32, false)
LORA_DOWN(lora_down_nn_r64_fwd_bf16, 64, false)

// out (M, r) bf16 = Σ_z ws[z] (M, RP), splits in order.
GM_KERNEL void lora_down_finish_fwd_bf16(const float* ws, __nv_bfloat16* out, int M, int r, int RP, int splits) {
    const long long n = (long long)M * r;
    for (long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x; o < n; o += (long long)gridDim.x * blockDim.x) {
        const long long m = o / r, j = o % r;
        float v = 0.f;
        for (int z = 0; z < splits; ++z) v += ws[((long long)z * M + m) * RP + j];
        out[o] = __float2bfloat16_rn(v);
    }
}

#define LORA_GRAD(name, RP)                                                                                   \
    GM_KERNEL void __launch_bounds__(R_THREADS)                                                                \
        name(const __nv_bfloat16* P, const __nv_bfloat16* Q, float* ws, int M, int C, int r, int m_per_split,  \
             int vec_p, int vec_q, unsigned long long seed, float p, float keep) {                             \
        lora_grad<RP>(P, Q, ws, M, C, r, m_per_split, vec_p, vec_q, seed, p, keep);                            \
    }

LORA_GRAD(lora_grad_r16_bwd_bf16, 16)
LORA_GRAD(lora_grad_r32_bwd_bf16, 32)
LORA_GRAD(lora_grad_r64_bwd_bf16, 64)

// out = s · Σ_z ws[z] (RP, C) + beta · out, as (r, C), or (C, r) with trans.
GM_KERNEL void lora_grad_finish_bwd_f32(const float* ws, float* out, int C, int r, int RP, int splits, float s,
                                        float beta, int trans) {
    const long long n = (long long)C * r;
    for (long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x; o < n; o += (long long)gridDim.x * blockDim.x) {
        const long long j = trans ? o % r : o / C, c = trans ? o / r : o % C;
        float v = 0.f;
        for (int z = 0; z < splits; ++z) v += ws[((long long)z * RP + j) * C + c];
        out[o] = s * v + (beta != 0.f ? beta * out[o] : 0.f);
    }
}
