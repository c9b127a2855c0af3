// Tensor-core kernels of the normalized attention for float16 / bfloat16 (sm_80+): flash-style,
// mma.sync.m16n8k16 with float32 accumulation; the forward for every head dim, the backward (dQ and
// dK/dV kernels, below) for head dims up to 64. Opt-in (cm_kernels.set_cuda_tensor_cores(True) or
// CM_KERNELS_CUDA_MMA=1) until a GPU run of tests/test_cuda.py has validated them; the SIMT kernels
// of attention_kernels.cuh stay the default (and run the JVP and larger heads' backward either way).
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

// The A fragments (m16n8k16, rows r0 = 16-row base + g and r1 = r0 + 8, all D columns) of
// x[row] * f_row, rounded to T; rows past the end (ok = false) are zeros.
template <typename T, int KS>
__device__ __forceinline__ void load_row_fragments(const CmkView& x, int64_t b, int64_t h, int64_t r0, int64_t r1,
                                                   float f0, float f1, bool ok0, bool ok1, int t,
                                                   uint32_t (&a)[KS][4]) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    const int c = kk * 16 + 2 * t;
    const float x00 = ok0 ? ld<T>(x, b, h, r0, c) * f0 : 0.f, x01 = ok0 ? ld<T>(x, b, h, r0, c + 1) * f0 : 0.f;
    const float x10 = ok1 ? ld<T>(x, b, h, r1, c) * f1 : 0.f, x11 = ok1 ? ld<T>(x, b, h, r1, c + 1) * f1 : 0.f;
    const float x02 = ok0 ? ld<T>(x, b, h, r0, c + 8) * f0 : 0.f, x03 = ok0 ? ld<T>(x, b, h, r0, c + 9) * f0 : 0.f;
    const float x12 = ok1 ? ld<T>(x, b, h, r1, c + 8) * f1 : 0.f, x13 = ok1 ? ld<T>(x, b, h, r1, c + 9) * f1 : 0.f;
    a[kk][0] = pack_pair<T>(x00, x01);
    a[kk][1] = pack_pair<T>(x10, x11);
    a[kk][2] = pack_pair<T>(x02, x03);
    a[kk][3] = pack_pair<T>(x12, x13);
  }
}

// c[n] = A B^T over 8-row chunks n of a row-major [rows][pitch] tile in shared memory (B's
// m16n8k16 "col" fragment of chunk n is rows 8n + g, columns 16kk + 2t .. + 1 and + 8 .. + 9).
template <typename T, int KS, int NC>
__device__ __forceinline__ void mma_rows(float (&c)[NC][4], const uint32_t (&a)[KS][4], const T* tile, int pitch,
                                         int g, int t) {
#pragma unroll
  for (int n = 0; n < NC; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const T* r = tile + (n * 8 + g) * pitch + kk * 16 + 2 * t;
      mma16816<T>(c[n], a[kk], ld_pair(r), ld_pair(r + 8));
    }
  }
}

// acc[dc] += X Y over 16-wide k-steps j: X (16 rows x 8*NC) read as A fragments from C-layout
// registers x[NC][4] (chunks 2j, 2j + 1), Y from a transposed [D][pitch] tile (row dc*8 + g).
template <typename T, int NC, int DC>
__device__ __forceinline__ void mma_accumulate(float (&acc)[DC][4], const float (&x)[NC][4], const T* tileT,
                                               int pitch, int g, int t) {
#pragma unroll
  for (int j = 0; j < NC / 2; ++j) {
    const uint32_t xa[4] = {pack_pair<T>(x[2 * j][0], x[2 * j][1]), pack_pair<T>(x[2 * j][2], x[2 * j][3]),
                            pack_pair<T>(x[2 * j + 1][0], x[2 * j + 1][1]),
                            pack_pair<T>(x[2 * j + 1][2], x[2 * j + 1][3])};
#pragma unroll
    for (int dc = 0; dc < DC; ++dc) {
      const T* r = tileT + (dc * 8 + g) * pitch + j * 16 + 2 * t;
      mma16816<T>(acc[dc], xa, ld_pair(r), ld_pair(r + 8));
    }
  }
}

