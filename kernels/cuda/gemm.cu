// gemm: dense matrix products and the NF4 dequantization that feeds them.
//
// Every product is C (M, N) = alpha · op(A) · op(B) + beta · C, summed over K, in one of three
// storage layouts (all buffers row-major, no padding: the leading dimension is the row length):
//   nt: A (M, K), B (N, K)   y = x Wᵀ        (forward of a linear layer)
//   nn: A (M, K), B (K, N)   dx = dy W       (its input gradient)
//   tn: A (K, M), B (K, N)   dW = dyᵀ x      (its weight gradient)
// beta == 0 never reads C, so C may hold anything (NaN included) before the call.
//
// gemm_{nt,nn,tn}[_small][_f32out]_fwd_bf16 — bf16 inputs, tensor cores.
//   Math: mma.sync m16n8k16 bf16 × bf16 with f32 accumulators; alpha, beta and the C read in f32,
//   one rounding to the output type at the end (bf16 round-to-nearest-even, or f32 for _f32out).
//   Layout in shared memory: each operand tile keeps its global orientation (rows of 16-byte
//   chunks, the chunk index XOR-swizzled by the row so that ldmatrix reads 8 rows without bank
//   conflicts); ldmatrix gives the fragments of a K-contiguous tile, ldmatrix.trans those of an
//   M- or N-contiguous one, so no layout needs a transposing copy.
//   Loads: cp.async 16-byte copies, STAGES k-tiles in flight; a chunk crossing the matrix edge
//   copies only its valid bytes and zero-fills the rest. When a pointer is not 16-byte aligned or
//   its leading dimension is not a multiple of 8, that operand is loaded element by element
//   instead (vec_a / vec_b = 0), synchronously, into the same pipeline. Fragments are double
//   buffered in registers: step kk + 1 (or the next tile's first step) loads while step kk
//   multiplies.
//   Geometry: grid (ceil(M / BM), ceil(N / BN), splits), one block a BM × BN tile of C, BK = 32.
//     large: BM 128, BN 256, 8 warps as 2 × 4 of 64 × 64, 4 stages, 96 KiB dynamic shared memory.
//     small: BM 64, BN 64, 4 warps as 2 × 2 of 32 × 32, 4 stages, 32 KiB: for products whose
//            large tiles would not fill the GPU (LoRA ranks, short sequences) or whose K is short.
//   Split-K (ws non-null): block z sums K range [z · k_per_split, (z + 1) · k_per_split) and
//   stores its raw f32 sums to ws[z] (M, N); gemm_splitk_fwd_<out> then writes
//   C = alpha · Σ_z ws[z] + beta · C (one thread an element, a fixed order: deterministic).
//   Epilogue: each thread writes pairs of adjacent columns (one 4- or 8-byte store when the
//   address allows it), guarded against the M and N edges.
//
// gemm_{nt,nn,tn}_fwd_f32 — f32 in and out, SIMT.
//   Math: f32 fused multiply-adds, f32 accumulators.
//   Layout in shared memory: both tiles K-major ([BK][BM + 4], [BK][BN + 4]: the padding keeps
//   the transposing stores conflict-free), double buffered, next tile prefetched into registers
//   while the current one is multiplied. Every global load is guarded (any shape, any alignment).
//   Geometry: grid (ceil(M / 128), ceil(N / 128)), 256 threads, each an 8 × 8 block of C made of
//   two 4-row and two 4-column strips 64 apart (vector shared loads without bank conflicts).
//
// nf4_dequant_fwd_{f32,bf16} — out (N, K) = the NF4 weight dequantized.
//   Math: absmax = plain f32, or dyn[q8] · nested_absmax + offset (double quantization: two f32
//   roundings, product then sum, never contracted into an FMA); w = NF4_CODE[q4] · absmax;
//   w rounded (round-to-nearest-even) to the dtype the weight came from (bf16, f16, or f32 kept);
//   then rounded to the output type. Bit-identical to Nf4Tensor::dequantize_rounded.
//   Layout: packed codes two per byte, element 2j in the HIGH nibble of byte j; an odd element
//   count leaves a padding nibble that is never written out.
//   Geometry: 1-D grid-stride, one thread a byte (two elements); the code books sit in shared
//   memory (indices differ per thread, which constant memory would serialize).
#include "common.cuh"
#include <cuda_fp16.h>

