// elementwise: the memory-bound kernels of a training step (embedding, RMSNorm, RoPE, SwiGLU,
// dropout, residual add). Each is a template over the activation type T (float or
// __nv_bfloat16) with every computation in f32 and one rounding to T per stored value.
//
// gristmill: sm90a
// The module is built twice: compute_80 for every GPU, and compute_90a, where the embedding
// backward adds 16 bytes per atomic (the float4 atomicAdd of compute capability 9.x). Nothing
// else differs between the two.
//
// Memory access. Data moves in 16-byte "chunks" (4 f32 or 8 bf16) with one vector load or store
// each when the launcher says the pointers are 16-byte aligned and (for row-wise ops) the row
// length is a multiple of the chunk (`vec` = 1); otherwise the same chunks are read element by
// element with bounds checks (`vec` = 0), so every kernel takes any shape and any view.
//
// Row-wise ops (embedding, RMSNorm) run one block per row. A thread owns chunks
// j = threadIdx.x + k·blockDim.x and keeps up to ROW_ITEMS of them in registers between the
// reduction and the write, so a row is read from DRAM once; the launcher sizes the block
// (32..ROW_THREADS threads, a multiple of 32) so a row fits, and chunks past ROW_ITEMS·blockDim.x
// (rows wider than 8192 bf16 / 4096 f32) are read a second time, from L2.
//
// Flat ops (SwiGLU, dropout, add) are grid-stride loops over groups of U chunks a thread
// (chunk j = g·blockDim.x·U + k·blockDim.x + threadIdx.x, k < U; U = FLAT_UNROLL, 1 for the
// SwiGLU backward): all loads of a group are issued before the first use, so a thread keeps
// U · 16 bytes of every input in flight. FLAT_THREADS threads a block, at most one wave of blocks
// (the launcher asks the driver how many fit). RoPE is a grid-stride loop over one chunk of pairs
// a thread.
//
// ---------------------------------------------------------------------------------------------
// embedding_fwd_<T>(tokens: (M) u32, table: (V, C) T, out: (M, C) T, V, C, vec)
//   out[m] = table[tokens[m]], or a row of zeros when tokens[m] >= V (never read out of bounds).
//   Grid: M blocks (one a row); a plain copy, no arithmetic.
//
// embedding_bwd_<T>(tokens: (M) u32, dy: (M, C) T, dtable: (V, C) f32, V, C, vec)
//   dtable[tokens[m]] += dy[m] for every m with tokens[m] < V, by f32 atomics (repeated ids
//   accumulate in an unspecified order). Grid: M blocks. The atomics of a warp instruction cover
//   consecutive addresses, so that L2 sees whole 32-byte sectors: on compute_90a with vec (C a
//   multiple of 4, dtable 16-byte and dy 4·sizeof(T)-byte aligned) a thread adds "quads" of 4
//   elements q = threadIdx.x + k·blockDim.x with one 16-byte float4 atomic each; otherwise (and
//   on compute_80) element j = threadIdx.x + k·blockDim.x gets one f32 atomic. Either way a
//   thread loads ROW_ITEMS quads or elements before its first atomic.
//
// rmsnorm_fwd_<T>(x: (M, C) T, w: (C) f32, y: (M, C) T, rstd: (M) f32, C, eps, vec)
//   rstd = 1 / sqrt(Σ x² · (1/C) + eps), y = w · (x · rstd) (HF's order), all in f32.
//   Grid: M blocks; block-wide f32 sum; x read once.
//
// add_rmsnorm_fwd_<T>(resid: (M, C) T in place, delta: (M, C) T, w, y, rstd, C, eps, vec)
//   resid = T(resid + delta), then rmsnorm_fwd of the rounded resid. Grid: M blocks.
//
// rmsnorm_bwd_<T>(x: (M, C) T, w: (C) f32, rstd: (M) f32, dy: (M, C) T, dx: (M, C) T, C,
//                 accumulate, vec)
//   g = dy · w, mean = Σ g · (x · r) · (1/C), dx = r · (g − x · r · mean), plus the old dx (in
//   f32, before the one rounding) when accumulate. Grid: M blocks; x and dy read once.
//
// rope_<fwd|bwd>_<T>(x: (N, H, D) T in place, cos: (N, D/2) f32, sin: (N, D/2) f32, N·H, H, D/2,
//                    vec)
//   Rotate-half pairs (i, i + D/2): with s = ±sin (− for the backward, the transposed rotation),
//   x[i] ← x[i]·cos − x[i+D/2]·s, x[i+D/2] ← x[i+D/2]·cos + x[i]·s. A unit is one chunk of
//   consecutive i of one head; vec needs D/2 a multiple of the chunk. Flat grid.
//
// swiglu_fwd_<T>(g: (n) T, u: (n) T, out: (n) T, n, vec)
//   out = g · σ(g) · u with the overflow-free σ of the reference (expf, not __expf). Flat grid.
// swiglu_bwd_<T>(g, u, dout, dg, du: (n) T, n, vec)
//   du = dout · g · σ(g), dg = dout · u · σ(g) · (1 + g · (1 − σ(g))). Flat grid.
//
// dropout_fwd_<T>(x: (n) T, out: (n) T, n, key, cut, keep, vec)
//   out[i] = x[i] · (u_i < p ? 0 : keep), keep = 1/(1 − p) computed by the host in f32, with the
//   counter-based uniform of gristmill_core::ops::lora::dropout_uniform:
//   u_i = (mix64(key + (i + 1)·γ) >> 40) · 2⁻²⁴, key = mix64(seed) (computed by the host),
//   γ = 0x9E3779B97F4A7C15 (SplitMix64), so the CPU and the GPU drop the same elements.
//   The test is exact in integers: with k = z >> 40 (z the 64-bit hash) and p·2²⁴ exact in f32,
//   k·2⁻²⁴ < p ⇔ k < ⌈p·2²⁴⌉ ⇔ hi32(z) < ⌈p·2²⁴⌉·2⁸ = cut (host-computed, < 2³²). Only hi32(z)
//   is needed: mix64's last step z ^ (z >> 31) leaves bits 40..63 unchanged, and the high word
//   of the last 64-bit product takes one mul.hi and two 32-bit multiply-adds. x · 0 (not a
//   stored +0) keeps the bits of the reference's x · mask. Flat grid.
//
// add_fwd_<T>(a: (n) T in place, b: (n) T, n, vec)
//   a = T(a + b). Flat grid.
// ---------------------------------------------------------------------------------------------
#include "common.cuh"

