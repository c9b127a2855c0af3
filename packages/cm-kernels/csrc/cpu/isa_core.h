// ISA-specific CPU kernels: normalized attention (forward and backward on float panels of one
// head), pseudo-Huber passes, row normalization and bf16 conversion. Torch-free.
//
// This file is compiled three times, once per instruction set, by isa_avx512.cpp, isa_avx2.cpp
// and isa_base.cpp; each defines CM_ISA_NS (the namespace that keeps the three copies apart, so
// no symbol compiled for AVX-512 can be picked by the linker for a baseline caller) and
// CM_VEC_BYTES (the vector width), then includes this file after `#pragma GCC target(...)`.
// The shipped binary therefore needs no -march flag; isa.cpp picks the widest set the CPU has at
// run time (CM_KERNELS_ISA=avx512|avx2|base overrides, e.g. to test every path on one machine).
//
// Vectors are GCC vector extensions: the same source gives zmm code under AVX-512, ymm under
// AVX2 and xmm (SSE2) for the baseline; a*b+c contracts to FMA where the target has it.
//
// Attention design (flash-style, blocked, no N x N buffer):
//   forward, per group of G query rows: S = Qs K^T for the group (a G x Nk strip, L2-resident),
//   P = exp(S - m) in the GEMM's epilogue while the tile is in registers, row sums alongside;
//   O = P V with the output tile held in registers over all keys; O /= rowsum; lse = m + log sum.
//   m is the logit bound d*scale for normalized q, k (exact; proof in attention.cpp), otherwise
//   the row max taken over the strip before the exponentials.
//   backward, per key range (rows of K, V) and block of TC queries: S^T and dP^T = V dO^T tiles
//   recomputed (P^T = exp(S^T - lse), dS^T = P^T o (dP^T - delta)), then dV += P^T dO,
//   dK += dS^T Qs, dQs = dS K over the key range: five register-blocked GEMMs, nothing N x N.
//   JVP (forward-mode AD), per group of query rows as the forward, O and its tangent dO in one
//   pass: the strip P = exp(S - m) as in the forward (same m, same row sums l), and alongside it a
//   second strip dS = dQs K^T + Qs dK^T whose last GEMM's epilogue forms P o dS and its row sums
//   c; then O = P V / l and dO = (P dV + (P o dS) V) / l - (c / l) O, the last term (the softmax
//   JVP's row-mean correction, c / l = sum_j p_ij dS_ij) applied in the final GEMM's epilogue.
//   Six register-blocked GEMMs, nothing N x N.
// The register tiles: MR rows x NV vectors of accumulators, B rows loaded as NV vectors, A
// broadcast one scalar per row (MR*NV + NV + 1 <= 32 registers on AVX-512, <= 16 otherwise).

