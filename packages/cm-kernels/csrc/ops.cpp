// Op declarations: the one place where the cm_kernels op namespace and its schemas live.
// Importing the Python module cm_kernels._C runs the static registrations in this library
// (TORCH_LIBRARY here, TORCH_LIBRARY_IMPL in cpu/*.cpp and cuda/binding.cpp); the module
// itself exports nothing, so the Python wrappers in cm_kernels are the only public surface.
#include <Python.h>
#include <torch/library.h>

PyMODINIT_FUNC PyInit__C(void) {  // PyMODINIT_FUNC: extern "C", default visibility
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(cm_kernels, m) {
  // Per-sample pseudo-Huber loss sqrt(||pred - target||^2 + c^2) - c over all non-batch dims.
  // Returns loss[B] in float32 (float64 for float64 inputs); backward reuses it as the only
  // saved statistic: d loss_b / d pred_b = (pred_b - target_b) / (loss_b + c).
  m.def("pseudo_huber_fwd(Tensor pred, Tensor target, float c) -> Tensor");
  m.def("pseudo_huber_bwd(Tensor grad_loss, Tensor pred, Tensor target, Tensor loss, float c) -> Tensor");
  // Normalized attention on [B, H, N, d] views (any strides). normalize: "none" | "qk" | "qkv".
  // Returns (out [B, H, Nq, d] in the input dtype, logsumexp [B, H, Nq] in float32/float64).
  m.def("normalized_attention_fwd(Tensor q, Tensor k, Tensor v, float scale, str normalize, float eps) -> (Tensor, Tensor)");
  m.def("normalized_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, str normalize, float eps) -> (Tensor, Tensor, Tensor)");
  // ADM channels-first fused layout: qkv [B, 3*H*d, N], channel order (three, heads, d) as in
  // openai's QKVAttention; out [B, H*d, N]; the gradient is returned in the qkv layout.
  m.def("normalized_attention_qkv_fwd(Tensor qkv, int num_heads, float scale, str normalize, float eps) -> (Tensor, Tensor)");
  m.def("normalized_attention_qkv_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale, str normalize, float eps) -> Tensor");
}
