// Argument checks of the curvature ops, shared by the CPU and CUDA entry points
// (metadata only: nothing here reads tensor values).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "philox.h"

namespace memfast {

// The generator's counter words are 32 bits: sample, probe and element block
// indices must fit.
constexpr int64_t CURV_MAX_INDEX = int64_t{1} << 32;

inline int64_t curvature_sample_numel(const at::Tensor& t) {
  int64_t d = 1;
  for (int64_t i = 1; i < t.dim(); ++i) d *= t.size(i);
  return d;
}

inline void check_probe_range(const char* op, int64_t probe_offset, int64_t num_probes) {
  TORCH_CHECK_VALUE(probe_offset >= 0 && num_probes >= 0 && probe_offset + num_probes <= CURV_MAX_INDEX, "memfast.",
                    op, ": probes [probe_offset, probe_offset + num_probes) = [", probe_offset, ", ",
                    probe_offset + num_probes, ") must lie in [0, 2^32)");
}

inline void check_sample_shape(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1, "memfast.", op, ": ", name, " must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(t.size(0) < CURV_MAX_INDEX, "memfast.", op, ": fewer than 2^32 samples per call, got ",
                    t.size(0));
  TORCH_CHECK_VALUE((curvature_sample_numel(t) + PROBE_BLOCK - 1) / PROBE_BLOCK < CURV_MAX_INDEX, "memfast.", op,
                    ": ", name, " has too many elements per sample (", curvature_sample_numel(t), ")");
}

inline void check_perturb_args(const at::Tensor& x, int64_t probe_offset, int64_t num_probes) {
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "memfast.curvature_perturb: x must be floating point, got ",
                    x.scalar_type());
  check_sample_shape("curvature_perturb", x, "x");
  check_probe_range("curvature_perturb", probe_offset, num_probes);
  // The output has num_probes * B rows: the product must not overflow.
  TORCH_CHECK_VALUE(x.size(0) == 0 || num_probes <= INT64_MAX / x.size(0), "memfast.curvature_perturb: num_probes (",
                    num_probes, ") x batch (", x.size(0), ") rows do not fit a tensor");
}

// Returns the number of probes in grads.
inline int64_t check_reduce_args(const at::Tensor& grads, const at::Tensor& g0, int64_t probe_offset) {
  TORCH_CHECK_VALUE(at::isFloatingType(g0.scalar_type()), "memfast.curvature_reduce: g0 must be floating point, got ",
                    g0.scalar_type());
  TORCH_CHECK_VALUE(grads.scalar_type() == g0.scalar_type(), "memfast.curvature_reduce: grads (", grads.scalar_type(),
                    ") and g0 (", g0.scalar_type(), ") must have the same dtype");
  TORCH_CHECK_VALUE(grads.device() == g0.device(), "memfast.curvature_reduce: grads is on ", grads.device(),
                    " but g0 is on ", g0.device());
  check_sample_shape("curvature_reduce", g0, "g0");
  TORCH_CHECK_VALUE(grads.dim() == g0.dim() && grads.sizes().slice(1) == g0.sizes().slice(1),
                    "memfast.curvature_reduce: grads must be [probes * B, ...] with g0's trailing shape; got grads ",
                    grads.sizes(), " and g0 ", g0.sizes());
  const int64_t B = g0.size(0);
  TORCH_CHECK_VALUE(B > 0 ? grads.size(0) % B == 0 : grads.size(0) == 0, "memfast.curvature_reduce: grads has ",
                    grads.size(0), " rows, not a multiple of the batch size ", B);
  const int64_t P = B > 0 ? grads.size(0) / B : 0;
  check_probe_range("curvature_reduce", probe_offset, P);
  return P;
}

}  // namespace memfast