namespace cm_kernels {
namespace CM_ISA_NS {

constexpr int W = CM_VEC_BYTES / 4;  // float lanes
constexpr int kRegs = CM_VEC_BYTES == 64 ? 32 : 16;
constexpr int kAccRegs = kRegs == 32 ? 24 : 12;  // accumulators in a tile
constexpr int NVS = kRegs == 32 ? 4 : 2;         // vectors per score tile row
constexpr int TC = NVS * W;                      // score tile columns (keys fwd, queries bwd)
constexpr int64_t kGroup = 48;                   // forward query rows per strip
constexpr int64_t kKeyChunk = 256;               // backward key rows per chunk
constexpr int64_t kStripPad = 16;                // see attn_fwd_rows

typedef float vf __attribute__((vector_size(CM_VEC_BYTES)));
typedef float vfu __attribute__((vector_size(CM_VEC_BYTES), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(CM_VEC_BYTES)));
typedef uint32_t vu __attribute__((vector_size(CM_VEC_BYTES)));
typedef uint16_t vh __attribute__((vector_size(CM_VEC_BYTES / 2)));
typedef uint16_t vhu __attribute__((vector_size(CM_VEC_BYTES / 2), aligned(2), may_alias));

static inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
static inline vf splat(float x) {  // a broadcast (not vf{} + x: that is a real IEEE add of +0.0)
#if defined(__clang__)
  vf r;
  for (int i = 0; i < W; ++i) r[i] = x;  // clang turns this into a broadcast (GCC does not)
  return r;
#else
  return __builtin_shuffle(vf{x}, vi{});
#endif
}
static inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// exp in the Cephes expf scheme (as simd::exp_f32): x = n ln2 + r, degree-6 polynomial, 2^n by
// exponent bits; ~2 ulp on [-87, 88], inputs clamped to it (below: ~1.6e-38, never a denormal).
static inline vf vexp(vf x) {
  const vf lo = splat(-87.0f), hi = splat(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * reinterpret_cast<const vf&>(bits);
}

// ---------------------------------------------------------------------------------------------
// Register-blocked GEMM tile: C[r][v*W + l] (+)= sum_p A[r*ai + p*ap] * B[p*ldb + v*W + l] for
// r < MR, v < NV, p < P; epi(r, v, x) sees each finished vector before it is stored.
template <int MR, int NV, bool ACC, class Epi>
static inline void tile(const float* A, int64_t ai, int64_t ap, const float* B, int64_t ldb, int64_t P, float* C,
                        int64_t ldc, Epi&& epi) {
  vf acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? load(C + r * ldc + v * W) : vf{};
  for (int64_t p = 0; p < P; ++p) {
    vf b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = load(B + p * ldb + v * W);
    const float* a = A + p * ap;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vf ar = splat(a[r * ai]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * b[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      epi(r, v, acc[r][v]);
      store(C + r * ldc + v * W, acc[r][v]);
    }
}

struct NoEpi {
  void operator()(int, int, vf&) const {}
};

// Rows [0, M) of a tile-GEMM with NV vectors of columns: full MR-row tiles, then the tail in
// tiles of 8, 4, 2, 1 rows. epi receives the absolute row.
template <int NV, bool ACC, class Epi>
static inline void rows_gemm(int64_t M, const float* A, int64_t ai, int64_t ap, const float* B, int64_t ldb, int64_t P,
                             float* C, int64_t ldc, Epi&& epi) {
  constexpr int MR = kAccRegs / NV > 12 ? 12 : kAccRegs / NV;
  int64_t r = 0;
  auto run = [&](auto mr_tag) {
    constexpr int mr = decltype(mr_tag)::value;
    auto e = [&](int rr, int v, vf& x) { epi(r + rr, v, x); };
    tile<mr, NV, ACC>(A + r * ai, ai, ap, B, ldb, P, C + r * ldc, ldc, e);
    r += mr;
  };
  for (; r + MR <= M;) run(std::integral_constant<int, MR>{});
  if constexpr (MR > 8)
    for (; r + 8 <= M;) run(std::integral_constant<int, 8>{});
  if constexpr (MR > 4)
    for (; r + 4 <= M;) run(std::integral_constant<int, 4>{});
  if constexpr (MR > 2)
    for (; r + 2 <= M;) run(std::integral_constant<int, 2>{});
  for (; r < M;) run(std::integral_constant<int, 1>{});
}

// C[M][d] (+)= A-rows x B[P][d] with d split into column chunks.
template <bool ACC, class Epi>
static inline void rows_gemm_d(int64_t M, int64_t d, const float* A, int64_t ai, int64_t ap, const float* B, int64_t ldb,
                               int64_t P, float* C, int64_t ldc, Epi&& epi) {
  const int64_t nv = d / W;
  auto chunks = [&](auto nv_tag) {
    constexpr int NV = decltype(nv_tag)::value;
    for (int64_t c = 0; c < nv; c += NV) {
      auto e = [&](int64_t r, int v, vf& x) { epi(r, static_cast<int>(c) + v, x); };
      rows_gemm<NV, ACC>(M, A, ai, ap, B + c * W, ldb, P, C + c * W, ldc, e);
    }
  };
  // Chunks of at most 4 vectors (6 for d = 96 on AVX-512) so that a tile has >= 6 rows: each
  // B vector (streamed from L2 for long key ranges) then feeds >= 6 FMAs. Wider tiles (8 x 3 rows
  // for d = 128) measured slower: V no longer fits L2 next to the strip at N = 1024.
  if constexpr (kRegs == 32) {
    if (nv % 4 == 0) return chunks(std::integral_constant<int, 4>{});
    if (nv % 6 == 0) return chunks(std::integral_constant<int, 6>{});
  }
  if (nv % 2 == 0) chunks(std::integral_constant<int, 2>{});
  else chunks(std::integral_constant<int, 1>{});
}

// ---------------------------------------------------------------------------------------------
// Attention on float panels of one (batch, head). Layouts (row-major, ld in floats):
//   Q  [Nq][d]  normalized q times scale      K [Nk][d], V [Nk][d] normalized (v per mode)
//   KT    K transposed in tiles of TC keys: tile t at KT + t*d*TC holds [d][TC] (keys padded with
//         zeros to ldk = round_up(Nk, TC)); each tile is contiguous, so the TC-column GEMM tiles
//         read it without the 4 KiB-stride set conflicts of a [d][ldk] layout (N = 1024)
//   QT, dOT the same for queries (ldq = round_up(Nq, TC))
// FwdPanels and BwdPanels: isa.h.

// Rows [r0, r1) of the forward; strip: kGroup * (ldk + kStripPad) floats (rows padded against
// 4 KiB-stride set conflicts when ldk is a multiple of 256).
static void attn_fwd_rows(const FwdPanels& f, int64_t r0, int64_t r1, float* strip) {
  const int64_t d = f.d, ldk = f.ldk, Nk = f.Nk;
  const int64_t lds = ldk % 256 == 0 ? ldk + kStripPad : ldk;  // strip row stride
  const int64_t tail = Nk % TC;  // valid columns of the last key tile (0: full)
  float rowsum[kGroup];
  for (int64_t g0 = r0; g0 < r1; g0 += kGroup) {
    const int64_t G = r1 - g0 < kGroup ? r1 - g0 : kGroup;
    const float* Qg = f.Q + g0 * d;
    vf rs[kGroup];
    for (int64_t r = 0; r < G; ++r) rs[r] = vf{};
    const vf m = splat(f.bound);
    for (int64_t j = 0; j < ldk; j += TC) {
      const bool last = j + TC > Nk && tail != 0;
      if (f.bounded) {
        auto epi = [&](int64_t r, int v, vf& x) {
          x = vexp(x - m);
          if (last) {
            for (int l = 0; l < W; ++l)
              if (j + v * W + l >= Nk) x[l] = 0.f;
          }
          rs[r] += x;
        };
        rows_gemm<NVS, false>(G, Qg, d, 1, f.KT + j * d, TC, d, strip + j, lds, epi);
      } else {
        rows_gemm<NVS, false>(G, Qg, d, 1, f.KT + j * d, TC, d, strip + j, lds, NoEpi{});
      }
    }
    for (int64_t r = 0; r < G; ++r) {
      float* row = strip + r * lds;
      float mx = f.bound;
      if (!f.bounded) {
        mx = row[0];
        for (int64_t c = 1; c < Nk; ++c) mx = row[c] > mx ? row[c] : mx;
        vf acc = vf{};
        const vf mv = splat(mx);
        int64_t c = 0;
        for (; c + W <= Nk; c += W) {
          const vf e = vexp(load(row + c) - mv);
          store(row + c, e);
          acc += e;
        }
        float s = hsum(acc);
        for (; c < Nk; ++c) {
          vf e = vexp(splat(row[c] - mx));
          row[c] = e[0];
          s += e[0];
        }
        rowsum[r] = s;
      } else {
        rowsum[r] = hsum(rs[r]);
      }
      f.lse[g0 + r] = mx + std::log(rowsum[r]);
      rowsum[r] = 1.0f / rowsum[r];
    }
    auto scale_rows = [&](int64_t r, int, vf& x) { x *= rowsum[r]; };
    rows_gemm_d<false>(G, d, strip, lds, 1, f.V, d, Nk, f.O + g0 * d, d, scale_rows);
  }
}


// Keys [k0, k1); pt, dst: kKeyChunk * TC floats each.
static void attn_bwd_keys(const BwdPanels& b, int64_t k0, int64_t k1, float* pt, float* dst) {
  const int64_t d = b.d, ldq = b.ldq, Nq = b.Nq;
  for (int64_t r = k0; r < k1; ++r)
    for (int64_t c = 0; c < d; ++c) b.dK[r * d + c] = b.dV[r * d + c] = 0.f;
  for (int64_t c0 = k0; c0 < k1; c0 += kKeyChunk) {
    const int64_t KC = k1 - c0 < kKeyChunk ? k1 - c0 : kKeyChunk;
    const float* Kc = b.K + c0 * d;
    const float* Vc = b.V + c0 * d;
    for (int64_t i0 = 0; i0 < ldq; i0 += TC) {
      const int64_t QB = Nq - i0 < TC ? Nq - i0 : TC;  // valid queries in the block
      auto p_epi = [&](int64_t, int v, vf& x) { x = vexp(x - load(b.lse + i0 + v * W)); };
      rows_gemm<NVS, false>(KC, Kc, d, 1, b.QT + i0 * d, TC, d, pt, TC, p_epi);  // P^T
      auto ds_epi = [&](int64_t r, int v, vf& x) {
        x = load(pt + r * TC + v * W) * (x - load(b.delta + i0 + v * W));
      };
      rows_gemm<NVS, false>(KC, Vc, d, 1, b.dOT + i0 * d, TC, d, dst, TC, ds_epi);  // dS^T
      rows_gemm_d<true>(KC, d, pt, TC, 1, b.dO + i0 * d, d, QB, b.dV + c0 * d, d, NoEpi{});
      rows_gemm_d<true>(KC, d, dst, TC, 1, b.Q + i0 * d, d, QB, b.dK + c0 * d, d, NoEpi{});
      if (c0 == k0)
        rows_gemm_d<false>(QB, d, dst, 1, TC, Kc, d, KC, b.dQ + i0 * d, d, NoEpi{});
      else
        rows_gemm_d<true>(QB, d, dst, 1, TC, Kc, d, KC, b.dQ + i0 * d, d, NoEpi{});
    }
  }
}

// Rows [r0, r1) of the forward and its tangent (JvpPanels: isa.h; dQ = scale * d(q_hat), dKT
// tiled as KT). strip, dstrip: kGroup * (ldk + kStripPad) floats each. With p = P / l (the
// softmax), dS = dQs K^T + Qs dK^T (the logits' tangent) and c = rowsum(p o dS):
//   dO = p dV + (p o (dS - c)) V = (P dV + (P o dS) V) / l - c O.
static void attn_jvp_rows(const JvpPanels& f, int64_t r0, int64_t r1, float* strip, float* dstrip) {
  const int64_t d = f.d, ldk = f.ldk, Nk = f.Nk;
  const int64_t lds = ldk % 256 == 0 ? ldk + kStripPad : ldk;
  const int64_t tail = Nk % TC;
  float rinv[kGroup], cmean[kGroup];
  for (int64_t g0 = r0; g0 < r1; g0 += kGroup) {
    const int64_t G = r1 - g0 < kGroup ? r1 - g0 : kGroup;
    const float* Qg = f.Q + g0 * d;
    const float* dQg = f.dQ + g0 * d;
    vf rs[kGroup], cs[kGroup];
    for (int64_t r = 0; r < G; ++r) rs[r] = cs[r] = vf{};
    const vf m = splat(f.bound);
    // dS tile j: dQs K^T, then += Qs dK^T with P o dS (and its row sums) in the epilogue. P of the
    // tile is already in the strip, zero in the padded key columns.
    auto ds_tile = [&](int64_t j) {
      rows_gemm<NVS, false>(G, dQg, d, 1, f.KT + j * d, TC, d, dstrip + j, lds, NoEpi{});
      auto epi = [&](int64_t r, int v, vf& x) {
        x = load(strip + r * lds + j + v * W) * x;
        cs[r] += x;
      };
      rows_gemm<NVS, true>(G, Qg, d, 1, f.dKT + j * d, TC, d, dstrip + j, lds, epi);
    };
    for (int64_t j = 0; j < ldk; j += TC) {
      const bool last = j + TC > Nk && tail != 0;
      if (f.bounded) {  // P known per tile: its dS tile follows while it is in L1
        auto epi = [&](int64_t r, int v, vf& x) {
          x = vexp(x - m);
          if (last) {
            for (int l = 0; l < W; ++l)
              if (j + v * W + l >= Nk) x[l] = 0.f;
          }
          rs[r] += x;
        };
        rows_gemm<NVS, false>(G, Qg, d, 1, f.KT + j * d, TC, d, strip + j, lds, epi);
        ds_tile(j);
      } else {
        rows_gemm<NVS, false>(G, Qg, d, 1, f.KT + j * d, TC, d, strip + j, lds, NoEpi{});
      }
    }
    for (int64_t r = 0; r < G; ++r) {
      float* row = strip + r * lds;
      float mx = f.bound, l;
      if (!f.bounded) {  // true row max, exponentials over the strip, padded columns zeroed
        mx = row[0];
        for (int64_t c = 1; c < Nk; ++c) mx = row[c] > mx ? row[c] : mx;
        vf acc = vf{};
        const vf mv = splat(mx);
        int64_t c = 0;
        for (; c + W <= Nk; c += W) {
          const vf e = vexp(load(row + c) - mv);
          store(row + c, e);
          acc += e;
        }
        l = hsum(acc);
        for (; c < Nk; ++c) {
          vf e = vexp(splat(row[c] - mx));
          row[c] = e[0];
          l += e[0];
        }
        for (; c < ldk; ++c) row[c] = 0.f;
      } else {
        l = hsum(rs[r]);
      }
      f.lse[g0 + r] = mx + std::log(l);
      rinv[r] = 1.0f / l;
    }
    if (!f.bounded)
      for (int64_t j = 0; j < ldk; j += TC) ds_tile(j);
    for (int64_t r = 0; r < G; ++r) cmean[r] = hsum(cs[r]) * rinv[r];
    auto scale_rows = [&](int64_t r, int, vf& x) { x *= rinv[r]; };
    rows_gemm_d<false>(G, d, strip, lds, 1, f.V, d, Nk, f.O + g0 * d, d, scale_rows);
    rows_gemm_d<false>(G, d, strip, lds, 1, f.dV, d, Nk, f.dO + g0 * d, d, NoEpi{});
    const float* Og = f.O + g0 * d;
    auto finish = [&](int64_t r, int v, vf& x) { x = x * rinv[r] - load(Og + r * d + v * W) * cmean[r]; };
    rows_gemm_d<true>(G, d, dstrip, lds, 1, f.V, d, Nk, f.dO + g0 * d, d, finish);
  }
}

// ---------------------------------------------------------------------------------------------
// Row passes.

// x[r] <- mult * x[r] * (normalize ? 1 / (eps + ||x[r]|| / sqrt(d)) : 1), rows of length d.
static void normalize_rows(float* x, int64_t rows, int64_t d, float eps, float mult, bool normalize) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * d;
    float f = mult;
    if (normalize) {
      vf acc = vf{};
      for (int64_t c = 0; c < d; c += W) {
        const vf v = load(row + c);
        acc += v * v;
      }
      f = mult / (eps + std::sqrt(hsum(acc) / static_cast<float>(d)));
    }
    for (int64_t c = 0; c < d; c += W) store(row + c, load(row + c) * f);
  }
}

// out[r] = dL/dx for x_hat = mult * x f, f = 1 / (eps + rms), given g = dL/dx_hat (see
// attention.cpp): mult (f g - f^2 (g . x) / (d rms) x); x, g, out rows of length d.
static void normalize_bwd_rows(const float* x, const float* g, float* out, int64_t rows, int64_t d, float eps,
                               float mult, bool normalize) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * d, *gr = g + r * d;
    float* o = out + r * d;
    if (!normalize) {
      for (int64_t c = 0; c < d; c += W) store(o + c, load(gr + c) * mult);
      continue;
    }
    vf sxx = vf{}, sgx = vf{};
    for (int64_t c = 0; c < d; c += W) {
      const vf xv = load(xr + c);
      sxx += xv * xv;
      sgx += load(gr + c) * xv;
    }
    const float rms = std::sqrt(hsum(sxx) / static_cast<float>(d));
    const float f = 1.0f / (eps + rms);
    const float coef = rms > 0.f ? mult * f * f * hsum(sgx) / (static_cast<float>(d) * rms) : 0.f;
    const float fm = mult * f;
    for (int64_t c = 0; c < d; c += W) store(o + c, load(gr + c) * fm - load(xr + c) * coef);
  }
}

// The JVP of normalize_rows: x <- mult * x f, t <- mult * (f t - f^2 (x . t) / (d rms) x) with
// f = 1 / (eps + rms), rms = ||x|| / sqrt(d) (d rms / d x = x / (d rms); the second term is 0 at
// x = 0, torch.linalg.vector_norm's subgradient); rows of length d.
static void normalize_jvp_rows(float* x, float* t, int64_t rows, int64_t d, float eps, float mult, bool normalize) {
  for (int64_t r = 0; r < rows; ++r) {
    float *xr = x + r * d, *tr = t + r * d;
    if (!normalize) {
      for (int64_t c = 0; c < d; c += W) {
        store(xr + c, load(xr + c) * mult);
        store(tr + c, load(tr + c) * mult);
      }
      continue;
    }
    vf sxx = vf{}, sxt = vf{};
    for (int64_t c = 0; c < d; c += W) {
      const vf xv = load(xr + c);
      sxx += xv * xv;
      sxt += load(tr + c) * xv;
    }
    const float rms = std::sqrt(hsum(sxx) / static_cast<float>(d));
    const float f = 1.0f / (eps + rms);
    const float coef = rms > 0.f ? mult * f * f * hsum(sxt) / (static_cast<float>(d) * rms) : 0.f;
    const float fm = mult * f;
    for (int64_t c = 0; c < d; c += W) {
      const vf xv = load(xr + c);
      store(tr + c, load(tr + c) * fm - xv * coef);
      store(xr + c, xv * fm);
    }
  }
}

// float32 / bfloat16 (as its 16 bits) -> float32: W lanes, or one value.
template <typename T>
static inline vf load_as_f32(const T* p);
template <>
inline vf load_as_f32<float>(const float* p) {
  return load(p);
}
template <>
inline vf load_as_f32<uint16_t>(const uint16_t* p) {
  const vu w = __builtin_convertvector(*reinterpret_cast<const vhu*>(p), vu) << 16;
  return reinterpret_cast<const vf&>(w);
}
static inline float scalar_as_f32(float x) { return x; }
static inline float scalar_as_f32(uint16_t x) {
  const uint32_t w = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

static void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) store(dst + i, load_as_f32(src + i));
  for (; i < n; ++i) dst[i] = scalar_as_f32(src[i]);
}

