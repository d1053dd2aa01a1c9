// Argument checks shared by the CPU and CUDA entry points. Metadata checks run
// on the host for both; value checks (targets, ids in range) run on the host
// only for CPU tensors -- CUDA kernels detect bad values on the device.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>

#include "ce_math.h"

namespace memfast {

// The arguments both forward ops share (everything but the target).
inline void check_common_forward_args(const at::Tensor& logits, const at::Tensor& weight, double label_smoothing,
                                      const at::Tensor& adjustment, const at::Tensor& groups, int64_t reduction,
                                      double lse_square_scale, double softcap) {
  TORCH_CHECK_VALUE(reduction == REDUCTION_NONE || reduction == REDUCTION_MEAN || reduction == REDUCTION_SUM,
                    "memfast.cross_entropy: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(logits.dim() == 2, "memfast.cross_entropy: logits must be 2-D [rows, classes], got ",
                    logits.dim(), "-D");
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()), "memfast.cross_entropy: logits must be floating point, got ",
                    logits.scalar_type());
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "memfast.cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(std::isfinite(lse_square_scale) && lse_square_scale >= 0.0,
                    "memfast.cross_entropy: lse_square_scale must be finite and >= 0, got ", lse_square_scale);
  const auto acc = at::toOpMathType(logits.scalar_type());
  // The kernels compute in acc and multiply by 1 / softcap: both must be normal numbers there.
  const double tiny = acc == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  TORCH_CHECK_VALUE(softcap == 0.0 || (softcap >= tiny && softcap <= 1.0 / tiny),
                    "memfast.cross_entropy: softcap must be 0 (off) or in [", tiny, ", ", 1.0 / tiny, "] for ",
                    logits.scalar_type(), " logits, got ", softcap);
  if (weight.defined()) {
    TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == logits.size(1) && weight.is_contiguous() &&
                          weight.scalar_type() == acc && weight.device() == logits.device(),
                      "memfast.cross_entropy: weight must be a contiguous ", acc, " vector of ", logits.size(1),
                      " entries on ", logits.device());
  }
  if (adjustment.defined()) {
    TORCH_CHECK_VALUE(adjustment.dim() == 2 && adjustment.size(1) == logits.size(1) &&
                          (adjustment.stride(1) == 1 || adjustment.size(1) <= 1) && adjustment.scalar_type() == acc &&
                          adjustment.device() == logits.device(),
                      "memfast.cross_entropy: adjustment must be a ", acc, " [rows or groups, ", logits.size(1),
                      "] tensor with a dense class dimension on ", logits.device(), ", got ", adjustment.sizes(), " ",
                      adjustment.scalar_type());
    if (!groups.defined()) {
      TORCH_CHECK_VALUE(adjustment.size(0) == logits.size(0), "memfast.cross_entropy: a dense adjustment needs one row per "
                        "logits row (", logits.size(0), "), got ", adjustment.size(0));
    }
  }
  if (groups.defined()) {
    TORCH_CHECK_VALUE(adjustment.defined(), "memfast.cross_entropy: groups needs an adjustment table");
    TORCH_CHECK_VALUE(groups.dim() == 1 && groups.size(0) == logits.size(0) && groups.scalar_type() == at::kLong &&
                          groups.is_contiguous() && groups.device() == logits.device(),
                      "memfast.cross_entropy: groups must be a contiguous int64 vector with one entry per row (",
                      logits.size(0), ") on ", logits.device());
  }
}

inline void check_forward_args(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                               double label_smoothing, const at::Tensor& adjustment, const at::Tensor& groups,
                               int64_t reduction, double lse_square_scale, double softcap) {
  check_common_forward_args(logits, weight, label_smoothing, adjustment, groups, reduction, lse_square_scale, softcap);
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0),
                    "memfast.cross_entropy: target must be 1-D with one entry per row (", logits.size(0), "), got ",
                    target.sizes());
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong, "memfast.cross_entropy: target must be int64, got ",
                    target.scalar_type());
  TORCH_CHECK_VALUE(target.is_contiguous(), "memfast.cross_entropy: target must be contiguous");
  TORCH_CHECK_VALUE(target.device() == logits.device(), "memfast.cross_entropy: target is on ", target.device(),
                    " but logits are on ", logits.device());
}

