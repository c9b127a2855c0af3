// CPU normalized attention (EDM2 / iCT-BCM "cosine" attention), forward and backward.
//
//   x_hat = x / (eps + ||x|| / sqrt(d))           per head vector (q, k; v when "qkv")
//   O     = softmax(scale * q_hat k_hat^T) v_hat
//
// Layout: every [B, H, N, d] input and output is read or written through its strides, so the
// ADM channels-first qkv tensor [B, 3*H*d, N] is consumed without a transposing copy.
//
// float32, bfloat16, float16 (head dims that are multiples of 16): tasks over (batch x head,
// query range) forward and (batch x head, key range) backward run in parallel; each gathers
// its head into float panels with the normalization fused into that one pass, runs the blocked
// flash-style kernels of isa_core.h (vectorized for AVX-512, AVX2 or the baseline, chosen at run
// time; nothing N x N is stored), and writes its outputs (with the normalization's backward)
// straight into the result tensors. float64 (the precision the tests check against) and other
// head dims take the plain path: at::bmm on score blocks bounded by kScoreBudget elements, then
// elementwise softmax passes.
//
// Forward-mode AD (normalized_attention_jvp, the JVP of the forward): with x_hat's tangent
//   d(x_hat) = f dx - f^2 (x . dx) / (d rms) x,   f = 1 / (eps + rms), rms = ||x|| / sqrt(d),
// p = softmax(S), S = scale q_hat k_hat^T and its tangent dS = scale (d(q_hat) k_hat^T + q_hat d(k_hat)^T),
//   dO = p d(v_hat) + (p o (dS - rowsum(p o dS))) v_hat.
// float32, bfloat16, float16 run the one-pass kernel of isa_core.h (O and dO from the same P,
// the tangents gathered and differentiated alongside their rows); float64 and CUDA tensors use
// the same formula in torch ops (cm_kernels/_forward_ad.py), so this op refuses float64.
//
// Skipping the softmax running max (the logit bound). Claim: for normalized q and k,
// |scale * q_hat . k_hat| <= d * scale.  Proof: ||x_hat|| = ||x|| / (eps + ||x||/sqrt(d))
//   = sqrt(d) * r / (eps + r) with r = ||x||/sqrt(d) >= 0, eps > 0, so ||x_hat|| < sqrt(d)
// (and = 0 when x = 0). By Cauchy-Schwarz |q_hat . k_hat| <= ||q_hat|| ||k_hat|| < d. Hence
// m = d * scale upper-bounds every logit of the row, and softmax(s) = exp(s - m) / sum exp(s - m)
// exactly (softmax is shift invariant for any m). Every exponent lies in [-2m, 0], so when
// m <= kMaxBoundLogit = 40 each term is >= e^-80 > FLT_MIN = 1.2e-38: no term and no row sum
// underflows (the row always contains terms, N >= 1), no term overflows. Beyond that bound,
// or for normalize="none", the true row max is used. tests/test_attention.py tests logits at
// +-m and m = 40 exactly.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "isa.h"
#include "simd.h"

namespace cm_kernels {
namespace {

constexpr int64_t kScoreBudget = int64_t{1} << 22;  // score elements per block (16 MiB fp32)

struct Blocking {
  int64_t heads, rows;  // heads per block, query rows per block
};

Blocking plan_blocks(int64_t BH, int64_t Nq, int64_t Nk) {
  Blocking b;
  b.rows = std::min(Nq, std::max<int64_t>(1, kScoreBudget / Nk));
  b.heads = std::min(BH, std::max<int64_t>(1, kScoreBudget / (b.rows * Nk)));
  return b;
}

int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 16384 / d); }

// xn[r, :] = mult * x[r, :] * (normalize ? 1 / (eps + rms(x[r, :])) : 1), r over (b, h, n);
// x is any-strided [B, H, N, d] of type T, xn a contiguous [B*H*N, d] panel of type A.
template <typename T, typename A>
void gather_rows(const at::Tensor& x, A* xn, bool normalize, A eps, A mult) {
  const int64_t H = x.size(1), N = x.size(2), d = x.size(3);
  const int64_t rows = x.size(0) * H * N;
  const auto st = x.strides();
  const T* base = x.const_data_ptr<T>();
  at::parallel_for(0, rows, row_grain(d), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t n = r % N, h = (r / N) % H, b = r / (N * H);
      const T* src = base + b * st[0] + h * st[1] + n * st[2];
      A* dst = xn + r * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<A>(src[c * st[3]]);
      A f = mult;
      if (normalize) f = mult / (eps + std::sqrt(simd::dot(dst, dst, d) / static_cast<A>(d)));
      simd::scale_inplace(dst, d, f);
    }
  });
}

