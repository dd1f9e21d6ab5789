// The bn_relu CPU loops, one copy per instruction set: included (only) by bn_relu_cpu_<isa>.cpp, which first
// includes bn_relu_cpu.h, then sets `#pragma GCC target` and SEGFP16_ISA. No #include here: everything from headers
// stays compiled for baseline x86-64 (so no inline function of ATen's is emitted with AVX code that another object
// file could pick up), and only the functions below, all in this variant's own namespace, get the wider vectors.
//
// The passes (the CUDA kernels in bn_relu_cuda.cu make the same ones with the same formulas):
//   stats:           pass 1 sum(x) -> mean, pass 2 sum((x - mean)^2) -> M2 (two-pass: exact for fp16 inputs
//                    with a large mean)
//   apply:           y = act((x - mean) * scale + bias + res), one pass
//   backward_reduce: sum(dz), sum(dz * (x - mean)) with dz = dy * (y > 0), one pass
//   backward_apply:  dx = k * (dz - a - (x - mean) * q) and dres = dz, one pass
// The ATen composition (F.batch_norm + add + relu, fwd+bwd) makes 2 more full passes (the add and the ReLU, each way).
//
// Sums are float (double for fp64) in kLanes independent partials (NCHW) or [C] row partials (channels_last), so
// that the loops vectorise without reassociating anything (no -ffast-math, no `omp simd reduction`, which GCC left
// scalar here), and they are merged in double in a fixed order: bitwise reproducible, for any thread count and
// in every variant.
#ifndef SEGFP16_ISA
#error "bn_relu_cpu_loops.h is included by csrc/bn_relu_cpu_<isa>.cpp only"
#endif

namespace segfp16 {
namespace bnr {
namespace SEGFP16_ISA {
namespace {

constexpr int64_t kLanes = 16;           // NCHW: independent partial sums per channel (one AVX512 float vector)
constexpr int64_t kFlush = 1 << 14;      // NCHW: values summed in float lanes before they are added to a double
constexpr int64_t kRowsPerChunk = 256;   // channels_last: rows per [C] partial (float sums over <= 256 values)

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<scalar_t>{}) for the dtype t
template <typename F>
void by_dtype(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: return f(Tag<float>{});
    case at::kDouble: return f(Tag<double>{});
    case at::kHalf: return f(Tag<c10::Half>{});
    case at::kBFloat16: return f(Tag<c10::BFloat16>{});
    default: TORCH_CHECK(false, "segfp16 bn_relu: unsupported dtype ", t);
  }
}

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Load as acc_t. bf16 -> float is the bits shifted up (what c10 does), written here so that it vectorises.
template <typename acc_t, typename T>
inline acc_t ld(T v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t u = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    return static_cast<acc_t>(v);
  }
}

// Store: static_cast, except float -> bf16, where c10's conversion branches on NaN and GCC leaves the loop scalar.
// Same bits: round to nearest even, NaN -> 0x7FC0 (c10::detail::round_to_nearest_even), written as a select.
template <typename T, typename acc_t>
inline T st(acc_t v) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

// dz = dy where y > 0 (ATen's threshold_backward: zero where y <= 0, so a NaN y lets the gradient through).
// Both loads unconditional, so that the select vectorises.
template <bool RELU, typename acc_t, typename T>
inline acc_t masked(T dy, T y) {
  const acc_t g = ld<acc_t>(dy);
  if (!RELU) return g;
  return ld<acc_t>(y) <= acc_t(0) ? acc_t(0) : g;
}

// Calls f(std::true_type) or f(std::false_type): a runtime flag as a compile-time one, so that the inner loops carry
// no branch on it (GCC vectorises them only without).
template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// parallel_for grain (in tasks) for tasks of `work` elements each: at least at::internal::GRAIN_SIZE (32768) elements
// per thread, as ATen's kernels do, so that small tensors (the pyramid bins) run inline instead of waking the pool.
int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work, 1));
}

// ---- the loop shapes every pass is made of