// Round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16).
static void f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vf x = load(src + i);
    const vu u = reinterpret_cast<const vu&>(x);
    vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    r = x != x ? vu{} + 0x7FC0u : r;
    *reinterpret_cast<vhu*>(dst + i) = __builtin_convertvector(r, vh);
  }
  for (; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, 4);
    dst[i] = src[i] != src[i] ? 0x7FC0 : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

// ---------------------------------------------------------------------------------------------
// Pseudo-Huber: sum of squared differences (forward) and the scaled difference (backward).

template <typename T>
static double sumsq_diff(const T* a, const T* b, int64_t n) {
  vf acc0 = vf{}, acc1 = vf{}, acc2 = vf{}, acc3 = vf{};
  int64_t i = 0;
  if constexpr (std::is_same_v<T, uint16_t>) {
    // bf16 pairs in 32-bit words: the high half is a float once the low 16 bits are cleared,
    // the low half once shifted up; the order of terms does not matter to a sum, so no shuffles.
    typedef uint32_t vuu __attribute__((vector_size(CM_VEC_BYTES), aligned(2), may_alias));
    const vu hi_mask = vu{} + 0xFFFF0000u;
    for (; i + 4 * W <= n; i += 4 * W) {
      const vu a0 = *reinterpret_cast<const vuu*>(a + i), b0 = *reinterpret_cast<const vuu*>(b + i);
      const vu a1 = *reinterpret_cast<const vuu*>(a + i + 2 * W), b1 = *reinterpret_cast<const vuu*>(b + i + 2 * W);
      const vu ah0 = a0 & hi_mask, bh0 = b0 & hi_mask, al0 = a0 << 16, bl0 = b0 << 16;
      const vu ah1 = a1 & hi_mask, bh1 = b1 & hi_mask, al1 = a1 << 16, bl1 = b1 << 16;
      const vf d0 = reinterpret_cast<const vf&>(ah0) - reinterpret_cast<const vf&>(bh0);
      const vf d1 = reinterpret_cast<const vf&>(al0) - reinterpret_cast<const vf&>(bl0);
      const vf d2 = reinterpret_cast<const vf&>(ah1) - reinterpret_cast<const vf&>(bh1);
      const vf d3 = reinterpret_cast<const vf&>(al1) - reinterpret_cast<const vf&>(bl1);
      acc0 += d0 * d0;
      acc1 += d1 * d1;
      acc2 += d2 * d2;
      acc3 += d3 * d3;
    }
  } else {
    for (; i + 4 * W <= n; i += 4 * W) {
      const vf d0 = load_as_f32(a + i) - load_as_f32(b + i);
      const vf d1 = load_as_f32(a + i + W) - load_as_f32(b + i + W);
      const vf d2 = load_as_f32(a + i + 2 * W) - load_as_f32(b + i + 2 * W);
      const vf d3 = load_as_f32(a + i + 3 * W) - load_as_f32(b + i + 3 * W);
      acc0 += d0 * d0;
      acc1 += d1 * d1;
      acc2 += d2 * d2;
      acc3 += d3 * d3;
    }
  }
  double s = static_cast<double>(hsum((acc0 + acc1) + (acc2 + acc3)));
  for (; i < n; ++i) {
    const float dd = scalar_as_f32(a[i]) - scalar_as_f32(b[i]);
    s += static_cast<double>(dd * dd);
  }
  return s;
}

