// Shared by bn_relu.cpp (CPU) and bn_relu_cuda.cu (CUDA): how a tensor is viewed, and the argument checks.
//
// Layouts: NCHW (any dim >= 2, viewed as [N, C, S]) and channels_last (4-D, viewed as [N*H*W, C]). Any other strides
// are first copied to the layout suggest_memory_format picks (a sliced channels_last tensor stays channels_last).
// Outputs are written in that layout; the fake kernels in common/ops.py (_bn_like) mirror format_of.
#pragma once

#include <ATen/ATen.h>

namespace segfp16 {
namespace bnr {  // not `segfp16::` itself: upsample.h has its own layout_of

struct Layout {
  int64_t N, C, S;  // x viewed as [N, C, S] (NCHW) or [N*S, C] (channels_last)
  bool cl;
  int64_t count() const { return N * S; }  // values per channel
};

inline at::MemoryFormat format_of(const at::Tensor& x) {
  return (x.dim() == 4 && x.suggest_memory_format() == at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                                      : at::MemoryFormat::Contiguous;
}

inline Layout layout_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "segfp16 bn_relu: x must be [N, C, ...], got shape ", x.sizes());
  Layout l{x.size(0), x.size(1), 1, format_of(x) == at::MemoryFormat::ChannelsLast};
  for (int64_t d = 2; d < x.dim(); ++d) l.S *= x.size(d);
  return l;
}

// A [C] per-channel tensor as contiguous acc_t (float, or double for fp64 x).
inline at::Tensor per_channel(const at::Tensor& t, const char* name, int64_t C, at::ScalarType acc) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "segfp16 bn_relu: ", name, " must have shape [", C, "], got ", t.sizes());
  return t.to(acc).contiguous();
}

// Same shape, dtype and layout as x (x already made contiguous in its memory format).
inline at::Tensor like_x(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "segfp16 bn_relu: ", name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "segfp16 bn_relu: ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  return t.contiguous(format_of(x));
}

inline at::ScalarType acc_type_of(const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "segfp16 bn_relu: x must be floating point, got ", x.scalar_type());
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace bnr
}  // namespace segfp16