// dL/dx of x_hat = x / (eps + rms(x)) for one row n held as this thread's columns dc*8 + 2t + {0, 1}
// of gv (the quad of 4 threads shares the row; every lane must call this: quad shuffles).
template <typename T, int DC>
__device__ __forceinline__ void store_normalize_backward_quad(const CmkView& x, const CmkMutView& dx, int64_t b,
                                                              int64_t h, int64_t n, bool ok, const float (&gv)[DC][2],
                                                              bool normalize, float eps, int t) {
  constexpr int D = DC * 8;
  float xs[DC][2];
  float ss = 0.f, gx = 0.f;
#pragma unroll
  for (int dc = 0; dc < DC; ++dc) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      xs[dc][j] = (normalize && ok) ? ld<T>(x, b, h, n, dc * 8 + 2 * t + j) : 0.f;
      ss = fmaf(xs[dc][j], xs[dc][j], ss);
      gx = fmaf(gv[dc][j], xs[dc][j], gx);
    }
  }
  ss = quad_sum(ss);
  gx = quad_sum(gx);
  const float rms = sqrtf(ss / (float)D);
  const float f = normalize ? 1.f / (eps + rms) : 1.f;
  const float coef = (normalize && rms > 0.f) ? f * f * gx / ((float)D * rms) : 0.f;
  if (!ok) return;
#pragma unroll
  for (int dc = 0; dc < DC; ++dc)
#pragma unroll
    for (int j = 0; j < 2; ++j) st<T>(dx, b, h, n, dc * 8 + 2 * t + j, f * gv[dc][j] - coef * xs[dc][j]);
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
  load_row_fragments<T, KS>(q, b, h, r0, r1, ok0 ? fq[bh * p.Nq + r0] : 0.f, ok1 ? fq[bh * p.Nq + r1] : 0.f, ok0,
                            ok1, t, qa);
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
    mma_rows<T, KS, NC>(s, qa, sK, KP, g, t);
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
    mma_accumulate<T, NC, DC>(o, s, sVt, VP, g, t);
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

// Backward, the SIMT scheme (attention_kernels.cuh) on tensor cores: P = exp(S - lse) recomputed,
// dS = P o (dP - delta), no atomics. Head dims up to 64 (the shared tiles and register fragments of
// larger heads exceed 48 KiB / 255 registers in this form; they keep the SIMT backward).
// dQ: rows = queries (64 per block), tiles of 64 keys; dQ_hat = scale dS K_hat.
template <typename T, int D>
__global__ void __launch_bounds__(128) attn_dq_mma_kernel(CmkAttnParams p, CmkView dout, CmkView q, CmkView k,
                                                          CmkView v, const float* __restrict__ lse,
                                                          const float* __restrict__ delta, CmkMutView dq,
                                                          const float* __restrict__ fq,
                                                          const float* __restrict__ fk,
                                                          const float* __restrict__ fv) {
  constexpr int KS = D / 16, NC = kMmaKeys / 8, DC = D / 8, KP = D + 8, VP = kMmaKeys + 8;
  __shared__ __align__(16) T sK[kMmaKeys * KP];
  __shared__ __align__(16) T sV[kMmaKeys * KP];
  __shared__ __align__(16) T sKt[D * VP];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int64_t r0 = (int64_t)blockIdx.y * kMmaRows + warp * 16 + g, r1 = r0 + 8;
  const bool ok0 = r0 < p.Nq, ok1 = r1 < p.Nq;
  uint32_t qa[KS][4], da[KS][4];
  load_row_fragments<T, KS>(q, b, h, r0, r1, ok0 ? fq[bh * p.Nq + r0] : 0.f, ok1 ? fq[bh * p.Nq + r1] : 0.f, ok0,
                            ok1, t, qa);
  load_row_fragments<T, KS>(dout, b, h, r0, r1, 1.f, 1.f, ok0, ok1, t, da);
  const float lse0 = ok0 ? lse[bh * p.Nq + r0] : 0.f, lse1 = ok1 ? lse[bh * p.Nq + r1] : 0.f;
  const float dl0 = ok0 ? delta[bh * p.Nq + r0] : 0.f, dl1 = ok1 ? delta[bh * p.Nq + r1] : 0.f;
  float acc[DC][4];
#pragma unroll
  for (int dc = 0; dc < DC; ++dc) acc[dc][0] = acc[dc][1] = acc[dc][2] = acc[dc][3] = 0.f;
  for (int64_t k0 = 0; k0 < p.Nk; k0 += kMmaKeys) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kMmaKeys * D; idx += blockDim.x) {
      int r, c;
      tile_index(idx, k.stride[3] == 1, kMmaKeys, D, r, c);
      const int64_t n = k0 + r;
      const bool ok = n < p.Nk;
      const T kv = from_f<T>(ok ? ld<T>(k, b, h, n, c) * fk[bh * p.Nk + n] : 0.f);
      sK[r * KP + c] = kv;
      sKt[c * VP + r] = kv;
      sV[r * KP + c] = from_f<T>(ok ? ld<T>(v, b, h, n, c) * fv[bh * p.Nk + n] : 0.f);
    }
    __syncthreads();
    float s[NC][4], dp[NC][4];
    mma_rows<T, KS, NC>(s, qa, sK, KP, g, t);   // S = (scale q_hat) k_hat^T
    mma_rows<T, KS, NC>(dp, da, sV, KP, g, t);  // dP = dO v_hat^T
