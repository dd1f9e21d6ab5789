// The CUDA upsample kernels and ops, compiled as C++ for the host runner (see cuda_host.h).
#include "../upsample_cuda.cu"
