// Row loops shared by the CPU kernels of the cross-entropy ops (cross_entropy.cpp,
// cross_entropy_prob.cpp): max, exp-sum, dot, softcap and gradient stores over one
// row in the accumulation type. The portable loops reduce over 16 independent
// lanes so the compiler vectorises them without -ffast-math; with AVX-512 the hot
// loops are written with intrinsics (MEMFAST_CPU_KERNEL=generic turns them off).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../common/ce_math.h"

namespace memfast {
namespace cpu {

constexpr int kLanes = 16;

// Rounding to the storage type. bfloat16 is rounded here (nearest even, NaN kept)
// with plain integer arithmetic so that the compiler vectorises gradient stores;
// c10::BFloat16's constructor branches on NaN and stays scalar.
template <typename scalar_t, typename acc_t>
inline scalar_t to_storage(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    float f = static_cast<float>(v);
    uint32_t u;
    __builtin_memcpy(&u, &f, sizeof(u));
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return c10::BFloat16(f != f ? uint16_t(0x7FC0) : rounded, c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

template <typename T>
T lanes_max(const T* x, int64_t n) {
  T lane[kLanes];
  for (int k = 0; k < kLanes; ++k) lane[k] = -std::numeric_limits<T>::infinity();
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int k = 0; k < kLanes; ++k) lane[k] = x[c + k] > lane[k] ? x[c + k] : lane[k];
  T m = -std::numeric_limits<T>::infinity();
  for (; c < n; ++c) m = x[c] > m ? x[c] : m;
  for (int k = 0; k < kLanes; ++k) m = lane[k] > m ? lane[k] : m;
  return m;
}

// out[c] <- exp(x[c] - shift) (out may be x); returns the sum.
template <typename T>
T lanes_exp_sum(const T* x, T* out, int64_t n, T shift) {
  T lane[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      T e = fast_exp(x[c + k] - shift);
      out[c + k] = e;
      lane[k] += e;
    }
  T s = 0;
  for (; c < n; ++c) {
    out[c] = fast_exp(x[c] - shift);
    s += out[c];
  }
  for (int k = 0; k < kLanes; ++k) s += lane[k];
  return s;
}

#if defined(__AVX512F__)
// GCC 12 flags the masked-load intrinsics' own headers as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// AVX-512 versions of the two hot loops (fp32). The compiler's vectorisation
// of fast_exp spends half its instructions on range clamps and 2^n assembly;
// vscalefps does both (it saturates to 0 / inf by itself). A 4096 x 1000 fp32
// forward on one core: 1.7 ms instead of 2.9 ms (bench/cpu_breakdown.py).
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// exp(x), ~1 ulp: x = n ln2 + r, |r| <= ln2 / 2, Cephes' polynomial, 2^n by scalef.
inline __m512 exp16(__m512 x) {
  // Below -104 the result is 0 either way; the clamp keeps n finite. NaN stays
  // NaN (vmaxps returns its second operand when one is NaN).
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// NaN entries are skipped, as in lanes_max (x > lane ? x : lane).
inline float max_avx512(const float* x, int64_t n) {
  __m512 a = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), b = a;
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    a = _mm512_max_ps(_mm512_loadu_ps(x + c), a);
    b = _mm512_max_ps(_mm512_loadu_ps(x + c + 16), b);
  }
  for (; c < n; c += 16) {
    const __mmask16 m = tail_mask(n - c);
    a = _mm512_mask_max_ps(a, m, _mm512_maskz_loadu_ps(m, x + c), a);
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(a, b));
}

inline float exp_sum_avx512(const float* x, float* out, int64_t n, float shift) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  const __m512 sh = _mm512_set1_ps(shift);
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    const __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + c), sh));
    const __m512 e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + c + 16), sh));
    _mm512_storeu_ps(out + c, e0);
    _mm512_storeu_ps(out + c + 16, e1);
    s0 = _mm512_add_ps(s0, e0);
    s1 = _mm512_add_ps(s1, e1);
  }
  for (; c < n; c += 16) {
    const __mmask16 m = tail_mask(n - c);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + c), sh));
    _mm512_mask_storeu_ps(out + c, m, e);
    s0 = _mm512_mask_add_ps(s0, m, s0, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// soft_cap_row's loop (out may be z): tanh_slope's formula with exp16; the slope 4e / (1 + e)^2
// from rcp14 and a Newton step (~2^-28).
inline void soft_cap_avx512(const float* z, float* out, float* slope, int64_t n, float cap, float inv_cap) {
  const __m512 one = _mm512_set1_ps(1.0f), vcap = _mm512_set1_ps(cap), vinv = _mm512_set1_ps(inv_cap);
  const __m512i sign_bit = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = tail_mask(n - c);
    const __m512 u = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, z + c), vinv);
    const __m512 a = _mm512_abs_ps(u);
    const __m512 e = exp16(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f)));
    const __m512 d = _mm512_add_ps(one, e);
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
    const __m512 big = _mm512_div_ps(_mm512_sub_ps(one, e), d);  // divided: within 3 ulp, as the portable loop
    const __m512 big_slope = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(4.0f), e), _mm512_mul_ps(r, r));
    const __m512 u2 = _mm512_mul_ps(u, u);
    __m512 p = _mm512_fmadd_ps(u2, _mm512_set1_ps(0.0218694885f), _mm512_set1_ps(-0.0539682545f));
    p = _mm512_fmadd_ps(u2, p, _mm512_set1_ps(0.133333340f));
    p = _mm512_fmadd_ps(u2, p, _mm512_set1_ps(-0.333333343f));
    const __m512 small = _mm512_mul_ps(u, _mm512_fmadd_ps(u2, p, one));
    const __m512 big_signed = _mm512_castsi512_ps(
        _mm512_or_si512(_mm512_castps_si512(big), _mm512_and_si512(_mm512_castps_si512(u), sign_bit)));
    const __mmask16 is_small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.25f), _CMP_LT_OQ);
    const __m512 t = _mm512_mask_blend_ps(is_small, big_signed, small);
    const __m512 sl = _mm512_mask_blend_ps(is_small, big_slope, _mm512_fnmadd_ps(small, small, one));
    _mm512_mask_storeu_ps(out + c, m, _mm512_mul_ps(vcap, t));
    _mm512_mask_storeu_ps(slope + c, m, sl);
  }
}

