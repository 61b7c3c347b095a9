// convert: element type conversions between f32 and bf16.
//
// cast_fwd_<from>_<to>: y[i] = convert(x[i]) for i < n; f32 → bf16 rounds to nearest even (as
// torch's .to(torch.bfloat16) and half::bf16::from_f32), bf16 → f32 is exact.
// Layout: flat (n) vectors. Geometry: a grid-stride loop, 256 threads a block, 8 elements a thread
// per 16-byte (bf16) / 32-byte (f32) chunk when both pointers are 16-byte aligned, one element
// otherwise. No arithmetic beyond the conversion.
#include "common.cuh"

template <typename S, typename D>
__device__ void cast(const S* __restrict__ x, D* __restrict__ y, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long t0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) & 15) == 0;
    long long done = 0;
    if (vec) {
        const long long chunks = n / 8;
        for (long long c = t0; c < chunks; c += stride) {
            float v[8];
            if (sizeof(S) == 4) {
                const float4* p = reinterpret_cast<const float4*>(x) + 2 * c;
                float4 a = p[0], b = p[1];
                v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
            } else {
                uint4 a = reinterpret_cast<const uint4*>(x)[c];
                const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&a);
#pragma unroll
                for (int j = 0; j < 8; j++) v[j] = __bfloat162float(h[j]);
            }
            if (sizeof(D) == 4) {
                float4* q = reinterpret_cast<float4*>(y) + 2 * c;
                q[0] = make_float4(v[0], v[1], v[2], v[3]);
                q[1] = make_float4(v[4], v[5], v[6], v[7]);
            } else {
                uint4 a;
                __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(&a);
#pragma unroll
                for (int j = 0; j < 8; j++) h[j] = __float2bfloat16_rn(v[j]);
                reinterpret_cast<uint4*>(y)[c] = a;
            }
        }
        done = chunks * 8;
    }
    for (long long i = done + t0; i < n; i += stride) y[i] = from_f32<D>(to_f32(x[i]));
}

GM_KERNEL void cast_fwd_f32_bf16(const float* x, __nv_bfloat16* y, long long n) { cast(x, y, n); }
GM_KERNEL void cast_fwd_bf16_f32(const __nv_bfloat16* x, float* y, long long n) { cast(x, y, n); }
