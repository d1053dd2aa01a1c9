// CUDA kernels of memfast::cross_entropy_prob_fwd (class-probability targets), with the CPU
// kernel's math (csrc/cpu/cross_entropy_prob.cpp: the loss as A log(sum) - sum wt (z - m), the
// gradient (A + 2 zeta lse) p - wt, statistics against the first most probable class).
//
// One block of 256 threads per row, coalesced scalar loads. The default kernel reads the row
// once to summarise it (RowSummary: the targets' first maximum, the logits' top two, and an
// online exp-sum and weighted dot, as an online softmax) and once more for the gradient. The
// first version, which makes four or five sweeps, stays for comparison
// (MEMFAST_CUDA_PROB_KERNEL=sweeps). Neither has run on a GPU yet: the API uses them only with
// MEMFAST_CUDA_PROB=1 until the CUDA tests have passed on one (tests/test_cuda_cross_entropy.py
// calls the op directly, with both kernels).
//
// As cross_entropy_fwd on CUDA, nothing here raises on values: a row whose group is out of
// range for the adjustment table gets a NaN loss and statistics, label -100 and a zero
// gradient row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../common/ce_math.h"
#include "../common/checks.h"
#include "../common/cuda_utils.cuh"
#include "../common/forward_entries.h"

namespace memfast {
namespace {

using cuda::block_reduce;
using cuda::loss_total_kernel;
using cuda::MaxOp;
using cuda::MinOp;
using cuda::SumOp;

constexpr int kProbThreads = 256;

template <typename acc_t>
struct ProbArgs {
  const void* logits;
  int64_t ld;  // elements between two rows of the logits
  const void* target;
  int64_t t_ld;  // ... of the targets
  int64_t R, C;
  const acc_t* weight;    // [C] or nullptr
  const acc_t* adj;       // adjustment rows or nullptr
  int64_t adj_ld;         // 0 for an expanded [C] shift
  const int64_t* groups;  // row -> adjustment row, or nullptr
  int64_t A;              // adjustment rows (bounds for groups)
  acc_t* loss;            // [R]
  acc_t* stats;           // [NUM_ROW_STATS, R]
  int64_t* label;         // [R]
  void* grad;             // [R, C] contiguous or nullptr
  acc_t keep, spread;     // t' = keep * t + spread: 1 - eps, eps / C
  acc_t zeta;
  acc_t cap, inv_cap;
  acc_t grad_scale;       // 1 / R for the mean, else 1
};

__device__ __forceinline__ float add_rounded(float x, float y) { return __fadd_rn(x, y); }
__device__ __forceinline__ double add_rounded(double x, double y) { return __dadd_rn(x, y); }

// The row's logit the loss sees (capped, then shifted; the add rounded on its own, as in
// cross_entropy.cu, so that comparisons match the CPU's) and w_c t'_c, for both kernels.
template <typename scalar_t, typename target_t>
struct ProbRow {
  const ProbArgs<at::opmath_type<scalar_t>>& a;
  const scalar_t* z;
  const target_t* tp;
  const at::opmath_type<scalar_t>* adj;

