// Softmax cross-entropy of the LM head, forward and gradient fused in one kernel.
//
// cross_entropy_fwd_<f32|bf16>, cross_entropy_bwd_<f32|bf16>
//   math:    per row r with target t: lse[r] = log Σ_j exp(x[r,j]),
//            loss[r] = lse[r] − x[r,t] (0 when the row is ignored);
//            bwd only: x[r,j] ← s·(exp(x[r,j] − lse[r]) − [j = t]), exactly 0 on ignored rows.
//            A row is ignored when its target is −100 or, defensively, any value outside [0, V)
//            (the host validates targets; a bad one must not turn into an out-of-bounds access).
//   layout:  logits (N, V) T row-major, overwritten in place by dlogits in bwd; targets (N) i32;
//            loss (N) f32; lse (N) f32.
//   launch:  grid (N), one block per row; blockDim a multiple of 32, at most 1024, chosen by the
//            launcher from V. The row is split into a scalar head (up to the first 16-byte
//            boundary), 16-byte vectors, and a scalar tail, so any V and any row offset work.
//   passes:  (1) one read of the row keeping a per-thread running max m and Σ exp(x − m),
//            rescaled when the max grows; block max, then every partial sum rescaled to the
//            block max and block-summed. (2) bwd only: a second read writing the gradient, with
//            streaming loads and stores (last use of the row). The target element is written
//            last by thread 0 from the logit it read before pass 2 began.
//   accum:   f32 throughout; exp as ex2.approx of (x − ref)·log2 e, with the difference taken
//            first so that the terms that matter (x near the max) keep full precision.
#include "common.cuh"

namespace {

constexpr float LOG2E = 1.4426950408889634f;
constexpr int MAX_THREADS = 1024;

// 2^x; results below the smallest normal flush to 0, which no sum or gradient here can tell
// from their true value.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// 16 bytes of T as floats, and back (round to nearest even for bf16).
template <typename T> struct Pack;

template <> struct Pack<float> {
    static constexpr int N = 4;
    __device__ static __forceinline__ void unpack(const uint4& u, float* f) {
        f[0] = __uint_as_float(u.x);
        f[1] = __uint_as_float(u.y);
        f[2] = __uint_as_float(u.z);
        f[3] = __uint_as_float(u.w);
    }
    __device__ static __forceinline__ uint4 pack(const float* f) {
        return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
    }
};

template <> struct Pack<__nv_bfloat16> {
    static constexpr int N = 8;
    // bf16 is the top half of an f32: widening is a shift.
    __device__ static __forceinline__ void unpack2(unsigned w, float* f) {
        f[0] = __uint_as_float(w << 16);
        f[1] = __uint_as_float(w & 0xffff0000u);
    }
    __device__ static __forceinline__ unsigned pack2(float lo, float hi) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const unsigned*>(&h);
    }
    __device__ static __forceinline__ void unpack(const uint4& u, float* f) {
        unpack2(u.x, f);
        unpack2(u.y, f + 2);
        unpack2(u.z, f + 4);
        unpack2(u.w, f + 6);
    }
    __device__ static __forceinline__ uint4 pack(const float* f) {
        return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
    }
};

// A row of V elements as [0, head) scalars, nvec 16-byte vectors from head, and scalars from
// tail. head and V − tail are each below Pack<T>::N.
struct RowSplit {
    int head, nvec, tail;
    __device__ int scalars(int v) const { return head + (v - tail); }
    // The element index of the j-th scalar, j < scalars(v).
    __device__ int scalar_index(int j) const { return j < head ? j : tail + (j - head); }
};

template <typename T> __device__ __forceinline__ RowSplit split_row(const T* row, int v) {
    constexpr int N = Pack<T>::N;
    // Rows start on an element boundary, so the misalignment is a whole number of elements.
    const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(row) & 15) / sizeof(T));
    const int head = mis == 0 ? 0 : min(N - mis, v);
    const int nvec = (v - head) / N;
    return RowSplit{head, nvec, head + nvec * N};
}

// Folds K logits into the running (max m, Σ exp(x − m)) pair.
template <int K> __device__ __forceinline__ void online_add(float& m, float& s, const float* x) {
    float lm = x[0];
#pragma unroll
    for (int i = 1; i < K; ++i) lm = fmaxf(lm, x[i]);
    if (lm > m) {
        // From m = −inf (nothing seen yet) the factor is 0 and s stays 0.
        s *= exp2_approx((m - lm) * LOG2E);
        m = lm;
    }
#pragma unroll
    for (int i = 0; i < K; ++i) s += exp2_approx((x[i] - m) * LOG2E);
}

