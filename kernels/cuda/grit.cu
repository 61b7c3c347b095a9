// The GRIT optimizer's kernels: K-FAC statistics in the LoRA rank space, their damped inverses,
// batched eigendecompositions, rank projectors, and rank-space products over the flat LoRA layout.
// r is the LoRA rank (1 ≤ r ≤ 64); S the number of adapted modules (slots). Everything is f32
// math; no kernel uses float atomics, so every result is the same bit for bit run to run.
//
// kfac_gram_{f32,bf16}, kfac_gram_finish_f32
//   math:    su += Σ_t w_t u_t u_tᵀ, sv += Σ_t w_t v_t v_tᵀ (entry (i, j) accumulates
//            w_t·(x_ti·x_tj), so both triangles get the same bits: the outputs are exactly
//            symmetric).
//   layout:  u, v: (M, r) T row-major; w: (M) f32; partial: (G, 2r²) f32 scratch; su, sv: (r, r)
//            f32, accumulated (+=).
//   launch:  kfac_gram: G blocks (G a function of M alone, chosen by the launcher) of
//            min(1024, 2r² rounded up to a warp) threads. Rows go in tiles of 64 (staged in shared
//            memory as f32); block c takes tiles c, c + G, ...; thread k owns entries
//            k, k + blockDim, ... (≤ 8) of the 2r² outputs and sums its tiles in order.
//            kfac_gram_finish: one thread per output entry adds the G partials in block order.
//   accum:   f32 throughout.
//
// kfac_damped_inverse_f32
//   math:    gristmill_core::linalg::kfac_damped_inverses, step for step: symmetrize Σa and Σg,
//            λ0 = max(λ, 1e-6); for m in {1, 3, 10, 30, 100, 300}: λm = λ0·m, Cholesky of Σ + λm·I
//            (left-looking, fails at a pivot that is ≤ 0 or not finite), L⁻¹ by forward
//            substitution, (Σ + λm·I)⁻¹ = L⁻ᵀ L⁻¹ (fails when not finite); Σg is tried only when
//            Σa succeeded; the first rung where both succeed wins.
//   outputs: slots with samples < min_samples (or NaN) are skipped: inverses untouched,
//            lambda_used = 0. On success lambda_used = λm. When every rung fails (a factor with an
//            eigenvalue below −300·λ0, or non-finite entries) lambda_used = −1 and both inverses are
//            I/(300·λ0): the preconditioner degrades to a plain rescale, which AdamW undoes.
//   layout:  sa, sg, inv_a, inv_g: (S, r, r) f32; samples, lambda_used: (S) f32.
//   launch:  one block of 128 threads per slot; L and L⁻¹ in shared memory.
//
// eigh_jacobi_f32
//   math:    gristmill_core::linalg::eigh_jacobi in f32: symmetrize, cyclic Jacobi with pairs
//            (p, q), p < q, row-cyclic, the same rotation formulas; before each sweep stop when the
//            off-diagonal Frobenius norm is 0 or ≤ tol·‖A‖_F; then sort descending (stable).
//   layout:  a: (S, r, r); values: (S, r) descending; vectors: (S, r, r) row-major, column j the
//            unit eigenvector of values[j]; info: (S) i32 = sweeps done, −1 when max_sweeps were
//            not enough (the current diagonal and vectors are written anyway), −2 when the input
//            has a non-finite entry or its squared norm overflows (values and vectors NaN).
//   launch:  one warp per matrix; the matrix and V in shared memory; every lane computes the
//            rotation, the lanes update rows k = lane, lane + 32.
//   accum:   f32; the norms are warp-reduced (the reference sums in order: the stopping test may
//            fall one sweep apart on a borderline matrix).
//
// rank_projector_f32
//   math:    per slot k = clamp(k_fixed, 1, r) (mode 0), rank_for_energy(values, threshold,
//            min_rank, r) (mode 1, the reference's f32 sums in its order: bit-exact), or
//            clamp(k_given[s], 1, r) (mode 2); P = V_k V_kᵀ, exactly symmetric.
//   layout:  values: (S, r); vectors: (S, r, r) as eigh_jacobi writes them; proj: (S, r, r);
//            k_out, k_given: (S) i32.
//   launch:  one block of 128 threads per slot.
//
// rank_apply_r{16,32,64}_f32 (the largest r each handles)
//   math:    per slot s, M = α·(c1·L1_s + c2·L2_s + c3·I) (A side) or α·(c1·R1_s + c2·R2_s + c3·I)
//            (B side), a null matrix pointer meaning 0:
//              A side: Y_A ← β·Y_A + M·X_A       X_A, Y_A: (r, K_s) row-major at a_off[s]
//              B side: Y_B ← β·Y_B + X_B·M       X_B, Y_B: (N_s, r) row-major at b_off[s]
//            β = 0 does not read Y (it may hold anything).
//   layout:  x, y: the flat LoRA buffers (they may be the same buffer: in place); a_off, b_off:
//            (S) i64; k_dim, n_dim: (S) i32; L1, L2, R1, R2: (S, r, r); tasks: (blocks, 4) i32 =
//            (slot, side 0 = A / 1 = B, first column or row, 0), built once on the host.
//   launch:  one block of 128 threads per task; a thread owns one column of A or one row of B and
//            reads all of it into registers before writing any of it (what makes x = y safe:
//            the host checks that slots do not overlap); M staged in shared memory.
//
// rank_quadratic_r{16,32,64}_f32, rank_quadratic_finish_f32
//   math:    per slot: [tr(AᵀΣaA), tr(BΣgBᵀ), ‖(I − Pa)A‖², ‖B(I − Pg)‖²] = sums over the columns
//            x of A of xᵀΣa x and ‖x − Pa x‖², and over the rows b of B of b Σg bᵀ and
//            ‖b − b Pg‖².
//   layout:  x: flat LoRA buffer; sa, pa, sg, pg: (S, r, r); partial: (blocks, 2) f32 scratch;
//            slot_blocks: (S, 4) i32 = (first A task, A tasks, first B task, B tasks); out: (S, 4).
//   launch:  the rank_apply tasks; each block reduces its two sums in a fixed tree; the finish
//            kernel (one thread per slot) adds a slot's block sums in task order, in f64.
//
// grit_sanitize_f32
//   math:    x ← 0 where x is NaN or ±inf, else clamp(x, −c, c) (the preconditioned gradient's
//            clean-up before AdamW).
//   layout:  x: (n) f32, in place.
//   launch:  grid-stride, one element per thread per step.
#include "common.cuh"