  using acc_t = at::opmath_type<scalar_t>;
  __device__ __forceinline__ acc_t target(int64_t c) const { return static_cast<acc_t>(tp[c]); }
  __device__ __forceinline__ acc_t weighted(int64_t c) const {
    return (a.weight ? a.weight[c] : acc_t(1)) * (a.keep * target(c) + a.spread);
  }
  __device__ __forceinline__ acc_t logit(int64_t c, acc_t* slope = nullptr) const {
    return add_rounded(soft_cap(static_cast<acc_t>(z[c]), a.cap, a.inv_cap, slope), adj ? adj[c] : acc_t(0));
  }
};

// The row's pointers; false for a row whose group is out of range for the adjustment table,
// which then gets a NaN loss and statistics, label -100 and a zero gradient row.
template <int NT, typename scalar_t, typename target_t>
__device__ __forceinline__ bool prob_row(const ProbArgs<at::opmath_type<scalar_t>>& a, int64_t row,
                                         ProbRow<scalar_t, target_t>& r, scalar_t*& g) {
  using acc_t = at::opmath_type<scalar_t>;
  r.z = static_cast<const scalar_t*>(a.logits) + row * a.ld;
  r.tp = static_cast<const target_t*>(a.target) + row * a.t_ld;
  r.adj = nullptr;
  g = a.grad ? static_cast<scalar_t*>(a.grad) + row * a.C : nullptr;
  if (!a.adj) return true;
  const int64_t adj_row = a.groups ? a.groups[row] : row;
  if (adj_row >= 0 && adj_row < a.A) {
    r.adj = a.adj + adj_row * a.adj_ld;
    return true;
  }
  if (threadIdx.x == 0) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    a.loss[row] = nan;
    for (int k = 0; k < NUM_ROW_STATS; ++k) a.stats[k * a.R + row] = nan;
    a.label[row] = -100;
  }
  if (g)
    for (int64_t c = threadIdx.x; c < a.C; c += NT) g[c] = scalar_t(0);
  return false;
}

// What both kernels write once the row is reduced: the loss, the statistics against label y
// (z_y its logit, max_other the largest other logit with NaN as -inf, correct whether y is the
// first maximal logit), then the gradient sweep -- each element formed in acc_t and rounded
// once, reading its logit before writing its gradient (the in-place form's contract).
template <int NT, typename scalar_t, typename target_t>
__device__ __forceinline__ void finish_row(const ProbRow<scalar_t, target_t>& r, int64_t row, scalar_t* g,
                                           int64_t y, at::opmath_type<scalar_t> z_y,
                                           at::opmath_type<scalar_t> max_other, bool correct,
                                           at::opmath_type<scalar_t> m, at::opmath_type<scalar_t> sum,
                                           at::opmath_type<scalar_t> mass, at::opmath_type<scalar_t> dot) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& a = r.a;
  const bool has_mass = y >= 0;
  const acc_t log_sum = log(sum);
  const acc_t lse = m + log_sum;
  if (threadIdx.x == 0) {
    acc_t loss = (mass == acc_t(0) ? acc_t(0) : mass * log_sum) - dot;  // (no mass: 0, not 0 log 0)
    if (a.zeta != acc_t(0) && has_mass) loss += a.zeta * lse * lse;
    a.loss[row] = loss;
    a.stats[ROW_LOG_SUM * a.R + row] = has_mass ? log_sum : acc_t(0);
    a.stats[ROW_TARGET_LOGIT * a.R + row] = z_y;
    a.stats[ROW_MAX_OTHER * a.R + row] = has_mass ? max_other : acc_t(0);  // -inf when C == 1
    a.stats[ROW_WEIGHT * a.R + row] = acc_t(1);                            // every row counts in the mean
    a.stats[ROW_CORRECT * a.R + row] = correct ? acc_t(1) : acc_t(0);
    a.label[row] = y;
  }
  if (!g) return;
  acc_t scale_p = mass;
  if (a.zeta != acc_t(0) && has_mass) scale_p += acc_t(2) * a.zeta * lse;
  const acc_t scale = scale_p / sum * a.grad_scale;
  for (int64_t c = threadIdx.x; c < a.C; c += NT) {
    acc_t slope = acc_t(1);
    const acc_t x = r.logit(c, &slope);
    g[c] = static_cast<scalar_t>((fast_exp(x - m) * scale - r.weighted(c) * a.grad_scale) * slope);
  }
}

