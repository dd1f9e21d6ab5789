// The bn_relu CPU loops for AVX2 + FMA + F16C (Haswell and later); see bn_relu_cpu.h.
#include "bn_relu_cpu.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#endif
#define SEGFP16_ISA avx2
#include "bn_relu_cpu_loops.h"
