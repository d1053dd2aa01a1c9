// CPU kernels of memfast::cross_entropy_fwd / cross_entropy_bwd.
//
// Each row is read from memory once: fp32 rows in place, other types converted
// to the accumulation type into a per-thread buffer (L1/L2 resident); every
// later sweep (max, exp, gradient) runs in cache. The portable loops reduce over
// 16 independent lanes so the compiler vectorises them without -ffast-math;
// with AVX-512 the hot loops are written with intrinsics. The reduction (mean /
// sum) happens here too, so the mean's gradient carries its 1/N.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../common/ce_math.h"
#include "../common/checks.h"
#include "../common/forward_entries.h"

namespace memfast {
namespace {

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
bool use_avx512() {
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

// sum_c w[c] x[c] (w == nullptr: plain sum).
template <typename T>
T lanes_dot(const T* x, const T* w, int64_t n) {
  T lane[kLanes] = {};
  int64_t c = 0;
  if (w) {
    for (; c + kLanes <= n; c += kLanes)
      for (int k = 0; k < kLanes; ++k) lane[k] += w[c + k] * x[c + k];
  } else {
    for (; c + kLanes <= n; c += kLanes)
      for (int k = 0; k < kLanes; ++k) lane[k] += x[c + k];
  }
  T s = 0;
  for (; c < n; ++c) s += w ? w[c] * x[c] : x[c];
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

// One row per iteration of at::parallel_for: loss (per row, into loss_rows),
// row statistics and, when grad is non-empty, grad_scale * d loss_row / d z.
template <typename scalar_t>
void forward_rows(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                  int64_t ignore_index, double label_smoothing, const at::Tensor& adjustment,
                  const at::Tensor& groups, at::opmath_type<scalar_t> grad_scale, double lse_square_scale,
                  double softcap, at::Tensor& loss_rows, at::Tensor& row_stats, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = logits.size(0), C = logits.size(1);
  const int64_t ld = logits.stride(0);
  const scalar_t* z_base = logits.const_data_ptr<scalar_t>();
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* adj = adjustment.defined() ? adjustment.const_data_ptr<acc_t>() : nullptr;
  const int64_t adj_ld = adjustment.defined() ? adjustment.stride(0) : 0;
  const int64_t* grp = groups.defined() ? groups.const_data_ptr<int64_t>() : nullptr;
  acc_t* loss_p = loss_rows.mutable_data_ptr<acc_t>();
  acc_t* st = row_stats.mutable_data_ptr<acc_t>();
  scalar_t* g_base = grad.numel() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t eps = static_cast<acc_t>(label_smoothing);
  const acc_t zeta = static_cast<acc_t>(lse_square_scale);
  const acc_t cap = static_cast<acc_t>(softcap);
  const acc_t inv_cap = cap > 0 ? acc_t(1) / cap : acc_t(0);
  const acc_t weight_sum = w ? lanes_dot<acc_t>(w, nullptr, C) : static_cast<acc_t>(C);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool avx512 = use_avx512();

  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(C);
    acc_t* buf = buffer.data();
    // With a softcap, d capped / d z per element (the gradient's chain factor).
    std::vector<acc_t> slope_buffer(cap > 0 ? C : 0);
    acc_t* slope = slope_buffer.data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = tgt[r];
      scalar_t* g = g_base ? g_base + r * C : nullptr;
      if (y == ignore_index) {
        // Ignored rows: zeros everywhere (the tracker skips them by target).
        loss_p[r] = 0;
        for (int k = 0; k < NUM_ROW_STATS; ++k) st[k * R + r] = 0;
        if (g) std::fill(g, g + C, scalar_t(0));
        continue;
      }
      const scalar_t* z = z_base + r * ld;
      // The (capped, adjusted) row in the accumulation type; plain fp32 rows are read in place.
      const acc_t* row = buf;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (!adj && cap == 0) row = z;
      }
      if (row == buf) {
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
        if (adj) {
          const acc_t* s = adj + (grp ? grp[r] : r) * adj_ld;
          for (int64_t c = 0; c < C; ++c) buf[c] += s[c];
        }
      }
      // The scans first: reading row[y] before them would be a cache miss per row
      // that the hardware prefetcher, following the row in order, cannot hide.
      const acc_t max_before = row_max(row, y, avx512);
      const acc_t max_after = row_max(row + y + 1, C - y - 1, avx512);
      const acc_t z_y = row[y];
      const acc_t max_other = max_before > max_after ? max_before : max_after;
      const acc_t m = z_y > max_other ? z_y : max_other;
      const acc_t weighted_logit_sum = eps > 0 ? lanes_dot(row, w, C) : acc_t(0);
      const acc_t sum = row_exp_sum(row, buf, C, m, avx512);
      const acc_t lse = m + std::log(sum);
      const acc_t w_y = w ? w[y] : acc_t(1);
      loss_p[r] = row_loss(lse, z_y, w_y, weight_sum, weighted_logit_sum, eps, C, zeta);
      st[ROW_LSE * R + r] = lse;
      st[ROW_TARGET_LOGIT * R + r] = z_y;
      st[ROW_MAX_OTHER * R + r] = C > 1 ? max_other : ninf;
      st[ROW_WEIGHT * R + r] = w_y;
      // First index of the maximum, as argmax: nothing before y (y == 0) is beaten by z_y even
      // when all are -inf.
      st[ROW_CORRECT * R + r] = ((y == 0 || z_y > max_before) && z_y >= max_after) ? 1 : 0;
      if (!g) continue;
      const GradCoef<acc_t> k = grad_coefficients(w_y, weight_sum, eps, C, grad_scale, zeta, lse);
      const acc_t scale = k.scale_p / sum;
      if (cap > 0) {
        // d loss / d z = d loss / d capped * slope, the target term rounded once as below
        if (w && eps > 0) {
          for (int64_t c = 0; c < C; ++c) g[c] = to_storage<scalar_t>((buf[c] * scale - k.eps_w * w[c]) * slope[c]);
        } else {
          const acc_t off = w ? acc_t(0) : k.eps_w;
          for (int64_t c = 0; c < C; ++c) g[c] = to_storage<scalar_t>((buf[c] * scale - off) * slope[c]);
        }
        g[y] = to_storage<scalar_t>((buf[y] * scale - k.eps_w * w_y - k.target_w) * slope[y]);
        continue;
      }
      if (w && eps > 0) {
        for (int64_t c = 0; c < C; ++c) g[c] = to_storage<scalar_t>(buf[c] * scale - k.eps_w * w[c]);
      } else {
        store_grad(buf, scale, w ? acc_t(0) : k.eps_w, g, C, avx512);
      }
      // The target term is formed in the accumulation type and rounded once:
      // p_y - 1 from a rounded p_y would cancel catastrophically as p_y -> 1.
      g[y] = to_storage<scalar_t>(buf[y] * scale - k.eps_w * w_y - k.target_w);
    }
  });
}

