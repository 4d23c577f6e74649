// CUDA kernels of relu_bias_grad, the fused backward epilogue of conv_bias_relu: grad_z = grad_y * (y > 0) and
// grad_bias[c] = the sum of grad_z over N, H, W. Launchers declared in conv_bias_relu.h; raw pointers only (no torch
// headers), the ATen glue is conv_bias_relu_aten.cpp.
//
// Memory bound (read grad_y and y, write grad_z), so every thread moves 16-byte vectors where the layout and
// alignment allow (element accesses otherwise) and the bias sums stay in registers until a block reduction. The
// per-block sums land in a [partial_rows, C] buffer that a second kernel adds in a fixed order: deterministic, no
// atomics.
//   NHWC: a thread owns one vector of channels and walks down many rows; a block is TX channel-vectors by TY
//         rows; the TY row sums are added through shared memory.
//   NCHW: a block owns one channel and a range of images; each plane of HW values is contiguous; the block sum
//         is a warp-shuffle reduction.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "conv_bias_relu.h"
#include "numeric.cuh"

namespace fastmtl {
namespace cuda {
namespace {

// Values of y > 0 keep their gradient; the rest (ReLU's flat side, and y == 0 exactly) get zero.
template <typename T>
__device__ __forceinline__ T masked(T g, T y) {
  return to_acc(y) > 0 ? g : from_acc<T>(typename Acc<T>::type(0));
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

constexpr int kEpilogueThreads = 256;

// ---- relu_bias_grad, NHWC ------------------------------------------------------------------------------------

// grid (ceil(C / VEC / blockDim.x), partial_rows); block (TX, TY) with TX * TY = 256. Rows [r0, r1) of the
// [rows, C] matrix belong to blockIdx.y. partials: [gridDim.y, C] or null.
template <typename T, int VEC>
__global__ void __launch_bounds__(kEpilogueThreads)
    relu_bias_grad_nhwc_kernel(const T* __restrict__ grad_y, const T* __restrict__ y, T* __restrict__ grad_z,
                               typename Acc<T>::type* __restrict__ partials, int64_t rows, int64_t C,
                               int64_t rows_per_chunk) {
  using A = typename Acc<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];  // read as float or double
  A* smem = reinterpret_cast<A*>(smem_raw);  // [TY][TX * VEC]

  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = min(rows, r0 + rows_per_chunk);
  A acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = A(0);

  if (cv * VEC < C) {
    const int64_t col = cv * VEC;
#pragma unroll 4
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const int64_t off = r * C + col;
      const Pack<T, VEC> g = *reinterpret_cast<const Pack<T, VEC>*>(grad_y + off);
      const Pack<T, VEC> v = *reinterpret_cast<const Pack<T, VEC>*>(y + off);
      Pack<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        out.v[j] = masked(g.v[j], v.v[j]);
        acc[j] += to_acc(out.v[j]);
      }
      *reinterpret_cast<Pack<T, VEC>*>(grad_z + off) = out;
    }
  }
  if (partials == nullptr) return;

  const int width = blockDim.x * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) smem[threadIdx.y * width + threadIdx.x * VEC + j] = acc[j];
  __syncthreads();
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int col = tid; col < width; col += blockDim.x * blockDim.y) {
    A s = A(0);
    for (int t = 0; t < static_cast<int>(blockDim.y); ++t) s += smem[t * width + col];
    const int64_t c = static_cast<int64_t>(blockIdx.x) * width + col;
    if (c < C) partials[static_cast<int64_t>(blockIdx.y) * C + c] = s;
  }
}

// ---- relu_bias_grad, NCHW ------------------------------------------------------------------------------------

