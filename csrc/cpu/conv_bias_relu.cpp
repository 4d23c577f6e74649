// conv_bias_relu on the CPU: y = relu(conv2d(x, weight, bias)).
//
// Forward: oneDNN's convolution with a ReLU post-op (ATen's mkldnn::_convolution_pointwise), so the output is
// written once; where this torch lacks it, or for algo="library", ATen's convolution followed by one in-place
// OpenMP ReLU pass. float16 has no fast CPU convolution: it is computed in float32 and rounded once;
// float64 (for gradient checks) takes the ATen path.
//
// Backward: one OpenMP pass over (grad_y, y) gives grad_z = grad_y * (y > 0) and grad_bias; ATen's
// convolution_backward then gives grad_x and grad_weight from grad_z. Only y is saved, never the
// pre-activation. Arguments are validated in Python (fastmtl/ops/conv_bias_relu.py) before we get here.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace fastmtl {
namespace {

at::MemoryFormat layout_of(const at::Tensor& t) { return t.suggest_memory_format(); }

std::vector<int64_t> conv_output_shape(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  std::vector<int64_t> shape{x.size(0), w.size(0)};
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = dilation[d] * (w.size(2 + d) - 1) + 1;
    shape.push_back((x.size(2 + d) + 2 * padding[d] - extent) / stride[d] + 1);
  }
  return shape;
}

// Applies max(v, 0) in place with one parallel pass over a dense tensor.
void relu_inplace(at::Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "relu_inplace", [&] {
    scalar_t* data = y.data_ptr<scalar_t>();
    const int64_t n = y.numel();
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (!(static_cast<at::opmath_type<scalar_t>>(data[i]) > 0)) data[i] = scalar_t(0);
      }
    });
  });
}

bool has_mkldnn_pointwise() {
  static const bool found =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", ""}).has_value();
  return found;
}

at::Tensor conv_relu_onednn(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                         c10::string_view, c10::List<c10::optional<at::Scalar>>,
                                         c10::optional<c10::string_view>)>();
  c10::List<c10::optional<at::Scalar>> scalars;
  scalars.push_back(c10::nullopt);
  const auto fmt = layout_of(x);
  // oneDNN wants the weight in the input's layout; it is small, so this copy is cheap when needed.
  return op.call(x.contiguous(fmt), w.contiguous(fmt), b, padding, stride, dilation, groups, "relu", scalars,
                 c10::nullopt);
}

at::Tensor conv_bias_relu_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, c10::string_view algo) {
  const auto fmt = layout_of(x);
  if (x.size(0) == 0) {
    return at::empty(conv_output_shape(x, weight, stride, padding, dilation), x.options().memory_format(fmt));
  }
  if (x.scalar_type() == at::kHalf) {  // no float16 convolution on this CPU: float32 math, one rounding
    c10::optional<at::Tensor> bias32;
    if (bias.has_value()) bias32 = bias->to(at::kFloat);
    return conv_bias_relu_cpu(x.to(at::kFloat), weight.to(at::kFloat), bias32, stride, padding, dilation, groups,
                              algo)
        .to(at::kHalf);
  }
  const bool use_onednn =
      algo != "library" && x.scalar_type() != at::kDouble && has_mkldnn_pointwise() && at::hasMKLDNN();
  if (use_onednn) {
    return conv_relu_onednn(x, weight, bias, stride, padding, dilation, groups);
  }
  at::Tensor y = at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, groups);
  y = y.contiguous(fmt);
  relu_inplace(y);
  return y;
}

// One contiguous run of n elements: gz = gy where y > 0 else 0; returns the sum of gz. Both inputs are loaded
// unconditionally and selected without a branch, so the loop vectorizes (y > 0 is a coin flip for a branch).
template <typename scalar_t, typename acc_t>
acc_t relu_grad_run(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ y, scalar_t* __restrict__ gz,
                    int64_t n) {
  acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(gy[i]);
    const acc_t v = static_cast<acc_t>(y[i]) > acc_t(0) ? g : acc_t(0);
    gz[i] = static_cast<scalar_t>(v);
    acc += v;
  }
  return acc;
}

// bfloat16 on its raw bits: gz is either gy or +0 (no rounding), so the select works on uint16. A bit pattern b is
// a value in (0, +inf] exactly when b - 1 < 0x7F80 as uint16 (zero wraps around; negatives and NaNs are larger).
// Written with GCC vector types: the c10::BFloat16 conversions, and even this scalar code once inlined into the
// parallel_for lambda, stay scalar (~5x slower than float32).
inline bool bf16_positive(uint16_t bits) { return static_cast<uint16_t>(bits - 1) < 0x7F80; }
inline float bf16_to_float(uint16_t bits) { return __builtin_bit_cast(float, static_cast<uint32_t>(bits) << 16); }

typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef float f32x4 __attribute__((vector_size(16)));

// 8 lanes: gz = y > 0 ? gy : 0; lo / hi get lanes 0-3 / 4-7 of gz widened to float32.
inline void relu_grad_bf16x8(const uint16_t* gy, const uint16_t* y, uint16_t* gz, f32x4& lo_out, f32x4& hi_out) {
  u16x8 vy, vg;
  __builtin_memcpy(&vy, y, sizeof vy);
  __builtin_memcpy(&vg, gy, sizeof vg);
  const u16x8 keep = (vy - 1) < 0x7F80;  // all ones where kept
  const u16x8 v = vg & keep;
  __builtin_memcpy(gz, &v, sizeof v);
  const u16x8 lo_idx = {0, 1, 2, 3, 0, 0, 0, 0}, hi_idx = {4, 5, 6, 7, 0, 0, 0, 0};
  typedef uint16_t u16x4 __attribute__((vector_size(8)));
  const u16x8 lo8 = __builtin_shuffle(v, lo_idx), hi8 = __builtin_shuffle(v, hi_idx);
  u16x4 lo, hi;
  __builtin_memcpy(&lo, &lo8, sizeof lo);
  __builtin_memcpy(&hi, &hi8, sizeof hi);
  const u32x4 lo32 = __builtin_convertvector(lo, u32x4) << 16, hi32 = __builtin_convertvector(hi, u32x4) << 16;
  __builtin_memcpy(&lo_out, &lo32, sizeof lo_out);
  __builtin_memcpy(&hi_out, &hi32, sizeof hi_out);
}

inline float relu_grad_run_bf16(const uint16_t* gy, const uint16_t* y, uint16_t* gz, int64_t n) {
  f32x4 acc = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    f32x4 lo, hi;
    relu_grad_bf16x8(gy + i, y + i, gz + i, lo, hi);
    acc += lo + hi;
  }
  float total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  for (; i < n; ++i) {
    const uint16_t v = bf16_positive(y[i]) ? gy[i] : uint16_t(0);
    gz[i] = v;
    total += bf16_to_float(v);
  }
  return total;
}

inline void relu_grad_row_bf16(const uint16_t* gy, const uint16_t* y, uint16_t* gz, float* acc, int64_t C) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    f32x4 lo, hi, a_lo, a_hi;
    relu_grad_bf16x8(gy + c, y + c, gz + c, lo, hi);
    __builtin_memcpy(&a_lo, acc + c, sizeof a_lo);
    __builtin_memcpy(&a_hi, acc + c + 4, sizeof a_hi);
    a_lo += lo;
    a_hi += hi;
    __builtin_memcpy(acc + c, &a_lo, sizeof a_lo);
    __builtin_memcpy(acc + c + 4, &a_hi, sizeof a_hi);
  }
  for (; c < C; ++c) {
    const uint16_t v = bf16_positive(y[c]) ? gy[c] : uint16_t(0);
    gz[c] = v;
    acc[c] += bf16_to_float(v);
  }
}

template <typename scalar_t, typename acc_t>
acc_t relu_grad_any(const scalar_t* gy, const scalar_t* y, scalar_t* gz, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return relu_grad_run_bf16(reinterpret_cast<const uint16_t*>(gy), reinterpret_cast<const uint16_t*>(y),
                              reinterpret_cast<uint16_t*>(gz), n);
  } else {
    return relu_grad_run<scalar_t, acc_t>(gy, y, gz, n);
  }
}

// The same for a row of C channels (channels_last): gz = gy where y > 0 else 0, and acc[c] += gz[c].
template <typename scalar_t, typename acc_t>
void relu_grad_row(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ y, scalar_t* __restrict__ gz,
                   acc_t* __restrict__ acc, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const acc_t g = static_cast<acc_t>(gy[c]);
    const acc_t v = static_cast<acc_t>(y[c]) > acc_t(0) ? g : acc_t(0);
    gz[c] = static_cast<scalar_t>(v);
    acc[c] += v;
  }
}

// grad_z = grad_y * (y > 0) and grad_bias[c] = sum over (n, h, w) of grad_z, for NCHW-contiguous tensors:
// each thread owns whole channels, so the bias sums need no combining step.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void relu_bias_grad_nchw(const scalar_t* gy, const scalar_t* y, scalar_t* gz, acc_t* gb, int64_t N, int64_t C,
                         int64_t HW) {
  at::parallel_for(0, C, 1, [=](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t acc = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t base = (n * C + c) * HW;
        acc += relu_grad_any<scalar_t, acc_t>(gy + base, y + base, gz + base, HW);
      }
      if (gb) gb[c] = acc;
    }
  });
}