// NCHW maps with planes shorter than a vector (the 2x2 and 3x3 pyramid bins): per-plane loops of 4 or 9 values
// never vectorise and pay their set-up per plane (bf16 bn_apply at 4x512x3x3 took 140 us, 8 ns a value). Instead
// each image is one flat run of C * S values, and the loops below index the per-channel constants by the position i
// in the image (0 .. C*S-1), not by the channel: the entry points pass them repeated S times (per_value), so that
// they are read contiguously (gathering them by i / S was 3x slower).
bool small_planes(const Layout& l) { return !l.cl && l.S < kLanes; }

// v (a [C] array) as the loops index it: itself, or for small planes each value repeated S times (into buf)
template <typename acc_t>
const acc_t* per_value(const Layout& l, const acc_t* v, std::vector<acc_t>& buf) {
  if (!small_planes(l)) return v;
  buf.resize(static_cast<size_t>(l.C * l.S));
  for (int64_t c = 0; c < l.C; ++c) std::fill_n(buf.begin() + c * l.S, l.S, v[c]);
  return buf.data();
}

// Per-channel sums out0[c], out1[c] of term(c, i, a0, a1) (which adds element i's two terms to a0, a1) over the
// elements of channel c (c is the position in the image for small planes: see small_planes). The term is inlined
// into plain loops with independent accumulators, which vectorise:
//   small planes (NCHW, S < kLanes): [C * S] partials summed over the images (added to double every
//         kFlush / kLanes images), then over each channel's S values;
//   NCHW: channel c is N runs of S contiguous values; kLanes partials per channel (lane = offset in the run mod
//         kLanes), added to double every kFlush values; parallel over channels.
//   channels_last: rows of C values; chunks of kRowsPerChunk rows each fill private [C] partials, merged per
//         channel in double; parallel over chunks, then over channels.
// Chunking depends only on the shape, not on the thread count.
template <typename acc_t, typename Term>
void channel_sums(const Layout& l, acc_t* out0, acc_t* out1, const Term& term) {
  const int64_t C = l.C;
  if (small_planes(l)) {  // [C * S] partials, one flat loop per image, then the S values of each channel
    const int64_t CS = C * l.S;
    std::vector<acc_t> p0(static_cast<size_t>(CS)), p1(static_cast<size_t>(CS));
    std::vector<double> d0(static_cast<size_t>(CS), 0.0), d1(static_cast<size_t>(CS), 0.0);
    acc_t* __restrict__ q0 = p0.data();
    acc_t* __restrict__ q1 = p1.data();
    for (int64_t n0 = 0; n0 < l.N; n0 += kFlush / kLanes) {
      std::fill(p0.begin(), p0.end(), acc_t(0));
      std::fill(p1.begin(), p1.end(), acc_t(0));
      for (int64_t n = n0; n < std::min(l.N, n0 + kFlush / kLanes); ++n) {
        const int64_t base = n * CS;
        _Pragma("omp simd")
        for (int64_t i = 0; i < CS; ++i) term(i, base + i, q0[i], q1[i]);
      }
      for (int64_t i = 0; i < CS; ++i) {
        d0[i] += q0[i];
        d1[i] += q1[i];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      double t0 = 0, t1 = 0;
      for (int64_t s = c * l.S; s < (c + 1) * l.S; ++s) {
        t0 += d0[s];
        t1 += d1[s];
      }
      out0[c] = static_cast<acc_t>(t0);
      out1[c] = static_cast<acc_t>(t1);
    }
    return;
  }
  if (!l.cl) {
    at::parallel_for(0, C, grain_for(l.count()), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        acc_t p0[kLanes], p1[kLanes];
        double t0 = 0, t1 = 0;
        int64_t pending = 0;  // values in the lanes
        auto flush = [&] {
          for (int64_t w = kLanes / 2; w > 0; w /= 2) {  // a fixed pairwise tree
            for (int64_t j = 0; j < w; ++j) {
              p0[j] += p0[j + w];
              p1[j] += p1[j + w];
            }
          }
          t0 += p0[0];
          t1 += p1[0];
          std::fill(p0, p0 + kLanes, acc_t(0));
          std::fill(p1, p1 + kLanes, acc_t(0));
          pending = 0;
        };
        std::fill(p0, p0 + kLanes, acc_t(0));
        std::fill(p1, p1 + kLanes, acc_t(0));
        for (int64_t n = 0; n < l.N; ++n) {
          const int64_t base = (n * C + c) * l.S;
          int64_t i = 0;
          for (; i + kLanes <= l.S; i += kLanes) {
            _Pragma("omp simd")
            for (int64_t j = 0; j < kLanes; ++j) term(c, base + i + j, p0[j], p1[j]);
          }
          for (int64_t j = 0; i + j < l.S; ++j) term(c, base + i + j, p0[j], p1[j]);
          pending += l.S;
          if (pending >= kFlush) flush();
        }
        flush();
        out0[c] = static_cast<acc_t>(t0);
        out1[c] = static_cast<acc_t>(t1);
      }
    });
    return;
  }
  const int64_t R = l.N * l.S, chunks = (R + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<acc_t> part(static_cast<size_t>(2 * chunks * C), acc_t(0));
  at::parallel_for(0, chunks, grain_for(kRowsPerChunk * C), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* __restrict__ p0 = part.data() + (2 * k) * C;
      acc_t* __restrict__ p1 = p0 + C;
      for (int64_t r = k * kRowsPerChunk; r < std::min(R, (k + 1) * kRowsPerChunk); ++r) {
        const int64_t base = r * C;
        _Pragma("omp simd")
        for (int64_t c = 0; c < C; ++c) term(c, base + c, p0[c], p1[c]);
      }
    }
  });
  at::parallel_for(0, C, grain_for(chunks), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double t0 = 0, t1 = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        t0 += part[(2 * k) * C + c];
        t1 += part[(2 * k + 1) * C + c];
      }
      out0[c] = static_cast<acc_t>(t0);
      out1[c] = static_cast<acc_t>(t1);
    }
  });
}