// grid (C, partial_rows); block 256. Block (c, chunk) handles images [n0, n1) of channel c; HW % VEC == 0.
template <typename T, int VEC>
__global__ void __launch_bounds__(kEpilogueThreads)
    relu_bias_grad_nchw_kernel(const T* __restrict__ grad_y, const T* __restrict__ y, T* __restrict__ grad_z,
                               typename Acc<T>::type* __restrict__ partials, int64_t N, int64_t C, int64_t HW,
                               int64_t images_per_chunk) {
  using A = typename Acc<T>::type;
  __shared__ A warp_sums[kEpilogueThreads / 32];
  const int64_t c = blockIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * images_per_chunk;
  const int64_t n1 = min(N, n0 + images_per_chunk);
  const int64_t hwv = HW / VEC;  // vectors per plane
  // Walk the flattened (n, v) range with a stride of blockDim.x, keeping n and v as two counters.
  const int64_t step_n = kEpilogueThreads / hwv, step_v = kEpilogueThreads % hwv;
  int64_t n = n0 + threadIdx.x / hwv, v = threadIdx.x % hwv;
  A acc = A(0);
  while (n < n1) {
    const int64_t off = (n * C + c) * HW + v * VEC;
    const Pack<T, VEC> g = *reinterpret_cast<const Pack<T, VEC>*>(grad_y + off);
    const Pack<T, VEC> yy = *reinterpret_cast<const Pack<T, VEC>*>(y + off);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      out.v[j] = masked(g.v[j], yy.v[j]);
      acc += to_acc(out.v[j]);
    }
    *reinterpret_cast<Pack<T, VEC>*>(grad_z + off) = out;
    n += step_n;
    v += step_v;
    if (v >= hwv) {
      v -= hwv;
      ++n;
    }
  }
  if (partials == nullptr) return;
  acc = warp_sum(acc);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    A s = lane < kEpilogueThreads / 32 ? warp_sums[lane] : A(0);
    s = warp_sum(s);
    if (lane == 0) partials[static_cast<int64_t>(blockIdx.y) * C + c] = s;
  }
}

// ---- second pass: grad_bias[c] = sum over j of partials[j, c], one block per channel, fixed order ------------

// Thread t adds rows t, t + 256, ...: a few loads each, which can be in flight together (the earlier kernel, a warp
// per channel with 33 loads per lane for 1056 x 64 partials, took 5.9 us on an H100, a quarter of the epilogue's
// time); then the block adds the 8 warp sums in order: the same sum on every run.
template <typename T>
__global__ void __launch_bounds__(kEpilogueThreads)
    bias_grad_finalize_kernel(const typename Acc<T>::type* __restrict__ partials, T* __restrict__ grad_bias,
                              int64_t partial_rows, int64_t C) {
  using A = typename Acc<T>::type;
  __shared__ A warp_sums[kEpilogueThreads / 32];
  const int64_t c = blockIdx.x;
  A s = A(0);
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < partial_rows; j += kEpilogueThreads) s += partials[j * C + c];
  s = warp_sum(s);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    A total = A(0);
    for (int w = 0; w < kEpilogueThreads / 32; ++w) total += warp_sums[w];
    grad_bias[c] = from_acc<T>(total);
  }
}

int elem_size(int dtype) { return dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2; }

// Threads per block along the channel vectors (NHWC): enough to cover C in one block row where C is small.
int nhwc_tx(int64_t C, int vec) {
  const int64_t cv = ceil_div(C, vec);
  int tx = 1;
  while (tx < cv && tx < 64) tx *= 2;
  return tx;
}

template <typename T, int VEC>
cudaError_t launch_relu_bias_grad(bool channels_last, const T* grad_y, const T* y, T* grad_z, T* grad_bias,
                                  typename Acc<T>::type* partials, int64_t N, int64_t C, int64_t HW,
                                  int64_t partial_rows, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  A* sums = grad_bias != nullptr ? partials : nullptr;
  if (channels_last) {
    const int tx = nhwc_tx(C, VEC), ty = kEpilogueThreads / tx;
    const int64_t rows = N * HW;
    const dim3 grid(static_cast<unsigned>(ceil_div(C / VEC, tx)), static_cast<unsigned>(partial_rows));
    const size_t smem = sums != nullptr ? sizeof(A) * kEpilogueThreads * VEC : 0;
    relu_bias_grad_nhwc_kernel<T, VEC><<<grid, dim3(tx, ty), smem, stream>>>(grad_y, y, grad_z, sums, rows, C,
                                                                             ceil_div(rows, partial_rows));
  } else {
    const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(partial_rows));
    relu_bias_grad_nchw_kernel<T, VEC>
        <<<grid, kEpilogueThreads, 0, stream>>>(grad_y, y, grad_z, sums, N, C, HW, ceil_div(N, partial_rows));
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || grad_bias == nullptr) return err;
  bias_grad_finalize_kernel<T><<<static_cast<unsigned>(C), kEpilogueThreads, 0, stream>>>(partials, grad_bias,
                                                                                         partial_rows, C);
  return cudaGetLastError();
}