namespace {

constexpr int NT = 0, NN = 1, TN = 2;

// ---------------------------------------------------------------------------------------------
// Tensor-core GEMM (bf16 inputs)

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void st_shared_v4(uint32_t dst, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d += a · b for one m16n8k16 tile (a: 4 registers of bf16 pairs, b: 2, d: 4 floats).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Physical chunk of logical 16-byte chunk `c` in row `r` of a tile with CH chunks a row. Rows of
// 4 chunks (64 bytes) pair up in a 128-byte bank line, so the XOR key changes every second row;
// wider rows take the row's low 3 bits. Either way 8 consecutive rows at one logical chunk land
// in 8 different bank groups, which is what one ldmatrix phase reads.
template <int CH> __device__ __forceinline__ int swizzle(int r, int c) {
    static_assert(CH == 4 || CH % 8 == 0, "tile rows are 4 or a multiple of 8 chunks");
    if constexpr (CH == 4) {
        return c ^ ((r >> 1) & 3);
    } else {
        return c ^ (r & 7);
    }
}

template <int CH> __device__ __forceinline__ uint32_t tile_addr(uint32_t base, int r, int c) {
    return base + (uint32_t)((r * CH + swizzle<CH>(r, c)) * 16);
}

// One R × (8·CH) tile of a row-major bf16 matrix with `rows` × `cols` elements and leading
// dimension `ld`, from (row0, col0), into swizzled shared memory at `dst`; outside the matrix
// the tile holds zeros (they meet zeros of the other operand, or land in discarded outputs).
template <int R, int CH, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t dst, const __nv_bfloat16* g, int ld, int row0, int col0, int rows,
                                          int cols, bool vec) {
    static_assert((R * CH) % THREADS == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int i = 0; i < R * CH / THREADS; ++i) {
        const int idx = (int)threadIdx.x + i * THREADS;
        const int r = idx / CH, c = idx % CH;
        const int gr = row0 + r, gc = col0 + c * 8;
        const uint32_t d = tile_addr<CH>(dst, r, c);
        if (vec) {
            const int valid = gr < rows ? min(max(cols - gc, 0), 8) : 0;
            const __nv_bfloat16* src = valid > 0 ? g + ((size_t)gr * ld + gc) : g;
            cp_async16(d, src, valid * 2);
        } else {
            const unsigned short* s = reinterpret_cast<const unsigned short*>(g) + ((size_t)gr * ld + gc);
            uint32_t w[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool in_row = gr < rows;
                const uint32_t lo = (in_row && gc + 2 * e < cols) ? s[2 * e] : 0u;
                const uint32_t hi = (in_row && gc + 2 * e + 1 < cols) ? s[2 * e + 1] : 0u;
                w[e] = lo | (hi << 16);
            }
            st_shared_v4(d, w[0], w[1], w[2], w[3]);
        }
    }
}

template <typename O> struct Pair;
template <> struct Pair<float> {
    using V = float2;
    __device__ static V make(float a, float b) { return make_float2(a, b); }
    __device__ static float lo(V v) { return v.x; }
    __device__ static float hi(V v) { return v.y; }
};
template <> struct Pair<__nv_bfloat16> {
    using V = __nv_bfloat162;
    __device__ static V make(float a, float b) { return __floats2bfloat162_rn(a, b); }
    __device__ static float lo(V v) { return __low2float(v); }
    __device__ static float hi(V v) { return __high2float(v); }
};

// C[row, col] and C[row, col + 1] = alpha · v + beta · C, for the columns inside the matrix.
template <typename O>
__device__ __forceinline__ void store_pair(O* C, int N, int row, int col, float v0, float v1, float alpha,
                                           float beta) {
    O* p = C + ((size_t)row * N + col);
    if (col + 1 < N && (reinterpret_cast<uintptr_t>(p) & (2 * sizeof(O) - 1)) == 0) {
        auto* pv = reinterpret_cast<typename Pair<O>::V*>(p);
        float r0 = alpha * v0, r1 = alpha * v1;
        if (beta != 0.f) {
            const typename Pair<O>::V old = *pv;
            r0 += beta * Pair<O>::lo(old);
            r1 += beta * Pair<O>::hi(old);
        }
        *pv = Pair<O>::make(r0, r1);
    } else {
        if (col < N) p[0] = from_f32<O>(alpha * v0 + (beta != 0.f ? beta * to_f32(p[0]) : 0.f));
        if (col + 1 < N) p[1] = from_f32<O>(alpha * v1 + (beta != 0.f ? beta * to_f32(p[1]) : 0.f));
    }
}

// C = alpha · acc + beta · C over this block's tile; with split-K (ws non-null) the raw sums go
// to the block's slice of the f32 workspace instead and gemm_splitk finishes the job.
template <int L, typename O, int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES>
__device__ __forceinline__ void gemm_tc(const __nv_bfloat16* __restrict__ A, const __nv_bfloat16* __restrict__ B,
                                        O* __restrict__ C, float* __restrict__ ws, int M, int N, int K,
                                        int k_per_split, float alpha, float beta, int vec_a, int vec_b) {
    constexpr int THREADS = 32 * WARPS_M * WARPS_N;
    constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
    constexpr int MT = WM / 16, NT8 = WN / 8;            // mma tiles of a warp
    constexpr int KK = BK / 16;                          // mma steps a k-tile
    static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tiles are whole pairs of mma tiles");
    static_assert(KK % 2 == 0 && STAGES >= 2, "fragment buffers alternate by step parity");
    constexpr bool A_KC = L != TN;  // A stored (M, K)
    constexpr bool B_KC = L == NT;  // B stored (N, K)
    // Shared tile shapes in 16-byte chunks: K-contiguous tiles are (BM or BN) rows of BK / 8
    // chunks, the others BK rows of (BM or BN) / 8 chunks.
    constexpr int A_CH = A_KC ? BK / 8 : BM / 8;
    constexpr int B_CH = B_KC ? BK / 8 : BN / 8;
    constexpr uint32_t A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;

    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t smem0 = (uint32_t)__cvta_generic_to_shared(smem);

    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int k_begin = blockIdx.z * k_per_split;
    const int k_len = min(K - k_begin, k_per_split);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm0 = (warp / WARPS_N) * WM, wn0 = (warp % WARPS_N) * WN;

    // k_per_split is a multiple of BK, so only the last tile of the last split crosses K.
    auto load_stage = [&](int stage, int kt) {
        const uint32_t sa = smem0 + stage * STAGE_BYTES, sb = sa + A_BYTES;
        const int k0 = k_begin + kt * BK;
        if constexpr (A_KC) {
            load_tile<BM, A_CH, THREADS>(sa, A, K, m0, k0, M, K, vec_a);
        } else {
            load_tile<BK, A_CH, THREADS>(sa, A, M, k0, m0, K, M, vec_a);
        }
        if constexpr (B_KC) {
            load_tile<BN, B_CH, THREADS>(sb, B, K, n0, k0, N, K, vec_b);
        } else {
            load_tile<BK, B_CH, THREADS>(sb, B, N, k0, n0, K, N, vec_b);
        }
    };

    // Fragments of one mma step (16 of k) of a stage, into buffer `buf`.
    uint32_t af[2][MT][4];
    uint32_t bf[2][NT8][2];
    auto load_frags = [&](int buf, int stage, int kk) {
        const uint32_t sa = smem0 + stage * STAGE_BYTES, sb = sa + A_BYTES;
        const int kc = kk * 2;  // first 16-byte chunk of the step along k
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            if constexpr (A_KC) {
                // Matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = a0..a3.
                const int r = wm0 + 16 * i + (lane & 15);
                ldmatrix_x4(af[buf][i], tile_addr<A_CH>(sa, r, kc + (lane >> 4)));
            } else {
                // Shared rows are k: transposing 8 × 8 loads give the same four matrices.
                const int r = kk * 16 + ((lane >> 4) << 3) + (lane & 7);
                ldmatrix_x4_trans(af[buf][i], tile_addr<A_CH>(sa, r, (wm0 + 16 * i) / 8 + ((lane >> 3) & 1)));
            }
        }
#pragma unroll
        for (int q = 0; q < NT8 / 2; ++q) {
            // Matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15): b0, b1
            // of n-tile 2q, then of 2q + 1.
            uint32_t r4[4];
            if constexpr (B_KC) {
                const int r = wn0 + 16 * q + ((lane >> 4) << 3) + (lane & 7);
                ldmatrix_x4(r4, tile_addr<B_CH>(sb, r, kc + ((lane >> 3) & 1)));
            } else {
                const int r = kk * 16 + (((lane >> 3) & 1) << 3) + (lane & 7);
                ldmatrix_x4_trans(r4, tile_addr<B_CH>(sb, r, (wn0 + 16 * q) / 8 + (lane >> 4)));
            }
            bf[buf][2 * q][0] = r4[0];
            bf[buf][2 * q][1] = r4[1];
            bf[buf][2 * q + 1][0] = r4[2];
            bf[buf][2 * q + 1][1] = r4[3];
        }
    };

