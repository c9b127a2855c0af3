// Tensor-core forward of the normalized attention for float16 / bfloat16 (sm_80+): flash-style,
// mma.sync.m16n8k16 with float32 accumulation. Opt-in (cm_kernels.set_cuda_tensor_cores(True) or
// CM_KERNELS_CUDA_MMA=1) until a GPU run of tests/test_cuda.py has validated it; the SIMT kernels of
// attention_kernels.cuh stay the default and do the backward either way.
//
// A block of 4 warps owns 64 query rows of one (batch, head); warp w owns rows 16w .. 16w + 15 and
// keeps them as mma A fragments in registers (q_hat * scale, rounded to T once). Per tile of 64 keys:
//   1. K_hat is staged in shared memory row-major ([key][d], pitch D + 8), V_hat transposed ([d][key],
//      pitch 64 + 8), both rounded to T, normalized and scaled as they are read (row factors from
//      row_factor_kernel, as the SIMT forward);
//   2. S = Q K^T: for each 8-key chunk, D/16 mma's; thread (g = lane / 4, t = lane % 4) holds
//      S[g][2t, 2t+1] and S[g+8][2t, 2t+1] of every chunk (the m16n8 C layout);
//   3. online softmax per row (the quad of 4 threads sharing a row reduces with shuffles); with
//      normalized q, k and d * scale <= 40 the running max is the fixed bound d * scale, as in the
//      SIMT kernels (proof in cpu/attention.cpp);
//   4. P (rounded to T) is re-read as A fragments straight from the S registers (the C layout of
//      two adjacent 8-key chunks is the A layout of one 16-key step) and O += P V_hat with D/8
//      mma's per 16 keys.
// The fragment layouts are the PTX ISA's for mma.m16n8k16 with .f16/.bf16 operands:
//   A (16x16, row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, col):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16x8 f32):   c0, c1 = (g, 2t, 2t+1), c2, c3 = (g+8, 2t, 2t+1)
#pragma once
#include <math.h>
#include <stdint.h>

#include "common.cuh"

