// The schemas of the kernel ops, shared by the segfp16 library (csrc/ops.cpp) and the host build of the CUDA ops
// (csrc/cuda_host/library.cpp, which registers the same ops under its own library name).
#pragma once

#include <torch/library.h>

namespace segfp16 {

inline void def_kernel_ops(torch::Library& m) {
  // ---- bn_relu family (Kernels I): y = act(batch_norm(x) + residual), act = ReLU or identity; csrc/bn_relu.{cpp,cu}.
  // Per-channel tensors are float32 (float64 when x is float64), x/residual/y/dy share one dtype (fp32/fp64/fp16/bf16).
  // Statistics are split from application so SyncBN can all-gather / all-reduce between the halves on the device:
  //   forward  = bn_stats -> [merge over ranks] -> bn_apply
  //   backward = bn_backward_reduce -> [all-reduce the two sums] -> bn_backward_apply
  // bn_stats: per-channel mean and M2 = sum((x - mean)^2) (two-pass, so fp16 inputs with a large mean stay exact).
  m.def("bn_stats(Tensor x) -> (Tensor mean, Tensor m2)");
  // bn_apply: act((x - mean) * invstd * weight + bias + residual). Also the eval forward (running stats).
  m.def("bn_apply(Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, Tensor? residual, bool relu) -> Tensor");
  // bn_relu_train: bn_stats + bn_apply in one op (the single-device training forward, the op autograd sees).
  // Returns y, the batch mean and the biased batch variance (bn_relu updates the running stats from them).
  m.def("bn_relu_train(Tensor x, Tensor weight, Tensor bias, Tensor? residual, float eps, bool relu) -> (Tensor y, Tensor mean, Tensor var)");
  // bn_backward_reduce: dz = dy * (y > 0) (dy when relu is false); returns sum(dz) = dbias and
  // sum(dz * xhat) = dweight, per channel. The ReLU mask comes from the saved output y (no mask tensor kept).
  m.def("bn_backward_reduce(Tensor dy, Tensor y, Tensor x, Tensor mean, Tensor invstd, bool relu) -> (Tensor sum_dz, Tensor sum_dz_xhat)");
  // bn_backward_apply: dx = weight * invstd * (dz - mean_dz - xhat * mean_dz_xhat), where mean_dz = sum_dz / count
  // (zeros in eval mode, where the statistics are constants); dres = dz when residual_grad, else an empty tensor.
  m.def("bn_backward_apply(Tensor dy, Tensor y, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor mean_dz, Tensor mean_dz_xhat, bool relu, bool residual_grad) -> (Tensor dx, Tensor dres)");
  // ---- upsample family (Kernels II): bilinear upsampling fused into its consumers; csrc/upsample.{h,cpp,cu}.
  // upsample_concat == cat([interpolate(t, size, 'bilinear', align_corners) for t in inputs], 1), written straight
  // into one output in the layout of inputs[0] (channels_last iff it is unambiguously channels_last).
  m.def("upsample_concat(Tensor[] inputs, SymInt[2] size, bool align_corners=False) -> Tensor");
  // Its gather backward (no atomics): one gradient per input, shaped (N, channels[i], heights[i], widths[i]).
  m.def("upsample_concat_backward(Tensor grad_output, SymInt[] channels, SymInt[] heights, SymInt[] widths, bool align_corners) -> Tensor[]");
  // upsample_cross_entropy == cross_entropy(interpolate(logits, target.shape[-2:], 'bilinear'), target, ignore_index)
  // (mean over valid pixels; 0 when none) without full-resolution logits. Returns the fp32 loss (fp64 for fp64
  // logits) and the per-pixel log-sum-exp (N, H, W) that the backward reuses.
  m.def("upsample_cross_entropy(Tensor logits, Tensor target, int ignore_index=255) -> (Tensor loss, Tensor lse)");
  // d loss / d logits at the logits' resolution, in the logits' dtype and layout.
  m.def("upsample_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, int ignore_index) -> Tensor");
}

}  // namespace segfp16
