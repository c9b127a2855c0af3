// Run-time choice among the ISA-specific kernels of isa_core.h (torch-free interface).
#pragma once
#include <cstdint>

namespace cm_kernels {

struct FwdPanels {
  const float *Q, *KT, *V;  // see isa_core.h for the layouts
  int64_t Nq, Nk, d, ldk;
  bool bounded;
  float bound;
  float* O;
  float* lse;
};

struct BwdPanels {
  const float *Q, *QT, *K, *V, *dO, *dOT, *lse, *delta;
  int64_t Nq, Nk, d, ldq;
  float* dQ;
  float* dK;
  float* dV;
};

// Forward-mode AD (JVP) of the attention on float panels of one head: the forward's panels plus
// their tangents, dQ scaled like Q (scale * d(q_hat)) and dKT in KT's tiled layout.
struct JvpPanels {
  const float *Q, *dQ, *KT, *dKT, *V, *dV;  // see isa_core.h for the layouts
  int64_t Nq, Nk, d, ldk;
  bool bounded;
  float bound;
  float* O;
  float* dO;
  float* lse;
};

struct IsaKernels {
  const char* name;  // "avx512" | "avx2" | "base"
  int lanes;         // float lanes per vector
  int tile_cols;     // TC: key (forward) / query (backward) padding unit of the transposed panels
  int64_t group_rows;  // forward query rows per strip (strip = group_rows * (ldk + strip_pad) floats)
  int64_t strip_pad;
  int64_t key_chunk;   // backward key rows per chunk (pt, dst = key_chunk * tile_cols floats)
  void (*attn_fwd_rows)(const FwdPanels&, int64_t r0, int64_t r1, float* strip);
  void (*attn_bwd_keys)(const BwdPanels&, int64_t k0, int64_t k1, float* pt, float* dst);
  // strip and dstrip: group_rows * (ldk + strip_pad) floats each
  void (*attn_jvp_rows)(const JvpPanels&, int64_t r0, int64_t r1, float* strip, float* dstrip);
  void (*normalize_rows)(float* x, int64_t rows, int64_t d, float eps, float mult, bool normalize);
  // x <- mult * x_hat and t <- mult * d(x_hat) for tangent t (the JVP of normalize_rows)
  void (*normalize_jvp_rows)(float* x, float* t, int64_t rows, int64_t d, float eps, float mult, bool normalize);
  void (*normalize_bwd_rows)(const float* x, const float* g, float* out, int64_t rows, int64_t d, float eps, float mult,
                             bool normalize);
  void (*bf16_to_f32)(const uint16_t* src, float* dst, int64_t n);
  void (*f32_to_bf16)(const float* src, uint16_t* dst, int64_t n);
  double (*sumsq_diff_f32)(const float* a, const float* b, int64_t n);
  double (*sumsq_diff_bf16)(const uint16_t* a, const uint16_t* b, int64_t n);
  void (*scaled_diff_f32)(const float* a, const float* b, float* out, int64_t n, float coef, bool stream);
  // float16: F16C conversions in the AVX2/AVX-512 builds, bit manipulation in the baseline one.
  double (*sumsq_diff_f16)(const uint16_t* a, const uint16_t* b, int64_t n);
  void (*scaled_diff_f16)(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t n, float coef, bool stream);
  void (*scaled_diff_bf16)(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t n, float coef,
                           bool stream);
};

// The kernels for this CPU: the widest of avx512 (AVX-512 F/BW/VL/DQ + FMA), avx2 (AVX2 + FMA)
// and base (the build's baseline, SSE2 on x86-64) that the CPU supports, or the one named by
// CM_KERNELS_ISA when the CPU supports it. Decided once per process.
const IsaKernels& isa_kernels();
// For tests: the named set if this CPU can run it, else nullptr.
const IsaKernels* isa_kernels_named(const char* name);
// Switch the process to the named set ("auto": the default choice); nullptr (and no change) if
// this CPU cannot run it. For tests and benchmarks; not meant to race with running kernels.
const IsaKernels* set_isa_kernels(const char* name);

namespace isa_avx512 { const IsaKernels& table(); }
namespace isa_avx2 { const IsaKernels& table(); }
namespace isa_base { const IsaKernels& table(); }

}  // namespace cm_kernels
