// CUDA kernels of the input-curvature ops. Probe signs are regenerated from
// Philox (csrc/common/philox.h) where they are used, never stored. A warp
// covers one 128-element block of a sample: every lane computes that block's
// Philox words (4 per lane-element group) and lane l handles elements
// l, l + 32, l + 64, l + 96, so loads and stores are coalesced. No host
// synchronisation; launches on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/curvature_checks.h"
#include "../common/philox.h"

namespace memfast {
namespace {

constexpr int PERTURB_THREADS = 256;
constexpr int REDUCE_WARPS = 4;
constexpr int REDUCE_THREADS = REDUCE_WARPS * 32;

// Enough blocks to fill the device; loops stride over the rest. (Reads an
// attribute, no synchronisation; avoids ATen/cuda/CUDAContext.h, which needs
// the cuSPARSE/cuBLAS headers.)
int64_t max_blocks() {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return static_cast<int64_t>(sms) * 32;
}

template <typename scalar_t>
__global__ void perturb_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t B, int64_t D,
                               int64_t blocks_per_row, int64_t total_warps, int64_t seed, int64_t probe_offset,
                               at::opmath_type<scalar_t> step) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t stride = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; w < total_warps;
       w += stride) {
    const int64_t r = w / blocks_per_row, block = w % blocks_per_row;
    const int64_t k = r / B, b = r % B;
    const Philox4 signs = probe_signs(seed, b, probe_offset + k, block);
    const int64_t e0 = block * PROBE_BLOCK;
    const scalar_t* src = x + b * D + e0;
    scalar_t* dst = out + r * D + e0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t e = i * 32 + lane;
      if (e0 + e < D) {
        const bool plus = (signs.w[i] >> lane) & 1u;
        dst[e] = static_cast<scalar_t>(static_cast<opmath_t>(src[e]) + (plus ? step : -step));
      }
    }
  }
}

at::Tensor curvature_perturb_cuda(const at::Tensor& x_in, int64_t seed, int64_t probe_offset, int64_t num_probes,
                                  double h) {
  check_perturb_args(x_in, probe_offset, num_probes);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  std::vector<int64_t> shape = x.sizes().vec();
  const int64_t B = shape[0];
  shape[0] = num_probes * B;
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t D = curvature_sample_numel(x);
  const int64_t rows = num_probes * B;
  if (rows == 0 || D == 0) return out;
  const int64_t blocks_per_row = (D + PROBE_BLOCK - 1) / PROBE_BLOCK;
  const int64_t total_warps = rows * blocks_per_row;
  const int64_t warps_per_block = PERTURB_THREADS / 32;
  const int64_t grid = std::min((total_warps + warps_per_block - 1) / warps_per_block, max_blocks());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "memfast_curvature_perturb_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    perturb_kernel<scalar_t><<<static_cast<unsigned>(grid), PERTURB_THREADS, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), B, D, blocks_per_row, total_warps, seed,
        probe_offset, static_cast<opmath_t>(h));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// One thread block per (probe, sample) row: ||d||, ||d||^2 and v . d with
// d = g_k - g0, written to partial[3, rows] (fixed reduction order, so the
// result is deterministic). Sums in double, as the CPU does: v . d cancels, and
// fp32 sums over ~1e5 elements lose ~1e-3 of it.
template <typename scalar_t>
__global__ void reduce_rows_kernel(const scalar_t* __restrict__ grads, const scalar_t* __restrict__ g0,
                                   double* __restrict__ partial, int64_t B, int64_t D,
                                   int64_t rows, int64_t seed, int64_t probe_offset) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ double shared_sq[REDUCE_WARPS], shared_dot[REDUCE_WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t blocks_per_row = (D + PROBE_BLOCK - 1) / PROBE_BLOCK;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t k = r / B, b = r % B;
    const scalar_t* g = grads + r * D;
    const scalar_t* g0b = g0 + b * D;
    double sq = 0, dot = 0;
    for (int64_t block = warp; block < blocks_per_row; block += REDUCE_WARPS) {
      const Philox4 signs = probe_signs(seed, b, probe_offset + k, block);
      const int64_t e0 = block * PROBE_BLOCK;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t e = e0 + i * 32 + lane;
        if (e < D) {
          // d rounded in opmath first, exactly as the CPU does, then widened
          const double d = static_cast<double>(static_cast<opmath_t>(g[e]) - static_cast<opmath_t>(g0b[e]));
          sq += d * d;
          dot += ((signs.w[i] >> lane) & 1u) ? d : -d;
        }
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      sq += __shfl_down_sync(0xffffffffu, sq, offset);
      dot += __shfl_down_sync(0xffffffffu, dot, offset);
    }
    if (lane == 0) {
      shared_sq[warp] = sq;
      shared_dot[warp] = dot;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double total_sq = 0, total_dot = 0;
#pragma unroll
      for (int w = 0; w < REDUCE_WARPS; ++w) {
        total_sq += shared_sq[w];
        total_dot += shared_dot[w];
      }
      partial[r] = sqrt(total_sq);
      partial[rows + r] = total_sq;
      partial[2 * rows + r] = total_dot;
    }
    __syncthreads();  // shared_* is reused by the next row
  }
}

// out[c, b] = sum over probes k (in order) of partial[c, k * B + b].
template <typename acc_t>
__global__ void sum_probes_kernel(const acc_t* __restrict__ partial, float* __restrict__ out, int64_t B, int64_t P) {
  const int64_t rows = P * B;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < 3 * B;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i / B, b = i % B;
    acc_t s = 0;
    for (int64_t k = 0; k < P; ++k) s += partial[c * rows + k * B + b];
    out[i] = static_cast<float>(s);
  }
}

at::Tensor curvature_reduce_cuda(const at::Tensor& grads_in, const at::Tensor& g0_in, int64_t seed,
                                 int64_t probe_offset) {
  const int64_t P = check_reduce_args(grads_in, g0_in, probe_offset);
  const c10::cuda::CUDAGuard guard(g0_in.device());
  const at::Tensor grads = grads_in.contiguous();
  const at::Tensor g0 = g0_in.contiguous();
  const int64_t B = g0.size(0);
  const int64_t D = curvature_sample_numel(g0);
  at::Tensor out = at::empty({3, B}, g0.options().dtype(at::kFloat));
  if (B == 0) return out;
  if (P == 0) return out.zero_();
  const int64_t rows = P * B;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g0.scalar_type(), "memfast_curvature_reduce_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({3, rows}, g0.options().dtype(at::kDouble));
    const int64_t grid = std::min(rows, max_blocks() * 4);
    reduce_rows_kernel<scalar_t><<<static_cast<unsigned>(grid), REDUCE_THREADS, 0, stream>>>(
        grads.const_data_ptr<scalar_t>(), g0.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<double>(), B, D,
        rows, seed, probe_offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t sum_grid = std::min((3 * B + 255) / 256, max_blocks());
    sum_probes_kernel<double><<<static_cast<unsigned>(sum_grid), 256, 0, stream>>>(
        partial.const_data_ptr<double>(), out.mutable_data_ptr<float>(), B, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memfast, CUDA, m) {
  m.impl("curvature_perturb", &curvature_perturb_cuda);
  m.impl("curvature_reduce", &curvature_reduce_cuda);
}

}  // namespace memfast