// out = coef (a - b). With `stream`, vector stores bypass the cache (non-temporal; AVX2/AVX-512): for an
// output far larger than L2 that saves the read-for-ownership of every line (a third of the
// pass's memory traffic) and keeps a and b cached for whoever reads them next.
template <typename T>
static inline void store_out(T* out, vf x, bool stream);
template <>
inline void store_out<float>(float* out, vf x, bool stream) {
#if CM_VEC_BYTES == 64
  if (stream) return _mm512_stream_ps(out, reinterpret_cast<const __m512&>(x));
#elif CM_VEC_BYTES == 32 && defined(__x86_64__)
  if (stream) return _mm256_stream_ps(out, reinterpret_cast<const __m256&>(x));
#endif
  (void)stream;
  store(out, x);
}
// bf16 -> bf16 of coef (a - b) on 32-bit words holding two bf16 each, lane-wise (no shuffles):
// the high and low halves are widened in place, scaled, rounded to nearest even and repacked.
static inline vu scaled_diff_words(vu a, vu b, float coef) {
  const vu hi_mask = vu{} + 0xFFFF0000u;
  const vu ah = a & hi_mask, bh = b & hi_mask, al = a << 16, bl = b << 16;
  const vf hi = (reinterpret_cast<const vf&>(ah) - reinterpret_cast<const vf&>(bh)) * coef;
  const vf lo = (reinterpret_cast<const vf&>(al) - reinterpret_cast<const vf&>(bl)) * coef;
  const vu uh = reinterpret_cast<const vu&>(hi), ul = reinterpret_cast<const vu&>(lo);
  vu rh = (uh + 0x7FFFu + ((uh >> 16) & 1u)) & hi_mask;
  vu rl = (ul + 0x7FFFu + ((ul >> 16) & 1u)) >> 16;
  rh = hi != hi ? vu{} + 0x7FC00000u : rh;
  rl = lo != lo ? vu{} + 0x7FC0u : rl;
  return rh | rl;
}

