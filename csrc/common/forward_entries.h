// The two registered forms of a backend's forward, from one function
//   forward(logits, target, weight, ignore_index, label_smoothing, adjustment,
//           groups, compute_grad, reduction, lse_square_scale, softcap, const at::Tensor* grad_into)
// cross_entropy_fwd allocates the gradient (grad_into = nullptr);
// cross_entropy_fwd_ writes it over the logits (grad_into = &logits), which the
// backend's forward checks first (check_inplace_logits and its own needs).
// The same for cross_entropy_prob_fwd / cross_entropy_prob_fwd_ (no ignore_index; a label out).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace memfast {

using ForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, int64_t, double, double,
    const at::Tensor*);

template <ForwardFn forward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_allocating(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& adjustment, const std::optional<at::Tensor>& groups,
    bool compute_grad, int64_t reduction, double lse_square_scale, double softcap) {
  return forward(logits, target, weight, ignore_index, label_smoothing, adjustment, groups, compute_grad, reduction,
                 lse_square_scale, softcap, nullptr);
}

template <ForwardFn forward>
std::tuple<at::Tensor, at::Tensor> forward_grad_over_logits(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& adjustment, const std::optional<at::Tensor>& groups,
    int64_t reduction, double lse_square_scale, double softcap) {
  auto out = forward(logits, target, weight, ignore_index, label_smoothing, adjustment, groups, true, reduction,
                     lse_square_scale, softcap, &logits);
  return {std::get<0>(out), std::get<1>(out)};
}

using ProbForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, bool, int64_t, double, double, const at::Tensor*);

template <ProbForwardFn forward>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prob_forward_allocating(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, const std::optional<at::Tensor>& adjustment, const std::optional<at::Tensor>& groups,
    bool compute_grad, int64_t reduction, double lse_square_scale, double softcap) {
  return forward(logits, target, weight, label_smoothing, adjustment, groups, compute_grad, reduction,
                 lse_square_scale, softcap, nullptr);
}

template <ProbForwardFn forward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> prob_forward_grad_over_logits(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, double label_smoothing,
    const std::optional<at::Tensor>& adjustment, const std::optional<at::Tensor>& groups, int64_t reduction,
    double lse_square_scale, double softcap) {
  auto out = forward(logits, target, weight, label_smoothing, adjustment, groups, true, reduction,
                     lse_square_scale, softcap, &logits);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

// The adjustment's fields of a CUDA kernel's arguments (FwdArgs, ProbArgs): the rows (nullptr:
// none), their stride (0 for one [C] shift expanded to every row), the row of each logits row
// (groups; nullptr: the row itself) and the table's number of rows (the groups' bound).
template <typename acc_t, typename Args>
void set_adjustment_args(Args& a, const at::Tensor& adjustment, const at::Tensor& groups) {
  a.adj = adjustment.defined() ? adjustment.const_data_ptr<acc_t>() : nullptr;
  a.adj_ld = adjustment.defined() && adjustment.size(0) > 1 ? adjustment.stride(0) : 0;
  a.groups = groups.defined() ? groups.const_data_ptr<int64_t>() : nullptr;
  a.A = adjustment.defined() ? adjustment.size(0) : 0;
}

}  // namespace memfast
