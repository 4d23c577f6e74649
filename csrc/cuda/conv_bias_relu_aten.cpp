// conv_bias_relu on CUDA tensors: ATen glue around the kernels of conv_bias_relu.cu and relu_bias_grad.cu.
//
// Forward, by algo:
//   "implicit_gemm" - our tensor-core implicit-GEMM convolution with the bias + ReLU epilogue (float16 /
//                     bfloat16, channels_last input, groups = 1, sm_80+); anything else is a clear error.
//   "library"       - cuDNN: its fused convolution + bias + ReLU (at::cudnn_convolution_relu) where cuDNN is
//                     usable, else ATen's convolution followed by an in-place ReLU.
//   "default"       - library. Measured on an H100 (bf16, channels_last, 32x32x64x64 -> 64, 3x3): cuDNN's fused
//                     kernel takes 22 us of device time, implicit_gemm 72 us (benchmarks/results/2026-11-27-h100-2),
//                     so implicit_gemm runs only when asked for by name (or chosen by the autotuner).
// Backward: our fused epilogue kernel (grad_z = grad_y * (y > 0) and the bias gradient, one read of grad_y and
// y), then ATen's convolution_backward on grad_z for the input and weight gradients that are asked for.
// Everything runs on the current stream; the output keeps x's layout (as the fake implementation says).
// Arguments are validated in Python (fastmtl/ops/conv_bias_relu.py) before we get here.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "conv_bias_relu.h"

namespace fastmtl {
namespace {

namespace kern = fastmtl::cuda;

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastmtl ", what, " CUDA kernel launch failed: ", cudaGetErrorString(err));
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kern::kFloat32;
    case at::kHalf: return kern::kFloat16;
    case at::kBFloat16: return kern::kBFloat16;
    case at::kDouble: return kern::kFloat64;
    default: TORCH_CHECK(false, "fastmtl conv_bias_relu (CUDA): unsupported dtype ", t);
  }
  return -1;
}

// The layout of x as the fake implementation states it: channels_last only when x is channels_last-contiguous
// and not also plain-contiguous (size-1 dimensions make some tensors both).
at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

std::vector<int64_t> conv_output_shape(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  std::vector<int64_t> shape{x.size(0), w.size(0)};
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = dilation[d] * (w.size(2 + d) - 1) + 1;
    shape.push_back((x.size(2 + d) + 2 * padding[d] - extent) / stride[d] + 1);
  }
  return shape;
}

// Why implicit_gemm cannot run this case, or an empty string when it can.
std::string implicit_gemm_unsupported(const at::Tensor& x, const at::Tensor& w, int64_t groups) {
  if (!kern::implicit_gemm_supported(dtype_code(x.scalar_type()),
                                     at::cuda::getDeviceProperties(x.get_device())->major)) {
    return "needs float16 or bfloat16 tensors on an sm_80+ GPU (got " + std::string(c10::toString(x.scalar_type())) +
           ")";
  }
  if (groups != 1) return "supports groups=1 only (got groups=" + std::to_string(groups) + ")";
  if (layout_of(x) != at::MemoryFormat::ChannelsLast) return "needs a channels_last (NHWC) input";
  return "";
}

bool cudnn_fused_usable(const at::Tensor& x) {
  return at::globalContext().userEnabledCuDNN() && at::globalContext().hasCuDNN() &&
         x.scalar_type() != at::kDouble;
}

at::Tensor forward_library(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           int64_t groups) {
  const auto fmt = layout_of(x);
  if (cudnn_fused_usable(x)) {
    try {
      at::Tensor y = at::cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups);
      return y.contiguous(fmt);
    } catch (const c10::Error&) {
      // cuDNN has no fused engine for this case: fall through to convolution + ReLU.
    }
  }
  at::Tensor y = at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, groups);
  y = y.contiguous(fmt);
  y.relu_();
  return y;
}

at::Tensor forward_implicit_gemm(const at::Tensor& x_in, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation) {
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  // [K, C, R, S] in channels_last memory is [K, R, S, C]: the B matrix of the GEMM.
  const at::Tensor w = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const auto out_shape = conv_output_shape(x, w, stride, padding, dilation);
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  kern::ConvShape s{};
  s.N = x.size(0), s.C = x.size(1), s.H = x.size(2), s.W = x.size(3);
  s.K = w.size(0), s.R = w.size(2), s.S = w.size(3);
  s.P = out_shape[2], s.Q = out_shape[3];
  s.stride_h = stride[0], s.stride_w = stride[1];
  s.pad_h = padding[0], s.pad_w = padding[1];
  s.dil_h = dilation[0], s.dil_w = dilation[1];
  check_launch(kern::conv_bias_relu_implicit_gemm(dtype_code(x.scalar_type()), x.data_ptr(), w.data_ptr(),
                                                  b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), s,
                                                  at::cuda::getCurrentCUDAStream()),
               "conv_bias_relu implicit_gemm");
  return y;
}

