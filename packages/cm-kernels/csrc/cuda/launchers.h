// C interface of the CUDA kernels: raw pointers, sizes, element strides and a stream. No torch
// headers, so every .cu file compiles with plain nvcc (CI checks that without a CUDA torch).
// Every launcher returns a cudaError_t as int (0 = success).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum CmkDtype { CMK_FLOAT32 = 0, CMK_FLOAT16 = 1, CMK_BFLOAT16 = 2 };

// A [B, H, N, d] tensor addressed through element strides (any layout, e.g. ADM channels-first).
typedef struct {
  const void* ptr;
  int64_t stride[4];
} CmkView;

typedef struct {
  void* ptr;
  int64_t stride[4];
} CmkMutView;

typedef struct {
  int64_t B, H, Nq, Nk, d;
  float scale;
  float eps;
  int mode;       // 0 none, 1 qk, 2 qkv
  int use_bound;  // skip the running max, logits bounded by `bound` (see cpu/attention.cpp)
  float bound;    // d * scale
  int tensor_cores;  // float16 / bfloat16 forward: the mma.sync kernel (sm_80+; attention_mma.cuh)
} CmkAttnParams;

// ---- pseudo-Huber: loss_b = s_b / (sqrt(s_b + c^2) + c), s_b = ||pred_b - target_b||^2 ----
int64_t cmk_pseudo_huber_num_chunks(int64_t D);
// partial: workspace of B * cmk_pseudo_huber_num_chunks(D) floats; loss: [B] float.
int cmk_pseudo_huber_fwd(int dtype, const void* pred, const void* target, float* partial, float* loss,
                         int64_t B, int64_t D, float c, cudaStream_t stream);
// grad_pred = grad_loss_b / (loss_b + c) * (pred - target), contiguous [B, D].
int cmk_pseudo_huber_bwd(int dtype, const float* grad_loss, const void* pred, const void* target,
                         const float* loss, void* grad_pred, int64_t B, int64_t D, float c, cudaStream_t stream);

// ---- normalized attention ----
int cmk_attn_head_dim_supported(int64_t d);
// workspace floats needed by fwd / bwd / jvp.
int64_t cmk_attn_fwd_workspace(CmkAttnParams p);
int64_t cmk_attn_bwd_workspace(CmkAttnParams p);
int64_t cmk_attn_jvp_workspace(CmkAttnParams p);
// out: [B, H, Nq, d] (strided, input dtype); lse: [B*H*Nq] float.
int cmk_attn_fwd(int dtype, CmkAttnParams p, CmkView q, CmkView k, CmkView v, CmkMutView out, float* lse,
                 float* workspace, cudaStream_t stream);
int cmk_attn_bwd(int dtype, CmkAttnParams p, CmkView dout, CmkView q, CmkView k, CmkView v, CmkView out,
                 const float* lse, CmkMutView dq, CmkMutView dk, CmkMutView dv, float* workspace,
                 cudaStream_t stream);
// Forward-mode AD: out and its tangent tout (both [B, H, Nq, d], strided, input dtype) given the
// tangents tq, tk, tv of q, k, v (their layouts); lse as cmk_attn_fwd.
int cmk_attn_jvp(int dtype, CmkAttnParams p, CmkView q, CmkView k, CmkView v, CmkView tq, CmkView tk, CmkView tv,
                 CmkMutView out, CmkMutView tout, float* lse, float* workspace, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
