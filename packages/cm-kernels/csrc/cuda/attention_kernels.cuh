// CUDA normalized attention kernels (torch-free), templated on element type T and head dim D;
// instantiated per dtype in attention_{f32,f16,bf16}.cu so builds parallelize.
//
// Scheme (float32 accumulation throughout): a block of 4 warps owns ROWS = 4 * RPW rows of one
// (batch, head); each warp owns RPW rows. Tiles of 32 rows of the other operand are staged in
// shared memory (padded to D + 1 floats: lane j reads row j conflict-free). Within a tile,
// lane j computes the logit against row j, and the weighted sums over the tile are formed by
// broadcasting each lane's weight with __shfl_sync; lane l accumulates output channels
// l, l + 32, ... (VPL = ceil(D / 32) per lane). Normalization factors per row are computed
// once by row_factor_kernel and applied while staging tiles.
//   forward: online softmax; with normalized q, k and d * scale <= 40 the running max is
//            replaced by the bound d * scale (proof in cpu/attention.cpp), saving the rescales.
//            float16 / bfloat16 with p.tensor_cores: the mma.sync kernel of attention_mma.cuh.
//   jvp:      O and its forward-mode tangent in one pass (attn_jvp_kernel).
//   backward: delta_i = dO_i . O_i; dq kernel (rows = queries, tiles over keys) and dk/dv kernel
//            (rows = keys, tiles over queries) each recompute P = exp(S - lse): no atomics.
#pragma once
#include <math.h>

#include <type_traits>

#include "attention_mma.cuh"
#include "common.cuh"