// The first version (MEMFAST_CUDA_PROB_KERNEL=sweeps): three reading sweeps over the row
// (targets; logits max; exp-sum and the weighted dot) plus, for a row with target mass, a
// search for the first maximal target, then the gradient sweep.
template <typename scalar_t, typename target_t>
__global__ void __launch_bounds__(kProbThreads)
    ce_prob_fwd_sweeps_kernel(const ProbArgs<at::opmath_type<scalar_t>> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int NT = kProbThreads;
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  __shared__ acc_t smem[4][2 * (NT / 32)];
  __shared__ int64_t first_smem[NT / 32];
  const int64_t row = blockIdx.x;
  const int t = threadIdx.x;
  const int64_t C = a.C;
  ProbRow<scalar_t, target_t> r{a};
  scalar_t* g;
  if (!prob_row<NT>(a, row, r, g)) return;

  // Sweep 1, the targets: their max (NaN skipped), whether one is NaN, and A = sum w t'.
  acc_t top[2] = {ninf, acc_t(0)};
  acc_t mass[1] = {acc_t(0)};
  for (int64_t c = t; c < C; c += NT) {
    const acc_t tc = r.target(c);
    top[0] = tc > top[0] ? tc : top[0];
    if (tc != tc) top[1] = acc_t(1);
    mass[0] += r.weighted(c);
  }
  block_reduce<NT, 2>(top, MaxOp(), smem[0]);
  block_reduce<NT, 1>(mass, SumOp(), smem[1]);
  int64_t y = -100;  // the tracked class: the first most probable one (the branch is uniform)
  if (top[0] > acc_t(0) && top[1] == acc_t(0)) {
    int64_t first[1] = {C};
    for (int64_t c = t; c < C; c += NT) {
      if (r.target(c) == top[0]) {
        first[0] = c;
        break;
      }
    }
    block_reduce<NT, 1>(first, MinOp(), first_smem);
    y = first[0];
  }
  const bool has_mass = y >= 0;

  // Sweep 2, the logits: with a label, the largest other logit and whether another class beats
  // it under "argmax = first maximal index" (a NaN logit counts as -inf there); else the max.
  const acc_t z_y = has_mass ? r.logit(y) : acc_t(0);
  acc_t best[2] = {ninf, acc_t(0)};
  for (int64_t c = t; c < C; c += NT) {
    acc_t x = r.logit(c);
    if (has_mass) {
      if (c == y) continue;
      if (isnan(x)) x = ninf;
      best[0] = x > best[0] ? x : best[0];
      if (c < y ? x >= z_y : x > z_y) best[1] = acc_t(1);
    } else {
      best[0] = x > best[0] ? x : best[0];
    }
  }
  block_reduce<NT, 2>(best, MaxOp(), smem[2]);
  const acc_t max_other = best[0];
  const acc_t m = has_mass && z_y > max_other ? z_y : max_other;

  // Sweep 3: sum exp(x - m) and sum w t' (x - m) (an infinite m gives NaN sums, as on the CPU).
  acc_t sums[2] = {acc_t(0), acc_t(0)};
  for (int64_t c = t; c < C; c += NT) {
    const acc_t d = r.logit(c) - m;
    sums[0] += fast_exp(d);
    sums[1] += r.weighted(c) * d;
  }
  block_reduce<NT, 2>(sums, SumOp(), smem[3]);
  finish_row<NT>(r, row, g, y, z_y, max_other, has_mass && best[1] == acc_t(0) && !isnan(z_y), m, sums[0],
                 mass[0], sums[1]);
}

// One thread's, then the block's, summary of a row from a single reading sweep (the default
// kernel). Every field combines symmetrically (a strict order on (value, first index), sums of
// per-side terms), so that all lanes of a shuffle tree hold the same result.
template <typename acc_t>
struct RowSummary {
  static constexpr int kNone = 0x7fffffff;  // no element yet: after every index
  acc_t t_max;        // the largest target (NaN skipped)
  int t_first;        // its first index
  acc_t t_logit;      // that class's loss logit (carried here: read again after the combine, it could
                      // already be overwritten by another warp's gradient in the in-place op)
  int t_nan;          // 1 if a target is NaN
  acc_t mass;         // A = sum w t'
  acc_t z_max;        // the largest logit (NaN as -inf), also the shift m of sum and dot
  int z_first;        // its first index
  acc_t z_second;     // the largest of the others (equal to z_max on a tie)
  acc_t sum;          // sum exp(x - z_max) over the logits that are not -inf
  acc_t dot;          // sum w t' (x - z_max) (-inf logits: w t' * -inf, which does not depend on m)
  acc_t finite_mass;  // sum w t' over the logits whose dot term depends on the shift

