// The host runner behind csrc/cuda_host/cuda_host.h: runs a grid block by block, each block's threads as real OS
// threads from one reused pool, with __syncthreads as a barrier over them.
//
// Schedules (set_schedule in library.cpp): blocks in order, reversed or shuffled (seeded); the block's threads
// either free-running on the pool (parallel: std::barrier) or serial: one thread at a time, each running up to its
// next __syncthreads (or its end) in a fixed permuted order, then handing the turn on. A missing barrier or an
// order-dependent reduction then gives different bits under different schedules.
// Also checked per block: every thread calls __syncthreads equally often (a barrier in divergent code is undefined
// behaviour in CUDA), and an exception in one thread (a kernel assert) drops it from the barrier and is rethrown.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <semaphore>
#include <sstream>
#include <thread>
#include <vector>

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#endif

#if defined(SEGFP16_HOST_FAST_MATH) && defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "cuda_host.h"
#include "runner.h"

namespace segfp16 {
namespace host {

constexpr size_t kSmemLimit = 48 * 1024;  // without the opt-in attribute (none of our kernels sets it)

Schedule& schedule() {
  static Schedule s;
  return s;
}

namespace {


std::mutex log_mutex;
std::vector<LaunchRecord> launches;
constexpr size_t kLogCap = 200000;

alignas(64) unsigned char smem_arena[kSmemLimit];
std::mutex static_smem_mutex;
std::vector<std::pair<void*, size_t>> static_smem;  // every SEGFP16_STATIC_SMEM array that has run
// The arena past a launch's bytes holds this canary while a block runs, so that the ieee / fast / tsan flavours also
// catch a write beyond the request (a kernel that asks for too little); asan poisons those bytes instead.
constexpr unsigned char kCanary = 0xA5;

// One block's state, shared by its simulated threads.
struct Block {
  bool serial = false;
  std::optional<std::barrier<>> bar;  // parallel schedule
  // serial schedule: the thread holding the turn runs; it hands the turn on (releases the next live thread's
  // semaphore in `order`) at its next __syncthreads or at its end. Only the turn holder touches pos and done.
  std::vector<int> order;
  std::vector<char> done;
  std::vector<std::unique_ptr<std::binary_semaphore>> turn;
  size_t pos = 0;
  std::vector<int64_t> syncs;  // __syncthreads calls per thread
  std::exception_ptr error;
  std::mutex error_m;
};

thread_local Block* tl_block = nullptr;
thread_local int tl_tid = 0;

void pass_turn(Block& b) {
  const size_t n = b.order.size();
  for (size_t k = 1; k <= n; ++k) {
    const size_t p = (b.pos + k) % n;
    if (!b.done[b.order[p]]) {
      b.pos = p;
      b.turn[b.order[p]]->release();
      return;
    }
  }
}

// n OS threads, reused for every block of every launch; run(n, f) calls f(0) ... f(n-1), one per thread, and waits.
class Pool {
 public:
  void run(int n, const std::function<void(int)>& f) {
    while (static_cast<int>(workers_.size()) < n) {
      auto w = std::make_unique<Worker>();
      const int i = static_cast<int>(workers_.size());
      w->thread = std::thread([this, i, wp = w.get()] { loop(i, *wp); });
      workers_.push_back(std::move(w));
    }
    job_ = &f;
    remaining_.store(n);
    for (int i = 0; i < n; ++i) workers_[i]->go.release();
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [&] { return remaining_.load() == 0; });
  }

