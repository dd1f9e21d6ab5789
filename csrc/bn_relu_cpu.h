// The CPU loops of the bn_relu family, compiled once per instruction set and picked at run time (as ATen does with
// its DispatchStub): bn_relu_cpu_{base,avx2,avx512}.cpp each include bn_relu_cpu_loops.h under their own
// `#pragma GCC target`, and bn_relu.cpp (argument checks, allocation, per-channel folding) calls cpu_loops().
// Why: torch's CPU kernels run AVX2/AVX512 code while an extension is built for baseline x86-64 (SSE2), where our
// bf16 loops ran 3-5x slower than ATen's (SSE2 has no cheap float -> bf16 packing).
//
// The loops work on raw pointers: x, residual, y, dy, dx, dres in the dtype `t` (fp32/fp64/fp16/bf16, one layout,
// see bn_relu.h); per-channel arrays in acc_t (double for fp64, float otherwise). Every variant sums in the same
// order and setup.py builds with -ffp-contract=off (no FMA contraction), so all variants give the same bits.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bn_relu.h"

namespace segfp16 {
namespace bnr {

#define SEGFP16_BNR_LOOPS(isa)                                                                                       \
  namespace isa {                                                                                                    \
  /* mean[c] = mean of x; m2[c] = sum((x - mean)^2) (two passes) */                                                  \
  void stats(at::ScalarType t, const Layout& l, const void* x, void* mean, void* m2);                                \
  /* y = act((x - mean) * scale + bias + res); res may be null */                                                     \
  void apply(at::ScalarType t, const Layout& l, const void* x, const void* res, void* y, const void* mean,            \
             const void* scale, const void* bias, bool relu);                                                         \
  /* sum_dz[c] = sum(dz), sum_dz_xm[c] = sum(dz * (x - mean)), dz = dy * (y > 0) (dy when !relu; y unread) */         \
  void backward_reduce(at::ScalarType t, const Layout& l, const void* dy, const void* y, const void* x,               \
                       const void* mean, void* sum_dz, void* sum_dz_xm, bool relu);                                   \
  /* dx = k * (dz - a - (x - mean) * q); dres = dz when dres is not null */                                           \
  void backward_apply(at::ScalarType t, const Layout& l, const void* dy, const void* y, const void* x, void* dx,       \
                      void* dres, const void* mean, const void* k, const void* a, const void* q, bool relu);          \
  }

SEGFP16_BNR_LOOPS(base)
SEGFP16_BNR_LOOPS(avx2)
SEGFP16_BNR_LOOPS(avx512)
#undef SEGFP16_BNR_LOOPS

struct CpuLoops {
  const char* isa;  // "base" (SSE2), "avx2" (+FMA, F16C) or "avx512" (F, BW, VL, DQ)
  decltype(&base::stats) stats;
  decltype(&base::apply) apply;
  decltype(&base::backward_reduce) backward_reduce;
  decltype(&base::backward_apply) backward_apply;
};

// The best variant this CPU runs, chosen once; SEGFP16_CPU_ISA=base|avx2|avx512 picks one (tests, benchmarks).
const CpuLoops& cpu_loops();

}  // namespace bnr
}  // namespace segfp16