  __device__ __forceinline__ void start() {
    constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    t_max = z_max = z_second = ninf;
    t_first = z_first = kNone;
    t_nan = 0;
    t_logit = mass = sum = dot = finite_mass = acc_t(0);
  }

  // Element c: target tc, w t' = wt, loss logit x.
  __device__ __forceinline__ void add(int c, acc_t tc, acc_t wt, acc_t x) {
    constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    if (tc > t_max) {
      t_max = tc;
      t_first = c;
      t_logit = x;
    }
    t_nan |= tc != tc;
    mass += wt;
    const acc_t xv = isnan(x) ? ninf : x;
    if (xv > z_max) {  // a new shift: rescale what is summed so far (exactly 0 terms stay 0)
      if (sum != acc_t(0)) sum *= fast_exp(z_max - xv);
      if (finite_mass != acc_t(0)) dot -= finite_mass * (xv - z_max);
    }
    if (xv > z_max || z_first == kNone) {
      z_second = z_max;
      z_max = xv;
      z_first = c;
    } else if (xv > z_second) {
      z_second = xv;
    }
    if (x != ninf) {  // (NaN too: it makes the sums NaN, as on the CPU)
      sum += fast_exp(x - z_max);
      dot += wt * (x - z_max);
      finite_mass += wt;
    } else {
      dot += wt * x;  // -inf, or NaN for a zero weight (the CPU's 0 * -inf)
    }
  }

  __device__ __forceinline__ static RowSummary combine(const RowSummary& a, const RowSummary& b) {
    RowSummary r;
    const bool tb = b.t_max > a.t_max || (b.t_max == a.t_max && b.t_first < a.t_first);
    r.t_max = tb ? b.t_max : a.t_max;
    r.t_first = tb ? b.t_first : a.t_first;
    r.t_logit = tb ? b.t_logit : a.t_logit;
    r.t_nan = a.t_nan | b.t_nan;
    r.mass = a.mass + b.mass;
    const bool zb = b.z_max > a.z_max || (b.z_max == a.z_max && b.z_first < a.z_first);
    const RowSummary& win = zb ? b : a;
    const RowSummary& lose = zb ? a : b;
    r.z_max = win.z_max;
    r.z_first = win.z_first;
    r.z_second = lose.z_max > win.z_second ? lose.z_max : win.z_second;
    r.sum = a.shifted_sum(r.z_max) + b.shifted_sum(r.z_max);
    r.dot = a.shifted_dot(r.z_max) + b.shifted_dot(r.z_max);
    r.finite_mass = a.finite_mass + b.finite_mass;
    return r;
  }
  __device__ __forceinline__ acc_t shifted_sum(acc_t m) const {
    return sum == acc_t(0) ? acc_t(0) : sum * fast_exp(z_max - m);
  }
  __device__ __forceinline__ acc_t shifted_dot(acc_t m) const {
    return finite_mass == acc_t(0) ? dot : dot - finite_mass * (m - z_max);
  }