    float acc[MT][NT8][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const int KT = (k_len + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KT) load_stage(s, s);
        cp_async_commit();
    }
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    load_frags(0, 0, 0);

    // Software pipeline: while step kk multiplies, the fragments of step kk + 1 load, and the
    // last step of a tile loads the first fragments of the next tile. Tile kt + STAGES − 1 is
    // copied into the stage tile kt − 1 used, which every warp has finished reading: its last
    // fragments were loaded before the barrier of step KK − 1 of iteration kt − 1.
    int stage = 0;
    for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) {
            if (kk == KK - 1) {
                // Tile kt + 1 has landed (its group is the oldest of STAGES − 1 pending), and
                // every warp is done with the stage the next prefetch overwrites.
                cp_async_wait<STAGES - 2>();
                __syncthreads();
                stage = stage + 1 == STAGES ? 0 : stage + 1;
            }
            load_frags((kk + 1) & 1, stage, (kk + 1) % KK);
            if (kk == 0) {
                const int next = kt + STAGES - 1;
                if (next < KT) load_stage(next % STAGES, next);
                cp_async_commit();
            }
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT8; ++j) mma_bf16(acc[i][j], af[kk & 1][i], bf[kk & 1][j][0], bf[kk & 1][j][1]);
        }
    }

    // Accumulator d0, d1 sit at (row lane/4, columns 2·(lane%4) + 0, 1), d2, d3 eight rows below.
    float* part = ws == nullptr ? nullptr : ws + (size_t)blockIdx.z * M * N;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int j = 0; j < NT8; ++j) {
            const int row = m0 + wm0 + 16 * i + (lane >> 2);
            const int col = n0 + wn0 + 8 * j + 2 * (lane & 3);
            if (part != nullptr) {
                if (row < M) store_pair<float>(part, N, row, col, acc[i][j][0], acc[i][j][1], 1.f, 0.f);
                if (row + 8 < M) store_pair<float>(part, N, row + 8, col, acc[i][j][2], acc[i][j][3], 1.f, 0.f);
            } else {
                if (row < M) store_pair<O>(C, N, row, col, acc[i][j][0], acc[i][j][1], alpha, beta);
                if (row + 8 < M) store_pair<O>(C, N, row + 8, col, acc[i][j][2], acc[i][j][3], alpha, beta);
            }
        }
    }
}