namespace cmk {

constexpr int kWarps = 4;
constexpr int kTile = 32;
constexpr unsigned kFull = 0xffffffffu;

// f[r] = mult / (eps + rms(x_r)) if normalize else mult; one warp per row r over (b, h, n).
template <typename T, int D>
__global__ void row_factor_kernel(CmkView x, int64_t H, int64_t N, int64_t rows, int normalize, float eps, float mult,
                                  float* __restrict__ f) {
  const int64_t r = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;  // warp-uniform
  const int64_t n = r % N, h = (r / N) % H, b = r / (N * H);
  float ss = 0.f;
  for (int c = lane; c < D; c += 32) {
    const float v = ld<T>(x, b, h, n, c);
    ss = fmaf(v, v, ss);
  }
  ss = warp_sum(ss);
  if (lane == 0) f[r] = normalize ? mult / (eps + sqrtf(ss / (float)D)) : mult;
}

// delta[r] = sum_c dO[r, c] * O[r, c]; one warp per row.
template <typename T, int D>
__global__ void delta_kernel(CmkView dout, CmkView out, int64_t H, int64_t N, int64_t rows, float* __restrict__ delta) {
  const int64_t r = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const int64_t n = r % N, h = (r / N) % H, b = r / (N * H);
  float acc = 0.f;
  for (int c = lane; c < D; c += 32) acc = fmaf(ld<T>(dout, b, h, n, c), ld<T>(out, b, h, n, c), acc);
  acc = warp_sum(acc);
  if (lane == 0) delta[r] = acc;
}

// dL/dx for x_hat = x / (eps + rms(x)) given g = dL/dx_hat spread over the warp's lanes:
//   dx = f g - f^2 (g . x) / (d rms) x,  f = 1 / (eps + rms)   (second term 0 at x = 0).
template <typename T, int D, int VPL>
__device__ __forceinline__ void store_normalize_backward(const CmkView& x, const CmkMutView& dx, int64_t b, int64_t h,
                                                         int64_t n, const float (&g)[VPL], bool normalize, float eps,
                                                         int lane) {
  float xr[VPL];
  float ss = 0.f, gx = 0.f;
#pragma unroll
  for (int c = 0; c < VPL; ++c) {
    const int cc = lane + 32 * c;
    xr[c] = (normalize && cc < D) ? ld<T>(x, b, h, n, cc) : 0.f;
    ss = fmaf(xr[c], xr[c], ss);
    gx = fmaf(g[c], xr[c], gx);
  }
  ss = warp_sum(ss);
  gx = warp_sum(gx);
  const float rms = sqrtf(ss / (float)D);
  const float f = normalize ? 1.f / (eps + rms) : 1.f;
  const float coef = (normalize && rms > 0.f) ? f * f * gx / ((float)D * rms) : 0.f;
#pragma unroll
  for (int c = 0; c < VPL; ++c) {
    const int cc = lane + 32 * c;
    if (cc < D) st<T>(dx, b, h, n, cc, f * g[c] - coef * xr[c]);
  }
}

template <typename T, int D, int RPW>
__global__ void __launch_bounds__(kWarps * 32) attn_fwd_kernel(CmkAttnParams p, CmkView q, CmkView k, CmkView v,
                                                               CmkMutView out, float* __restrict__ lse,
                                                               const float* __restrict__ fq,
                                                               const float* __restrict__ fk,
                                                               const float* __restrict__ fv) {
  constexpr int VPL = (D + 31) / 32, ROWS = kWarps * RPW;
  __shared__ float sQ[ROWS][D];
  __shared__ float sK[kTile][D + 1];
  __shared__ float sV[kTile][D + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int64_t q0 = (int64_t)blockIdx.y * ROWS;
  for (int idx = threadIdx.x; idx < ROWS * D; idx += blockDim.x) {
    int r, c;
    tile_index(idx, q.stride[3] == 1, ROWS, D, r, c);
    const int64_t n = q0 + r;
    sQ[r][c] = n < p.Nq ? ld<T>(q, b, h, n, c) * fq[bh * p.Nq + n] : 0.f;  // fq includes scale
  }
  float m[RPW], l[RPW], acc[RPW][VPL];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    m[rr] = p.use_bound ? p.bound : -INFINITY;
    l[rr] = 0.f;
#pragma unroll
    for (int c = 0; c < VPL; ++c) acc[rr][c] = 0.f;
  }
  for (int64_t k0 = 0; k0 < p.Nk; k0 += kTile) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * D; idx += blockDim.x) {
      int r, c;
      tile_index(idx, k.stride[3] == 1, kTile, D, r, c);
      const int64_t n = k0 + r;
      const bool ok = n < p.Nk;
      sK[r][c] = ok ? ld<T>(k, b, h, n, c) * fk[bh * p.Nk + n] : 0.f;
      sV[r][c] = ok ? ld<T>(v, b, h, n, c) * fv[bh * p.Nk + n] : 0.f;
    }
    __syncthreads();
    const bool valid = k0 + lane < p.Nk;  // lane 0 is always valid: k0 < Nk
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int r = warp * RPW + rr;
      float s = 0.f;
#pragma unroll 8
      for (int c = 0; c < D; ++c) s = fmaf(sQ[r][c], sK[lane][c], s);
      s = valid ? s : -INFINITY;
      if (!p.use_bound) {  // online softmax (Milakov & Gimelshein 2018)
        const float m_new = fmaxf(m[rr], warp_max(s));
        const float corr = expf(m[rr] - m_new);  // first tile: exp(-inf) = 0
        l[rr] *= corr;
#pragma unroll
        for (int c = 0; c < VPL; ++c) acc[rr][c] *= corr;
        m[rr] = m_new;
      }
      const float e = valid ? expf(s - m[rr]) : 0.f;
      l[rr] += e;
#pragma unroll 4
      for (int j = 0; j < kTile; ++j) {
        const float ej = __shfl_sync(kFull, e, j);
#pragma unroll
        for (int c = 0; c < VPL; ++c) {
          const int cc = lane + 32 * c;
          if (cc < D) acc[rr][c] = fmaf(ej, sV[j][cc], acc[rr][c]);
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int64_t n = q0 + warp * RPW + rr;
    const float lsum = warp_sum(l[rr]);
    if (n < p.Nq) {
      const float inv = 1.f / lsum;
#pragma unroll
      for (int c = 0; c < VPL; ++c) {
        const int cc = lane + 32 * c;
        if (cc < D) st<T>(out, b, h, n, cc, acc[rr][c] * inv);
      }
      if (lane == 0) lse[bh * p.Nq + n] = m[rr] + logf(lsum);
    }
  }
}

template <typename T, int D, int RPW>
__global__ void __launch_bounds__(kWarps * 32) attn_dq_kernel(CmkAttnParams p, CmkView dout, CmkView q, CmkView k,
                                                              CmkView v, const float* __restrict__ lse,
                                                              const float* __restrict__ delta, CmkMutView dq,
                                                              const float* __restrict__ fq,
                                                              const float* __restrict__ fk,
                                                              const float* __restrict__ fv) {
  constexpr int VPL = (D + 31) / 32, ROWS = kWarps * RPW;
  __shared__ float sQ[ROWS][D];
  __shared__ float sdO[ROWS][D];
  __shared__ float sK[kTile][D + 1];
  __shared__ float sV[kTile][D + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int64_t q0 = (int64_t)blockIdx.y * ROWS;
  for (int idx = threadIdx.x; idx < ROWS * D; idx += blockDim.x) {
    int r, c;
    tile_index(idx, q.stride[3] == 1, ROWS, D, r, c);
    const int64_t n = q0 + r;
    const bool ok = n < p.Nq;
    sQ[r][c] = ok ? ld<T>(q, b, h, n, c) * fq[bh * p.Nq + n] : 0.f;
    sdO[r][c] = ok ? ld<T>(dout, b, h, n, c) : 0.f;
  }
  float row_lse[RPW], row_delta[RPW], acc[RPW][VPL];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int64_t n = q0 + warp * RPW + rr;
    row_lse[rr] = n < p.Nq ? lse[bh * p.Nq + n] : 0.f;
    row_delta[rr] = n < p.Nq ? delta[bh * p.Nq + n] : 0.f;
#pragma unroll
    for (int c = 0; c < VPL; ++c) acc[rr][c] = 0.f;
  }
  for (int64_t k0 = 0; k0 < p.Nk; k0 += kTile) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * D; idx += blockDim.x) {
      int r, c;
      tile_index(idx, k.stride[3] == 1, kTile, D, r, c);
      const int64_t n = k0 + r;
      const bool ok = n < p.Nk;
      sK[r][c] = ok ? ld<T>(k, b, h, n, c) * fk[bh * p.Nk + n] : 0.f;
      sV[r][c] = ok ? ld<T>(v, b, h, n, c) * fv[bh * p.Nk + n] : 0.f;
    }
    __syncthreads();
    const bool valid = k0 + lane < p.Nk;
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int r = warp * RPW + rr;
      float s = 0.f, dp = 0.f;
#pragma unroll 8
      for (int c = 0; c < D; ++c) {
        s = fmaf(sQ[r][c], sK[lane][c], s);
        dp = fmaf(sdO[r][c], sV[lane][c], dp);
      }
      const float pr = valid ? expf(s - row_lse[rr]) : 0.f;
      const float ds = pr * (dp - row_delta[rr]);  // dS = P o (dP - delta)
#pragma unroll 4
      for (int j = 0; j < kTile; ++j) {
        const float dsj = __shfl_sync(kFull, ds, j);
#pragma unroll
        for (int c = 0; c < VPL; ++c) {
          const int cc = lane + 32 * c;
          if (cc < D) acc[rr][c] = fmaf(dsj, sK[j][cc], acc[rr][c]);
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int64_t n = q0 + warp * RPW + rr;
    if (n >= p.Nq) continue;  // warp-uniform
    float g[VPL];
#pragma unroll
    for (int c = 0; c < VPL; ++c) g[c] = acc[rr][c] * p.scale;  // dL/dq_hat = scale * dS K_hat
    store_normalize_backward<T, D, VPL>(q, dq, b, h, n, g, p.mode != 0, p.eps, lane);
  }
}

template <typename T, int D, int RPW>
__global__ void __launch_bounds__(kWarps * 32) attn_dkv_kernel(CmkAttnParams p, CmkView dout, CmkView q, CmkView k,
                                                               CmkView v, const float* __restrict__ lse,
                                                               const float* __restrict__ delta, CmkMutView dk,
                                                               CmkMutView dv, const float* __restrict__ fq,
                                                               const float* __restrict__ fk,
                                                               const float* __restrict__ fv) {
  constexpr int VPL = (D + 31) / 32, ROWS = kWarps * RPW;
  __shared__ float sK[ROWS][D];
  __shared__ float sV[ROWS][D];
  __shared__ float sQ[kTile][D + 1];
  __shared__ float sdO[kTile][D + 1];
  __shared__ float sL[kTile];
  __shared__ float sD[kTile];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int64_t k0 = (int64_t)blockIdx.y * ROWS;
  for (int idx = threadIdx.x; idx < ROWS * D; idx += blockDim.x) {
    int r, c;
    tile_index(idx, k.stride[3] == 1, ROWS, D, r, c);
    const int64_t n = k0 + r;
    const bool ok = n < p.Nk;
    sK[r][c] = ok ? ld<T>(k, b, h, n, c) * fk[bh * p.Nk + n] : 0.f;
    sV[r][c] = ok ? ld<T>(v, b, h, n, c) * fv[bh * p.Nk + n] : 0.f;
  }
  float accK[RPW][VPL], accV[RPW][VPL];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr)
#pragma unroll
    for (int c = 0; c < VPL; ++c) accK[rr][c] = accV[rr][c] = 0.f;
  for (int64_t q0 = 0; q0 < p.Nq; q0 += kTile) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * D; idx += blockDim.x) {
      int r, c;
      tile_index(idx, q.stride[3] == 1, kTile, D, r, c);
      const int64_t n = q0 + r;
      const bool ok = n < p.Nq;
      sQ[r][c] = ok ? ld<T>(q, b, h, n, c) * fq[bh * p.Nq + n] : 0.f;  // scale * q_hat
      sdO[r][c] = ok ? ld<T>(dout, b, h, n, c) : 0.f;
    }
    if (threadIdx.x < kTile) {
      const int64_t n = q0 + threadIdx.x;
      sL[threadIdx.x] = n < p.Nq ? lse[bh * p.Nq + n] : 0.f;
      sD[threadIdx.x] = n < p.Nq ? delta[bh * p.Nq + n] : 0.f;
    }
    __syncthreads();
    const bool valid = q0 + lane < p.Nq;
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int r = warp * RPW + rr;
      float s = 0.f, dp = 0.f;
#pragma unroll 8
      for (int c = 0; c < D; ++c) {
        s = fmaf(sQ[lane][c], sK[r][c], s);
        dp = fmaf(sdO[lane][c], sV[r][c], dp);
      }
      const float pr = valid ? expf(s - sL[lane]) : 0.f;
      const float ds = pr * (dp - sD[lane]);
#pragma unroll 4
      for (int j = 0; j < kTile; ++j) {
        const float pj = __shfl_sync(kFull, pr, j);
        const float dsj = __shfl_sync(kFull, ds, j);
#pragma unroll
        for (int c = 0; c < VPL; ++c) {
          const int cc = lane + 32 * c;
          if (cc < D) {
            accV[rr][c] = fmaf(pj, sdO[j][cc], accV[rr][c]);  // dV_hat += P^T dO
            accK[rr][c] = fmaf(dsj, sQ[j][cc], accK[rr][c]);  // dK_hat += dS^T (scale q_hat)
          }
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int64_t n = k0 + warp * RPW + rr;
    if (n >= p.Nk) continue;
    store_normalize_backward<T, D, VPL>(k, dk, b, h, n, accK[rr], p.mode != 0, p.eps, lane);
    store_normalize_backward<T, D, VPL>(v, dv, b, h, n, accV[rr], p.mode == 2, p.eps, lane);
  }
}