#pragma unroll
    for (int n = 0; n < NC; ++n) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const bool valid = k0 + n * 8 + 2 * t + j < p.Nk;
        const float p0 = valid ? expf(s[n][j] - lse0) : 0.f, p1 = valid ? expf(s[n][2 + j] - lse1) : 0.f;
        s[n][j] = p0 * (dp[n][j] - dl0);  // dS
        s[n][2 + j] = p1 * (dp[n][2 + j] - dl1);
      }
    }
    mma_accumulate<T, NC, DC>(acc, s, sKt, VP, g, t);  // dS k_hat
  }
  float g0[DC][2], g1[DC][2];
#pragma unroll
  for (int dc = 0; dc < DC; ++dc) {
    g0[dc][0] = acc[dc][0] * p.scale;
    g0[dc][1] = acc[dc][1] * p.scale;
    g1[dc][0] = acc[dc][2] * p.scale;
    g1[dc][1] = acc[dc][3] * p.scale;
  }
  store_normalize_backward_quad<T, DC>(q, dq, b, h, r0, ok0, g0, p.mode != 0, p.eps, t);
  store_normalize_backward_quad<T, DC>(q, dq, b, h, r1, ok1, g1, p.mode != 0, p.eps, t);
}

// dK, dV: rows = keys (64 per block), tiles of 64 queries (32 for D = 64); dV_hat = P^T dO, dK_hat = dS^T (scale q_hat).
template <typename T, int D>
__global__ void __launch_bounds__(128) attn_dkv_mma_kernel(CmkAttnParams p, CmkView dout, CmkView q, CmkView k,
                                                           CmkView v, const float* __restrict__ lse,
                                                           const float* __restrict__ delta, CmkMutView dk,
                                                           CmkMutView dv, const float* __restrict__ fq,
                                                           const float* __restrict__ fk,
                                                           const float* __restrict__ fv) {
  constexpr int BQ = D >= 64 ? 32 : 64;  // queries per tile: 32 keeps D = 64 within 255 registers
  constexpr int KS = D / 16, NC = BQ / 8, DC = D / 8, KP = D + 8, VP = BQ + 8;
  __shared__ __align__(16) T sQ[BQ * KP];
  __shared__ __align__(16) T sQt[D * VP];
  __shared__ __align__(16) T sO[BQ * KP];   // dO
  __shared__ __align__(16) T sOt[D * VP];   // dO transposed
  __shared__ float sL[BQ], sD[BQ];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int64_t r0 = (int64_t)blockIdx.y * kMmaKeys + warp * 16 + g, r1 = r0 + 8;  // key rows
  const bool ok0 = r0 < p.Nk, ok1 = r1 < p.Nk;
  uint32_t ka[KS][4], va[KS][4];
  load_row_fragments<T, KS>(k, b, h, r0, r1, ok0 ? fk[bh * p.Nk + r0] : 0.f, ok1 ? fk[bh * p.Nk + r1] : 0.f, ok0,
                            ok1, t, ka);
  load_row_fragments<T, KS>(v, b, h, r0, r1, ok0 ? fv[bh * p.Nk + r0] : 0.f, ok1 ? fv[bh * p.Nk + r1] : 0.f, ok0,
                            ok1, t, va);
  float accK[DC][4], accV[DC][4];
#pragma unroll
  for (int dc = 0; dc < DC; ++dc) accK[dc][0] = accK[dc][1] = accK[dc][2] = accK[dc][3] = accV[dc][0] = accV[dc][1] =
      accV[dc][2] = accV[dc][3] = 0.f;
  for (int64_t q0 = 0; q0 < p.Nq; q0 += BQ) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < BQ * D; idx += blockDim.x) {
      int r, c;
      tile_index(idx, q.stride[3] == 1, BQ, D, r, c);
      const int64_t n = q0 + r;
      const bool ok = n < p.Nq;
      const T qv = from_f<T>(ok ? ld<T>(q, b, h, n, c) * fq[bh * p.Nq + n] : 0.f);  // scale * q_hat
      const T ov = from_f<T>(ok ? ld<T>(dout, b, h, n, c) : 0.f);
      sQ[r * KP + c] = qv;
      sQt[c * VP + r] = qv;
      sO[r * KP + c] = ov;
      sOt[c * VP + r] = ov;
    }
    if (threadIdx.x < BQ) {
      const int64_t n = q0 + threadIdx.x;
      sL[threadIdx.x] = n < p.Nq ? lse[bh * p.Nq + n] : 0.f;
      sD[threadIdx.x] = n < p.Nq ? delta[bh * p.Nq + n] : 0.f;
    }
    __syncthreads();
    float st_[NC][4], dpt[NC][4];
    mma_rows<T, KS, NC>(st_, ka, sQ, KP, g, t);  // S^T = k_hat (scale q_hat)^T
    mma_rows<T, KS, NC>(dpt, va, sO, KP, g, t);  // dP^T = v_hat dO^T
