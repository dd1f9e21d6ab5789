// The host build's library (SEGFP16_HOST_LIB, e.g. segfp16_cudahost): the kernel ops' schemas, implemented by the
// CUDA sources compiled as C++ (bn_relu_cuda.cpp, upsample_cuda.cpp here include the .cu files), plus the runner's
// knobs and launch record for the tests.
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <sstream>
#include <string>

#include "../ops_schema.h"
#include "runner.h"

namespace segfp16 {
namespace host {
namespace {

// blocks: "in_order" | "reversed" | "shuffled"; serial: one thread at a time between barriers; permute_threads:
// a seeded permutation of each block's threads; sms: the SM count the launch configuration sees; dry_run: check
// and record launches without running them
void set_schedule(const std::string& blocks, bool serial, bool permute_threads, int64_t seed, int64_t sms,
                  bool dry_run) {
  Schedule s;
  if (blocks == "in_order") s.block_order = BlockOrder::kInOrder;
  else if (blocks == "reversed") s.block_order = BlockOrder::kReversed;
  else if (blocks == "shuffled") s.block_order = BlockOrder::kShuffled;
  else TORCH_CHECK(false, "set_schedule: blocks must be in_order, reversed or shuffled, got ", blocks);
  TORCH_CHECK(sms > 0, "set_schedule: sms must be positive");
  s.serial = serial;
  s.permute_threads = permute_threads;
  s.seed = static_cast<uint64_t>(seed);
  s.sms = static_cast<int>(sms);
  s.dry_run = dry_run;
  schedule() = s;
}

// One line per launch since the last clear: "kernel|gx gy gz|bx by bz|smem|ran"
std::string launch_log(bool clear) {
  std::ostringstream out;
  for (const auto& r : take_launches(clear))
    out << r.kernel << '|' << r.grid.x << ' ' << r.grid.y << ' ' << r.grid.z << '|' << r.block.x << ' ' << r.block.y
        << ' ' << r.block.z << '|' << r.smem << '|' << (r.ran ? 1 : 0) << '\n';
  return out.str();
}

// A block tree-sum in dynamic shared memory, for the tests of the runner itself: without its barriers it reads
// partial sums before they are written (the serial schedules then give NaN from the poisoned arena or wrong sums);
// `diverge` puts the barrier inside the `threadIdx.x < k` branch (undefined in CUDA; the runner rejects it).
__global__ void block_sum_kernel(const float* x, float* out, bool barrier, bool diverge) {
  SEGFP16_DYNAMIC_SMEM(float, sh);
  sh[threadIdx.x] = x[threadIdx.x];
  if (barrier) __syncthreads();
  for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) sh[threadIdx.x] += sh[threadIdx.x + k];
    if (barrier && (!diverge || threadIdx.x < k)) __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = sh[0];
}

at::Tensor test_block_sum(const at::Tensor& x, bool barrier, bool diverge, int64_t block) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() == block, "test_block_sum: x must be ",
              block, " contiguous floats");
  at::Tensor out = at::empty({1}, x.options());
  launch::launch<block_sum_kernel>(1, static_cast<unsigned>(block), static_cast<size_t>(block) * sizeof(float),
                                   x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), barrier, diverge);
  return out;
}

// The memory errors of a kernel that the asan flavour must report (the other flavours read whatever lies there, and
// fail a write past the shared memory by their canary):
// "global" reads one element past x, "shared" one float past the launch's dynamic shared memory, "shared_write"
// writes one there, "static_shared" reads one past a static __shared__ array, "misaligned" a 16-byte pack at a 4-byte
// offset (on the card: memcheck's invalid __global__ / __shared__ accesses, and a misaligned-address fault).
// "static_unset" reads a static __shared__ value before the block wrote it: no sanitizer reports that; it reads the
// runner's NaN fill (the card: whatever an earlier block left).
struct alignas(16) Pack4 {
  float v[4];
};

__global__ void out_of_bounds_kernel(const float* x, int64_t n, float* out, int where) {
  SEGFP16_DYNAMIC_SMEM(float, sh);
  SEGFP16_STATIC_SMEM(float, st, [32]);
  const float unset = where == 5 ? st[threadIdx.x] : 0.f;
  sh[threadIdx.x] = 1.f;
  st[threadIdx.x] = 2.f;
  __syncthreads();
  float v = sh[threadIdx.x] + st[threadIdx.x];
  if (threadIdx.x == 0) {
    if (where == 0) v = x[n];
    else if (where == 1) v = sh[blockDim.x];
    else if (where == 2) v = st[blockDim.x];
    else if (where == 3) v = reinterpret_cast<const Pack4*>(x + 1)->v[0];
    else if (where == 4) sh[blockDim.x] = v;
    else v = unset;
  }
  out[threadIdx.x] = v;
}

at::Tensor test_out_of_bounds(const at::Tensor& x, const std::string& where) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() >= 8,
              "test_out_of_bounds: x must be at least 8 contiguous floats");
  const std::array<std::string, 6> kinds{"global", "shared", "static_shared", "misaligned", "shared_write",
                                         "static_unset"};
  const int w = static_cast<int>(std::find(kinds.begin(), kinds.end(), where) - kinds.begin());
  TORCH_CHECK(w < 6, "test_out_of_bounds: where must be global, shared, static_shared, misaligned, shared_write or "
              "static_unset, got ", where);
  constexpr unsigned kBlock = 32;  // = the static array's length
  at::Tensor out = at::empty({kBlock}, x.options());
  launch::launch<out_of_bounds_kernel>(1, kBlock, kBlock * sizeof(float), x.const_data_ptr<float>(), x.numel(),
                                       out.mutable_data_ptr<float>(), w);
  return out;
}

std::string flavour() {
#if defined(SEGFP16_HOST_FAST_MATH)
  return "fast";
#elif defined(__SANITIZE_ADDRESS__)
  return "asan";
#elif defined(__SANITIZE_THREAD__)
  return "tsan";
#else
  return "ieee";
#endif
}

}  // namespace
}  // namespace host
}  // namespace segfp16

// one more macro level, so that SEGFP16_HOST_LIB expands before TORCH_LIBRARY pastes it
#define SEGFP16_HOST_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
SEGFP16_HOST_LIBRARY(SEGFP16_HOST_LIB, m) {
  segfp16::def_kernel_ops(m);
  m.def("set_schedule(str blocks, bool serial, bool permute_threads, int seed, int sms, bool dry_run) -> ()");
  m.def("launch_log(bool clear) -> str");
  m.def("flavour() -> str");
  m.def("test_block_sum(Tensor x, bool barrier, bool diverge=False, int block=256) -> Tensor");
  m.def("test_out_of_bounds(Tensor x, str where) -> Tensor");
}

TORCH_LIBRARY_IMPL(SEGFP16_HOST_LIB, CPU, m) {
  m.impl("test_block_sum", &segfp16::host::test_block_sum);
  m.impl("test_out_of_bounds", &segfp16::host::test_out_of_bounds);
}

TORCH_LIBRARY_IMPL(SEGFP16_HOST_LIB, CatchAll, m) {
  m.impl("set_schedule", &segfp16::host::set_schedule);
  m.impl("launch_log", &segfp16::host::launch_log);
  m.impl("flavour", &segfp16::host::flavour);
}
