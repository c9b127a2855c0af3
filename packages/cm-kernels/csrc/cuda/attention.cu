// C launchers of the attention kernels: dispatch on dtype to the per-dtype instantiations.
#include "attention_kernels.cuh"

extern template int cmk::attn_fwd_t<float>(CmkAttnParams, CmkView, CmkView, CmkView, CmkMutView, float*, float*, cudaStream_t);
extern template int cmk::attn_fwd_t<__half>(CmkAttnParams, CmkView, CmkView, CmkView, CmkMutView, float*, float*, cudaStream_t);
extern template int cmk::attn_fwd_t<__nv_bfloat16>(CmkAttnParams, CmkView, CmkView, CmkView, CmkMutView, float*, float*, cudaStream_t);
extern template int cmk::attn_jvp_t<float>(CmkAttnParams, CmkView, CmkView, CmkView, CmkView, CmkView, CmkView, CmkMutView, CmkMutView, float*, float*, cudaStream_t);
extern template int cmk::attn_jvp_t<__half>(CmkAttnParams, CmkView, CmkView, CmkView, CmkView, CmkView, CmkView, CmkMutView, CmkMutView, float*, float*, cudaStream_t);
extern template int cmk::attn_jvp_t<__nv_bfloat16>(CmkAttnParams, CmkView, CmkView, CmkView, CmkView, CmkView, CmkView, CmkMutView, CmkMutView, float*, float*, cudaStream_t);
extern template int cmk::attn_bwd_t<float>(CmkAttnParams, CmkView, CmkView, CmkView, CmkView, CmkView, const float*, CmkMutView, CmkMutView, CmkMutView, float*, cudaStream_t);
extern template int cmk::attn_bwd_t<__half>(CmkAttnParams, CmkView, CmkView, CmkView, CmkView, CmkView, const float*, CmkMutView, CmkMutView, CmkMutView, float*, cudaStream_t);
extern template int cmk::attn_bwd_t<__nv_bfloat16>(CmkAttnParams, CmkView, CmkView, CmkView, CmkView, CmkView, const float*, CmkMutView, CmkMutView, CmkMutView, float*, cudaStream_t);

extern "C" int cmk_attn_head_dim_supported(int64_t d) {
  return d == 16 || d == 32 || d == 64 || d == 96 || d == 128;
}

extern "C" int64_t cmk_attn_fwd_workspace(CmkAttnParams p) { return p.B * p.H * (p.Nq + 2 * p.Nk); }

extern "C" int64_t cmk_attn_jvp_workspace(CmkAttnParams p) { return p.B * p.H * 2 * (p.Nq + 2 * p.Nk); }

extern "C" int64_t cmk_attn_bwd_workspace(CmkAttnParams p) { return p.B * p.H * (2 * p.Nq + 2 * p.Nk); }

extern "C" int cmk_attn_fwd(int dtype, CmkAttnParams p, CmkView q, CmkView k, CmkView v, CmkMutView out, float* lse,
                            float* workspace, cudaStream_t stream) {
  switch (dtype) {
    case CMK_FLOAT32: return cmk::attn_fwd_t<float>(p, q, k, v, out, lse, workspace, stream);
    case CMK_FLOAT16: return cmk::attn_fwd_t<__half>(p, q, k, v, out, lse, workspace, stream);
    case CMK_BFLOAT16: return cmk::attn_fwd_t<__nv_bfloat16>(p, q, k, v, out, lse, workspace, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

extern "C" int cmk_attn_bwd(int dtype, CmkAttnParams p, CmkView dout, CmkView q, CmkView k, CmkView v, CmkView out,
                            const float* lse, CmkMutView dq, CmkMutView dk, CmkMutView dv, float* workspace,
                            cudaStream_t stream) {
  switch (dtype) {
    case CMK_FLOAT32: return cmk::attn_bwd_t<float>(p, dout, q, k, v, out, lse, dq, dk, dv, workspace, stream);
    case CMK_FLOAT16: return cmk::attn_bwd_t<__half>(p, dout, q, k, v, out, lse, dq, dk, dv, workspace, stream);
    case CMK_BFLOAT16: return cmk::attn_bwd_t<__nv_bfloat16>(p, dout, q, k, v, out, lse, dq, dk, dv, workspace, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

extern "C" int cmk_attn_jvp(int dtype, CmkAttnParams p, CmkView q, CmkView k, CmkView v, CmkView tq, CmkView tk,
                            CmkView tv, CmkMutView out, CmkMutView tout, float* lse, float* workspace,
                            cudaStream_t stream) {
  switch (dtype) {
    case CMK_FLOAT32: return cmk::attn_jvp_t<float>(p, q, k, v, tq, tk, tv, out, tout, lse, workspace, stream);
    case CMK_FLOAT16: return cmk::attn_jvp_t<__half>(p, q, k, v, tq, tk, tv, out, tout, lse, workspace, stream);
    case CMK_BFLOAT16: return cmk::attn_jvp_t<__nv_bfloat16>(p, q, k, v, tq, tk, tv, out, tout, lse, workspace, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}
