// The emulator's scheduler (see runtime.h): fibers for threads, counting barriers for
// __syncthreads and cluster.sync, per-mask barriers for warp shuffles and ballots.
#include "runtime.h"

#include <sys/mman.h>
#if !(defined(__x86_64__) && defined(__linux__))
#include <ucontext.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <vector>

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace memfast_emu_rt {

namespace {

// Switching fibers: on x86-64 a few instructions (callee-saved registers, the FP control words
// and the stack pointer); swapcontext also saves the signal mask, a system call per switch,
// which made it most of the emulator's time. Elsewhere, ucontext.
#if defined(__x86_64__) && defined(__linux__)
extern "C" void memfast_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl memfast_emu_switch
  .hidden memfast_emu_switch
  .type memfast_emu_switch, @function
memfast_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  fnstcw (%rsp)
  stmxcsr 8(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size memfast_emu_switch, .-memfast_emu_switch
)");

struct Context {
  void* sp = nullptr;
};
// A fiber's first switch "returns" into entry with the stack as a call would leave it.
void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  char* top = stack + bytes - (reinterpret_cast<uintptr_t>(stack + bytes) % 16);
  void** frame = reinterpret_cast<void**>(top - 80);
  std::memset(frame, 0, 80);
  uint16_t fpu;
  uint32_t mxcsr;
  asm volatile("fnstcw %0" : "=m"(fpu));
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  std::memcpy(frame, &fpu, sizeof(fpu));
  std::memcpy(reinterpret_cast<char*>(frame) + 8, &mxcsr, sizeof(mxcsr));
  frame[8] = reinterpret_cast<void*>(entry);  // popped by ret: entry runs with rsp = top - 8
  c.sp = frame;
}
void switch_context(Context& from, Context& to) { memfast_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr size_t kSharedLimit = 48 * 1024;  // static shared memory per block
constexpr unsigned kMaxCluster = 8;         // the portable cluster size

struct CountBarrier {
  int arrived = 0;
  uint64_t generation = 0;
};
struct WarpBarrier {
  uint32_t arrived = 0;
  uint64_t generation = 0;
};
struct Warp {
  uint64_t slot[32];
  std::map<uint32_t, WarpBarrier> barriers;  // one per mask: groups of a warp shuffle independently
};
struct ThreadInfo {
  uint3 thread_idx, block_idx;
};
struct Fiber {
  ThreadInfo info;
  Context context;
  char* stack = nullptr;
  int block = 0;  // rank in the cluster
  int tid = 0;    // linear thread index in the block
  bool done = false;
  const char* waiting_at = nullptr;
  uint32_t waiting_mask = 0;
};
struct Block {
  std::vector<unsigned char> shared = std::vector<unsigned char>(kSharedLimit + 64);
  std::vector<Warp> warps;
  CountBarrier barrier;
  int live = 0;
  unsigned char* base() { return shared.data() + (64 - reinterpret_cast<uintptr_t>(shared.data()) % 64) % 64; }
};
struct Launch {
  const char* name;
  dim3 grid, block;
  unsigned cluster;
  int threads;
  const std::function<void()>* body;
  std::vector<Fiber> fibers;
  std::vector<Block> blocks;
  CountBarrier cluster_barrier;
  int cluster_live = 0;
  std::map<const void*, size_t> layout;  // shared declaration -> offset, the same in every block
  size_t shared_used = 0;
  std::string fault;
  bool progress = false;
  Fiber* running = nullptr;
  Context scheduler;
};

Launch* g = nullptr;
std::mutex launch_mutex;
std::vector<char*> stack_pool;
uint64_t launch_count = 0;
cudaError_t last_error = cudaSuccess;
std::string last_message;

Fiber& me() { return *g->running; }
Block& my_block() { return g->blocks[me().block]; }

void yield() {
  Fiber& f = me();
  switch_context(f.context, g->scheduler);
}

std::string where(const Fiber& f) {
  std::ostringstream s;
  s << g->name << " block (" << f.info.block_idx.x << "," << f.info.block_idx.y << "," << f.info.block_idx.z
    << ") thread (" << f.info.thread_idx.x << "," << f.info.thread_idx.y << "," << f.info.thread_idx.z << ")";
  return s.str();
}

void entry() {
  (*g->body)();
  Fiber& f = me();
  f.done = true;
  g->progress = true;
  --g->blocks[f.block].live;
  --g->cluster_live;
  switch_context(f.context, g->scheduler);  // never resumed
  std::abort();
}

char* stack_at(size_t i) {
  while (stack_pool.size() <= i) {
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "memfast CUDA emulator: cannot map a fiber stack");
    mprotect(p, kGuardBytes, PROT_NONE);  // an overflow faults instead of writing over another stack
    stack_pool.push_back(static_cast<char*>(p) + kGuardBytes);
  }
  return stack_pool[i];
}

void wait_count(CountBarrier& bar, const int& live, const char* what) {
  Fiber& f = me();
  f.waiting_at = what;
  const uint64_t generation = bar.generation;
  ++bar.arrived;
  g->progress = true;
  for (;;) {
    if (bar.generation != generation) break;
    if (bar.arrived >= live) {  // threads that have left count as arrived, as on the hardware
      bar.arrived = 0;
      ++bar.generation;
      g->progress = true;
      break;
    }
    yield();
  }
  f.waiting_at = nullptr;
}

void wait_warp(unsigned mask, const char* what) {
  Fiber& f = me();
  const int lane = f.tid % 32, warp = f.tid / 32;
  if (!((mask >> lane) & 1u)) {
    std::ostringstream s;
    s << what << " with mask 0x" << std::hex << mask << " that leaves out the calling lane " << std::dec << lane;
    fault(s.str());
  }
  Block& b = my_block();
  Warp& w = b.warps[warp];
  WarpBarrier& bar = w.barriers[mask];
  f.waiting_at = what;
  f.waiting_mask = mask;
  const uint64_t generation = bar.generation;
  bar.arrived |= 1u << lane;
  g->progress = true;
  for (;;) {
    if (bar.generation != generation) break;
    if ((bar.arrived & mask) == mask) {
      bar.arrived = 0;
      ++bar.generation;
      g->progress = true;
      break;
    }
    // A lane the mask names that has left (or does not exist) can never arrive: undefined on the hardware.
    for (int l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u) || ((bar.arrived >> l) & 1u)) continue;
      const int t = warp * 32 + l;
      if (t >= g->threads || g->fibers[f.block * g->threads + t].done) {
        std::ostringstream s;
        s << what << " with mask 0x" << std::hex << mask << std::dec << " names lane " << l
          << (t >= g->threads ? ", which the block does not have" : ", which has exited");
        fault(s.str());
      }
    }
    yield();
  }
  f.waiting_at = nullptr;
}