// Must equal ROW_ITEMS, ROW_THREADS, FLAT_THREADS and FLAT_UNROLL in kernels/src/elementwise.rs.
// Measured at M = C = 4096 bf16 on an H200: ROW_ITEMS 2 beats 4 and 8 (the smaller register cache
// lets more blocks share an SM); FLAT_UNROLL 2 beats 1 and 4 for dropout, while SwiGLU's backward,
// with three inputs in flight already, runs best at 1. Issuing the next group's loads before
// working on the current one (double buffering) cost dropout 5 points of copy bandwidth (its
// extra registers cut the blocks an SM holds) and gained SwiGLU's forward 1 or 2.
#define ROW_ITEMS 2
#define ROW_THREADS 512
#define FLAT_THREADS 256
#define FLAT_UNROLL 2

namespace {

// 16 bytes of T as f32 and back; packing rounds to nearest even (exact for values that came from T).
template <typename T> struct Chunk;

template <> struct Chunk<float> {
    static constexpr int N = 4;
    static __device__ __forceinline__ void unpack(uint4 r, float* f) {
        f[0] = __uint_as_float(r.x);
        f[1] = __uint_as_float(r.y);
        f[2] = __uint_as_float(r.z);
        f[3] = __uint_as_float(r.w);
    }
    static __device__ __forceinline__ uint4 pack(const float* f) {
        return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
    }
};

__device__ __forceinline__ uint32_t bf16_pair(float lo, float hi) {
    return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

template <> struct Chunk<__nv_bfloat16> {
    static constexpr int N = 8;
    static __device__ __forceinline__ void unpack(uint4 r, float* f) {
        const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            f[2 * q] = __uint_as_float(w[q] << 16);
            f[2 * q + 1] = __uint_as_float(w[q] & 0xffff0000u);
        }
    }
    static __device__ __forceinline__ uint4 pack(const float* f) {
        return make_uint4(bf16_pair(f[0], f[1]), bf16_pair(f[2], f[3]), bf16_pair(f[4], f[5]), bf16_pair(f[6], f[7]));
    }
};

// The chunk at p: one 16-byte load when vec (p aligned, a whole chunk in bounds), else the first
// `valid` elements one by one and zeros after them.
template <typename T> __device__ __forceinline__ uint4 load_chunk(const T* p, int valid, bool vec) {
    if (vec) return *reinterpret_cast<const uint4*>(p);
    float f[Chunk<T>::N];
#pragma unroll
    for (int i = 0; i < Chunk<T>::N; ++i) f[i] = i < valid ? to_f32(p[i]) : 0.f;
    return Chunk<T>::pack(f);
}

// Stores the chunk r at p, as load_chunk reads it.
template <typename T> __device__ __forceinline__ void store_chunk(T* p, uint4 r, int valid, bool vec) {
    if (vec) {
        *reinterpret_cast<uint4*>(p) = r;
        return;
    }
    float f[Chunk<T>::N];
    Chunk<T>::unpack(r, f);
#pragma unroll
    for (int i = 0; i < Chunk<T>::N; ++i)
        if (i < valid) p[i] = from_f32<T>(f[i]);
}

template <typename T> __device__ __forceinline__ void load_f(const T* p, int valid, bool vec, float* f) {
    Chunk<T>::unpack(load_chunk(p, valid, vec), f);
}

template <typename T> __device__ __forceinline__ void store_f(T* p, const float* f, int valid, bool vec) {
    store_chunk(p, Chunk<T>::pack(f), valid, vec);
}

// N f32 values (the f32 side tables: w, cos, sin) next to a chunk of N elements of T.
template <int N> __device__ __forceinline__ void load_f32s(const float* p, int valid, bool vec, float* f) {
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
        float g[4];
        load_f(p + 4 * q, valid - 4 * q, vec, g);
#pragma unroll
        for (int i = 0; i < 4; ++i) f[4 * q + i] = g[i];
    }
}

