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

// dst[j] = src[j] + (+-step) for the N sign bits of `word`. Written so that
// the compiler vectorises it (a variable shift and a multiply by +-1, which
// is exact).
template <typename scalar_t, int N>
inline void perturb_word(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, uint32_t word,
                         at::opmath_type<scalar_t> step) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int j = 0; j < N; ++j) {
    const opmath_t sign = static_cast<opmath_t>(static_cast<int32_t>((word >> j) & 1u) * 2 - 1);
    dst[j] = static_cast<scalar_t>(static_cast<opmath_t>(src[j]) + sign * step);
  }
}

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
          if (n == PROBE_BLOCK) {
            for (int word = 0; word < 4; ++word) {
              perturb_word<scalar_t, 32>(src + e0 + 32 * word, dst + e0 + 32 * word, signs.w[word], step);
            }
          } else {
            for (int64_t i = 0; i < n; ++i) {
              const bool plus = (signs.w[i >> 5] >> (i & 31)) & 1u;
              dst[e0 + i] = static_cast<scalar_t>(static_cast<opmath_t>(src[e0 + i]) + (plus ? step : -step));
            }
          }
        }
      }
    });
  });
  return out;
}

// Accumulates d * d and (+-1) * d over the N sign bits of `word`, with
// d = g - g0 formed in the op-math type (as the reference does) and sums in
// double, in LANES interleaved partial sums (a fixed order: deterministic;
// vectorisable).
constexpr int LANES = 8;

template <typename scalar_t, int N>
inline void reduce_word(const scalar_t* __restrict__ g, const scalar_t* __restrict__ g0, uint32_t word,
                        double* __restrict__ sq, double* __restrict__ dot) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int j = 0; j < N; ++j) {
    const double d = static_cast<double>(static_cast<opmath_t>(g[j]) - static_cast<opmath_t>(g0[j]));
    const double sign = static_cast<double>(static_cast<int32_t>((word >> j) & 1u) * 2 - 1);
    sq[j % LANES] += d * d;
    dot[j % LANES] += sign * d;
  }
}

// ||d||^2 and v . d over one probe's row.
template <typename scalar_t>
void reduce_row(const scalar_t* g, const scalar_t* g0, int64_t D, int64_t seed, int64_t sample, int64_t probe,
                double& sq_out, double& dot_out) {
  double sq[LANES] = {}, dot[LANES] = {};
  for (int64_t e0 = 0, block = 0; e0 < D; e0 += PROBE_BLOCK, ++block) {
    const Philox4 signs = probe_signs(seed, sample, probe, block);
    const int64_t n = std::min(PROBE_BLOCK, D - e0);
    if (n == PROBE_BLOCK) {
      for (int word = 0; word < 4; ++word) {
        reduce_word<scalar_t, 32>(g + e0 + 32 * word, g0 + e0 + 32 * word, signs.w[word], sq, dot);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        reduce_word<scalar_t, 1>(g + e0 + i, g0 + e0 + i, signs.w[i >> 5] >> (i & 31), sq + (i % LANES),
                                 dot + (i % LANES));
      }
    }
  }
  sq_out = ((sq[0] + sq[1]) + (sq[2] + sq[3])) + ((sq[4] + sq[5]) + (sq[6] + sq[7]));
  dot_out = ((dot[0] + dot[1]) + (dot[2] + dot[3])) + ((dot[4] + dot[5]) + (dot[6] + dot[7]));
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
