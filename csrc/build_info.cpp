// segfp16::build_info: a CPU-side op that says which backends this build of common._C holds.
#include <torch/library.h>

#include <string>

namespace segfp16 {

std::string build_info() {
#ifdef WITH_CUDA
  return "cpu+cuda";
#else
  return "cpu";
#endif
}

}  // namespace segfp16

TORCH_LIBRARY_IMPL(segfp16, CatchAll, m) { m.impl("build_info", &segfp16::build_info); }