template <typename T> __device__ __forceinline__ float sum_sq(uint4 r) {
    float f[Chunk<T>::N];
    Chunk<T>::unpack(r, f);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < Chunk<T>::N; ++i) s += f[i] * f[i];
    return s;
}

// y chunk = w · (x · r).
template <typename T> __device__ __forceinline__ uint4 norm_chunk(uint4 xr, const float* w, int valid, bool vec, float r) {
    constexpr int N = Chunk<T>::N;
    float x[N], wf[N], y[N];
    Chunk<T>::unpack(xr, x);
    load_f32s<N>(w, valid, vec, wf);
#pragma unroll
    for (int i = 0; i < N; ++i) y[i] = wf[i] * (x[i] * r);
    return Chunk<T>::pack(y);
}

// ----------------------------------------------------------------------------------- embedding

template <typename T>
__device__ __forceinline__ void embedding_fwd(const uint32_t* __restrict__ tokens, const T* __restrict__ table,
                                              T* __restrict__ out, int v, int c, bool vec) {
    constexpr int N = Chunk<T>::N;
    const int chunks = (c + N - 1) / N;
    const uint32_t id = tokens[blockIdx.x];
    const bool hit = id < uint32_t(v);
    const T* src = table + size_t(hit ? id : 0) * c;
    T* dst = out + size_t(blockIdx.x) * c;
    // All loads first, then all stores: ROW_ITEMS loads in flight per thread.
    uint4 cache[ROW_ITEMS];
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        cache[k] = (hit && j < chunks) ? load_chunk(src + j * N, c - j * N, vec) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < chunks) store_chunk(dst + j * N, cache[k], c - j * N, vec);
    }
    for (int j = threadIdx.x + ROW_ITEMS * blockDim.x; j < chunks; j += blockDim.x) {
        const uint4 r = hit ? load_chunk(src + j * N, c - j * N, vec) : make_uint4(0, 0, 0, 0);
        store_chunk(dst + j * N, r, c - j * N, vec);
    }
}

#if __CUDA_ARCH__ >= 900
// Four consecutive elements of T at p (aligned to 4·sizeof(T)) as f32, for the float4 atomics.
__device__ __forceinline__ float4 load_quad(const float* p) { return *reinterpret_cast<const float4*>(p); }

