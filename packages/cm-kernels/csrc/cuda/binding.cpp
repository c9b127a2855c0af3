// CUDA binding: checks, allocation and stream handling in torch; the math in the torch-free
// launchers (launchers.h). Compiled only when setup.py builds the CUDA kernels.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "launchers.h"

namespace cm_kernels {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CMK_FLOAT32;
    case at::kHalf: return CMK_FLOAT16;
    case at::kBFloat16: return CMK_BFLOAT16;
    default:
      TORCH_CHECK_TYPE(false, "cm_kernels CUDA kernels support float32, float16 and bfloat16 (float64 is CPU-only), got ", t);
  }
  return -1;
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "cm_kernels: CUDA ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

CmkView view(const at::Tensor& x) {
  CmkView v;
  v.ptr = x.const_data_ptr();
  for (int i = 0; i < 4; ++i) v.stride[i] = x.stride(i);
  return v;
}

CmkMutView mut_view(at::Tensor& x) {
  CmkMutView v;
  v.ptr = x.data_ptr();
  for (int i = 0; i < 4; ++i) v.stride[i] = x.stride(i);
  return v;
}

at::Tensor pseudo_huber_fwd_cuda(const at::Tensor& pred_in, const at::Tensor& target_in, double c) {
  check_pseudo_huber_pair(pred_in, target_in, c);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const int64_t B = pred.size(0), D = pred.numel() / B;
  const auto fopt = pred.options().dtype(at::kFloat);
  at::Tensor partial = at::empty({B * cmk_pseudo_huber_num_chunks(D)}, fopt);
  at::Tensor loss = at::empty({B}, fopt);
  check_launch(cmk_pseudo_huber_fwd(dtype_code(pred.scalar_type()), pred.const_data_ptr(), target.const_data_ptr(),
                                    partial.data_ptr<float>(), loss.data_ptr<float>(), B, D, static_cast<float>(c),
                                    c10::cuda::getCurrentCUDAStream().stream()),
               "pseudo_huber_fwd");
  return loss;
}

at::Tensor pseudo_huber_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& pred_in, const at::Tensor& target_in,
                                 const at::Tensor& loss_in, double c) {
  check_pseudo_huber_pair(pred_in, target_in, c);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const int64_t B = pred.size(0), D = pred.numel() / B;
  const at::Tensor gl = grad_loss.to(at::kFloat).contiguous(), loss = loss_in.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(gl.numel() == B && loss.numel() == B, "cm_kernels.pseudo_huber_bwd: grad_loss and loss must have B elements");
  at::Tensor grad = at::empty_like(pred, at::MemoryFormat::Contiguous);
  check_launch(cmk_pseudo_huber_bwd(dtype_code(pred.scalar_type()), gl.const_data_ptr<float>(), pred.const_data_ptr(),
                                    target.const_data_ptr(), loss.const_data_ptr<float>(), grad.data_ptr(), B, D,
                                    static_cast<float>(c), c10::cuda::getCurrentCUDAStream().stream()),
               "pseudo_huber_bwd");
  return grad;
}

CmkAttnParams params(const at::Tensor& q, const at::Tensor& k, double scale, int mode, double eps) {
  CmkAttnParams p;
  p.B = q.size(0);
  p.H = q.size(1);
  p.Nq = q.size(2);
  p.Nk = k.size(2);
  p.d = q.size(3);
  p.scale = static_cast<float>(scale);
  p.eps = static_cast<float>(eps);
  p.mode = mode;
  p.use_bound = use_logit_bound(mode, p.d, scale) ? 1 : 0;
  p.bound = static_cast<float>(static_cast<double>(p.d) * scale);
  TORCH_CHECK_VALUE(cmk_attn_head_dim_supported(p.d), "cm_kernels.normalized_attention: unsupported head dim ", p.d);
  p.tensor_cores = 0;
  if (q.scalar_type() != at::kFloat && cuda_tensor_cores_flag().load()) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device());
    p.tensor_cores = major >= 8 ? 1 : 0;  // mma.sync m16n8k16 with bf16 needs sm_80
  }
  return p;
}