// sum over rows of weight[target] (1 without weights), ignored rows excluded: the mean's denominator.
template <typename acc_t>
acc_t mean_denominator(const int64_t* tgt, int64_t R, const acc_t* w, int64_t ignore_index) {
  double den = 0;  // double: the exact count for up to 2^53 rows without weights
  for (int64_t r = 0; r < R; ++r) {
    if (tgt[r] != ignore_index) den += w ? static_cast<double>(w[tgt[r]]) : 1.0;
  }
  return static_cast<acc_t>(den);
}

// grad_into: nullptr (allocate the gradient when compute_grad) or the logits themselves
// (cross_entropy_fwd_): each row is read into the row buffer before its gradient is written.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& logits_in, const at::Tensor& target, const std::optional<at::Tensor>& weight_opt,
    int64_t ignore_index, double label_smoothing, const std::optional<at::Tensor>& adjustment_opt,
    const std::optional<at::Tensor>& groups_opt, bool compute_grad, int64_t reduction, double lse_square_scale,
    double softcap, const at::Tensor* grad_into) {
  const at::Tensor weight = weight_opt.value_or(at::Tensor());
  const at::Tensor adjustment = adjustment_opt.value_or(at::Tensor());
  const at::Tensor groups = groups_opt.value_or(at::Tensor());
  if (grad_into) check_inplace_logits(logits_in);
  check_forward_args(logits_in, target, weight, label_smoothing, adjustment, groups, reduction, lse_square_scale,
                     softcap);
  // Rows may be strided; the class dimension must be dense.
  const at::Tensor logits = logits_in.stride(1) == 1 || logits_in.size(1) <= 1 ? logits_in : logits_in.contiguous();
  const int64_t R = logits.size(0), C = logits.size(1);
  check_targets_host(target.const_data_ptr<int64_t>(), R, C, ignore_index);
  if (groups.defined()) check_groups_host(groups.const_data_ptr<int64_t>(), R, adjustment.size(0));

  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  at::Tensor loss_rows = at::empty({R}, logits.options().dtype(acc_dtype));
  at::Tensor row_stats = at::empty({NUM_ROW_STATS, R}, logits.options().dtype(acc_dtype));
  at::Tensor grad = grad_into ? *grad_into : at::empty({compute_grad ? R : 0, compute_grad ? C : 0}, logits.options());
  at::Tensor loss = reduction == REDUCTION_NONE ? loss_rows : at::empty({}, loss_rows.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "memfast_cross_entropy_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    const acc_t den = reduction == REDUCTION_MEAN
                          ? mean_denominator<acc_t>(target.const_data_ptr<int64_t>(), R, w, ignore_index)
                          : acc_t(1);
    if (R > 0) {
      forward_rows<scalar_t>(logits, target, weight, ignore_index, label_smoothing, adjustment, groups,
                             acc_t(1) / den, lse_square_scale, softcap, loss_rows, row_stats, grad);
    }
    if (reduction != REDUCTION_NONE) {
      double total = 0;
      const acc_t* lp = loss_rows.const_data_ptr<acc_t>();
      for (int64_t r = 0; r < R; ++r) total += lp[r];
      // The mean over no rows (or rows all weighing 0) is NaN, as in PyTorch.
      *loss.mutable_data_ptr<acc_t>() = static_cast<acc_t>(total) / den;
    }
  });
  return {loss, row_stats, grad};
}

