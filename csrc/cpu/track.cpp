// CPU kernel of memfast::track_: scatter per-row statistics into a tracker.
// Rows are visited last to first so that each sample's per-sample state comes
// from its last finite row of the batch (the documented rule for repeated ids).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <unordered_set>

#include "../common/ce_math.h"
#include "../common/checks.h"

namespace memfast {
namespace {

void track_cpu(at::Tensor& state, at::Tensor& counters, const at::Tensor& row_stats, const at::Tensor& target,
               const at::Tensor& sample_ids, int64_t ignore_index, int64_t num_classes, c10::IntArrayRef stat_rows) {
  check_track_args(state, counters, row_stats, target, sample_ids, stat_rows);
  const int64_t R = target.numel();
  const int64_t N = state.size(1);
  const int64_t* ids = sample_ids.const_data_ptr<int64_t>();
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  const int64_t n_ids = sample_ids.numel();
  // Validate everything before writing anything: a bad batch leaves the tracker unchanged.
  for (int64_t i = 0; i < n_ids; ++i) {
    TORCH_CHECK_INDEX(ids[i] >= 0 && ids[i] < N, "memfast tracker: sample_ids[", i, "] = ", ids[i],
                      " is out of range for a tracker of ", N, " samples");
  }
  check_targets_host(tgt, R, num_classes, ignore_index);
  int64_t* cnt = counters.mutable_data_ptr<int64_t>();
  cnt[COUNTER_CALLS] += 1;
  if (R == 0) return;
  const int64_t rows_per_id = R / n_ids;
  const float epoch = static_cast<float>(cnt[COUNTER_EPOCH]);
  const float call = static_cast<float>(cnt[COUNTER_CALLS]);
  const StateView view{state.mutable_data_ptr<float>(), N, stat_rows.data()};
  const bool has_state = view.row(STAT_LAST_LOSS) || view.row(STAT_LAST_MAXPROB) || view.row(STAT_LAST_CORRECT) ||
                         view.row(STAT_LAST_UPDATE);
  float* nonfinite = view.row(STAT_NONFINITE);
  std::unordered_set<int64_t> seen;
  if (has_state) seen.reserve(static_cast<size_t>(n_ids));
  // The statistics' arrays, for prefetching: a batch's ids land at random places
  // of arrays that outgrow the cache, and the loop body is too short for the CPU
  // to overlap those misses by itself (bench/cpu_breakdown.py, 2 threads: tracking
  // 4096 rows added 0.18-0.34 ms to a step before, 0.19-0.24 ms after).
  float* arrays[NUM_STATS];
  int num_arrays = 0;
  for (int k = 0; k < NUM_STATS; ++k) {
    if (float* p = view.row(k)) arrays[num_arrays++] = p;
  }
  constexpr int64_t kAhead = 16;
  AT_DISPATCH_FLOATING_TYPES(row_stats.scalar_type(), "memfast_track", [&] {
    const scalar_t* st = row_stats.const_data_ptr<scalar_t>();
    auto add = [](float* p, float v) { *p += v; };
    for (int64_t r = R - 1; r >= 0; --r) {
      if (r >= kAhead) {
        const int64_t ahead = ids[(r - kAhead) / rows_per_id];
        for (int k = 0; k < num_arrays; ++k) __builtin_prefetch(arrays[k] + ahead, 1, 3);
      }
      if (tgt[r] == ignore_index) continue;
      const int64_t id = ids[r / rows_per_id];
      const RowContribution c = row_contribution(st[ROW_LOG_SUM * R + r], st[ROW_TARGET_LOGIT * R + r],
                                                 st[ROW_MAX_OTHER * R + r], st[ROW_CORRECT * R + r]);
      if (!c.finite) {
        if (nonfinite) nonfinite[id] += 1.0f;
        continue;
      }
      add_row_sums(view, id, c, add);
      if (has_state && seen.insert(id).second) apply_row_state(view, id, c, epoch, call);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memfast, CPU, m) { m.impl("track_", &track_cpu); }

}  // namespace memfast
