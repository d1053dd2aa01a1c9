// CUDA kernels of memfast::cross_entropy_fwd / cross_entropy_bwd.
//
// Goal: one read of the logits and one write of the gradient. A row is split
// over a group of threads (8 or 32 lanes of a warp for short rows, a block of
// up to 512 threads, or a cluster of 2-8 blocks on sm_90 for long rows); each
// thread loads its part of the row with 16-byte loads and keeps it in
// registers, widened to fp32 (fp64 for fp64 logits):
//   pass 1 (registers): target logit known up front -> largest other logit and
//     "some other class beats the target" -> group reduction;
//   pass 2 (registers): e = exp(z - max), sum e (and sum w*z when smoothing)
//     -> group reduction;
//   pass 3 (registers): the gradient e * scale - eps/C * w (- (1-eps) w_y at
//     the target, formed in fp32 and rounded once), one 16-byte store.
// A softcap maps each loaded logit z to cap * tanh(z / cap) (before the
// adjustment) wherever it is widened, and pass 3 multiplies by its slope.
// Rows longer than the register budget (fp32 > 64k classes, fp64 > 32k, or
// any row when clusters are off and the row is > 32k bf16) use a streaming
// kernel: pass 1 reads the row with an online max/sum, pass 2 re-reads it
// (mostly from L2) and writes the gradient.
//
// Unlike the CPU kernel (which raises), a target out of range (and not
// ignore_index) or a group out of range cannot raise here without a host
// synchronisation: such a row gets a NaN loss and NaN row statistics and a zero
// gradient row, and never reads or writes out of bounds. The tracker op counts
// a bad target on the device and SampleTracker.check() raises; a bad group
// (which the tracker does not see) shows as a NaN loss and a `nonfinite` count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cooperative_groups.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "../common/ce_math.h"
#include "../common/checks.h"
#include "../common/forward_entries.h"
#include "../common/cuda_utils.cuh"

namespace memfast {
namespace {

using cuda::block_reduce;
using cuda::group_reduce;
using cuda::load_vec;
using cuda::loss_total_kernel;
using cuda::MaxOp;
using cuda::store_vec;
using cuda::SumOp;
using cuda::vec_width;

template <typename acc_t>
struct FwdArgs {
  const void* logits;
  int64_t ld;  // elements between two rows of the logits
  int64_t R, C;
  const int64_t* target;
  const acc_t* weight;      // [C] or nullptr
  const acc_t* weight_sum;  // device scalar sum(weight) when weight && eps > 0, else nullptr (sum = C)
  const acc_t* grad_scale;  // device scalar 1 / sum(weight[target]) for the mean, else nullptr (1)
  const acc_t* adj;         // adjustment rows or nullptr
  int64_t adj_ld;           // 0 for an expanded [C] shift
  const int64_t* groups;    // row -> adjustment row, or nullptr (row r uses adjustment row r)
  int64_t A;                // adjustment rows (bounds for groups)
  acc_t* loss;              // [R]
  acc_t* stats;             // [NUM_ROW_STATS, R]
  void* grad;               // [R, C] contiguous or nullptr
  int64_t ignore_index;
  acc_t eps;
  acc_t zeta;               // lse_square_scale (z-loss), 0 for none
  acc_t cap, inv_cap;       // softcap and 1 / softcap, both 0 for none
};

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// The logit the loss sees from a loaded one: capped (a.cap > 0; *slope gets d / dz), then shifted by
// adj[c] (adj: the row's adjustment or nullptr). The add is rounded on its own (__fadd_rn / __dadd_rn
// are never contracted into an fma with the cap's product), as on the CPU and in the reference, so
// that the target logit and the others compare as there.
__device__ __forceinline__ float add_rounded(float x, float y) { return __fadd_rn(x, y); }
__device__ __forceinline__ double add_rounded(double x, double y) { return __dadd_rn(x, y); }

template <typename acc_t>
__device__ __forceinline__ acc_t loss_logit(const FwdArgs<acc_t>& a, acc_t z, const acc_t* adj, int64_t c,
                                            acc_t* slope = nullptr) {
  const acc_t x = soft_cap(z, a.cap, a.inv_cap, slope);
  return add_rounded(x, adj ? adj[c] : acc_t(0));
}

// What every thread of a row's group knows about the row.
template <typename scalar_t, typename acc_t>
struct Row {
  const scalar_t* z;  // logits row
  const acc_t* adj;   // adjustment row or nullptr
  scalar_t* g;        // gradient row or nullptr
  int64_t y;
  acc_t z_y;
  int head;            // scalar elements before the first 16-byte aligned one
  int ntail;           // scalar elements after the last full vector
  int64_t nv;          // full vectors
  int64_t tail_start;  // index of the first tail element
};

// Reads the row's target (and group) and, for a row that is ignored or has an
// out-of-range target / group, writes its outputs (loss 0 or NaN, zero
// gradient part of thread `t` of `nt`) and returns false.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool row_begin(const FwdArgs<acc_t>& a, int64_t row, bool writer, int t, int nt,
                                          Row<scalar_t, acc_t>& r) {
  constexpr int VEC = vec_width<scalar_t>();
  const int64_t C = a.C;
  r.y = a.target[row];
  r.g = a.grad ? static_cast<scalar_t*>(a.grad) + row * C : nullptr;
  const bool ignored = r.y == a.ignore_index;
  bool bad = !ignored && (r.y < 0 || r.y >= C);
  int64_t adj_row = row;
  if (!ignored && a.groups) {
    adj_row = a.groups[row];
    bad = bad || adj_row < 0 || adj_row >= a.A;
  }
  if (ignored || bad) {
    // Ignored rows: zeros everywhere, as on the CPU. Bad rows: NaN (loud, and the tracker op skips them).
    const acc_t fill = ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
    if (writer) {
      a.loss[row] = fill;
      for (int k = 0; k < NUM_ROW_STATS; ++k) a.stats[k * a.R + row] = fill;
    }
    if (r.g) {
      // The gradient row has its own alignment (it is dense, the logits may not be).
      const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(r.g) / sizeof(scalar_t)) % VEC);
      const int64_t head = mis ? (VEC - mis < C ? VEC - mis : C) : 0;
      const int64_t nv = (C - head) / VEC;
      const acc_t zero[VEC] = {};
      for (int64_t c = t; c < head; c += nt) r.g[c] = scalar_t(0);
      for (int64_t v = t; v < nv; v += nt) store_vec<scalar_t, acc_t>(r.g + head + v * VEC, zero);
      for (int64_t c = head + nv * VEC + t; c < C; c += nt) r.g[c] = scalar_t(0);
    }
    return false;
  }
  r.z = static_cast<const scalar_t*>(a.logits) + row * a.ld;
  r.adj = a.adj ? a.adj + adj_row * a.adj_ld : nullptr;
  r.z_y = loss_logit(a, static_cast<acc_t>(r.z[r.y]), r.adj, r.y);
  const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(r.z) / sizeof(scalar_t)) % VEC);
  r.head = mis ? static_cast<int>(VEC - mis < C ? VEC - mis : C) : 0;
  r.nv = (C - r.head) / VEC;
  r.tail_start = r.head + r.nv * VEC;
  r.ntail = static_cast<int>(C - r.tail_start);
  return true;
}

