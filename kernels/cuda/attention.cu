// attention: causal grouped-query attention, forward and backward — the simple stand-in until the
// flash-attention kernels replace it. The Tq × Tk attention matrix is never stored: the forward
// keeps an online softmax, the backward rebuilds every probability as exp(s − lse).
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
// attention_combine_fwd_<T>: one warp per query row (B·Tq·H rows, 8 warps a block).
//   lse = L + ln Σ_s exp(lse_s − L) with L = max_s lse_s; o = Σ_s exp(lse_s − lse)·o_s.
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
    float mx = -INFINITY;
    for (int s = lane; s < nsplit; s += 32) mx = fmaxf(mx, lpart[s * nr_all + row]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int s = lane; s < nsplit; s += 32) sum += expf(lpart[s * nr_all + row] - mx);
    const float ls = mx + logf(warp_sum(sum));
    // row = (b·Tq + i)·H + h  →  lse index (b·H + h)·Tq + i
    const int64_t bi = row / H;
    const int h = int(row - bi * H);
    const int64_t bb = bi / tq, i = bi - bb * tq;
    if (lane == 0) lse[(bb * H + h) * tq + i] = ls;
    for (int c = 2 * lane; c < D; c += 64) {
        float x = 0.f, y = 0.f;
        for (int s = 0; s < nsplit; ++s) {
            const float w = expf(lpart[s * nr_all + row] - ls);  // 0 for an empty split
            if (w > 0.f) {
                const float2 ps = load2(opart + (s * nr_all + row) * D + c);
                x = fmaf(w, ps.x, x);
                y = fmaf(w, ps.y, y);
            }
        }
        store2(o + row * D + c, x, y);
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
