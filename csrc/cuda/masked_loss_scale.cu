// The masked loss's grouped gradient scaling (masked_loss_scale_grads, masked_loss_scale_grads_by: the backward of
// masked_multitask_loss_forward): out[t] = in[t] * scale_t over a task table passed by value, 16-byte vectors where
// aligned; scale_t given, or computed from the upstream gradients (ScaleFactors). A capped grid strides over all
// tasks' chunks and skips a task scaled in place by exactly 1 (no memory traffic).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "masked_loss.h"
#include "masked_loss_reduce.cuh"
#include "numeric.cuh"

namespace fastmtl {
namespace cuda {
namespace {

constexpr int kScaleItems = 32;  // elements per thread per chunk in scale_grads_kernel (16-bit: 4 vectors, f32: 8)

struct ScaleTable {
  const void* in[kMaxScaleTasks];
  void* out[kMaxScaleTasks];
  int64_t numel[kMaxScaleTasks];
  int64_t first_chunk[kMaxScaleTasks + 1];  // task t owns chunks [first_chunk[t], first_chunk[t + 1])
  int dtype[kMaxScaleTasks];
  bool vec[kMaxScaleTasks];  // in and out are 16-byte aligned
  const float* g_task[kMaxScaleTasks];
  int num;
};
static_assert(kMaxScaleTasks <= kThreads, "one thread per task computes the block's task scales");

constexpr int64_t kScaleChunk = static_cast<int64_t>(kThreads) * kScaleItems;  // elements per block per step
// Blocks per SM in the grid (DeviceCapacity caps it at what the device holds). Each thread keeps a chunk's
// kScaleItems elements in flight (per SM at 2 blocks: 32 KB of 16-bit data, 64 KB of float32), as much as the 8
// blocks per SM of 8 elements per thread before (whose items' loads also waited behind the stores before them), and
// the usual step, where every task is skipped, launches 4x fewer blocks that only read the scales. Not timed on a GPU
// yet.
constexpr int kScaleBlocksPerSM = 2;

// One block's chunk of kScaleChunk elements: 16-byte vectors when aligned and whole, else one element at a time.
// Every load of the thread is issued before its first store (in and out may alias, so the compiler would otherwise
// keep each load behind the store before it: one memory latency per item). Each element is read and written by the
// same thread, so in == out (in place) is safe.
template <typename X>
__device__ __forceinline__ void scale_chunk(const void* in, void* out, int64_t numel, int64_t base, float scale,
                                            bool vec) {
  const X* a = static_cast<const X*>(in);
  X* b = static_cast<X*>(out);
  constexpr int V = 16 / sizeof(X);
  constexpr int kVectors = kScaleItems / V;
  static_assert(kScaleItems % V == 0, "a chunk is a whole number of vectors per thread");
  if (vec && base + kScaleChunk <= numel) {
    Words<X, V> w[kVectors];  // 32-bit words: a 16-bit element split out right after its load would wait for it
#pragma unroll
    for (int k = 0; k < kVectors; ++k) w[k] = load_words<X, V>(a + base + (k * kThreads + threadIdx.x) * V);
#pragma unroll
    for (int k = 0; k < kVectors; ++k) {
      float v[V];
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = word_elem(w[k], j) * scale;
      store_words(b + base + (k * kThreads + threadIdx.x) * V, words_from_floats<X, V>(v));
    }
    return;
  }
  constexpr int kGroup = 8;  // element loads in flight at once here (a tensor's last chunk, or a misaligned tensor)
  for (int k0 = 0; k0 < kScaleItems; k0 += kGroup) {
    X x[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const int64_t i = base + static_cast<int64_t>(k0 + k) * kThreads + threadIdx.x;
      if (i < numel) x[k] = a[i];
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const int64_t i = base + static_cast<int64_t>(k0 + k) * kThreads + threadIdx.x;
      if (i < numel) b[i] = from_float<X>(to_acc(x[k]) * scale);
    }
  }
}

// The chunks [first, end) of one task that fall to this block: first + k with k = blockIdx.x (mod gridDim.x),
// counting chunks over the whole table, so the blocks' shares stay even across task boundaries.
template <typename X>
__device__ __forceinline__ void scale_task(const void* in, void* out, int64_t numel, int64_t first, int64_t end,
                                           float scale, bool vec) {
  const int64_t stride = gridDim.x;
  for (int64_t c = first + ((static_cast<int64_t>(blockIdx.x) - first) % stride + stride) % stride; c < end;
       c += stride) {
    scale_chunk<X>(in, out, numel, (c - first) * kScaleChunk, scale, vec);
  }
}

// The task's scale: scales[task], or (without scales) (g_total * weights[task] + g_task) * factor[task].
__device__ __forceinline__ float task_scale(const ScaleTable& table, const float* scales, const ScaleFactors& f,
                                            int task) {
  if (scales != nullptr) return scales[task];
  float s = 0.0f;
  if (f.g_total != nullptr) s = *f.g_total * (f.weights != nullptr ? f.weights[task] : 1.0f);
  if (table.g_task[task] != nullptr) s += *table.g_task[task];
  return f.factor != nullptr ? s * f.factor[task] : s;
}

// A capped grid (the blocks the device keeps resident: one wave) striding over every task's chunks. The task scales
// are computed once per block, so a task scaled in place by exactly 1 (upstream gradient 1, unit weight, gradient
// already divided by the count: the usual training step) is skipped whole, with no memory traffic (each block still
// reads the scales).
__global__ void __launch_bounds__(kThreads, kScaleBlocksPerSM)
    scale_grads_kernel(ScaleTable table, const float* __restrict__ scales, ScaleFactors factors) {
  __shared__ float task_scales[kMaxScaleTasks];
  if (threadIdx.x < table.num) task_scales[threadIdx.x] = task_scale(table, scales, factors, threadIdx.x);
  __syncthreads();
  for (int task = 0; task < table.num; ++task) {
    const float scale = task_scales[task];
    if (scale == 1.0f && table.in[task] == table.out[task]) continue;
    const void* in = table.in[task];
    void* out = table.out[task];
    const int64_t numel = table.numel[task], first = table.first_chunk[task], end = table.first_chunk[task + 1];
    const bool vec = table.vec[task];
    switch (table.dtype[task]) {
      case static_cast<int>(DType::kFloat16):
        scale_task<__half>(in, out, numel, first, end, scale, vec);
        break;
      case static_cast<int>(DType::kBFloat16):
        scale_task<__nv_bfloat16>(in, out, numel, first, end, scale, vec);
        break;
      default:
        scale_task<float>(in, out, numel, first, end, scale, vec);
    }
  }
}

cudaError_t launch_scale_grads(const ScaleTask* tasks, int num_tasks, const float* scales, const ScaleFactors& factors,
                               const DeviceCapacity& device, cudaStream_t stream) {
  if (num_tasks <= 0) return cudaSuccess;
  if (num_tasks > kMaxScaleTasks || device.sms <= 0 || device.threads_per_sm < kThreads) return cudaErrorInvalidValue;
  ScaleTable table{};
  int64_t chunks = 0;
  for (int i = 0; i < num_tasks; ++i) {
    table.in[i] = tasks[i].in;
    table.out[i] = tasks[i].out;
    table.numel[i] = tasks[i].numel;
    table.dtype[i] = static_cast<int>(tasks[i].dtype);
    table.vec[i] = aligned(tasks[i].in, 16) && aligned(tasks[i].out, 16);
    table.g_task[i] = tasks[i].g_task;
    table.first_chunk[i] = chunks;
    chunks += ceil_div(tasks[i].numel, kScaleChunk);
  }
  table.first_chunk[num_tasks] = chunks;
  table.num = num_tasks;
  if (chunks == 0) return cudaSuccess;
  const int per_sm = std::min(kScaleBlocksPerSM, device.threads_per_sm / kThreads);
  const int64_t blocks = std::min<int64_t>(chunks, static_cast<int64_t>(device.sms) * per_sm);
  scale_grads_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, scales, factors);
  return cudaGetLastError();
}

}  // namespace

cudaError_t masked_loss_scale_grads(const ScaleTask* tasks, int num_tasks, const float* scales,
                                    const DeviceCapacity& device, cudaStream_t stream) {
  return launch_scale_grads(tasks, num_tasks, scales, ScaleFactors{}, device, stream);
}

cudaError_t masked_loss_scale_grads_by(const ScaleTask* tasks, int num_tasks, const ScaleFactors& factors,
                                       const DeviceCapacity& device, cudaStream_t stream) {
  return launch_scale_grads(tasks, num_tasks, nullptr, factors, device, stream);
}

}  // namespace cuda
}  // namespace fastmtl