// dst[b, h, q0 + i, :] = src[(h - h0) * qb + i, :] for the block of heads [h0, h0 + hb) (h over B*H).
template <typename T, typename A>
void scatter_block(const A* src, at::Tensor& dst, int64_t h0, int64_t hb, int64_t q0, int64_t qb) {
  const int64_t H = dst.size(1), d = dst.size(3);
  const auto st = dst.strides();
  T* base = dst.data_ptr<T>();
  at::parallel_for(0, hb * qb, row_grain(d), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t bh = h0 + r / qb, n = q0 + r % qb;
      T* out = base + (bh / H) * st[0] + (bh % H) * st[1] + n * st[2];
      const A* row = src + r * d;
      for (int64_t c = 0; c < d; ++c) out[c * st[3]] = static_cast<T>(row[c]);
    }
  });
}

// Backward of x_hat = x f, f = 1 / (eps + rms), rms = ||x|| / sqrt(d), for a row with upstream
// gradient g = dL/dx_hat:  dL/dx = f g - f^2 (g . x) / (d rms) x   (0 for the second term at x = 0,
// where rms is not differentiable; this matches torch.linalg.vector_norm's subgradient).
// g_panel holds dL/d(mult * x_hat); writes dx in T through dx's strides.
template <typename T, typename A>
void normalize_backward(const at::Tensor& x, const A* g_panel, at::Tensor& dx, bool normalize, A eps, A mult) {
  const int64_t H = x.size(1), N = x.size(2), d = x.size(3);
  const int64_t rows = x.size(0) * H * N;
  const auto sx = x.strides();
  const auto sd = dx.strides();
  const T* xb = x.const_data_ptr<T>();
  T* db = dx.data_ptr<T>();
  at::parallel_for(0, rows, row_grain(d), [&](int64_t lo, int64_t hi) {
    std::vector<A> xr(d), gr(d);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t n = r % N, h = (r / N) % H, b = r / (N * H);
      const T* src = xb + b * sx[0] + h * sx[1] + n * sx[2];
      T* out = db + b * sd[0] + h * sd[1] + n * sd[2];
      const A* g = g_panel + r * d;
      for (int64_t c = 0; c < d; ++c) gr[c] = mult * g[c];
      if (!normalize) {
        for (int64_t c = 0; c < d; ++c) out[c * sd[3]] = static_cast<T>(gr[c]);
        continue;
      }
      for (int64_t c = 0; c < d; ++c) xr[c] = static_cast<A>(src[c * sx[3]]);
      const A rms = std::sqrt(simd::dot(xr.data(), xr.data(), d) / static_cast<A>(d));
      const A f = A(1) / (eps + rms);
      const A coef = rms > A(0) ? f * f * simd::dot(gr.data(), xr.data(), d) / (static_cast<A>(d) * rms) : A(0);
      for (int64_t c = 0; c < d; ++c) out[c * sd[3]] = static_cast<T>(f * gr[c] - coef * xr[c]);
    }
  });
}

template <typename T>
void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                       at::Tensor& lse, double scale, int mode, double eps_d) {
  using A = at::opmath_type<T>;
  const int64_t BH = q.size(0) * q.size(1), Nq = q.size(2), Nk = k.size(2), d = q.size(3);
  const auto opt = q.options().dtype(c10::CppTypeToScalarType<A>::value);
  const A eps = static_cast<A>(eps_d);
  at::Tensor Qn = at::empty({BH, Nq, d}, opt), Kn = at::empty({BH, Nk, d}, opt), Vn = at::empty({BH, Nk, d}, opt);
  gather_rows<T, A>(q, Qn.data_ptr<A>(), mode != kNone, eps, static_cast<A>(scale));  // scale folded into q
  gather_rows<T, A>(k, Kn.data_ptr<A>(), mode != kNone, eps, A(1));
  gather_rows<T, A>(v, Vn.data_ptr<A>(), mode == kQKV, eps, A(1));
  const bool bounded = use_logit_bound(mode, d, scale);
  const A bound = static_cast<A>(static_cast<double>(d) * scale);
  const Blocking blk = plan_blocks(BH, Nq, Nk);
  at::Tensor S_buf = at::empty({blk.heads * blk.rows * Nk}, opt);
  at::Tensor O_buf = at::empty({blk.heads * blk.rows * d}, opt);
  A* lse_p = lse.data_ptr<A>();
  for (int64_t h0 = 0; h0 < BH; h0 += blk.heads) {
    const int64_t hb = std::min(blk.heads, BH - h0);
    for (int64_t q0 = 0; q0 < Nq; q0 += blk.rows) {
      const int64_t qb = std::min(blk.rows, Nq - q0);
      at::Tensor S = S_buf.narrow(0, 0, hb * qb * Nk).view({hb, qb, Nk});
      at::bmm_out(S, Qn.narrow(0, h0, hb).narrow(1, q0, qb), Kn.narrow(0, h0, hb).transpose(1, 2));
      A* Sp = S.data_ptr<A>();
      at::parallel_for(0, hb * qb, std::max<int64_t>(1, 16384 / Nk), [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
          A* row = Sp + r * Nk;
          const A m = bounded ? bound : simd::row_max(row, Nk);
          const A sum = simd::exp_shift_sum(row, Nk, m);
          simd::scale_inplace(row, Nk, A(1) / sum);
          lse_p[(h0 + r / qb) * Nq + q0 + r % qb] = m + std::log(sum);
        }
      });
      at::Tensor O = O_buf.narrow(0, 0, hb * qb * d).view({hb, qb, d});
      at::bmm_out(O, S, Vn.narrow(0, h0, hb));
      scatter_block<T, A>(O.const_data_ptr<A>(), out, h0, hb, q0, qb);
    }
  }
}