// The same for channels_last (NHWC) tensors: rows of C contiguous values; each thread sums a block of rows
// into its own partial vector, and the partials are added at the end in a fixed order.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void relu_bias_grad_nhwc(const scalar_t* gy, const scalar_t* y, scalar_t* gz, acc_t* gb, int64_t rows, int64_t C) {
  const int64_t nthreads = at::get_num_threads();
  std::vector<acc_t> partial(nthreads * C, acc_t(0));
  acc_t* partial_data = partial.data();
  at::parallel_for(0, rows, 64, [=](int64_t r0, int64_t r1) {
    acc_t* acc = partial_data + at::get_thread_num() * C;
    for (int64_t r = r0; r < r1; ++r) {
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        relu_grad_row_bf16(reinterpret_cast<const uint16_t*>(gy + r * C), reinterpret_cast<const uint16_t*>(y + r * C),
                           reinterpret_cast<uint16_t*>(gz + r * C), acc, C);
      } else {
        relu_grad_row<scalar_t, acc_t>(gy + r * C, y + r * C, gz + r * C, acc, C);
      }
    }
  });
  if (!gb) return;
  for (int64_t c = 0; c < C; ++c) gb[c] = acc_t(0);
  for (int64_t t = 0; t < nthreads; ++t)
    for (int64_t c = 0; c < C; ++c) gb[c] += partial[t * C + c];
}

std::tuple<at::Tensor, at::Tensor> relu_bias_grad_cpu(const at::Tensor& grad_y_in, const at::Tensor& y_in,
                                                      bool compute_bias_grad) {
  const bool nhwc = y_in.dim() == 4 && layout_of(y_in) == at::MemoryFormat::ChannelsLast;
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor y = y_in.contiguous(fmt);
  const at::Tensor grad_y = grad_y_in.contiguous(fmt);
  at::Tensor grad_z = at::empty_like(y, y.options().memory_format(fmt));
  const int64_t N = y.size(0), C = y.size(1), HW = y.numel() / std::max<int64_t>(N * C, 1);
  const auto acc_dtype = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_b_acc = at::empty({compute_bias_grad ? C : 0}, y.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "relu_bias_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* gb = compute_bias_grad ? grad_b_acc.data_ptr<acc_t>() : nullptr;
    if (nhwc) {
      relu_bias_grad_nhwc<scalar_t>(grad_y.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), grad_z.data_ptr<scalar_t>(),
                                    gb, N * HW, C);
    } else {
      relu_bias_grad_nchw<scalar_t>(grad_y.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), grad_z.data_ptr<scalar_t>(),
                                    gb, N, C, HW);
    }
  });
  at::Tensor grad_b = compute_bias_grad ? grad_b_acc.to(y.scalar_type()) : at::empty({0}, y.options());
  return {grad_z, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bias_relu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, c10::string_view /*algo*/) {
  auto [grad_z, grad_b] = relu_bias_grad_cpu(grad_y, y, output_mask[2]);
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, weight.options());
  if (!output_mask[0] && !output_mask[1]) return {grad_x, grad_w, grad_b};
  if (x.size(0) == 0) {
    if (output_mask[0]) grad_x = at::empty_like(x);
    if (output_mask[1]) grad_w = at::zeros_like(weight);
    return {grad_x, grad_w, grad_b};
  }
  const bool half = x.scalar_type() == at::kHalf;  // float32 math for float16, as in the forward
  const at::Tensor gz = half ? grad_z.to(at::kFloat) : grad_z;
  const at::Tensor xx = half ? x.to(at::kFloat) : x;
  const at::Tensor ww = half ? weight.to(at::kFloat) : weight;
  auto grads = at::convolution_backward(gz, xx, ww, c10::nullopt, stride, padding, dilation, false, {0, 0}, groups,
                                        {output_mask[0], output_mask[1], false});
  // Gradients come back in the layout of their inputs, whatever layout the library preferred.
  if (output_mask[0]) grad_x = std::get<0>(grads).to(x.scalar_type()).contiguous(layout_of(x));
  if (output_mask[1]) grad_w = std::get<1>(grads).to(weight.scalar_type()).contiguous(layout_of(weight));
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("conv_bias_relu", &conv_bias_relu_cpu);
  m.impl("conv_bias_relu_backward", &conv_bias_relu_backward_cpu);
  m.impl("relu_bias_grad", &relu_bias_grad_cpu);
}

}  // namespace fastmtl