template <typename T>
static void scaled_diff(const T* a, const T* b, T* out, int64_t n, float coef, bool stream) {
  int64_t i = 0;
  constexpr int64_t kAlign = sizeof(T) * W;  // bytes per vector store
  stream = stream && CM_VEC_BYTES >= 32;     // the baseline build stores normally
  auto scalar = [&](int64_t j) {
    float x = coef * (scalar_as_f32(a[j]) - scalar_as_f32(b[j]));
    if constexpr (std::is_same_v<T, float>) out[j] = x;
    else f32_to_bf16(&x, out + j, 1);
  };
  if constexpr (std::is_same_v<T, uint16_t>) {
    // 2W bf16 per vector of words; the head runs to the vector store alignment (streaming
    // stores need it; otherwise any 4-byte alignment of out suffices for the word layout).
    constexpr int64_t kWordAlign = 4 * W;
    typedef uint32_t vuu __attribute__((vector_size(CM_VEC_BYTES), aligned(2), may_alias));
    for (; i < n && reinterpret_cast<uintptr_t>(out + i) % (stream ? kWordAlign : 4) != 0; ++i) scalar(i);
    for (; i + 2 * W <= n; i += 2 * W) {
      const vu r = scaled_diff_words(*reinterpret_cast<const vuu*>(a + i), *reinterpret_cast<const vuu*>(b + i), coef);
#if CM_VEC_BYTES == 64
      if (stream) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(out + i), reinterpret_cast<const __m512i&>(r));
        continue;
      }
#elif CM_VEC_BYTES == 32 && defined(__x86_64__)
      if (stream) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(out + i), reinterpret_cast<const __m256i&>(r));
        continue;
      }