__device__ __forceinline__ float4 load_quad(const __nv_bfloat16* p) {
    const uint2 r = *reinterpret_cast<const uint2*>(p);
    return make_float4(__uint_as_float(r.x << 16), __uint_as_float(r.x & 0xffff0000u), __uint_as_float(r.y << 16),
                       __uint_as_float(r.y & 0xffff0000u));
}
#endif

template <typename T>
__device__ __forceinline__ void embedding_bwd(const uint32_t* __restrict__ tokens, const T* __restrict__ dy,
                                              float* __restrict__ dtable, int v, int c, bool vec) {
    const uint32_t id = tokens[blockIdx.x];
    if (id >= uint32_t(v)) return;
    const T* src = dy + size_t(blockIdx.x) * c;
    float* dst = dtable + size_t(id) * c;
#if __CUDA_ARCH__ >= 900
    if (vec) {
        const int quads = c / 4;
        for (int q0 = threadIdx.x; q0 < quads; q0 += ROW_ITEMS * blockDim.x) {
            float4 g[ROW_ITEMS];
#pragma unroll
            for (int k = 0; k < ROW_ITEMS; ++k) {
                const int q = q0 + k * blockDim.x;
                if (q < quads) g[k] = load_quad(src + 4 * q);
            }
#pragma unroll
            for (int k = 0; k < ROW_ITEMS; ++k) {
                const int q = q0 + k * blockDim.x;
                if (q < quads) atomicAdd(reinterpret_cast<float4*>(dst + 4 * q), g[k]);
            }
        }
        return;
    }
#endif
    for (int j0 = threadIdx.x; j0 < c; j0 += ROW_ITEMS * blockDim.x) {
        float g[ROW_ITEMS];
#pragma unroll
        for (int k = 0; k < ROW_ITEMS; ++k) {
            const int j = j0 + k * blockDim.x;
            if (j < c) g[k] = to_f32(src[j]);
        }
#pragma unroll
        for (int k = 0; k < ROW_ITEMS; ++k) {
            const int j = j0 + k * blockDim.x;
            if (j < c) atomicAdd(dst + j, g[k]);
        }
    }
}

// ------------------------------------------------------------------------------------- rmsnorm

template <typename T>
__device__ __forceinline__ void rmsnorm_fwd(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y,
                                            float* __restrict__ rstd, int c, float eps, bool vec) {
    constexpr int N = Chunk<T>::N;
    __shared__ float scratch[32];
    const int chunks = (c + N - 1) / N;
    const T* xr = x + size_t(blockIdx.x) * c;
    T* yr = y + size_t(blockIdx.x) * c;
    uint4 cache[ROW_ITEMS];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < chunks) {
            cache[k] = load_chunk(xr + j * N, c - j * N, vec);
            ss += sum_sq<T>(cache[k]);
        }
    }
    for (int j = threadIdx.x + ROW_ITEMS * blockDim.x; j < chunks; j += blockDim.x)
        ss += sum_sq<T>(load_chunk(xr + j * N, c - j * N, vec));
    ss = block_sum(ss, scratch);
    const float r = 1.f / sqrtf(ss * (1.f / float(c)) + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < chunks) store_chunk(yr + j * N, norm_chunk<T>(cache[k], w + j * N, c - j * N, vec, r), c - j * N, vec);
    }
    for (int j = threadIdx.x + ROW_ITEMS * blockDim.x; j < chunks; j += blockDim.x) {
        const uint4 xc = load_chunk(xr + j * N, c - j * N, vec);
        store_chunk(yr + j * N, norm_chunk<T>(xc, w + j * N, c - j * N, vec, r), c - j * N, vec);
    }
}

template <typename T> __device__ __forceinline__ uint4 add_chunk(uint4 a, uint4 b) {
    constexpr int N = Chunk<T>::N;
    float fa[N], fb[N];
    Chunk<T>::unpack(a, fa);
    Chunk<T>::unpack(b, fb);
#pragma unroll
    for (int i = 0; i < N; ++i) fa[i] += fb[i];
    return Chunk<T>::pack(fa);
}