namespace {

constexpr int MAX_R = 64;
constexpr int GRAM_TILE = 64;
// Entries of the 2r² gram outputs one thread owns at most: 2·64² / 1024.
constexpr int GRAM_MAX_E = 8;
constexpr int INV_THREADS = 128;
constexpr int APPLY_THREADS = 128;
// The damping ladder of gristmill_core::linalg (DAMPING_LADDER, MIN_DAMPING).
constexpr int LADDER_LEN = 6;
__constant__ float LADDER[LADDER_LEN] = {1.f, 3.f, 10.f, 30.f, 100.f, 300.f};
constexpr float MIN_DAMPING = 1e-6f;
// rank_for_energy's "no signal" trace.
constexpr float RANK_MIN_TRACE = 1e-6f;

template <typename T>
__device__ __forceinline__ void gram_partial(const T* __restrict__ u, const T* __restrict__ v,
                                             const float* __restrict__ w, int m, int r,
                                             float* __restrict__ partial) {
    __shared__ float su[GRAM_TILE * MAX_R];
    __shared__ float sv[GRAM_TILE * MAX_R];
    __shared__ float sw[GRAM_TILE];
    const int rr = r * r, total = 2 * rr;
    float acc[GRAM_MAX_E];
#pragma unroll
    for (int k = 0; k < GRAM_MAX_E; ++k) acc[k] = 0.f;
    const int ntiles = (m + GRAM_TILE - 1) / GRAM_TILE;
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int row0 = tile * GRAM_TILE;
        const int rows = min(GRAM_TILE, m - row0);
        __syncthreads();  // the previous tile has been read by every thread
        const long long base = static_cast<long long>(row0) * r;
        for (int idx = threadIdx.x; idx < rows * r; idx += blockDim.x) {
            su[idx] = to_f32(u[base + idx]);
            sv[idx] = to_f32(v[base + idx]);
        }
        for (int t = threadIdx.x; t < rows; t += blockDim.x) sw[t] = w[row0 + t];
        __syncthreads();
#pragma unroll
        for (int k = 0; k < GRAM_MAX_E; ++k) {
            const int e = threadIdx.x + k * blockDim.x;
            if (e < total) {
                const bool second = e >= rr;
                const int f = second ? e - rr : e;
                const int i = f / r, j = f - (f / r) * r;
                const float* x = second ? sv : su;
                float a = acc[k];
                for (int t = 0; t < rows; ++t) a = __fmaf_rn(sw[t], __fmul_rn(x[t * r + i], x[t * r + j]), a);
                acc[k] = a;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < GRAM_MAX_E; ++k) {
        const int e = threadIdx.x + k * blockDim.x;
        if (e < total) partial[static_cast<long long>(blockIdx.x) * total + e] = acc[k];
    }
}

// The symmetrized entry (i, j) of an (r, r) matrix, as gristmill_core::linalg::symmetrize leaves it.
__device__ __forceinline__ float sym_entry(const float* a, int r, int i, int j) {
    if (i == j) return a[i * r + i];
    return __fmul_rn(__fadd_rn(a[i * r + j], a[j * r + i]), 0.5f);
}

// Inverts sym(src) + lam·I into dst (global, (r, r)) through Cholesky, as spd_inverse does.
// Returns (in every thread) whether it worked. l, li: (r, r) shared scratch.
__device__ bool damped_inverse(const float* src, int r, float lam, float* l, float* li, float* dst) {
    __shared__ int ok;
    __shared__ float pivot;
    __syncthreads();  // every thread is done with l, li and ok of the previous attempt
    for (int e = threadIdx.x; e < r * r; e += blockDim.x) {
        const int i = e / r, j = e - (e / r) * r;
        if (i >= j) l[e] = i == j ? __fadd_rn(sym_entry(src, r, i, i), lam) : sym_entry(src, r, i, j);
    }
    if (threadIdx.x == 0) ok = 1;
    __syncthreads();
    // Left-looking Cholesky, in place in the lower triangle of l.
    for (int j = 0; j < r; ++j) {
        if (threadIdx.x == 0) {
            float d = l[j * r + j];
            for (int k = 0; k < j; ++k) d -= l[j * r + k] * l[j * r + k];
            const bool usable = d > 0.f && isfinite(d);
            if (!usable) ok = 0;
            pivot = usable ? sqrtf(d) : 1.f;
            l[j * r + j] = pivot;
        }
        __syncthreads();
        if (!ok) return false;
        const float ljj = pivot;
        for (int i = j + 1 + threadIdx.x; i < r; i += blockDim.x) {
            float s = l[i * r + j];
            for (int k = 0; k < j; ++k) s -= l[i * r + k] * l[j * r + k];
            l[i * r + j] = s / ljj;
        }
        __syncthreads();
    }
    // L⁻¹, one column per thread: column j solves L x = e_j.
    for (int j = threadIdx.x; j < r; j += blockDim.x) {
        li[j * r + j] = 1.f / l[j * r + j];
        for (int i = j + 1; i < r; ++i) {
            float s = 0.f;
            for (int k = j; k < i; ++k) s += l[i * r + k] * li[k * r + j];
            li[i * r + j] = -s / l[i * r + i];
        }
    }
    __syncthreads();
    // (L⁻ᵀ L⁻¹)[i][j] = Σ_{k ≥ j} L⁻¹[k][i] L⁻¹[k][j] for i ≤ j, mirrored.
    int finite = 1;
    for (int e = threadIdx.x; e < r * r; e += blockDim.x) {
        const int i = e / r, j = e - (e / r) * r;
        if (i > j) continue;
        float s = 0.f;
        for (int k = j; k < r; ++k) s += li[k * r + i] * li[k * r + j];
        finite &= isfinite(s) ? 1 : 0;
        dst[i * r + j] = s;
        dst[j * r + i] = s;
    }
    return __syncthreads_and(finite) != 0;
}

template <int RM>
__device__ __forceinline__ void load_row(const float* p, int r, float (&x)[RM]) {
    if ((r & 3) == 0 && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
#pragma unroll
        for (int l = 0; l < RM; l += 4) {
            if (l < r) {
                const float4 q = *reinterpret_cast<const float4*>(p + l);
                x[l] = q.x;
                x[l + 1] = q.y;
                x[l + 2] = q.z;
                x[l + 3] = q.w;
            }
        }
    } else {
#pragma unroll
        for (int l = 0; l < RM; ++l)
            if (l < r) x[l] = p[l];
    }
}

// Loads the (r, r) matrix m_s (or 0 when null) scaled: dst = f·m_s + g·m2_s + h·I, into shared memory.
__device__ __forceinline__ void stage_matrix(float* dst, int r, long long slot, const float* m1, const float* m2,
                                             float c1, float c2, float c3, float alpha) {
    const long long off = slot * r * r;
    for (int e = threadIdx.x; e < r * r; e += blockDim.x) {
        float s = 0.f;
        if (m1) s = __fmul_rn(c1, m1[off + e]);
        if (m2) s = __fadd_rn(s, __fmul_rn(c2, m2[off + e]));
        if (e / r == e - (e / r) * r) s = __fadd_rn(s, c3);
        dst[e] = __fmul_rn(alpha, s);
    }
}

// x and y may alias: no __restrict__ on them.
template <int RM>
__device__ __forceinline__ void rank_apply_body(const int4* __restrict__ tasks, const long long* __restrict__ a_off,
                                                const long long* __restrict__ b_off, const int* __restrict__ k_dim,
                                                const int* __restrict__ n_dim, int r, const float* x, float* y,
                                                const float* __restrict__ l1, const float* __restrict__ l2,
                                                const float* __restrict__ r1, const float* __restrict__ r2,
                                                float c1, float c2, float c3, float alpha, float beta) {
    __shared__ float mat[RM * RM];
    // The output loop is unrolled at r ≤ 16 only: fully unrolled at 64 it would be 4096 guarded
    // fused multiply-adds per path, megabytes of PTX for the driver to compile.
    constexpr int OUTER_UNROLL = RM <= 16 ? RM : 1;
    const int4 task = tasks[blockIdx.x];
    const int slot = task.x;
    const bool side_a = task.y == 0;
    stage_matrix(mat, r, slot, side_a ? l1 : r1, side_a ? l2 : r2, c1, c2, c3, alpha);
    __syncthreads();
    float xv[RM];
    if (side_a) {
        const int kd = k_dim[slot];
        const int j = task.z + threadIdx.x;
        if (j >= kd) return;
        const long long base = a_off[slot] + j;
#pragma unroll
        for (int l = 0; l < RM; ++l)
            if (l < r) xv[l] = x[base + static_cast<long long>(l) * kd];
#pragma unroll OUTER_UNROLL
        for (int i = 0; i < r; ++i) {
            float acc = 0.f;
#pragma unroll
            for (int l = 0; l < RM; ++l)
                if (l < r) acc = __fmaf_rn(mat[i * r + l], xv[l], acc);
            const long long o = base + static_cast<long long>(i) * kd;
            y[o] = beta == 0.f ? acc : __fmaf_rn(beta, y[o], acc);
        }
    } else {
        const int nd = n_dim[slot];
        const int n = task.z + threadIdx.x;
        if (n >= nd) return;
        const long long base = b_off[slot] + static_cast<long long>(n) * r;
        load_row<RM>(x + base, r, xv);
        // x is all in registers: y may now be written (in place included), four entries at a time
        // where 16-byte stores are possible.
        float* yp = y + base;
        if ((r & 3) == 0 && (reinterpret_cast<uintptr_t>(yp) & 15) == 0) {
#pragma unroll OUTER_UNROLL
            for (int j = 0; j < r; j += 4) {
                {
                    float o[4];
#pragma unroll
                    for (int d = 0; d < 4; ++d) {
                        float acc = 0.f;
#pragma unroll
                        for (int l = 0; l < RM; ++l)
                            if (l < r) acc = __fmaf_rn(xv[l], mat[l * r + j + d], acc);
                        o[d] = acc;
                    }
                    if (beta != 0.f) {
                        const float4 old = *reinterpret_cast<const float4*>(yp + j);
                        o[0] = __fmaf_rn(beta, old.x, o[0]);
                        o[1] = __fmaf_rn(beta, old.y, o[1]);
                        o[2] = __fmaf_rn(beta, old.z, o[2]);
                        o[3] = __fmaf_rn(beta, old.w, o[3]);
                    }
                    *reinterpret_cast<float4*>(yp + j) = make_float4(o[0], o[1], o[2], o[3]);
                }
            }
        } else {
#pragma unroll OUTER_UNROLL
            for (int j = 0; j < r; ++j) {
                {
                    float acc = 0.f;
#pragma unroll
                    for (int l = 0; l < RM; ++l)
                        if (l < r) acc = __fmaf_rn(xv[l], mat[l * r + j], acc);
                    yp[j] = beta == 0.f ? acc : __fmaf_rn(beta, yp[j], acc);
                }
            }
        }
    }
}

template <int RM>
__device__ __forceinline__ void rank_quadratic_body(const int4* __restrict__ tasks,
                                                    const long long* __restrict__ a_off,
                                                    const long long* __restrict__ b_off,
                                                    const int* __restrict__ k_dim, const int* __restrict__ n_dim,
                                                    int r, const float* __restrict__ x, const float* __restrict__ sa,
                                                    const float* __restrict__ pa, const float* __restrict__ sg,
                                                    const float* __restrict__ pg, float* __restrict__ partial) {
    __shared__ float sig[RM * RM];
    __shared__ float proj[RM * RM];
    __shared__ float scratch[32];
    constexpr int OUTER_UNROLL = RM <= 16 ? RM : 1;
    const int4 task = tasks[blockIdx.x];
    const int slot = task.x;
    const bool side_a = task.y == 0;
    const long long off = static_cast<long long>(slot) * r * r;
    const float* s_src = side_a ? sa : sg;
    const float* p_src = side_a ? pa : pg;
    for (int e = threadIdx.x; e < r * r; e += blockDim.x) {
        sig[e] = s_src[off + e];
        proj[e] = p_src[off + e];
    }
    __syncthreads();
    float xv[RM];
    bool active;
    const float* xp = x;  // the thread's column of A (stride K) or row of B (stride 1)
    long long xs = 1;
    if (side_a) {
        const int kd = k_dim[slot];
        const int j = task.z + threadIdx.x;
        active = j < kd;
        if (active) {
            xp = x + a_off[slot] + j;
            xs = kd;
#pragma unroll
            for (int l = 0; l < RM; ++l)
                if (l < r) xv[l] = xp[static_cast<long long>(l) * kd];
        }
    } else {
        const int nd = n_dim[slot];
        const int n = task.z + threadIdx.x;
        active = n < nd;
        if (active) {
            xp = x + b_off[slot] + static_cast<long long>(n) * r;
            load_row<RM>(xp, r, xv);
        }
    }
    float quad = 0.f, resid = 0.f;
    if (active) {
        // Σ and P are symmetric in use, but A multiplies from the left and B from the right: index
        // them as the products are written.
#pragma unroll OUTER_UNROLL
        for (int i = 0; i < r; ++i) {
            float sx = 0.f, px = 0.f;
#pragma unroll
            for (int l = 0; l < RM; ++l) {
                if (l < r) {
                    const int idx = side_a ? i * r + l : l * r + i;
                    sx = __fmaf_rn(sig[idx], xv[l], sx);
                    px = __fmaf_rn(proj[idx], xv[l], px);
                }
            }
            // x_i again from memory (an L1 hit): a register array indexed by a loop counter that
            // is not unrolled would go to local memory.
            const float xi = xp[static_cast<long long>(i) * xs];
            quad = __fmaf_rn(xi, sx, quad);
            const float d = __fsub_rn(xi, px);
            resid = __fmaf_rn(d, d, resid);
        }
    }
    quad = block_sum(quad, scratch);
    resid = block_sum(resid, scratch);
    if (threadIdx.x == 0) {
        partial[2 * blockIdx.x] = quad;
        partial[2 * blockIdx.x + 1] = resid;
    }
}

}  // namespace

GM_KERNEL void __launch_bounds__(1024) kfac_gram_f32(const float* __restrict__ u, const float* __restrict__ v,
                                                     const float* __restrict__ w, int m, int r,
                                                     float* __restrict__ partial) {
    gram_partial<float>(u, v, w, m, r, partial);
}

GM_KERNEL void __launch_bounds__(1024) kfac_gram_bf16(const __nv_bfloat16* __restrict__ u,
                                                      const __nv_bfloat16* __restrict__ v,
                                                      const float* __restrict__ w, int m, int r,
                                                      float* __restrict__ partial) {
    gram_partial<__nv_bfloat16>(u, v, w, m, r, partial);
}

GM_KERNEL void __launch_bounds__(256) kfac_gram_finish_f32(const float* __restrict__ partial, int blocks, int r,
                                                           float* __restrict__ su, float* __restrict__ sv) {
    const int rr = r * r, total = 2 * rr;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    float s = 0.f;
    for (int c = 0; c < blocks; ++c) s += partial[static_cast<long long>(c) * total + e];
    float* out = e < rr ? su + e : sv + (e - rr);
    *out = __fadd_rn(*out, s);
}

GM_KERNEL void __launch_bounds__(INV_THREADS)
    kfac_damped_inverse_f32(const float* __restrict__ sa, const float* __restrict__ sg,
                            const float* __restrict__ samples, float min_samples, int r, float lambda,
                            float* __restrict__ inv_a, float* __restrict__ inv_g, float* __restrict__ lambda_used) {
    __shared__ float l[MAX_R * MAX_R];
    __shared__ float li[MAX_R * MAX_R];
    const int s = blockIdx.x;
    const long long off = static_cast<long long>(s) * r * r;
    if (!(samples[s] >= min_samples)) {
        if (threadIdx.x == 0) lambda_used[s] = 0.f;
        return;
    }
    // Real::max(λ, MIN_DAMPING): λ unless the floor is larger.
    const float base = MIN_DAMPING > lambda ? MIN_DAMPING : lambda;
    float lam = base;
    for (int rung = 0; rung < LADDER_LEN; ++rung) {
        lam = __fmul_rn(base, LADDER[rung]);
        if (!damped_inverse(sa + off, r, lam, l, li, inv_a + off)) continue;
        if (!damped_inverse(sg + off, r, lam, l, li, inv_g + off)) continue;
        if (threadIdx.x == 0) lambda_used[s] = lam;
        return;
    }
    const float diag = 1.f / lam;
    for (int e = threadIdx.x; e < r * r; e += blockDim.x) {
        const float val = e / r == e - (e / r) * r ? diag : 0.f;
        inv_a[off + e] = val;
        inv_g[off + e] = val;
    }
    if (threadIdx.x == 0) lambda_used[s] = -1.f;
}

GM_KERNEL void __launch_bounds__(32) eigh_jacobi_f32(const float* __restrict__ a, int r, float tol, int max_sweeps,
                                                     float* __restrict__ values, float* __restrict__ vectors,
                                                     int* __restrict__ info) {
    __shared__ float m[MAX_R * MAX_R];
    __shared__ float vv[MAX_R * MAX_R];
    const int lane = threadIdx.x;
    const long long off = static_cast<long long>(blockIdx.x) * r * r;
    const float* src = a + off;
    int finite = 1;
    float sq = 0.f;
    for (int e = lane; e < r * r; e += 32) {
        const int i = e / r, j = e - (e / r) * r;
        finite &= isfinite(src[e]) ? 1 : 0;
        const float x = sym_entry(src, r, i, j);
        m[e] = x;
        vv[e] = i == j ? 1.f : 0.f;
        sq = __fmaf_rn(x, x, sq);
    }
    const float norm = sqrtf(warp_sum(sq));
    if (!__all_sync(0xffffffffu, finite) || !isfinite(norm)) {
        for (int e = lane; e < r * r; e += 32) vectors[off + e] = NAN;
        for (int i = lane; i < r; i += 32) values[static_cast<long long>(blockIdx.x) * r + i] = NAN;
        if (lane == 0) info[blockIdx.x] = -2;
        return;
    }
    __syncwarp();
    const float threshold = tol * norm;
    const float big_theta = 1.f / 1.1920929e-7f;  // 1/ε: past it θ² + 1 rounds to θ²
    int sweeps = 0, status = 0;
    for (;;) {
        float o = 0.f;
        for (int e = lane; e < r * r; e += 32) {
            const int i = e / r, j = e - (e / r) * r;
            if (i != j) o = __fmaf_rn(m[e], m[e], o);
        }
        const float offn = sqrtf(warp_sum(o));
        if (offn == 0.f || offn <= threshold) break;
        if (sweeps == max_sweeps) {
            status = -1;
            break;
        }
        for (int p = 0; p < r; ++p) {
            for (int q = p + 1; q < r; ++q) {
                const float apq = m[p * r + q];
                if (apq == 0.f) continue;
                const float app = m[p * r + p], aqq = m[q * r + q];
                const float theta = __fdiv_rn(__fmul_rn(__fsub_rn(aqq, app), 0.5f), apq);
                float t;
                if (fabsf(theta) > big_theta) {
                    t = __fdiv_rn(0.5f, theta);
                } else {
                    const float sign = theta < 0.f ? -1.f : 1.f;
                    t = __fdiv_rn(sign, __fadd_rn(fabsf(theta), __fsqrt_rn(__fmaf_rn(theta, theta, 1.f))));
                }
                const float c = __fdiv_rn(1.f, __fsqrt_rn(__fmaf_rn(t, t, 1.f)));
                const float sn = __fmul_rn(t, c);
                __syncwarp();  // every lane has read the pivot entries
                if (lane == 0) {
                    m[p * r + p] = __fsub_rn(app, __fmul_rn(t, apq));
                    m[q * r + q] = __fadd_rn(aqq, __fmul_rn(t, apq));
                    m[p * r + q] = 0.f;
                    m[q * r + p] = 0.f;
                }
                for (int k = lane; k < r; k += 32) {
                    if (k != p && k != q) {
                        const float akp = m[k * r + p], akq = m[k * r + q];
                        const float nkp = __fsub_rn(__fmul_rn(c, akp), __fmul_rn(sn, akq));
                        const float nkq = __fadd_rn(__fmul_rn(sn, akp), __fmul_rn(c, akq));
                        m[k * r + p] = nkp;
                        m[p * r + k] = nkp;
                        m[k * r + q] = nkq;
                        m[q * r + k] = nkq;
                    }
                    const float vkp = vv[k * r + p], vkq = vv[k * r + q];
                    vv[k * r + p] = __fsub_rn(__fmul_rn(c, vkp), __fmul_rn(sn, vkq));
                    vv[k * r + q] = __fadd_rn(__fmul_rn(sn, vkp), __fmul_rn(c, vkq));
                }
                __syncwarp();
            }
        }
        ++sweeps;
    }
    // Stable descending order: rank of i = #{j: d_j > d_i} + #{j < i: d_j = d_i}.
    for (int i = lane; i < r; i += 32) {
        const float di = m[i * r + i];
        int rank = 0;
        for (int j = 0; j < r; ++j) {
            const float dj = m[j * r + j];
            rank += (dj > di || (j < i && dj == di)) ? 1 : 0;
        }
        values[static_cast<long long>(blockIdx.x) * r + rank] = di;
        for (int k = 0; k < r; ++k) vectors[off + k * r + rank] = vv[k * r + i];
    }
    if (lane == 0) info[blockIdx.x] = status < 0 ? status : sweeps;
}

GM_KERNEL void __launch_bounds__(128)
    rank_projector_f32(const float* __restrict__ values, const float* __restrict__ vectors, int r, int mode,
                       int k_fixed, const int* __restrict__ k_given, float threshold, int min_rank,
                       float* __restrict__ proj, int* __restrict__ k_out) {
    __shared__ int ks;
    const int s = blockIdx.x;
    const float* w = values + static_cast<long long>(s) * r;
    const float* v = vectors + static_cast<long long>(s) * r * r;
    if (threadIdx.x == 0) {
        int k;
        if (mode == 0) {
            k = min(max(k_fixed, 1), r);
        } else if (mode == 2) {
            k = min(max(k_given[s], 1), r);
        } else {
            // rank_for_energy(values, threshold, min_rank, r), its f32 sums in its order.
            float trace = 0.f;
            for (int i = 0; i < r; ++i) trace = __fadd_rn(trace, 0.f > w[i] ? 0.f : w[i]);
            if (!(trace > RANK_MIN_TRACE)) {
                k = r;
            } else {
                const float target = __fmul_rn(threshold, trace);
                float cum = 0.f;
                k = r;
                for (int i = 0; i < r; ++i) {
                    cum = __fadd_rn(cum, 0.f > w[i] ? 0.f : w[i]);
                    if (cum >= target) {
                        k = i + 1;
                        break;
                    }
                }
                k = min(max(k, min_rank), r);
            }
        }
        ks = k;
        k_out[s] = k;
    }
    __syncthreads();
    const int k = ks;
    float* p = proj + static_cast<long long>(s) * r * r;
    for (int e = threadIdx.x; e < r * r; e += blockDim.x) {
        const int i = e / r, j = e - (e / r) * r;
        if (i > j) continue;
        float acc = 0.f;
        for (int c = 0; c < k; ++c) acc = __fmaf_rn(v[i * r + c], v[j * r + c], acc);
        p[i * r + j] = acc;
        p[j * r + i] = acc;
    }
}

#define GM_RANK_APPLY(RM)                                                                                          \
    GM_KERNEL void __launch_bounds__(APPLY_THREADS) rank_apply_r##RM##_f32(                                        \
        const int4* __restrict__ tasks, const long long* __restrict__ a_off, const long long* __restrict__ b_off, \
        const int* __restrict__ k_dim, const int* __restrict__ n_dim, int r, const float* x, float* y,           \
        const float* __restrict__ l1, const float* __restrict__ l2, const float* __restrict__ r1,                \
        const float* __restrict__ r2, float c1, float c2, float c3, float alpha, float beta) {                    \
        rank_apply_body<RM>(tasks, a_off, b_off, k_dim, n_dim, r, x, y, l1, l2, r1, r2, c1, c2, c3, alpha, beta); \
    }                                                                                                              \
    GM_KERNEL void __launch_bounds__(APPLY_THREADS) rank_quadratic_r##RM##_f32(                                    \
        const int4* __restrict__ tasks, const long long* __restrict__ a_off, const long long* __restrict__ b_off, \
        const int* __restrict__ k_dim, const int* __restrict__ n_dim, int r, const float* __restrict__ x,        \
        const float* __restrict__ sa, const float* __restrict__ pa, const float* __restrict__ sg,                \
        const float* __restrict__ pg, float* __restrict__ partial) {                                              \
        rank_quadratic_body<RM>(tasks, a_off, b_off, k_dim, n_dim, r, x, sa, pa, sg, pg, partial);              \
    }