template <int K> __device__ __forceinline__ void grad(float* x, float lse, float scale) {
#pragma unroll
    for (int i = 0; i < K; ++i) x[i] = scale * exp2_approx((x[i] - lse) * LOG2E);
}

template <typename T, bool GRAD>
__device__ __forceinline__ void cross_entropy(T* __restrict__ logits, const int* __restrict__ targets,
                                              float* __restrict__ loss, float* __restrict__ lse, int v, float scale) {
    using P = Pack<T>;
    constexpr int N = P::N;
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    const int tid = threadIdx.x, nt = blockDim.x;
    T* row = logits + static_cast<size_t>(r) * v;
    const int t = targets[r];
    const bool counted = t >= 0 && t < v;
    // Read before any thread of the block can reach pass 2 (the block reductions below are
    // barriers), since pass 2 overwrites the row.
    const float xt = (tid == 0 && counted) ? to_f32(row[t]) : 0.f;

    const RowSplit sp = split_row(row, v);
    const uint4* vec = reinterpret_cast<const uint4*>(row + sp.head);
    float m = -INFINITY, s = 0.f;
    if (tid < sp.scalars(v)) {
        const float x = to_f32(row[sp.scalar_index(tid)]);
        online_add<1>(m, s, &x);
    }
    int k = tid;
    // Two vectors in flight per thread.
    for (; k + nt < sp.nvec; k += 2 * nt) {
        const uint4 a = vec[k], b = vec[k + nt];
        float x[2 * N];
        P::unpack(a, x);
        P::unpack(b, x + N);
        online_add<2 * N>(m, s, x);
    }
    if (k < sp.nvec) {
        float x[N];
        P::unpack(vec[k], x);
        online_add<N>(m, s, x);
    }

    const float mx = block_max(m, scratch);
    // A thread that saw nothing has s = 0 (and m = −inf, which must not meet mx in a NaN).
    const float part = s == 0.f ? 0.f : s * exp2_approx((m - mx) * LOG2E);
    const float l = mx + logf(block_sum(part, scratch));
    if (tid == 0) {
        lse[r] = l;
        loss[r] = counted ? l - xt : 0.f;
    }
    if (!GRAD) return;

    uint4* out = reinterpret_cast<uint4*>(row + sp.head);
    if (!counted) {
        if (tid < sp.scalars(v)) row[sp.scalar_index(tid)] = from_f32<T>(0.f);
        for (int j = tid; j < sp.nvec; j += nt) out[j] = make_uint4(0u, 0u, 0u, 0u);
        return;
    }
    if (tid < sp.scalars(v)) {
        const int i = sp.scalar_index(tid);
        float x = to_f32(row[i]);
        grad<1>(&x, l, scale);
        row[i] = from_f32<T>(x);
    }
    k = tid;
    for (; k + nt < sp.nvec; k += 2 * nt) {
        const uint4 a = __ldcs(out + k), b = __ldcs(out + k + nt);
        float x[2 * N];
        P::unpack(a, x);
        P::unpack(b, x + N);
        grad<2 * N>(x, l, scale);
        __stcs(out + k, P::pack(x));
        __stcs(out + k + nt, P::pack(x + N));
    }
    if (k < sp.nvec) {
        float x[N];
        P::unpack(__ldcs(out + k), x);
        grad<N>(x, l, scale);
        __stcs(out + k, P::pack(x));
    }
    // The loop wrote softmax at the target like everywhere else; subtract the one-hot there,
    // after every other write of the block, in the reference's order: scale·p − scale.
    __syncthreads();
    if (tid == 0) row[t] = from_f32<T>(scale * exp2_approx((xt - l) * LOG2E) - scale);
}

}  // namespace

GM_KERNEL void __launch_bounds__(MAX_THREADS)
    cross_entropy_fwd_f32(float* logits, const int* targets, float* loss, float* lse, int v, float scale) {
    cross_entropy<float, false>(logits, targets, loss, lse, v, scale);
}

GM_KERNEL void __launch_bounds__(MAX_THREADS)
    cross_entropy_fwd_bf16(__nv_bfloat16* logits, const int* targets, float* loss, float* lse, int v, float scale) {
    cross_entropy<__nv_bfloat16, false>(logits, targets, loss, lse, v, scale);
}

GM_KERNEL void __launch_bounds__(MAX_THREADS)
    cross_entropy_bwd_f32(float* logits, const int* targets, float* loss, float* lse, int v, float scale) {
    cross_entropy<float, true>(logits, targets, loss, lse, v, scale);
}

GM_KERNEL void __launch_bounds__(MAX_THREADS)
    cross_entropy_bwd_bf16(__nv_bfloat16* logits, const int* targets, float* loss, float* lse, int v, float scale) {
    cross_entropy<__nv_bfloat16, true>(logits, targets, loss, lse, v, scale);
}
