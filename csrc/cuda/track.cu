// CUDA kernel of memfast::track_: scatter per-row statistics into a tracker's
// [S, N] state by sample id, with no host synchronisation.
//
//   1. validate: count rows with an out-of-range sample id / target into
//      counters[bad_ids] / counters[bad_targets] and raise a scratch flag;
//      counters[calls] += 1. (The CPU kernel raises instead; here
//      SampleTracker.check() raises later.) A flagged batch writes nothing.
//   2. sums: every valid finite row adds into the additive statistics;
//      consecutive rows of the same sample-id entry (the tokens of one
//      sequence) are first combined within the warp (a segmented scan), so
//      per-token -> per-sequence updates issue one atomic per warp and
//      statistic. Non-finite rows only add to `nonfinite`. When per-sample
//      state is kept, the largest valid finite row of each id entry goes to
//      last_row[entry] (atomicMax, order-independent).
//   3. (per-sample state kept only) sort (id, last row) pairs by id (stable
//      radix sort), and apply the state once per sample from its largest row:
//      deterministic, no races.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>

#include "../common/ce_math.h"
#include "../common/checks.h"

namespace memfast {
namespace {

constexpr int kThreads = 256;

struct StatRows {
  int64_t rows[NUM_STATS];
};

// Statistics that add over rows (the ones add_row_sums writes, plus nonfinite).
constexpr int kNumAdditive = 8;
__host__ __device__ constexpr int additive_stat(int k) {
  return k == 0 ? STAT_CSL
       : k == 1 ? STAT_COUNT
       : k == 2 ? STAT_LOSS_SQ
       : k == 3 ? STAT_INCONF
       : k == 4 ? STAT_PTRUE_SQ
       : k == 5 ? STAT_MARGIN
       : k == 6 ? STAT_CORRECT
                : STAT_NONFINITE;
}

__device__ __forceinline__ int64_t warp_sum(int64_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__global__ void __launch_bounds__(kThreads)
    track_validate_kernel(const int64_t* __restrict__ ids, int64_t n_ids, int64_t rows_per_id,
                          const int64_t* __restrict__ target, int64_t R, int64_t N, int64_t num_classes,
                          int64_t ignore_index, int64_t* __restrict__ counters, int* __restrict__ flag) {
  __shared__ int64_t smem[2][kThreads / 32];
  int64_t bad_id_rows = 0, bad_targets = 0;
  const int64_t n = R > n_ids ? R : n_ids;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    // At least 1 per bad id: with no rows (R == 0, n_ids > 0) check() must still raise, as the CPU does.
    if (i < n_ids && (ids[i] < 0 || ids[i] >= N)) bad_id_rows += rows_per_id > 0 ? rows_per_id : 1;
    if (i < R) {
      const int64_t t = target[i];
      if (t != ignore_index && (t < 0 || t >= num_classes)) bad_targets += 1;
    }
  }
  bad_id_rows = warp_sum(bad_id_rows);
  bad_targets = warp_sum(bad_targets);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    smem[0][warp] = bad_id_rows;
    smem[1][warp] = bad_targets;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t a = 0, b = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      a += smem[0][w];
      b += smem[1][w];
    }
    if (a) atomicAdd(reinterpret_cast<unsigned long long*>(counters + COUNTER_BAD_IDS), static_cast<unsigned long long>(a));
    if (b) {
      atomicAdd(reinterpret_cast<unsigned long long*>(counters + COUNTER_BAD_TARGETS), static_cast<unsigned long long>(b));
    }
    if (a || b) atomicExch(flag, 1);
    if (blockIdx.x == 0) counters[COUNTER_CALLS] += 1;  // one thread of the whole grid
  }
}

// add_row_sums into registers: every statistic present, row s at acc + s.
__device__ __forceinline__ void row_sums_local(const RowContribution& c, float (&acc)[NUM_STATS]) {
  constexpr int64_t identity[NUM_STATS] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13};
  static_assert(NUM_STATS == 14, "update the identity map");
  const StateView local{acc, 1, identity};
  add_row_sums(local, 0, c, [](float* p, float v) { *p += v; });
}

template <typename stat_t>
__device__ __forceinline__ RowContribution read_row(const stat_t* __restrict__ st, int64_t R, int64_t r) {
  return row_contribution(st[ROW_LOG_SUM * R + r], st[ROW_TARGET_LOGIT * R + r], st[ROW_MAX_OTHER * R + r],
                          st[ROW_CORRECT * R + r]);
}