std::string deadlock_report() {
  std::ostringstream s;
  s << "deadlock: no thread can go on (threads in different barriers or shuffles):";
  int shown = 0;
  for (const Fiber& f : g->fibers) {
    if (f.done || !f.waiting_at) continue;
    if (shown++ == 6) {
      s << " ...";
      break;
    }
    s << " [" << where(f) << " in " << f.waiting_at;
    if (f.waiting_mask) s << " mask 0x" << std::hex << f.waiting_mask << std::dec;
    s << "]";
  }
  return s.str();
}

void run_cluster(std::mt19937_64& rng, unsigned first_block, uint3 (*block_index)(unsigned, dim3)) {
  const unsigned cs = g->cluster;
  const int nt = g->threads;
  const size_t nf = static_cast<size_t>(cs) * nt;
  g->fibers.assign(nf, Fiber{});
  for (unsigned b = 0; b < cs; ++b) {
    Block& blk = g->blocks[b];
    std::fill(blk.shared.begin(), blk.shared.end(), 0xff);  // uninitialised shared memory reads as NaN / -1
    blk.warps.assign((nt + 31) / 32, Warp{});
    blk.barrier = CountBarrier{};
    blk.live = nt;
  }
  g->cluster_barrier = CountBarrier{};
  g->cluster_live = static_cast<int>(nf);
  for (size_t i = 0; i < nf; ++i) {
    Fiber& f = g->fibers[i];
    f.block = static_cast<int>(i / nt);
    f.tid = static_cast<int>(i % nt);
    const unsigned bx = g->block.x, by = g->block.y;
    f.info.thread_idx = uint3{f.tid % bx, (f.tid / bx) % by, f.tid / (bx * by)};
    f.info.block_idx = block_index(first_block + f.block, g->grid);
    f.stack = stack_at(i);
    start_context(f.context, f.stack, kStackBytes, entry);
  }
  std::vector<size_t> order(nf);
  std::iota(order.begin(), order.end(), size_t{0});
  while (g->cluster_live > 0 && g->fault.empty()) {
    std::shuffle(order.begin(), order.end(), rng);
    g->progress = false;
    for (size_t i : order) {
      Fiber& f = g->fibers[i];
      if (f.done) continue;
      g->running = &f;
      threadIdx = f.info.thread_idx;
      blockIdx = f.info.block_idx;
      switch_context(g->scheduler, f.context);
      g->running = nullptr;
      if (!g->fault.empty()) return;
    }
    if (!g->progress && g->cluster_live > 0) {
      g->fault = deadlock_report();
      return;
    }
  }
}

uint3 linear_block_index(unsigned b, dim3 grid) { return uint3{b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)}; }

}  // namespace

void fault(const std::string& what) {
  if (!g || !g->running) TORCH_CHECK(false, "memfast CUDA emulator: ", what);
  Fiber& f = me();
  if (g->fault.empty()) g->fault = what + " (" + where(f) + ")";
  switch_context(f.context, g->scheduler);  // the launch ends; this fiber is never resumed
  std::abort();
}

void sync_block() { wait_count(my_block().barrier, my_block().live, "__syncthreads()"); }
void sync_cluster() { wait_count(g->cluster_barrier, g->cluster_live, "cluster.sync()"); }
unsigned cluster_rank() { return static_cast<unsigned>(me().block); }
unsigned cluster_size() { return g->cluster; }

void* map_shared(void* p, unsigned rank) {
  if (rank >= g->cluster) fault("map_shared_rank to rank " + std::to_string(rank) + " of a cluster of " +
                                std::to_string(g->cluster));
  unsigned char* base = my_block().base();
  const ptrdiff_t off = static_cast<unsigned char*>(p) - base;
  if (off < 0 || off >= static_cast<ptrdiff_t>(kSharedLimit)) fault("map_shared_rank of an address outside shared memory");
  Block& other = g->blocks[rank];
  if (other.live == 0) fault("map_shared_rank to block rank " + std::to_string(rank) + ", which has exited");
  return other.base() + off;
}

void* shared_slot(const void* key, size_t bytes, size_t align) {
  auto it = g->layout.find(key);
  size_t off;
  if (it == g->layout.end()) {
    const size_t a = align < 16 ? 16 : align;
    off = (g->shared_used + a - 1) / a * a;
    if (off + bytes > kSharedLimit) fault("static shared memory over 48 KiB");
    g->layout.emplace(key, off);
    g->shared_used = off + bytes;
  } else {
    off = it->second;
  }
  return my_block().base() + off;
}

uint64_t exchange(unsigned mask, uint64_t bits, int kind, int arg, int width) {
  if (width < 1 || width > 32 || (width & (width - 1))) fault("shuffle width " + std::to_string(width));
  Fiber& f = me();
  const int lane = f.tid % 32;
  Warp& w = my_block().warps[f.tid / 32];
  w.slot[lane] = bits;
  wait_warp(mask, "a shuffle");
  const int seg = lane & ~(width - 1);
  int src = kind == 0 ? (lane ^ arg) : kind == 1 ? lane - arg : lane + arg;
  if (src < seg || src >= seg + width) src = lane;  // out of the segment: the caller's own value
  if (!((mask >> src) & 1u)) fault("a shuffle reads lane " + std::to_string(src) + ", which its mask leaves out");
  const uint64_t r = w.slot[src];
  wait_warp(mask, "a shuffle");
  return r;
}

unsigned ballot(unsigned mask, bool pred) {
  Fiber& f = me();
  const int lane = f.tid % 32;
  Warp& w = my_block().warps[f.tid / 32];
  w.slot[lane] = pred ? 1 : 0;
  wait_warp(mask, "a ballot");
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && w.slot[l]) r |= 1u << l;
  wait_warp(mask, "a ballot");
  return r;
}