template <typename T>
__device__ __forceinline__ void add_rmsnorm_fwd(T* __restrict__ resid, const T* __restrict__ delta,
                                                const float* __restrict__ w, T* __restrict__ y,
                                                float* __restrict__ rstd, int c, float eps, bool vec) {
    constexpr int N = Chunk<T>::N;
    __shared__ float scratch[32];
    const int chunks = (c + N - 1) / N;
    T* rr = resid + size_t(blockIdx.x) * c;
    const T* dr = delta + size_t(blockIdx.x) * c;
    T* yr = y + size_t(blockIdx.x) * c;
    uint4 cache[ROW_ITEMS];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < chunks) {
            // The sum is rounded to T before it is stored and before it is normalised.
            cache[k] = add_chunk<T>(load_chunk(rr + j * N, c - j * N, vec), load_chunk(dr + j * N, c - j * N, vec));
            store_chunk(rr + j * N, cache[k], c - j * N, vec);
            ss += sum_sq<T>(cache[k]);
        }
    }
    for (int j = threadIdx.x + ROW_ITEMS * blockDim.x; j < chunks; j += blockDim.x) {
        const uint4 s = add_chunk<T>(load_chunk(rr + j * N, c - j * N, vec), load_chunk(dr + j * N, c - j * N, vec));
        store_chunk(rr + j * N, s, c - j * N, vec);
        ss += sum_sq<T>(s);
    }
    ss = block_sum(ss, scratch);
    const float r = 1.f / sqrtf(ss * (1.f / float(c)) + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < chunks) store_chunk(yr + j * N, norm_chunk<T>(cache[k], w + j * N, c - j * N, vec, r), c - j * N, vec);
    }
    // This thread stored these chunks of resid above: reading them back is ordered.
    for (int j = threadIdx.x + ROW_ITEMS * blockDim.x; j < chunks; j += blockDim.x) {
        const uint4 s = load_chunk(rr + j * N, c - j * N, vec);
        store_chunk(yr + j * N, norm_chunk<T>(s, w + j * N, c - j * N, vec, r), c - j * N, vec);
    }
}

// Σ (dy · w) · (x · r) over one chunk.
template <typename T>
__device__ __forceinline__ float bwd_dot(uint4 xc, uint4 dc, const float* w, int valid, bool vec, float r) {
    constexpr int N = Chunk<T>::N;
    float x[N], d[N], wf[N];
    Chunk<T>::unpack(xc, x);
    Chunk<T>::unpack(dc, d);
    load_f32s<N>(w, valid, vec, wf);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) s += d[i] * wf[i] * (x[i] * r);
    return s;
}

// dx chunk = r · (dy · w − x · r · mean) (+ the old dx chunk).
template <typename T>
__device__ __forceinline__ void bwd_store(T* dx, uint4 xc, uint4 dc, const float* w, int valid, bool vec, float r,
                                          float mean, bool accumulate) {
    constexpr int N = Chunk<T>::N;
    float x[N], d[N], wf[N], o[N];
    Chunk<T>::unpack(xc, x);
    Chunk<T>::unpack(dc, d);
    load_f32s<N>(w, valid, vec, wf);
    if (accumulate) {
        load_f(dx, valid, vec, o);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) o[i] = 0.f;
    }
    // Rounded step by step in the reference's order, never fused: g − x̂·mean cancels when x̂ is
    // nearly parallel to g (C = 1 is the extreme case), where an FMA's different rounding shows.
#pragma unroll
    for (int i = 0; i < N; ++i)
        o[i] += __fmul_rn(r, __fsub_rn(__fmul_rn(d[i], wf[i]), __fmul_rn(__fmul_rn(x[i], r), mean)));
    store_f(dx, o, valid, vec);
}

