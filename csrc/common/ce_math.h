// Per-row cross-entropy and per-sample statistics math shared by the CPU and
// CUDA kernels. Everything here is header-only and free of ATen types so that
// nvcc and the host compiler see exactly the same arithmetic.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEMFAST_HD __host__ __device__ __forceinline__
#else
#define MEMFAST_HD inline
#endif

namespace memfast {

// Rows of the per-row statistics tensor that the forward op returns ([NUM_ROW_STATS, R]).
// Keep in sync with memfast/_stats.py (checked by tests through build_info()).
enum RowStat : int {
  ROW_LOG_SUM = 0,   // log sum_c exp(z_c - m) of the (adjusted) logits, m = max_c z_c: lse - m
  ROW_TARGET_LOGIT,  // adjusted logit of the target class (every row stat is 0 for ignored rows)
  ROW_MAX_OTHER,     // largest adjusted logit among the other classes (-inf when C == 1)
  ROW_WEIGHT,        // weight[target] (1 without weights, 0 for ignored rows): the mean's denominator
  ROW_CORRECT,       // 1 when argmax (first maximal index) == target
  NUM_ROW_STATS
};

// Per-sample statistics a SampleTracker can hold, one fp32 row of length N each.
enum Stat : int {
  STAT_CSL = 0,         // sum of per-sample loss
  STAT_COUNT,           // number of (finite) updates
  STAT_LAST_LOSS,       // loss at the latest update
  STAT_LOSS_SQ,         // sum of squared loss (variance)
  STAT_INCONF,          // sum of 1 - p_true
  STAT_PTRUE_SQ,        // sum of p_true^2 (cartography variability)
  STAT_MARGIN,          // sum of target logit - largest other logit (AUM)
  STAT_CORRECT,         // number of correct updates
  STAT_FORGETTING,      // correct -> incorrect transitions between consecutive updates
  STAT_LEARNED_EPOCH,   // epoch of the latest incorrect -> correct transition; -1 while incorrect
  STAT_LAST_CORRECT,    // correctness at the latest update; -1 before the first
  STAT_LAST_MAXPROB,    // max softmax probability at the latest update
  STAT_NONFINITE,       // number of updates whose loss was not finite (not accumulated)
  STAT_LAST_UPDATE,     // tracker call index (counters[calls]) of the latest update: merges ranks
  NUM_STATS
};

// Tracker counters (int64 tensor [NUM_COUNTERS]).
enum Counter : int {
  COUNTER_EPOCH = 0,     // completed epochs (read by the update)
  COUNTER_CALLS,         // number of tracker updates
  COUNTER_BAD_IDS,       // rows skipped because their sample id was out of range (device path)
  COUNTER_BAD_TARGETS,   // rows skipped because their target was out of range (device path)
  NUM_COUNTERS
};

// exp(x) for x <= 0 (and anything else), written as branch-free arithmetic so
// that the host compiler vectorises loops that call it (std::exp would not be).
// Cephes-style range reduction, degree-6 polynomial: ~2 ulp in fp32.
MEMFAST_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f;
  const float ln2_lo = -2.12194440e-4f;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float t = xc * log2e + round_magic;
  float n = t - round_magic;
  float r = xc - n * ln2_hi;
  r = r - n * ln2_lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t t_bits;
  __builtin_memcpy(&t_bits, &t, sizeof(t_bits));
  int32_t bits = (t_bits - 0x4B400000 + 127) << 23;  // 2^n
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  float result = p * scale;
  result = x < -87.0f ? 0.0f : result;              // underflow (and -inf) -> 0
  return x > 88.0f ? x * 2.0f + result : result;    // overflow -> inf
  // NaN needs no select: it propagates through r and p (whatever the scale bits).
#endif
}

MEMFAST_HD double fast_exp(double x) { return ::exp(x); }

// tanh(u) and its derivative 1 - tanh(u)^2, branch-free so that loops calling it vectorise.
// |u| < 1/4: the odd Taylor series to u^9 (truncation < 1e-8 relative). Otherwise from
// e = exp(-2|u|): tanh = (1 - e) / (1 + e), where 1 - e is exact (e >= 1/2 near the switch),
// and 1 - tanh^2 = 4e / (1 + e)^2, which keeps its relative precision as tanh -> +-1.
template <typename T>
struct TanhSlope {
  T value;
  T slope;
};