template <typename T>
void attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse_in, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                        double scale, int mode, double eps_d) {
  using A = at::opmath_type<T>;
  const int64_t BH = q.size(0) * q.size(1), Nq = q.size(2), Nk = k.size(2), d = q.size(3);
  const auto opt = q.options().dtype(c10::CppTypeToScalarType<A>::value);
  const A eps = static_cast<A>(eps_d);
  at::Tensor Qn = at::empty({BH, Nq, d}, opt), Kn = at::empty({BH, Nk, d}, opt), Vn = at::empty({BH, Nk, d}, opt);
  gather_rows<T, A>(q, Qn.data_ptr<A>(), mode != kNone, eps, static_cast<A>(scale));
  gather_rows<T, A>(k, Kn.data_ptr<A>(), mode != kNone, eps, A(1));
  gather_rows<T, A>(v, Vn.data_ptr<A>(), mode == kQKV, eps, A(1));
  at::Tensor dO = at::empty({BH, Nq, d}, opt), Ob = at::empty({BH, Nq, d}, opt);
  gather_rows<T, A>(grad_out, dO.data_ptr<A>(), false, eps, A(1));
  gather_rows<T, A>(out, Ob.data_ptr<A>(), false, eps, A(1));
  // delta_i = sum_c dO_ic O_ic = sum_j P_ij dP_ij (the softmax-backward row term)
  at::Tensor delta = at::empty({BH * Nq}, opt);
  {
    const A* dOp = dO.const_data_ptr<A>();
    const A* Op = Ob.const_data_ptr<A>();
    A* dp = delta.data_ptr<A>();
    at::parallel_for(0, BH * Nq, row_grain(d), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) dp[r] = simd::dot(dOp + r * d, Op + r * d, d);
    });
  }
  const at::Tensor lse = lse_in.to(opt.dtype()).contiguous();
  at::Tensor dQn = at::empty({BH, Nq, d}, opt), dKn = at::zeros({BH, Nk, d}, opt), dVn = at::zeros({BH, Nk, d}, opt);
  const Blocking blk = plan_blocks(BH, Nq, Nk);
  at::Tensor P_buf = at::empty({blk.heads * blk.rows * Nk}, opt);
  at::Tensor dP_buf = at::empty({blk.heads * blk.rows * Nk}, opt);
  const A* lse_p = lse.const_data_ptr<A>();
  const A* delta_p = delta.const_data_ptr<A>();
  for (int64_t h0 = 0; h0 < BH; h0 += blk.heads) {
    const int64_t hb = std::min(blk.heads, BH - h0);
    at::Tensor Kh = Kn.narrow(0, h0, hb), Vh = Vn.narrow(0, h0, hb);
    at::Tensor dKh = dKn.narrow(0, h0, hb), dVh = dVn.narrow(0, h0, hb);
    for (int64_t q0 = 0; q0 < Nq; q0 += blk.rows) {
      const int64_t qb = std::min(blk.rows, Nq - q0);
      at::Tensor Qb = Qn.narrow(0, h0, hb).narrow(1, q0, qb);
      at::Tensor dOb = dO.narrow(0, h0, hb).narrow(1, q0, qb);
      at::Tensor P = P_buf.narrow(0, 0, hb * qb * Nk).view({hb, qb, Nk});
      at::Tensor dP = dP_buf.narrow(0, 0, hb * qb * Nk).view({hb, qb, Nk});
      at::bmm_out(P, Qb, Kh.transpose(1, 2));
      at::bmm_out(dP, dOb, Vh.transpose(1, 2));
      A* Pp = P.data_ptr<A>();
      A* dPp = dP.data_ptr<A>();
      at::parallel_for(0, hb * qb, std::max<int64_t>(1, 16384 / Nk), [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
          const int64_t i = (h0 + r / qb) * Nq + q0 + r % qb;
          simd::exp_shift(Pp + r * Nk, Nk, lse_p[i]);                       // P = exp(S - lse)
          simd::softmax_grad(Pp + r * Nk, dPp + r * Nk, Nk, delta_p[i]);    // dS = P o (dP - delta)
        }
      });
      dVh.baddbmm_(P.transpose(1, 2), dOb);   // dV_hat += P^T dO
      dKh.baddbmm_(dP.transpose(1, 2), Qb);   // dK_hat += dS^T (scale q_hat)
      at::Tensor dQb = dQn.narrow(0, h0, hb).narrow(1, q0, qb);
      if (qb == Nq) {
        at::bmm_out(dQb, dP, Kh);             // d(scale q_hat) = dS K_hat
      } else {
        dQb.copy_(at::bmm(dP, Kh));
      }
    }
  }
  // dL/dq_hat = scale * dL/d(scale q_hat)
  normalize_backward<T, A>(q, dQn.const_data_ptr<A>(), dq, mode != kNone, eps, static_cast<A>(scale));
  normalize_backward<T, A>(k, dKn.const_data_ptr<A>(), dk, mode != kNone, eps, A(1));
  normalize_backward<T, A>(v, dVn.const_data_ptr<A>(), dv, mode == kQKV, eps, A(1));
}