GM_RANK_APPLY(16)
GM_RANK_APPLY(32)
GM_RANK_APPLY(64)

GM_KERNEL void __launch_bounds__(128) rank_quadratic_finish_f32(const float* __restrict__ partial,
                                                                const int* __restrict__ slot_blocks, int slots,
                                                                float* __restrict__ out) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= slots) return;
    const int* sb = slot_blocks + 4 * s;
    double qa = 0.0, ra = 0.0, qb = 0.0, rb = 0.0;
    for (int b = sb[0]; b < sb[0] + sb[1]; ++b) {
        qa += partial[2 * b];
        ra += partial[2 * b + 1];
    }
    for (int b = sb[2]; b < sb[2] + sb[3]; ++b) {
        qb += partial[2 * b];
        rb += partial[2 * b + 1];
    }
    out[4 * s] = static_cast<float>(qa);
    out[4 * s + 1] = static_cast<float>(qb);
    out[4 * s + 2] = static_cast<float>(ra);
    out[4 * s + 3] = static_cast<float>(rb);
}

GM_KERNEL void __launch_bounds__(256) grit_sanitize_f32(float* __restrict__ x, long long n, float c) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i];
        x[i] = isfinite(v) ? fminf(fmaxf(v, -c), c) : 0.0f;
    }
}