// C = alpha · Σ_z ws[z] + beta · C, one thread an element (grid-stride).
template <typename O>
__device__ __forceinline__ void gemm_splitk(const float* __restrict__ ws, O* __restrict__ C, long long mn, int splits,
                                            float alpha, float beta) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < mn; i += (long long)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int z = 0; z < splits; ++z) s += ws[z * mn + i];
        C[i] = from_f32<O>(alpha * s + (beta != 0.f ? beta * to_f32(C[i]) : 0.f));
    }
}

// ---------------------------------------------------------------------------------------------
// SIMT GEMM (f32)

constexpr int S_BM = 128, S_BN = 128, S_BK = 8, S_PAD = 4, S_THREADS = 256;

// The 4 elements of one BK × 128 tile this thread loads, as the tile's (k, mn) coordinates: a
// K-contiguous operand is read 8 consecutive k of a row per 8 threads, the other 128
// consecutive mn of a k-row per 128 threads.
template <bool KC>
__device__ __forceinline__ void simt_load(float (&v)[4], const float* __restrict__ g, int ld, int mn0, int k0, int MN,
                                          int K) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int e = (int)threadIdx.x + i * S_THREADS;
        const int kk = KC ? (e & 7) : (e >> 7);
        const int mn = KC ? (e >> 3) : (e & 127);
        const int gmn = mn0 + mn, gk = k0 + kk;
        v[i] = 0.f;
        if (gmn < MN && gk < K) v[i] = KC ? g[(size_t)gmn * ld + gk] : g[(size_t)gk * ld + gmn];
    }
}

template <bool KC> __device__ __forceinline__ void simt_store(float (*s)[S_BM + S_PAD], const float (&v)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int e = (int)threadIdx.x + i * S_THREADS;
        const int kk = KC ? (e & 7) : (e >> 7);
        const int mn = KC ? (e >> 3) : (e & 127);
        s[kk][mn] = v[i];
    }
}