MEMFAST_HD TanhSlope<float> tanh_slope(float u) {
  const float a = u < 0.0f ? -u : u;
  const float e = fast_exp(-2.0f * a);  // 0 for |u| = inf; NaN stays NaN
  const float big = (1.0f - e) / (1.0f + e);
  const float u2 = u * u;
  const float small =
      u * (1.0f + u2 * (-0.333333343f + u2 * (0.133333340f + u2 * (-0.0539682545f + u2 * 0.0218694885f))));
  TanhSlope<float> t;
  const bool is_small = a < 0.25f;
  t.value = is_small ? small : (u < 0.0f ? -big : big);
  t.slope = is_small ? 1.0f - small * small : 4.0f * e / ((1.0f + e) * (1.0f + e));
  return t;
}

MEMFAST_HD TanhSlope<double> tanh_slope(double u) {
  const double e = ::exp(-2.0 * (u < 0.0 ? -u : u));
  TanhSlope<double> t;
  t.value = ::tanh(u);
  t.slope = 4.0 * e / ((1.0 + e) * (1.0 + e));
  return t;
}

// Logit softcapping (Gemma 2's final_logit_softcapping): the model's logit z becomes
// cap * tanh(z / cap), whose derivative is the slope above. cap == 0: off (z, slope 1).
// inv_cap = 1 / cap (0 when off).
template <typename T>
MEMFAST_HD T soft_cap(T z, T cap, T inv_cap, T* slope = nullptr) {
  if (cap == T(0)) {
    if (slope) *slope = T(1);
    return z;
  }
  const TanhSlope<T> t = tanh_slope(z * inv_cap);
  if (slope) *slope = t.slope;
  return cap * t.value;
}

// max that propagates NaN (std::max would drop it depending on argument order).
template <typename T>
MEMFAST_HD T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// Coefficients of the per-row gradient of
//   l = (1-eps) w_y (lse - z_y) + (eps/C) sum_c w_c (lse - z_c) + zeta w_y lse^2
// with respect to the logits:  dl/dz_c = p_c * scale_p - eps_w * w_c - [c == y] * target_w
// (w == 1 without class weights; weight_sum = sum_c w_c; zeta = lse_square_scale, the z-loss).
template <typename T>
struct GradCoef {
  T scale_p;   // multiplies p_c
  T eps_w;     // eps / C, multiplies w_c
  T target_w;  // (1 - eps) * w_y, subtracted at the target
};

// `grad_scale` is the reduction's factor (1 / sum of w_y for the mean, else 1).
// A zero coefficient stays zero when grad_scale is inf (a mean over rows that
// all weigh 0), so that rows contributing nothing get a zero gradient.
template <typename T>
MEMFAST_HD GradCoef<T> grad_coefficients(T w_y, T weight_sum, T eps, int64_t C, T grad_scale = T(1), T zeta = T(0),
                                         T lse = T(0)) {
  GradCoef<T> g;
  g.eps_w = eps / static_cast<T>(C);
  g.target_w = (T(1) - eps) * w_y;
  g.scale_p = g.target_w + g.eps_w * weight_sum;
  // the z-loss: d(zeta w_y lse^2) / dz_c = 2 zeta w_y lse p_c
  if (zeta != T(0) && w_y != T(0)) g.scale_p += T(2) * zeta * w_y * lse;
  if (grad_scale != T(1)) {
    g.eps_w = g.eps_w == T(0) ? T(0) : g.eps_w * grad_scale;
    g.target_w = g.target_w == T(0) ? T(0) : g.target_w * grad_scale;
    g.scale_p = g.scale_p == T(0) ? T(0) : g.scale_p * grad_scale;
  }
  return g;
}

// The op's `reduction` argument (the values of at::Reduction).
enum Reduction : int { REDUCTION_NONE = 0, REDUCTION_MEAN = 1, REDUCTION_SUM = 2 };

// lse - z_y from the row's max m and log_sum = log sum_c exp(z_c - m), formed as PyTorch's
// log_softmax forms it: z_y - m is exact for nearby values, where m + log_sum - z_y would round
// lse to ulp(m) first (fp32: 4.9e-4 off at logits near 1e4, 2.2 near 1e8; bench/large_logits.py).
template <typename T>
MEMFAST_HD T target_nll(T log_sum, T z_y, T m) {
  return log_sum - (z_y - m);
}