// cross_entropy_prob_fwd: class probabilities, one row of the logits' shape and dtype per row.
inline void check_prob_forward_args(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                                    double label_smoothing, const at::Tensor& adjustment, const at::Tensor& groups,
                                    int64_t reduction, double lse_square_scale, double softcap) {
  check_common_forward_args(logits, weight, label_smoothing, adjustment, groups, reduction, lse_square_scale, softcap);
  const auto acc = at::toOpMathType(logits.scalar_type());
  TORCH_CHECK_VALUE(target.sizes() == logits.sizes() &&
                        (target.scalar_type() == logits.scalar_type() || target.scalar_type() == acc),
                    "memfast.cross_entropy: class-probability targets must have the logits' shape ", logits.sizes(),
                    " and their dtype ", logits.scalar_type(), " or ", acc, ", got ", target.sizes(), " ",
                    target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == logits.device(), "memfast.cross_entropy: target is on ", target.device(),
                    " but logits are on ", logits.device());
}

// cross_entropy_prob_fwd's tensors after the checks, with the class dimension made dense
// (rows may stay strided): what both backends' entry points start from.
// cross_entropy_fwd_ and cross_entropy_prob_fwd_ write the gradient over the logits, row by row in
// their own layout, while other rows (and their targets, weight and adjustment) are still being read:
// no other input may share the logits' memory. on_cuda: the backward's 16-byte vector accesses of
// that gradient (cross_entropy_bwd_) need it aligned.
struct NamedInput {
  const char* name;
  const at::Tensor* tensor;
};

inline void check_inplace_logits(const at::Tensor& logits, std::initializer_list<NamedInput> inputs,
                                 bool on_cuda = false) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.is_contiguous(),
                    "memfast.cross_entropy: inplace_backward=True writes the gradient into the logits, which must be "
                    "contiguous [rows, classes]; got sizes ", logits.sizes(), " and strides ", logits.strides(),
                    " (call .contiguous() first, or leave inplace_backward off)");
  TORCH_CHECK_VALUE(!on_cuda || logits.numel() == 0 || reinterpret_cast<uintptr_t>(logits.const_data_ptr()) % 16 == 0,
                    "memfast.cross_entropy: inplace_backward=True on CUDA needs 16-byte-aligned logits (an offset "
                    "view is not); call .clone() first, or leave inplace_backward off");
  for (const NamedInput& in : inputs) {
    TORCH_CHECK_VALUE(!in.tensor->defined() || in.tensor->numel() == 0 || !in.tensor->is_alias_of(logits),
                      "memfast.cross_entropy: inplace_backward=True writes the gradient into the logits, and ",
                      in.name, " shares their memory; pass a copy of it (.clone()), or leave inplace_backward off");
  }
}

// The inputs the index-target kernels still read while they write the gradient over the logits.
inline void check_inplace_index_logits(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                                       const at::Tensor& adjustment, const at::Tensor& groups, bool on_cuda) {
  check_inplace_logits(logits, {{"target", &target}, {"weight", &weight}, {"adjustment", &adjustment},
                                {"groups", &groups}}, on_cuda);
}

struct ProbInputs {
  at::Tensor logits, target, weight, adjustment, groups;
};

inline ProbInputs prob_inputs(const at::Tensor& logits, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight, double label_smoothing,
                              const std::optional<at::Tensor>& adjustment, const std::optional<at::Tensor>& groups,
                              int64_t reduction, double lse_square_scale, double softcap,
                              bool grad_over_logits, bool on_cuda) {
  ProbInputs in{logits, target, weight.value_or(at::Tensor()), adjustment.value_or(at::Tensor()),
                groups.value_or(at::Tensor())};
  if (grad_over_logits) {
    check_inplace_logits(logits, {{"target", &in.target}, {"weight", &in.weight}, {"adjustment", &in.adjustment},
                                  {"groups", &in.groups}}, on_cuda);
  }
  check_prob_forward_args(logits, target, in.weight, label_smoothing, in.adjustment, in.groups, reduction,
                          lse_square_scale, softcap);
  if (logits.stride(1) != 1 && logits.size(1) > 1) in.logits = logits.contiguous();
  if (target.stride(1) != 1 && target.size(1) > 1) in.target = target.contiguous();
  return in;
}

