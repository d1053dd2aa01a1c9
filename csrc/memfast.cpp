// Operator schemas (the one place they are declared) and the Python module
// that carries build information. Kernels live in cpu/ and cuda/.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include "common/ce_math.h"

#ifndef MEMFAST_VERSION
#define MEMFAST_VERSION "0.0.0"
#endif
#ifndef MEMFAST_CUDA_ARCH_LIST
#define MEMFAST_CUDA_ARCH_LIST ""
#endif

TORCH_LIBRARY(memfast, m) {
  // Loss, log-sum-exp and (when compute_grad) d loss / d logits in one pass
  // over each row. reduction: 0 none (loss [R]), 1 mean, 2 sum (loss 0-d; for
  // the mean the gradient already carries 1 / sum(weight[target]), so that a
  // backward with grad_loss == 1 has nothing to do). Functional, so that
  // autograd and torch.compile can treat it as an ordinary op; the tracker
  // scatter is the separate mutable track_ op. lse_square_scale: the z-loss
  // lse_square_scale * weight[target] * lse^2 added to each row's loss. softcap > 0: the
  // logits are capped to softcap * tanh(logits / softcap) first (before the adjustment).
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, Tensor? adjustment, Tensor? groups, bool compute_grad, int reduction, "
      "float lse_square_scale=0., float softcap=0.) -> (Tensor loss, Tensor row_stats, Tensor grad)");
  // The same forward with the gradient written over the logits (contiguous), which
  // are then the gradient: memfast.cross_entropy(..., inplace_backward=True), whose
  // autograd calls it in eager mode (zero extra memory for the gradient).
  m.def(
      "cross_entropy_fwd_(Tensor(a!) logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, Tensor? adjustment, Tensor? groups, int reduction, float lse_square_scale=0., "
      "float softcap=0.) -> (Tensor loss, Tensor row_stats)");
  // Cross entropy against class probabilities (target [R, C], the logits' dtype or their
  // accumulation dtype), PyTorch's
  // semantics (the mean over rows; label_smoothing mixes eps / C into the targets; weight
  // multiplies each class's term), in one pass like cross_entropy_fwd: the z-loss
  // lse_square_scale * lse^2 (unweighted) for rows with target mass, the softcap and the
  // adjustment as there. row_stats are cross_entropy_fwd's against `label`, each row's first
  // most probable class (-100, and zero statistics, for a row without positive mass or with a
  // NaN target); ROW_WEIGHT is 1 for every row. The gradient's backward is cross_entropy_bwd.
  m.def(
      "cross_entropy_prob_fwd(Tensor logits, Tensor target, Tensor? weight, float label_smoothing, "
      "Tensor? adjustment, Tensor? groups, bool compute_grad, int reduction, float lse_square_scale=0., "
      "float softcap=0.) -> (Tensor loss, Tensor row_stats, Tensor label, Tensor grad)");
  // The same forward with the gradient written over the logits (contiguous; no other input may
  // share their memory): inplace_backward=True with class-probability targets.
  m.def(
      "cross_entropy_prob_fwd_(Tensor(a!) logits, Tensor target, Tensor? weight, float label_smoothing, "
      "Tensor? adjustment, Tensor? groups, int reduction, float lse_square_scale=0., float softcap=0.) "
      "-> (Tensor loss, Tensor row_stats, Tensor label)");
  // grad_logits = grad * grad_loss[:, None] (grad_loss [R]), or grad * grad_loss (0-d)
  m.def("cross_entropy_bwd(Tensor grad, Tensor grad_loss) -> Tensor");
  // The same, in place in the saved gradient (eager backward: no new [R, C] buffer).
  m.def("cross_entropy_bwd_(Tensor(a!) grad, Tensor grad_loss) -> ()");
  // Scatter per-row statistics into a tracker's state (struct of arrays) by sample id.
  m.def(
      "track_(Tensor(a!) state, Tensor(b!) counters, Tensor row_stats, Tensor target, "
      "Tensor sample_ids, int ignore_index, int num_classes, int[] stat_rows) -> ()");
  // track_, unless autograd is running a backward pass on this thread: what traced code
  // calls, so that a compiled loss recomputed by activation checkpointing inside the
  // backward does not add its statistics a second time (decided when the graph runs).
  m.def(
      "track_unless_backward_(Tensor(a!) state, Tensor(b!) counters, Tensor row_stats, Tensor target, "
      "Tensor sample_ids, int ignore_index, int num_classes, int[] stat_rows) -> ()");
  // Input curvature (Hutchinson, finite differences). x: [B, ...]. Returns
  // [num_probes * B, ...]: x + h * v_k for probes k = probe_offset ..
  // probe_offset + num_probes - 1 (probe-major), with v in {-1, +1} drawn from
  // a counter-based generator keyed by (seed, sample, probe, element).
  m.def("curvature_perturb(Tensor x, int seed, int probe_offset, int num_probes, float h) -> Tensor");
  // grads: [P * B, ...] input gradients at the perturbed points, g0: [B, ...]
  // at x. Returns [3, B] float32 sums over the P probes of ||g_k - g0||,
  // ||g_k - g0||^2 and v_k . (g_k - g0), regenerating v_k in {-1, +1} (not
  // scaled by h) from the same key.
  m.def("curvature_reduce(Tensor grads, Tensor g0, int seed, int probe_offset) -> Tensor");
}

namespace py = pybind11;

namespace memfast {
void init_autograd(py::module& m);  // autograd.cpp
}

PYBIND11_MODULE(_C, m) {
  memfast::init_autograd(m);
  m.def("build_info", []() {
    py::dict d;
    d["version"] = MEMFAST_VERSION;
    d["torch"] = TORCH_VERSION;
#ifdef MEMFAST_WITH_CUDA
    d["with_cuda"] = true;
#else
    d["with_cuda"] = false;
#endif
    d["cuda_arch_list"] = MEMFAST_CUDA_ARCH_LIST;
    d["num_stats"] = static_cast<int>(memfast::NUM_STATS);
    d["num_row_stats"] = static_cast<int>(memfast::NUM_ROW_STATS);
    d["num_counters"] = static_cast<int>(memfast::NUM_COUNTERS);
    return d;
  });
}