// Pass-1 bookkeeping for one (adjusted) logit: the largest other logit and
// whether an other class beats the target under "argmax = first maximal index".
// A NaN logit counts as -inf here (as on the CPU and in the reference); a NaN target
// logit is never correct (row_finish).
template <typename acc_t, typename index_t>
__device__ __forceinline__ void visit(acc_t v, index_t c, index_t y, acc_t z_y, acc_t& max_other, acc_t& beaten) {
  if (c == y) return;
  if (isnan(v)) v = neg_inf<acc_t>();
  max_other = v > max_other ? v : max_other;
  const bool beats = c < y ? v >= z_y : v > z_y;
  beaten = beats ? acc_t(1) : beaten;
}

// Loss and row statistics from the reduced values; returns the gradient
// coefficients through k and scale (= k.scale_p / sum).
template <typename acc_t>
__device__ __forceinline__ void row_finish(const FwdArgs<acc_t>& a, int64_t row, bool writer, int64_t y, acc_t z_y,
                                           acc_t max_other, acc_t beaten, acc_t m, acc_t sum, acc_t shifted_dot,
                                           acc_t& w_y, GradCoef<acc_t>& k, acc_t& scale) {
  w_y = a.weight ? a.weight[y] : acc_t(1);
  const acc_t weight_sum = a.weight_sum ? *a.weight_sum : static_cast<acc_t>(a.C);
  const acc_t log_sum = log(sum);
  const acc_t lse = m + log_sum;
  if (writer) {
    a.loss[row] = row_loss(log_sum, z_y, m, w_y, weight_sum, shifted_dot, a.eps, a.C, a.zeta);
    a.stats[ROW_LOG_SUM * a.R + row] = log_sum;
    a.stats[ROW_TARGET_LOGIT * a.R + row] = z_y;
    a.stats[ROW_MAX_OTHER * a.R + row] = max_other;  // -inf when C == 1
    a.stats[ROW_WEIGHT * a.R + row] = w_y;
    a.stats[ROW_CORRECT * a.R + row] = beaten == acc_t(0) && !isnan(z_y) ? acc_t(1) : acc_t(0);
  }
  k = grad_coefficients(w_y, weight_sum, a.eps, a.C, a.grad_scale ? *a.grad_scale : acc_t(1), a.zeta, lse);
  scale = k.scale_p / sum;
}

// d loss / d z_c from e_c = exp(x_c - max) of the capped, adjusted logit x_c and the softcap's
// slope d x_c / d z_c (1 without one); the target term in acc_t, rounded once by the caller.
template <typename acc_t, typename index_t>
__device__ __forceinline__ acc_t grad_value(const FwdArgs<acc_t>& a, acc_t e, index_t c, index_t y,
                                            const GradCoef<acc_t>& k, acc_t scale, acc_t slope) {
  const acc_t w_c = (a.weight && a.eps > acc_t(0)) ? a.weight[c] : acc_t(1);
  acc_t g = e * scale - k.eps_w * w_c;
  return (c == y ? g - k.target_w : g) * slope;
}