template <typename T>
__device__ __forceinline__ void rmsnorm_bwd(const T* __restrict__ x, const float* __restrict__ w,
                                            const float* __restrict__ rstd, const T* __restrict__ dy,
                                            T* __restrict__ dx, int c, bool accumulate, bool vec) {
    constexpr int N = Chunk<T>::N;
    __shared__ float scratch[32];
    const int chunks = (c + N - 1) / N;
    const size_t base = size_t(blockIdx.x) * c;
    const float r = rstd[blockIdx.x];
    uint4 cx[ROW_ITEMS], cd[ROW_ITEMS];
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < chunks) {
            cx[k] = load_chunk(x + base + j * N, c - j * N, vec);
            cd[k] = load_chunk(dy + base + j * N, c - j * N, vec);
        }
    }
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < chunks) dot += bwd_dot<T>(cx[k], cd[k], w + j * N, c - j * N, vec, r);
    }
    for (int j = threadIdx.x + ROW_ITEMS * blockDim.x; j < chunks; j += blockDim.x) {
        const uint4 xc = load_chunk(x + base + j * N, c - j * N, vec);
        const uint4 dc = load_chunk(dy + base + j * N, c - j * N, vec);
        dot += bwd_dot<T>(xc, dc, w + j * N, c - j * N, vec, r);
    }
    const float mean = block_sum(dot, scratch) * (1.f / float(c));
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < chunks) bwd_store<T>(dx + base + j * N, cx[k], cd[k], w + j * N, c - j * N, vec, r, mean, accumulate);
    }
    for (int j = threadIdx.x + ROW_ITEMS * blockDim.x; j < chunks; j += blockDim.x) {
        const uint4 xc = load_chunk(x + base + j * N, c - j * N, vec);
        const uint4 dc = load_chunk(dy + base + j * N, c - j * N, vec);
        bwd_store<T>(dx + base + j * N, xc, dc, w + j * N, c - j * N, vec, r, mean, accumulate);
    }
}

// ---------------------------------------------------------------------------------------- rope

template <typename T>
__device__ __forceinline__ void rope(T* __restrict__ x, const float* __restrict__ cosv, const float* __restrict__ sinv,
                                     int rows, int h, int half, float sign, bool vec) {
    constexpr int N = Chunk<T>::N;
    const unsigned per_head = (half + N - 1) / N;
    const unsigned units = unsigned(rows) * per_head;
    for (unsigned u = blockIdx.x * blockDim.x + threadIdx.x; u < units; u += gridDim.x * blockDim.x) {
        const unsigned row = u / per_head, j = u - row * per_head, tok = row / unsigned(h);
        const int valid = half - int(j) * N;
        T* x1 = x + size_t(row) * (2 * half) + j * N;
        T* x2 = x1 + half;
        const size_t t = size_t(tok) * half + j * N;
        float a[N], b[N], cs[N], sn[N];
        load_f(x1, valid, vec, a);
        load_f(x2, valid, vec, b);
        load_f32s<N>(cosv + t, valid, vec, cs);
        load_f32s<N>(sinv + t, valid, vec, sn);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float s = sign * sn[i], x1v = a[i], x2v = b[i];
            a[i] = x1v * cs[i] - x2v * s;
            b[i] = x2v * cs[i] + x1v * s;
        }
        store_f(x1, a, valid, vec);
        store_f(x2, b, valid, vec);
    }
}

// ---------------------------------------------------------------------------------------- flat

// The reference's σ, 1/(1 + e^−g) for g ≥ 0 and e^g/(1 + e^g) below (expf never overflows), with
// one expf and one division.
__device__ __forceinline__ float sigmoid(float g) {
    const float e = expf(-fabsf(g));
    return (g >= 0.f ? 1.f : e) / (1.f + e);
}

// Chunk j of a flat op as the group loop below sees it: its first element, how many of its
// elements are in bounds (≤ 0 past the end: nothing is read or written) and whether it is a whole
// aligned chunk.
struct FlatChunk {
    size_t e;
    int valid;
    bool v;
};

// Grid-stride loop over groups of U chunks of a thread; `body` gets the group's chunks.
template <int N, int U, typename F> __device__ __forceinline__ void flat_loop(int n, bool vec, F body) {
    const unsigned units = (unsigned(n) + N - 1) / N, step = gridDim.x * blockDim.x * U;
    for (unsigned g = blockIdx.x * blockDim.x * U + threadIdx.x; g < units; g += step) {
        FlatChunk ch[U];
#pragma unroll
        for (int k = 0; k < U; ++k) {
            const size_t e = size_t(g + k * blockDim.x) * N;
            const int valid = e < size_t(n) ? n - int(e) : 0;
            ch[k] = FlatChunk{e, valid, vec && valid >= N};
        }
        body(ch);
    }
}

