// The CUDA bn_relu kernels and ops, compiled as C++ for the host runner (see cuda_host.h).
#include "../bn_relu_cuda.cu"