// Reduce K values over the row's threads: a lane group (G <= 32), a block, or
// a cluster of `cs` blocks (distributed shared memory, sm_90). `cl` is a K-entry
// slot of this block's shared memory, one per stage.
template <int G, int NT, int K, typename T, typename Op>
__device__ __forceinline__ void row_reduce(T (&v)[K], Op op, T* smem, T* cl, int cs) {
  if constexpr (G <= 32) {
    group_reduce<G, K>(v, op);
  } else {
    block_reduce<NT, K>(v, op, smem);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (cs > 1) {
      namespace cg = cooperative_groups;
      cg::cluster_group cluster = cg::this_cluster();
      if (threadIdx.x == 0) {
#pragma unroll
        for (int k = 0; k < K; ++k) cl[k] = v[k];
      }
      cluster.sync();
#pragma unroll
      for (int k = 0; k < K; ++k) {
        T r = *cluster.map_shared_rank(cl + k, 0);
        for (int q = 1; q < cs; ++q) r = op(r, *cluster.map_shared_rank(cl + k, q));
        v[k] = r;
      }
    }
#else
    if (cs > 1) __trap();  // PTX JIT-compiled for an older arch on sm_90: no clusters here, never a wrong sum
#endif
  }
}

__device__ __forceinline__ void cluster_sync_if(int cs) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cs > 1) cooperative_groups::this_cluster().sync();
#else
  if (cs > 1) __trap();
#endif
}

// Threads per block of the resident kernel and how many blocks the compiler
// should fit on one SM (64k registers per SM). A held vector costs 4 registers
// whatever the dtype (it stays packed); ~48 more hold pointers, indices and
// the pass in flight (fp64: +32). Checked with -Xptxas -v: few or no spills.
template <typename scalar_t, int G, int NVEC>
struct ResidentConfig {
  static constexpr int kThreads = G > 32 ? G : 256;
  static constexpr int kEstRegs = 4 * NVEC + 48 + (sizeof(at::opmath_type<scalar_t>) == 8 ? 32 : 0);
  static constexpr int kFit = 65536 / (kThreads * kEstRegs);
  static constexpr int kMaxBlocks = 2048 / kThreads;
  static constexpr int kMinBlocks = kFit < 1 ? 1 : (kFit > kMaxBlocks ? kMaxBlocks : kFit);
};

// Widen one held 16-byte vector, cap it (a.cap > 0) and add the adjustment row (if any);
// slope (when given) gets d x / d z.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void widen(const FwdArgs<acc_t>& a, const uint4& raw, const acc_t* adj, int c0, acc_t* x,
                                      acc_t* slope = nullptr) {
  constexpr int VEC = vec_width<scalar_t>();
  const scalar_t* s = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    x[j] = loss_logit(a, static_cast<acc_t>(s[j]), adj, c0 + j, slope ? slope + j : nullptr);
  }
}

// Hide the held vectors' values from the optimiser between passes, so that it
// re-widens them instead of keeping widened fp32 copies alive across a pass
// (which would double the registers the row needs). Emits no instruction.
template <int NVEC>
__device__ __forceinline__ void keep_packed(uint4 (&raw)[NVEC]) {
#pragma unroll
  for (int i = 0; i < NVEC; ++i) asm volatile("" : "+r"(raw[i].x), "+r"(raw[i].y), "+r"(raw[i].z), "+r"(raw[i].w));
}

// The row held in registers, as loaded (packed 16-byte vectors: 8 bf16 in 4
// registers), widened again in each pass; exp is evaluated twice per element
// (pass 2 and 3), which the SFU affords at HBM rate, in exchange for half the
// registers of an fp32 copy and so two 512-thread blocks per SM.
// G threads per row (G <= 32: 256 / G rows per block; G > 32: one row per
// block, or per cluster of `cs` blocks). Column indices fit in 32 bits.
template <typename scalar_t, int G, int NVEC>
__global__ void __launch_bounds__(ResidentConfig<scalar_t, G, NVEC>::kThreads,
                                  ResidentConfig<scalar_t, G, NVEC>::kMinBlocks)
    ce_fwd_resident_kernel(const FwdArgs<at::opmath_type<scalar_t>> a, const int cs) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  constexpr int NT = ResidentConfig<scalar_t, G, NVEC>::kThreads;
  constexpr int NW = NT / 32;
  __shared__ acc_t red_smem[2][2 * NW];
  __shared__ acc_t cl_smem[2][2];

  int64_t row;
  int lane, rank = 0;
  if constexpr (G > 32) {
    row = blockIdx.x / cs;
    rank = static_cast<int>(blockIdx.x % cs);
    lane = threadIdx.x;
  } else {
    row = static_cast<int64_t>(blockIdx.x) * (NT / G) + threadIdx.x / G;
    lane = threadIdx.x % G;
    if (row >= a.R) return;  // whole lane groups leave; shuffles are per group
  }
  const bool writer = rank == 0 && lane == 0;
  Row<scalar_t, acc_t> r;
  // Uniform over the group / block / cluster: leaving here touches no shared memory.
  if (!row_begin(a, row, writer, rank * G + lane, G * cs, r)) return;
  const int y = static_cast<int>(r.y);
  const int nv = static_cast<int>(r.nv);
  const int head = r.head;
  const acc_t z_y = r.z_y;
  const acc_t* adj = r.adj;

  uint4 raw[NVEC];
