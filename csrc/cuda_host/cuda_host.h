// Host execution layer: what a .cu file of ours needs from CUDA, provided in plain C++ so that the kernels' own code
// runs on the CPU (tests only; built by tests/cuda_host_build.py with -DSEGFP16_CUDA_HOST, never by setup.py).
//
// Kernels use only __syncthreads, static / dynamic shared memory, plain loads and stores and c10::Half /
// c10::BFloat16, so they run as written:
//   threadIdx / blockIdx / blockDim / gridDim  thread-local, set by the runner for each simulated thread;
//   __syncthreads()                            a barrier over the block's threads (real threads, std::barrier), or a
//                                              turn hand-over in the serial schedule (runner.cpp);
//   SEGFP16_STATIC_SMEM                        a `static` array: blocks run one after another, so each kernel's
//                                              static shared arrays are the arena of the block that runs; dynamic
//                                              shared memory is one arena. The runner fills both with 0xFF bytes
//                                              (NaN) before each block: a value read before the block wrote it is
//                                              NaN, never a plausible one an earlier block left.
//                                              (A bare __shared__ does not compile here: the runner could not fill it.)
// The runner checks CUDA's launch limits on every launch and records each launch (csrc/cuda_host/library.cpp exposes
// the record and the schedule knobs as ops; in a dry run launches are checked and recorded, not run).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static_assert(false, "cuda_host: declare static shared memory with SEGFP16_STATIC_SMEM");
#define __align__(n) __attribute__((aligned(n)))

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

namespace segfp16 {
namespace host {

void syncthreads();                         // runner.cpp
[[noreturn]] void kernel_assert_failed(const char* cond, const char* file, int line);
unsigned char* dynamic_smem();              // this block's arena
bool register_static_smem(void* p, size_t bytes);  // fills it now and before every later block
int configured_sm_count();

// Checks the launch limits (throws), records the launch and, unless in a dry run, runs `body` once per simulated
// thread of every block, in the configured schedule.
void run_grid(const char* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

// The kernel's name with its template arguments, from the signature of launch_name<K>() (GCC's __PRETTY_FUNCTION__).
template <auto Kernel>
const char* launch_name() {
  return __PRETTY_FUNCTION__;
}

#ifdef SEGFP16_HOST_FAST_MATH
// nvcc --use_fast_math's __expf / __logf: ex2.approx(x * log2(e)) and lg2.approx(x) * ln(2), whose error is
// dominated by rounding the product / result to float (the approximate ex2 / lg2 themselves are within 2 ulp).
inline float fast_expf(float x) { return std::exp2(static_cast<float>(x * 1.44269504f)); }
inline float fast_logf(float x) { return static_cast<float>(std::log2(x) * 0.693147182f); }
#endif

}  // namespace host

namespace launch {

// one device, nothing to switch
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
inline int sm_count(const at::Tensor&) { return host::configured_sm_count(); }

template <auto Kernel, typename... KArgs, typename... Args>
void launch_as(void (*)(KArgs...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  // the arguments as the kernel's parameter types, copied once (what a launch does); every simulated thread reads them
  const std::tuple<std::decay_t<KArgs>...> a(static_cast<KArgs>(std::forward<Args>(args))...);
  host::run_grid(host::launch_name<Kernel>(), grid, block, smem, [&a] { std::apply(Kernel, a); });
}

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, Args&&... args) {
  launch_as<Kernel>(Kernel, grid, block, smem, std::forward<Args>(args)...);
}

}  // namespace launch
}  // namespace segfp16

inline void __syncthreads() { segfp16::host::syncthreads(); }

#define SEGFP16_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::segfp16::host::dynamic_smem())
// registered by the first thread that gets here (a function-local static's initialisation is thread-safe)
#define SEGFP16_STATIC_SMEM(T, name, dims) \
  static T name dims;                      \
  [[maybe_unused]] static const bool name##_registered = ::segfp16::host::register_static_smem(&name, sizeof(name))

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  if (C10_UNLIKELY(!(cond))) ::segfp16::host::kernel_assert_failed(#cond, __FILE__, __LINE__)

#ifdef SEGFP16_HOST_FAST_MATH
#define expf(x) ::segfp16::host::fast_expf(x)
#define logf(x) ::segfp16::host::fast_logf(x)
#endif

// the CPU key of the host library (SEGFP16_HOST_LIB is set by the build)
#define SEGFP16_REGISTER_CUDA(fn) \
  TORCH_LIBRARY_IMPL(SEGFP16_HOST_LIB, CPU, m) { fn(m); }