template <int L>
__device__ __forceinline__ void gemm_simt(const float* __restrict__ A, const float* __restrict__ B,
                                          float* __restrict__ C, int M, int N, int K, float alpha, float beta) {
    constexpr bool A_KC = L != TN;
    constexpr bool B_KC = L == NT;
    __shared__ __align__(16) float As[2][S_BK][S_BM + S_PAD];
    __shared__ __align__(16) float Bs[2][S_BK][S_BN + S_PAD];

    const int m0 = blockIdx.x * S_BM, n0 = blockIdx.y * S_BN;
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int lda = A_KC ? K : M, ldb = B_KC ? K : N;

    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

    float ra[4], rb[4];
    simt_load<A_KC>(ra, A, lda, m0, 0, M, K);
    simt_load<B_KC>(rb, B, ldb, n0, 0, N, K);
    simt_store<A_KC>(As[0], ra);
    simt_store<B_KC>(Bs[0], rb);
    __syncthreads();

    const int KT = (K + S_BK - 1) / S_BK;
    for (int kt = 0; kt < KT; ++kt) {
        const int cur = kt & 1;
        const bool more = kt + 1 < KT;
        if (more) {
            simt_load<A_KC>(ra, A, lda, m0, (kt + 1) * S_BK, M, K);
            simt_load<B_KC>(rb, B, ldb, n0, (kt + 1) * S_BK, N, K);
        }
#pragma unroll
        for (int k = 0; k < S_BK; ++k) {
            const float4 a0 = *reinterpret_cast<const float4*>(&As[cur][k][ty * 4]);
            const float4 a1 = *reinterpret_cast<const float4*>(&As[cur][k][64 + ty * 4]);
            const float4 b0 = *reinterpret_cast<const float4*>(&Bs[cur][k][tx * 4]);
            const float4 b1 = *reinterpret_cast<const float4*>(&Bs[cur][k][64 + tx * 4]);
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        // The other buffer was last read in iteration kt − 1, which every thread has left (the
        // barrier at its end); the barrier below publishes it for iteration kt + 1.
        if (more) {
            simt_store<A_KC>(As[cur ^ 1], ra);
            simt_store<B_KC>(Bs[cur ^ 1], rb);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int row = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
        if (row >= M) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int col = n0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4);
            if (col >= N) continue;
            float* p = C + ((size_t)row * N + col);
            *p = alpha * acc[i][j] + (beta != 0.f ? beta * *p : 0.f);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NF4 dequantization

// core/src/nf4.rs NF4_CODE, as f32 bit patterns.
__constant__ uint32_t NF4_CODE_BITS[16] = {
    0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu, 0xbdba7871u, 0x00000000u,
    0x3da2faffu, 0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au, 0x3ee1a4b8u, 0x3f1007abu, 0x3f3913b3u, 0x3f800000u,
};

// What dequantized values are rounded to before the output conversion: the weight's own dtype.
constexpr int ROUND_BF16 = 1, ROUND_F16 = 2;  // 0: f32, kept as is

template <typename T>
__device__ __forceinline__ void nf4_dequant(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                            const uint8_t* __restrict__ q8, const float* __restrict__ nested,
                                            const float* __restrict__ code8, float offset, int nested_bs,
                                            int double_quant, int blocksize, int round, long long numel,
                                            T* __restrict__ out) {
    __shared__ float lut[16];
    __shared__ float dyn[256];
    if (threadIdx.x < 16) lut[threadIdx.x] = __uint_as_float(NF4_CODE_BITS[threadIdx.x]);
    if (double_quant)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) dyn[i] = code8[i];
    __syncthreads();

    const long long bytes = (numel + 1) / 2;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < bytes;
         j += (long long)gridDim.x * blockDim.x) {
        const uint32_t byte = packed[j];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const long long i = 2 * j + h;
            if (i >= numel) break;
            const long long b = i / blocksize;
            float scale;
            if (double_quant) {
                scale = __fadd_rn(__fmul_rn(dyn[q8[b]], nested[b / nested_bs]), offset);
            } else {
                scale = absmax[b];
            }
            const uint32_t q = h == 0 ? byte >> 4 : byte & 15u;
            float w = __fmul_rn(lut[q], scale);
            if (round == ROUND_BF16) w = __bfloat162float(__float2bfloat16_rn(w));
            if (round == ROUND_F16) w = __half2float(__float2half_rn(w));
            out[i] = from_f32<T>(w);
        }
    }
}

}  // namespace