#pragma unroll
  for (int i = 0; i < NVEC; ++i) {
    const int v = (i * cs + rank) * G + lane;
    raw[i] = v < nv ? *reinterpret_cast<const uint4*>(r.z + head + v * VEC) : make_uint4(0, 0, 0, 0);
  }
  // Scalar head and tail elements (block / cluster rank 0; lane < head, lane < ntail).
  const bool has_head = rank == 0 && lane < head;
  const bool has_tail = rank == 0 && lane < r.ntail;
  const int c_head = lane, c_tail = static_cast<int>(r.tail_start) + lane;
  acc_t slope_h = acc_t(1), slope_t = acc_t(1);
  const acc_t xh = has_head ? loss_logit(a, static_cast<acc_t>(r.z[c_head]), adj, c_head, &slope_h) : acc_t(0);
  const acc_t xt = has_tail ? loss_logit(a, static_cast<acc_t>(r.z[c_tail]), adj, c_tail, &slope_t) : acc_t(0);

  // Pass 1: largest other logit, and whether another class beats the target.
  acc_t stage1[2] = {neg_inf<acc_t>(), acc_t(0)};
#pragma unroll
  for (int i = 0; i < NVEC; ++i) {
    const int v = (i * cs + rank) * G + lane;
    if (v < nv) {
      const int c0 = head + v * VEC;
      acc_t x[VEC];
      widen<scalar_t>(a, raw[i], adj, c0, x);
#pragma unroll
      for (int j = 0; j < VEC; ++j) visit<acc_t>(x[j], c0 + j, y, z_y, stage1[0], stage1[1]);
    }
  }
  if (has_head) visit<acc_t>(xh, c_head, y, z_y, stage1[0], stage1[1]);
  if (has_tail) visit<acc_t>(xt, c_tail, y, z_y, stage1[0], stage1[1]);
  row_reduce<G, NT, 2>(stage1, MaxOp(), red_smem[0], cl_smem[0], cs);
  const acc_t max_other = stage1[0];
  const acc_t m = z_y > max_other ? z_y : max_other;
  keep_packed(raw);

  // Pass 2: sum of exp(z - m) (and sum w * (z - m) for label smoothing).
  const bool smooth = a.eps > acc_t(0);
  const acc_t* w = a.weight;
  acc_t stage2[2] = {acc_t(0), acc_t(0)};
#pragma unroll
  for (int i = 0; i < NVEC; ++i) {
    const int v = (i * cs + rank) * G + lane;
    if (v < nv) {
      const int c0 = head + v * VEC;
      acc_t x[VEC];
      widen<scalar_t>(a, raw[i], adj, c0, x);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (smooth) stage2[1] += (w ? w[c0 + j] : acc_t(1)) * (x[j] - m);
        stage2[0] += fast_exp(x[j] - m);
      }
    }
  }
  if (has_head) {
    if (smooth) stage2[1] += (w ? w[c_head] : acc_t(1)) * (xh - m);
    stage2[0] += fast_exp(xh - m);
  }
  if (has_tail) {
    if (smooth) stage2[1] += (w ? w[c_tail] : acc_t(1)) * (xt - m);
    stage2[0] += fast_exp(xt - m);
  }
  row_reduce<G, NT, 2>(stage2, SumOp(), red_smem[1], cl_smem[1], cs);
  keep_packed(raw);

  acc_t w_y, scale;
  GradCoef<acc_t> k;
  row_finish(a, row, writer, r.y, z_y, max_other, stage1[1], m, stage2[0], stage2[1], w_y, k, scale);
  // Pass 3: the gradient, one rounding per element, 16-byte stores.
  if (r.g) {
#pragma unroll
    for (int i = 0; i < NVEC; ++i) {
      const int v = (i * cs + rank) * G + lane;
      if (v < nv) {
        const int c0 = head + v * VEC;
        acc_t x[VEC], slope[VEC];
        widen<scalar_t>(a, raw[i], adj, c0, x, slope);
#pragma unroll
        for (int j = 0; j < VEC; ++j) x[j] = grad_value(a, fast_exp(x[j] - m), c0 + j, y, k, scale, slope[j]);
        store_vec<scalar_t, acc_t>(r.g + c0, x);
      }
    }
    if (has_head) r.g[c_head] = static_cast<scalar_t>(grad_value(a, fast_exp(xh - m), c_head, y, k, scale, slope_h));
    if (has_tail) r.g[c_tail] = static_cast<scalar_t>(grad_value(a, fast_exp(xt - m), c_tail, y, k, scale, slope_t));
  }
  // No block of the cluster may leave while another still reads its shared memory.
  cluster_sync_if(cs);
}

// Any row length: one block per row, two reads of the row (the second mostly from L2).
constexpr int kStreamThreads = 512;
constexpr int kStreamUnroll = 4;