// 16 fp32 -> 16 bf16 / fp16, rounded to nearest even (bf16 NaN -> a quiet NaN).
template <typename scalar_t>
inline __m256i narrow16(__m512 v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
#if defined(__AVX512BF16__)
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                     _mm512_set1_epi32(1)));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
#endif
  }
}

// out[c] = buf[c] * scale - off in bf16 / fp16.
template <typename scalar_t>
inline void store_grad_avx512(const float* buf, float scale, float off, scalar_t* out, int64_t n) {
  const __m512 sc = _mm512_set1_ps(scale), of = _mm512_set1_ps(off);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 v = _mm512_fmsub_ps(_mm512_loadu_ps(buf + c), sc, of);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), narrow16<scalar_t>(v));
  }
  if (c < n) {
    const __mmask16 m = tail_mask(n - c);
    const __m512 v = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, buf + c), sc, of);
    _mm256_mask_storeu_epi16(out + c, m, narrow16<scalar_t>(v));
  }
}
#pragma GCC diagnostic pop
#endif

// g[c] = buf[c] * scale - off in the storage type.
template <typename scalar_t, typename acc_t>
void store_grad(const acc_t* buf, acc_t scale, acc_t off, scalar_t* g, int64_t n, bool avx512) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    if (avx512) return store_grad_avx512(buf, scale, off, g, n);
  }
#endif
  (void)avx512;
  for (int64_t c = 0; c < n; ++c) g[c] = to_storage<scalar_t>(buf[c] * scale - off);
}

// MEMFAST_CPU_KERNEL=generic turns the AVX-512 loops off (read per call, for tests).
inline bool use_avx512() {
#if defined(__AVX512F__)
  const char* v = std::getenv("MEMFAST_CPU_KERNEL");
  return v == nullptr || std::strcmp(v, "generic") != 0;
#else
  return false;
#endif
}

template <typename T>
T row_max(const T* x, int64_t n, bool avx512) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (avx512) return max_avx512(x, n);
  }
#endif
  (void)avx512;
  return lanes_max(x, n);
}