 private:
  struct Worker {
    std::thread thread;
    std::binary_semaphore go{0};
  };
  void loop(int i, Worker& w) {
#if defined(SEGFP16_HOST_FAST_MATH) && defined(__x86_64__)
    _mm_setcsr(_mm_getcsr() | 0x8040);  // flush-to-zero and denormals-are-zero, as --use_fast_math's --ftz=true
#endif
    for (;;) {
      w.go.acquire();
      (*job_)(i);
      if (remaining_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lk(m_);
        done_.notify_one();
      }
    }
  }
  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<int> remaining_{0};
  std::mutex m_;
  std::condition_variable done_;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads sleep on their semaphores until the process ends
  return *p;
}

std::string short_name(const char* pretty) {
  // "const char* segfp16::host::launch_name() [with auto Kernel = segfp16::{anonymous}::k<...>]" -> "k<...>"
  std::string s(pretty);
  const auto eq = s.find("Kernel = ");
  if (eq != std::string::npos) s = s.substr(eq + 9);
  if (!s.empty() && s.back() == ']') s.pop_back();
  for (const char* prefix : {"segfp16::{anonymous}::", "segfp16::"}) {
    for (size_t p; (p = s.find(prefix)) != std::string::npos;) s.erase(p, std::string(prefix).size());
  }
  return s;
}

void check_limits(const std::string& name, dim3 g, dim3 b, size_t smem) {
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  TORCH_CHECK(b.x >= 1 && b.y >= 1 && b.z >= 1 && b.x <= 1024 && b.y <= 1024 && b.z <= 64 && threads <= 1024,
              "cuda_host: ", name, ": block (", b.x, ", ", b.y, ", ", b.z, ") exceeds CUDA's limits (1024 threads)");
  TORCH_CHECK(g.x >= 1 && g.y >= 1 && g.z >= 1 && g.x <= 2147483647u && g.y <= 65535 && g.z <= 65535,
              "cuda_host: ", name, ": grid (", g.x, ", ", g.y, ", ", g.z, ") exceeds CUDA's limits");
  TORCH_CHECK(smem <= kSmemLimit, "cuda_host: ", name, ": ", smem, " bytes of dynamic shared memory > 48 KiB");
  // blockIdx.x * blockDim.x + threadIdx.x is 32-bit unsigned arithmetic in CUDA: it must not wrap
  TORCH_CHECK(uint64_t(g.x) * b.x <= 0xffffffffull && uint64_t(g.y) * b.y <= 0xffffffffull &&
                  uint64_t(g.z) * b.z <= 0xffffffffull,
              "cuda_host: ", name, ": a thread index overflows 32 bits");
}

}  // namespace

unsigned char* dynamic_smem() { return smem_arena; }

bool register_static_smem(void* p, size_t bytes) {
  std::lock_guard<std::mutex> lk(static_smem_mutex);
  static_smem.emplace_back(p, bytes);
  std::memset(p, 0xFF, bytes);  // the first block that declares it: no thread has written it yet
  return true;
}

int configured_sm_count() { return schedule().sms; }

[[noreturn]] void kernel_assert_failed(const char* cond, const char* file, int line) {
  TORCH_CHECK(false, "cuda_host: device-side assert failed: ", cond, " (", file, ":", line, ")");
}

void syncthreads() {
  Block& b = *tl_block;
  ++b.syncs[tl_tid];
  if (!b.serial) {
    b.bar->arrive_and_wait();
    return;
  }
  pass_turn(b);
  b.turn[tl_tid]->acquire();
}

void run_grid(const char* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const std::string name = short_name(kernel);
  check_limits(name, grid, block, smem);
  {
    std::lock_guard<std::mutex> lk(log_mutex);
    if (launches.size() < kLogCap) launches.push_back({name, grid, block, smem, !schedule().dry_run});
  }
  const Schedule sch = schedule();
  if (sch.dry_run) return;
  // one grid at a time: blocks share the static __shared__ arrays and the arena
  static std::mutex grid_mutex;
  std::lock_guard<std::mutex> grid_lock(grid_mutex);
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  const int64_t nblocks = int64_t(grid.x) * grid.y * grid.z;
  std::vector<int64_t> blocks(nblocks);
  std::iota(blocks.begin(), blocks.end(), 0);
  std::mt19937_64 rng(sch.seed);
  if (sch.block_order == BlockOrder::kReversed) std::reverse(blocks.begin(), blocks.end());
  if (sch.block_order == BlockOrder::kShuffled) std::shuffle(blocks.begin(), blocks.end(), rng);
  std::vector<int> perm(nthreads);
  std::iota(perm.begin(), perm.end(), 0);
  for (const int64_t bid : blocks) {
    if (sch.permute_threads) std::shuffle(perm.begin(), perm.end(), rng);
    Block b;
    b.serial = sch.serial;
    b.syncs.assign(nthreads, 0);
    if (b.serial) {
      b.order = perm;
      b.done.assign(nthreads, 0);
      for (int t = 0; t < nthreads; ++t) b.turn.push_back(std::make_unique<std::binary_semaphore>(0));
      b.turn[perm[0]]->release();
    } else {
      b.bar.emplace(nthreads);
    }
#ifdef __SANITIZE_ADDRESS__
    // the asan flavour: the arena past this launch's bytes is unaddressable, as it is on the card
    ASAN_UNPOISON_MEMORY_REGION(smem_arena, smem);
    ASAN_POISON_MEMORY_REGION(smem_arena + smem, kSmemLimit - smem);
#else
    std::memset(smem_arena + smem, kCanary, kSmemLimit - smem);
#endif
    std::memset(smem_arena, 0xFF, smem);
    {
      std::lock_guard<std::mutex> lk(static_smem_mutex);
      for (const auto& [p, bytes] : static_smem) std::memset(p, 0xFF, bytes);
    }
    const uint3 bidx{static_cast<unsigned>(bid % grid.x), static_cast<unsigned>((bid / grid.x) % grid.y),
                     static_cast<unsigned>(bid / (int64_t(grid.x) * grid.y))};
    pool().run(nthreads, [&](int worker) {
      const int tid = perm[worker];
      tl_block = &b;
      tl_tid = tid;
      threadIdx = {tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
      blockIdx = bidx;
      blockDim = block;
      gridDim = grid;
      if (b.serial) b.turn[tid]->acquire();
      try {
        body();
      } catch (...) {
        std::lock_guard<std::mutex> g(b.error_m);
        if (!b.error) b.error = std::current_exception();
      }
      if (b.serial) {
        b.done[tid] = 1;
        pass_turn(b);
      } else {
        b.bar->arrive_and_drop();
      }
      tl_block = nullptr;
    });
    if (b.error) std::rethrow_exception(b.error);
#ifndef __SANITIZE_ADDRESS__
    const unsigned char* past = std::find_if(smem_arena + smem, smem_arena + kSmemLimit,
                                             [](unsigned char c) { return c != kCanary; });
    TORCH_CHECK(past == smem_arena + kSmemLimit, "cuda_host: ", name, ": block ", bid, " wrote byte ",
                past - smem_arena, " of the dynamic shared memory, past the ", smem, " bytes it was launched with");
#endif
    const auto [lo, hi] = std::minmax_element(b.syncs.begin(), b.syncs.end());
    TORCH_CHECK(*lo == *hi, "cuda_host: ", name, ": block ", bid, ": threads called __syncthreads between ", *lo,
                " and ", *hi, " times (a barrier in divergent code)");
  }
}

std::vector<LaunchRecord> take_launches(bool clear) {
  std::lock_guard<std::mutex> lk(log_mutex);
  std::vector<LaunchRecord> out = launches;
  if (clear) launches.clear();
  return out;
}

}  // namespace host
}  // namespace segfp16