// Forward-mode AD factors of one row: x_hat = f x and d(x_hat) = f dx - cf x, with
//   f = mult / (eps + rms),  cf = mult (x . dx) / (D rms (eps + rms)^2)   (0 at x = 0, the subgradient
// torch.linalg.vector_norm takes there; f = mult and cf = 0 without normalization). One warp per row.
template <typename T, int D>
__global__ void row_jvp_factor_kernel(CmkView x, CmkView t, int64_t H, int64_t N, int64_t rows, int normalize,
                                      float eps, float mult, float* __restrict__ f, float* __restrict__ cf) {
  const int64_t r = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;  // warp-uniform
  const int64_t n = r % N, h = (r / N) % H, b = r / (N * H);
  float ss = 0.f, xt = 0.f;
  for (int c = lane; c < D; c += 32) {
    const float xv = ld<T>(x, b, h, n, c);
    ss = fmaf(xv, xv, ss);
    xt = fmaf(xv, ld<T>(t, b, h, n, c), xt);
  }
  ss = warp_sum(ss);
  xt = warp_sum(xt);
  if (lane == 0) {
    const float rms = sqrtf(ss / (float)D);
    const float inv = 1.f / (eps + rms);
    f[r] = normalize ? mult * inv : mult;
    cf[r] = (normalize && rms > 0.f) ? mult * inv * inv * xt / ((float)D * rms) : 0.f;
  }
}

// Rows k0 .. k0 + kTile of x_hat = f x and of its tangent d(x_hat) = f dx - cf x (f, cf: this head's
// row factors from row_jvp_factor_kernel) into the shared tiles sX, sdX; zeros past n_rows.
template <typename T, int D>
__device__ __forceinline__ void stage_jvp_tile(const CmkView& x, const CmkView& t, const float* __restrict__ f,
                                               const float* __restrict__ cf, int64_t b, int64_t h, int64_t k0,
                                               int64_t n_rows, float (*sX)[D + 1], float (*sdX)[D + 1]) {
  for (int idx = threadIdx.x; idx < kTile * D; idx += blockDim.x) {
    int r, c;
    tile_index(idx, x.stride[3] == 1, kTile, D, r, c);
    const int64_t n = k0 + r;
    if (n < n_rows) {
      const float xv = ld<T>(x, b, h, n, c);
      sX[r][c] = xv * f[n];
      sdX[r][c] = ld<T>(t, b, h, n, c) * f[n] - cf[n] * xv;
    } else {
      sX[r][c] = sdX[r][c] = 0.f;
    }
  }
}

// Forward-mode AD: O and its tangent dO in one pass (float32 accumulation), rows and tiles as
// attn_fwd_kernel. With S = q_hat k_hat^T (scale folded into q_hat), P = softmax(S):
//   dS = dq_hat k_hat^T + q_hat dk_hat^T
//   dO = P dv_hat + (P o dS) v_hat - rowsum(P o dS) O
// accumulated online with the same running max as O: l = sum e, ld = sum e dS, acc = sum e v_hat,
// tacc = sum (e dv_hat + e dS v_hat); at the end O = acc / l, dO = tacc / l - (ld / l) O. Each key
// tile is staged twice through the same two buffers (K, dK for the logits, then V, dV for the
// sums), so D = 128 fits the 48 KiB of static shared memory.
template <typename T, int D, int RPW>
__global__ void __launch_bounds__(kWarps * 32) attn_jvp_kernel(CmkAttnParams p, CmkView q, CmkView k, CmkView v,
                                                               CmkView tq, CmkView tk, CmkView tv, CmkMutView out,
                                                               CmkMutView tout, float* __restrict__ lse,
                                                               const float* __restrict__ fq,
                                                               const float* __restrict__ cq,
                                                               const float* __restrict__ fk,
                                                               const float* __restrict__ ck,
                                                               const float* __restrict__ fv,
                                                               const float* __restrict__ cv) {
  constexpr int VPL = (D + 31) / 32, ROWS = kWarps * RPW;
  __shared__ float sQ[ROWS][D];
  __shared__ float sdQ[ROWS][D];
  __shared__ float sA[kTile][D + 1];  // K, then V
  __shared__ float sB[kTile][D + 1];  // dK, then dV
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int64_t q0 = (int64_t)blockIdx.y * ROWS;
  for (int idx = threadIdx.x; idx < ROWS * D; idx += blockDim.x) {
    int r, c;
    tile_index(idx, q.stride[3] == 1, ROWS, D, r, c);
    const int64_t n = q0 + r;
    if (n < p.Nq) {
      const float x = ld<T>(q, b, h, n, c);
      sQ[r][c] = x * fq[bh * p.Nq + n];  // fq, cq include scale
      sdQ[r][c] = ld<T>(tq, b, h, n, c) * fq[bh * p.Nq + n] - cq[bh * p.Nq + n] * x;
    } else {
      sQ[r][c] = sdQ[r][c] = 0.f;
    }
  }
  float m[RPW], l[RPW], lds[RPW], acc[RPW][VPL], tacc[RPW][VPL];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    m[rr] = p.use_bound ? p.bound : -INFINITY;
    l[rr] = lds[rr] = 0.f;
#pragma unroll
    for (int c = 0; c < VPL; ++c) acc[rr][c] = tacc[rr][c] = 0.f;
  }
  for (int64_t k0 = 0; k0 < p.Nk; k0 += kTile) {
    __syncthreads();  // the previous tile's V, dV are consumed
    stage_jvp_tile<T, D>(k, tk, fk + bh * p.Nk, ck + bh * p.Nk, b, h, k0, p.Nk, sA, sB);
    __syncthreads();
    const bool valid = k0 + lane < p.Nk;  // lane 0 is always valid: k0 < Nk
    float s[RPW], ds[RPW];
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int r = warp * RPW + rr;
      float sv = 0.f, dv = 0.f;
#pragma unroll 8
      for (int c = 0; c < D; ++c) {
        sv = fmaf(sQ[r][c], sA[lane][c], sv);
        dv = fmaf(sdQ[r][c], sA[lane][c], dv);
        dv = fmaf(sQ[r][c], sB[lane][c], dv);
      }
      s[rr] = valid ? sv : -INFINITY;
      ds[rr] = valid ? dv : 0.f;
    }
    __syncthreads();  // K, dK are consumed
    stage_jvp_tile<T, D>(v, tv, fv + bh * p.Nk, cv + bh * p.Nk, b, h, k0, p.Nk, sA, sB);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      if (!p.use_bound) {
        const float m_new = fmaxf(m[rr], warp_max(s[rr]));
        const float corr = expf(m[rr] - m_new);  // first tile: exp(-inf) = 0
        l[rr] *= corr;
        lds[rr] *= corr;
#pragma unroll
        for (int c = 0; c < VPL; ++c) {
          acc[rr][c] *= corr;
          tacc[rr][c] *= corr;
        }
        m[rr] = m_new;
      }
      const float e = valid ? expf(s[rr] - m[rr]) : 0.f;
      const float ed = e * ds[rr];
      l[rr] += e;
      lds[rr] += ed;
