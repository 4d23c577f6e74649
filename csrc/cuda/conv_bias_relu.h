// Launchers of the CUDA kernels of conv_bias_relu, on raw pointers: the forward's implicit GEMM
// (csrc/cuda/conv_bias_relu.cu) and the backward epilogue relu_bias_grad (csrc/cuda/relu_bias_grad.cu).
//
// No torch headers here or in the .cu files: the ATen glue (conv_bias_relu_aten.cpp) owns tensors, streams
// and error reporting. Every launcher enqueues on `stream` and returns the launch status (cudaGetLastError).
// dtype codes: 0 = float32, 1 = float16, 2 = bfloat16, 3 = float64.

#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastmtl {
namespace cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// ---- fused backward epilogue: grad_z = grad_y * (y > 0); grad_bias[c] = sum of grad_z over N, H, W ----------

// Number of partial sums per channel that relu_bias_grad writes into `partials`: the caller allocates
// partial_rows * C accumulators (float64 for float64 tensors, float32 otherwise). Depends on the SM count.
int64_t relu_bias_grad_partial_rows(int dtype, bool channels_last, int64_t N, int64_t C, int64_t HW,
                                    int device_sm_count);

// grad_y, y, grad_z: dense tensors of N*C*HW elements, NCHW-contiguous (channels_last = false) or NHWC
// (channels_last = true). grad_bias (y's dtype, C elements) and partials may be null when the bias gradient is
// not wanted; partial_rows must be relu_bias_grad_partial_rows(...) for the same arguments. Bias sums are
// deterministic: per-block partials, then a fixed-order second pass.
cudaError_t relu_bias_grad(int dtype, bool channels_last, const void* grad_y, const void* y, void* grad_z,
                           void* grad_bias, void* partials, int64_t N, int64_t C, int64_t HW,
                           int device_sm_count, cudaStream_t stream);

// ---- forward: implicit-GEMM convolution on tensor cores with bias + ReLU fused in the epilogue ----------------

struct ConvShape {
  int64_t N, H, W, C;       // input, NHWC
  int64_t K, R, S;          // output channels, kernel height, kernel width
  int64_t P, Q;             // output height, width
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

// Whether conv_bias_relu_implicit_gemm runs this case (dtype float16/bfloat16, tensor-core capable device).
bool implicit_gemm_supported(int dtype, int device_major);

// x: NHWC [N, H, W, C]; weight: [K, R, S, C] (the channels_last memory of a [K, C, R, S] weight); bias: [K] or
// null; y: NHWC [N, P, Q, K]. float16 or bfloat16, float32 accumulation. Any C (16-byte loads when C % 8 == 0
// and x, weight are 16-byte aligned; element loads otherwise), any stride / padding / dilation, groups = 1.
cudaError_t conv_bias_relu_implicit_gemm(int dtype, const void* x, const void* weight, const void* bias, void* y,
                                         const ConvShape& shape, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmtl
