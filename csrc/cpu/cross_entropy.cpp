// CPU kernels of memfast::cross_entropy_fwd / cross_entropy_bwd.
//
// Each row is read from memory once: it is converted to the accumulation type
// into a per-thread buffer (L1/L2 resident), and every later sweep (max, exp,
// gradient) runs over that buffer. Reductions use 16 independent lanes so the
// compiler vectorises them without -ffast-math.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "../common/ce_math.h"
#include "../common/checks.h"

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

template <typename scalar_t>
void forward_rows(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                  int64_t ignore_index, double label_smoothing, const at::Tensor& adjustment,
                  const at::Tensor& groups, at::Tensor& loss, at::Tensor& row_stats, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = logits.size(0), C = logits.size(1);
  const int64_t ld = logits.stride(0);
  const scalar_t* z_base = logits.const_data_ptr<scalar_t>();
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* adj = adjustment.defined() ? adjustment.const_data_ptr<acc_t>() : nullptr;
  const int64_t adj_ld = adjustment.defined() ? adjustment.stride(0) : 0;
  const int64_t* grp = groups.defined() ? groups.const_data_ptr<int64_t>() : nullptr;
  acc_t* loss_p = loss.mutable_data_ptr<acc_t>();
  acc_t* st = row_stats.mutable_data_ptr<acc_t>();
  scalar_t* g_base = grad.numel() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t eps = static_cast<acc_t>(label_smoothing);
  const acc_t weight_sum = w ? lanes_dot<acc_t>(w, nullptr, C) : static_cast<acc_t>(C);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(C);
    acc_t* buf = buffer.data();
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
      // The (adjusted) row in the accumulation type; fp32 rows without a shift are read in place.
      const acc_t* row = buf;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (!adj) row = z;
      }
      if (row == buf) {
        for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<acc_t>(z[c]);
        if (adj) {
          const acc_t* s = adj + (grp ? grp[r] : r) * adj_ld;
          for (int64_t c = 0; c < C; ++c) buf[c] += s[c];
        }
      }
      const acc_t z_y = row[y];
      const acc_t max_before = lanes_max(row, y);
      const acc_t max_after = lanes_max(row + y + 1, C - y - 1);
      const acc_t max_other = max_before > max_after ? max_before : max_after;
      const acc_t m = z_y > max_other ? z_y : max_other;
      const acc_t weighted_logit_sum = eps > 0 ? lanes_dot(row, w, C) : acc_t(0);
      const acc_t sum = lanes_exp_sum(row, buf, C, m);
      const acc_t lse = m + std::log(sum);
      const acc_t w_y = w ? w[y] : acc_t(1);
      loss_p[r] = row_loss(lse, z_y, w_y, weight_sum, weighted_logit_sum, eps, C);
      st[ROW_LSE * R + r] = lse;
      st[ROW_TARGET_LOGIT * R + r] = z_y;
      st[ROW_MAX_OTHER * R + r] = C > 1 ? max_other : ninf;
      st[ROW_WEIGHT * R + r] = w_y;
      st[ROW_CORRECT * R + r] = (z_y > max_before && z_y >= max_after) ? 1 : 0;
      if (!g) continue;
      const GradCoef<acc_t> k = grad_coefficients(w_y, weight_sum, eps, C);
      const acc_t scale = k.scale_p / sum;
      if (w && eps > 0) {
        for (int64_t c = 0; c < C; ++c) g[c] = to_storage<scalar_t>(buf[c] * scale - k.eps_w * w[c]);
      } else {
        const acc_t off = w ? acc_t(0) : k.eps_w;
        for (int64_t c = 0; c < C; ++c) g[c] = to_storage<scalar_t>(buf[c] * scale - off);
      }
      // The target term is formed in the accumulation type and rounded once:
      // p_y - 1 from a rounded p_y would cancel catastrophically as p_y -> 1.
      g[y] = to_storage<scalar_t>(buf[y] * scale - k.eps_w * w_y - k.target_w);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cpu(
    const at::Tensor& logits_in, const at::Tensor& target, const std::optional<at::Tensor>& weight_opt,
    int64_t ignore_index, double label_smoothing, const std::optional<at::Tensor>& adjustment_opt,
    const std::optional<at::Tensor>& groups_opt, bool compute_grad) {
  const at::Tensor weight = weight_opt.value_or(at::Tensor());
  const at::Tensor adjustment = adjustment_opt.value_or(at::Tensor());
  const at::Tensor groups = groups_opt.value_or(at::Tensor());
  check_forward_args(logits_in, target, weight, label_smoothing, adjustment, groups);
  // Rows may be strided; the class dimension must be dense.
  const at::Tensor logits = logits_in.stride(1) == 1 || logits_in.size(1) <= 1 ? logits_in : logits_in.contiguous();
  const int64_t R = logits.size(0), C = logits.size(1);
  check_targets_host(target.const_data_ptr<int64_t>(), R, C, ignore_index);
  if (groups.defined()) check_groups_host(groups.const_data_ptr<int64_t>(), R, adjustment.size(0));

  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  at::Tensor loss = at::empty({R}, logits.options().dtype(acc_dtype));
  at::Tensor row_stats = at::empty({NUM_ROW_STATS, R}, logits.options().dtype(acc_dtype));
  at::Tensor grad = at::empty({compute_grad ? R : 0, compute_grad ? C : 0}, logits.options());
  if (R == 0) return {loss, row_stats, grad};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "memfast_cross_entropy_fwd", [&] {
    forward_rows<scalar_t>(logits, target, weight, ignore_index, label_smoothing, adjustment, groups, loss,
                           row_stats, grad);
  });
  return {loss, row_stats, grad};
}

// out = g * grad_loss[:, None] row by row (out may be g itself).
void scale_rows_cpu(const at::Tensor& g, const at::Tensor& grad_loss, at::Tensor& out) {
  const int64_t R = g.size(0), C = g.size(1);
  if (g.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "memfast_cross_entropy_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* go = grad_loss.const_data_ptr<acc_t>();
    const int64_t go_stride = grad_loss.stride(0);
    const int64_t grain = std::max<int64_t>(1, 32768 / C);
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t s = go[r * go_stride];
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
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("cross_entropy_bwd_", &cross_entropy_bwd_inplace_cpu);
}

}  // namespace memfast
