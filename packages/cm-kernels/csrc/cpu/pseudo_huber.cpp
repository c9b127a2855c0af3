// CPU pseudo-Huber loss (Song & Dhariwal 2023, iCT eq. 7 per sample):
//   loss_b = sqrt(||pred_b - target_b||^2 + c^2) - c = s_b / (sqrt(s_b + c^2) + c),  s_b = ||.||^2
// The second form has no cancellation when s_b << c^2. Forward reads pred and target once;
// backward reads them once more and writes the gradient: 5 passes of B*D elements in total.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"
#include "simd.h"

namespace cm_kernels {
namespace {

// One task = one chunk of one sample; partial sums are combined in a fixed order, so results
// do not depend on the thread count and samples of any size spread over all threads.
constexpr int64_t kChunk = int64_t{1} << 14;

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
    at::parallel_for(0, B * nch, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / nch, off = (task % nch) * kChunk;
        const int64_t len = std::min(kChunk, D - off);
        partial[task] = len > 0 ? simd::sumsq_diff<scalar_t, A>(p + b * D + off, t + b * D + off, len) : A(0);
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
    at::parallel_for(0, B * nch, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / nch, off = (task % nch) * kChunk;
        const int64_t len = std::min(kChunk, D - off);
        if (len <= 0) continue;
        // d loss_b / d pred = (pred - target) / sqrt(s_b + c^2), and sqrt(s_b + c^2) = loss_b + c.
        const A coef = glp[b] / (lp[b] + cc);
        simd::scaled_diff<scalar_t, A>(p + b * D + off, t + b * D + off, g + b * D + off, len, coef);
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
