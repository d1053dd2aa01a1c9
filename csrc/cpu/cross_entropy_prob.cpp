// CPU kernel of memfast::cross_entropy_prob_fwd: cross entropy against class
// probabilities (soft labels, mixup, a teacher's probabilities), with
// PyTorch's semantics, the gradient and the tracking statistics in one pass.
//
// Per row, with t' = (1 - eps) t + eps / C and wt_c = w_c t'_c:
//   loss = sum_c wt_c (lse - z_c) [+ zeta lse^2 where the row has target mass]
//        = A (lse - m) - sum_c wt_c (z_c - m),  A = sum_c wt_c, m = max_c z_c
// (both terms >= 0 for non-negative targets: no cancellation however large the
// logits), and d loss / d z_c = (A + 2 zeta lse) p_c - wt_c. The mean is over
// rows, as PyTorch averages probability-target losses. The row statistics are
// those of index targets against the row's most probable class (its label,
// returned; -100 for a row without positive mass or with a NaN target).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../common/ce_math.h"
#include "../common/checks.h"
#include "../common/forward_entries.h"
#include "row_loops.h"

namespace memfast {
namespace {

using namespace cpu;

// sum_c w[c] t'[c] into wt (w == nullptr: 1), t' = (1 - eps) t + eps / C; returns the sum.
template <typename T>
T lanes_weighted_targets(const T* t, const T* w, T* wt, int64_t n, T keep, T spread) {
  T lane[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const T v = (w ? w[c + k] : T(1)) * (keep * t[c + k] + spread);
      wt[c + k] = v;
      lane[k] += v;
    }
  T s = 0;
  for (; c < n; ++c) {
    wt[c] = (w ? w[c] : T(1)) * (keep * t[c] + spread);
    s += wt[c];
  }
  for (int k = 0; k < kLanes; ++k) s += lane[k];
  return s;
}

// Whether any entry is NaN.
template <typename T>
bool lanes_any_nan(const T* x, int64_t n) {
  int lane[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int k = 0; k < kLanes; ++k) lane[k] |= x[c + k] != x[c + k];
  int any = 0;
  for (; c < n; ++c) any |= x[c] != x[c];
  for (int k = 0; k < kLanes; ++k) any |= lane[k];
  return any != 0;
}

template <typename scalar_t, typename target_t>
void forward_rows(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                  double label_smoothing, const at::Tensor& adjustment, const at::Tensor& groups,
                  at::opmath_type<scalar_t> grad_scale, double lse_square_scale, double softcap,
                  at::Tensor& loss_rows, at::Tensor& row_stats, at::Tensor& label, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = logits.size(0), C = logits.size(1);
  const int64_t ld = logits.stride(0), t_ld = target.stride(0);
  const scalar_t* z_base = logits.const_data_ptr<scalar_t>();
  const target_t* t_base = target.const_data_ptr<target_t>();
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  const AdjustmentRows<acc_t> shift(adjustment, groups);
  acc_t* loss_p = loss_rows.mutable_data_ptr<acc_t>();
  acc_t* st = row_stats.mutable_data_ptr<acc_t>();
  int64_t* label_p = label.mutable_data_ptr<int64_t>();
  scalar_t* g_base = grad.numel() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t eps = static_cast<acc_t>(label_smoothing);
  const acc_t keep = acc_t(1) - eps, spread = eps / static_cast<acc_t>(C);
  const acc_t zeta = static_cast<acc_t>(lse_square_scale);
  const acc_t cap = static_cast<acc_t>(softcap);
  const acc_t inv_cap = cap > 0 ? acc_t(1) / cap : acc_t(0);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool avx512 = use_avx512();

  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    // (targets already in acc_t are read in place)
    std::vector<acc_t> buffer(C), target_buffer(std::is_same_v<target_t, acc_t> ? 0 : C), weighted(C);
    acc_t* buf = buffer.data();
    acc_t* tbuf = target_buffer.data();
    acc_t* wt = weighted.data();
    std::vector<acc_t> slope_buffer(cap > 0 ? C : 0);
    acc_t* slope = slope_buffer.data();
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* row = load_row(z_base + r * ld, buf, slope, C, cap, inv_cap,
                                  shift.row(r), avx512);
      const target_t* t_in = t_base + r * t_ld;
      const acc_t* t = tbuf;
      if constexpr (std::is_same_v<target_t, acc_t>) {
        t = t_in;
      } else {
        for (int64_t c = 0; c < C; ++c) tbuf[c] = static_cast<acc_t>(t_in[c]);
      }
      // The tracked class: the first most probable one, where the row has mass and no NaN.
      const acc_t t_max = row_max(t, C, avx512);
      int64_t y = -100;
      if (t_max > 0 && !lanes_any_nan(t, C)) {
        y = 0;
        while (t[y] != t_max) ++y;
      }
      label_p[r] = y;
      const acc_t mass_sum = lanes_weighted_targets(t, w, wt, C, keep, spread);
      acc_t m, z_y = 0, max_other = ninf, correct = 0;
      if (y >= 0) {
        const acc_t max_before = row_max(row, y, avx512);
        const acc_t max_after = row_max(row + y + 1, C - y - 1, avx512);
        z_y = row[y];
        max_other = max_before > max_after ? max_before : max_after;
        m = z_y > max_other ? z_y : max_other;
        correct = ((y == 0 || z_y > max_before) && z_y >= max_after) ? 1 : 0;
      } else {
        m = row_max(row, C, avx512);
      }
      // (An infinite maximum gives NaN sums, as in cross_entropy_fwd: the row is not finite.)
      const acc_t shifted_dot = lanes_dot(row, wt, C, m);
      const acc_t sum = row_exp_sum(row, buf, C, m, avx512);
      const acc_t log_sum = std::log(sum);
      const acc_t lse = m + log_sum;
      const bool has_mass = y >= 0;
      // (No mass, e.g. no classes: 0, not 0 * log(0).)
      acc_t loss = (mass_sum == 0 ? acc_t(0) : mass_sum * log_sum) - shifted_dot;
      if (zeta != 0 && has_mass) loss += zeta * lse * lse;
      loss_p[r] = loss;
      st[ROW_LOG_SUM * R + r] = has_mass ? log_sum : acc_t(0);
      st[ROW_TARGET_LOGIT * R + r] = z_y;
      st[ROW_MAX_OTHER * R + r] = has_mass ? max_other : acc_t(0);  // -inf when C == 1
      st[ROW_WEIGHT * R + r] = 1;  // every row counts in the mean
      st[ROW_CORRECT * R + r] = correct;
      if (!g_base) continue;
      scalar_t* g = g_base + r * C;
      acc_t scale_p = mass_sum;
      if (zeta != 0 && has_mass) scale_p += acc_t(2) * zeta * lse;
      const acc_t scale = scale_p / sum * grad_scale;
      // Each element formed in acc_t and rounded once (p_y - t_y cancels as p_y -> t_y).
      if (cap > 0) {
        for (int64_t c = 0; c < C; ++c)
          g[c] = to_storage<scalar_t>((buf[c] * scale - wt[c] * grad_scale) * slope[c]);
      } else {
        for (int64_t c = 0; c < C; ++c) g[c] = to_storage<scalar_t>(buf[c] * scale - wt[c] * grad_scale);
      }
    }
  });
}

