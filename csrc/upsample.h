// Shared by upsample.cpp (CPU) and upsample_cuda.cu (CUDA): PyTorch's bilinear source-index rule, the layout rule
// and the argument checks.
//
// Bilinear, align_corners=False, no scale_factor (what F.interpolate(size=...) passes down), per axis:
//   scale = in / out                        (align_corners=True: (in - 1) / (out - 1), or 0 when out == 1)
//   src   = scale * (o + 0.5) - 0.5, clamped below at 0   (align_corners=True: scale * o)
//   i0 = floor(src), i1 = i0 + (i0 < in - 1), l1 = src - i0, l0 = 1 - l1
// exactly as aten/src/ATen/native/UpSample.h (area_pixel_compute_scale / area_pixel_compute_source_index) and
// the CPU kernel's guard_index_and_lambda, computed in the op-math type (float for half/bf16/float, double for
// double), so that our weights are the ones ATen uses. Equal sizes are an exact copy on that axis (ATen's shortcut).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

namespace segfp16 {

template <typename acc_t>
C10_HOST_DEVICE inline acc_t up_scale(int64_t in, int64_t out, bool align_corners) {
  if (align_corners) return out > 1 ? static_cast<acc_t>(in - 1) / static_cast<acc_t>(out - 1) : acc_t(0);
  return static_cast<acc_t>(in) / static_cast<acc_t>(out);
}

// Output index o reads sources i0 and i1 with weights l0 and l1 (i0 == i1 on the last source row/column).
template <typename acc_t>
C10_HOST_DEVICE inline void up_index(acc_t scale, int64_t o, int64_t in, int64_t out, bool align_corners,
                                     int64_t& i0, int64_t& i1, acc_t& l0, acc_t& l1) {
  if (in == out) {
    i0 = i1 = o;
    l0 = acc_t(1);
    l1 = acc_t(0);
    return;
  }
  acc_t src = align_corners ? scale * static_cast<acc_t>(o)
                            : scale * (static_cast<acc_t>(o) + acc_t(0.5)) - acc_t(0.5);
  if (src < acc_t(0)) src = acc_t(0);
  int64_t i = static_cast<int64_t>(src);  // floor, src >= 0
  if (i > in - 1) i = in - 1;
  acc_t lam = src - static_cast<acc_t>(i);
  lam = lam < acc_t(0) ? acc_t(0) : (lam > acc_t(1) ? acc_t(1) : lam);
  i0 = i;
  i1 = i + (i < in - 1 ? 1 : 0);
  l1 = lam;
  l0 = acc_t(1) - lam;
}

// Weight with which output o reads source i (0 when it does not); the backward's gather sums g[o] * weight.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t up_weight(acc_t scale, int64_t o, int64_t i, int64_t in, int64_t out, bool align_corners) {
  int64_t i0, i1;
  acc_t l0, l1;
  up_index<acc_t>(scale, o, in, out, align_corners, i0, i1, l0, l1);
  return (i0 == i ? l0 : acc_t(0)) + (i1 == i ? l1 : acc_t(0));
}

// The outputs [lo, hi) that can read source i, computed analytically from the inverse of the index map and
// widened by 2 on each side against rounding; the weights inside come from up_index, so a too-wide range only
// costs a few zero-weight iterations. src(o) in (i - 1, i + 1) <=> o in ((i - 0.5) / scale - 0.5, (i + 1.5) / scale - 0.5).
template <typename acc_t>
C10_HOST_DEVICE inline void up_range(acc_t scale, int64_t i, int64_t in, int64_t out, bool align_corners,
                                     int64_t& lo, int64_t& hi) {
  if (in == out) {
    lo = i;
    hi = i + 1;
    return;
  }
  if (scale <= acc_t(0)) {  // align_corners with out == 1: every output reads source 0
    lo = 0;
    hi = out;
    return;
  }
  double a, b;
  if (align_corners) {
    a = (static_cast<double>(i) - 1.0) / static_cast<double>(scale);
    b = (static_cast<double>(i) + 1.0) / static_cast<double>(scale);
  } else {
    a = (static_cast<double>(i) - 0.5) / static_cast<double>(scale) - 0.5;
    b = (static_cast<double>(i) + 1.5) / static_cast<double>(scale) - 0.5;
  }
  if (a < 0) a = 0;
  if (b > static_cast<double>(out)) b = static_cast<double>(out);
  lo = static_cast<int64_t>(a) - 2;
  hi = static_cast<int64_t>(b) + 3;
  lo = lo < 0 ? 0 : lo;
  hi = hi > out ? out : hi;
  if (i == 0) lo = 0;               // every clamped (src < 0) output reads source 0
  if (i == in - 1) hi = out;        // and every output past the last centre reads the last source
}