#define GEMM_TC(name, L, O, BM, BN, BK, WARPS_M, WARPS_N, STAGES, MIN_BLOCKS)                                    \
    GM_KERNEL void __launch_bounds__(32 * WARPS_M * WARPS_N, MIN_BLOCKS)                                           \
        name(const __nv_bfloat16* A, const __nv_bfloat16* B, O* C, float* ws, int M, int N, int K, int k_per_split, \
             float alpha, float beta, int vec_a, int vec_b) {                                                      \
        gemm_tc<L, O, BM, BN, BK, WARPS_M, WARPS_N, STAGES>(A, B, C, ws, M, N, K, k_per_split, alpha, beta, vec_a, \
                                                            vec_b);                                                \
    }

GEMM_TC(gemm_nt_fwd_bf16, NT, __nv_bfloat16, 128, 256, 32, 2, 4, 4, 1)
GEMM_TC(gemm_nn_fwd_bf16, NN, __nv_bfloat16, 128, 256, 32, 2, 4, 4, 1)
GEMM_TC(gemm_tn_fwd_bf16, TN, __nv_bfloat16, 128, 256, 32, 2, 4, 4, 1)
GEMM_TC(gemm_nt_f32out_fwd_bf16, NT, float, 128, 256, 32, 2, 4, 4, 1)
GEMM_TC(gemm_nn_f32out_fwd_bf16, NN, float, 128, 256, 32, 2, 4, 4, 1)
GEMM_TC(gemm_tn_f32out_fwd_bf16, TN, float, 128, 256, 32, 2, 4, 4, 1)
GEMM_TC(gemm_nt_small_fwd_bf16, NT, __nv_bfloat16, 64, 64, 32, 2, 2, 4, 4)
GEMM_TC(gemm_nn_small_fwd_bf16, NN, __nv_bfloat16, 64, 64, 32, 2, 2, 4, 4)
GEMM_TC(gemm_tn_small_fwd_bf16, TN, __nv_bfloat16, 64, 64, 32, 2, 2, 4, 4)
GEMM_TC(gemm_nt_small_f32out_fwd_bf16, NT, float, 64, 64, 32, 2, 2, 4, 4)
GEMM_TC(gemm_nn_small_f32out_fwd_bf16, NN, float, 64, 64, 32, 2, 2, 4, 4)
GEMM_TC(gemm_tn_small_f32out_fwd_bf16, TN, float, 64, 64, 32, 2, 2, 4, 4)

GM_KERNEL void gemm_splitk_fwd_f32(const float* ws, float* C, long long mn, int splits, float alpha, float beta) {
    gemm_splitk<float>(ws, C, mn, splits, alpha, beta);
}
GM_KERNEL void gemm_splitk_fwd_bf16(const float* ws, __nv_bfloat16* C, long long mn, int splits, float alpha,
                                    float beta) {
    gemm_splitk<__nv_bfloat16>(ws, C, mn, splits, alpha, beta);
}

#define GEMM_SIMT(name, L)                                                                                   \
    GM_KERNEL void __launch_bounds__(S_THREADS, 2)                                                            \
        name(const float* A, const float* B, float* C, int M, int N, int K, float alpha, float beta) {        \
        gemm_simt<L>(A, B, C, M, N, K, alpha, beta);                                                          \
    }

GEMM_SIMT(gemm_nt_fwd_f32, NT)
GEMM_SIMT(gemm_nn_fwd_f32, NN)
GEMM_SIMT(gemm_tn_fwd_f32, TN)

#define NF4_DEQUANT(name, T)                                                                                  \
    GM_KERNEL void name(const uint8_t* packed, const float* absmax, const uint8_t* q8, const float* nested,     \
                        const float* code8, float offset, int nested_bs, int double_quant, int blocksize,      \
                        int round, long long numel, T* out) {                                                  \
        nf4_dequant<T>(packed, absmax, q8, nested, code8, offset, nested_bs, double_quant, blocksize, round,    \
                       numel, out);                                                                            \
    }

NF4_DEQUANT(nf4_dequant_fwd_f32, float)
NF4_DEQUANT(nf4_dequant_fwd_bf16, __nv_bfloat16)