inline void check_backward_args(const at::Tensor& grad, const at::Tensor& grad_loss) {
  TORCH_CHECK_VALUE(grad.dim() == 2, "memfast.cross_entropy backward: the saved gradient is missing (the forward ran with "
                    "compute_grad=False)");
  TORCH_CHECK_VALUE((grad_loss.dim() == 0 || (grad_loss.dim() == 1 && grad_loss.size(0) == grad.size(0))) &&
                        grad_loss.scalar_type() == at::toOpMathType(grad.scalar_type()) &&
                        grad_loss.device() == grad.device(),
                    "memfast.cross_entropy backward: grad_loss must be a ", at::toOpMathType(grad.scalar_type()),
                    " scalar or vector of ", grad.size(0), " entries");
}

// cross_entropy_bwd_ scales the gradient in place, row by row, while it still reads grad_loss.
inline void check_backward_inplace_args(const at::Tensor& grad, const at::Tensor& grad_loss) {
  check_backward_args(grad, grad_loss);
  TORCH_CHECK_VALUE(grad_loss.numel() == 0 || !grad_loss.is_alias_of(grad),
                    "memfast.cross_entropy backward: grad_loss shares the memory of the gradient that the in-place "
                    "backward overwrites; pass a copy of it (.clone())");
}

inline void check_targets_host(const int64_t* target, int64_t R, int64_t C, int64_t ignore_index) {
  for (int64_t r = 0; r < R; ++r) {
    const int64_t y = target[r];
    TORCH_CHECK_INDEX(y == ignore_index || (y >= 0 && y < C), "memfast.cross_entropy: target ", y,
                      " (row ", r, ") is out of bounds for ", C, " classes");
  }
}

inline void check_groups_host(const int64_t* groups, int64_t R, int64_t A) {
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK_INDEX(groups[r] >= 0 && groups[r] < A, "memfast.cross_entropy: groups[", r, "] = ", groups[r],
                      " is out of bounds for an adjustment table of ", A, " rows");
  }
}

inline void check_track_args(const at::Tensor& state, const at::Tensor& counters, const at::Tensor& row_stats,
                             const at::Tensor& target, const at::Tensor& sample_ids, c10::IntArrayRef stat_rows) {
  TORCH_CHECK_VALUE(state.dim() == 2 && state.scalar_type() == at::kFloat && state.is_contiguous(),
                    "memfast tracker: state must be a contiguous float32 [stats, samples] tensor");
  // The kernels index counters as a raw pointer: a strided view would be written in the wrong places.
  TORCH_CHECK_VALUE(counters.dim() == 1 && counters.size(0) == NUM_COUNTERS && counters.scalar_type() == at::kLong &&
                        counters.is_contiguous(),
                    "memfast tracker: counters must be a contiguous int64 vector of ", static_cast<int>(NUM_COUNTERS),
                    " entries");
  TORCH_CHECK_VALUE(static_cast<int64_t>(stat_rows.size()) == NUM_STATS, "memfast tracker: stat_rows must have ",
                    static_cast<int>(NUM_STATS), " entries");
  for (int64_t s = 0; s < NUM_STATS; ++s) {
    TORCH_CHECK_VALUE(stat_rows[s] >= -1 && stat_rows[s] < state.size(0), "memfast tracker: stat_rows[", s,
                      "] = ", stat_rows[s], " does not name a row of the state");
  }
  const int64_t R = target.numel();
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == NUM_ROW_STATS && row_stats.size(1) == R &&
                        row_stats.is_contiguous() &&
                        (row_stats.scalar_type() == at::kFloat || row_stats.scalar_type() == at::kDouble),
                    "memfast tracker: row_stats must be a contiguous [", static_cast<int>(NUM_ROW_STATS), ", ", R,
                    "] float32 or float64 tensor (the forward's), got ", row_stats.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.scalar_type() == at::kLong && target.is_contiguous(),
                    "memfast tracker: target must be a contiguous int64 vector");
  TORCH_CHECK_VALUE(sample_ids.dim() == 1 && sample_ids.scalar_type() == at::kLong && sample_ids.is_contiguous(),
                    "memfast tracker: sample_ids must be a contiguous int64 vector");
  TORCH_CHECK_VALUE(sample_ids.numel() == R || (sample_ids.numel() > 0 && R % sample_ids.numel() == 0),
                    "memfast tracker: sample_ids has ", sample_ids.numel(), " entries, which must equal or divide the ",
                    R, " rows");
  for (const at::Tensor* t : {&counters, &row_stats, &target, &sample_ids}) {
    TORCH_CHECK_VALUE(t->device() == state.device(), "memfast tracker: the tracker is on ", state.device(),
                      " but an input is on ", t->device());
  }
}

}  // namespace memfast