#pragma unroll 4
      for (int j = 0; j < kTile; ++j) {
        const float ej = __shfl_sync(kFull, e, j);
        const float edj = __shfl_sync(kFull, ed, j);
#pragma unroll
        for (int c = 0; c < VPL; ++c) {
          const int cc = lane + 32 * c;
          if (cc < D) {
            acc[rr][c] = fmaf(ej, sA[j][cc], acc[rr][c]);
            tacc[rr][c] = fmaf(ej, sB[j][cc], fmaf(edj, sA[j][cc], tacc[rr][c]));
          }
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int64_t n = q0 + warp * RPW + rr;
    const float lsum = warp_sum(l[rr]);
    const float dsum = warp_sum(lds[rr]);
    if (n < p.Nq) {
      const float inv = 1.f / lsum;
      const float mean_ds = dsum * inv;  // rowsum(P o dS)
#pragma unroll
      for (int c = 0; c < VPL; ++c) {
        const int cc = lane + 32 * c;
        if (cc < D) {
          const float o = acc[rr][c] * inv;
          st<T>(out, b, h, n, cc, o);
          st<T>(tout, b, h, n, cc, fmaf(tacc[rr][c], inv, -mean_ds * o));
        }
      }
      if (lane == 0) lse[bh * p.Nq + n] = m[rr] + logf(lsum);
    }
  }
}

inline unsigned blocks_for(int64_t n, int64_t per) { return (unsigned)((n + per - 1) / per); }

