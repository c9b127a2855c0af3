// CPU pseudo-Huber loss (Song & Dhariwal 2023, iCT eq. 7 per sample):
//   loss_b = sqrt(||pred_b - target_b||^2 + c^2) - c = s_b / (sqrt(s_b + c^2) + c),  s_b = ||.||^2
// The second form has no cancellation when s_b << c^2. Forward reads pred and target once;
// backward reads them once more and writes the gradient: 5 passes of B*D elements in total.
// float32 and bfloat16 run the vectorized loops of isa_core.h (AVX-512 / AVX2 / baseline, chosen
// at run time), float16 too; float64 the portable loops of simd.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"
#include "isa.h"
#include "simd.h"

namespace cm_kernels {
namespace {

// One task = one chunk of one sample; partial sums are combined in a fixed order, so results
// do not depend on the thread count and samples of any size spread over all threads.
constexpr int64_t kChunk = int64_t{1} << 14;
// Gradients at least this large are written with streaming stores (see isa_core.h): through the
// cache, a 6.3 MB bf16 gradient evicted pred and target, which the next forward then read from DRAM
// (1 thread: 0.64 ms instead of 1.0-2.0 ms for [256, 3, 64, 64]; bench/RESULTS.md).
constexpr size_t kStreamBytes = size_t{4} << 20;

// sum (a_i - b_i)^2 and out_i = coef (a_i - b_i): the ISA kernels for float32 and bfloat16,
// the portable loops otherwise.
template <typename T>
at::opmath_type<T> sumsq_diff(const IsaKernels&, const T* a, const T* b, int64_t n) {
  return simd::sumsq_diff<T, at::opmath_type<T>>(a, b, n);
}
template <>
float sumsq_diff<float>(const IsaKernels& isa, const float* a, const float* b, int64_t n) {
  return static_cast<float>(isa.sumsq_diff_f32(a, b, n));
}
template <>
float sumsq_diff<at::BFloat16>(const IsaKernels& isa, const at::BFloat16* a, const at::BFloat16* b, int64_t n) {
  return static_cast<float>(
      isa.sumsq_diff_bf16(reinterpret_cast<const uint16_t*>(a), reinterpret_cast<const uint16_t*>(b), n));
}

template <>
float sumsq_diff<at::Half>(const IsaKernels& isa, const at::Half* a, const at::Half* b, int64_t n) {
  return static_cast<float>(
      isa.sumsq_diff_f16(reinterpret_cast<const uint16_t*>(a), reinterpret_cast<const uint16_t*>(b), n));
}

template <typename T>
void scaled_diff(const IsaKernels&, const T* a, const T* b, T* out, int64_t n, at::opmath_type<T> coef, bool) {
  simd::scaled_diff<T, at::opmath_type<T>>(a, b, out, n, coef);
}
template <>
void scaled_diff<float>(const IsaKernels& isa, const float* a, const float* b, float* out, int64_t n, float coef,
                        bool stream) {
  isa.scaled_diff_f32(a, b, out, n, coef, stream);
}
template <>
void scaled_diff<at::Half>(const IsaKernels& isa, const at::Half* a, const at::Half* b, at::Half* out, int64_t n,
                           float coef, bool stream) {
  isa.scaled_diff_f16(reinterpret_cast<const uint16_t*>(a), reinterpret_cast<const uint16_t*>(b),
                      reinterpret_cast<uint16_t*>(out), n, coef, stream);
}
template <>
void scaled_diff<at::BFloat16>(const IsaKernels& isa, const at::BFloat16* a, const at::BFloat16* b, at::BFloat16* out,
                               int64_t n, float coef, bool stream) {
  isa.scaled_diff_bf16(reinterpret_cast<const uint16_t*>(a), reinterpret_cast<const uint16_t*>(b),
                       reinterpret_cast<uint16_t*>(out), n, coef, stream);
}

at::Tensor pseudo_huber_fwd_cpu(const at::Tensor& pred_in, const at::Tensor& target_in, double c) {
  check_pseudo_huber_pair(pred_in, target_in, c);
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t B = pred.size(0);
  const int64_t D = pred.numel() / B;
  const int64_t nch = std::max<int64_t>(1, (D + kChunk - 1) / kChunk);
  at::Tensor loss = at::empty({B}, pred.options().dtype(accumulate_type(pred.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pseudo_huber_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    std::vector<A> partial(B * nch);
    const IsaKernels& isa = isa_kernels();
    at::parallel_for(0, B * nch, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / nch, off = (task % nch) * kChunk;
        const int64_t len = std::min(kChunk, D - off);
        const scalar_t *pp = p + b * D + off, *tp = t + b * D + off;
        partial[task] = len > 0 ? sumsq_diff(isa, pp, tp, len) : A(0);
      }
    });
    A* out = loss.data_ptr<A>();
    const A cc = static_cast<A>(c);
    for (int64_t b = 0; b < B; ++b) {
      A s = 0;
      for (int64_t k = 0; k < nch; ++k) s += partial[b * nch + k];
      out[b] = s / (std::sqrt(s + cc * cc) + cc);
    }
  });
  return loss;
}

at::Tensor pseudo_huber_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& pred_in, const at::Tensor& target_in,
                                const at::Tensor& loss_in, double c) {
  check_pseudo_huber_pair(pred_in, target_in, c);
  const int64_t B = pred_in.size(0);
  TORCH_CHECK_VALUE(grad_loss.numel() == B && loss_in.numel() == B, "cm_kernels.pseudo_huber_bwd: grad_loss and loss must have B elements");
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const auto acc_t = accumulate_type(pred.scalar_type());
  const at::Tensor gl = grad_loss.to(acc_t).contiguous();
  const at::Tensor loss = loss_in.to(acc_t).contiguous();
  const int64_t D = pred.numel() / B;
  const int64_t nch = std::max<int64_t>(1, (D + kChunk - 1) / kChunk);
  at::Tensor grad = at::empty_like(pred, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pseudo_huber_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const A* glp = gl.const_data_ptr<A>();
    const A* lp = loss.const_data_ptr<A>();
    const A cc = static_cast<A>(c);
    const IsaKernels& isa = isa_kernels();
    const bool stream = grad.nbytes() >= kStreamBytes;
    at::parallel_for(0, B * nch, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / nch, off = (task % nch) * kChunk;
        const int64_t len = std::min(kChunk, D - off);
        if (len <= 0) continue;
        // d loss_b / d pred = (pred - target) / sqrt(s_b + c^2), and sqrt(s_b + c^2) = loss_b + c.
        const A coef = glp[b] / (lp[b] + cc);
        const scalar_t *pp = p + b * D + off, *tp = t + b * D + off;
        scalar_t* gp = g + b * D + off;
        scaled_diff(isa, pp, tp, gp, len, coef, stream);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(cm_kernels, CPU, m) {
  m.impl("pseudo_huber_fwd", &pseudo_huber_fwd_cpu);
  m.impl("pseudo_huber_bwd", &pseudo_huber_bwd_cpu);
}

}  // namespace cm_kernels