// out = g * grad_loss[:, None] row by row, or g * grad_loss for a 0-d grad_loss (out may be g itself).
void scale_rows_cpu(const at::Tensor& g, const at::Tensor& grad_loss, at::Tensor& out) {
  const int64_t R = g.size(0), C = g.size(1);
  if (g.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "memfast_cross_entropy_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* go = grad_loss.const_data_ptr<acc_t>();
    const int64_t go_stride = grad_loss.dim() == 0 ? 0 : grad_loss.stride(0);
    const int64_t grain = std::max<int64_t>(1, 32768 / C);
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t s = go[r * go_stride];
        // In place, times 1 (a mean's or sum's loss.backward(): the mean's 1/N is
        // already in the gradient): nothing to read or write.
        if (s == acc_t(1) && op == gp) continue;
        const scalar_t* src = gp + r * C;
        scalar_t* dst = op + r * C;
        // A zero stays zero (ignored rows) even when s is inf/NaN, e.g. a mean over no rows.
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = static_cast<acc_t>(src[c]);
          dst[c] = to_storage<scalar_t>(v == acc_t(0) ? acc_t(0) : v * s);
        }
      }
    });
  });
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad, const at::Tensor& grad_loss) {
  check_backward_args(grad, grad_loss);
  const at::Tensor g = grad.contiguous();
  at::Tensor out = at::empty_like(g);
  scale_rows_cpu(g, grad_loss, out);
  return out;
}

void cross_entropy_bwd_inplace_cpu(at::Tensor& grad, const at::Tensor& grad_loss) {
  check_backward_args(grad, grad_loss);
  TORCH_CHECK_VALUE(grad.is_contiguous(), "memfast.cross_entropy backward: the saved gradient must be contiguous");
  scale_rows_cpu(grad, grad_loss, grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(memfast, CPU, m) {
  m.impl("cross_entropy_fwd", &forward_allocating<forward_cpu>);
  m.impl("cross_entropy_fwd_", &forward_grad_over_logits<forward_cpu>);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("cross_entropy_bwd_", &cross_entropy_bwd_inplace_cpu);
}

}  // namespace memfast
