// The one schema file: every op of the `segfp16` library is declared here, once, as a string. Each op family
// registers its implementations in its own files (<family>.cpp: CPU, <family>.cu: CUDA) with TORCH_LIBRARY_IMPL,
// so the dispatcher routes by device and no source needs an `if (x.is_cuda())`.
#include <Python.h>
#include <torch/library.h>

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
  // ---- bn_relu family (Kernels I): schemas go here
  // ---- upsample family (Kernels II): schemas go here
}