#pragma unroll
    for (int n = 0; n < NC; ++n) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = n * 8 + 2 * t + j;  // query within the tile
        const bool valid = q0 + col < p.Nq;
        const float L = sL[col], Dl = sD[col];
        const float p0 = valid ? expf(st_[n][j] - L) : 0.f, p1 = valid ? expf(st_[n][2 + j] - L) : 0.f;
        st_[n][j] = p0;  // P^T
        st_[n][2 + j] = p1;
        dpt[n][j] = p0 * (dpt[n][j] - Dl);  // dS^T
        dpt[n][2 + j] = p1 * (dpt[n][2 + j] - Dl);
      }
    }
    mma_accumulate<T, NC, DC>(accV, st_, sOt, VP, g, t);  // P^T dO
    mma_accumulate<T, NC, DC>(accK, dpt, sQt, VP, g, t);  // dS^T (scale q_hat)
  }
  float k0v[DC][2], k1v[DC][2], v0v[DC][2], v1v[DC][2];
#pragma unroll
  for (int dc = 0; dc < DC; ++dc) {
    k0v[dc][0] = accK[dc][0];
    k0v[dc][1] = accK[dc][1];
    k1v[dc][0] = accK[dc][2];
    k1v[dc][1] = accK[dc][3];
    v0v[dc][0] = accV[dc][0];
    v0v[dc][1] = accV[dc][1];
    v1v[dc][0] = accV[dc][2];
    v1v[dc][1] = accV[dc][3];
  }
  store_normalize_backward_quad<T, DC>(k, dk, b, h, r0, ok0, k0v, p.mode != 0, p.eps, t);
  store_normalize_backward_quad<T, DC>(k, dk, b, h, r1, ok1, k1v, p.mode != 0, p.eps, t);
  store_normalize_backward_quad<T, DC>(v, dv, b, h, r0, ok0, v0v, p.mode == 2, p.eps, t);
  store_normalize_backward_quad<T, DC>(v, dv, b, h, r1, ok1, v1v, p.mode == 2, p.eps, t);
}

}  // namespace cmk