template <typename T>
cudaError_t relu_bias_grad_typed(bool channels_last, const void* grad_y, const void* y, void* grad_z,
                                 void* grad_bias, void* partials, int64_t N, int64_t C, int64_t HW,
                                 int64_t partial_rows, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* gy = static_cast<const T*>(grad_y);
  const T* yy = static_cast<const T*>(y);
  T* gz = static_cast<T*>(grad_z);
  T* gb = static_cast<T*>(grad_bias);
  auto* part = static_cast<typename Acc<T>::type*>(partials);
  // The vector width must divide the contiguous run (C for NHWC, HW for NCHW) and every pointer be aligned.
  const int64_t run = channels_last ? C : HW;
  const bool vec = run % kVec == 0 && aligned(grad_y, 16) && aligned(y, 16) && aligned(grad_z, 16);
  if (vec) return launch_relu_bias_grad<T, kVec>(channels_last, gy, yy, gz, gb, part, N, C, HW, partial_rows, stream);
  return launch_relu_bias_grad<T, 1>(channels_last, gy, yy, gz, gb, part, N, C, HW, partial_rows, stream);
}

}  // namespace

int64_t relu_bias_grad_partial_rows(int dtype, bool channels_last, int64_t N, int64_t C, int64_t HW,
                                    int device_sm_count) {
  const int64_t target_blocks = 8 * static_cast<int64_t>(std::max(device_sm_count, 1));
  if (channels_last) {
    // Split the rows so that about target_blocks blocks run, each over at least 64 rows, so that the partial
    // sums stay a small fraction (<= ~1%) of the bytes the kernel moves.
    const int vec = 16 / elem_size(dtype);
    const int64_t blocks_x = ceil_div(ceil_div(C, vec), nhwc_tx(C, vec));
    const int64_t rows = N * HW;
    return std::max<int64_t>(1, std::min(ceil_div(target_blocks, blocks_x), ceil_div(rows, 64)));
  }
  // NCHW: one block per (channel, range of images); at least ~4096 elements per block.
  const int64_t by_blocks = ceil_div(target_blocks, std::max<int64_t>(C, 1));
  const int64_t by_size = ceil_div(N * HW, 4096);
  return std::max<int64_t>(1, std::min({by_blocks, by_size, N}));
}

cudaError_t relu_bias_grad(int dtype, bool channels_last, const void* grad_y, const void* y, void* grad_z,
                           void* grad_bias, void* partials, int64_t N, int64_t C, int64_t HW,
                           int device_sm_count, cudaStream_t stream) {
  if (N * C * HW == 0) return cudaSuccess;
  const int64_t partial_rows = relu_bias_grad_partial_rows(dtype, channels_last, N, C, HW, device_sm_count);
  switch (dtype) {
    case kFloat32:
      return relu_bias_grad_typed<float>(channels_last, grad_y, y, grad_z, grad_bias, partials, N, C, HW,
                                         partial_rows, stream);
    case kFloat64:
      return relu_bias_grad_typed<double>(channels_last, grad_y, y, grad_z, grad_bias, partials, N, C, HW,
                                          partial_rows, stream);
    case kFloat16:
      return relu_bias_grad_typed<__half>(channels_last, grad_y, y, grad_z, grad_bias, partials, N, C, HW,
                                          partial_rows, stream);
    case kBFloat16:
      return relu_bias_grad_typed<__nv_bfloat16>(channels_last, grad_y, y, grad_z, grad_bias, partials, N, C,
                                                 HW, partial_rows, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastmtl
