// attention: causal grouped-query attention, forward and backward. The Tq × Tk attention matrix
// is never stored: the forward keeps an online softmax, the backward rebuilds every probability as
// exp(s − lse). Two families: SIMT kernels for every dtype and D (f32 math, the decode path with
// split keys), and flash kernels for bf16 with D = 64 or 128 on tensor cores (further below).
//
// Shared conventions (reference: gristmill_core::ops::attention):
//   q, o, dO, dq: (B, Tq, H, D) row-major; k, v, dk, dv: (B, Tk, Hkv, D); lse, delta: (B, H, Tq)
//   f32; segments: (B, Tk) u32, or null. Query i sits at position pos = Tk − Tq + i and attends key
//   j iff j ≤ pos and (no segments, or seg[b][j] == seg[b][pos]). Query head h reads KV head
//   h / (H / Hkv). D is even and ≤ 256, every pointer of T aligned to two elements (the launchers
//   check both): rows move as pairs (float2 / bf16x2). All sums and the softmax are in f32.
//
// The query rows of one (b, KV head g) are numbered r = i·group + hl (hl = h − g·group), so the
// `group` heads sharing a KV head sit next to each other and one K/V tile in shared memory serves
// all of them. Shared-memory tiles hold f32; a tile read one row per lane has a padded row stride
// (see `padded`), one read one row per warp (each lane a column pair) needs none.
//
// attention_fwd_<T>: grid (⌈Tq·group / 16⌉, Hkv, B·nsplit), 128 threads (4 warps), dynamic shared
//   memory (16·D + 32·padded(D) + 32·D) floats. Block: 16 query rows of (b, g); warp w owns rows
//   w, w+4, w+8, w+12 of them (interleaved, so a decode block with few rows still uses every
//   warp). Per tile of 32 keys: lane j scores key j against the warp's 4 rows (q·k in f32, q
//   pre-scaled), the warp takes the tile maximum, rescales its running sum and accumulators by
//   exp(m_old − m_new) and adds p_j·v_j with p_j broadcast by shuffle and each lane owning column
//   pairs lane, lane+32, … (≤ 4 pairs: D ≤ 256). With nsplit = 1 the block writes
//   o = acc / l and lse = m + ln l. With nsplit > 1 (decode: too few blocks to fill the GPU) block
//   z = b·nsplit + s covers key tiles [s·tiles_per_split, (s+1)·tiles_per_split) and writes its
//   normalised partial o_s (f32) and lse_s (−inf when it saw no allowed key) to opart: (nsplit,
//   B·Tq·H, D) and lpart: (nsplit, B·Tq·H); attention_combine_fwd merges them.
//   Blocks are issued latest rows first: they have the most keys.
//
// attention_combine_fwd_<T>: one warp per query row (B·Tq·H rows, 8 warps a block), at most 64
//   splits. lse = L + ln Σ_s exp(lse_s − L) with L = max_s lse_s; o = Σ_s exp(lse_s − lse)·o_s.
//
// attention_delta_bwd_<T>: one warp per query row (8 warps a block): delta_i = Σ_e dO_ie·O_ie,
//   which equals Σ_j P_ij dP_ij because O_i = Σ_j P_ij V_j; written in lse's layout.
//
// attention_dq_bwd_<T>: grid (⌈Tq·group / 16⌉, Hkv, B), 128 threads, dynamic shared memory
//   (32·D + 64·padded(D)) floats; rows owned as in the forward. Per tile of 32 keys, lane j
//   computes s = scale·q·k_j and dp = dO·v_j, then p = exp(s − lse), ds = p·(dp − delta), and the
//   warp adds ds_j·k_j to its rows' dq (ds_j by shuffle). dq = scale · Σ_j ds_j k_j.
//
// attention_dkv_bwd_<T>: grid (⌈Tk / 16⌉, Hkv, B), 128 threads, dynamic shared memory
//   (32·D + 64·padded(D)) floats. Block: 16 keys of (b, g); warp w owns keys w, w+4, w+8, w+12.
//   It walks every query row (all heads of the group) that can see one of its keys, 32 rows a
//   tile: lane r computes s, dp, p, ds of row r against each of the warp's keys, then the warp
//   adds p_r·dO_r to dv and ds_r·q_r to dk (p_r, ds_r by shuffle). A KV head's gradient is the sum
//   over its group's heads, formed in one block's registers: no atomics, deterministic.
//
// Flash kernels (FlashAttention-2 layout; bf16 in, f32 accumulation and softmax). Products are
// mma.sync m16n8k16 (bf16 × bf16 → f32) on fragments read with ldmatrix from shared tiles whose
// rows are padded by 8 elements (conflict-free); global → shared copies are cp.async, 16 bytes a
// thread, double-buffered (the next tile loads while this one is used). They need D = 64 or 128
// and q, k, v, o, dO, dq, dk, dv on 16-byte boundaries (the launcher checks, else SIMT).
//
// attention_flash{64,128}_fwd_bf16: grid (B·H, ⌈Tq / 128⌉), 128 threads (4 warps), dynamic shared
//   memory Fwd::SMEM (Q tile, two stages of K and V tiles of 64 keys, their segment ids). Block:
//   128 query rows of (b, h) — heads of one KV group are neighbours in x, so their blocks share
//   K/V tiles in L2 — last row blocks first (they have the most keys). Warp w owns rows 32w …
//   32w + 31 (two 16-row mma tiles). Per K/V tile (keys from the last tile down to the first,
//   so those at the causal edge come first), KH keys at a time (32 for D = 128, 64 for D = 64):
//   S = Q Kᵀ (Q fragments from shared memory), x = S·scale·log2 e, masked to −inf past the causal
//   edge, for rows past Tq and across segments; online softmax in base 2 (row max by two quad
//   shuffles, acc rescaled by 2^(m_old − m_new)), P rounded to bf16 straight into the A
//   fragments of acc += P V (V fragments by ldmatrix.trans). Tiles with no allowed key for the
//   whole block (packed segments) are skipped after a block vote. o = acc / l is staged through
//   the warp's own rows of the Q tile and written in 16-byte chunks; lse = (m + log2 l)·ln 2.
//
// attention_delta_bwd_<T> (above) gives delta_i = rowsum(dO ∘ O) first.
//
// attention_flash{64,128}_dkv_bwd_bf16: grid (B·Hkv, ⌈Tk / 128⌉), 256 threads (8 warps), dynamic
//   shared memory Bwd::SMEM (K, V tiles of the block's 128 keys; two stages of {Q, dO tiles of
//   64 queries, their lse, delta and segment ids}; the dSᵀ tile). Warp w owns keys 16w … 16w + 15
//   and keeps dK, dV (16 × D, f32) in registers while the block walks every (query head of the
//   group, 64-query tile) that can see one of its keys — so dK and dV come out summed over the
//   group, deterministic, without atomics. Per tile: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (mma), Pᵀ =
//   2^(Sᵀ·scale·log2 e − lse·log2 e) (masked to 0), dSᵀ = Pᵀ ∘ (dPᵀ − delta), both rounded to
//   bf16 as A fragments: dV += Pᵀ dO, dK += dSᵀ Q (dO, Q fragments by ldmatrix.trans). dSᵀ also
//   goes to shared memory; after a barrier the 8 warps (4 query × 2 column groups) form the
//   64 × D tile dQ += dS K and add it to dq_accum (f32, B·H·⌈Tq/64⌉·64·D) with red.global.add in
//   dq_index order, where one warp instruction covers 128 contiguous bytes. dq sums over key
//   blocks in whatever order the blocks run: its last bits may vary between runs. dk = scale·dK.
//
// attention_dq_convert_bwd_bf16: grid-stride, one thread a column pair of dq_accum: dq = scale ·
//   dq_accum, to (B, Tq, H, D) bf16.
//
// Hopper kernels (compute_90a module only; wgmma, the tensor-core instruction of a warpgroup of
// 4 warps, 64 rows a warpgroup; on other GPUs the kernels above run). K, V, Q, dO tiles are
// unpadded in shared memory with their 16-byte chunks swizzled by the row (the 128-byte swizzle
// the wgmma descriptors read; tiles on 1024-byte boundaries), still loaded with cp.async and made
// visible to wgmma with fence.proxy.async. Each product is issued, committed and waited for in
// turn (no producer warps, no overlap of softmax and products inside a warpgroup).
//
// attention_hflash128_fwd_bf16: grid (B·H, ⌈Tq / 128⌉), 256 threads (2 warpgroups of 64 rows),
//   dynamic shared memory hopper::Fwd::SMEM (Q tile padded, two stages of K and V tiles of 128
//   keys swizzled, segment ids). Q fragments are loaded once into registers (ldmatrix); per tile
//   S = Q Kᵀ (wgmma m64n128k16, A from registers, K K-major), the masked online softmax of the
//   mma.sync kernel, P to bf16 A fragments, acc += P V (m64n128k16, V N-major). Epilogue as above.
//
// attention_hflash{64,128}_dkv_bwd_bf16: grid (B·Hkv, ⌈Tk / 128⌉), 256 threads (2 warpgroups of
//   64 keys), dynamic shared memory hopper::Bwd::SMEM (K, V of the block; two stages of
//   {Q, dO tiles of 64 queries, lse, delta, segment ids}; dSᵀ, all swizzled). As the mma.sync
//   kernel: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (m64n64k16, both operands from shared memory, K-major),
//   Pᵀ and dSᵀ in registers, dV += Pᵀ dO and dK += dSᵀ Q (A from registers, dO and Q N-major);
//   dSᵀ is written swizzled, and after a barrier warpgroup w forms columns D/2·w … of
//   dQ = dS K (m64n{32,64}k16, dS M-major, K N-major) and adds them to dq_accum in dq_index order.
// gristmill: sm90a
#include "common.cuh"

namespace {

constexpr int WARPS = 4;              // warps per block of the tiled kernels
constexpr int THREADS = WARPS * 32;
constexpr int PER_WARP = 4;           // query rows (fwd, dq) or keys (dkv) per warp
constexpr int ROWS = WARPS * PER_WARP;  // query rows (fwd, dq) or keys (dkv) per block
constexpr int TILE = 32;              // keys (fwd, dq) or query rows (dkv) per tile: one per lane
constexpr int NP = 4;                 // column pairs per lane: 2·32·NP = 256 ≥ D
constexpr unsigned FULL = 0xffffffffu;

// Row stride of a tile read one row per lane. The float2 loads of a half-warp hit distinct bank
// pairs when the stride in pairs is odd.
__device__ __forceinline__ int padded(int d) { return ((d >> 1) & 1) ? d : d + 2; }

__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
__device__ __forceinline__ void store2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ float2 lds2(const float* p) { return *reinterpret_cast<const float2*>(p); }

// Element offset of query row r of (b, g) in q/o/dO/dq.
__device__ __forceinline__ int64_t q_off(int r, int b, int g, int tq, int H, int group, int D) {
    const int i = r / group, h = g * group + (r - i * group);
    return ((int64_t(b) * tq + i) * H + h) * D;
}
// Index of query row r of (b, g) in lse/delta.
__device__ __forceinline__ int64_t l_off(int r, int b, int g, int tq, int H, int group) {
    const int i = r / group, h = g * group + (r - i * group);
    return (int64_t(b) * H + h) * tq + i;
}

// Copies n rows of D elements into a shared tile (row stride ld) as f32 times `mul`; `row(rr)`
// gives the global start of tile row rr, or null for a row past the end (stored as zeros, so
// masked products stay finite). One warp a row, lanes on column pairs, ROWS_IN_FLIGHT rows a
// warp loaded before any is stored: the loads overlap instead of waiting one after another.
constexpr int ROWS_IN_FLIGHT = 4;
template <typename T, typename RowFn>
__device__ __forceinline__ void load_tile(float* dst, int ld, int n, int D, float mul, RowFn row) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int rr0 = warp; rr0 < n; rr0 += ROWS_IN_FLIGHT * WARPS) {
        float2 x[ROWS_IN_FLIGHT][NP];
#pragma unroll
        for (int u = 0; u < ROWS_IN_FLIGHT; ++u) {
            const int rr = rr0 + u * WARPS;
            const T* src = rr < n ? row(rr) : nullptr;
#pragma unroll
            for (int e = 0; e < NP; ++e) {
                const int c = 2 * (lane + 32 * e);
                x[u][e] = (src != nullptr && c < D) ? load2(src + c) : make_float2(0.f, 0.f);
            }
        }
#pragma unroll
        for (int u = 0; u < ROWS_IN_FLIGHT; ++u) {
            const int rr = rr0 + u * WARPS;
#pragma unroll
            for (int e = 0; e < NP; ++e) {
                const int c = 2 * (lane + 32 * e);
                if (rr < n && c < D) store2(dst + rr * ld + c, x[u][e].x * mul, x[u][e].y * mul);
            }
        }
    }
}

// Query rows [r0, r0 + n) of (b, g) into a shared tile; rows at or past nrows become zeros.
template <typename T>
__device__ __forceinline__ void load_q_tile(float* dst, int ld, const T* src, int r0, int n, int nrows, int b, int g,
                                            int tq, int H, int group, int D, float mul) {
    load_tile<T>(dst, ld, n, D, mul, [&](int rr) -> const T* {
        const int r = r0 + rr;
        return r < nrows ? src + q_off(r, b, g, tq, H, group, D) : nullptr;
    });
}

// Key rows [j0, j0 + n) of (b, g) into a shared tile; rows at or past tk become zeros.
template <typename T>
__device__ __forceinline__ void load_kv_tile(float* dst, int ld, const T* src, int j0, int n, int tk, int b, int g,
                                             int Hkv, int D, float mul) {
    load_tile<T>(dst, ld, n, D, mul, [&](int jj) -> const T* {
        const int j = j0 + jj;
        return j < tk ? src + ((int64_t(b) * tk + j) * Hkv + g) * D : nullptr;
    });
}

template <typename T>
__device__ void attn_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                         float* __restrict__ lse, const uint32_t* __restrict__ seg, float* __restrict__ opart,
                         float* __restrict__ lpart, int tq, int tk, int H, int Hkv, int D, float scale, int nsplit,
                         int tiles_per_split) {
    extern __shared__ __align__(16) float smem[];
    const int group = H / Hkv, nrows = tq * group, ldk = padded(D);
    const int r0 = (gridDim.x - 1 - blockIdx.x) * ROWS;
    const int g = blockIdx.y, b = blockIdx.z / nsplit, split = blockIdx.z - b * nsplit;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* sq = smem;                 // (ROWS, D), scaled
    float* sk = sq + ROWS * D;        // (TILE, ldk)
    float* sv = sk + TILE * ldk;      // (TILE, D)

    load_q_tile(sq, D, q, r0, ROWS, nrows, b, g, tq, H, group, D, scale);

    int pos[PER_WARP];
    uint32_t sg[PER_WARP];
    float m[PER_WARP], l[PER_WARP], acc[PER_WARP][NP][2];
#pragma unroll
    for (int a = 0; a < PER_WARP; ++a) {
        const int r = r0 + warp + WARPS * a;
        // A row past the end sees no key: pos = −1.
        pos[a] = r < nrows ? tk - tq + r / group : -1;
        sg[a] = (seg && pos[a] >= 0) ? seg[int64_t(b) * tk + pos[a]] : 0u;
        m[a] = -INFINITY;
        l[a] = 0.f;
#pragma unroll
        for (int e = 0; e < NP; ++e) acc[a][e][0] = acc[a][e][1] = 0.f;
    }

    const int last = min(r0 + ROWS, nrows) - 1;
    const int kbeg = split * tiles_per_split * TILE;
    const int kend = min(min(tk, tk - tq + last / group + 1), kbeg + tiles_per_split * TILE);
    for (int j0 = kbeg; j0 < kend; j0 += TILE) {
        __syncthreads();  // the previous tile has been read (and, first time, q is in place)
        load_kv_tile(sk, ldk, k, j0, TILE, tk, b, g, Hkv, D, 1.f);
        load_kv_tile(sv, D, v, j0, TILE, tk, b, g, Hkv, D, 1.f);
        __syncthreads();

        const int j = j0 + lane;
        const uint32_t sj = (seg && j < tk) ? seg[int64_t(b) * tk + j] : 0u;
        float s[PER_WARP];
#pragma unroll
        for (int a = 0; a < PER_WARP; ++a) s[a] = 0.f;
        const float* kr = sk + lane * ldk;
        for (int c = 0; c < D; c += 2) {
            const float2 kk = lds2(kr + c);
#pragma unroll
            for (int a = 0; a < PER_WARP; ++a) {
                const float2 qq = lds2(sq + (warp + WARPS * a) * D + c);
                s[a] = fmaf(qq.x, kk.x, s[a]);
                s[a] = fmaf(qq.y, kk.y, s[a]);
            }
        }

        float p[PER_WARP];
#pragma unroll
        for (int a = 0; a < PER_WARP; ++a) {
            const bool ok = j <= pos[a] && (!seg || sj == sg[a]);
            const float sa = ok ? s[a] : -INFINITY;
            const float mn = fmaxf(m[a], warp_max(sa));
            p[a] = 0.f;
            // mn = −inf: nothing allowed yet for this row (warp-uniform), leave it untouched.
            if (mn != -INFINITY) {
                const float alpha = expf(m[a] - mn);  // 0 while m is still −inf
                p[a] = ok ? expf(sa - mn) : 0.f;
                l[a] = l[a] * alpha + p[a];
                m[a] = mn;
#pragma unroll
                for (int e = 0; e < NP; ++e) {
                    acc[a][e][0] *= alpha;
                    acc[a][e][1] *= alpha;
                }
            }
        }

        const int nk = min(TILE, kend - j0);
        for (int jj = 0; jj < nk; ++jj) {
            const float* vr = sv + jj * D;
            float pj[PER_WARP];
#pragma unroll
            for (int a = 0; a < PER_WARP; ++a) pj[a] = __shfl_sync(FULL, p[a], jj);
#pragma unroll
            for (int e = 0; e < NP; ++e) {
                const int c = 2 * (lane + 32 * e);
                if (c < D) {
                    const float2 vv = lds2(vr + c);
#pragma unroll
                    for (int a = 0; a < PER_WARP; ++a) {
                        acc[a][e][0] = fmaf(pj[a], vv.x, acc[a][e][0]);
                        acc[a][e][1] = fmaf(pj[a], vv.y, acc[a][e][1]);
                    }
                }
            }
        }
    }

#pragma unroll
    for (int a = 0; a < PER_WARP; ++a) {
        const int r = r0 + warp + WARPS * a;
        if (r >= nrows) continue;
        const float lt = warp_sum(l[a]);
        const int64_t qo = q_off(r, b, g, tq, H, group, D);
        // lt = 0 only in a split that saw no allowed key (a whole row always sees its own one).
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        const float ls = lt > 0.f ? m[a] + logf(lt) : -INFINITY;
        if (nsplit == 1) {
            if (lane == 0) lse[l_off(r, b, g, tq, H, group)] = ls;
#pragma unroll
            for (int e = 0; e < NP; ++e) {
                const int c = 2 * (lane + 32 * e);
                if (c < D) store2(o + qo + c, acc[a][e][0] * inv, acc[a][e][1] * inv);
            }
        } else {
            // Partials are indexed by the row's place in q: qo / D.
            const int64_t nr_all = int64_t(gridDim.z / nsplit) * tq * H;
            const int64_t pr = int64_t(split) * nr_all + qo / D;
            if (lane == 0) lpart[pr] = ls;
#pragma unroll
            for (int e = 0; e < NP; ++e) {
                const int c = 2 * (lane + 32 * e);
                if (c < D) store2(opart + pr * D + c, acc[a][e][0] * inv, acc[a][e][1] * inv);
            }
        }
    }
}

template <typename T>
__device__ void attn_combine(const float* __restrict__ opart, const float* __restrict__ lpart, T* __restrict__ o,
                             float* __restrict__ lse, int B, int tq, int H, int D, int nsplit) {
    const int64_t nr_all = int64_t(B) * tq * H;
    const int64_t row = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= nr_all) return;
    // Lane l holds splits l and l + 32 (at most 64: the launcher's MAX_SPLITS).
    float w[2], mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int s = lane + 32 * j;
        w[j] = s < nsplit ? lpart[s * nr_all + row] : -INFINITY;
        mx = fmaxf(mx, w[j]);
    }
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        w[j] = expf(w[j] - mx);  // 0 for an empty split (and past nsplit)
        sum += w[j];
    }
    sum = warp_sum(sum);
    const float ls = mx + logf(sum), inv = 1.f / sum;
    // row = (b·Tq + i)·H + h  →  lse index (b·H + h)·Tq + i
    const int64_t bi = row / H;
    const int h = int(row - bi * H);
    const int64_t bb = bi / tq, i = bi - bb * tq;
    if (lane == 0) lse[(bb * H + h) * tq + i] = ls;
    // o = Σ_s w_s·o_s with w_s = exp(lse_s − lse): lanes on column pairs, the splits in order with
    // several loads in flight (an empty split's o_s is zeros, so no load waits on its weight).
    for (int c0 = 0; c0 < D; c0 += 64) {
        const int c = c0 + 2 * lane;
        float x = 0.f, y = 0.f;
#pragma unroll 4
        for (int s = 0; s < nsplit; ++s) {
            const float ws = __shfl_sync(FULL, s < 32 ? w[0] : w[1], s & 31) * inv;
            if (c < D) {
                const float2 ps = load2(opart + (s * nr_all + row) * D + c);
                x = fmaf(ws, ps.x, x);
                y = fmaf(ws, ps.y, y);
            }
        }
        if (c < D) store2(o + row * D + c, x, y);
    }
}

template <typename T>
__device__ void attn_delta(const T* __restrict__ o, const T* __restrict__ d_o, float* __restrict__ delta, int B,
                           int tq, int H, int D) {
    const int64_t nr_all = int64_t(B) * tq * H;
    const int64_t row = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= nr_all) return;
    float acc = 0.f;
    for (int c = 2 * lane; c < D; c += 64) {
        const float2 a = load2(o + row * D + c), g = load2(d_o + row * D + c);
        acc = fmaf(a.x, g.x, acc);
        acc = fmaf(a.y, g.y, acc);
    }
    acc = warp_sum(acc);
    const int64_t bi = row / H;
    const int h = int(row - bi * H);
    const int64_t bb = bi / tq, i = bi - bb * tq;
    if (lane == 0) delta[(bb * H + h) * tq + i] = acc;
}

template <typename T>
__device__ void attn_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const float* __restrict__ lse, const float* __restrict__ delta, const T* __restrict__ d_o,
                        const uint32_t* __restrict__ seg, T* __restrict__ dq, int tq, int tk, int H, int Hkv, int D,
                        float scale) {
    extern __shared__ __align__(16) float smem[];
    const int group = H / Hkv, nrows = tq * group, ldk = padded(D);
    const int r0 = (gridDim.x - 1 - blockIdx.x) * ROWS;
    const int g = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* sq = smem;              // (ROWS, D), scaled
    float* sdo = sq + ROWS * D;    // (ROWS, D)
    float* sk = sdo + ROWS * D;    // (TILE, ldk)
    float* sv = sk + TILE * ldk;   // (TILE, ldk)

    load_q_tile(sq, D, q, r0, ROWS, nrows, b, g, tq, H, group, D, scale);
    load_q_tile(sdo, D, d_o, r0, ROWS, nrows, b, g, tq, H, group, D, 1.f);

    int pos[PER_WARP];
    uint32_t sg[PER_WARP];
    float ls[PER_WARP], dl[PER_WARP], acc[PER_WARP][NP][2];
#pragma unroll
    for (int a = 0; a < PER_WARP; ++a) {
        const int r = r0 + warp + WARPS * a;
        pos[a] = r < nrows ? tk - tq + r / group : -1;
        sg[a] = (seg && pos[a] >= 0) ? seg[int64_t(b) * tk + pos[a]] : 0u;
        ls[a] = r < nrows ? lse[l_off(r, b, g, tq, H, group)] : 0.f;
        dl[a] = r < nrows ? delta[l_off(r, b, g, tq, H, group)] : 0.f;
#pragma unroll
        for (int e = 0; e < NP; ++e) acc[a][e][0] = acc[a][e][1] = 0.f;
    }

    const int last = min(r0 + ROWS, nrows) - 1;
    const int kend = min(tk, tk - tq + last / group + 1);
    for (int j0 = 0; j0 < kend; j0 += TILE) {
        __syncthreads();
        load_kv_tile(sk, ldk, k, j0, TILE, tk, b, g, Hkv, D, 1.f);
        load_kv_tile(sv, ldk, v, j0, TILE, tk, b, g, Hkv, D, 1.f);
        __syncthreads();

        const int j = j0 + lane;
        const uint32_t sj = (seg && j < tk) ? seg[int64_t(b) * tk + j] : 0u;
        float s[PER_WARP], dp[PER_WARP];
#pragma unroll
        for (int a = 0; a < PER_WARP; ++a) s[a] = dp[a] = 0.f;
        const float* kr = sk + lane * ldk;
        const float* vr = sv + lane * ldk;
        for (int c = 0; c < D; c += 2) {
            const float2 kk = lds2(kr + c), vv = lds2(vr + c);
#pragma unroll
            for (int a = 0; a < PER_WARP; ++a) {
                const float2 qq = lds2(sq + (warp + WARPS * a) * D + c);
                const float2 gg = lds2(sdo + (warp + WARPS * a) * D + c);
                s[a] = fmaf(qq.x, kk.x, s[a]);
                s[a] = fmaf(qq.y, kk.y, s[a]);
                dp[a] = fmaf(gg.x, vv.x, dp[a]);
                dp[a] = fmaf(gg.y, vv.y, dp[a]);
            }
        }
        float ds[PER_WARP];
#pragma unroll
        for (int a = 0; a < PER_WARP; ++a) {
            const bool ok = j <= pos[a] && (!seg || sj == sg[a]);
            const float p = ok ? expf(s[a] - ls[a]) : 0.f;
            ds[a] = p * (dp[a] - dl[a]);
        }

        const int nk = min(TILE, kend - j0);
        for (int jj = 0; jj < nk; ++jj) {
            const float* kj = sk + jj * ldk;
            float dj[PER_WARP];
#pragma unroll
            for (int a = 0; a < PER_WARP; ++a) dj[a] = __shfl_sync(FULL, ds[a], jj);
#pragma unroll
            for (int e = 0; e < NP; ++e) {
                const int c = 2 * (lane + 32 * e);
                if (c < D) {
                    const float2 kk = lds2(kj + c);
#pragma unroll
                    for (int a = 0; a < PER_WARP; ++a) {
                        acc[a][e][0] = fmaf(dj[a], kk.x, acc[a][e][0]);
                        acc[a][e][1] = fmaf(dj[a], kk.y, acc[a][e][1]);
                    }
                }
            }
        }
    }

#pragma unroll
    for (int a = 0; a < PER_WARP; ++a) {
        const int r = r0 + warp + WARPS * a;
        if (r >= nrows) continue;
        const int64_t qo = q_off(r, b, g, tq, H, group, D);
#pragma unroll
        for (int e = 0; e < NP; ++e) {
            const int c = 2 * (lane + 32 * e);
            if (c < D) store2(dq + qo + c, scale * acc[a][e][0], scale * acc[a][e][1]);
        }
    }
}

template <typename T>
__device__ void attn_dkv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const float* __restrict__ lse, const float* __restrict__ delta, const T* __restrict__ d_o,
                         const uint32_t* __restrict__ seg, T* __restrict__ dk, T* __restrict__ dv, int tq, int tk,
                         int H, int Hkv, int D, float scale) {
    extern __shared__ __align__(16) float smem[];
    const int group = H / Hkv, nrows = tq * group, ldq = padded(D);
    const int j0 = blockIdx.x * ROWS;
    const int g = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* sk = smem;               // (ROWS, D), scaled
    float* sv = sk + ROWS * D;      // (ROWS, D)
    float* sq = sv + ROWS * D;      // (TILE, ldq)
    float* sdo = sq + TILE * ldq;   // (TILE, ldq)

    load_kv_tile(sk, D, k, j0, ROWS, tk, b, g, Hkv, D, scale);
    load_kv_tile(sv, D, v, j0, ROWS, tk, b, g, Hkv, D, 1.f);

    int key[PER_WARP];
    uint32_t sg[PER_WARP];
    float ak[PER_WARP][NP][2], av[PER_WARP][NP][2];
#pragma unroll
    for (int a = 0; a < PER_WARP; ++a) {
        key[a] = j0 + warp + WARPS * a;
        // A key past the end is seen by no query: it stays at Tk, beyond every position.
        sg[a] = (seg && key[a] < tk) ? seg[int64_t(b) * tk + key[a]] : 0u;
#pragma unroll
        for (int e = 0; e < NP; ++e) ak[a][e][0] = ak[a][e][1] = av[a][e][0] = av[a][e][1] = 0.f;
    }

    // Query i sees key j0 iff Tk − Tq + i ≥ j0.
    const int imin = max(0, j0 - (tk - tq));
    for (int rt = imin * group; rt < nrows; rt += TILE) {
        __syncthreads();
        load_q_tile(sq, ldq, q, rt, TILE, nrows, b, g, tq, H, group, D, 1.f);
        load_q_tile(sdo, ldq, d_o, rt, TILE, nrows, b, g, tq, H, group, D, 1.f);
        __syncthreads();

        const int r = rt + lane;
        const bool live = r < nrows;
        const int pos = live ? tk - tq + r / group : -1;
        const uint32_t sr = (seg && live) ? seg[int64_t(b) * tk + pos] : 0u;
        const float ls = live ? lse[l_off(r, b, g, tq, H, group)] : 0.f;
        const float dl = live ? delta[l_off(r, b, g, tq, H, group)] : 0.f;

        float s[PER_WARP], dp[PER_WARP];
#pragma unroll
        for (int a = 0; a < PER_WARP; ++a) s[a] = dp[a] = 0.f;
        const float* qr = sq + lane * ldq;
        const float* gr = sdo + lane * ldq;
        for (int c = 0; c < D; c += 2) {
            const float2 qq = lds2(qr + c), gg = lds2(gr + c);
#pragma unroll
            for (int a = 0; a < PER_WARP; ++a) {
                const float2 kk = lds2(sk + (warp + WARPS * a) * D + c);
                const float2 vv = lds2(sv + (warp + WARPS * a) * D + c);
                s[a] = fmaf(qq.x, kk.x, s[a]);
                s[a] = fmaf(qq.y, kk.y, s[a]);
                dp[a] = fmaf(gg.x, vv.x, dp[a]);
                dp[a] = fmaf(gg.y, vv.y, dp[a]);
            }
        }
        float p[PER_WARP], ds[PER_WARP];
#pragma unroll
        for (int a = 0; a < PER_WARP; ++a) {
            const bool ok = key[a] <= pos && (!seg || sg[a] == sr);
            p[a] = ok ? expf(s[a] - ls) : 0.f;
            ds[a] = p[a] * (dp[a] - dl);
        }

        const int nr = min(TILE, nrows - rt);
        for (int rr = 0; rr < nr; ++rr) {
            float pr[PER_WARP], dr[PER_WARP];
#pragma unroll
            for (int a = 0; a < PER_WARP; ++a) {
                pr[a] = __shfl_sync(FULL, p[a], rr);
                dr[a] = __shfl_sync(FULL, ds[a], rr);
            }
#pragma unroll
            for (int e = 0; e < NP; ++e) {
                const int c = 2 * (lane + 32 * e);
                if (c < D) {
                    const float2 qq = lds2(sq + rr * ldq + c), gg = lds2(sdo + rr * ldq + c);
#pragma unroll
                    for (int a = 0; a < PER_WARP; ++a) {
                        av[a][e][0] = fmaf(pr[a], gg.x, av[a][e][0]);
                        av[a][e][1] = fmaf(pr[a], gg.y, av[a][e][1]);
                        ak[a][e][0] = fmaf(dr[a], qq.x, ak[a][e][0]);
                        ak[a][e][1] = fmaf(dr[a], qq.y, ak[a][e][1]);
                    }
                }
            }
        }
    }

#pragma unroll
    for (int a = 0; a < PER_WARP; ++a) {
        if (key[a] >= tk) continue;
        const int64_t ko = ((int64_t(b) * tk + key[a]) * Hkv + g) * D;
#pragma unroll
        for (int e = 0; e < NP; ++e) {
            const int c = 2 * (lane + 32 * e);
            if (c < D) {
                store2(dk + ko + c, scale * ak[a][e][0], scale * ak[a][e][1]);
                store2(dv + ko + c, av[a][e][0], av[a][e][1]);
            }
        }
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Flash attention for bf16 with tensor cores (D = 64 or 128). Each .cu helper below that wraps a
// PTX instruction takes generic pointers and converts them to shared-window addresses itself.
namespace flash {

using bf16 = __nv_bfloat16;

// bf16 elements of padding after every shared-memory row: rows then start 16 bytes apart modulo
// 128, so the eight 16-byte rows one ldmatrix phase reads fall on distinct banks.
constexpr int PAD = 8;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// A compile-time flag as a value, for the loop bodies compiled with and without the mask.
template <bool B> struct Flag {
    static constexpr bool value = B;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared, asynchronously; zero-filled (nothing read) when !full.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool full) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(full ? 16 : 0)
                 : "memory");
}

// 4 bytes global → shared, asynchronously; zero-filled when !full.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool full) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(full ? 4 : 0)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8×8 bf16 matrices from shared memory; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
}

// As ldsm_x4, each matrix transposed.
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
}

// c += a·b for one 16×8×16 tile: a 16×16 bf16 (row-major fragments), b 16×8 bf16, c 16×8 f32.
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a bf16 pair, `lo` in the low half (the lower column of a fragment).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Starts copying ROWS rows of D bf16 (global row stride `ld` elements) into a shared tile of row
// stride D + PAD; rows at or past `valid` become zeros, so masked products stay finite. Row 0 of
// `src` is always a real row (it is the fallback address of zero-filled chunks).
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_rows(bf16* dst, const bf16* src, int64_t ld, int valid) {
    constexpr int CH = D / 8;  // 16-byte chunks a row
    static_assert((ROWS * CH) % THREADS == 0, "whole chunks per thread");
    // Not unrolled: unrolled, the compiler keeps every chunk's address live across the main loops.
#pragma unroll 1
    for (int u = 0; u < ROWS * CH / THREADS; ++u) {
        const int c = threadIdx.x + u * THREADS, r = c / CH, k = c % CH;
        const bool ok = r < valid;
        cp_async16(dst + r * (D + PAD) + k * 8, ok ? src + r * ld + k * 8 : src, ok);
    }
}

// Starts copying n u32 or f32 values (`src` contiguous) into shared memory; those at or past
// `valid` become zeros.
template <int N, int THREADS, typename U>
__device__ __forceinline__ void load_vec(U* dst, const U* src, int valid) {
    for (int c = threadIdx.x; c < N; c += THREADS) {
        const bool ok = c < valid;
        cp_async4(dst + c, ok ? src + c : src, ok);
    }
}

// ---- forward ----
template <int D, int WARPS, int MI, int BN, int KH>
struct Fwd {
    static constexpr int THREADS = WARPS * 32;
    static constexpr int BM = WARPS * 16 * MI;  // query rows a block
    static constexpr int LD = D + PAD;
    static constexpr int SMEM = (BM * LD + 4 * BN * LD) * 2 + 2 * BN * 4;
};

template <int D, int WARPS, int MI, int BN, int KH>
__device__ void fwd(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                    bf16* __restrict__ o, float* __restrict__ lse, const uint32_t* __restrict__ seg, int tq, int tk,
                    int H, int Hkv, float scale_log2) {
    using C = Fwd<D, WARPS, MI, BN, KH>;
    constexpr int BM = C::BM, LD = C::LD, THREADS = C::THREADS;
    constexpr int NI = BN / 8, NH = KH / 8, DI = D / 8, KS = D / 16;
    static_assert(BN % KH == 0 && KH % 16 == 0, "key sub-tiles of whole k-steps");
    static_assert(NH * 4 <= 32, "one mask bit a score of a row pair");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sq = reinterpret_cast<bf16*>(smem_raw);                      // (BM, LD)
    bf16* skv = sq + BM * LD;                                           // 2 stages × {K, V}: (BN, LD) each
    uint32_t* sseg = reinterpret_cast<uint32_t*>(skv + 4 * BN * LD);    // 2 stages × BN

    const int b = blockIdx.x / H, h = blockIdx.x - b * H, g = h / (H / Hkv);
    const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tc = lane & 3;
    const int off = tk - tq;  // query i sits at position off + i
    const int64_t qld = int64_t(H) * D, kld = int64_t(Hkv) * D;
    const bf16* qb = q + (int64_t(b) * tq + m0) * qld + int64_t(h) * D;
    const bf16* kb = k + int64_t(b) * tk * kld + int64_t(g) * D;
    const bf16* vb = v + int64_t(b) * tk * kld + int64_t(g) * D;
    const uint32_t* sgb = seg ? seg + int64_t(b) * tk : nullptr;
    const int wrow = warp * 16 * MI;  // the warp's first row within the block

    const int kend = min(tk, off + m0 + BM);
    const int ntiles = (kend + BN - 1) / BN;
    auto issue = [&](int n, int stage) {
        const int j0 = n * BN;
        bf16* sk = skv + stage * 2 * BN * LD;
        load_rows<D, BN, THREADS>(sk, kb + j0 * kld, kld, tk - j0);
        load_rows<D, BN, THREADS>(sk + BN * LD, vb + j0 * kld, kld, tk - j0);
        if (sgb) load_vec<BN, THREADS>(sseg + stage * BN, sgb + j0, tk - j0);
    };
    load_rows<D, BM, THREADS>(sq, qb, qld, tq - m0);
    issue(ntiles - 1, 0);
    cp_async_commit();

    // Row (mi, hf) of this thread sits at position pos0 + 16·mi + 8·hf; a position at or past Tk
    // is a row past Tq, which sees nothing.
    const int pos0 = off + m0 + wrow + gr;
    uint32_t rseg[MI][2];
    float acc[MI][DI][4], m[MI][2], l[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int p = pos0 + mi * 16 + 8 * hf;
            rseg[mi][hf] = (sgb && p < tk) ? sgb[p] : 0u;
            m[mi][hf] = -INFINITY;
            l[mi][hf] = 0.f;
        }
#pragma unroll
        for (int di = 0; di < DI; ++di) acc[mi][di][0] = acc[mi][di][1] = acc[mi][di][2] = acc[mi][di][3] = 0.f;
    }

    // Score (mi, e) of n-tile ni is allowed: key ≤ position, the row exists, and the segments agree.
    auto allowed = [&](const uint32_t* ss, int j0, int mi, int ni, int e) {
        const int jj = ni * 8 + 2 * tc + (e & 1), p = pos0 + mi * 16 + 8 * (e >> 1);
        return j0 + jj <= p && p < tk && (!sgb || ss[jj] == rseg[mi][e >> 1]);
    };

    // One key tile. Tiles from the last to the first: those at the causal edge (or every tile,
    // with segments) come first and are the only ones that need the mask; the same body is
    // compiled without it for the rest, where registers are tight.
    int it = 0;
    auto step = [&](auto masked_c) {
        constexpr bool MASKED = decltype(masked_c)::value;
        const int n = ntiles - 1 - it, stage = it & 1, j0 = n * BN;
        if (it + 1 < ntiles) issue(n - 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const bf16* sk = skv + stage * 2 * BN * LD;
        const bf16* sv = sk + BN * LD;
        const uint32_t* ss = sseg + stage * BN;

        if constexpr (MASKED) {
            // With segments a whole tile may belong to other examples: skip it when no row of
            // the block sees any of its keys (its loads were already issued; that is cheap).
            if (sgb) {
                int any = 0;
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                        for (int e = 0; e < 4; ++e) any |= allowed(ss, j0, mi, ni, e);
                if (!__syncthreads_or(any)) return;
            }
        }

        // KH keys at a time: the f32 scores of a whole tile would not fit in registers next to
        // the accumulators.
#pragma unroll 1
        for (int j1 = 0; j1 < BN; j1 += KH) {
            // The mask as bits, computed while few registers are live.
            uint32_t okb[MI];
            if constexpr (MASKED) {
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    okb[mi] = 0u;
#pragma unroll
                    for (int ni = 0; ni < NH; ++ni)
#pragma unroll
                        for (int e = 0; e < 4; ++e) okb[mi] |= uint32_t(allowed(ss + j1, j0 + j1, mi, ni, e)) << (ni * 4 + e);
                }
            }
            float s[MI][NH][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NH; ++ni) s[mi][ni][0] = s[mi][ni][1] = s[mi][ni][2] = s[mi][ni][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                uint32_t qa[MI][4];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
                    ldsm_x4(qa[mi], sq + (wrow + mi * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int np = 0; np < NH / 2; ++np) {
                    uint32_t kf[4];
                    ldsm_x4(kf, sk + (j1 + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) {
                        mma16816(s[mi][2 * np], qa[mi], kf[0], kf[1]);
                        mma16816(s[mi][2 * np + 1], qa[mi], kf[2], kf[3]);
                    }
                }
            }

            // Online softmax in base 2: x = s·scale·log2(e), p = 2^(x − m). P goes to bf16 pairs at
            // once (the A fragments of P V), which frees the f32 scores.
            uint32_t pa[MI][NH / 2][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    float mx = -INFINITY;
#pragma unroll
                    for (int ni = 0; ni < NH; ++ni) {
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int e = 2 * hf + c;
                            float x = s[mi][ni][e] * scale_log2;
                            if constexpr (MASKED) {
                                if (!((okb[mi] >> (ni * 4 + e)) & 1u)) x = -INFINITY;
                            }
                            s[mi][ni][e] = x;
                            mx = fmaxf(mx, x);
                        }
                    }
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float mnew = fmaxf(m[mi][hf], mx);
                    // Nothing allowed yet in this row: keep exponents finite (every p is 0 anyway).
                    const float mu = mnew == -INFINITY ? 0.f : mnew;
                    const float alpha = exp2f(m[mi][hf] - mu);
                    m[mi][hf] = mnew;
                    float sum = 0.f;
#pragma unroll
                    for (int ni = 0; ni < NH; ++ni) {
                        const float p0 = exp2f(s[mi][ni][2 * hf] - mu), p1 = exp2f(s[mi][ni][2 * hf + 1] - mu);
                        sum += p0 + p1;
                        // n-tile ni holds keys 8·ni …: register 2·(ni % 2) + hf of k-step ni / 2.
                        pa[mi][ni / 2][2 * (ni % 2) + hf] = pack_bf16(p0, p1);
                    }
                    l[mi][hf] = l[mi][hf] * alpha + sum;
#pragma unroll
                    for (int di = 0; di < DI; ++di) {
                        acc[mi][di][2 * hf] *= alpha;
                        acc[mi][di][2 * hf + 1] *= alpha;
                    }
                }
            }

            // acc += P V.
#pragma unroll
            for (int ks = 0; ks < NH / 2; ++ks) {
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    uint32_t vf[4];
                    ldsm_x4_t(vf, sv + (j1 + ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) {
                        mma16816(acc[mi][2 * dp], pa[mi][ks], vf[0], vf[1]);
                        mma16816(acc[mi][2 * dp + 1], pa[mi][ks], vf[2], vf[3]);
                    }
                }
            }
        }
        __syncthreads();  // this stage is read; the next iteration refills it
    };
    // Without segments, tile n needs no mask when its last key, n·BN + BN − 1, is at most the
    // block's first position.
    const int nmasked = sgb ? ntiles : ntiles - min(ntiles, (off + m0 + 1) / BN);
    for (; it < nmasked; ++it) step(Flag<true>{});
    for (; it < ntiles; ++it) step(Flag<false>{});
    cp_async_wait<0>();

    // o = acc / l, lse = (m + log2 l)·ln 2. The warp's rows of sq are read by no other warp, so it
    // stages its o there and writes whole 16-byte chunks.
    __syncwarp();
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float lt = l[mi][hf];
            lt += __shfl_xor_sync(0xffffffffu, lt, 1);
            lt += __shfl_xor_sync(0xffffffffu, lt, 2);
            const float inv = lt > 0.f ? 1.f / lt : 0.f;
            const int rr = wrow + mi * 16 + gr + 8 * hf, r = m0 + rr;
            if (r < tq && tc == 0)
                lse[(int64_t(b) * H + h) * tq + r] = lt > 0.f ? (m[mi][hf] + log2f(lt)) * LN2 : -INFINITY;
#pragma unroll
            for (int di = 0; di < DI; ++di)
                *reinterpret_cast<uint32_t*>(sq + rr * LD + di * 8 + 2 * tc) =
                    pack_bf16(acc[mi][di][2 * hf] * inv, acc[mi][di][2 * hf + 1] * inv);
        }
    }
    __syncwarp();
    bf16* ob = o + (int64_t(b) * tq + m0) * qld + int64_t(h) * D;
#pragma unroll
    for (int u = 0; u < 16 * MI * DI / 32; ++u) {
        const int c = lane + 32 * u, rr = c / DI, kc = c % DI;
        if (m0 + wrow + rr < tq)
            *reinterpret_cast<uint4*>(ob + (wrow + rr) * qld + kc * 8) =
                *reinterpret_cast<const uint4*>(sq + (wrow + rr) * LD + kc * 8);
    }
}

// ---- backward: dK, dV (and dQ through f32 atomics) for one block of keys ----
template <int D, int WARPS, int BM>
struct Bwd {
    static constexpr int THREADS = WARPS * 32;
    static constexpr int BN = WARPS * 16;  // keys a block: 16 a warp
    static constexpr int LD = D + PAD;
    static constexpr int LDS = BM + PAD;   // row stride of the dSᵀ tile
    // K, V; two stages of {Q, dO, lse, delta, query segment ids}; dSᵀ.
    static constexpr int STAGE = 2 * BM * LD * 2 + 3 * BM * 4;
    static constexpr int SMEM = 2 * BN * LD * 2 + 2 * STAGE + BN * LDS * 2;
};

// Element index of dq_accum for (row-tile of 16 queries `t16` of head `bh` = b·H + h, column tile
// `dt` of 8, fragment register `e`, lane): a warp's red of one register covers 128 contiguous bytes.
__device__ __forceinline__ int64_t dq_index(int64_t bh, int nt16, int t16, int dt, int DI, int e, int lane) {
    return (((bh * nt16 + t16) * DI + dt) * 4 + e) * 32 + lane;
}

template <int D, int WARPS, int BM>
__device__ void dkv(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                    const float* __restrict__ lse, const float* __restrict__ delta, const bf16* __restrict__ d_o,
                    const uint32_t* __restrict__ seg, float* __restrict__ dq_acc, bf16* __restrict__ dk,
                    bf16* __restrict__ dv, int tq, int tk, int H, int Hkv, float scale, float scale_log2) {
    using C = Bwd<D, WARPS, BM>;
    constexpr int BN = C::BN, LD = C::LD, LDS = C::LDS, THREADS = C::THREADS;
    constexpr int NQ = BM / 8, DI = D / 8, KS = D / 16;
    constexpr int WQ = BM / 16, WD = WARPS / WQ, NDQ = DI / WD;  // dQ: WQ × WD warps, NDQ column tiles each
    static_assert(NQ * 4 <= 32 && WQ * WD == WARPS && NDQ % 2 == 0, "tile shape");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sk = reinterpret_cast<bf16*>(smem_raw);  // (BN, LD)
    bf16* sv = sk + BN * LD;                        // (BN, LD)
    unsigned char* stages = reinterpret_cast<unsigned char*>(sv + BN * LD);
    bf16* sds = reinterpret_cast<bf16*>(stages + 2 * C::STAGE);  // dSᵀ: (BN, LDS)

    const int b = blockIdx.x / Hkv, g = blockIdx.x - b * Hkv, n0 = blockIdx.y * BN;
    const int group = H / Hkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tc = lane & 3;
    const int off = tk - tq;
    const int64_t qld = int64_t(H) * D, kld = int64_t(Hkv) * D;
    const int64_t kvo = (int64_t(b) * tk + n0) * kld + int64_t(g) * D;
    const uint32_t* sgb = seg ? seg + int64_t(b) * tk : nullptr;
    const int nqt_all = (tq + BM - 1) / BM, nt16 = nqt_all * BM / 16;
    // Query i sees key n0 iff off + i ≥ n0.
    const int qt0 = max(0, n0 - off) / BM, nqt = nqt_all - qt0, iters = group * nqt;

    auto stage_ptrs = [&](int st, bf16*& sq, bf16*& sdo, float*& sl, float*& sd, uint32_t*& sqs) {
        unsigned char* p = stages + st * C::STAGE;
        sq = reinterpret_cast<bf16*>(p);
        sdo = sq + BM * LD;
        sl = reinterpret_cast<float*>(sdo + BM * LD);
        sd = sl + BM;
        sqs = reinterpret_cast<uint32_t*>(sd + BM);
    };
    auto issue = [&](int i, int st) {
        const int h = g * group + i / nqt, i0 = (qt0 + i % nqt) * BM;
        bf16 *sq, *sdo;
        float *sl, *sd;
        uint32_t* sqs;
        stage_ptrs(st, sq, sdo, sl, sd, sqs);
        const int64_t qo = (int64_t(b) * tq + i0) * qld + int64_t(h) * D;
        load_rows<D, BM, THREADS>(sq, q + qo, qld, tq - i0);
        load_rows<D, BM, THREADS>(sdo, d_o + qo, qld, tq - i0);
        const int64_t lo = (int64_t(b) * H + h) * tq + i0;
        load_vec<BM, THREADS>(sl, lse + lo, tq - i0);
        load_vec<BM, THREADS>(sd, delta + lo, tq - i0);
        if (sgb) load_vec<BM, THREADS>(sqs, sgb + off + i0, tq - i0);
    };

    load_rows<D, BN, THREADS>(sk, k + kvo, kld, tk - n0);
    load_rows<D, BN, THREADS>(sv, v + kvo, kld, tk - n0);
    issue(0, 0);
    cp_async_commit();

    int key[2];
    uint32_t kseg[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        key[hf] = n0 + warp * 16 + gr + 8 * hf;
        kseg[hf] = (sgb && key[hf] < tk) ? sgb[key[hf]] : 0u;
    }
    float adk[DI][4], adv[DI][4];
#pragma unroll
    for (int di = 0; di < DI; ++di)
#pragma unroll
        for (int e = 0; e < 4; ++e) adk[di][e] = adv[di][e] = 0.f;

    for (int it = 0; it < iters; ++it) {
        const int stage = it & 1;
        if (it + 1 < iters) issue(it + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const int h = g * group + it / nqt, qt = qt0 + it % nqt, i0 = qt * BM;
        bf16 *sq, *sdo;
        float *sl, *sd;
        uint32_t* sqs;
        stage_ptrs(stage, sq, sdo, sl, sd, sqs);

        // Sᵀ tile (the warp's 16 keys × BM queries) needs a mask at the causal edge, for query
        // rows past Tq, and with segments.
        const bool masked = sgb != nullptr || n0 + BN - 1 > off + i0 || i0 + BM > tq;
        uint32_t okb = 0u;
        if (masked) {
#pragma unroll
            for (int ni = 0; ni < NQ; ++ni) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = ni * 8 + 2 * tc + (e & 1), i = i0 + c, hf = e >> 1;
                    const bool ok = i < tq && key[hf] <= off + i && (!sgb || sqs[c] == kseg[hf]);
                    okb |= uint32_t(ok) << (ni * 4 + e);
                }
            }
            if (sgb && !__syncthreads_or(okb != 0u)) continue;
        }

        // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for the warp's keys.
        float st[NQ][4], dpt[NQ][4];
#pragma unroll
        for (int ni = 0; ni < NQ; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[ni][e] = dpt[ni][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            uint32_t ka[4], va[4];
            ldsm_x4(ka, sk + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
            ldsm_x4(va, sv + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < NQ / 2; ++np) {
                const int ro = (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 + ((lane >> 3) & 1) * 8;
                uint32_t f[4];
                ldsm_x4(f, sq + ro);
                mma16816(st[2 * np], ka, f[0], f[1]);
                mma16816(st[2 * np + 1], ka, f[2], f[3]);
                ldsm_x4(f, sdo + ro);
                mma16816(dpt[2 * np], va, f[0], f[1]);
                mma16816(dpt[2 * np + 1], va, f[2], f[3]);
            }
        }

        // Pᵀ = 2^(s·scale·log2 e − lse·log2 e), dSᵀ = Pᵀ ∘ (dPᵀ − delta); both as A fragments.
        uint32_t pa[BM / 16][4], da[BM / 16][4];
#pragma unroll
        for (int ni = 0; ni < NQ; ++ni) {
            const float2 lz = *reinterpret_cast<const float2*>(sl + ni * 8 + 2 * tc);
            const float2 dz = *reinterpret_cast<const float2*>(sd + ni * 8 + 2 * tc);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float lv = (e & 1) ? lz.y : lz.x, dv_ = (e & 1) ? dz.y : dz.x;
                float p = exp2f(fmaf(st[ni][e], scale_log2, -lv * LOG2E));
                if (masked && !((okb >> (ni * 4 + e)) & 1u)) p = 0.f;
                st[ni][e] = p;
                dpt[ni][e] = p * (dpt[ni][e] - dv_);
            }
        }
#pragma unroll
        for (int ks = 0; ks < BM / 16; ++ks) {
            pa[ks][0] = pack_bf16(st[2 * ks][0], st[2 * ks][1]);
            pa[ks][1] = pack_bf16(st[2 * ks][2], st[2 * ks][3]);
            pa[ks][2] = pack_bf16(st[2 * ks + 1][0], st[2 * ks + 1][1]);
            pa[ks][3] = pack_bf16(st[2 * ks + 1][2], st[2 * ks + 1][3]);
            da[ks][0] = pack_bf16(dpt[2 * ks][0], dpt[2 * ks][1]);
            da[ks][1] = pack_bf16(dpt[2 * ks][2], dpt[2 * ks][3]);
            da[ks][2] = pack_bf16(dpt[2 * ks + 1][0], dpt[2 * ks + 1][1]);
            da[ks][3] = pack_bf16(dpt[2 * ks + 1][2], dpt[2 * ks + 1][3]);
        }
        // dSᵀ to shared memory for dQ (rows: keys, columns: queries).
#pragma unroll
        for (int ks = 0; ks < BM / 16; ++ks) {
            bf16* row = sds + (warp * 16 + gr) * LDS + ks * 16 + 2 * tc;
            *reinterpret_cast<uint32_t*>(row) = da[ks][0];
            *reinterpret_cast<uint32_t*>(row + 8 * LDS) = da[ks][1];
            *reinterpret_cast<uint32_t*>(row + 8) = da[ks][2];
            *reinterpret_cast<uint32_t*>(row + 8 * LDS + 8) = da[ks][3];
        }

        // dV += Pᵀ dO, dK += dSᵀ Q (scaled on the way out).
#pragma unroll
        for (int ks = 0; ks < BM / 16; ++ks) {
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                const int ro = (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8;
                uint32_t f[4];
                ldsm_x4_t(f, sdo + ro);
                mma16816(adv[2 * dp], pa[ks], f[0], f[1]);
                mma16816(adv[2 * dp + 1], pa[ks], f[2], f[3]);
                ldsm_x4_t(f, sq + ro);
                mma16816(adk[2 * dp], da[ks], f[0], f[1]);
                mma16816(adk[2 * dp + 1], da[ks], f[2], f[3]);
            }
        }
        __syncthreads();  // dSᵀ complete

        // dQ tile (BM × D) += dS K: warp (wq, wd) owns queries 16·wq … and column tiles wd·NDQ ….
        const int wq = warp % WQ, wd = warp / WQ;
        if (i0 + wq * 16 < tq) {
            float aq[NDQ][4];
#pragma unroll
            for (int j = 0; j < NDQ; ++j) aq[j][0] = aq[j][1] = aq[j][2] = aq[j][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < BN / 16; ++ks) {
                uint32_t a[4];
                ldsm_x4_t(a, sds + (ks * 16 + (lane & 7) + ((lane >> 4) & 1) * 8) * LDS + wq * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int dp = 0; dp < NDQ / 2; ++dp) {
                    uint32_t f[4];
                    ldsm_x4_t(f, sk + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + wd * NDQ * 8 + dp * 16 +
                                     (lane >> 4) * 8);
                    mma16816(aq[2 * dp], a, f[0], f[1]);
                    mma16816(aq[2 * dp + 1], a, f[2], f[3]);
                }
            }
            const int64_t bh = int64_t(b) * H + h;
            const int t16 = (i0 >> 4) + wq;
#pragma unroll
            for (int j = 0; j < NDQ; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) atomicAdd(dq_acc + dq_index(bh, nt16, t16, wd * NDQ + j, DI, e, lane), aq[j][e]);
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        if (key[hf] >= tk) continue;
        const int64_t ko = (int64_t(b) * tk + key[hf]) * kld + int64_t(g) * D + 2 * tc;
#pragma unroll
        for (int di = 0; di < DI; ++di) {
            *reinterpret_cast<uint32_t*>(dk + ko + di * 8) = pack_bf16(adk[di][2 * hf] * scale, adk[di][2 * hf + 1] * scale);
            *reinterpret_cast<uint32_t*>(dv + ko + di * 8) = pack_bf16(adv[di][2 * hf], adv[di][2 * hf + 1]);
        }
    }
}

// dq = scale · dq_accum, from the fragment order of dq_index (nt16 row tiles of 16 a head) to
// (B, Tq, H, D) bf16. One thread a pair of neighbouring columns.
__device__ void dq_convert(const float* __restrict__ acc, bf16* __restrict__ dq, int B, int tq, int H, int D,
                           int nt16, float scale) {
    const int DI = D / 8;
    const int64_t pairs = int64_t(B) * H * nt16 * DI * 2 * 32;
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs; p += int64_t(gridDim.x) * blockDim.x) {
        const int lane = int(p & 31);
        int64_t rest = p >> 5;
        const int hf = int(rest & 1);
        rest >>= 1;
        const int dt = int(rest % DI);
        rest /= DI;
        const int t16 = int(rest % nt16);
        const int64_t bh = rest / nt16;
        const int row = t16 * 16 + (lane >> 2) + 8 * hf;
        if (row >= tq) continue;
        const int64_t bb = bh / H, h = bh - bb * H;
        const float x = acc[dq_index(bh, nt16, t16, dt, DI, 2 * hf, lane)];
        const float y = acc[dq_index(bh, nt16, t16, dt, DI, 2 * hf + 1, lane)];
        *reinterpret_cast<uint32_t*>(dq + ((bb * tq + row) * H + h) * D + dt * 8 + 2 * (lane & 3)) =
            pack_bf16(x * scale, y * scale);
    }
}

}  // namespace flash

// ---------------------------------------------------------------------------------------------
// Hopper forward (sm_90a): the flash forward with wgmma. Compiled only into the compute_90a
// module; the compute_80 module gets a stub that traps (the launcher never picks it there).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GM_WGMMA 1
#endif

namespace hopper {

using flash::bf16;
using flash::Flag;
using flash::LN2;
using flash::PAD;

#ifdef GM_WGMMA
// wgmma reads shared memory through the async proxy: make this thread's generic-proxy writes
// (cp.async) visible to it.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Orders register accesses before the next wgmma of the warpgroup.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

#define GM_R8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
// d (64 × 64 f32 of the warpgroup, 32 a thread) = a (64 × 16 bf16, registers) · b (16 × 64,
// shared memory descriptor) + (acc ? d : 0); TB: b is N-major (1) or K-major (0).
template <int TB>
__device__ __forceinline__ void wgmma_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t desc, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %36, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %37, p, 1, 1, %38;\n}\n"
        : GM_R8(0), GM_R8(8), GM_R8(16), GM_R8(24)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(acc), "l"(desc), "n"(TB));
}
// As wgmma_n64 with N = 128 (64 floats a thread).
template <int TB>
__device__ __forceinline__ void wgmma_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t desc, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %68, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %69, p, 1, 1, %70;\n}\n"
        : GM_R8(0), GM_R8(8), GM_R8(16), GM_R8(24), GM_R8(32), GM_R8(40), GM_R8(48), GM_R8(56)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(acc), "l"(desc), "n"(TB));
}
#undef GM_R8

#define GM_R8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
// d (64 × 32 f32, 16 a thread) = a (64 × 16, descriptor; TA: M-major) · b (16 × 32, descriptor;
// TB: N-major) + (acc ? d : 0).
template <int TA, int TB>
__device__ __forceinline__ void wgmma_ss_n32(float (&d)[16], uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "%16, %17, p, 1, 1, %19, %20;\n}\n"
        : GM_R8(0), GM_R8(8)
        : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB));
}
// As wgmma_ss_n32 with N = 64 (32 floats a thread).
template <int TA, int TB>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, %35, %36;\n}\n"
        : GM_R8(0), GM_R8(8), GM_R8(16), GM_R8(24)
        : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB));
}
#undef GM_R8

template <int N, int TA, int TB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int acc) {
    if constexpr (N == 32)
        wgmma_ss_n32<TA, TB>(d, da, db, acc);
    else
        wgmma_ss_n64<TA, TB>(d, da, db, acc);
}

template <int N, int TB>
__device__ __forceinline__ void wgmma(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc, int acc) {
    if constexpr (N == 64)
        wgmma_n64<TB>(d, a, desc, acc);
    else
        wgmma_n128<TB>(d, a, desc, acc);
}

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
// offsets (all in 16-byte units).
__device__ __forceinline__ uint64_t desc128(const void* p, uint32_t lbo, uint32_t sbo) {
    return uint64_t((flash::smem_u32(p) & 0x3ffff) >> 4) | uint64_t(lbo >> 4) << 16 | uint64_t(sbo >> 4) << 32 |
           uint64_t(1) << 62;
}

// Byte offset of 16-byte chunk c (0 … D/8 − 1) of row r in a tile of `rows` rows of D bf16 stored
// as D/64 column blocks of 128-byte rows, 16-byte chunks swizzled by the row (Swizzle<3,4,3>, the
// layout the 128-byte descriptor mode reads; the tile starts on a 1024-byte boundary).
template <int ROWS> __device__ __forceinline__ int sw128(int r, int c) {
    return (c >> 3) * ROWS * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}

// Starts copying ROWS rows of D bf16 (global row stride ld) into a swizzled tile; rows at or past
// `valid` become zeros.
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_sw(unsigned char* dst, const bf16* src, int64_t ld, int valid) {
    constexpr int CH = D / 8;
    static_assert((ROWS * CH) % THREADS == 0, "whole chunks per thread");
#pragma unroll 1
    for (int u = 0; u < ROWS * CH / THREADS; ++u) {
        const int c = threadIdx.x + u * THREADS, r = c / CH, k = c % CH;
        const bool ok = r < valid;
        flash::cp_async16(dst + sw128<ROWS>(r, k), ok ? src + r * ld + k * 8 : src, ok);
    }
}
#endif

template <int D, int BN>
struct Fwd {
    static constexpr int THREADS = 256;  // two warpgroups of 64 query rows
    static constexpr int BM = 128;
    static constexpr int LDQ = D + PAD;
    static constexpr int TILE = BN * D * 2;  // bytes of one K or V tile
    // Two stages of {K, V}, the Q tile, two stages of segment ids, 1024 bytes to align the tiles.
    static constexpr int SMEM = 4 * TILE + BM * LDQ * 2 + 2 * BN * 4 + 1024;
};