#endif
      *reinterpret_cast<vuu*>(out + i) = r;
    }
  } else {
    if (stream)  // scalar head up to the store alignment that non-temporal stores need
      for (; i < n && reinterpret_cast<uintptr_t>(out + i) % kAlign != 0; ++i) scalar(i);
    for (; i + 2 * W <= n; i += 2 * W) {
      store_out(out + i, (load_as_f32(a + i) - load_as_f32(b + i)) * coef, stream);
      store_out(out + i + W, (load_as_f32(a + i + W) - load_as_f32(b + i + W)) * coef, stream);
    }
  }
  for (; i < n; ++i) scalar(i);
#if CM_VEC_BYTES >= 32 && defined(__x86_64__)
  if (stream) _mm_sfence();  // order the streaming stores before the caller's next writes
#endif
}

static void scaled_diff_f32(const float* a, const float* b, float* out, int64_t n, float coef, bool stream) {
  scaled_diff(a, b, out, n, coef, stream);
}
static void scaled_diff_bf16(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t n, float coef, bool stream) {
  scaled_diff(a, b, out, n, coef, stream);
}

// float16 <-> float32 for W lanes: F16C in the AVX2 and AVX-512 builds; elsewhere the branch-free
// bit manipulation of the FP16 library (Maratea's fp16_ieee_to/from_fp32_value), lane-wise.
static inline vf load_f16(const uint16_t* p) {
#if CM_VEC_BYTES == 64
  const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<const vf&>(x);
#elif CM_VEC_BYTES == 32 && defined(__x86_64__)
  const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<const vf&>(x);
#else
  const vu w = __builtin_convertvector(*reinterpret_cast<const vhu*>(p), vu) << 16;
  const vu sign = w & 0x80000000u;
  const vu two_w = w + w;
  const vu nb = (two_w >> 4) + (0xE0u << 23);
  const vf normalized = reinterpret_cast<const vf&>(nb) * 0x1.0p-112f;
  const vu db = (two_w >> 17) | (126u << 23);
  const vf denormalized = reinterpret_cast<const vf&>(db) - 0.5f;
  const vu bits = sign | (two_w < (1u << 27) ? reinterpret_cast<const vu&>(denormalized)
                                             : reinterpret_cast<const vu&>(normalized));
  return reinterpret_cast<const vf&>(bits);
#endif
}
static inline void store_f16(uint16_t* p, vf x) {  // round to nearest even, as c10::Half
#if CM_VEC_BYTES == 64
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(reinterpret_cast<const __m512&>(x), _MM_FROUND_TO_NEAREST_INT));
#elif CM_VEC_BYTES == 32 && defined(__x86_64__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(reinterpret_cast<const __m256&>(x), _MM_FROUND_TO_NEAREST_INT));
#else
  const vf ax = x < 0.f ? -x : x;
  vf base = (ax * 0x1.0p+112f) * 0x1.0p-110f;
  const vu w = reinterpret_cast<const vu&>(x);
  const vu shl1_w = w + w;
  const vu sign = w & 0x80000000u;
  vu bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? vu{} + 0x71000000u : bias;
  const vu bb = (bias >> 1) + 0x07800000u;
  base = reinterpret_cast<const vf&>(bb) + base;
  const vu bits = reinterpret_cast<const vu&>(base);
  const vu nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const vu h = (sign >> 16) | (shl1_w > 0xFF000000u ? vu{} + 0x7E00u : nonsign);
  *reinterpret_cast<vhu*>(p) = __builtin_convertvector(h, vh);