// ---- float32 / bfloat16 / float16: the blocked kernels of isa_core.h on per-head float panels ----

// A [B, H, N, d] tensor seen as rows (b, h, n) of d elements through its strides.
template <typename T>
struct HeadRows {
  T* base;
  int64_t H, s0, s1, s2, s3;
  explicit HeadRows(const at::Tensor& x)
      : base(const_cast<T*>(x.const_data_ptr<T>())),
        H(x.size(1)),
        s0(x.stride(0)),
        s1(x.stride(1)),
        s2(x.stride(2)),
        s3(x.stride(3)) {}
  T* row(int64_t bh, int64_t n) const { return base + (bh / H) * s0 + (bh % H) * s1 + n * s2; }
};

// dst[(n - n0) * d + c] = float(x[bh, n, c]) for n in [n0, n1).
template <typename T>
void gather(const HeadRows<T>& x, int64_t bh, int64_t n0, int64_t n1, int64_t d, float* dst, const IsaKernels& isa) {
  if (x.s3 == 1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T* src = x.row(bh, n);
      float* out = dst + (n - n0) * d;
      if constexpr (std::is_same_v<T, float>) {
        std::memcpy(out, src, d * sizeof(float));
      } else if constexpr (std::is_same_v<T, at::BFloat16>) {
        isa.bf16_to_f32(reinterpret_cast<const uint16_t*>(src), out, d);
      } else {
        for (int64_t c = 0; c < d; ++c) out[c] = static_cast<float>(src[c]);
      }
    }
  } else {  // channels-first (the ADM qkv layout): read along n, write across the panel
    for (int64_t c = 0; c < d; ++c) {
      const T* src = x.row(bh, n0) + c * x.s3;
      for (int64_t n = n0; n < n1; ++n) dst[(n - n0) * d + c] = static_cast<float>(src[(n - n0) * x.s2]);
    }
  }
}

// x[bh, n, c] = T(src[(n - n0) * d + c]) for n in [n0, n1).
template <typename T>
void scatter(const HeadRows<T>& x, int64_t bh, int64_t n0, int64_t n1, int64_t d, const float* src,
             const IsaKernels& isa) {
  if (x.s3 == 1) {
    for (int64_t n = n0; n < n1; ++n) {
      T* out = x.row(bh, n);
      const float* in = src + (n - n0) * d;
      if constexpr (std::is_same_v<T, float>) {
        std::memcpy(out, in, d * sizeof(float));
      } else if constexpr (std::is_same_v<T, at::BFloat16>) {
        isa.f32_to_bf16(in, reinterpret_cast<uint16_t*>(out), d);
      } else {
        for (int64_t c = 0; c < d; ++c) out[c] = static_cast<T>(in[c]);
      }
    }
  } else {
    for (int64_t c = 0; c < d; ++c) {
      T* out = x.row(bh, n0) + c * x.s3;
      for (int64_t n = n0; n < n1; ++n) out[(n - n0) * x.s2] = static_cast<T>(src[(n - n0) * d + c]);
    }
  }
}

// src [rows][d] transposed into tiles of tc rows: dst[t*d*tc + c*tc + i] = src[(t*tc + i)*d + c],
// zero for t*tc + i >= rows, up to ld = round_up(rows, tc) (the layout isa_core.h reads).
inline void transpose_tiles(const float* src, int64_t rows, int64_t d, float* dst, int64_t tc, int64_t ld) {
  for (int64_t t0 = 0; t0 < ld; t0 += tc) {
    float* tile = dst + t0 * d;
    const int64_t n1 = std::min(rows, t0 + tc);
    for (int64_t c = 0; c < d; ++c) {
      float* out = tile + c * tc;
      int64_t i = 0;
      for (; t0 + i < n1; ++i) out[i] = src[(t0 + i) * d + c];
      for (; i < tc; ++i) out[i] = 0.f;
    }
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// How many pieces to cut each head's rows into so that every thread has work: none while
// there are >= 4 heads per thread; otherwise enough for ~4 tasks per thread, each >= min_rows.
inline int64_t splits_for(int64_t BH, int64_t N, int64_t min_rows) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || BH >= 4 * threads) return 1;
  const int64_t want = (4 * threads + BH - 1) / BH;
  return std::max<int64_t>(1, std::min(want, N / min_rows));
}

