// The bn_relu CPU loops for baseline x86-64 (SSE2): the fallback for any CPU; see bn_relu_cpu.h.
#include "bn_relu_cpu.h"

#define SEGFP16_ISA base
#include "bn_relu_cpu_loops.h"