template <typename scalar_t>
__global__ void __launch_bounds__(kStreamThreads) ce_fwd_stream_kernel(const FwdArgs<at::opmath_type<scalar_t>> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  constexpr int NT = kStreamThreads;
  constexpr int U = kStreamUnroll;
  __shared__ acc_t red_smem[2][2 * (NT / 32)];
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x;
  const bool writer = lane == 0;
  Row<scalar_t, acc_t> r;
  if (!row_begin(a, row, writer, lane, NT, r)) return;
  const bool smooth = a.eps > acc_t(0);

  acc_t stage1[2] = {neg_inf<acc_t>(), acc_t(0)};  // largest other logit, beaten
  acc_t run_max = neg_inf<acc_t>(), run_sum = acc_t(0);
  // sum w * (z - run_max) and sum w over this thread's logits (for label smoothing), re-based
  // when run_max grows: the terms stay small where the logits are far from zero (a plain
  // sum w * z, shifted by the row max at the end, lost ~1e-3 of the loss at |z| ~ 3e5).
  acc_t shifted_dot = acc_t(0), weight_part = acc_t(0);
  // Online softmax over a few values: rescale the running sum once per vector.
  auto absorb = [&](const acc_t* x, int n, int64_t c0) {
    acc_t vmax = neg_inf<acc_t>();
    for (int j = 0; j < n; ++j) {
      visit(x[j], c0 + j, r.y, r.z_y, stage1[0], stage1[1]);
      vmax = x[j] > vmax ? x[j] : vmax;
    }
    const acc_t new_max = vmax > run_max ? vmax : run_max;
    if (smooth) {
      // Only -inf / NaN so far (new_max == -inf): the logits themselves, whose -inf or NaN the
      // re-basing below keeps (-inf - inf, NaN), as the CPU's sum w * (z - m) has them.
      const acc_t base = new_max == neg_inf<acc_t>() ? acc_t(0) : new_max;
      if (new_max != run_max && weight_part != acc_t(0)) shifted_dot -= weight_part * (new_max - run_max);
      for (int j = 0; j < n; ++j) {
        const acc_t w_c = a.weight ? a.weight[c0 + j] : acc_t(1);
        shifted_dot += w_c * (x[j] - base);
        weight_part += w_c;
      }
    }
    if (new_max == neg_inf<acc_t>()) {  // only -inf / NaN so far: keep a NaN (the CPU's sum carries it)
      for (int j = 0; j < n; ++j)
        if (x[j] != x[j]) run_sum = x[j];
      return;
    }
    acc_t s = run_sum * fast_exp(run_max - new_max);
    for (int j = 0; j < n; ++j) s += fast_exp(x[j] - new_max);
    run_sum = s;
    run_max = new_max;
  };
  for (int64_t v0 = lane; v0 < r.nv; v0 += static_cast<int64_t>(U) * NT) {
    acc_t x[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + static_cast<int64_t>(u) * NT;
      if (v < r.nv) load_vec<scalar_t, acc_t>(r.z + r.head + v * VEC, x[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + static_cast<int64_t>(u) * NT;
      if (v < r.nv) {
        const int64_t c0 = r.head + v * VEC;
#pragma unroll
        for (int j = 0; j < VEC; ++j) x[u][j] = loss_logit(a, x[u][j], r.adj, c0 + j);
        absorb(x[u], VEC, c0);
      }
    }
  }
  auto scalar_logit = [&](int64_t c, acc_t* slope) {
    return loss_logit(a, static_cast<acc_t>(r.z[c]), r.adj, c, slope);
  };
  if (lane < r.head) {
    acc_t x = scalar_logit(lane, nullptr);
    absorb(&x, 1, lane);
  }
  if (lane < r.ntail) {
    const int64_t c = r.tail_start + lane;
    acc_t x = scalar_logit(c, nullptr);
    absorb(&x, 1, c);
  }
  block_reduce<NT, 2>(stage1, MaxOp(), red_smem[0]);
  const acc_t max_other = stage1[0];
  const acc_t m = r.z_y > max_other ? r.z_y : max_other;
  acc_t stage2[2] = {run_max == neg_inf<acc_t>() ? run_sum /* 0, or a NaN seen */ : run_sum * fast_exp(run_max - m),
                     !smooth ? acc_t(0)
                     : weight_part == acc_t(0) || run_max == m ? shifted_dot  // (m - run_max: 0 * inf for no logits)
                                                               : shifted_dot - weight_part * (m - run_max)};
  block_reduce<NT, 2>(stage2, SumOp(), red_smem[1]);
  // m == -inf (every logit -inf or NaN): the online sum skipped them and holds 0, but
  // sum exp(z - m) is NaN (-inf - -inf) in the CPU and resident kernels; the same here.
  if (m == neg_inf<acc_t>()) stage2[0] = std::numeric_limits<acc_t>::quiet_NaN();

  acc_t w_y, scale;
  GradCoef<acc_t> k;
  row_finish(a, row, writer, r.y, r.z_y, max_other, stage1[1], m, stage2[0], stage2[1], w_y, k, scale);
  if (!r.g) return;
  for (int64_t v0 = lane; v0 < r.nv; v0 += static_cast<int64_t>(U) * NT) {
    acc_t x[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + static_cast<int64_t>(u) * NT;
      if (v < r.nv) load_vec<scalar_t, acc_t>(r.z + r.head + v * VEC, x[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + static_cast<int64_t>(u) * NT;
      if (v < r.nv) {
        const int64_t c0 = r.head + v * VEC;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          acc_t slope;
          const acc_t z = loss_logit(a, x[u][j], r.adj, c0 + j, &slope);
          x[u][j] = grad_value(a, fast_exp(z - m), c0 + j, r.y, k, scale, slope);
        }
        store_vec<scalar_t, acc_t>(r.g + c0, x[u]);
      }
    }
  }
  auto scalar_grad = [&](int64_t c) {
    acc_t slope;
    const acc_t z = scalar_logit(c, &slope);
    r.g[c] = static_cast<scalar_t>(grad_value(a, fast_exp(z - m), c, r.y, k, scale, slope));
  };
  if (lane < r.head) scalar_grad(lane);
  if (lane < r.ntail) scalar_grad(r.tail_start + lane);
}

// sum(weight), on the device (needed only with label smoothing).
template <typename acc_t>
__global__ void __launch_bounds__(256) weight_sum_kernel(const acc_t* w, int64_t C, acc_t* out) {
  __shared__ acc_t smem[256 / 32];
  acc_t v[1] = {acc_t(0)};
  for (int64_t c = threadIdx.x; c < C; c += 256) v[0] += w[c];
  block_reduce<256, 1>(v, SumOp(), smem);
  if (threadIdx.x == 0) *out = v[0];
}

// The mean's denominator sum(weight[target]) over rows not ignored (rows with an
// out-of-range target count 1: their loss is NaN anyway) and its reciprocal.
template <typename acc_t>
__global__ void __launch_bounds__(256) mean_denominator_kernel(const int64_t* target, int64_t R, const acc_t* w,
                                                               int64_t C, int64_t ignore_index, acc_t* den,
                                                               acc_t* inv_den) {
  // double, as the CPU: the exact count of up to 2^53 rows, weights summed without drift
  __shared__ double smem[256 / 32];
  double v[1] = {0.0};
  for (int64_t r = threadIdx.x; r < R; r += 256) {
    const int64_t y = target[r];
    if (y != ignore_index) v[0] += (w && y >= 0 && y < C) ? static_cast<double>(w[y]) : 1.0;
  }
  block_reduce<256, 1>(v, SumOp(), smem);
  if (threadIdx.x == 0) {
    *den = static_cast<acc_t>(v[0]);
    *inv_den = acc_t(1) / static_cast<acc_t>(v[0]);
  }
}

// A zero stays zero (ignored rows) even when the row's grad_loss is inf/NaN,
// e.g. a mean over no rows (as the CPU kernel and the reference).
template <typename acc_t>
__device__ __forceinline__ acc_t scale_grad(acc_t v, acc_t s) {
  return v == acc_t(0) ? acc_t(0) : v * s;
}

// out = grad * grad_loss[:, None]; G threads per row as in the forward.
template <typename scalar_t, int G>
__global__ void __launch_bounds__(G > 32 ? G : 256)
    ce_bwd_kernel(const scalar_t* grad, const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                  int64_t grad_loss_stride, scalar_t* out, int64_t R, int64_t C) {  // out may alias grad (in place)
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  constexpr int NT = G > 32 ? G : 256;
  constexpr int U = 4;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (NT / G) + threadIdx.x / G;
  const int lane = threadIdx.x % G;
  if (row >= R) return;
  const acc_t s = grad_loss[row * grad_loss_stride];
  // In place with a factor of 1 (a mean's or sum's loss.backward(); the mean's
  // 1/N is already in the gradient) there is nothing to read or write.
  if (s == acc_t(1) && out == grad) return;
  const scalar_t* g = grad + row * C;
  scalar_t* o = out + row * C;  // same alignment as g (host checks)
  const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(g) / sizeof(scalar_t)) % VEC);
  const int64_t head = mis ? (VEC - mis < C ? VEC - mis : C) : 0;
  const int64_t nv = (C - head) / VEC;
  for (int64_t v0 = lane; v0 < nv; v0 += static_cast<int64_t>(U) * G) {
    acc_t x[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + static_cast<int64_t>(u) * G;
      if (v < nv) load_vec<scalar_t, acc_t>(g + head + v * VEC, x[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + static_cast<int64_t>(u) * G;
      if (v < nv) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) x[u][j] = scale_grad(x[u][j], s);
        store_vec<scalar_t, acc_t>(o + head + v * VEC, x[u]);
      }
    }
  }
  if (lane < head) o[lane] = static_cast<scalar_t>(scale_grad(static_cast<acc_t>(g[lane]), s));
  const int64_t c = head + nv * VEC + lane;
  if (c < C) o[c] = static_cast<scalar_t>(scale_grad(static_cast<acc_t>(g[c]), s));
}

// Compute capability major of the current device (a host query, no synchronisation).
int device_major() {
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

template <typename scalar_t, int G, int NVEC>
void launch_resident(const FwdArgs<at::opmath_type<scalar_t>>& a, int cs, cudaStream_t stream) {
  constexpr int NT = ResidentConfig<scalar_t, G, NVEC>::kThreads;
  auto kernel = ce_fwd_resident_kernel<scalar_t, G, NVEC>;
  if (G <= 32) {
    const int64_t blocks = (a.R + NT / G - 1) / (NT / G);
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "memfast.cross_entropy: too many rows");
    kernel<<<static_cast<unsigned>(blocks), NT, 0, stream>>>(a, 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t blocks = a.R * cs;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "memfast.cross_entropy: too many rows");
  if (cs == 1) {
    kernel<<<static_cast<unsigned>(blocks), NT, 0, stream>>>(a, 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks), 1, 1);
  config.blockDim = dim3(NT, 1, 1);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(cs);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, a, cs));
}