template <typename T>
void fast_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                  double scale, int mode, double eps_d) {
  const IsaKernels& isa = isa_kernels();
  const int64_t BH = q.size(0) * q.size(1), Nq = q.size(2), Nk = k.size(2), d = q.size(3);
  const int64_t ldk = round_up(Nk, isa.tile_cols);
  const float eps = static_cast<float>(eps_d);
  const bool bounded = use_logit_bound(mode, d, scale);
  const HeadRows<T> qr(q), kr(k), vr(v), orows(out);
  float* lse_p = lse.data_ptr<float>();  // [B, H, Nq] contiguous
  const int64_t split = splits_for(BH, Nq, isa.group_rows);
  const int64_t rows_per = round_up((Nq + split - 1) / split, isa.group_rows);
  at::parallel_for(0, BH * split, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(Nq * d * 2 + Nk * d * 2 + d * ldk + isa.group_rows * (ldk + isa.strip_pad));
    float* Q = buf.data();
    float* O = Q + Nq * d;
    float* Kp = O + Nq * d;
    float* V = Kp + Nk * d;
    float* KT = V + Nk * d;
    float* strip = KT + d * ldk;
    int64_t loaded_bh = -1;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t bh = task / split;
      const int64_t r0 = std::min(Nq, (task % split) * rows_per), r1 = std::min(Nq, r0 + rows_per);
      if (r0 >= r1) continue;
      if (bh != loaded_bh) {  // K and V of this head, normalized, K also transposed
        gather(kr, bh, 0, Nk, d, Kp, isa);
        isa.normalize_rows(Kp, Nk, d, eps, 1.0f, mode != kNone);
        transpose_tiles(Kp, Nk, d, KT, isa.tile_cols, ldk);
        gather(vr, bh, 0, Nk, d, V, isa);
        isa.normalize_rows(V, Nk, d, eps, 1.0f, mode == kQKV);
        loaded_bh = bh;
      }
      gather(qr, bh, r0, r1, d, Q + r0 * d, isa);
      isa.normalize_rows(Q + r0 * d, r1 - r0, d, eps, static_cast<float>(scale), mode != kNone);
      const FwdPanels f{Q, KT, V, Nq, Nk, d, ldk, bounded, static_cast<float>(d * scale), O, lse_p + bh * Nq};
      isa.attn_fwd_rows(f, r0, r1, strip);
      scatter(orows, bh, r0, r1, d, O + r0 * d, isa);
    }
  });
}