namespace cmk {

constexpr int kMmaRows = 64;  // query rows per block (4 warps x 16)
constexpr int kMmaKeys = 64;  // keys per shared-memory tile

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// c += a * b on one m16n8k16 tile, float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // the launcher never selects this path below sm_80
#endif
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

__device__ __forceinline__ uint32_t ld_pair(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <typename T, int D>
__global__ void __launch_bounds__(128) attn_fwd_mma_kernel(CmkAttnParams p, CmkView q, CmkView k, CmkView v,
                                                           CmkMutView out, float* __restrict__ lse,
                                                           const float* __restrict__ fq,
                                                           const float* __restrict__ fk,
                                                           const float* __restrict__ fv) {
  static_assert(D % 16 == 0, "head dim must be a multiple of 16");
  constexpr int KS = D / 16;             // mma k-steps over the head dim (S = Q K^T)
  constexpr int NC = kMmaKeys / 8;       // 8-key chunks per tile
  constexpr int DC = D / 8;              // 8-channel chunks of the output (O += P V)
  constexpr int KP = D + 8;              // sK pitch: rows 16 bytes apart mod 128, conflict-free b loads
  constexpr int VP = kMmaKeys + 8;       // sVt pitch
  __shared__ __align__(16) T sK[kMmaKeys * KP];
  __shared__ __align__(16) T sVt[D * VP];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int64_t r0 = (int64_t)blockIdx.y * kMmaRows + warp * 16 + g, r1 = r0 + 8;  // this thread's two rows
  const bool ok0 = r0 < p.Nq, ok1 = r1 < p.Nq;

  // Q fragments (scale * q_hat, rounded to T) straight from global memory, once.
  uint32_t qa[KS][4];
  {
    const float f0 = ok0 ? fq[bh * p.Nq + r0] : 0.f, f1 = ok1 ? fq[bh * p.Nq + r1] : 0.f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      const int c = kk * 16 + 2 * t;
      const float x00 = ok0 ? ld<T>(q, b, h, r0, c) * f0 : 0.f, x01 = ok0 ? ld<T>(q, b, h, r0, c + 1) * f0 : 0.f;
      const float x10 = ok1 ? ld<T>(q, b, h, r1, c) * f1 : 0.f, x11 = ok1 ? ld<T>(q, b, h, r1, c + 1) * f1 : 0.f;
      const float x02 = ok0 ? ld<T>(q, b, h, r0, c + 8) * f0 : 0.f, x03 = ok0 ? ld<T>(q, b, h, r0, c + 9) * f0 : 0.f;
      const float x12 = ok1 ? ld<T>(q, b, h, r1, c + 8) * f1 : 0.f, x13 = ok1 ? ld<T>(q, b, h, r1, c + 9) * f1 : 0.f;
      qa[kk][0] = pack_pair<T>(x00, x01);
      qa[kk][1] = pack_pair<T>(x10, x11);
      qa[kk][2] = pack_pair<T>(x02, x03);
      qa[kk][3] = pack_pair<T>(x12, x13);
    }
  }
  float o[DC][4];
#pragma unroll
  for (int dc = 0; dc < DC; ++dc) o[dc][0] = o[dc][1] = o[dc][2] = o[dc][3] = 0.f;
  float m0 = p.use_bound ? p.bound : -INFINITY, m1 = m0, l0 = 0.f, l1 = 0.f;

  for (int64_t k0 = 0; k0 < p.Nk; k0 += kMmaKeys) {
    __syncthreads();  // the previous tile is consumed
    for (int idx = threadIdx.x; idx < kMmaKeys * D; idx += blockDim.x) {
      int r, c;
      tile_index(idx, k.stride[3] == 1, kMmaKeys, D, r, c);
      const int64_t n = k0 + r;
      const bool ok = n < p.Nk;
      sK[r * KP + c] = from_f<T>(ok ? ld<T>(k, b, h, n, c) * fk[bh * p.Nk + n] : 0.f);
      sVt[c * VP + r] = from_f<T>(ok ? ld<T>(v, b, h, n, c) * fv[bh * p.Nk + n] : 0.f);
    }
    __syncthreads();

    float s[NC][4];
#pragma unroll
    for (int n = 0; n < NC; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        const T* kr = &sK[(n * 8 + g) * KP + kk * 16 + 2 * t];
        mma16816<T>(s[n], qa[kk], ld_pair(kr), ld_pair(kr + 8));
      }
    }
    // keys past the end: logit -inf (whole 8-key chunks and the tail of the last one)
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int n = 0; n < NC; ++n) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (k0 + n * 8 + 2 * t + j >= p.Nk) s[n][j] = s[n][2 + j] = -INFINITY;
      }
      mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
      mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
    }
    if (!p.use_bound) {
      const float n0 = fmaxf(m0, quad_max(mx0)), n1 = fmaxf(m1, quad_max(mx1));  // finite: key k0 is valid
      const float c0 = expf(m0 - n0), c1 = expf(m1 - n1);                       // first tile: exp(-inf) = 0
      l0 *= c0;
      l1 *= c1;
#pragma unroll
      for (int dc = 0; dc < DC; ++dc) {
        o[dc][0] *= c0;
        o[dc][1] *= c0;
        o[dc][2] *= c1;
        o[dc][3] *= c1;
      }
      m0 = n0;
      m1 = n1;
    }
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      s[n][0] = expf(s[n][0] - m0);
      s[n][1] = expf(s[n][1] - m0);
      s[n][2] = expf(s[n][2] - m1);
      s[n][3] = expf(s[n][3] - m1);
      l0 += s[n][0] + s[n][1];
      l1 += s[n][2] + s[n][3];
    }
#pragma unroll
    for (int j = 0; j < kMmaKeys / 16; ++j) {
      const uint32_t pa[4] = {pack_pair<T>(s[2 * j][0], s[2 * j][1]), pack_pair<T>(s[2 * j][2], s[2 * j][3]),
                              pack_pair<T>(s[2 * j + 1][0], s[2 * j + 1][1]),
                              pack_pair<T>(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
      for (int dc = 0; dc < DC; ++dc) {
        const T* vr = &sVt[(dc * 8 + g) * VP + j * 16 + 2 * t];
        mma16816<T>(o[dc], pa, ld_pair(vr), ld_pair(vr + 8));
      }
    }
  }
  l0 = quad_sum(l0);
  l1 = quad_sum(l1);
  const float inv0 = 1.f / l0, inv1 = 1.f / l1;
#pragma unroll
  for (int dc = 0; dc < DC; ++dc) {
    const int c = dc * 8 + 2 * t;
    if (ok0) {
      st<T>(out, b, h, r0, c, o[dc][0] * inv0);
      st<T>(out, b, h, r0, c + 1, o[dc][1] * inv0);
    }
    if (ok1) {
      st<T>(out, b, h, r1, c, o[dc][2] * inv1);
      st<T>(out, b, h, r1, c + 1, o[dc][3] * inv1);
    }
  }
  if (t == 0) {
    if (ok0) lse[bh * p.Nq + r0] = m0 + logf(l0);
    if (ok1) lse[bh * p.Nq + r1] = m1 + logf(l1);
  }
}

}  // namespace cmk
