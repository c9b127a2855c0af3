// Device helpers shared by the .cu files (torch-free).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launchers.h"

namespace cmk {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <typename T>
__device__ __forceinline__ float ld(const CmkView& x, int64_t b, int64_t h, int64_t n, int64_t c) {
  const T* p = static_cast<const T*>(x.ptr);
  return to_f(p[b * x.stride[0] + h * x.stride[1] + n * x.stride[2] + c * x.stride[3]]);
}

template <typename T>
__device__ __forceinline__ void st(const CmkMutView& x, int64_t b, int64_t h, int64_t n, int64_t c, float v) {
  T* p = static_cast<T*>(x.ptr);
  p[b * x.stride[0] + h * x.stride[1] + n * x.stride[2] + c * x.stride[3]] = from_f<T>(v);
}

// (row, channel) of the idx-th element of a [rows, D] tile; channel-fastest when d is the
// contiguous dim (coalesced for [B, H, N, d]), row-fastest otherwise (channels-first qkv).
__device__ __forceinline__ void tile_index(int idx, bool d_contig, int rows, int D, int& r, int& c) {
  if (d_contig) {
    r = idx / D;
    c = idx % D;
  } else {
    c = idx / rows;
    r = idx % rows;
  }
}

inline CmkView as_view(const CmkMutView& x) {
  CmkView v;
  v.ptr = x.ptr;
  for (int i = 0; i < 4; ++i) v.stride[i] = x.stride[i];
  return v;
}

}  // namespace cmk