template <typename T>
void fast_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse_in, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                   double scale, int mode, double eps_d) {
  const IsaKernels& isa = isa_kernels();
  const int64_t BH = q.size(0) * q.size(1), Nq = q.size(2), Nk = k.size(2), d = q.size(3);
  const int64_t ldq = round_up(Nq, isa.tile_cols);
  const float eps = static_cast<float>(eps_d);
  const float fscale = static_cast<float>(scale);
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  const float* lse_p = lse.const_data_ptr<float>();
  const HeadRows<T> qr(q), kr(k), vr(v), gr(grad_out), orows(out), dqr(dq), dkr(dk), dvr(dv);
  const int64_t split = splits_for(BH, Nk, 24);
  const int64_t keys_per = round_up((Nk + split - 1) / split, 8);
  // With several key ranges per head, each range's dQ goes to its own slot, summed afterwards.
  std::vector<float> dq_parts(split > 1 ? split * BH * Nq * d : 0);
  at::parallel_for(0, BH * split, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(Nq * d * 5 + 2 * d * ldq + 2 * ldq + Nk * d * 6 +
                           2 * isa.key_chunk * isa.tile_cols);
    float* Qraw = buf.data();
    float* Q = Qraw + Nq * d;
    float* dO = Q + Nq * d;
    float* Ob = dO + Nq * d;  // O rows, then reused for dq
    float* dQ = Ob + Nq * d;
    float* QT = dQ + Nq * d;
    float* dOT = QT + d * ldq;
    float* lse_b = dOT + d * ldq;
    float* delta = lse_b + ldq;
    float* Kraw = delta + ldq;
    float* Kp = Kraw + Nk * d;
    float* Vraw = Kp + Nk * d;
    float* Vp = Vraw + Nk * d;
    float* dK = Vp + Nk * d;
    float* dV = dK + Nk * d;
    float* pt = dV + Nk * d;
    float* dst = pt + isa.key_chunk * isa.tile_cols;
    int64_t loaded_bh = -1;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t bh = task / split, part = task % split;
      const int64_t k0 = std::min(Nk, part * keys_per), k1 = std::min(Nk, k0 + keys_per);
      if (k0 >= k1 && split > 1) {  // an empty range still owns a dQ slot: zero it
        std::fill_n(dq_parts.data() + (part * BH + bh) * Nq * d, Nq * d, 0.f);
        continue;
      }
      if (bh != loaded_bh) {  // the query side of this head: q, dO, lse, delta = rowsum(dO o O)
        gather(qr, bh, 0, Nq, d, Qraw, isa);
        std::memcpy(Q, Qraw, Nq * d * sizeof(float));
        isa.normalize_rows(Q, Nq, d, eps, fscale, mode != kNone);
        transpose_tiles(Q, Nq, d, QT, isa.tile_cols, ldq);
        gather(gr, bh, 0, Nq, d, dO, isa);
        transpose_tiles(dO, Nq, d, dOT, isa.tile_cols, ldq);
        gather(orows, bh, 0, Nq, d, Ob, isa);
        for (int64_t i = 0; i < Nq; ++i) {
          float s = 0.f;
          for (int64_t c = 0; c < d; ++c) s += dO[i * d + c] * Ob[i * d + c];
          delta[i] = s;
          lse_b[i] = lse_p[bh * Nq + i];
        }
        for (int64_t i = Nq; i < ldq; ++i) {
          delta[i] = 0.f;
          lse_b[i] = 1e30f;  // padded queries: P = exp(S - 1e30) ~ 0, and dO = 0 there anyway
        }
        loaded_bh = bh;
      }
      gather(kr, bh, k0, k1, d, Kraw + k0 * d, isa);
      std::memcpy(Kp + k0 * d, Kraw + k0 * d, (k1 - k0) * d * sizeof(float));
      isa.normalize_rows(Kp + k0 * d, k1 - k0, d, eps, 1.0f, mode != kNone);
      gather(vr, bh, k0, k1, d, Vraw + k0 * d, isa);
      std::memcpy(Vp + k0 * d, Vraw + k0 * d, (k1 - k0) * d * sizeof(float));
      isa.normalize_rows(Vp + k0 * d, k1 - k0, d, eps, 1.0f, mode == kQKV);
      float* dQ_out = split > 1 ? dq_parts.data() + (part * BH + bh) * Nq * d : dQ;
      const BwdPanels b{Q, QT, Kp, Vp, dO, dOT, lse_b, delta, Nq, Nk, d, ldq, dQ_out, dK, dV};
      isa.attn_bwd_keys(b, k0, k1, pt, dst);
      // d(x_hat) -> dx for this head's keys (and its queries when one task holds all keys)
      isa.normalize_bwd_rows(Kraw + k0 * d, dK + k0 * d, Kp + k0 * d, k1 - k0, d, eps, 1.0f, mode != kNone);
      scatter(dkr, bh, k0, k1, d, Kp + k0 * d, isa);
      isa.normalize_bwd_rows(Vraw + k0 * d, dV + k0 * d, Vp + k0 * d, k1 - k0, d, eps, 1.0f, mode == kQKV);
      scatter(dvr, bh, k0, k1, d, Vp + k0 * d, isa);
      if (split == 1) {
        isa.normalize_bwd_rows(Qraw, dQ, Ob, Nq, d, eps, fscale, mode != kNone);
        scatter(dqr, bh, 0, Nq, d, Ob, isa);
        loaded_bh = -1;  // Ob was overwritten
      }
    }
  });
  if (split > 1) {
    at::parallel_for(0, BH, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> buf(3 * Nq * d);
      float *Qraw = buf.data(), *sum = Qraw + Nq * d, *dx = sum + Nq * d;
      for (int64_t bh = lo; bh < hi; ++bh) {
        std::memcpy(sum, dq_parts.data() + bh * Nq * d, Nq * d * sizeof(float));
        for (int64_t part = 1; part < split; ++part) {
          const float* p = dq_parts.data() + (part * BH + bh) * Nq * d;
          for (int64_t i = 0; i < Nq * d; ++i) sum[i] += p[i];
        }
        gather(qr, bh, 0, Nq, d, Qraw, isa);
        isa.normalize_bwd_rows(Qraw, sum, dx, Nq, d, eps, fscale, mode != kNone);
        scatter(dqr, bh, 0, Nq, d, dx, isa);
      }
    });
  }
}

