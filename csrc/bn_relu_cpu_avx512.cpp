// The bn_relu CPU loops for AVX512 F/BW/VL/DQ (Skylake-X and later); see bn_relu_cpu.h.
#include "bn_relu_cpu.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#define SEGFP16_ISA avx512
#include "bn_relu_cpu_loops.h"