template <typename T, int U = FLAT_UNROLL>
__device__ __forceinline__ void swiglu_fwd(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ out,
                                           int n, bool vec) {
    constexpr int N = Chunk<T>::N;
    flat_loop<N, U>(n, vec, [&](const FlatChunk* ch) {
        uint4 gr[U], ur[U];
#pragma unroll
        for (int k = 0; k < U; ++k) {
            gr[k] = load_chunk(g + ch[k].e, ch[k].valid, ch[k].v);
            ur[k] = load_chunk(u + ch[k].e, ch[k].valid, ch[k].v);
        }
#pragma unroll
        for (int k = 0; k < U; ++k) {
            float gf[N], uf[N];
            Chunk<T>::unpack(gr[k], gf);
            Chunk<T>::unpack(ur[k], uf);
#pragma unroll
            for (int i = 0; i < N; ++i) gf[i] = gf[i] * sigmoid(gf[i]) * uf[i];
            store_f(out + ch[k].e, gf, ch[k].valid, ch[k].v);
        }
    });
}

template <typename T, int U = 1>
__device__ __forceinline__ void swiglu_bwd(const T* __restrict__ g, const T* __restrict__ u,
                                           const T* __restrict__ dout, T* __restrict__ dg, T* __restrict__ du, int n,
                                           bool vec) {
    constexpr int N = Chunk<T>::N;
    flat_loop<N, U>(n, vec, [&](const FlatChunk* ch) {
        uint4 gr[U], ur[U], dr[U];
#pragma unroll
        for (int k = 0; k < U; ++k) {
            gr[k] = load_chunk(g + ch[k].e, ch[k].valid, ch[k].v);
            ur[k] = load_chunk(u + ch[k].e, ch[k].valid, ch[k].v);
            dr[k] = load_chunk(dout + ch[k].e, ch[k].valid, ch[k].v);
        }
#pragma unroll
        for (int k = 0; k < U; ++k) {
            float gf[N], uf[N], df[N];
            Chunk<T>::unpack(gr[k], gf);
            Chunk<T>::unpack(ur[k], uf);
            Chunk<T>::unpack(dr[k], df);
#pragma unroll
            for (int i = 0; i < N; ++i) {
                const float s = sigmoid(gf[i]), d = df[i], gv = gf[i];
                gf[i] = d * uf[i] * s * (1.f + gv * (1.f - s));
                uf[i] = d * gv * s;
            }
            store_f(dg + ch[k].e, gf, ch[k].valid, ch[k].v);
            store_f(du + ch[k].e, uf, ch[k].valid, ch[k].v);
        }
    });
}

#define GOLDEN_GAMMA 0x9E3779B97F4A7C15ull

// The high 32 bits of mix64(ctr) (SplitMix64's finaliser): the last xor-shift by 31 leaves them
// unchanged, and the last product's high word is mul.hi(lo, c) + lo·c_hi + hi·c_lo.
__device__ __forceinline__ uint32_t mix64_hi(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    const uint32_t lo = uint32_t(z), hi = uint32_t(z >> 32);
    constexpr uint32_t c_lo = 0x133111EBu, c_hi = 0x94D049BBu;
    return __umulhi(lo, c_lo) + lo * c_hi + hi * c_lo;
}

template <typename T, int U = FLAT_UNROLL>
__device__ __forceinline__ void dropout_fwd(const T* __restrict__ x, T* __restrict__ out, int n, uint64_t key,
                                            uint32_t cut, float keep, bool vec) {
    constexpr int N = Chunk<T>::N;
    flat_loop<N, U>(n, vec, [&](const FlatChunk* ch) {
        uint4 xr[U];
#pragma unroll
        for (int k = 0; k < U; ++k) xr[k] = load_chunk(x + ch[k].e, ch[k].valid, ch[k].v);
#pragma unroll
        for (int k = 0; k < U; ++k) {
            float xf[N];
            Chunk<T>::unpack(xr[k], xf);
            // key + (i + 1)·γ for i = e, e + 1, ...: one multiply a chunk, then additions.
            uint64_t ctr = key + (uint64_t(ch[k].e) + 1) * GOLDEN_GAMMA;
#pragma unroll
            for (int i = 0; i < N; ++i) {
                xf[i] *= mix64_hi(ctr) < cut ? 0.f : keep;
                ctr += GOLDEN_GAMMA;
            }
            store_f(out + ch[k].e, xf, ch[k].valid, ch[k].v);
        }
    });
}