// O and its tangent dO (forward-mode AD) of one (batch x head, query range) per task, as
// fast_forward; t* are the tangents of q, k, v (any strides, q's dtype).
template <typename T>
void fast_jvp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tq, const at::Tensor& tk,
              const at::Tensor& tv, at::Tensor& out, at::Tensor& tout, at::Tensor& lse, double scale, int mode,
              double eps_d) {
  const IsaKernels& isa = isa_kernels();
  const int64_t BH = q.size(0) * q.size(1), Nq = q.size(2), Nk = k.size(2), d = q.size(3);
  const int64_t ldk = round_up(Nk, isa.tile_cols);
  const float eps = static_cast<float>(eps_d);
  const bool bounded = use_logit_bound(mode, d, scale);
  const HeadRows<T> qr(q), kr(k), vr(v), tqr(tq), tkr(tk), tvr(tv), orows(out), torows(tout);
  float* lse_p = lse.data_ptr<float>();  // [B, H, Nq] contiguous
  const int64_t split = splits_for(BH, Nq, isa.group_rows);
  const int64_t rows_per = round_up((Nq + split - 1) / split, isa.group_rows);
  const int64_t strip = isa.group_rows * (ldk + isa.strip_pad);
  at::parallel_for(0, BH * split, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(Nq * d * 4 + Nk * d * 4 + 2 * d * ldk + 2 * strip);
    float* Q = buf.data();
    float* dQ = Q + Nq * d;
    float* O = dQ + Nq * d;
    float* dO = O + Nq * d;
    float* Kp = dO + Nq * d;  // normalized K rows, transposed into KT
    float* dKp = Kp + Nk * d;
    float* V = dKp + Nk * d;
    float* dV = V + Nk * d;
    float* KT = dV + Nk * d;
    float* dKT = KT + d * ldk;
    float* S = dKT + d * ldk;
    float* dS = S + strip;
    int64_t loaded_bh = -1;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t bh = task / split;
      const int64_t r0 = std::min(Nq, (task % split) * rows_per), r1 = std::min(Nq, r0 + rows_per);
      if (r0 >= r1) continue;
      if (bh != loaded_bh) {  // K, V of this head and their tangents, normalized, K and dK transposed
        gather(kr, bh, 0, Nk, d, Kp, isa);
        gather(tkr, bh, 0, Nk, d, dKp, isa);
        isa.normalize_jvp_rows(Kp, dKp, Nk, d, eps, 1.0f, mode != kNone);
        transpose_tiles(Kp, Nk, d, KT, isa.tile_cols, ldk);
        transpose_tiles(dKp, Nk, d, dKT, isa.tile_cols, ldk);
        gather(vr, bh, 0, Nk, d, V, isa);
        gather(tvr, bh, 0, Nk, d, dV, isa);
        isa.normalize_jvp_rows(V, dV, Nk, d, eps, 1.0f, mode == kQKV);
        loaded_bh = bh;
      }
      gather(qr, bh, r0, r1, d, Q + r0 * d, isa);
      gather(tqr, bh, r0, r1, d, dQ + r0 * d, isa);
      isa.normalize_jvp_rows(Q + r0 * d, dQ + r0 * d, r1 - r0, d, eps, static_cast<float>(scale), mode != kNone);
      const JvpPanels f{Q,  dQ,  KT, dKT, V, dV, Nq, Nk, d, ldk, bounded, static_cast<float>(d * scale),
                        O, dO, lse_p + bh * Nq};
      isa.attn_jvp_rows(f, r0, r1, S, dS);
      scatter(orows, bh, r0, r1, d, O + r0 * d, isa);
      scatter(torows, bh, r0, r1, d, dO + r0 * d, isa);
    }
  });
}

