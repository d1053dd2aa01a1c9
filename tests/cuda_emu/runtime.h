// A CPU stand-in for the CUDA runtime and device built-ins that csrc/cuda/*.cu use, so that
// those sources, host code and kernels alike, run unchanged on a machine without a GPU
// (tests/cuda_emu/emulator.py compiles them against this header; tests/test_cuda_emulated.py
// compares them with the CPU kernels).
//
// Every thread of a block (of a cluster) is a fiber on one OS thread. A fiber runs until it
// reaches a synchronisation point (__syncthreads, a warp shuffle or ballot, cluster.sync) and
// waits there until every thread the point names has arrived; the fibers are resumed in a
// shuffled order each round, so code that reads what another thread writes without a barrier
// between gets different interleavings. What the hardware leaves undefined or faults on is
// a fault here (a Python RuntimeError naming the kernel): a shuffle whose mask names a lane
// that has left, lanes of one warp in different shuffles (a deadlock), __trap(), shared memory
// over 48 KiB, more threads than __launch_bounds__, a grid of zero blocks, distributed shared
// memory of a block that has left. Not modelled: timing, registers, the memory model
// (each block runs to completion before the next starts), fast-math intrinsics (they are the
// exact functions here).
#pragma once

#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// The kernels' registrations go to the CPU key of the memfast_emu library (emulator.py renames the
// namespace with -Dmemfast=memfast_emu, and declares its schemas).
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ns, CPU, m, C10_UID)

// ---- qualifiers -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define MEMFAST_EMU_ARCH 900  // emulator.py writes it for __CUDA_ARCH__ in the .cu sources

using std::isinf;
using std::isnan;

// ---- vector types -------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