template <typename T, int U = FLAT_UNROLL>
__device__ __forceinline__ void add_fwd(T* __restrict__ a, const T* __restrict__ b, int n, bool vec) {
    constexpr int N = Chunk<T>::N;
    flat_loop<N, U>(n, vec, [&](const FlatChunk* ch) {
        uint4 ar[U], br[U];
#pragma unroll
        for (int k = 0; k < U; ++k) {
            ar[k] = load_chunk(a + ch[k].e, ch[k].valid, ch[k].v);
            br[k] = load_chunk(b + ch[k].e, ch[k].valid, ch[k].v);
        }
#pragma unroll
        for (int k = 0; k < U; ++k) store_chunk(a + ch[k].e, add_chunk<T>(ar[k], br[k]), ch[k].valid, ch[k].v);
    });
}

}  // namespace

// ------------------------------------------------------------------------------------- symbols

#define ROW_KERNEL GM_KERNEL __launch_bounds__(ROW_THREADS)
#define FLAT_KERNEL GM_KERNEL __launch_bounds__(FLAT_THREADS)

#define INSTANTIATE(T, S)                                                                                            \
    ROW_KERNEL void embedding_fwd_##S(const uint32_t* tokens, const T* table, T* out, int v, int c, int vec) {     \
        embedding_fwd<T>(tokens, table, out, v, c, vec != 0);                                                     \
    }                                                                                                              \
    ROW_KERNEL void embedding_bwd_##S(const uint32_t* tokens, const T* dy, float* dtable, int v, int c, int vec) { \
        embedding_bwd<T>(tokens, dy, dtable, v, c, vec != 0);                                                     \
    }                                                                                                              \
    ROW_KERNEL void rmsnorm_fwd_##S(const T* x, const float* w, T* y, float* rstd, int c, float eps, int vec) {   \
        rmsnorm_fwd<T>(x, w, y, rstd, c, eps, vec != 0);                                                          \
    }                                                                                                              \
    ROW_KERNEL void add_rmsnorm_fwd_##S(T* resid, const T* delta, const float* w, T* y, float* rstd, int c,       \
                                        float eps, int vec) {                                                      \
        add_rmsnorm_fwd<T>(resid, delta, w, y, rstd, c, eps, vec != 0);                                           \
    }                                                                                                              \
    ROW_KERNEL void rmsnorm_bwd_##S(const T* x, const float* w, const float* rstd, const T* dy, T* dx, int c,     \
                                    int accumulate, int vec) {                                                     \
        rmsnorm_bwd<T>(x, w, rstd, dy, dx, c, accumulate != 0, vec != 0);                                         \
    }                                                                                                              \
    FLAT_KERNEL void rope_fwd_##S(T* x, const float* cosv, const float* sinv, int rows, int h, int half, int vec) { \
        rope<T>(x, cosv, sinv, rows, h, half, 1.f, vec != 0);                                                     \
    }                                                                                                              \
    FLAT_KERNEL void rope_bwd_##S(T* x, const float* cosv, const float* sinv, int rows, int h, int half, int vec) { \
        rope<T>(x, cosv, sinv, rows, h, half, -1.f, vec != 0);                                                    \
    }                                                                                                              \
    FLAT_KERNEL void swiglu_fwd_##S(const T* g, const T* u, T* out, int n, int vec) {                             \
        swiglu_fwd<T>(g, u, out, n, vec != 0);                                                                     \
    }                                                                                                              \
    FLAT_KERNEL void swiglu_bwd_##S(const T* g, const T* u, const T* dout, T* dg, T* du, int n, int vec) {        \
        swiglu_bwd<T>(g, u, dout, dg, du, n, vec != 0);                                                            \
    }                                                                                                              \
    FLAT_KERNEL void dropout_fwd_##S(const T* x, T* out, int n, unsigned long long key, unsigned cut, float keep,   \
                                     int vec) {                                                                    \
        dropout_fwd<T>(x, out, n, key, cut, keep, vec != 0);                                                       \
    }                                                                                                              \
    FLAT_KERNEL void add_fwd_##S(T* a, const T* b, int n, int vec) { add_fwd<T>(a, b, n, vec != 0); }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
