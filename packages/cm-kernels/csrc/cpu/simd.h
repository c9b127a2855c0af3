// Small loops written so that GCC/Clang -O3 vectorize them for the baseline ISA (independent
// accumulator lanes instead of one serial sum: no -ffast-math needed, results do not depend on
// the build machine). Torch-free.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace cm_kernels {
namespace simd {

constexpr int kLanes = 16;

// exp for float32 in the Cephes expf scheme: x = n*ln2 + r, |r| <= ln2/2, degree-6 minimax
// polynomial for e^r, 2^n by exponent bits. Max relative error ~2 ulp over [-87, 88]; inputs
// are clamped to that range (below it returns ~1.6e-38 instead of a denormal or 0, which is
// negligible next to the softmax maximum term 1). Branch-free so it vectorizes.
inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

inline float exp_acc(float x) { return exp_f32(x); }
inline double exp_acc(double x) { return std::exp(x); }

template <typename A>
inline A lanes_sum(const A* acc) {
  A s = 0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// sum_i (A(a_i) - A(b_i))^2
template <typename T, typename A>
inline A sumsq_diff(const T* a, const T* b, int64_t n) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const A d = static_cast<A>(a[i + j]) - static_cast<A>(b[i + j]);
      acc[j] += d * d;
    }
  A tail = 0;
  for (; i < n; ++i) {
    const A d = static_cast<A>(a[i]) - static_cast<A>(b[i]);
    tail += d * d;
  }
  return lanes_sum(acc) + tail;
}

// out_i = T(coef * (A(a_i) - A(b_i)))
template <typename T, typename A>
inline void scaled_diff(const T* a, const T* b, T* out, int64_t n, A coef) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<T>(coef * (static_cast<A>(a[i]) - static_cast<A>(b[i])));
}

template <typename A>
inline A dot(const A* a, const A* b, int64_t n) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  A tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return lanes_sum(acc) + tail;
}

template <typename A>
inline A row_max(const A* x, int64_t n) {
  A acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = acc[j] < x[i + j] ? x[i + j] : acc[j];
  A m = acc[0];
  for (int j = 1; j < kLanes; ++j) m = m < acc[j] ? acc[j] : m;
  for (; i < n; ++i) m = m < x[i] ? x[i] : m;
  return m;
}

// x_i <- exp(x_i - shift); returns the sum.
template <typename A>
inline A exp_shift_sum(A* x, int64_t n, A shift) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const A e = exp_acc(x[i + j] - shift);
      x[i + j] = e;
      acc[j] += e;
    }
  A tail = 0;
  for (; i < n; ++i) {
    x[i] = exp_acc(x[i] - shift);
    tail += x[i];
  }
  return lanes_sum(acc) + tail;
}

template <typename A>
inline void scale_inplace(A* x, int64_t n, A s) {
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

// p_i <- exp(s_i - lse) (in place in s)
template <typename A>
inline void exp_shift(A* s, int64_t n, A lse) {
  for (int64_t i = 0; i < n; ++i) s[i] = exp_acc(s[i] - lse);
}

// dp_i <- p_i * (dp_i - delta): softmax backward, dS = P o (dP - rowsum(dO o O))
template <typename A>
inline void softmax_grad(const A* p, A* dp, int64_t n, A delta) {
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}

}  // namespace simd
}  // namespace cm_kernels