at::Tensor conv_bias_relu_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, c10::string_view algo) {
  TORCH_CHECK(algo == "default" || algo == "library" || algo == "implicit_gemm",
              "conv_bias_relu: algo must be 'default', 'library' or 'implicit_gemm', got '", std::string(algo), "'");
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.size(0) == 0 || weight.size(0) == 0) {
    return at::empty(conv_output_shape(x, weight, stride, padding, dilation), x.options().memory_format(layout_of(x)));
  }
  if (algo == "implicit_gemm") {
    const std::string why_not = implicit_gemm_unsupported(x, weight, groups);
    TORCH_CHECK(why_not.empty(), "conv_bias_relu algo='implicit_gemm' ", why_not,
                "; use algo='library' or 'default' for this case");
    return forward_implicit_gemm(x, weight, bias, stride, padding, dilation);
  }
  return forward_library(x, weight, bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor> relu_bias_grad_cuda(const at::Tensor& grad_y_in, const at::Tensor& y_in,
                                                       bool compute_bias_grad) {
  TORCH_CHECK(y_in.dim() >= 2, "relu_bias_grad: y must have at least 2 dimensions (N, C, ...), got ",
              y_in.sizes());
  TORCH_CHECK(grad_y_in.sizes() == y_in.sizes(), "relu_bias_grad: grad_y must have y's shape ", y_in.sizes(),
              ", got ", grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.scalar_type() == y_in.scalar_type(), "relu_bias_grad: grad_y must have y's dtype");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const bool nhwc = y_in.dim() == 4 && layout_of(y_in) == at::MemoryFormat::ChannelsLast;
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor y = y_in.contiguous(fmt);
  const at::Tensor grad_y = grad_y_in.contiguous(fmt);
  at::Tensor grad_z = at::empty_like(y, y.options().memory_format(fmt));
  const int64_t N = y.size(0), C = y.size(1);
  const int64_t HW = N * C == 0 ? 0 : y.numel() / (N * C);
  at::Tensor grad_b = compute_bias_grad ? at::empty({C}, y.options()) : at::empty({0}, y.options());
  if (y.numel() == 0) {
    if (compute_bias_grad) grad_b.zero_();
    return {grad_z, grad_b};
  }
  const int code = dtype_code(y.scalar_type());
  const int sms = at::cuda::getDeviceProperties(y.get_device())->multiProcessorCount;
  at::Tensor partials;
  if (compute_bias_grad) {
    const int64_t rows = kern::relu_bias_grad_partial_rows(code, nhwc, N, C, HW, sms);
    partials = at::empty({rows, C}, y.options().dtype(code == kern::kFloat64 ? at::kDouble : at::kFloat));
  }
  check_launch(kern::relu_bias_grad(code, nhwc, grad_y.data_ptr(), y.data_ptr(), grad_z.data_ptr(),
                                    compute_bias_grad ? grad_b.data_ptr() : nullptr,
                                    compute_bias_grad ? partials.data_ptr() : nullptr, N, C, HW, sms,
                                    at::cuda::getCurrentCUDAStream()),
               "relu_bias_grad");
  return {grad_z, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bias_relu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, c10::string_view /*algo*/) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto [grad_z, grad_b] = relu_bias_grad_cuda(grad_y, y, output_mask[2]);
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, weight.options());
  if (!output_mask[0] && !output_mask[1]) return {grad_x, grad_w, grad_b};
  if (x.size(0) == 0 || weight.size(0) == 0) {
    if (output_mask[0]) grad_x = at::zeros_like(x);
    if (output_mask[1]) grad_w = at::zeros_like(weight);
    return {grad_x, grad_w, grad_b};
  }
  auto grads = at::convolution_backward(grad_z, x, weight, c10::nullopt, stride, padding, dilation, false, {0, 0},
                                        groups, {output_mask[0], output_mask[1], false});
  // In the layouts of x and weight, as the fake implementation (empty_like) states.
  if (output_mask[0]) grad_x = std::get<0>(grads).contiguous(layout_of(x));
  if (output_mask[1]) grad_w = std::get<1>(grads).contiguous(layout_of(weight));
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("conv_bias_relu", &conv_bias_relu_cuda);
  m.impl("conv_bias_relu_backward", &conv_bias_relu_backward_cuda);
  m.impl("relu_bias_grad", &relu_bias_grad_cuda);
}

}  // namespace fastmtl