template <typename T, int D>
int attn_fwd_d(CmkAttnParams p, CmkView q, CmkView k, CmkView v, CmkMutView out, float* lse, float* ws,
               cudaStream_t stream) {
  constexpr int RPW = 4;
  const int64_t BH = p.B * p.H;
  float* fq = ws;
  float* fk = fq + BH * p.Nq;
  float* fv = fk + BH * p.Nk;
  const int threads = kWarps * 32;
  row_factor_kernel<T, D><<<blocks_for(BH * p.Nq, kWarps), threads, 0, stream>>>(q, p.H, p.Nq, BH * p.Nq, p.mode != 0, p.eps, p.scale, fq);
  row_factor_kernel<T, D><<<blocks_for(BH * p.Nk, kWarps), threads, 0, stream>>>(k, p.H, p.Nk, BH * p.Nk, p.mode != 0, p.eps, 1.f, fk);
  row_factor_kernel<T, D><<<blocks_for(BH * p.Nk, kWarps), threads, 0, stream>>>(v, p.H, p.Nk, BH * p.Nk, p.mode == 2, p.eps, 1.f, fv);
  if constexpr (!std::is_same<T, float>::value) {
    if (p.tensor_cores) {  // attention_mma.cuh: opt-in, float16 / bfloat16 on sm_80+
      const dim3 grid((unsigned)BH, blocks_for(p.Nq, kMmaRows));
      attn_fwd_mma_kernel<T, D><<<grid, 128, 0, stream>>>(p, q, k, v, out, lse, fq, fk, fv);
      return (int)cudaGetLastError();
    }
  }
  const dim3 grid((unsigned)BH, blocks_for(p.Nq, kWarps * RPW));
  attn_fwd_kernel<T, D, RPW><<<grid, threads, 0, stream>>>(p, q, k, v, out, lse, fq, fk, fv);
  return (int)cudaGetLastError();
}

template <typename T, int D>
int attn_bwd_d(CmkAttnParams p, CmkView dout, CmkView q, CmkView k, CmkView v, CmkView out, const float* lse,
               CmkMutView dq, CmkMutView dk, CmkMutView dv, float* ws, cudaStream_t stream) {
  constexpr int RPW = D >= 128 ? 2 : 4;  // keeps static shared memory under 48 KiB
  const int64_t BH = p.B * p.H;
  float* fq = ws;
  float* fk = fq + BH * p.Nq;
  float* fv = fk + BH * p.Nk;
  float* delta = fv + BH * p.Nk;
  const int threads = kWarps * 32;
  row_factor_kernel<T, D><<<blocks_for(BH * p.Nq, kWarps), threads, 0, stream>>>(q, p.H, p.Nq, BH * p.Nq, p.mode != 0, p.eps, p.scale, fq);
  row_factor_kernel<T, D><<<blocks_for(BH * p.Nk, kWarps), threads, 0, stream>>>(k, p.H, p.Nk, BH * p.Nk, p.mode != 0, p.eps, 1.f, fk);
  row_factor_kernel<T, D><<<blocks_for(BH * p.Nk, kWarps), threads, 0, stream>>>(v, p.H, p.Nk, BH * p.Nk, p.mode == 2, p.eps, 1.f, fv);
  delta_kernel<T, D><<<blocks_for(BH * p.Nq, kWarps), threads, 0, stream>>>(dout, out, p.H, p.Nq, BH * p.Nq, delta);
  if constexpr (!std::is_same<T, float>::value && D <= 64) {
    if (p.tensor_cores) {  // attention_mma.cuh: opt-in, float16 / bfloat16 on sm_80+, head dims <= 64
      attn_dq_mma_kernel<T, D><<<dim3((unsigned)BH, blocks_for(p.Nq, kMmaRows)), 128, 0, stream>>>(
          p, dout, q, k, v, lse, delta, dq, fq, fk, fv);
      attn_dkv_mma_kernel<T, D><<<dim3((unsigned)BH, blocks_for(p.Nk, kMmaKeys)), 128, 0, stream>>>(
          p, dout, q, k, v, lse, delta, dk, dv, fq, fk, fv);
      return (int)cudaGetLastError();
    }
  }
  attn_dq_kernel<T, D, RPW><<<dim3((unsigned)BH, blocks_for(p.Nq, kWarps * RPW)), threads, 0, stream>>>(
      p, dout, q, k, v, lse, delta, dq, fq, fk, fv);
  attn_dkv_kernel<T, D, RPW><<<dim3((unsigned)BH, blocks_for(p.Nk, kWarps * RPW)), threads, 0, stream>>>(
      p, dout, q, k, v, lse, delta, dk, dv, fq, fk, fv);
  return (int)cudaGetLastError();
}