namespace memfast_emu_rt {

[[noreturn]] void fault(const std::string& what);  // in a kernel: ends the launch with a device fault
void sync_block();
void sync_cluster();
unsigned cluster_rank();
unsigned cluster_size();
void* map_shared(void* p, unsigned rank);
void* shared_slot(const void* key, size_t bytes, size_t align);
uint64_t exchange(unsigned mask, uint64_t bits, int kind, int arg, int width);  // kind: 0 xor, 1 up, 2 down
unsigned ballot(unsigned mask, bool pred);
void check_launch_bounds(long max_threads, long min_blocks = 0);

template <typename T>
T& shared(const void* key) {
  return *static_cast<T*>(shared_slot(key, sizeof(T), alignof(T)));
}

template <typename T>
T shuffle(unsigned mask, T v, int kind, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = exchange(mask, bits, kind, arg, width);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

// A launch: grid, block, cluster size, and the body every thread runs. Returns "" or a fault.
std::string run_grid(const char* name, dim3 grid, dim3 block, unsigned cluster, const std::function<void()>& body);

}  // namespace memfast_emu_rt

// The built-in variables: the scheduler sets them before it resumes a fiber (the kernels read
// them after every synchronisation call again: those calls are opaque to the compiler).
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

// ---- device built-ins ------------------------------------------------------------------------
inline void __syncthreads() { memfast_emu_rt::sync_block(); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return memfast_emu_rt::shuffle(mask, v, 0, lane_mask, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return memfast_emu_rt::shuffle(mask, v, 1, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return memfast_emu_rt::shuffle(mask, v, 2, static_cast<int>(delta), width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return memfast_emu_rt::ballot(mask, pred != 0); }
[[noreturn]] inline void __trap() { memfast_emu_rt::fault("__trap()"); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline float __fadd_rn(float a, float b) { return a + b; }  // built with -ffp-contract=off
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __expf(float x) { return std::exp(x); }

// One OS thread runs every fiber, and a fiber is never interrupted between two
// synchronisation points: a read-modify-write is atomic as written.
#define MEMFAST_EMU_ATOMIC(name, T, expr) \
  inline T name(T* p, T v) {              \
    const T old = *p;                     \
    *p = (expr);                          \
    return old;                           \
  }
MEMFAST_EMU_ATOMIC(atomicAdd, int, old + v)
MEMFAST_EMU_ATOMIC(atomicAdd, unsigned, old + v)
MEMFAST_EMU_ATOMIC(atomicAdd, unsigned long long, old + v)
MEMFAST_EMU_ATOMIC(atomicAdd, float, old + v)
MEMFAST_EMU_ATOMIC(atomicAdd, double, old + v)
MEMFAST_EMU_ATOMIC(atomicMax, int, v > old ? v : old)
MEMFAST_EMU_ATOMIC(atomicMax, unsigned, v > old ? v : old)
MEMFAST_EMU_ATOMIC(atomicMax, long long, v > old ? v : old)
MEMFAST_EMU_ATOMIC(atomicMax, unsigned long long, v > old ? v : old)
MEMFAST_EMU_ATOMIC(atomicExch, int, v)
MEMFAST_EMU_ATOMIC(atomicExch, unsigned, v)
MEMFAST_EMU_ATOMIC(atomicExch, unsigned long long, v)
MEMFAST_EMU_ATOMIC(atomicExch, float, v)
#undef MEMFAST_EMU_ATOMIC

// ---- cooperative groups (clusters) -----------------------------------------------------------
namespace cooperative_groups {
struct cluster_group {
  void sync() const { memfast_emu_rt::sync_cluster(); }
  unsigned block_rank() const { return memfast_emu_rt::cluster_rank(); }
  unsigned num_blocks() const { return memfast_emu_rt::cluster_size(); }
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return static_cast<T*>(memfast_emu_rt::map_shared(const_cast<void*>(static_cast<const void*>(p)), rank));
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

// ---- runtime API ---------------------------------------------------------------------------
using cudaStream_t = struct CUstream_st*;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
struct cudaFuncAttributes {
  int maxThreadsPerBlock = 1024;
  int ptxVersion = 90;
  int binaryVersion = 90;
};
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  union {
    struct {
      unsigned x, y, z;
    } clusterDim;
    char pad[64];
  } val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

namespace memfast_emu_rt {
void set_last_error(cudaError_t e, const std::string& what);
cudaError_t take_last_error();
const char* error_string(cudaError_t e);
int device_attribute(cudaDeviceAttr attr, bool* known);

// kernel<<<grid, block, smem, stream>>>(args...) becomes launch("kernel", LaunchConfig{...}, kernel, args...):
// the arguments are converted to the kernel's parameter types once, as a launch copies them.
struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};

template <typename... P, typename... A>
cudaError_t launch_in_cluster(const char* name, dim3 grid, dim3 block, size_t smem, unsigned cluster,
                              void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  if (smem != 0) {
    set_last_error(cudaErrorInvalidValue, std::string(name) + ": dynamic shared memory is not emulated");
    return cudaErrorInvalidValue;
  }
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const std::string fault = run_grid(name, grid, block, cluster, [&] { std::apply(kernel, params); });
  if (!fault.empty()) {
    // A device fault: the launch is where it is reported (a GPU reports it at a later
    // synchronisation, and then every call after it fails; here the next launch starts afresh).
    TORCH_CHECK(false, "memfast CUDA emulator: ", fault);
  }
  return cudaSuccess;
}

template <typename... P, typename... A>
void launch(const char* name, const LaunchConfig& cfg, void (*kernel)(P...), A&&... args) {
  launch_in_cluster(name, cfg.grid, cfg.block, cfg.smem, 1, kernel, std::forward<A>(args)...);
}
}  // namespace memfast_emu_rt

inline cudaError_t cudaGetLastError() { return memfast_emu_rt::take_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return memfast_emu_rt::error_string(e); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  bool known = false;
  *value = memfast_emu_rt::device_attribute(attr, &known);
  return known && device == 0 ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F*) {
  *attr = cudaFuncAttributes{};
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(P...), A&&... args) {
  unsigned cluster = 1;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      const auto& d = config->attrs[i].val.clusterDim;
      if (d.y != 1 || d.z != 1) return cudaErrorInvalidValue;  // not emulated (nor used)
      cluster = d.x;
    }
  }
  return memfast_emu_rt::launch_in_cluster("cudaLaunchKernelEx", config->gridDim, config->blockDim,
                                           config->dynamicSmemBytes, cluster, kernel, std::forward<A>(args)...);
}

// ---- c10/cuda ---------------------------------------------------------------------------------
namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
inline int current_device() { return 0; }
struct CUDAGuard {
  explicit CUDAGuard(const c10::Device&) {}
};
struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(const c10::Device&) {}
};
}  // namespace cuda
}  // namespace c10
#define C10_CUDA_CHECK(expr)                                                                   \
  do {                                                                                         \
    const cudaError_t memfast_emu_err = (expr);                                                \
    TORCH_CHECK(memfast_emu_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(memfast_emu_err)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())

// ---- cub ----------------------------------------------------------------------------------------
namespace memfast_emu_rt {
cudaError_t sort_pairs_i64(void* temp, size_t& temp_bytes, const int64_t* keys_in, int64_t* keys_out,
                           const int64_t* values_in, int64_t* values_out, int n, int begin_bit, int end_bit);
}
namespace cub {
struct DeviceRadixSort {
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const int64_t* keys_in, int64_t* keys_out,
                               const int64_t* values_in, int64_t* values_out, int n, int begin_bit = 0,
                               int end_bit = 64, cudaStream_t = nullptr) {
    return memfast_emu_rt::sort_pairs_i64(temp, temp_bytes, keys_in, keys_out, values_in, values_out, n, begin_bit,
                                          end_bit);
  }
};
}  // namespace cub