// Elementwise pass: f(c, i) for every element i of channel c (c as in channel_sums). NCHW: parallel over the N * C planes (over images for
// small planes); channels_last: parallel over rows.
template <typename F>
void for_each_element(const Layout& l, const F& f) {
  const int64_t C = l.C, S = l.S;
  if (small_planes(l)) {  // one flat loop per image
    at::parallel_for(0, l.N, grain_for(C * S), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t base = n * C * S;
        _Pragma("omp simd")
        for (int64_t i = 0; i < C * S; ++i) f(i, base + i);
      }
    });
    return;
  }
  if (!l.cl) {
    at::parallel_for(0, l.N * C, grain_for(S), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % C, base = p * S;
        _Pragma("omp simd")
        for (int64_t i = base; i < base + S; ++i) f(c, i);
      }
    });
    return;
  }
  at::parallel_for(0, l.N * S, grain_for(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * C;
      _Pragma("omp simd")
      for (int64_t c = 0; c < C; ++c) f(c, base + c);
    }
  });
}

}  // namespace

// ---- the four entry points (declared in bn_relu_cpu.h)

void stats(at::ScalarType t, const Layout& l, const void* x_, void* mean_, void* m2_) {
  by_dtype(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_of<T>;
    const T* __restrict__ x = static_cast<const T*>(x_);
    acc_t* mean = static_cast<acc_t*>(mean_);
    std::vector<acc_t> unused(static_cast<size_t>(l.C)), buf;
    channel_sums<acc_t>(l, mean, unused.data(), [&](int64_t, int64_t i, acc_t& a0, acc_t&) { a0 += ld<acc_t>(x[i]); });
    for (int64_t c = 0; c < l.C; ++c) mean[c] /= static_cast<acc_t>(l.count());
    const acc_t* __restrict__ m = per_value(l, static_cast<const acc_t*>(mean), buf);
    channel_sums<acc_t>(l, static_cast<acc_t*>(m2_), unused.data(), [&](int64_t c, int64_t i, acc_t& a0, acc_t&) {
      const acc_t d = ld<acc_t>(x[i]) - m[c];
      a0 += d * d;
    });
  });
}