#endif
}
static inline float f16_scalar(uint16_t h) {
  uint16_t buf[W] = {h};
  return load_f16(buf)[0];
}

static double sumsq_diff_f16(const uint16_t* a, const uint16_t* b, int64_t n) {
  vf acc0 = vf{}, acc1 = vf{};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const vf d0 = load_f16(a + i) - load_f16(b + i);
    const vf d1 = load_f16(a + i + W) - load_f16(b + i + W);
    acc0 += d0 * d0;
    acc1 += d1 * d1;
  }
  double s = static_cast<double>(hsum(acc0 + acc1));
  for (; i < n; ++i) {
    const float dd = f16_scalar(a[i]) - f16_scalar(b[i]);
    s += static_cast<double>(dd * dd);
  }
  return s;
}

static void scaled_diff_f16(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t n, float coef, bool) {
  int64_t i = 0;
  for (; i + W <= n; i += W) store_f16(out + i, (load_f16(a + i) - load_f16(b + i)) * coef);
  if (i < n) {  // the tail through a padded vector
    uint16_t ta[W] = {}, tb[W] = {}, to[W];
    for (int64_t j = i; j < n; ++j) ta[j - i] = a[j], tb[j - i] = b[j];
    store_f16(to, (load_f16(ta) - load_f16(tb)) * coef);
    for (int64_t j = i; j < n; ++j) out[j] = to[j - i];
  }
}
static double sumsq_diff_f32(const float* a, const float* b, int64_t n) { return sumsq_diff(a, b, n); }
static double sumsq_diff_bf16(const uint16_t* a, const uint16_t* b, int64_t n) { return sumsq_diff(a, b, n); }

}  // namespace CM_ISA_NS
}  // namespace cm_kernels
