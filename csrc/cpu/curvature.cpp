// CPU kernels of the input-curvature ops: Rademacher perturbation with probes
// regenerated from Philox (never stored) and the per-sample reduction of the
// finite-difference gradient changes.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../common/curvature_checks.h"
#include "../common/philox.h"

namespace memfast {
namespace {

// Elements per parallel task, so that small inputs do not pay for threading.
constexpr int64_t GRAIN_ELEMENTS = 32768;

at::Tensor curvature_perturb_cpu(const at::Tensor& x_in, int64_t seed, int64_t probe_offset, int64_t num_probes,
                                 double h) {
  check_perturb_args(x_in, probe_offset, num_probes);
  const at::Tensor x = x_in.contiguous();
  std::vector<int64_t> shape = x.sizes().vec();
  const int64_t B = shape[0];
  shape[0] = num_probes * B;
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t D = curvature_sample_numel(x);
  const int64_t rows = num_probes * B;
  if (rows == 0 || D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "memfast_curvature_perturb", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t step = static_cast<opmath_t>(h);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, GRAIN_ELEMENTS / D);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t k = r / B, b = r % B;
        const scalar_t* src = xp + b * D;
        scalar_t* dst = op + r * D;
        for (int64_t e0 = 0, block = 0; e0 < D; e0 += PROBE_BLOCK, ++block) {
          const Philox4 signs = probe_signs(seed, b, probe_offset + k, block);
          const int64_t n = std::min(PROBE_BLOCK, D - e0);
          for (int64_t i = 0; i < n; ++i) {
            const bool plus = (signs.w[i >> 5] >> (i & 31)) & 1u;
            dst[e0 + i] = static_cast<scalar_t>(static_cast<opmath_t>(src[e0 + i]) + (plus ? step : -step));
          }
        }
      }
    });
  });
  return out;
}

// Sums over one probe's row: ||d||^2 and v . d with d = g_k - g0 (d formed in
// the inputs' op-math type, like the reference; sums in double).
template <typename scalar_t>
void reduce_row(const scalar_t* g, const scalar_t* g0, int64_t D, int64_t seed, int64_t sample, int64_t probe,
                double& sq, double& dot) {
  using opmath_t = at::opmath_type<scalar_t>;
  // Four interleaved partial sums in a fixed order: deterministic, and short
  // dependency chains.
  double s[4] = {0, 0, 0, 0}, t[4] = {0, 0, 0, 0};
  for (int64_t e0 = 0, block = 0; e0 < D; e0 += PROBE_BLOCK, ++block) {
    const Philox4 signs = probe_signs(seed, sample, probe, block);
    const int64_t n = std::min(PROBE_BLOCK, D - e0);
    for (int64_t i = 0; i < n; ++i) {
      const double d = static_cast<double>(static_cast<opmath_t>(g[e0 + i]) - static_cast<opmath_t>(g0[e0 + i]));
      const bool plus = (signs.w[i >> 5] >> (i & 31)) & 1u;
      s[i & 3] += d * d;
      t[i & 3] += plus ? d : -d;
    }
  }
  sq = (s[0] + s[1]) + (s[2] + s[3]);
  dot = (t[0] + t[1]) + (t[2] + t[3]);
}

at::Tensor curvature_reduce_cpu(const at::Tensor& grads_in, const at::Tensor& g0_in, int64_t seed,
                                int64_t probe_offset) {
  const int64_t P = check_reduce_args(grads_in, g0_in, probe_offset);
  const at::Tensor grads = grads_in.contiguous();
  const at::Tensor g0 = g0_in.contiguous();
  const int64_t B = g0.size(0);
  const int64_t D = curvature_sample_numel(g0);
  at::Tensor out = at::empty({3, B}, g0.options().dtype(at::kFloat));
  if (B == 0) return out;
  float* o = out.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g0.scalar_type(), "memfast_curvature_reduce", [&] {
    const scalar_t* gp = grads.const_data_ptr<scalar_t>();
    const scalar_t* g0p = g0.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, GRAIN_ELEMENTS / std::max<int64_t>(1, P * D));
    // One task per sample: each column of the output has one writer, and the
    // sum over probes runs in probe order.
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        double norm_sum = 0, sq_sum = 0, dot_sum = 0;
        for (int64_t k = 0; k < P; ++k) {
          double sq, dot;
          reduce_row(gp + (k * B + b) * D, g0p + b * D, D, seed, b, probe_offset + k, sq, dot);
          norm_sum += std::sqrt(sq);
          sq_sum += sq;
          dot_sum += dot;
        }
        o[b] = static_cast<float>(norm_sum);
        o[B + b] = static_cast<float>(sq_sum);
        o[2 * B + b] = static_cast<float>(dot_sum);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memfast, CPU, m) {
  m.impl("curvature_perturb", &curvature_perturb_cpu);
  m.impl("curvature_reduce", &curvature_reduce_cpu);
}

}  // namespace memfast