  __device__ __forceinline__ RowSummary shfl_xor(int offset) const {
    RowSummary o;
    o.t_max = __shfl_xor_sync(0xffffffffu, t_max, offset);
    o.t_first = __shfl_xor_sync(0xffffffffu, t_first, offset);
    o.t_logit = __shfl_xor_sync(0xffffffffu, t_logit, offset);
    o.t_nan = __shfl_xor_sync(0xffffffffu, t_nan, offset);
    o.mass = __shfl_xor_sync(0xffffffffu, mass, offset);
    o.z_max = __shfl_xor_sync(0xffffffffu, z_max, offset);
    o.z_first = __shfl_xor_sync(0xffffffffu, z_first, offset);
    o.z_second = __shfl_xor_sync(0xffffffffu, z_second, offset);
    o.sum = __shfl_xor_sync(0xffffffffu, sum, offset);
    o.dot = __shfl_xor_sync(0xffffffffu, dot, offset);
    o.finite_mass = __shfl_xor_sync(0xffffffffu, finite_mass, offset);
    return o;
  }
};

// One reading sweep: each thread summarises its elements (online max, exp-sum and dot, as an
// online softmax), the block combines the summaries, and the gradient sweep reads the row again
// (mostly from L2). Two passes over the logits and targets where the sweeps kernel makes four
// or five.
template <typename scalar_t, typename target_t>
__global__ void __launch_bounds__(kProbThreads)
    ce_prob_fwd_kernel(const ProbArgs<at::opmath_type<scalar_t>> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Summary = RowSummary<acc_t>;
  constexpr int NT = kProbThreads, NW = NT / 32;
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  __shared__ Summary smem[NW];
  const int64_t row = blockIdx.x;
  ProbRow<scalar_t, target_t> r{a};
  scalar_t* g;
  if (!prob_row<NT>(a, row, r, g)) return;
  Summary s;
  s.start();
  for (int c = threadIdx.x; c < a.C; c += NT) s.add(c, r.target(c), r.weighted(c), r.logit(c));
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) s = Summary::combine(s, s.shfl_xor(offset));
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = s;
  __syncthreads();
  s = smem[0];
#pragma unroll
  for (int w = 1; w < NW; ++w) s = Summary::combine(s, smem[w]);

  const int64_t y = s.t_max > acc_t(0) && !s.t_nan ? s.t_first : -100;  // the first most probable class
  const bool has_mass = y >= 0;
  const acc_t z_y = has_mass ? s.t_logit : acc_t(0);
  const acc_t max_other = s.z_first == y ? s.z_second : s.z_max;
  // An all -inf row sums to 0 here; the CPU's exp(-inf - -inf) makes it NaN (no classes: 0).
  const acc_t sum = s.z_max == ninf && a.C > 0 ? std::numeric_limits<acc_t>::quiet_NaN() : s.sum;
  finish_row<NT>(r, row, g, y, z_y, max_other, has_mass && s.z_first == y && !isnan(z_y), s.z_max, sum, s.mass,
                 s.dot);
}