template <typename T, int D>
int attn_jvp_d(CmkAttnParams p, CmkView q, CmkView k, CmkView v, CmkView tq, CmkView tk, CmkView tv, CmkMutView out,
               CmkMutView tout, float* lse, float* ws, cudaStream_t stream) {
  constexpr int RPW = D >= 128 ? 2 : 4;  // keeps static shared memory under 48 KiB
  const int64_t BH = p.B * p.H;
  float* fq = ws;
  float* cq = fq + BH * p.Nq;
  float* fk = cq + BH * p.Nq;
  float* ck = fk + BH * p.Nk;
  float* fv = ck + BH * p.Nk;
  float* cv = fv + BH * p.Nk;
  const int threads = kWarps * 32;
  row_jvp_factor_kernel<T, D><<<blocks_for(BH * p.Nq, kWarps), threads, 0, stream>>>(q, tq, p.H, p.Nq, BH * p.Nq, p.mode != 0, p.eps, p.scale, fq, cq);
  row_jvp_factor_kernel<T, D><<<blocks_for(BH * p.Nk, kWarps), threads, 0, stream>>>(k, tk, p.H, p.Nk, BH * p.Nk, p.mode != 0, p.eps, 1.f, fk, ck);
  row_jvp_factor_kernel<T, D><<<blocks_for(BH * p.Nk, kWarps), threads, 0, stream>>>(v, tv, p.H, p.Nk, BH * p.Nk, p.mode == 2, p.eps, 1.f, fv, cv);
  const dim3 grid((unsigned)BH, blocks_for(p.Nq, kWarps * RPW));
  attn_jvp_kernel<T, D, RPW><<<grid, threads, 0, stream>>>(p, q, k, v, tq, tk, tv, out, tout, lse, fq, cq, fk, ck, fv, cv);
  return (int)cudaGetLastError();
}

// f(std::integral_constant<int, D>{}) for the compiled head dim D == d (the one list of them; keep
// cmk_attn_head_dim_supported in attention.cu in step).
template <typename F>
int with_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return (int)cudaErrorInvalidValue;
  }
}

template <typename T>
int attn_jvp_t(CmkAttnParams p, CmkView q, CmkView k, CmkView v, CmkView tq, CmkView tk, CmkView tv, CmkMutView out,
               CmkMutView tout, float* lse, float* ws, cudaStream_t stream) {
  return with_head_dim(p.d, [&](auto D) {
    return attn_jvp_d<T, decltype(D)::value>(p, q, k, v, tq, tk, tv, out, tout, lse, ws, stream);
  });
}

template <typename T>
int attn_fwd_t(CmkAttnParams p, CmkView q, CmkView k, CmkView v, CmkMutView out, float* lse, float* ws,
               cudaStream_t stream) {
  return with_head_dim(p.d, [&](auto D) { return attn_fwd_d<T, decltype(D)::value>(p, q, k, v, out, lse, ws, stream); });
}

template <typename T>
int attn_bwd_t(CmkAttnParams p, CmkView dout, CmkView q, CmkView k, CmkView v, CmkView out, const float* lse,
               CmkMutView dq, CmkMutView dk, CmkMutView dv, float* ws, cudaStream_t stream) {
  return with_head_dim(p.d, [&](auto D) {
    return attn_bwd_d<T, decltype(D)::value>(p, dout, q, k, v, out, lse, dq, dk, dv, ws, stream);
  });
}

}  // namespace cmk

// Explicit instantiation, one dtype per translation unit (attention_f32.cu, ...).
#define CMK_INSTANTIATE_ATTENTION(T)                                                                        \
  template int cmk::attn_fwd_t<T>(CmkAttnParams, CmkView, CmkView, CmkView, CmkMutView, float*, float*,     \
                                  cudaStream_t);                                                            \
  template int cmk::attn_bwd_t<T>(CmkAttnParams, CmkView, CmkView, CmkView, CmkView, CmkView, const float*, \
                                  CmkMutView, CmkMutView, CmkMutView, float*, cudaStream_t);             \
  template int cmk::attn_jvp_t<T>(CmkAttnParams, CmkView, CmkView, CmkView, CmkView, CmkView, CmkView,     \
                                  CmkMutView, CmkMutView, float*, float*, cudaStream_t);