template <typename stat_t>
__global__ void __launch_bounds__(kThreads)
    track_sums_kernel(float* __restrict__ state, int64_t N, const StatRows rows, const stat_t* __restrict__ st,
                      const int64_t* __restrict__ target, const int64_t* __restrict__ ids, int64_t R,
                      int64_t rows_per_id, int64_t ignore_index, const int* __restrict__ flag,
                      int64_t* __restrict__ last_row) {
  if (*flag) return;
  const StateView view{state, N, rows.rows};
  const unsigned lane = threadIdx.x % 32;
  // The loop bound is uniform over each warp: all lanes take part in every shuffle.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads; base < R;
       base += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = base + threadIdx.x;
    const bool in = r < R;
    const int64_t entry = in ? r / rows_per_id : -1;  // index into ids; nondecreasing over lanes
    float acc[NUM_STATS];
#pragma unroll
    for (int s = 0; s < NUM_STATS; ++s) acc[s] = 0.0f;
    bool finite = false;
    if (in && target[r] != ignore_index) {
      const RowContribution c = read_row(st, R, r);
      if (c.finite) {
        row_sums_local(c, acc);
        finite = true;
      } else {
        acc[STAT_NONFINITE] = 1.0f;
      }
    }
    // Segments: runs of lanes with the same entry (contiguous, since entry is monotonic).
    const int64_t prev_entry = __shfl_up_sync(0xffffffffu, entry, 1);
    const bool seg_head = lane == 0 || prev_entry != entry;
    const unsigned heads = __ballot_sync(0xffffffffu, seg_head);
    const int seg_start = 31 - __clz(heads & (0xffffffffu >> (31 - lane)));
    const int64_t next_entry = __shfl_down_sync(0xffffffffu, entry, 1);
    const bool seg_end = lane == 31 || next_entry != entry;
    float any = (finite || acc[STAT_NONFINITE] > 0.0f) ? 1.0f : 0.0f;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const float up = __shfl_up_sync(0xffffffffu, any, offset);
      if (static_cast<int>(lane) - offset >= seg_start) any += up;
#pragma unroll
      for (int k = 0; k < kNumAdditive; ++k) {
        const int s = additive_stat(k);
        if (rows.rows[s] < 0) continue;  // uniform: the statistic is not kept
        const float v = __shfl_up_sync(0xffffffffu, acc[s], offset);
        if (static_cast<int>(lane) - offset >= seg_start) acc[s] += v;
      }
    }
    if (last_row) {
      // Largest finite row of the segment; rows are increasing over lanes.
      const unsigned finite_mask = __ballot_sync(0xffffffffu, finite);
      const unsigned seg_mask = finite_mask & (0xffffffffu >> (31 - lane)) & (0xffffffffu << seg_start);
      if (seg_end && seg_mask) {
        const int64_t last = base + (31 - __clz(seg_mask)) + (threadIdx.x - lane);
        atomicMax(reinterpret_cast<long long*>(last_row + entry), static_cast<long long>(last));
      }
    }
    if (seg_end && in && any > 0.0f) {
      const int64_t id = ids[entry];
#pragma unroll
      for (int k = 0; k < kNumAdditive; ++k) {
        const int s = additive_stat(k);
        float* p = view.row(s);
        if (p && acc[s] != 0.0f) atomicAdd(p + id, acc[s]);
      }
    }
  }
}

// keys[e] = ids[e] for entries with a finite valid row (sentinel N otherwise).
__global__ void __launch_bounds__(kThreads)
    track_keys_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ last_row, int64_t n_ids, int64_t N,
                      const int* __restrict__ flag, int64_t* __restrict__ keys) {
  const bool skip = *flag != 0;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n_ids;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    keys[e] = (!skip && last_row[e] >= 0) ? ids[e] : N;
  }
}

// One thread per sample: the last entry of each run of equal (sorted) ids
// holds the sample's largest row (the sort is stable and rows grow with entries).
template <typename stat_t>
__global__ void __launch_bounds__(kThreads)
    track_state_kernel(float* __restrict__ state, int64_t N, const StatRows rows, const stat_t* __restrict__ st,
                       int64_t R, const int64_t* __restrict__ keys, const int64_t* __restrict__ last_rows,
                       int64_t n_ids, const int64_t* __restrict__ counters) {
  const StateView view{state, N, rows.rows};
  const float epoch = static_cast<float>(counters[COUNTER_EPOCH]);
  const float call = static_cast<float>(counters[COUNTER_CALLS]);  // already counted by the validation kernel
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n_ids;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t id = keys[i];
    if (id >= N || (i + 1 < n_ids && keys[i + 1] == id)) continue;
    apply_row_state(view, id, read_row(st, R, last_rows[i]), epoch, call);
  }
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