// The loss of one row from its max m, log_sum (as above), target logit and (when smoothing)
// shifted_dot = sum_c w_c (z_c - m); zeta > 0 adds the z-loss zeta w_y lse^2.
template <typename T>
MEMFAST_HD T row_loss(T log_sum, T z_y, T m, T w_y, T weight_sum, T shifted_dot, T eps, int64_t C,
                      T zeta = T(0)) {
  T loss = w_y * target_nll(log_sum, z_y, m);
  if (eps != T(0)) {
    T smooth = weight_sum * log_sum - shifted_dot;  // sum_c w_c (lse - z_c)
    loss = (T(1) - eps) * loss + eps / static_cast<T>(C) * smooth;
  }
  if (zeta != T(0) && w_y != T(0)) {
    const T lse = m + log_sum;
    loss += zeta * w_y * lse * lse;
  }
  return loss;
}

// What one finite row contributes to a sample's statistics.
struct RowContribution {
  float nll;      // unsmoothed, unweighted CE of the adjusted logits
  float p_true;
  float margin;
  float max_prob;
  float correct;  // 0 or 1
  bool finite;
};

// From a row's statistics in their own type (fp64 ones are subtracted before rounding to fp32).
// The row's max is max(z_y, max_other); a NaN in either makes nll NaN (the row is not finite).
template <typename T>
MEMFAST_HD RowContribution row_contribution(T log_sum, T z_y, T max_other, T correct) {
  RowContribution r;
  const T m = z_y >= max_other ? z_y : max_other;
  r.nll = static_cast<float>(target_nll(log_sum, z_y, m));
  r.finite = (r.nll == r.nll) && (r.nll < INFINITY) && (r.nll > -INFINITY);
  r.p_true = fast_exp(-r.nll);
  // C == 1 (or every other class masked to -inf): no competitor, margin 0.
  r.margin = (max_other == -INFINITY) ? 0.0f : static_cast<float>(z_y - max_other);
  r.max_prob = fast_exp(-static_cast<float>(log_sum));  // exp(m - lse): the top class's probability
  r.correct = static_cast<float>(correct);
  return r;
}

// Accessor over the tracker's struct-of-arrays state: row(stat) is the fp32
// array of that statistic, or nullptr when the tracker does not keep it.
struct StateView {
  float* base;
  int64_t stride;  // elements between two statistics' rows
  const int64_t* stat_rows;  // [NUM_STATS], -1 when absent
  MEMFAST_HD float* row(int stat) const {
    int64_t r = stat_rows[stat];
    return r < 0 ? nullptr : base + r * stride;
  }
};

// Additive statistics: every finite row of the sample adds (repeated ids add).
// `add(ptr, v)` is plain += on the host and an atomicAdd on the device.
template <typename AddFn>
MEMFAST_HD void add_row_sums(const StateView& s, int64_t id, const RowContribution& r, AddFn add) {
  float* p;
  if ((p = s.row(STAT_CSL))) add(p + id, r.nll);
  if ((p = s.row(STAT_COUNT))) add(p + id, 1.0f);
  if ((p = s.row(STAT_LOSS_SQ))) add(p + id, r.nll * r.nll);
  if ((p = s.row(STAT_INCONF))) add(p + id, 1.0f - r.p_true);
  if ((p = s.row(STAT_PTRUE_SQ))) add(p + id, r.p_true * r.p_true);
  if ((p = s.row(STAT_MARGIN))) add(p + id, r.margin);
  if ((p = s.row(STAT_CORRECT))) add(p + id, r.correct);
}

// Per-sample state (latest loss, correctness transitions): applied once per
// sample per update, from that sample's last finite row in the batch.
// `call` is the tracker's call index after this update (counters[calls]).
MEMFAST_HD void apply_row_state(const StateView& s, int64_t id, const RowContribution& r, float epoch, float call) {
  float* p;
  if ((p = s.row(STAT_LAST_UPDATE))) p[id] = call;
  if ((p = s.row(STAT_LAST_LOSS))) p[id] = r.nll;
  if ((p = s.row(STAT_LAST_MAXPROB))) p[id] = r.max_prob;
  float* last = s.row(STAT_LAST_CORRECT);
  if (last) {
    float before = last[id];
    if ((p = s.row(STAT_FORGETTING)) && before == 1.0f && r.correct == 0.0f) p[id] += 1.0f;
    if ((p = s.row(STAT_LEARNED_EPOCH))) {
      if (r.correct == 0.0f) p[id] = -1.0f;
      else if (before != 1.0f) p[id] = epoch;
    }
    last[id] = r.correct;
  }
}

}  // namespace memfast
