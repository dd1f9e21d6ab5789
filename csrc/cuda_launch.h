// The one place where the CUDA ops touch the CUDA runtime: kernel launches, the current stream, the device guard,
// the SM count, the "is this tensor on our device" check and the library the ops register under.
//
// Under nvcc (the shipped build) these are thin wrappers: launch<K>(...) is K<<<grid, block, smem, stream>>>(...)
// followed by C10_CUDA_KERNEL_LAUNCH_CHECK(). Built as C++ with SEGFP16_CUDA_HOST (tests only, csrc/cuda_host/),
// the same names run the kernels' own code on the CPU through the host runner (csrc/cuda_host/cuda_host.h) and the
// ops register under their own library on CPU tensors. Include it after every other header of a .cu file.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <utility>

#ifdef SEGFP16_CUDA_HOST
#include "cuda_host/cuda_host.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one needs the cuSPARSE/cuBLAS headers

namespace segfp16 {
namespace launch {

using DeviceGuard = c10::cuda::CUDAGuard;

inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }

inline int sm_count(const at::Tensor& t) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()));
  return sms;
}

template <auto Kernel, typename... KArgs, typename... Args>
void launch_as(void (*)(KArgs...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  Kernel<<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>(static_cast<KArgs>(std::forward<Args>(args))...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// launch<kernel<...>>(grid, block, dynamic_smem_bytes, kernel args...) on the current stream
template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, Args&&... args) {
  launch_as<Kernel>(Kernel, grid, block, smem, std::forward<Args>(args)...);
}

}  // namespace launch
}  // namespace segfp16

// extern __shared__ memory of a kernel as T* (the host runner gives each block its own arena instead)
#define SEGFP16_DYNAMIC_SMEM(T, name)                   \
  extern __shared__ __align__(16) unsigned char name##_raw[]; \
  T* name = reinterpret_cast<T*>(name##_raw)

// a static __shared__ array, SEGFP16_STATIC_SMEM(float, sh, [2][256]) (the host runner registers it, to fill it with
// NaN before each block)
#define SEGFP16_STATIC_SMEM(T, name, dims) __shared__ T name dims

// Registers `fn(m)`'s kernels for the CUDA key of the segfp16 library
#define SEGFP16_REGISTER_CUDA(fn) \
  TORCH_LIBRARY_IMPL(segfp16, CUDA, m) { fn(m); }
#endif