int bit_width(int64_t n) {
  int b = 0;
  while (b < 63 && (int64_t{1} << b) <= n) ++b;
  return b;
}

void track_cuda(at::Tensor& state, at::Tensor& counters, const at::Tensor& row_stats, const at::Tensor& target,
                const at::Tensor& sample_ids, int64_t ignore_index, int64_t num_classes, c10::IntArrayRef stat_rows) {
  check_track_args(state, counters, row_stats, target, sample_ids, stat_rows);
  // before any launch: a batch that cannot run must leave the tracker unchanged
  TORCH_CHECK(sample_ids.numel() <= std::numeric_limits<int>::max(), "memfast tracker: too many sample ids in one batch");
  const c10::cuda::CUDAGuard device_guard(state.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t R = target.numel();
  const int64_t N = state.size(1);
  const int64_t n_ids = sample_ids.numel();
  const int64_t rows_per_id = n_ids > 0 ? R / n_ids : 1;
  // A 4-byte memset, not at::zeros (a fill kernel with TensorIterator's host-side setup).
  at::Tensor flag = at::empty({1}, state.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(flag.mutable_data_ptr<int>(), 0, sizeof(int), stream));
  const int64_t* ids = sample_ids.const_data_ptr<int64_t>();
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  int64_t* cnt = counters.mutable_data_ptr<int64_t>();
  track_validate_kernel<<<grid_for(R > n_ids ? R : n_ids), kThreads, 0, stream>>>(
      ids, n_ids, rows_per_id, tgt, R, N, num_classes, ignore_index, cnt, flag.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (R == 0 || N == 0) return;  // N == 0: every id is out of range, already counted

  StatRows rows;
  for (int s = 0; s < NUM_STATS; ++s) rows.rows[s] = stat_rows[s];
  const bool keeps_state = rows.rows[STAT_LAST_LOSS] >= 0 || rows.rows[STAT_LAST_MAXPROB] >= 0 ||
                           rows.rows[STAT_LAST_CORRECT] >= 0 || rows.rows[STAT_LAST_UPDATE] >= 0;
  at::Tensor last_row;
  if (keeps_state) last_row = at::full({n_ids}, -1, sample_ids.options());
  float* st_ptr = state.mutable_data_ptr<float>();
  const int* flag_ptr = flag.const_data_ptr<int>();

  AT_DISPATCH_FLOATING_TYPES(row_stats.scalar_type(), "memfast_track_cuda", [&] {
    const scalar_t* stats = row_stats.const_data_ptr<scalar_t>();
    track_sums_kernel<scalar_t><<<grid_for(R), kThreads, 0, stream>>>(
        st_ptr, N, rows, stats, tgt, ids, R, rows_per_id, ignore_index, flag_ptr,
        keeps_state ? last_row.mutable_data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!keeps_state) return;

    at::Tensor keys = at::empty({n_ids}, sample_ids.options());
    at::Tensor keys_sorted = at::empty({n_ids}, sample_ids.options());
    at::Tensor rows_sorted = at::empty({n_ids}, sample_ids.options());
    track_keys_kernel<<<grid_for(n_ids), kThreads, 0, stream>>>(ids, last_row.const_data_ptr<int64_t>(), n_ids, N,
                                                               flag_ptr, keys.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int end_bit = bit_width(N);  // keys are in [0, N]
    size_t temp_bytes = 0;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        nullptr, temp_bytes, keys.const_data_ptr<int64_t>(), keys_sorted.mutable_data_ptr<int64_t>(),
        last_row.const_data_ptr<int64_t>(), rows_sorted.mutable_data_ptr<int64_t>(), static_cast<int>(n_ids), 0,
        end_bit, stream));
    at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes) + 1}, state.options().dtype(at::kByte));
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        temp.mutable_data_ptr(), temp_bytes, keys.const_data_ptr<int64_t>(), keys_sorted.mutable_data_ptr<int64_t>(),
        last_row.const_data_ptr<int64_t>(), rows_sorted.mutable_data_ptr<int64_t>(), static_cast<int>(n_ids), 0,
        end_bit, stream));
    track_state_kernel<scalar_t><<<grid_for(n_ids), kThreads, 0, stream>>>(
        st_ptr, N, rows, stats, R, keys_sorted.const_data_ptr<int64_t>(), rows_sorted.const_data_ptr<int64_t>(), n_ids,
        counters.const_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memfast, CUDA, m) { m.impl("track_", &track_cuda); }

}  // namespace memfast