void check_cpu_tangents(const std::array<at::Tensor, 3>& x, const std::array<at::Tensor, 3>& t) {
  check_tangents(x, t);
  TORCH_CHECK_TYPE(x[0].scalar_type() != at::kDouble,
                   "cm_kernels.normalized_attention_jvp: float32, bfloat16 and float16 only (float64 takes the torch-op "
                   "path of cm_kernels._forward_ad, which cm_kernels.normalized_attention uses under forward-mode AD)");
  TORCH_CHECK_VALUE(x[0].size(3) % 16 == 0, "cm_kernels.normalized_attention_jvp: head dim ", x[0].size(3),
                    " is not a multiple of 16");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jvp_into(const std::array<at::Tensor, 3>& x,
                                                        const std::array<at::Tensor, 3>& t, at::Tensor out,
                                                        at::Tensor out_view, at::Tensor tout, at::Tensor tout_view,
                                                        double scale, int mode, double eps) {
  check_cpu_tangents(x, t);
  at::Tensor lse = at::empty({x[0].size(0), x[0].size(1), x[0].size(2)}, x[0].options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x[0].scalar_type(), "normalized_attention_jvp_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>)
      fast_jvp<scalar_t>(x[0], x[1], x[2], t[0], t[1], t[2], out_view, tout_view, lse, scale, mode, eps);
  });
  return {out, lse, tout};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_jvp_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const at::Tensor& tq,
                                                                 const at::Tensor& tk, const at::Tensor& tv,
                                                                 double scale, c10::string_view normalize, double eps) {
  check_attention(q, k, v, scale, eps);
  const int mode = parse_normalize(normalize);
  at::Tensor out = at::empty(q.sizes(), q.options()), tout = at::empty(q.sizes(), q.options());
  return jvp_into({q, k, v}, {tq, tk, tv}, out, out, tout, tout, scale, mode, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_qkv_jvp_cpu(const at::Tensor& qkv, const at::Tensor& tqkv,
                                                                     int64_t num_heads, double scale,
                                                                     c10::string_view normalize, double eps) {
  const auto parts = split_qkv(qkv, num_heads);
  check_attention(parts[0], parts[1], parts[2], scale, eps);
  check_qkv_tangent(qkv, tqkv);
  const int mode = parse_normalize(normalize);
  at::Tensor out = at::empty({qkv.size(0), qkv.size(1) / 3, qkv.size(2)}, qkv.options());
  at::Tensor tout = at::empty(out.sizes(), out.options());
  return jvp_into(parts, split_qkv(tqkv, num_heads), out, heads_view(out, num_heads), tout, heads_view(tout, num_heads),
                  scale, mode, eps);
}

std::tuple<at::Tensor, at::Tensor> fwd_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor out,
                                            at::Tensor out_view, double scale, int mode, double eps) {
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(accumulate_type(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "normalized_attention_fwd_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (q.size(3) % 16 == 0) return fast_forward<scalar_t>(q, k, v, out_view, lse, scale, mode, eps);
    }
    attention_forward<scalar_t>(q, k, v, out_view, lse, scale, mode, eps);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale, c10::string_view normalize, double eps) {
  check_attention(q, k, v, scale, eps);
  at::Tensor out = at::empty(q.sizes(), q.options());
  return fwd_into(q, k, v, out, out, scale, parse_normalize(normalize), eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 double scale, c10::string_view normalize, double eps) {
  check_attention(q, k, v, scale, eps);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "cm_kernels.normalized_attention_bwd: grad_out/out shape mismatch");
  const int mode = parse_normalize(normalize);
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()), dv = at::empty(v.sizes(), v.options());
  const at::Tensor g = grad_out.to(q.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "normalized_attention_bwd_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (q.size(3) % 16 == 0) return fast_backward<scalar_t>(g, q, k, v, out, lse, dq, dk, dv, scale, mode, eps);
    }
    attention_backward<scalar_t>(g, q, k, v, out, lse, dq, dk, dv, scale, mode, eps);
  });
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> attention_qkv_fwd_cpu(const at::Tensor& qkv, int64_t num_heads, double scale,
                                                         c10::string_view normalize, double eps) {
  const auto parts = split_qkv(qkv, num_heads);
  check_attention(parts[0], parts[1], parts[2], scale, eps);
  at::Tensor out = at::empty({qkv.size(0), qkv.size(1) / 3, qkv.size(2)}, qkv.options());
  return fwd_into(parts[0], parts[1], parts[2], out, heads_view(out, num_heads), scale, parse_normalize(normalize), eps);
}

at::Tensor attention_qkv_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                 const at::Tensor& lse, int64_t num_heads, double scale, c10::string_view normalize,
                                 double eps) {
  const auto parts = split_qkv(qkv, num_heads);
  check_attention(parts[0], parts[1], parts[2], scale, eps);
  TORCH_CHECK_VALUE(grad_out.sizes() == out.sizes() && out.size(1) * 3 == qkv.size(1), "cm_kernels.normalized_attention_qkv_bwd: grad_out/out shape mismatch");
  const int mode = parse_normalize(normalize);
  at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options());
  auto dparts = split_qkv(dqkv, num_heads);
  const at::Tensor g = heads_view(grad_out.to(qkv.scalar_type()), num_heads);
  const at::Tensor o = heads_view(out, num_heads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "normalized_attention_qkv_bwd_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (parts[0].size(3) % 16 == 0)
        return fast_backward<scalar_t>(g, parts[0], parts[1], parts[2], o, lse, dparts[0], dparts[1], dparts[2], scale,
                                       mode, eps);
    }
    attention_backward<scalar_t>(g, parts[0], parts[1], parts[2], o, lse, dparts[0], dparts[1], dparts[2], scale, mode, eps);
  });
  return dqkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(cm_kernels, CPU, m) {
  m.impl("normalized_attention_fwd", &attention_fwd_cpu);
  m.impl("normalized_attention_bwd", &attention_bwd_cpu);
  m.impl("normalized_attention_qkv_fwd", &attention_qkv_fwd_cpu);
  m.impl("normalized_attention_qkv_bwd", &attention_qkv_bwd_cpu);
  m.impl("normalized_attention_jvp", &attention_jvp_cpu);
  m.impl("normalized_attention_qkv_jvp", &attention_qkv_jvp_cpu);
}

}  // namespace cm_kernels
