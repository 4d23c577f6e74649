// The block and slot reductions every masked-loss kernel ends with (csrc/cuda/masked_loss*.cu): warp and block sums,
// the gradient's factor from a count pass's partial counts, a task's loss from its slots in a fixed order, and the
// per-task kernels' end (each block's slot, then the last block's finalize). Deterministic: no floating-point atomics.
#pragma once

#include <cstdint>

#include "masked_loss.h"
#include "numeric.cuh"

namespace fastmtl {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every masked-loss kernel
static_assert(kMaxCountBlocks % kThreads == 0, "each loss-kernel thread reads kMaxCountBlocks / kThreads counts");

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (blockDim.x == kThreads); every thread gets the result. Safe to call repeatedly.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T partial[kThreads / 32];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the previous call's readers are done with `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  return warp_sum(lane < kThreads / 32 ? partial[lane] : T(0));
}

// 1 / (total valid count), or 0 when there is no valid element (every element is then masked out anyway).
__device__ __forceinline__ float block_inv_count(const int32_t* __restrict__ counts, int num_counts) {
  long long c = 0;
#pragma unroll
  for (int k = 0; k < kMaxCountBlocks / kThreads; ++k) {
    const int i = k * kThreads + static_cast<int>(threadIdx.x);
    c += i < num_counts ? static_cast<long long>(counts[i]) : 0LL;
  }
  c = block_sum(c);
  return c > 0 ? 1.0f / static_cast<float>(c) : 0.0f;
}

// i / d with a 32-bit division when both fit (the common case; 64-bit division is slow on the GPU).
__device__ __forceinline__ int64_t div_index(int64_t i, int64_t d) {
  if (d == 1) return i;
  if (((i | d) >> 31) == 0) return static_cast<int64_t>(static_cast<uint32_t>(i) / static_cast<uint32_t>(d));
  return i / d;
}

// The gradient's factor: 1 / (the task's valid count), from the count pass's partial counts; 1 in partials mode
// (the count is not known yet).
__device__ __forceinline__ float reduction_inv(const LossReduction& red) {
  if (red.counts == nullptr) return 1.0f;
  return block_inv_count(red.counts, red.num_counts);
}

// The gradient's factor: 1 / count, so the gradient is final; or `stored` (1, or 0.5 for mse whose 2(p - t) could
// overflow) in partials mode, and when red.grad_scale is set (float16 predictions, whose range cannot hold g / count
// for large counts: it would round to subnormals and zeros), block 0 then writing the rest of the factor,
// inv / stored, to *red.grad_scale for the backward.
__device__ __forceinline__ float reduction_grad_factor(const LossReduction& red, float inv, float stored) {
  if (red.counts == nullptr) return stored;
  if (red.grad_scale == nullptr) return inv;
  if (blockIdx.x == 0 && threadIdx.x == 0) *red.grad_scale = inv / stored;
  return stored;
}

// One thread's share of the sums of num slots (psum, and pcount when given): slots first, first + STRIDE, ... in that
// order, STRIDE threads (a block or a warp) side by side, kUnroll slots loaded at once (the sum is the same for any
// kUnroll: each thread adds its slots in the same order). The slots may have been written by other blocks of this
// launch: read through L2.
template <int STRIDE, int kUnroll = 4>
__device__ __forceinline__ void sum_slots_strided(const float* psum, const int32_t* pcount, int64_t num, int first,
                                                  double& sum, long long& count) {
  sum = 0.0;
  count = 0;
  for (int64_t base = first; base < num; base += STRIDE * kUnroll) {
    float s[kUnroll];
    int32_t c[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * STRIDE;
      s[u] = i < num ? __ldcg(psum + i) : 0.0f;
      c[u] = i < num && pcount != nullptr ? __ldcg(pcount + i) : 0;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      sum += s[u];
      count += c[u];
    }
  }
}

// The sums of num slots (psum, and pcount when given) in a fixed order, by the whole block (every thread gets them).
__device__ __forceinline__ void sum_slots(const float* psum, const int32_t* pcount, int64_t num, double& sum,
                                          long long& count) {
  sum_slots_strided<kThreads>(psum, pcount, num, threadIdx.x, sum, count);
  sum = block_sum(sum);
  count = block_sum(count);
}

// A task's loss (and, with grad_scale, its factor) from its slots, in a fixed order (every thread of the block takes
// part; TaskSlots documents the arguments). Not inlined, and given scalars rather than the kernel's parameter struct:
// inlined, its float64 sums made the lighter loss kernels spill registers in their main loop.
inline __device__ __noinline__ void finalize_slots(const float* psum, const int32_t* pcount, int64_t num,
                                                   float* loss_out, float* loss_copy, float* grad_scale,
                                                   float stored) {
  double sum = 0.0;
  long long count = 0;
  sum_slots(psum, pcount, num, sum, count);
  if (threadIdx.x != 0) return;
  const float loss = count > 0 ? static_cast<float>(sum / static_cast<double>(count)) : 0.0f;
  *loss_out = loss;
  if (loss_copy != nullptr) *loss_copy = loss;
  if (grad_scale != nullptr)
    *grad_scale = count > 0 ? static_cast<float>(1.0 / (static_cast<double>(stored) * count)) : 0.0f;
}

// sum_t weights[t] * losses[t] in task order (weights == nullptr: 1 each), so that a NaN or infinite weight makes the
// total NaN even for a task without a valid element (weight * 0), as on the other backends.
inline __device__ __noinline__ void write_total(float* total, const float* losses, const float* weights,
                                                int num_tasks) {
  float sum = 0.0f;
  for (int t = 0; t < num_tasks; ++t) sum += (weights != nullptr ? weights[t] : 1.0f) * __ldcg(losses + t);
  *total = sum;
}

// The block's end: its loss sum and valid count in its own slot. In the op's last launch (end.ticket set) the block
// then takes a ticket, and the block that takes the last one (all slots written) finalizes the launch's task and
// writes the total.
__device__ __forceinline__ void reduction_finish(const LossReduction& red, const LaunchEnd& end, float row_loss,
                                                 int valid) {
  const float sum = block_sum(row_loss);
  const int count = block_sum(valid);
  __shared__ unsigned last_block[1];
  if (threadIdx.x == 0) {
    red.psum[blockIdx.x] = sum;
    red.pcount[blockIdx.x] = count;
    if (end.ticket != nullptr) {
      __threadfence();  // the slot is visible device-wide before the ticket is taken
      last_block[0] = atomicAdd(end.ticket, 1u) == gridDim.x - 1 ? 1u : 0u;
    }
  }
  if (end.ticket == nullptr) return;
  __syncthreads();
  if (last_block[0] == 0u) return;
  __threadfence();
  finalize_slots(red.psum, red.pcount, gridDim.x, end.loss, end.loss_copy, nullptr, 1.0f);
  if (threadIdx.x == 0 && end.total != nullptr) write_total(end.total, end.losses, end.weights, end.num_tasks);
}

}  // namespace cuda
}  // namespace fastmtl