void apply(at::ScalarType t, const Layout& l, const void* x_, const void* res_, void* y_, const void* mean_,
           const void* scale_, const void* bias_, bool relu) {
  by_dtype(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_of<T>;
    const T* __restrict__ x = static_cast<const T*>(x_);
    const T* __restrict__ res = static_cast<const T*>(res_);
    T* __restrict__ y = static_cast<T*>(y_);
    std::vector<acc_t> b0, b1, b2;
    const acc_t* __restrict__ mean = per_value(l, static_cast<const acc_t*>(mean_), b0);
    const acc_t* __restrict__ scale = per_value(l, static_cast<const acc_t*>(scale_), b1);
    const acc_t* __restrict__ bias = per_value(l, static_cast<const acc_t*>(bias_), b2);
    with_flag(relu, [&](auto relu_t) {
      with_flag(res != nullptr, [&](auto res_t) {
        constexpr bool RELU = decltype(relu_t)::value, RES = decltype(res_t)::value;
        for_each_element(l, [&](int64_t c, int64_t i) {
          // (x - mean) first, so that a large mean cancels exactly; act written so that NaN passes, as torch.relu
          const acc_t o = (ld<acc_t>(x[i]) - mean[c]) * scale[c] + bias[c] + (RES ? ld<acc_t>(res[i]) : acc_t(0));
          y[i] = st<T>(RELU ? (o < acc_t(0) ? acc_t(0) : o) : o);
        });
      });
    });
  });
}

void backward_reduce(at::ScalarType t, const Layout& l, const void* dy_, const void* y_, const void* x_,
                     const void* mean_, void* sum_dz, void* sum_dz_xm, bool relu) {
  by_dtype(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_of<T>;
    const T* __restrict__ dy = static_cast<const T*>(dy_);
    const T* __restrict__ y = static_cast<const T*>(relu ? y_ : dy_);
    const T* __restrict__ x = static_cast<const T*>(x_);
    std::vector<acc_t> buf;
    const acc_t* __restrict__ mean = per_value(l, static_cast<const acc_t*>(mean_), buf);
    with_flag(relu, [&](auto relu_t) {
      constexpr bool RELU = decltype(relu_t)::value;
      channel_sums<acc_t>(l, static_cast<acc_t*>(sum_dz), static_cast<acc_t*>(sum_dz_xm),
                          [&](int64_t c, int64_t i, acc_t& a0, acc_t& a1) {
                            const acc_t dz = masked<RELU, acc_t>(dy[i], y[i]);
                            a0 += dz;
                            a1 += dz * (ld<acc_t>(x[i]) - mean[c]);
                          });
    });
  });
}

void backward_apply(at::ScalarType t, const Layout& l, const void* dy_, const void* y_, const void* x_, void* dx_,
                    void* dres_, const void* mean_, const void* k_, const void* a_, const void* q_, bool relu) {
  by_dtype(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_of<T>;
    const T* __restrict__ dy = static_cast<const T*>(dy_);
    const T* __restrict__ y = static_cast<const T*>(relu ? y_ : dy_);
    const T* __restrict__ x = static_cast<const T*>(x_);
    T* __restrict__ dx = static_cast<T*>(dx_);
    T* __restrict__ dres = static_cast<T*>(dres_);
    std::vector<acc_t> b0, b1, b2, b3;
    const acc_t* __restrict__ mean = per_value(l, static_cast<const acc_t*>(mean_), b0);
    const acc_t* __restrict__ k = per_value(l, static_cast<const acc_t*>(k_), b1);
    const acc_t* __restrict__ a = per_value(l, static_cast<const acc_t*>(a_), b2);
    const acc_t* __restrict__ q = per_value(l, static_cast<const acc_t*>(q_), b3);
    with_flag(relu, [&](auto relu_t) {
      with_flag(dres != nullptr, [&](auto dres_t) {
        constexpr bool RELU = decltype(relu_t)::value, DRES = decltype(dres_t)::value;
        for_each_element(l, [&](int64_t c, int64_t i) {
          const acc_t dz = masked<RELU, acc_t>(dy[i], y[i]);
          dx[i] = st<T>(k[c] * (dz - a[c] - (ld<acc_t>(x[i]) - mean[c]) * q[c]));
          if (DRES) dres[i] = st<T>(dz);
        });
      });
    });
  });
}

}  // namespace SEGFP16_ISA
}  // namespace bnr
}  // namespace segfp16
