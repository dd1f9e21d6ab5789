// The one schema file: every op of the `segfp16` library is declared here, once, as a string. Each op family
// registers its implementations in its own files (<family>.cpp: CPU, <family>_cuda.cu: CUDA; the suffix because
// ninja names objects by stem) with TORCH_LIBRARY_IMPL, so the dispatcher routes by device and no source needs an
// `if (x.is_cuda())`.
#include <Python.h>
#include <torch/library.h>

#include "ops_schema.h"

extern "C" {
// `import common._C` loads this .so, which runs the static registrations below; no pybind11 needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(segfp16, m) {
  // ---- build info: which backends this build holds (CPU always; CUDA when compiled with nvcc)
  m.def("build_info() -> str");
  // bn_relu: bn_relu_train, then the running stats updated in place (PyTorch's rule, unbiased variance): the training
  // call of common.ops.bn_relu, one op from Python. A C++ composite of bn_relu_train and ATen ops (no fake kernel
  // needed: torch.compile decomposes it); csrc/bn_relu_autograd.cpp.
  m.def("bn_relu(Tensor x, Tensor weight, Tensor bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? residual, float momentum, float eps, bool relu) -> Tensor");
  // bn_cpu_isa: which instruction-set variant of the CPU loops runs here (csrc/bn_relu_cpu.h): base, avx2 or avx512.
  m.def("bn_cpu_isa() -> str");
  // ---- the kernel ops (bn_relu and upsample families): csrc/ops_schema.h
  segfp16::def_kernel_ops(m);
}
