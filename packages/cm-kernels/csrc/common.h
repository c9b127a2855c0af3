// Shared by the CPU and CUDA bindings (torch-dependent; never included from .cu files).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace cm_kernels {

// Attention normalization mode; "qk" normalizes q and k, "qkv" also v (EDM2 / iCT-BCM).
enum NormalizeMode : int { kNone = 0, kQK = 1, kQKV = 2 };

inline int parse_normalize(c10::string_view s) {
  if (s == "none") return kNone;
  if (s == "qk") return kQK;
  if (s == "qkv") return kQKV;
  TORCH_CHECK_VALUE(false, "cm_kernels: normalize must be 'none', 'qk' or 'qkv', got '",
                    std::string(s.data(), s.size()), "'");
  return kNone;
}

// Skipping the running softmax max is exact only for normalized q and k, and only while the
// shifted exponents stay far from float32 underflow. See the proof in attention.cpp.
constexpr double kMaxBoundLogit = 40.0;

inline bool use_logit_bound(int mode, int64_t d, double scale) {
  return mode != kNone && static_cast<double>(d) * scale <= kMaxBoundLogit;
}

// The opt-in tensor-core (mma.sync) forward of the CUDA attention for float16 / bfloat16 (sm_80+):
// off unless CM_KERNELS_CUDA_MMA=1 at load or set_cuda_tensor_cores(True); one flag per process
// (an inline function's static is shared by every translation unit).
inline std::atomic<bool>& cuda_tensor_cores_flag() {
  static std::atomic<bool> flag([] {
    const char* env = std::getenv("CM_KERNELS_CUDA_MMA");
    return env != nullptr && std::string(env) == "1";
  }());
  return flag;
}

inline void check_pseudo_huber_pair(const at::Tensor& pred, const at::Tensor& target, double c) {
  TORCH_CHECK_VALUE(pred.dim() >= 1 && pred.size(0) > 0, "cm_kernels.pseudo_huber_loss: pred needs a non-empty batch dim, got shape ", pred.sizes());
  TORCH_CHECK_VALUE(pred.sizes() == target.sizes(), "cm_kernels.pseudo_huber_loss: pred ", pred.sizes(), " and target ", target.sizes(), " differ in shape");
  TORCH_CHECK_TYPE(pred.scalar_type() == target.scalar_type(), "cm_kernels.pseudo_huber_loss: pred and target dtypes differ");
  TORCH_CHECK_TYPE(at::isFloatingType(pred.scalar_type()), "cm_kernels.pseudo_huber_loss: floating inputs required");
  TORCH_CHECK_VALUE(c > 0, "cm_kernels.pseudo_huber_loss: c must be > 0, got ", c);
}

inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, double eps) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "cm_kernels.normalized_attention: q, k, v must be [B, H, N, d]");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "cm_kernels.normalized_attention: k ", k.sizes(), " and v ", v.sizes(), " differ in shape");
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), "cm_kernels.normalized_attention: q ", q.sizes(), " incompatible with k ", k.sizes());
  TORCH_CHECK_VALUE(q.numel() > 0 && k.numel() > 0, "cm_kernels.normalized_attention: empty input");
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "cm_kernels.normalized_attention: q, k, v dtypes differ");
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "cm_kernels.normalized_attention: floating inputs required");
  TORCH_CHECK_VALUE(scale > 0 && eps > 0, "cm_kernels.normalized_attention: scale and eps must be > 0");
}

// The forward-mode tangents of q, k, v have their primals' shapes, dtypes and devices.
inline void check_tangents(const std::array<at::Tensor, 3>& x, const std::array<at::Tensor, 3>& t) {
  const char* names[] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK_VALUE(t[i].sizes() == x[i].sizes(), "cm_kernels.normalized_attention_jvp: the tangent of ", names[i],
                      " has shape ", t[i].sizes(), ", expected ", x[i].sizes());
    TORCH_CHECK_TYPE(t[i].scalar_type() == x[i].scalar_type() && t[i].device() == x[i].device(),
                     "cm_kernels.normalized_attention_jvp: the tangent of ", names[i], " must have its dtype and device");
  }
}

// The forward-mode tangent of ADM's fused qkv has its shape.
inline void check_qkv_tangent(const at::Tensor& qkv, const at::Tensor& tqkv) {
  TORCH_CHECK_VALUE(tqkv.sizes() == qkv.sizes(), "cm_kernels.normalized_attention_qkv_jvp: the tangent of qkv has shape ",
                    tqkv.sizes(), ", expected ", qkv.sizes());
}

// Views q, k, v [B, H, N, d] of the ADM channels-first qkv [B, 3*H*d, N] tensor, channel order
// (three, heads, d); no copy: the kernels read these strided views directly.
inline std::array<at::Tensor, 3> split_qkv(const at::Tensor& qkv, int64_t num_heads) {
  TORCH_CHECK_VALUE(qkv.dim() == 3, "cm_kernels.normalized_attention_qkv: qkv must be [B, 3*H*d, N], got ", qkv.sizes());
  TORCH_CHECK_VALUE(num_heads > 0 && qkv.size(1) % (3 * num_heads) == 0, "cm_kernels.normalized_attention_qkv: channels ", qkv.size(1), " not divisible by 3*num_heads");
  const int64_t d = qkv.size(1) / (3 * num_heads);
  auto v5 = qkv.unflatten(1, {3, num_heads, d});  // [B, 3, H, d, N]
  return {v5.select(1, 0).transpose(2, 3), v5.select(1, 1).transpose(2, 3), v5.select(1, 2).transpose(2, 3)};
}

// [B, H, N, d] view of a channels-first [B, H*d, N] tensor.
inline at::Tensor heads_view(const at::Tensor& x, int64_t num_heads) {
  return x.unflatten(1, {num_heads, x.size(1) / num_heads}).transpose(2, 3);
}

}  // namespace cm_kernels