template <int D, int BN>
__device__ void fwd(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                    bf16* __restrict__ o, float* __restrict__ lse, const uint32_t* __restrict__ seg, int tq, int tk,
                    int H, int Hkv, float scale_log2) {
#ifdef GM_WGMMA
    using C = Fwd<D, BN>;
    constexpr int BM = C::BM, LDQ = C::LDQ, THREADS = C::THREADS, TILE = C::TILE;
    constexpr int NI = BN / 8, DI = D / 8, KS = D / 16, NW = (NI + 7) / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    // Tiles on a 1024-byte boundary (the swizzle pattern repeats every 1024 bytes).
    unsigned char* base = smem_raw + ((1024 - (flash::smem_u32(smem_raw) & 1023)) & 1023);
    unsigned char* skv = base;                                         // 2 stages × {K, V}
    bf16* sq = reinterpret_cast<bf16*>(base + 4 * TILE);               // (BM, LDQ)
    uint32_t* sseg = reinterpret_cast<uint32_t*>(sq + BM * LDQ);        // 2 stages × BN

    const int b = blockIdx.x / H, h = blockIdx.x - b * H, g = h / (H / Hkv);
    const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tc = lane & 3;
    const int off = tk - tq;
    const int64_t qld = int64_t(H) * D, kld = int64_t(Hkv) * D;
    const bf16* qb = q + (int64_t(b) * tq + m0) * qld + int64_t(h) * D;
    const bf16* kb = k + int64_t(b) * tk * kld + int64_t(g) * D;
    const bf16* vb = v + int64_t(b) * tk * kld + int64_t(g) * D;
    const uint32_t* sgb = seg ? seg + int64_t(b) * tk : nullptr;
    // Warp w of warpgroup w / 4 owns rows 16w … 16w + 15 of the block (the wgmma row layout).
    const int wrow = warp * 16;

    const int kend = min(tk, off + m0 + BM);
    const int ntiles = (kend + BN - 1) / BN;
    auto issue = [&](int n, int stage) {
        const int j0 = n * BN;
        unsigned char* sk = skv + stage * 2 * TILE;
        load_sw<D, BN, THREADS>(sk, kb + j0 * kld, kld, tk - j0);
        load_sw<D, BN, THREADS>(sk + TILE, vb + j0 * kld, kld, tk - j0);
        if (sgb) flash::load_vec<BN, THREADS>(sseg + stage * BN, sgb + j0, tk - j0);
    };
    flash::load_rows<D, BM, THREADS>(sq, qb, qld, tq - m0);
    issue(ntiles - 1, 0);
    flash::cp_async_commit();

    const int pos0 = off + m0 + wrow + gr;
    uint32_t rseg[2];
    float acc[DI * 4], m[2], l[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int p = pos0 + 8 * hf;
        rseg[hf] = (sgb && p < tk) ? sgb[p] : 0u;
        m[hf] = -INFINITY;
        l[hf] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < DI * 4; ++i) acc[i] = 0.f;
    auto allowed = [&](const uint32_t* ss, int j0, int ni, int e) {
        const int jj = ni * 8 + 2 * tc + (e & 1), p = pos0 + 8 * (e >> 1);
        return j0 + jj <= p && p < tk && (!sgb || ss[jj] == rseg[e >> 1]);
    };

    int it = 0;
    uint32_t qf[KS][4];
    auto step = [&](auto masked_c) {
        constexpr bool MASKED = decltype(masked_c)::value;
        const int n = ntiles - 1 - it, stage = it & 1, j0 = n * BN;
        if (it + 1 < ntiles) issue(n - 1, stage ^ 1);
        flash::cp_async_commit();
        flash::cp_async_wait<1>();
        fence_proxy_async();
        __syncthreads();
        if (it == 0) {
            // Q stays in registers as the A fragments of every S = Q Kᵀ.
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) flash::ldsm_x4(qf[kk], sq + (wrow + (lane & 15)) * LDQ + kk * 16 + (lane >> 4) * 8);
        }
        const unsigned char* sk = skv + stage * 2 * TILE;
        const unsigned char* sv = sk + TILE;
        const uint32_t* ss = sseg + stage * BN;

        uint32_t okb[NW];
        if constexpr (MASKED) {
            int any = 0;
#pragma unroll
            for (int w = 0; w < NW; ++w) okb[w] = 0u;
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) okb[ni / 8] |= uint32_t(allowed(ss, j0, ni, e)) << ((ni % 8) * 4 + e);
#pragma unroll
            for (int w = 0; w < NW; ++w) any |= okb[w] != 0u;
            if (sgb && !__syncthreads_or(any)) return;
        }

        // S = Q Kᵀ: K is K-major (rows of D), D / 64 column blocks of BN rows.
        float s[NI * 4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KS; ++kk)
            wgmma<BN, 0>(s, qf[kk], desc128(sk + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
        wgmma_commit();
        wgmma_wait<0>();

        uint32_t pa[BN / 16][4];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float mx = -INFINITY;
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int e = 2 * hf + c;
                    float x = s[ni * 4 + e] * scale_log2;
                    if constexpr (MASKED) {
                        if (!((okb[ni / 8] >> ((ni % 8) * 4 + e)) & 1u)) x = -INFINITY;
                    }
                    s[ni * 4 + e] = x;
                    mx = fmaxf(mx, x);
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mnew = fmaxf(m[hf], mx);
            const float mu = mnew == -INFINITY ? 0.f : mnew;
            const float alpha = exp2f(m[hf] - mu);
            m[hf] = mnew;
            float sum = 0.f;
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                const float p0 = exp2f(s[ni * 4 + 2 * hf] - mu), p1 = exp2f(s[ni * 4 + 2 * hf + 1] - mu);
                sum += p0 + p1;
                pa[ni / 2][2 * (ni % 2) + hf] = flash::pack_bf16(p0, p1);
            }
            l[hf] = l[hf] * alpha + sum;
#pragma unroll
            for (int di = 0; di < DI; ++di) {
                acc[di * 4 + 2 * hf] *= alpha;
                acc[di * 4 + 2 * hf + 1] *= alpha;
            }
        }

        // acc += P V: V is N-major (rows of D are N), 8-key row groups 1024 bytes apart, the
        // 64-column blocks BN·128 bytes apart.
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < BN / 16; ++ks) wgmma<D, 1>(acc, pa[ks], desc128(sv + ks * 16 * 128, BN * 128, 1024), 1);
        wgmma_commit();
        wgmma_wait<0>();
        __syncthreads();  // this stage is read; the next iteration refills it
    };
    const int nmasked = sgb ? ntiles : ntiles - min(ntiles, (off + m0 + 1) / BN);
    for (; it < nmasked; ++it) step(Flag<true>{});
    for (; it < ntiles; ++it) step(Flag<false>{});
    flash::cp_async_wait<0>();

    __syncwarp();
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float lt = l[hf];
        lt += __shfl_xor_sync(0xffffffffu, lt, 1);
        lt += __shfl_xor_sync(0xffffffffu, lt, 2);
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        const int rr = wrow + gr + 8 * hf, r = m0 + rr;
        if (r < tq && tc == 0) lse[(int64_t(b) * H + h) * tq + r] = lt > 0.f ? (m[hf] + log2f(lt)) * LN2 : -INFINITY;
#pragma unroll
        for (int di = 0; di < DI; ++di)
            *reinterpret_cast<uint32_t*>(sq + rr * LDQ + di * 8 + 2 * tc) =
                flash::pack_bf16(acc[di * 4 + 2 * hf] * inv, acc[di * 4 + 2 * hf + 1] * inv);
    }
    __syncwarp();
    bf16* ob = o + (int64_t(b) * tq + m0) * qld + int64_t(h) * D;
#pragma unroll
    for (int u = 0; u < 16 * DI / 32; ++u) {
        const int c = lane + 32 * u, rr = c / DI, kc = c % DI;
        if (m0 + wrow + rr < tq)
            *reinterpret_cast<uint4*>(ob + (wrow + rr) * qld + kc * 8) =
                *reinterpret_cast<const uint4*>(sq + (wrow + rr) * LDQ + kc * 8);
    }
#else
    __trap();
#endif
}

// ---- Hopper backward: dK, dV (and dQ through f32 atomics) for one block of 128 keys ----
template <int D>
struct Bwd {
    static constexpr int THREADS = 256;  // two warpgroups of 64 keys
    static constexpr int BN = 128;       // keys a block
    static constexpr int BM = 64;        // queries a tile
    static constexpr int TILE_K = BN * D * 2;
    static constexpr int TILE_Q = BM * D * 2;
    // {Q, dO} swizzled, lse, delta, segment ids; rounded up so the next stage's tiles stay on a
    // 1024-byte boundary.
    static constexpr int STAGE = (2 * TILE_Q + 3 * BM * 4 + 1023) / 1024 * 1024;
    static constexpr int DS = BN * BM * 2;  // dSᵀ, swizzled
    static constexpr int SMEM = 2 * TILE_K + 2 * STAGE + DS + 1024;
};

