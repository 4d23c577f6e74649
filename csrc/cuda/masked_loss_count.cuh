// Count passes of the masked loss: how many targets of a task carry a label (sample mask set, class in range and not
// ignore_index, float target not NaN), as partial counts of blocks or tiles. The per-task kernels run them as count
// blocks (count_tasks_kernel, or inside a loss launch of the chain); the grouped forward as count tiles.
#pragma once

#include <cstdint>

#include "masked_loss.h"
#include "masked_loss_reduce.cuh"
#include "numeric.cuh"

namespace fastmtl {
namespace cuda {

constexpr int kMaxCountTasks = 16;  // tasks per count_tasks_kernel launch (the table is a kernel argument)

// One task's count pass: in count_tasks_kernel, or in the count blocks of a loss launch (ChainLinks::next).
struct CountTask {
  bool is_ce;
  const void* target;  // ce: int64 (geom's target strides); else target_dtype, in the prediction's dense layout
  DType target_dtype;
  const bool* mask;    // or nullptr
  CeGeometry geom;     // ce
  int64_t ignore_index;  // ce
  int64_t total, M;    // bce / l1 / mse: elements, elements per sample
  float* loss;         // zeroed by the count pass (a finalize overwrites it; a task without elements keeps 0)
  float* grad_scale;   // or nullptr; set to 1 by the count pass (a loss kernel may then overwrite it, LossReduction)
};

// What the op's first launch resets (block 0 of its count pass, when ticket != nullptr): the ticket counter, the
// [num_tasks] loss copies and, when no loss launch follows (no task has elements), *total = sum_t weights[t] * 0.
struct OpStart {
  unsigned* ticket = nullptr;
  float* losses = nullptr;
  int num_tasks = 0;
  float* total = nullptr;
  const float* weights = nullptr;
};

// The count passes walk chunks of kCountChunk elements, grid-stride, kCountUnroll per thread: each thread loads all
// of its chunk's targets (and mask values) before testing any, so they are in flight together (one element per loop
// turn left one load in flight per thread: ~40 turns in a row for the 8x3x288x384 normals of the NYUv2-like batch;
// 4 loads a turn in 256 blocks took ~10 turns, in up to kMaxCountBlocks blocks ~3). 4, not 8: these passes also run as
// count blocks inside the loss kernels, whose registers (sm_90) go from 32-48 to 46-52 with 4 and to 80, with spills,
// with 8 (16-byte vectors of 2 to 8 targets, 4 per thread: to 76-78).
constexpr int kCountUnroll = 4;
constexpr int64_t kCountChunk = static_cast<int64_t>(kCountUnroll) * kThreads;
static_assert(kCountChunk == kCountElemsPerBlock,
              "a count block gets one chunk until the grid reaches kMaxCountBlocks");

// Elements of [0, total) that block `block` of `blocks` sees and that count, summed over the block (every thread gets
// the sum): load(i, value) stores element i's value and returns whether its sample is labelled; valid(value) says
// whether the value itself counts. All of a chunk's loads come before any test (see above).
template <typename V, typename Load, typename Valid>
__device__ __forceinline__ int count_in_chunks(int64_t total, int64_t block, int64_t blocks, Load load, Valid valid) {
  int local = 0;
  for (int64_t base = block * kCountChunk + threadIdx.x; base < total; base += blocks * kCountChunk) {
    V value[kCountUnroll];
    bool labelled[kCountUnroll];  // in range and (no mask or mask set)
#pragma unroll
    for (int u = 0; u < kCountUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      value[u] = V(0);
      labelled[u] = i < total && load(i, value[u]);
    }
#pragma unroll
    for (int u = 0; u < kCountUnroll; ++u) local += labelled[u] && valid(value[u]) ? 1 : 0;
  }
  return block_sum(local);
}

// Valid class targets (t != ignore_index, 0 <= t < C, and mask) seen by block `block` of `blocks`.
inline __device__ int count_ce_block(const int64_t* __restrict__ target, const bool* __restrict__ mask,
                                     const CeGeometry& g, int64_t ignore_index, int64_t block, int64_t blocks) {
  const bool flat_target = g.t_sn == g.S * g.t_ss;
  const bool flat_mask = g.m_sn == g.S * g.m_ss;
  const bool split = !(flat_target && (mask == nullptr || flat_mask));  // (n, s) needed for an index
  const auto load = [&](int64_t r, int64_t& t) {
    int64_t n = 0, s = r;
    if (split) {
      n = div_index(r, g.S);
      s = r - n * g.S;
    }
    if (mask != nullptr && !(flat_mask ? mask[r * g.m_ss] : mask[n * g.m_sn + s * g.m_ss])) return false;
    t = flat_target ? target[r * g.t_ss] : target[n * g.t_sn + s * g.t_ss];  // labelled samples' targets only
    return true;
  };
  const auto valid = [&](int64_t t) { return t != ignore_index && t >= 0 && t < g.C; };
  return count_in_chunks<int64_t>(g.N * g.S, block, blocks, load, valid);
}

// Non-NaN float targets (contiguous storage, sample n owns [n*M, (n+1)*M)) seen by block `block` of `blocks`.
template <typename T>
__device__ int count_float_block(const T* __restrict__ target, const bool* __restrict__ mask, int64_t total,
                                 int64_t M, int64_t block, int64_t blocks) {
  const auto load = [&](int64_t i, float& t) {
    if (mask != nullptr && !mask[div_index(i, M)]) return false;
    t = to_acc(target[i]);  // labelled samples' targets only
    return true;
  };
  return count_in_chunks<float>(total, block, blocks, load, [](float t) { return !isnan(t); });
}

struct CountTable {
  CountTask task[kMaxCountTasks];
  int blocks;  // count blocks per task (each task's slots: counts[t * kMaxCountBlocks + b], b < blocks)
};
static_assert(sizeof(CountTable) + sizeof(int32_t*) + sizeof(OpStart) <= 4096, "kernel arguments are limited to 4 KB");

// Block b of `blocks` of one task's count pass: every thread returns the block's valid count.
inline __device__ int count_task_block(const CountTask& task, int64_t b, int64_t blocks) {
  if (task.is_ce)
    return count_ce_block(static_cast<const int64_t*>(task.target), task.mask, task.geom, task.ignore_index, b,
                          blocks);
  if (task.target_dtype == DType::kFloat16)
    return count_float_block(static_cast<const __half*>(task.target), task.mask, task.total, task.M, b, blocks);
  if (task.target_dtype == DType::kBFloat16)
    return count_float_block(static_cast<const __nv_bfloat16*>(task.target), task.mask, task.total, task.M, b, blocks);
  return count_float_block(static_cast<const float*>(task.target), task.mask, task.total, task.M, b, blocks);
}

// The op's first reset (OpStart), by one thread.
inline __device__ __noinline__ void reset_op(unsigned* ticket, float* losses, int num_tasks, float* total,
                                             const float* weights) {
  *ticket = 0u;
  float sum = 0.0f;
  for (int t = 0; t < num_tasks; ++t) {
    if (losses != nullptr) losses[t] = 0.0f;
    sum += (weights != nullptr ? weights[t] : 1.0f) * 0.0f;
  }
  if (total != nullptr) *total = sum;
}

// Thread 0 stores block b's count; block 0 zeroes the task's loss and sets its factor to 1 (a loss kernel storing
// undivided gradients overwrites it), and with `reset` resets the op (start.ticket set).
__device__ __forceinline__ void count_task_store(const CountTask& task, int32_t* counts, int64_t b, int sum,
                                                 const OpStart& start, bool reset) {
  if (threadIdx.x != 0) return;
  counts[b] = sum;
  if (b == 0) {
    *task.loss = 0.0f;
    if (task.grad_scale != nullptr) *task.grad_scale = 1.0f;
  }
  if (reset && start.ticket != nullptr)
    reset_op(start.ticket, start.losses, start.num_tasks, start.total, start.weights);
}

}  // namespace cuda
}  // namespace fastmtl