// Layout rule shared with the fake kernels in common/ops.py: channels_last iff the tensor is channels_last-contiguous
// and not also plain contiguous (so (N, C, 1, 1) and C == 1 tensors count as contiguous).
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}
inline at::MemoryFormat layout_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// ---- argument checks, shared by the CPU and CUDA ops (the CUDA ones first check that every tensor is on the GPU)

inline void check_concat_inputs(const at::TensorList& inputs, at::IntArrayRef size) {
  TORCH_CHECK(!inputs.empty(), "segfp16::upsample_concat: inputs is empty");
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0, "segfp16::upsample_concat: size must be 2 positive ints, got ", size);
  const auto& t0 = inputs[0];
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto& t = inputs[i];
    TORCH_CHECK(t.dim() == 4, "segfp16::upsample_concat: inputs[", i, "] must be 4-D (N, C, H, W), got ", t.sizes());
    TORCH_CHECK(t.size(0) == t0.size(0), "segfp16::upsample_concat: inputs[", i, "] has batch ", t.size(0),
                ", inputs[0] has ", t0.size(0));
    TORCH_CHECK(t.scalar_type() == t0.scalar_type(), "segfp16::upsample_concat: inputs[", i, "] is ", t.scalar_type(),
                ", inputs[0] is ", t0.scalar_type(), " (the Python wrapper promotes mixed dtypes)");
    TORCH_CHECK(t.device() == t0.device(), "segfp16::upsample_concat: inputs[", i, "] is on ", t.device(), ", inputs[0] on ", t0.device());
    TORCH_CHECK(t.size(2) > 0 && t.size(3) > 0, "segfp16::upsample_concat: inputs[", i, "] has an empty spatial size ", t.sizes());
  }
}

// Returns the total channel count Ct (= grad_output.size(1)).
inline int64_t check_concat_backward(const at::Tensor& grad_output, at::IntArrayRef channels, at::IntArrayRef heights,
                                     at::IntArrayRef widths) {
  TORCH_CHECK(grad_output.dim() == 4, "segfp16::upsample_concat_backward: grad_output must be 4-D, got ", grad_output.sizes());
  TORCH_CHECK(channels.size() == heights.size() && channels.size() == widths.size(),
              "segfp16::upsample_concat_backward: channels/heights/widths differ in length");
  int64_t Ct = 0;
  for (auto c : channels) Ct += c;
  TORCH_CHECK(Ct == grad_output.size(1), "segfp16::upsample_concat_backward: channels sum to ", Ct,
              " but grad_output has ", grad_output.size(1));
  return Ct;
}

inline void check_ce_inputs(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 4, "segfp16::upsample_cross_entropy: logits must be (N, C, h, w), got ", logits.sizes());
  TORCH_CHECK(target.dim() == 3 && target.size(0) == logits.size(0), "segfp16::upsample_cross_entropy: target must be (N, H, W) with N = ",
              logits.size(0), ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "segfp16::upsample_cross_entropy: target must be int64, got ", target.scalar_type());
  TORCH_CHECK(logits.size(1) > 0 && logits.size(2) > 0 && logits.size(3) > 0, "segfp16::upsample_cross_entropy: empty logits ", logits.sizes());
  TORCH_CHECK(target.device() == logits.device(), "segfp16::upsample_cross_entropy: target on ", target.device(), ", logits on ", logits.device());
}

inline void check_ce_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                              const at::Tensor& lse) {
  check_ce_inputs(logits, target);
  TORCH_CHECK(grad_loss.numel() == 1, "segfp16::upsample_cross_entropy_backward: grad_loss must be a scalar, got ", grad_loss.sizes());
  const auto acc = at::toOpMathType(logits.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc && lse.sizes() == target.sizes(),
              "segfp16::upsample_cross_entropy_backward: lse must be ", acc, " ", target.sizes(), ", got ", lse.scalar_type(), " ", lse.sizes());
  // the kernel reads lse by pointer: on another GPU that would be another device's memory
  TORCH_CHECK(lse.device() == logits.device() && grad_loss.device() == logits.device(),
              "segfp16::upsample_cross_entropy_backward: lse on ", lse.device(), " and grad_loss on ", grad_loss.device(),
              ", logits on ", logits.device());
}

}  // namespace segfp16