template <int D>
__device__ void dkv(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                    const float* __restrict__ lse, const float* __restrict__ delta, const bf16* __restrict__ d_o,
                    const uint32_t* __restrict__ seg, float* __restrict__ dq_acc, bf16* __restrict__ dk,
                    bf16* __restrict__ dv, int tq, int tk, int H, int Hkv, float scale, float scale_log2) {
#ifdef GM_WGMMA
    using C = Bwd<D>;
    constexpr int BN = C::BN, BM = C::BM, THREADS = C::THREADS, TILE_K = C::TILE_K, TILE_Q = C::TILE_Q;
    constexpr int NQ = BM / 8, DI = D / 8, KS = D / 16, DH = D / 2;  // DH: dQ columns a warpgroup
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* base = smem_raw + ((1024 - (flash::smem_u32(smem_raw) & 1023)) & 1023);
    unsigned char* sk = base;                          // K (BN rows), swizzled
    unsigned char* sv = base + TILE_K;                 // V
    unsigned char* stages = base + 2 * TILE_K;         // 2 × STAGE
    unsigned char* sds = stages + 2 * C::STAGE;        // dSᵀ: BN rows of BM queries

    const int b = blockIdx.x / Hkv, g = blockIdx.x - b * Hkv, n0 = blockIdx.y * BN;
    const int group = H / Hkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tc = lane & 3;
    const int wg = threadIdx.x >> 7, wl = warp & 3;
    const int off = tk - tq;
    const int64_t qld = int64_t(H) * D, kld = int64_t(Hkv) * D;
    const int64_t kvo = (int64_t(b) * tk + n0) * kld + int64_t(g) * D;
    const uint32_t* sgb = seg ? seg + int64_t(b) * tk : nullptr;
    const int nqt_all = (tq + BM - 1) / BM, nt16 = nqt_all * BM / 16;
    const int qt0 = max(0, n0 - off) / BM, nqt = nqt_all - qt0, iters = group * nqt;

    auto issue = [&](int i, int st) {
        const int h = g * group + i / nqt, i0 = (qt0 + i % nqt) * BM;
        unsigned char* p = stages + st * C::STAGE;
        float* sl = reinterpret_cast<float*>(p + 2 * TILE_Q);
        const int64_t qo = (int64_t(b) * tq + i0) * qld + int64_t(h) * D;
        load_sw<D, BM, THREADS>(p, q + qo, qld, tq - i0);
        load_sw<D, BM, THREADS>(p + TILE_Q, d_o + qo, qld, tq - i0);
        const int64_t lo = (int64_t(b) * H + h) * tq + i0;
        flash::load_vec<BM, THREADS>(sl, lse + lo, tq - i0);
        flash::load_vec<BM, THREADS>(sl + BM, delta + lo, tq - i0);
        if (sgb) flash::load_vec<BM, THREADS>(reinterpret_cast<uint32_t*>(sl + 2 * BM), sgb + off + i0, tq - i0);
    };

    load_sw<D, BN, THREADS>(sk, k + kvo, kld, tk - n0);
    load_sw<D, BN, THREADS>(sv, v + kvo, kld, tk - n0);
    issue(0, 0);
    flash::cp_async_commit();

    // This thread's keys: rows 64·wg + 16·wl + gr (+ 8) of the block.
    int key[2];
    uint32_t kseg[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        key[hf] = n0 + 64 * wg + 16 * wl + gr + 8 * hf;
        kseg[hf] = (sgb && key[hf] < tk) ? sgb[key[hf]] : 0u;
    }
    float adk[DI * 4], adv[DI * 4];
#pragma unroll
    for (int i = 0; i < DI * 4; ++i) adk[i] = adv[i] = 0.f;

    for (int it = 0; it < iters; ++it) {
        const int stage = it & 1;
        if (it + 1 < iters) issue(it + 1, stage ^ 1);
        flash::cp_async_commit();
        flash::cp_async_wait<1>();
        fence_proxy_async();
        __syncthreads();
        const int h = g * group + it / nqt, i0 = (qt0 + it % nqt) * BM;
        const unsigned char* sq = stages + stage * C::STAGE;
        const unsigned char* sdo = sq + TILE_Q;
        const float* sl = reinterpret_cast<const float*>(sdo + TILE_Q);
        const float* sd = sl + BM;
        const uint32_t* sqs = reinterpret_cast<const uint32_t*>(sd + BM);

        const bool masked = sgb != nullptr || n0 + BN - 1 > off + i0 || i0 + BM > tq;
        uint32_t okb = 0u;
        if (masked) {
#pragma unroll
            for (int ni = 0; ni < NQ; ++ni) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = ni * 8 + 2 * tc + (e & 1), i = i0 + c, hf = e >> 1;
                    const bool ok = i < tq && key[hf] <= off + i && (!sgb || sqs[c] == kseg[hf]);
                    okb |= uint32_t(ok) << (ni * 4 + e);
                }
            }
            if (sgb && !__syncthreads_or(okb != 0u)) continue;
        }

        // Sᵀ = K Qᵀ, dPᵀ = V dOᵀ for the warpgroup's 64 keys: both operands K-major in shared memory.
        float st[NQ * 4], dpt[NQ * 4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            const int ka = (kk / 4) * BN * 128 + 64 * wg * 128 + (kk % 4) * 32, qa = (kk / 4) * BM * 128 + (kk % 4) * 32;
            wgmma_ss<BM, 0, 0>(st, desc128(sk + ka, 16, 1024), desc128(sq + qa, 16, 1024), kk > 0);
        }
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            const int ka = (kk / 4) * BN * 128 + 64 * wg * 128 + (kk % 4) * 32, qa = (kk / 4) * BM * 128 + (kk % 4) * 32;
            wgmma_ss<BM, 0, 0>(dpt, desc128(sv + ka, 16, 1024), desc128(sdo + qa, 16, 1024), kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();

        uint32_t pa[BM / 16][4], da[BM / 16][4];
#pragma unroll
        for (int ni = 0; ni < NQ; ++ni) {
            const float2 lz = *reinterpret_cast<const float2*>(sl + ni * 8 + 2 * tc);
            const float2 dz = *reinterpret_cast<const float2*>(sd + ni * 8 + 2 * tc);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float lv = (e & 1) ? lz.y : lz.x, dl = (e & 1) ? dz.y : dz.x;
                float p = exp2f(fmaf(st[ni * 4 + e], scale_log2, -lv * flash::LOG2E));
                if (masked && !((okb >> (ni * 4 + e)) & 1u)) p = 0.f;
                st[ni * 4 + e] = p;
                dpt[ni * 4 + e] = p * (dpt[ni * 4 + e] - dl);
            }
            pa[ni / 2][2 * (ni % 2)] = flash::pack_bf16(st[ni * 4], st[ni * 4 + 1]);
            pa[ni / 2][2 * (ni % 2) + 1] = flash::pack_bf16(st[ni * 4 + 2], st[ni * 4 + 3]);
            da[ni / 2][2 * (ni % 2)] = flash::pack_bf16(dpt[ni * 4], dpt[ni * 4 + 1]);
            da[ni / 2][2 * (ni % 2) + 1] = flash::pack_bf16(dpt[ni * 4 + 2], dpt[ni * 4 + 3]);
            // dSᵀ to shared memory (rows: keys, 64 query columns = one swizzled 128-byte row).
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = 64 * wg + 16 * wl + gr + 8 * hf;
                *reinterpret_cast<uint32_t*>(sds + sw128<BN>(r, ni) + 4 * tc) = da[ni / 2][2 * (ni % 2) + hf];
            }
        }

        // dV += Pᵀ dO, dK += dSᵀ Q: dO and Q N-major (their D columns), 64-column blocks BM·128
        // bytes apart, 8-query row groups 1024 bytes apart.
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < BM / 16; ++ks) wgmma<D, 1>(adv, pa[ks], desc128(sdo + ks * 2048, BM * 128, 1024), 1);
#pragma unroll
        for (int ks = 0; ks < BM / 16; ++ks) wgmma<D, 1>(adk, da[ks], desc128(sq + ks * 2048, BM * 128, 1024), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_proxy_async();
        __syncthreads();  // dSᵀ complete

        // dQ tile (BM × D) += dS K: warpgroup wg takes columns DH·wg …; dS is M-major (the dSᵀ
        // rows), K N-major.
        float aq[DH / 2];
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < BN / 16; ++ks) {
            const int kb = ks * 2048 + (DH * wg / 64) * BN * 128 + (DH * wg % 64) * 2;
            wgmma_ss<DH, 1, 1>(aq, desc128(sds + ks * 2048, BN * 128, 1024), desc128(sk + kb, BN * 128, 1024), ks > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        if (i0 + 16 * wl < tq) {
            const int64_t bh = int64_t(b) * H + h;
            const int t16 = (i0 >> 4) + wl;
#pragma unroll
            for (int j = 0; j < DH / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    atomicAdd(dq_acc + flash::dq_index(bh, nt16, t16, DH * wg / 8 + j, DI, e, lane), aq[j * 4 + e]);
        }
    }
    flash::cp_async_wait<0>();

#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        if (key[hf] >= tk) continue;
        const int64_t ko = (int64_t(b) * tk + key[hf]) * kld + int64_t(g) * D + 2 * tc;
#pragma unroll
        for (int di = 0; di < DI; ++di) {
            *reinterpret_cast<uint32_t*>(dk + ko + di * 8) =
                flash::pack_bf16(adk[di * 4 + 2 * hf] * scale, adk[di * 4 + 2 * hf + 1] * scale);
            *reinterpret_cast<uint32_t*>(dv + ko + di * 8) = flash::pack_bf16(adv[di * 4 + 2 * hf], adv[di * 4 + 2 * hf + 1]);
        }
    }
#else
    __trap();
#endif
}

}  // namespace hopper

#define FWD(NAME, T)                                                                                                 \
    GM_KERNEL void __launch_bounds__(THREADS, 1)                                                                        \
        NAME(const T* q, const T* k, const T* v, T* o, float* lse, const uint32_t* seg, float* opart, float* lpart, \
             int tq, int tk, int H, int Hkv, int D, float scale, int nsplit, int tiles_per_split) {                  \
        attn_fwd<T>(q, k, v, o, lse, seg, opart, lpart, tq, tk, H, Hkv, D, scale, nsplit, tiles_per_split);         \
    }
FWD(attention_fwd_f32, float)
FWD(attention_fwd_bf16, __nv_bfloat16)

#define COMBINE(NAME, T)                                                                                         \
    GM_KERNEL void NAME(const float* opart, const float* lpart, T* o, float* lse, int B, int tq, int H, int D,  \
                        int nsplit) {                                                                            \
        attn_combine<T>(opart, lpart, o, lse, B, tq, H, D, nsplit);                                              \
    }
COMBINE(attention_combine_fwd_f32, float)
COMBINE(attention_combine_fwd_bf16, __nv_bfloat16)

#define DELTA(NAME, T)                                                                                   \
    GM_KERNEL void NAME(const T* o, const T* d_o, float* delta, int B, int tq, int H, int D) {          \
        attn_delta<T>(o, d_o, delta, B, tq, H, D);                                                       \
    }
DELTA(attention_delta_bwd_f32, float)
DELTA(attention_delta_bwd_bf16, __nv_bfloat16)

#define DQ(NAME, T)                                                                                                  \
    GM_KERNEL void __launch_bounds__(THREADS, 1)                                                                        \
        NAME(const T* q, const T* k, const T* v, const float* lse, const float* delta, const T* d_o,                \
             const uint32_t* seg, T* dq, int tq, int tk, int H, int Hkv, int D, float scale) {                       \
        attn_dq<T>(q, k, v, lse, delta, d_o, seg, dq, tq, tk, H, Hkv, D, scale);                                    \
    }
DQ(attention_dq_bwd_f32, float)
DQ(attention_dq_bwd_bf16, __nv_bfloat16)

#define DKV(NAME, T)                                                                                                 \
    GM_KERNEL void __launch_bounds__(THREADS, 1)                                                                        \
        NAME(const T* q, const T* k, const T* v, const float* lse, const float* delta, const T* d_o,                \
             const uint32_t* seg, T* dk, T* dv, int tq, int tk, int H, int Hkv, int D, float scale) {                \
        attn_dkv<T>(q, k, v, lse, delta, d_o, seg, dk, dv, tq, tk, H, Hkv, D, scale);                               \
    }
DKV(attention_dkv_bwd_f32, float)
DKV(attention_dkv_bwd_bf16, __nv_bfloat16)

// Flash kernels: D, warps, and (forward) 16-row tiles a warp and keys a tile, or (backward) query
// rows a tile. The launchers mirror these numbers (kernels/src/attention.rs).
#define FLASH_FWD(NAME, D, W, MI, BN, KH)                                                                               \
    GM_KERNEL void __launch_bounds__(W * 32)                                                                         \
        NAME(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* o, float* lse, \
             const uint32_t* seg, int tq, int tk, int H, int Hkv, float scale_log2) {                               \
        flash::fwd<D, W, MI, BN, KH>(q, k, v, o, lse, seg, tq, tk, H, Hkv, scale_log2);                                  \
    }
FLASH_FWD(attention_flash64_fwd_bf16, 64, 4, 2, 64, 64)
FLASH_FWD(attention_flash128_fwd_bf16, 128, 4, 2, 64, 32)

#define FLASH_DKV(NAME, D, W, BM)                                                                                   \
    GM_KERNEL void __launch_bounds__(W * 32)                                                                         \
        NAME(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse,              \
             const float* delta, const __nv_bfloat16* d_o, const uint32_t* seg, float* dq_acc, __nv_bfloat16* dk,   \
             __nv_bfloat16* dv, int tq, int tk, int H, int Hkv, float scale, float scale_log2) {                    \
        flash::dkv<D, W, BM>(q, k, v, lse, delta, d_o, seg, dq_acc, dk, dv, tq, tk, H, Hkv, scale, scale_log2);      \
    }
FLASH_DKV(attention_flash64_dkv_bwd_bf16, 64, 8, 64)
FLASH_DKV(attention_flash128_dkv_bwd_bf16, 128, 8, 64)

GM_KERNEL void attention_dq_convert_bwd_bf16(const float* acc, __nv_bfloat16* dq, int B, int tq, int H, int D, int nt16,
                                             float scale) {
    flash::dq_convert(acc, dq, B, tq, H, D, nt16, scale);
}

// Hopper forward: D, keys a tile (the launcher mirrors these in FLASH_FWD). D = 64 stays on
// attention_flash64_fwd_bf16, which measured faster on an H200 (209 against 193 TFLOP/s).
#define HOPPER_FWD(NAME, D, BN)                                                                                      \
    GM_KERNEL void __launch_bounds__(256)                                                                            \
        NAME(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* o, float* lse, \
             const uint32_t* seg, int tq, int tk, int H, int Hkv, float scale_log2) {                               \
        hopper::fwd<D, BN>(q, k, v, o, lse, seg, tq, tk, H, Hkv, scale_log2);                                        \
    }
HOPPER_FWD(attention_hflash128_fwd_bf16, 128, 128)

// Hopper dK/dV: D (the launcher mirrors it in FLASH_BWD).
#define HOPPER_DKV(NAME, D)                                                                                         \
    GM_KERNEL void __launch_bounds__(256)                                                                            \
        NAME(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse,              \
             const float* delta, const __nv_bfloat16* d_o, const uint32_t* seg, float* dq_acc, __nv_bfloat16* dk,   \
             __nv_bfloat16* dv, int tq, int tk, int H, int Hkv, float scale, float scale_log2) {                    \
        hopper::dkv<D>(q, k, v, lse, delta, d_o, seg, dq_acc, dk, dv, tq, tk, H, Hkv, scale, scale_log2);            \
    }
HOPPER_DKV(attention_hflash64_dkv_bwd_bf16, 64)
HOPPER_DKV(attention_hflash128_dkv_bwd_bf16, 128)
