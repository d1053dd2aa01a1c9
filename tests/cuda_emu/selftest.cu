// Kernels that show the emulator (runtime.h) catches what it claims to: tests/test_cuda_emulator.py
// runs them through torch.ops.memfast_emu_selftest.run(out, kernel, threads, blocks). Written as CUDA
// (emulator.py rewrites it like csrc/cuda/*.cu); not part of the package.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <string>

namespace {

// Thread 0 publishes a value in shared memory; the others read it, after a barrier or not.
__global__ void publish_kernel(float* out, bool barrier) {
  __shared__ float value[1];
  if (threadIdx.x == 0) value[0] = 42.0f;
  if (barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = value[0];
}

// Half the warp leaves, the other half shuffles with a full mask (undefined on the hardware).
__global__ void shuffle_after_exit_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Even threads wait at a block barrier, odd ones in a warp shuffle: neither can complete.
__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

__global__ void trap_kernel(float* out) {
  if (threadIdx.x == 3) __trap();
  out[threadIdx.x] = 1.0f;
}

__global__ void __launch_bounds__(128) bounded_kernel(float* out) { out[threadIdx.x] = 1.0f; }

// Every shuffle form and the ballot: out[lane * 8 + k] for a warp of lanes holding lane * 10.
__global__ void shuffles_kernel(float* out) {
  const int lane = threadIdx.x;
  const int v = lane * 10;
  float* o = out + lane * 8;
  o[0] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[1] = __shfl_up_sync(0xffffffffu, v, 3);
  o[2] = __shfl_down_sync(0xffffffffu, v, 3);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 2, 4);
  o[4] = __shfl_down_sync(0xffffffffu, v, 3, 8);
  o[5] = static_cast<float>(__ballot_sync(0xffffffffu, lane % 3 == 0) & 0xffffu);
  // groups of 8 lanes, each shuffling with its own mask (as group_reduce does)
  const unsigned group = 0xffu << (lane & ~7);
  o[6] = __shfl_xor_sync(group, v, 4, 8);
  o[7] = static_cast<float>(__clz(lane));
}

// Each block of a cluster reads its neighbour's rank from the neighbour's shared memory; with
// `leave`, rank 0 leaves first (the others then read the shared memory of a block that exited).
__global__ void cluster_kernel(float* out, bool leave) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ float rank[1];
  const unsigned r = cluster.block_rank();
  if (leave && r == 0) return;
  if (threadIdx.x == 0) rank[0] = static_cast<float>(r);
  cluster.sync();
  const unsigned next = (r + 1) % cluster.num_blocks();
  out[blockIdx.x * blockDim.x + threadIdx.x] = *cluster.map_shared_rank(rank, next);
  cluster.sync();
}

// out: float32, at least blocks * threads * 8 elements (a tensor argument, for the dispatcher).
void run(at::Tensor& out, const std::string& kernel, int64_t threads, int64_t blocks) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() >= blocks * threads * 8);
  float* o = out.mutable_data_ptr<float>();
  const unsigned nb = static_cast<unsigned>(blocks), nt = static_cast<unsigned>(threads);
  if (kernel == "publish" || kernel == "publish_without_barrier") {
    publish_kernel<<<nb, nt>>>(o, kernel == "publish");
  } else if (kernel == "shuffle_after_exit") {
    shuffle_after_exit_kernel<<<nb, nt>>>(o);
  } else if (kernel == "deadlock") {
    deadlock_kernel<<<nb, nt>>>(o);
  } else if (kernel == "trap") {
    trap_kernel<<<nb, nt>>>(o);
  } else if (kernel == "bounded") {
    bounded_kernel<<<nb, nt>>>(o);
  } else if (kernel == "shuffles") {
    shuffles_kernel<<<nb, nt>>>(o);
  } else if (kernel == "cluster" || kernel == "cluster_leave") {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(nb, 1, 1);
    config.blockDim = dim3(nt, 1, 1);
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = 4;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, cluster_kernel, o, kernel == "cluster_leave"));
  } else {
    TORCH_CHECK(false, "no self-test kernel ", kernel);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY(memfast_emu_selftest, m) { m.def("run(Tensor(a!) out, str kernel, int threads, int blocks) -> ()"); }
TORCH_LIBRARY_IMPL(memfast_emu_selftest, CUDA, m) { m.impl("run", &run); }