// grad_into: nullptr (allocate the gradient when compute_grad) or the logits themselves
// (cross_entropy_prob_fwd_): forward_rows reads a row only until its exp-sum, before the gradient
// of that row (formed from the row buffers) is written over it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, const std::optional<at::Tensor>& weight_opt,
    double label_smoothing, const std::optional<at::Tensor>& adjustment_opt,
    const std::optional<at::Tensor>& groups_opt, bool compute_grad, int64_t reduction, double lse_square_scale,
    double softcap, const at::Tensor* grad_into) {
  const ProbInputs in = prob_inputs(logits_in, target_in, weight_opt, label_smoothing, adjustment_opt, groups_opt,
                                    reduction, lse_square_scale, softcap, grad_into != nullptr, false);
  const at::Tensor &logits = in.logits, &target = in.target, &weight = in.weight;
  const at::Tensor &adjustment = in.adjustment, &groups = in.groups;
  const int64_t R = logits.size(0);
  if (groups.defined()) check_groups_host(groups.const_data_ptr<int64_t>(), R, adjustment.size(0));

  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  at::Tensor loss_rows = at::empty({R}, logits.options().dtype(acc_dtype));
  at::Tensor row_stats = at::empty({NUM_ROW_STATS, R}, logits.options().dtype(acc_dtype));
  at::Tensor label = at::empty({R}, logits.options().dtype(at::kLong));
  at::Tensor grad = grad_into ? *grad_into
                              : at::empty({compute_grad ? R : 0, compute_grad ? logits.size(1) : 0}, logits.options());
  at::Tensor loss = reduction == REDUCTION_NONE ? loss_rows : at::empty({}, loss_rows.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "memfast_cross_entropy_prob_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // PyTorch's mean over probability-target rows: input.numel() / C, the number of rows (NaN
    // for none, and for no classes).
    const acc_t den = reduction == REDUCTION_MEAN ? static_cast<acc_t>(logits.size(1) > 0 ? R : 0) : acc_t(1);
    if (R > 0 && target.scalar_type() == logits.scalar_type()) {
      forward_rows<scalar_t, scalar_t>(logits, target, weight, label_smoothing, adjustment, groups, acc_t(1) / den,
                                       lse_square_scale, softcap, loss_rows, row_stats, label, grad);
    } else if (R > 0) {  // targets in the accumulation type (fp32 probabilities for bf16 logits)
      forward_rows<scalar_t, acc_t>(logits, target, weight, label_smoothing, adjustment, groups, acc_t(1) / den,
                                    lse_square_scale, softcap, loss_rows, row_stats, label, grad);
    }
    if (reduction != REDUCTION_NONE) write_total(loss_rows, den, loss);
  });
  return {loss, row_stats, label, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(memfast, CPU, m) {
  m.impl("cross_entropy_prob_fwd", &prob_forward_allocating<forward_cpu>);
  m.impl("cross_entropy_prob_fwd_", &prob_forward_grad_over_logits<forward_cpu>);
}

}  // namespace memfast