template <typename T>
T row_exp_sum(const T* x, T* out, int64_t n, T shift, bool avx512) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (avx512) return exp_sum_avx512(x, out, n, shift);
  }
#endif
  (void)avx512;
  return lanes_exp_sum(x, out, n, shift);
}

// sum_c w[c] (x[c] - shift) (w == nullptr: weights 1).
template <typename T>
T lanes_dot(const T* x, const T* w, int64_t n, T shift = T(0)) {
  T lane[kLanes] = {};
  int64_t c = 0;
  if (w) {
    for (; c + kLanes <= n; c += kLanes)
      for (int k = 0; k < kLanes; ++k) lane[k] += w[c + k] * (x[c + k] - shift);
  } else {
    for (; c + kLanes <= n; c += kLanes)
      for (int k = 0; k < kLanes; ++k) lane[k] += x[c + k] - shift;
  }
  T s = 0;
  for (; c < n; ++c) s += w ? w[c] * (x[c] - shift) : x[c] - shift;
  for (int k = 0; k < kLanes; ++k) s += lane[k];
  return s;
}

// out[c] = cap * tanh(z[c] / cap) and slope[c] = its derivative (out may be z). The portable
// loop is ce_math.h's tanh_slope in a function of its own, with the scalars by value: written
// inside forward_rows' lambda GCC left it scalar ("control flow in loop"), over 2x slower.
template <typename T>
void soft_cap_row(const T* z, T* out, T* slope, int64_t n, T cap, T inv_cap, bool avx512) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (avx512) return soft_cap_avx512(z, out, slope, n, cap, inv_cap);
  }
#endif
  (void)avx512;
  for (int64_t c = 0; c < n; ++c) {
    const TanhSlope<T> t = tanh_slope(z[c] * inv_cap);
    out[c] = cap * t.value;
    slope[c] = t.slope;
  }
}

// The row a kernel computes on, in the accumulation type: the logits widened (plain fp32
// rows without a cap or shift are used in place), capped (slope[c] = d capped / d z) and
// shifted by adj_row (nullptr: none). buf holds C values.
template <typename scalar_t, typename acc_t>
const acc_t* load_row(const scalar_t* z, acc_t* buf, acc_t* slope, int64_t C, acc_t cap, acc_t inv_cap,
                      const acc_t* adj_row, bool avx512) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (!adj_row && cap == 0) return z;
  }
  const acc_t* widened = buf;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    widened = z;
  } else {
    for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<acc_t>(z[c]);
  }
  if (cap > 0) {
    soft_cap_row(widened, buf, slope, C, cap, inv_cap, avx512);
  } else if (widened != buf) {
    std::memcpy(buf, widened, C * sizeof(acc_t));
  }
  if (adj_row) {
    for (int64_t c = 0; c < C; ++c) buf[c] += adj_row[c];
  }
  return buf;
}

// The adjustment's row for logits row r (nullptr without one): dense rows, one [C] shift expanded
// to every row (stride 0), or the table row that groups names.
template <typename acc_t>
struct AdjustmentRows {
  const acc_t* adj;
  int64_t ld;
  const int64_t* groups;

  AdjustmentRows(const at::Tensor& adjustment, const at::Tensor& groups_)
      : adj(adjustment.defined() ? adjustment.const_data_ptr<acc_t>() : nullptr),
        ld(adjustment.defined() ? adjustment.stride(0) : 0),
        groups(groups_.defined() ? groups_.const_data_ptr<int64_t>() : nullptr) {}

  const acc_t* row(int64_t r) const { return adj ? adj + (groups ? groups[r] : r) * ld : nullptr; }
};

// The mean's or the sum's loss: the row losses summed in double (the exact order of a serial
// loop), divided by den (1 for the sum; the mean over no rows is NaN, as in PyTorch).
template <typename acc_t>
void write_total(const at::Tensor& loss_rows, acc_t den, at::Tensor& loss) {
  double total = 0;
  const acc_t* lp = loss_rows.const_data_ptr<acc_t>();
  for (int64_t r = 0; r < loss_rows.numel(); ++r) total += lp[r];
  *loss.mutable_data_ptr<acc_t>() = static_cast<acc_t>(total) / den;
}

}  // namespace cpu
}  // namespace memfast