// Clusters need the kernel's code built for sm_90+: an image JIT-compiled from older
// PTX (e.g. TORCH_CUDA_ARCH_LIST=8.0+PTX) on an H100 would reach the __trap() branch.
// Asked of the kernel loaded for each device once (its PTX version; devices may differ).
// Not asked while the stream is capturing a CUDA graph (the query may load the module,
// which a capture need not allow): until an eager call has asked, no clusters (the
// other kernels give the same results).
template <typename scalar_t>
bool cluster_code_loaded(cudaStream_t stream) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int8_t> known[kMaxDevices];  // 0 unknown, 1 no, 2 yes
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= kMaxDevices) return false;
  int8_t state = known[device].load(std::memory_order_relaxed);
  if (state == 0) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) return false;
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, ce_fwd_resident_kernel<scalar_t, 512, 4>) != cudaSuccess) {
      (void)cudaGetLastError();  // not sticky: clear it, or the next launch check would report it
      state = 1;
    } else {
      state = attr.ptxVersion >= 90 ? 2 : 1;
    }
    known[device].store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

// Pick the kernel for a row of C elements: the smallest register-resident
// configuration that holds C / VEC vectors, else the streaming kernel.
// MEMFAST_CE_KERNEL=stream forces the streaming kernel; MEMFAST_CE_CLUSTER=0
// turns thread-block clusters off (both read per call, for tests and benchmarks).
template <typename scalar_t>
void launch_forward(const FwdArgs<at::opmath_type<scalar_t>>& a, cudaStream_t stream) {
  constexpr int VEC = vec_width<scalar_t>();
  const int64_t need = a.C / VEC;
  const bool stream_only = cuda::env_is("MEMFAST_CE_KERNEL", "stream");
  // Asked only for rows that need them (cluster_code_loaded may query the driver once).
  auto clusters = [&] {
    return !cuda::env_is("MEMFAST_CE_CLUSTER", "0") && device_major() >= 9 && cluster_code_loaded<scalar_t>(stream);
  };
  if (!stream_only) {
    if (need <= 8 * 1) return launch_resident<scalar_t, 8, 1>(a, 1, stream);
    if (need <= 32 * 2) return launch_resident<scalar_t, 32, 2>(a, 1, stream);
    if (need <= 32 * 4) return launch_resident<scalar_t, 32, 4>(a, 1, stream);
    if (need <= 128 * 4) return launch_resident<scalar_t, 128, 4>(a, 1, stream);
    if (need <= 256 * 4) return launch_resident<scalar_t, 256, 4>(a, 1, stream);
    if (need <= 512 * 4) return launch_resident<scalar_t, 512, 4>(a, 1, stream);
    if (clusters()) {
      for (int cs = 2; cs <= 8; cs *= 2) {
        if (need <= 512 * 4 * cs) return launch_resident<scalar_t, 512, 4>(a, cs, stream);
      }
    } else if (need <= 512 * 8) {
      return launch_resident<scalar_t, 512, 8>(a, 1, stream);
    }
  }
  TORCH_CHECK(a.R <= std::numeric_limits<int32_t>::max(), "memfast.cross_entropy: too many rows");
  ce_fwd_stream_kernel<scalar_t><<<static_cast<unsigned>(a.R), kStreamThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// grad_into: nullptr (allocate the gradient when compute_grad) or the logits themselves
// (cross_entropy_fwd_, contiguous and 16-byte aligned): every kernel reads a row element (the
// resident ones: the whole row, and the target logit up front) before the same thread, or a thread
// after a reduction that waited for the read, writes its gradient; the loads are plain (not the
// read-only cache path) and the pointers not __restrict__, so the aliasing is well defined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& logits_in, const at::Tensor& target, const std::optional<at::Tensor>& weight_opt,
    int64_t ignore_index, double label_smoothing, const std::optional<at::Tensor>& adjustment_opt,
    const std::optional<at::Tensor>& groups_opt, bool compute_grad, int64_t reduction, double lse_square_scale,
    double softcap, const at::Tensor* grad_into) {
  const at::Tensor weight = weight_opt.value_or(at::Tensor());
  const at::Tensor adjustment = adjustment_opt.value_or(at::Tensor());
  const at::Tensor groups = groups_opt.value_or(at::Tensor());
  if (grad_into) check_inplace_index_logits(logits_in, target, weight, adjustment, groups, true);
  check_forward_args(logits_in, target, weight, label_smoothing, adjustment, groups, reduction, lse_square_scale,
                     softcap);
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  at::Tensor logits = logits_in.stride(1) == 1 || logits_in.size(1) <= 1 ? logits_in : logits_in.contiguous();
  const int64_t R = logits.size(0), C = logits.size(1);
  TORCH_CHECK_VALUE(C < (int64_t{1} << 31) - 16, "memfast.cross_entropy: at most 2^31 - 17 classes, got ", C);
  const int vec = static_cast<int>(16 / logits.element_size());
  // The vectorised gradient stores need the logits row and the (dense) gradient
  // row to share their alignment: true for dense, aligned logits; otherwise copy.
  const int64_t ld = logits.size(0) > 1 ? logits.stride(0) : C;
  if (!grad_into && compute_grad && R > 0 && C > 0 && (!aligned16(logits.const_data_ptr()) || ld % vec != C % vec)) {
    logits = logits.clone(at::MemoryFormat::Contiguous);
  }
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  at::Tensor loss_rows = at::empty({R}, logits.options().dtype(acc_dtype));
  at::Tensor row_stats = at::empty({NUM_ROW_STATS, R}, logits.options().dtype(acc_dtype));
  at::Tensor grad = grad_into ? *grad_into : at::empty({compute_grad ? R : 0, compute_grad ? C : 0}, logits.options());
  if (R == 0) {
    if (reduction == REDUCTION_NONE) return {loss_rows, row_stats, grad};
    // The mean over no rows is NaN, as in PyTorch.
    return {at::full({}, reduction == REDUCTION_MEAN ? std::numeric_limits<double>::quiet_NaN() : 0.0,
                     loss_rows.options()),
            row_stats, grad};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor weight_sum;
  if (weight.defined() && label_smoothing > 0.0) weight_sum = at::empty({1}, logits.options().dtype(acc_dtype));
  // For the mean: [denominator, 1 / denominator], computed on the device before the rows.
  at::Tensor mean_den;
  if (reduction == REDUCTION_MEAN) mean_den = at::empty({2}, logits.options().dtype(acc_dtype));

  at::Tensor loss = loss_rows;  // reduction none; else the 0-d total below
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "memfast_cross_entropy_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FwdArgs<acc_t> a;
    a.logits = logits.const_data_ptr();
    a.ld = logits.size(0) > 1 ? logits.stride(0) : C;
    a.R = R;
    a.C = C;
    a.target = target.const_data_ptr<int64_t>();
    a.weight = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    a.weight_sum = nullptr;
    if (weight_sum.defined()) {
      weight_sum_kernel<acc_t><<<1, 256, 0, stream>>>(a.weight, C, weight_sum.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      a.weight_sum = weight_sum.const_data_ptr<acc_t>();
    }
    a.grad_scale = nullptr;
    if (mean_den.defined()) {
      acc_t* d = mean_den.mutable_data_ptr<acc_t>();
      mean_denominator_kernel<acc_t><<<1, 256, 0, stream>>>(a.target, R, a.weight, C, ignore_index, d, d + 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      a.grad_scale = d + 1;
    }
    set_adjustment_args<acc_t>(a, adjustment, groups);
    a.loss = loss_rows.mutable_data_ptr<acc_t>();
    a.stats = row_stats.mutable_data_ptr<acc_t>();
    a.grad = compute_grad ? grad.mutable_data_ptr() : nullptr;
    a.ignore_index = ignore_index;
    a.eps = static_cast<acc_t>(label_smoothing);
    a.zeta = static_cast<acc_t>(lse_square_scale);
    a.cap = static_cast<acc_t>(softcap);
    a.inv_cap = softcap > 0.0 ? acc_t(1) / static_cast<acc_t>(softcap) : acc_t(0);  // as on the CPU
    launch_forward<scalar_t>(a, stream);
    if (reduction != REDUCTION_NONE) {
      loss = at::empty({}, loss_rows.options());
      const acc_t* den = mean_den.defined() ? mean_den.const_data_ptr<acc_t>() : nullptr;
      loss_total_kernel<acc_t><<<1, 256, 0, stream>>>(a.loss, R, den, acc_t(1), loss.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, row_stats, grad};
}

template <typename scalar_t, int G>
void launch_backward(const scalar_t* g, const at::opmath_type<scalar_t>* go, int64_t go_stride, scalar_t* out,
                     int64_t R, int64_t C, cudaStream_t stream) {
  constexpr int NT = G > 32 ? G : 256;
  const int64_t blocks = (R + NT / G - 1) / (NT / G);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "memfast.cross_entropy backward: too many rows");
  ce_bwd_kernel<scalar_t, G><<<static_cast<unsigned>(blocks), NT, 0, stream>>>(g, go, go_stride, out, R, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out = g * grad_loss[:, None] (out may be g itself: each element is read before it is written).
void scale_rows_cuda(const at::Tensor& g, const at::Tensor& grad_loss, at::Tensor& out) {
  const int64_t R = g.size(0), C = g.size(1);
  if (g.numel() == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "memfast_cross_entropy_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int VEC = vec_width<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const acc_t* gl = grad_loss.const_data_ptr<acc_t>();
    const int64_t gl_stride = grad_loss.dim() == 0 ? 0 : grad_loss.stride(0);  // 0-d: one factor for every row
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t vectors = C / VEC;
    if (vectors <= 8 * 4) {
      launch_backward<scalar_t, 8>(gp, gl, gl_stride, op, R, C, stream);
    } else if (vectors <= 32 * 8) {
      launch_backward<scalar_t, 32>(gp, gl, gl_stride, op, R, C, stream);
    } else if (vectors <= 128 * 8) {
      launch_backward<scalar_t, 128>(gp, gl, gl_stride, op, R, C, stream);
    } else {
      launch_backward<scalar_t, 512>(gp, gl, gl_stride, op, R, C, stream);
    }
  });
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad, const at::Tensor& grad_loss) {
  check_backward_args(grad, grad_loss);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  at::Tensor g = grad.contiguous();
  // Output rows and input rows must share their 16-byte alignment.
  if (!aligned16(g.const_data_ptr())) g = g.clone();
  at::Tensor out = at::empty({g.size(0), g.size(1)}, g.options());
  scale_rows_cuda(g, grad_loss, out);
  return out;
}

void cross_entropy_bwd_inplace_cuda(at::Tensor& grad, const at::Tensor& grad_loss) {
  check_backward_inplace_args(grad, grad_loss);
  TORCH_CHECK_VALUE(grad.is_contiguous() && aligned16(grad.const_data_ptr()),
                    "memfast.cross_entropy backward: the saved gradient must be contiguous and 16-byte aligned");
  const c10::cuda::CUDAGuard device_guard(grad.device());
  scale_rows_cuda(grad, grad_loss, grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(memfast, CUDA, m) {
  m.impl("cross_entropy_fwd", &forward_allocating<forward_cuda>);
  m.impl("cross_entropy_fwd_", &forward_grad_over_logits<forward_cuda>);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda);
  m.impl("cross_entropy_bwd_", &cross_entropy_bwd_inplace_cuda);
}

}  // namespace memfast