at::Tensor attn_fwd_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor out_view,
                         double scale, int mode, double eps) {
  const CmkAttnParams p = params(q, k, scale, mode, eps);
  const auto fopt = q.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({p.B, p.H, p.Nq}, fopt);
  at::Tensor ws = at::empty({cmk_attn_fwd_workspace(p)}, fopt);
  check_launch(cmk_attn_fwd(dtype_code(q.scalar_type()), p, view(q), view(k), view(v), mut_view(out_view),
                            lse.data_ptr<float>(), ws.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
               "normalized_attention_fwd");
  return lse;
}

void attn_bwd_into(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse_in, at::Tensor dq, at::Tensor dk, at::Tensor dv,
                   double scale, int mode, double eps) {
  const CmkAttnParams p = params(q, k, scale, mode, eps);
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  at::Tensor ws = at::empty({cmk_attn_bwd_workspace(p)}, q.options().dtype(at::kFloat));
  check_launch(cmk_attn_bwd(dtype_code(q.scalar_type()), p, view(g), view(q), view(k), view(v), view(out),
                            lse.const_data_ptr<float>(), mut_view(dq), mut_view(dk), mut_view(dv), ws.data_ptr<float>(),
                            c10::cuda::getCurrentCUDAStream().stream()),
               "normalized_attention_bwd");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double scale, c10::string_view normalize, double eps) {
  check_attention(q, k, v, scale, eps);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = attn_fwd_into(q, k, v, out, scale, parse_normalize(normalize), eps);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  double scale, c10::string_view normalize,
                                                                  double eps) {
  check_attention(q, k, v, scale, eps);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()), dv = at::empty(v.sizes(), v.options());
  attn_bwd_into(grad_out.to(q.scalar_type()), q, k, v, out, lse, dq, dk, dv, scale, parse_normalize(normalize), eps);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> attention_qkv_fwd_cuda(const at::Tensor& qkv, int64_t num_heads, double scale,
                                                          c10::string_view normalize, double eps) {
  const auto parts = split_qkv(qkv, num_heads);
  check_attention(parts[0], parts[1], parts[2], scale, eps);
  const c10::cuda::CUDAGuard guard(qkv.device());
  at::Tensor out = at::empty({qkv.size(0), qkv.size(1) / 3, qkv.size(2)}, qkv.options());
  at::Tensor lse = attn_fwd_into(parts[0], parts[1], parts[2], heads_view(out, num_heads), scale, parse_normalize(normalize), eps);
  return {out, lse};
}

at::Tensor attention_qkv_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                  const at::Tensor& lse, int64_t num_heads, double scale, c10::string_view normalize,
                                  double eps) {
  const auto parts = split_qkv(qkv, num_heads);
  check_attention(parts[0], parts[1], parts[2], scale, eps);
  const c10::cuda::CUDAGuard guard(qkv.device());
  at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options());
  auto dparts = split_qkv(dqkv, num_heads);
  attn_bwd_into(heads_view(grad_out.to(qkv.scalar_type()), num_heads), parts[0], parts[1], parts[2],
                heads_view(out, num_heads), lse, dparts[0], dparts[1], dparts[2], scale, parse_normalize(normalize), eps);
  return dqkv;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jvp_into(const std::array<at::Tensor, 3>& x,
                                                        const std::array<at::Tensor, 3>& t, at::Tensor out,
                                                        at::Tensor out_view, at::Tensor tout, at::Tensor tout_view,
                                                        double scale, int mode, double eps) {
  check_tangents(x, t);
  const CmkAttnParams p = params(x[0], x[1], scale, mode, eps);
  const auto fopt = x[0].options().dtype(at::kFloat);
  at::Tensor lse = at::empty({p.B, p.H, p.Nq}, fopt);
  at::Tensor ws = at::empty({cmk_attn_jvp_workspace(p)}, fopt);
  check_launch(cmk_attn_jvp(dtype_code(x[0].scalar_type()), p, view(x[0]), view(x[1]), view(x[2]), view(t[0]),
                            view(t[1]), view(t[2]), mut_view(out_view), mut_view(tout_view), lse.data_ptr<float>(),
                            ws.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
               "normalized_attention_jvp");
  return {out, lse, tout};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_jvp_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& tq,
                                                                  const at::Tensor& tk, const at::Tensor& tv,
                                                                  double scale, c10::string_view normalize,
                                                                  double eps) {
  check_attention(q, k, v, scale, eps);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options()), tout = at::empty(q.sizes(), q.options());
  return jvp_into({q, k, v}, {tq, tk, tv}, out, out, tout, tout, scale, parse_normalize(normalize), eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_qkv_jvp_cuda(const at::Tensor& qkv, const at::Tensor& tqkv,
                                                                      int64_t num_heads, double scale,
                                                                      c10::string_view normalize, double eps) {
  const auto parts = split_qkv(qkv, num_heads);
  check_attention(parts[0], parts[1], parts[2], scale, eps);
  check_qkv_tangent(qkv, tqkv);
  const c10::cuda::CUDAGuard guard(qkv.device());
  at::Tensor out = at::empty({qkv.size(0), qkv.size(1) / 3, qkv.size(2)}, qkv.options());
  at::Tensor tout = at::empty(out.sizes(), out.options());
  return jvp_into(parts, split_qkv(tqkv, num_heads), out, heads_view(out, num_heads), tout,
                  heads_view(tout, num_heads), scale, parse_normalize(normalize), eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(cm_kernels, CUDA, m) {
  m.impl("pseudo_huber_fwd", &pseudo_huber_fwd_cuda);
  m.impl("pseudo_huber_bwd", &pseudo_huber_bwd_cuda);
  m.impl("normalized_attention_fwd", &attention_fwd_cuda);
  m.impl("normalized_attention_bwd", &attention_bwd_cuda);
  m.impl("normalized_attention_qkv_fwd", &attention_qkv_fwd_cuda);
  m.impl("normalized_attention_qkv_bwd", &attention_qkv_bwd_cuda);
  m.impl("normalized_attention_jvp", &attention_jvp_cuda);
  m.impl("normalized_attention_qkv_jvp", &attention_qkv_jvp_cuda);
}

}  // namespace cm_kernels