// grad_into: nullptr (allocate the gradient when compute_grad) or the logits themselves
// (cross_entropy_prob_fwd_, contiguous): sweep 4 is the only one that writes, after the block
// reductions that end the reading sweeps, and each thread reads an element's logit before it
// writes that element's gradient (plain loads, no __restrict__: the aliasing is well defined).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& logits_in, const at::Tensor& target_in, const std::optional<at::Tensor>& weight_opt,
    double label_smoothing, const std::optional<at::Tensor>& adjustment_opt,
    const std::optional<at::Tensor>& groups_opt, bool compute_grad, int64_t reduction, double lse_square_scale,
    double softcap, const at::Tensor* grad_into) {
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  const ProbInputs in = prob_inputs(logits_in, target_in, weight_opt, label_smoothing, adjustment_opt, groups_opt,
                                    reduction, lse_square_scale, softcap, grad_into != nullptr, true);
  const at::Tensor &logits = in.logits, &target = in.target, &weight = in.weight;
  const at::Tensor &adjustment = in.adjustment, &groups = in.groups;
  const int64_t R = logits.size(0), C = logits.size(1);
  TORCH_CHECK_VALUE(R < (int64_t{1} << 31), "memfast.cross_entropy: at most 2^31 - 1 rows on CUDA, got ", R);
  // (the one-sweep kernel indexes a row with int, and marks "no index yet" with INT_MAX)
  TORCH_CHECK_VALUE(C < (int64_t{1} << 31) - kProbThreads, "memfast.cross_entropy: at most 2^31 - ", kProbThreads + 1,
                    " classes on CUDA, got ", C);
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  at::Tensor loss_rows = at::empty({R}, logits.options().dtype(acc_dtype));
  at::Tensor row_stats = at::empty({NUM_ROW_STATS, R}, logits.options().dtype(acc_dtype));
  at::Tensor label = at::empty({R}, logits.options().dtype(at::kLong));
  at::Tensor grad = grad_into ? *grad_into : at::empty({compute_grad ? R : 0, compute_grad ? C : 0}, logits.options());
  if (R == 0) {
    if (reduction == REDUCTION_NONE) return {loss_rows, row_stats, label, grad};
    return {at::full({}, reduction == REDUCTION_MEAN ? std::numeric_limits<double>::quiet_NaN() : 0.0,
                     loss_rows.options()),
            row_stats, label, grad};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor loss = loss_rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "memfast_cross_entropy_prob_fwd_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ProbArgs<acc_t> a;
    a.logits = logits.const_data_ptr();
    a.ld = R > 1 ? logits.stride(0) : C;
    a.target = target.const_data_ptr();
    a.t_ld = R > 1 ? target.stride(0) : C;
    a.R = R;
    a.C = C;
    a.weight = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    set_adjustment_args<acc_t>(a, adjustment, groups);
    a.loss = loss_rows.mutable_data_ptr<acc_t>();
    a.stats = row_stats.mutable_data_ptr<acc_t>();
    a.label = label.mutable_data_ptr<int64_t>();
    a.grad = compute_grad ? grad.mutable_data_ptr() : nullptr;
    // as the CPU kernel rounds them
    const acc_t eps = static_cast<acc_t>(label_smoothing);
    a.keep = acc_t(1) - eps;
    a.spread = C > 0 ? eps / static_cast<acc_t>(C) : acc_t(0);
    a.zeta = static_cast<acc_t>(lse_square_scale);
    a.cap = static_cast<acc_t>(softcap);
    a.inv_cap = softcap > 0.0 ? acc_t(1) / static_cast<acc_t>(softcap) : acc_t(0);  // as on the CPU
    a.grad_scale = reduction == REDUCTION_MEAN ? acc_t(1) / static_cast<acc_t>(R) : acc_t(1);
    const bool sweeps = cuda::env_is("MEMFAST_CUDA_PROB_KERNEL", "sweeps");
    if (target.scalar_type() == logits.scalar_type()) {
      (sweeps ? ce_prob_fwd_sweeps_kernel<scalar_t, scalar_t> : ce_prob_fwd_kernel<scalar_t, scalar_t>)
          <<<static_cast<unsigned>(R), kProbThreads, 0, stream>>>(a);
    } else {  // targets in the accumulation type (fp32 probabilities for bf16 logits)
      (sweeps ? ce_prob_fwd_sweeps_kernel<scalar_t, acc_t> : ce_prob_fwd_kernel<scalar_t, acc_t>)
          <<<static_cast<unsigned>(R), kProbThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (reduction != REDUCTION_NONE) {
      // PyTorch's mean over probability-target rows: input.numel() / C rows (NaN for no classes).
      const acc_t den = reduction == REDUCTION_MEAN ? static_cast<acc_t>(C > 0 ? R : 0) : acc_t(1);
      loss = at::empty({}, loss_rows.options());
      loss_total_kernel<acc_t><<<1, 256, 0, stream>>>(a.loss, R, nullptr, den, loss.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, row_stats, label, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(memfast, CUDA, m) {
  m.impl("cross_entropy_prob_fwd", &prob_forward_allocating<forward_cuda>);
  m.impl("cross_entropy_prob_fwd_", &prob_forward_grad_over_logits<forward_cuda>);
}

}  // namespace memfast
