// Op declarations: the one place where the cm_kernels op namespace and its schemas live.
// Importing the Python module cm_kernels._C runs the static registrations in this library
// (TORCH_LIBRARY here, TORCH_LIBRARY_IMPL in cpu/*.cpp and cuda/binding.cpp); the module
// itself exports nothing, so the Python wrappers in cm_kernels are the only public surface.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common.h"
#include "cpu/isa.h"

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
  // Forward-mode AD: the forward and its tangent in one pass, given the tangents tq, tk, tv of q, k,
  // v (tqkv of qkv). Returns (out, logsumexp, tangent of out). CPU and CUDA float32/bfloat16/float16
  // (CPU: head dims a multiple of 16; CUDA: the forward's head dims); the Python side
  // (cm_kernels/_forward_ad.py) runs the same formula in torch ops elsewhere.
  m.def("normalized_attention_jvp(Tensor q, Tensor k, Tensor v, Tensor tq, Tensor tk, Tensor tv, float scale, str normalize, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("normalized_attention_qkv_jvp(Tensor qkv, Tensor tqkv, int num_heads, float scale, str normalize, float eps) -> (Tensor, Tensor, Tensor)");
  // The instruction set the CPU kernels use ("avx512" | "avx2" | "base", chosen at run time), and
  // a switch to another one this CPU supports ("auto": the default), for tests and benchmarks;
  // returns the set in effect afterwards.
  m.def("cpu_isa() -> str", []() { return std::string(cm_kernels::isa_kernels().name); });
  m.def("set_cpu_isa(str name) -> str", [](c10::string_view name) {
    const std::string want(name.data(), name.size());
    TORCH_CHECK_VALUE(want == "auto" || want == "avx512" || want == "avx2" || want == "base",
                      "cm_kernels.set_cpu_isa: name must be 'auto', 'avx512', 'avx2' or 'base', got '", want, "'");
    TORCH_CHECK_VALUE(cm_kernels::set_isa_kernels(want.c_str()) != nullptr,
                      "cm_kernels.set_cpu_isa: this CPU cannot run the '", want, "' kernels");
    return std::string(cm_kernels::isa_kernels().name);
  });
  // The opt-in tensor-core forward of the CUDA attention (float16 / bfloat16, sm_80+); returns the
  // setting in effect afterwards. CUDA tensors only; the CPU kernels ignore it.
  m.def("cuda_tensor_cores() -> bool", []() { return cm_kernels::cuda_tensor_cores_flag().load(); });
  m.def("set_cuda_tensor_cores(bool on) -> bool", [](bool on) {
    cm_kernels::cuda_tensor_cores_flag().store(on);
    return on;
  });
  m.def("normalized_attention_qkv_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale, str normalize, float eps) -> Tensor");
}
