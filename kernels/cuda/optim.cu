// The optimizer's kernels: AdamW over flat f32 vectors, Σ x² for the gradient norm, and scaling.
//
// adamw_step_f32
//   math:    torch's single-tensor AdamW, operation for operation (gristmill_core adamw_step_ref):
//              g ← g·grad_mul                    (the clip factor; 1 when not clipping)
//              p ← p·decay                       decay = 1 − lr·wd
//              m ← m + w1·(g − m)                if lerp_from_start (w1 = 1 − β1 < 0.5)
//                  g − (g − m)·(1 − w1)          otherwise (torch's lerp switches formula)
//              v ← v·β2 + (w2·g)·g               w2 = 1 − β2
//              p ← p + neg_step·(m / (√v / √bc2 + eps))
//            The scalar factors are computed on the host in f64 as the reference does and
//            rounded once to f32. Every operation is an explicitly rounded intrinsic: nvcc would
//            otherwise contract a·b + c into an fma and the result would no longer be bit-exact.
//   layout:  p, g, m, v: (n) f32; p, m, v updated in place.
//   launch:  1-D grid-stride; 16-byte vectors when all four buffers are 16-byte aligned (then
//            the last n mod 4 elements go one per thread), one element per thread otherwise.
//   accum:   none (elementwise f32, as the reference).
//
// sum_squares_f32, sum_squares_finish_f32
//   math:    out[0] = Σ x[i]², deterministic: a fixed split that depends only on n, no atomics.
//   layout:  x (n) f32; partial (G) f64 scratch; out (1) f32.
//   launch:  sum_squares: G blocks (G chosen by the launcher from n) of 256 threads,
//            grid-stride over 16-byte vectors (scalars for the unaligned head and the tail, taken
//            by block 0), each block's sum written to partial[block]. sum_squares_finish: one
//            block of 256 threads summing the G partials in a fixed order.
//   accum:   each vector's four squares summed in f32, then f64 per thread, per block and across
//            blocks.
//
// scale_f32
//   math:    x[i] ← x[i]·s.
//   layout:  x (n) f32 in place.
//   launch:  1-D grid-stride over 16-byte vectors (scalar head and tail), as above.
#include "common.cuh"

namespace {

struct AdamW {
    float decay, w1, one_minus_w1, b2, w2, bc2_sqrt, neg_step, eps, grad_mul;
    bool lerp_from_start;

    __device__ __forceinline__ void update(float& p, float g, float& m, float& v) const {
        const float gi = __fmul_rn(g, grad_mul);
        p = __fmul_rn(p, decay);
        m = lerp_from_start ? __fadd_rn(m, __fmul_rn(w1, __fsub_rn(gi, m)))
                            : __fsub_rn(gi, __fmul_rn(__fsub_rn(gi, m), one_minus_w1));
        v = __fadd_rn(__fmul_rn(v, b2), __fmul_rn(__fmul_rn(w2, gi), gi));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), eps);
        p = __fadd_rn(p, __fmul_rn(neg_step, __fdiv_rn(m, denom)));
    }
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Elements before the first 16-byte boundary of an f32 buffer, at most n.
__device__ __forceinline__ long long head_len(const float* x, long long n) {
    const long long mis = static_cast<long long>((reinterpret_cast<uintptr_t>(x) & 15) / sizeof(float));
    return mis == 0 ? 0 : min(4 - mis, n);
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block in f64, the result valid in thread 0; blockDim.x a multiple of 32.
__device__ __forceinline__ double block_sum_f64(double v) {
    __shared__ double scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum_f64(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0;
    return warp_sum_f64(v);
}

}  // namespace

GM_KERNEL void __launch_bounds__(256)
    adamw_step_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                   int n, float decay, float w1, float one_minus_w1, float b2, float w2, float bc2_sqrt,
                   float neg_step, float eps, float grad_mul, int lerp_from_start) {
    const AdamW a{decay, w1, one_minus_w1, b2, w2, bc2_sqrt, neg_step, eps, grad_mul, lerp_from_start != 0};
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    long long scalar_from = 0;
    if (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v)) {
        const long long nvec = n / 4;
        float4* p4 = reinterpret_cast<float4*>(p);
        const float4* g4 = reinterpret_cast<const float4*>(g);
        float4* m4 = reinterpret_cast<float4*>(m);
        float4* v4 = reinterpret_cast<float4*>(v);
        for (long long k = first; k < nvec; k += stride) {
            float4 pk = p4[k], mk = m4[k], vk = v4[k];
            const float4 gk = g4[k];
            a.update(pk.x, gk.x, mk.x, vk.x);
            a.update(pk.y, gk.y, mk.y, vk.y);
            a.update(pk.z, gk.z, mk.z, vk.z);
            a.update(pk.w, gk.w, mk.w, vk.w);
            p4[k] = pk;
            m4[k] = mk;
            v4[k] = vk;
        }
        scalar_from = nvec * 4;
    }
    for (long long i = scalar_from + first; i < n; i += stride) a.update(p[i], g[i], m[i], v[i]);
}

GM_KERNEL void __launch_bounds__(256) sum_squares_f32(const float* __restrict__ x, int n, double* __restrict__ partial) {
    const long long head = head_len(x, n);
    const long long nvec = (n - head) / 4;
    const long long tail = head + nvec * 4;
    double acc = 0.0;
    if (blockIdx.x == 0) {
        // At most 3 + 3 scalars, one per thread.
        const long long j = threadIdx.x;
        if (j < head) acc += static_cast<double>(x[j] * x[j]);
        if (j < n - tail) acc += static_cast<double>(x[tail + j] * x[tail + j]);
    }
    const float4* x4 = reinterpret_cast<const float4*>(x + head);
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long k = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; k < nvec; k += stride) {
        const float4 q = x4[k];
        acc += static_cast<double>(q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w);
    }
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

GM_KERNEL void __launch_bounds__(256)
    sum_squares_finish_f32(const double* __restrict__ partial, int blocks, float* __restrict__ out) {
    double acc = 0.0;
    for (int b = threadIdx.x; b < blocks; b += blockDim.x) acc += partial[b];
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) out[0] = static_cast<float>(acc);
}

GM_KERNEL void __launch_bounds__(256) scale_f32(float* __restrict__ x, int n, float s) {
    const long long head = head_len(x, n);
    const long long nvec = (n - head) / 4;
    const long long tail = head + nvec * 4;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (first < head) x[first] *= s;
    if (first < n - tail) x[tail + first] *= s;
    float4* x4 = reinterpret_cast<float4*>(x + head);
    for (long long k = first; k < nvec; k += stride) {
        float4 q = x4[k];
        q.x *= s;
        q.y *= s;
        q.z *= s;
        q.w *= s;
        x4[k] = q;
    }
}
