// Small helpers shared by the CUDA kernels: 16-byte vector loads and stores of
// logits-typed data, warp / thread-group reductions, and the host's kernel choice.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace memfast {
namespace cuda {

// Whether the environment variable `name` is set to `value` (a host check of a kernel choice).
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// Elements of `scalar_t` in one 16-byte access.
template <typename scalar_t>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

// Load VEC = 16 / sizeof(scalar_t) elements from a 16-byte aligned address
// and widen them to acc_t.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* p, acc_t* out) {
  constexpr int VEC = vec_width<scalar_t>();
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const scalar_t* s = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = static_cast<acc_t>(s[j]);
}

// Round VEC acc_t values to scalar_t (once each) and store them as one 16-byte access.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* p, const acc_t* in) {
  constexpr int VEC = vec_width<scalar_t>();
  uint4 raw;
  scalar_t* s = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
  for (int j = 0; j < VEC; ++j) s[j] = static_cast<scalar_t>(in[j]);
  *reinterpret_cast<uint4*>(p) = raw;
}

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return b > a ? b : a;  // drops NaN like the CPU kernel's lane maxima
  }
};

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

// Reduce K values over an aligned group of G <= 32 lanes of one warp (the
// group's lanes only: other groups of the warp may have left). Every lane of
// the group gets the result.
template <int G, int K, typename T, typename Op>
__device__ __forceinline__ void group_reduce(T (&v)[K], Op op) {
  static_assert(G >= 1 && G <= 32 && (G & (G - 1)) == 0, "group size must be a power of two <= 32");
  const unsigned lane = threadIdx.x & 31u;
  const unsigned mask = G == 32 ? 0xffffffffu : (((1u << G) - 1u) << (lane & ~static_cast<unsigned>(G - 1)));
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = op(v[k], __shfl_xor_sync(mask, v[k], offset, G));
  }
}

// Reduce K values over the whole block (NT threads, a multiple of 32). `smem`
// holds K * NT / 32 values and must not be reused by the caller for another
// reduction before a later __syncthreads (use one buffer per stage). Every
// thread gets the result, combined in the same order everywhere.
template <int NT, int K, typename T, typename Op>
__device__ __forceinline__ void block_reduce(T (&v)[K], Op op, T* smem) {
  constexpr int NW = NT / 32;
  group_reduce<32, K>(v, op);
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[k * NW + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    T r = smem[k * NW];
#pragma unroll
    for (int w = 1; w < NW; ++w) r = op(r, smem[k * NW + w]);
    v[k] = r;
  }
}

struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return b < a ? b : a;
  }
};

// The mean's or the sum's loss: the row losses summed (in a fixed order: deterministic), divided by
// the denominator, a device scalar (den) or else a host value (host_den: 1 for the sum). One launch
// where at::sum + at::div took two, each with its own host-side setup: at small shapes a step is
// host time.
template <typename acc_t>
__global__ void __launch_bounds__(256) loss_total_kernel(const acc_t* loss_rows, int64_t R, const acc_t* den,
                                                         acc_t host_den, acc_t* out) {
  __shared__ double smem[256 / 32];
  double v[1] = {0.0};  // double, as the CPU's total
  for (int64_t r = threadIdx.x; r < R; r += 256) v[0] += loss_rows[r];
  block_reduce<256, 1>(v, SumOp(), smem);
  if (threadIdx.x == 0) *out = static_cast<acc_t>(v[0]) / (den ? *den : host_den);
}

}  // namespace cuda
}  // namespace memfast
