// CPU kernels of memfast::cross_entropy_fwd / cross_entropy_bwd.
//
// Each row is read from memory once: fp32 rows in place, other types converted
// to the accumulation type into a per-thread buffer (L1/L2 resident); every
// later sweep (max, exp, gradient) runs in cache (the loops: row_loops.h). The
// reduction (mean / sum) happens here too, so the mean's gradient carries its 1/N.
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

#include "../common/ce_math.h"
#include "../common/checks.h"
#include "../common/forward_entries.h"
#include "row_loops.h"

namespace memfast {
namespace {

using namespace cpu;

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
  const AdjustmentRows<acc_t> shift(adjustment, groups);
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
      // The (capped, adjusted) row in the accumulation type; plain fp32 rows are read in place.
      const acc_t* row = load_row(z_base + r * ld, buf, slope, C, cap, inv_cap,
                                  shift.row(r), avx512);
      // The scans first: reading row[y] before them would be a cache miss per row
      // that the hardware prefetcher, following the row in order, cannot hide.
      const acc_t max_before = row_max(row, y, avx512);
      const acc_t max_after = row_max(row + y + 1, C - y - 1, avx512);
      const acc_t z_y = row[y];
      const acc_t max_other = max_before > max_after ? max_before : max_after;
      const acc_t m = z_y > max_other ? z_y : max_other;
      const acc_t shifted_dot = eps > 0 ? lanes_dot(row, w, C, m) : acc_t(0);
      const acc_t sum = row_exp_sum(row, buf, C, m, avx512);
      const acc_t log_sum = std::log(sum);
      const acc_t lse = m + log_sum;
      const acc_t w_y = w ? w[y] : acc_t(1);
      loss_p[r] = row_loss(log_sum, z_y, m, w_y, weight_sum, shifted_dot, eps, C, zeta);
      st[ROW_LOG_SUM * R + r] = log_sum;
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
  if (grad_into) check_inplace_index_logits(logits_in, target, weight, adjustment, groups, false);
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
    if (reduction != REDUCTION_NONE) write_total(loss_rows, den, loss);
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
  check_backward_inplace_args(grad, grad_loss);
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