void check_launch_bounds(long max_threads, long) {
  if (g->threads > max_threads) {
    fault("launched with " + std::to_string(g->threads) + " threads per block, over its __launch_bounds__ of " +
          std::to_string(max_threads));
  }
}

std::string run_grid(const char* name, dim3 grid, dim3 block, unsigned cluster, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  TORCH_CHECK(g == nullptr, "memfast CUDA emulator: a kernel launched from a kernel");
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::ostringstream bad;
  if (threads == 0 || threads > 1024) bad << "a block of " << threads << " threads";
  else if (blocks == 0) bad << "a grid of no blocks";
  else if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) bad << "a grid over the limits";
  else if (cluster == 0 || cluster > kMaxCluster || grid.x % cluster || (cluster > 1 && (grid.y > 1 || grid.z > 1)))
    bad << "a cluster of " << cluster << " blocks for a grid of " << grid.x;
  if (!bad.str().empty()) {
    set_last_error(cudaErrorInvalidConfiguration, std::string(name) + ": invalid launch configuration: " + bad.str());
    return "";
  }
  Launch launch;
  launch.name = name;
  launch.grid = grid;
  launch.block = block;
  launch.cluster = cluster;
  launch.threads = static_cast<int>(threads);
  launch.body = &body;
  launch.blocks.resize(cluster);
  g = &launch;
  gridDim = grid;
  blockDim = block;
  const char* seed = std::getenv("MEMFAST_EMU_SEED");
  std::mt19937_64 rng((seed ? std::strtoull(seed, nullptr, 10) : 0) * 1000003u + launch_count++);
  const uint64_t clusters = blocks / cluster;
  std::vector<uint64_t> order(clusters);
  std::iota(order.begin(), order.end(), uint64_t{0});
  std::shuffle(order.begin(), order.end(), rng);  // blocks run in any order on the hardware
  for (uint64_t c : order) {
    run_cluster(rng, static_cast<unsigned>(c * cluster), linear_block_index);
    if (!launch.fault.empty()) break;
  }
  g = nullptr;
  return launch.fault;
}

void set_last_error(cudaError_t e, const std::string& what) {
  last_error = e;
  last_message = what;
}
cudaError_t take_last_error() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}
const char* error_string(cudaError_t e) { return e == cudaSuccess ? "no error" : last_message.c_str(); }

int device_attribute(cudaDeviceAttr attr, bool* known) {
  *known = true;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: return 1024;
    case cudaDevAttrMultiProcessorCount: return 132;  // an H100 SXM
    case cudaDevAttrComputeCapabilityMajor: return 9;
    case cudaDevAttrComputeCapabilityMinor: return 0;
  }
  *known = false;
  return 0;
}

// cub's radix sort of int64 keys: stable, over bits [begin_bit, end_bit) of the key with its sign bit flipped.
cudaError_t sort_pairs_i64(void* temp, size_t& temp_bytes, const int64_t* keys_in, int64_t* keys_out,
                           const int64_t* values_in, int64_t* values_out, int n, int begin_bit, int end_bit) {
  const size_t need = static_cast<size_t>(n < 0 ? 0 : n) * 16 + 256;
  if (temp == nullptr) {
    temp_bytes = need;
    return cudaSuccess;
  }
  if (temp_bytes < need || n < 0 || begin_bit < 0 || end_bit > 64 || begin_bit > end_bit) return cudaErrorInvalidValue;
  auto bits = [&](int64_t k) {
    const uint64_t u = static_cast<uint64_t>(k) ^ (uint64_t{1} << 63);
    const int width = end_bit - begin_bit;
    return width == 64 ? u : (u >> begin_bit) & ((uint64_t{1} << width) - 1);
  };
  std::vector<int> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return bits(keys_in[a]) < bits(keys_in[b]); });
  std::vector<int64_t> k(n), v(n);
  for (int i = 0; i < n; ++i) {
    k[i] = keys_in[idx[i]];
    v[i] = values_in[idx[i]];
  }
  std::copy(k.begin(), k.end(), keys_out);
  std::copy(v.begin(), v.end(), values_out);
  return cudaSuccess;
}

}  // namespace memfast_emu_rt
