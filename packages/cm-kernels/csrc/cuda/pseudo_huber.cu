// CUDA pseudo-Huber loss, forward (two-stage deterministic per-sample reduction) and backward
// (one elementwise pass). Accumulates in float32 for every input dtype.
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per block in the forward reduction

template <typename T>
__global__ void partial_sumsq(const T* __restrict__ pred, const T* __restrict__ target, float* __restrict__ partial,
                              int64_t D, int64_t nch) {
  const int64_t b = blockIdx.y, ch = blockIdx.x;
  const int64_t begin = ch * kChunk, end = min(D, begin + kChunk);
  const T* p = pred + b * D;
  const T* t = target + b * D;
  float acc = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float d = cmk::to_f(p[i]) - cmk::to_f(t[i]);
    acc = fmaf(d, d, acc);
  }
  __shared__ float warp_acc[kThreads / 32];
  acc = cmk::warp_sum(acc);
  if (threadIdx.x % 32 == 0) warp_acc[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < kThreads / 32 ? warp_acc[threadIdx.x] : 0.f;
    v = cmk::warp_sum(v);
    if (threadIdx.x == 0) partial[b * nch + ch] = v;
  }
}

__global__ void finalize(const float* __restrict__ partial, float* __restrict__ loss, int64_t B, int64_t nch, float c) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b >= B) return;
  float s = 0.f;
  for (int64_t k = 0; k < nch; ++k) s += partial[b * nch + k];  // fixed order: deterministic
  loss[b] = s / (sqrtf(s + c * c) + c);                         // = sqrt(s + c^2) - c, no cancellation
}

template <typename T>
__global__ void backward(const float* __restrict__ grad_loss, const T* __restrict__ pred, const T* __restrict__ target,
                         const float* __restrict__ loss, T* __restrict__ grad, int64_t B, int64_t D, float c) {
  const int64_t n = B * D;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / D;
    const float coef = grad_loss[b] / (loss[b] + c);  // 1 / sqrt(s_b + c^2) times the upstream grad
    grad[i] = cmk::from_f<T>(coef * (cmk::to_f(pred[i]) - cmk::to_f(target[i])));
  }
}

template <typename T>
int fwd_impl(const void* pred, const void* target, float* partial, float* loss, int64_t B, int64_t D, float c,
             cudaStream_t stream) {
  const int64_t nch = cmk_pseudo_huber_num_chunks(D);
  partial_sumsq<T><<<dim3((unsigned)nch, (unsigned)B), kThreads, 0, stream>>>(
      static_cast<const T*>(pred), static_cast<const T*>(target), partial, D, nch);
  finalize<<<(unsigned)((B + 255) / 256), 256, 0, stream>>>(partial, loss, B, nch, c);
  return (int)cudaGetLastError();
}

template <typename T>
int bwd_impl(const float* grad_loss, const void* pred, const void* target, const float* loss, void* grad, int64_t B,
             int64_t D, float c, cudaStream_t stream) {
  int64_t blocks = (B * D + kThreads - 1) / kThreads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;  // grid-stride loop covers the rest
  backward<T><<<(unsigned)blocks, kThreads, 0, stream>>>(grad_loss, static_cast<const T*>(pred),
                                                        static_cast<const T*>(target), loss, static_cast<T*>(grad), B, D, c);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" int64_t cmk_pseudo_huber_num_chunks(int64_t D) { return D < 1 ? 1 : (D + kChunk - 1) / kChunk; }

extern "C" int cmk_pseudo_huber_fwd(int dtype, const void* pred, const void* target, float* partial, float* loss,
                                    int64_t B, int64_t D, float c, cudaStream_t stream) {
  switch (dtype) {
    case CMK_FLOAT32: return fwd_impl<float>(pred, target, partial, loss, B, D, c, stream);
    case CMK_FLOAT16: return fwd_impl<__half>(pred, target, partial, loss, B, D, c, stream);
    case CMK_BFLOAT16: return fwd_impl<__nv_bfloat16>(pred, target, partial, loss, B, D, c, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

extern "C" int cmk_pseudo_huber_bwd(int dtype, const float* grad_loss, const void* pred, const void* target,
                                    const float* loss, void* grad_pred, int64_t B, int64_t D, float c,
                                    cudaStream_t stream) {
  switch (dtype) {
    case CMK_FLOAT32: return bwd_impl<float>(grad_loss, pred, target, loss, grad_pred, B, D, c, stream);
    case CMK_FLOAT16: return bwd_impl<__half>(grad_loss, pred, target, loss, grad_pred, B, D, c, stream);
    case CMK_BFLOAT16: return bwd_impl<__nv_bfloat16>(grad_loss, pred, target, loss, grad_pred, B, D, c, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}
