// CUDA kernels of fastmtl::masked_loss (one task), fastmtl::masked_multitask_loss_forward (all tasks) and the grouped
// gradient scaling; see masked_loss.h for the launch design. No torch headers: this file compiles in seconds.
//
// Kernels:
//   count_tasks_kernel                     partial valid counts (grid-stride, at most kMaxCountBlocks blocks per
//                                          task) for up to kMaxCountTasks tasks in one launch, or one task
//   ce_pixel_kernel                        one thread per pixel, loop over C (NCHW: coalesced along the pixels);
//                                          up to 16 logits cached in registers, else an online softmax and a re-read
//   ce_pixel_vec_kernel                    NCHW with contiguous pixels and C <= 16: 4 pixels per thread, so each
//                                          class plane is read and written in 8- or 16-byte vectors
//   ce_rows_kernel                         TPR threads per row when C is contiguous ([N, C], channels_last);
//                                          per-lane online softmax merged with shuffles
//   elementwise_kernel                     bce / l1 / mse, 16-byte vector loads and stores where aligned
//   scale_grads_kernel                     grouped out[t] = in[t] * scale_t over a task table passed by value,
//                                          16-byte vectors where aligned; scale_t given, or computed from the
//                                          upstream gradients (ScaleFactors); a capped grid strides over all
//                                          tasks' chunks and skips a task scaled in place by exactly 1 (no memory
//                                          traffic)
// Every loss kernel starts with its chain links (ChainLinks: count blocks for the next task of the multi-task
// forward, the previous task's finalize), then sums the partial counts (up to kMaxCountBlocks / kThreads per thread),
// and ends with a block reduction writing its loss sum and valid count to its own slot; in the op's last launch each
// block then takes a ticket and the last one finalizes (LaunchEnd). No floating-point atomics: deterministic.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "masked_loss.h"
#include "numeric.cuh"

namespace fastmtl {
namespace cuda {
namespace {

constexpr int kThreads = 256;
static_assert(kMaxCountBlocks % kThreads == 0, "each loss-kernel thread reads kMaxCountBlocks / kThreads counts");
constexpr int kElementwiseItems = 2;  // vectors per thread in elementwise_kernel
constexpr int kScaleItems = 8;        // elements per thread in scale_grads_kernel
constexpr int kPixelVec = 4;          // neighbouring pixels per thread in ce_pixel_vec_kernel
constexpr int kGroupPixelVec = 2;     // the same in the grouped forward (its registers: 80 at 3 blocks per SM)
constexpr int kMaxCountTasks = 16;    // tasks per count_tasks_kernel launch (the table is a kernel argument)

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

// A task's slots and where their finalize writes: loss = sum(psum) / sum(pcount) (0 without a valid element) to *loss
// and *loss_copy (when given); with grad_scale (the lead, partials mode) also the gradient's factor
// 1 / (stored * count), `stored` being the factor its gradient was stored with (mse 0.5).
struct TaskSlots {
  const float* psum = nullptr;  // nullptr: nothing to finalize
  const int32_t* pcount = nullptr;
  int64_t num = 0;
  float* loss = nullptr;
  float* loss_copy = nullptr;
  float* grad_scale = nullptr;
  float stored = 1.0f;
};

// What a loss launch does besides its own task.
struct ChainLinks {
  // Count blocks: blocks [loss_blocks, loss_blocks + next_blocks) count `next` into next_counts[b]; the first of them
  // zeroes next.loss, sets *next.grad_scale to 1 and resets `start` (the op's first launch).
  int64_t loss_blocks = 0;
  int next_blocks = 0;
  CountTask next{};
  int32_t* next_counts = nullptr;
  OpStart start{};
  // Block 0 finalizes the previous launch's task.
  TaskSlots prev{};
  // The op's last launch (end.ticket != nullptr, no count blocks): the last block finalizes this task and the total.
  LaunchEnd end{};
};

// ---- reductions ------------------------------------------------------------------------------------------------

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
// order, STRIDE threads (a block or a warp) side by side. The slots may have been written by other blocks of this
// launch: read through L2.
template <int STRIDE>
__device__ __forceinline__ void sum_slots_strided(const float* psum, const int32_t* pcount, int64_t num, int first,
                                                  double& sum, long long& count) {
  constexpr int kUnroll = 4;  // loads in flight per thread: one block or warp walks every slot (many for huge tasks)
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
__device__ __noinline__ void finalize_slots(const float* psum, const int32_t* pcount, int64_t num, float* loss_out,
                                            float* loss_copy, float* grad_scale, float stored) {
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
__device__ __noinline__ void write_total(float* total, const float* losses, const float* weights, int num_tasks) {
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

// ---- count kernels ---------------------------------------------------------------------------------------------

// The count passes walk chunks of kCountChunk elements, grid-stride, kCountUnroll per thread: each thread loads all
// of its chunk's targets (and mask values) before testing any, so they are in flight together (one element per loop
// turn left one load in flight per thread: ~40 turns in a row for the 8x3x288x384 normals of the NYUv2-like batch;
// 4 loads a turn in 256 blocks took ~10 turns, in up to kMaxCountBlocks blocks ~3). 4, not 8: these passes also run as
// count blocks inside the loss kernels, whose registers (sm_90) go from 32-48 to 46-52 with 4 and to 80, with spills,
// with 8 (16-byte vectors of 2 to 8 targets, 4 per thread: to 76-78).
constexpr int kCountUnroll = 4;
constexpr int64_t kCountChunk = static_cast<int64_t>(kCountUnroll) * kThreads;
static_assert(kCountChunk == kCountElemsPerBlock, "a count block gets one chunk until the grid reaches kMaxCountBlocks");

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
__device__ int count_ce_block(const int64_t* __restrict__ target, const bool* __restrict__ mask, const CeGeometry& g,
                              int64_t ignore_index, int64_t block, int64_t blocks) {
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
__device__ int count_task_block(const CountTask& task, int64_t b, int64_t blocks) {
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
__device__ __noinline__ void reset_op(unsigned* ticket, float* losses, int num_tasks, float* total,
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

// All tasks' count passes in one launch: block x counts for task x / blocks; the first block of each task zeroes its
// loss, block 0 resets the op (`start`).
__global__ void __launch_bounds__(kThreads)
    count_tasks_kernel(CountTable table, int32_t* __restrict__ counts, OpStart start) {
  const int t = blockIdx.x / table.blocks;
  const int b = blockIdx.x - t * table.blocks;
  const int sum = count_task_block(table.task[t], b, table.blocks);
  count_task_store(table.task[t], counts + t * kMaxCountBlocks, b, sum, start, blockIdx.x == 0);
}

// A loss kernel's start: a count block of the next task does its count and the kernel returns true; block 0
// finalizes the previous launch's task.
__device__ __forceinline__ bool chain_prologue(const ChainLinks& links) {
  if (links.next_blocks > 0 && blockIdx.x >= links.loss_blocks) {
    const int64_t b = blockIdx.x - links.loss_blocks;
    const int sum = count_task_block(links.next, b, links.next_blocks);
    count_task_store(links.next, links.next_counts, b, sum, links.start, b == 0);
    return true;
  }
  const TaskSlots& prev = links.prev;
  if (prev.psum != nullptr && blockIdx.x == 0)
    finalize_slots(prev.psum, prev.pcount, prev.num, prev.loss, prev.loss_copy, prev.grad_scale, prev.stored);
  return false;
}

// ---- cross entropy ---------------------------------------------------------------------------------------------

struct CeRow {
  int64_t t;
  bool ok;
};

__device__ __forceinline__ CeRow load_ce_row(const int64_t* __restrict__ target, const bool* __restrict__ mask,
                                             const CeGeometry& g, int64_t n, int64_t s, int64_t ignore_index) {
  CeRow row{0, false};
  if (mask != nullptr && !mask[n * g.m_sn + s * g.m_ss]) return row;  // an unlabelled sample's target is not read
  row.t = target[n * g.t_sn + s * g.t_ss];
  row.ok = row.t != ignore_index && row.t >= 0 && row.t < g.C;  // out-of-range classes are skipped, never read
  return row;
}

// The tile functions below are one block's share of a task (a kernel block, or a tile of the grouped forward): they
// add the thread's element losses to row_loss and its valid elements to valid, and write the gradient times gi.

// One thread per pixel, loop over C; up to CREG logits cached in registers.
template <typename P, int CREG>
__device__ __forceinline__ void ce_pixel_tile(const P* __restrict__ pred, const int64_t* __restrict__ target,
                                              const bool* __restrict__ mask, P* __restrict__ grad, const CeGeometry& g,
                                              int64_t ignore_index, int64_t s_blocks, int64_t tile, float gi,
                                              float& row_loss, int& valid) {
  const int64_t n = tile / s_blocks;
  const int64_t s = (tile - n * s_blocks) * kThreads + threadIdx.x;
  if (s < g.S) {
    const CeRow row = load_ce_row(target, mask, g, n, s, ignore_index);
    valid += row.ok ? 1 : 0;
    const P* x = pred + n * g.p_sn + s * g.p_ss;
    P* gx = grad != nullptr ? grad + n * g.g_sn + s * g.g_ss : nullptr;
    if (!row.ok) {
      if (gx != nullptr)
        for (int64_t c = 0; c < g.C; ++c) gx[c * g.g_sc] = from_float<P>(0.0f);
    } else if (CREG > 0 && g.C <= CREG) {  // logits stay in registers: one read
      float v[CREG > 0 ? CREG : 1];
      float m = -INFINITY, xt = 0.0f;
#pragma unroll
      for (int c = 0; c < CREG; ++c) {
        v[c] = c < g.C ? to_acc(x[c * g.p_sc]) : -INFINITY;
        m = fmaxf(m, v[c]);
        if (c == row.t) xt = v[c];
      }
      float l = 0.0f;
#pragma unroll
      for (int c = 0; c < CREG; ++c) {
        v[c] = exp_diff(v[c], m);
        l += v[c];
      }
      row_loss += (m - xt) + fast_log(l);
      if (gx != nullptr) {
        const float scale = gi * fast_rcp(l);
#pragma unroll
        for (int c = 0; c < CREG; ++c)
          if (c < g.C) gx[c * g.g_sc] = from_float<P>(v[c] * scale - (c == row.t ? gi : 0.0f));
      }
    } else {  // online softmax, then a second read (from cache) for the gradient
      float m = -INFINITY, l = 0.0f;
      for (int64_t c = 0; c < g.C; ++c) {
        const float xv = to_acc(x[c * g.p_sc]);
        if (xv > m) {
          l = l * exp_diff(m, xv) + 1.0f;
          m = xv;
        } else {
          l += exp_diff(xv, m);
        }
      }
      row_loss += (m - to_acc(x[row.t * g.p_sc])) + fast_log(l);
      if (gx != nullptr) {
        const float scale = gi * fast_rcp(l);
        for (int64_t c = 0; c < g.C; ++c)
          gx[c * g.g_sc] = from_float<P>(exp_diff(to_acc(x[c * g.p_sc]), m) * scale - (c == row.t ? gi : 0.0f));
      }
    }
  }
}

template <typename P, int CREG>
__global__ void __launch_bounds__(kThreads)
    ce_pixel_kernel(const P* __restrict__ pred, const int64_t* __restrict__ target, const bool* __restrict__ mask,
                    P* __restrict__ grad, CeGeometry g, int64_t ignore_index, int64_t s_blocks,
                    LossReduction red, ChainLinks links) {
  if (chain_prologue(links)) return;
  const float gi = reduction_grad_factor(red, reduction_inv(red), 1.0f);
  float row_loss = 0.0f;
  int valid = 0;
  ce_pixel_tile<P, CREG>(pred, target, mask, grad, g, ignore_index, s_blocks, blockIdx.x, gi, row_loss, valid);
  reduction_finish(red, links.end, row_loss, valid);
}

// f(std::integral_constant<int, C>{}) for a runtime class count 1 <= C <= 16 (one switch), so that a tile can take C
// as a constant. Called from host code (the per-task launcher) and device code (the grouped forward) with lambdas of
// the caller's side only, hence the check disabled.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename F>
__host__ __device__ __forceinline__ void with_classes(int64_t C, F&& f) {
#define FASTMTL_CLASSES_CASE(c) \
  case c:                       \
    f(std::integral_constant<int, c>{}); \
    break;
  switch (C) {
    FASTMTL_CLASSES_CASE(1)
    FASTMTL_CLASSES_CASE(2)
    FASTMTL_CLASSES_CASE(3)
    FASTMTL_CLASSES_CASE(4)
    FASTMTL_CLASSES_CASE(5)
    FASTMTL_CLASSES_CASE(6)
    FASTMTL_CLASSES_CASE(7)
    FASTMTL_CLASSES_CASE(8)
    FASTMTL_CLASSES_CASE(9)
    FASTMTL_CLASSES_CASE(10)
    FASTMTL_CLASSES_CASE(11)
    FASTMTL_CLASSES_CASE(12)
    FASTMTL_CLASSES_CASE(13)
    FASTMTL_CLASSES_CASE(14)
    FASTMTL_CLASSES_CASE(15)
    FASTMTL_CLASSES_CASE(16)
    default:
      break;
  }
#undef FASTMTL_CLASSES_CASE
}
constexpr int kMaxPixelVecClasses = 16;

// NCHW logits with contiguous pixels (p_ss == g_ss == 1) and C = g.C classes, a constant (with_classes): PIX
// neighbouring pixels per thread, so every load and store of a class plane moves PIX elements at once. The launcher
// checks that S and the sample and class strides are multiples of PIX, that pred and grad are aligned to PIX elements
// and that C * stride * sizeof(P) fits in 32 bits (pixel_vec_ok).
// Written for the instruction count: the NYUv2-like batch has 11.5M 13-class logits, and the op is meant to
// run near memory bandwidth. C as a constant leaves no test per class (a runtime C cost two or three instructions per
// class and pass, and put the logits in local memory); class planes are addressed by 32-bit byte offsets. The logits
// stay in registers as raw words of their own dtype; their max is taken in it (exact; two 16-bit elements per
// instruction); each exponential is computed once (ex2, exp_diff) and kept as a float for the gradient. The target
// class is handled apart rather than with a compare and select per class: its logit is read again (an L1 hit: the
// thread just loaded it), and its gradient element, stored after its class plane's, overwrites it (same thread, same
// address: in order). (Before all this: ~700 instructions per thread and 2 pixels, H100 SASS counters, 2026-11-27.)
// The logits' loads depend on the sample mask only, not on the targets: both are in flight together (an unlabelled
// sample reads neither; a labelled pixel whose target is ignored is read anyway).
template <typename P, int C, int PIX>
__device__ __forceinline__ void ce_pixel_vec_tile(const P* __restrict__ pred, const int64_t* __restrict__ target,
                                                  const bool* __restrict__ mask, P* __restrict__ grad,
                                                  const CeGeometry& g, int64_t ignore_index, int64_t s_blocks,
                                                  int64_t tile, float gi, float& row_loss, int& valid) {
  using W = Words<P, PIX>;
  const int64_t n = tile / s_blocks;
  const int64_t s0 = ((tile - n * s_blocks) * kThreads + threadIdx.x) * PIX;
  if (s0 >= g.S) return;
  const uint32_t ps = static_cast<uint32_t>(g.p_sc * sizeof(P)), gs = static_cast<uint32_t>(g.g_sc * sizeof(P));
  bool labelled[PIX];
  bool any = false;
#pragma unroll
  for (int j = 0; j < PIX; ++j) {
    labelled[j] = mask == nullptr || mask[n * g.m_sn + (s0 + j) * g.m_ss];
    any |= labelled[j];
  }
  char* gx = grad != nullptr ? reinterpret_cast<char*>(grad + n * g.g_sn + s0) : nullptr;
  if (!any) {  // an unlabelled sample: neither logits nor targets are read
    if (gx != nullptr) {
      W zero;
#pragma unroll
      for (int k = 0; k < W::kNum; ++k) zero.w[k] = 0u;  // +0.0 in every dtype
#pragma unroll
      for (int c = 0; c < C; ++c) store_words(reinterpret_cast<P*>(gx + c * gs), zero);
    }
    return;
  }
  int64_t t[PIX];
#pragma unroll
  for (int j = 0; j < PIX; ++j) t[j] = labelled[j] ? target[n * g.t_sn + (s0 + j) * g.t_ss] : ignore_index;
  const char* x = reinterpret_cast<const char*>(pred + n * g.p_sn + s0);
  W pk[C];
#pragma unroll
  for (int c = 0; c < C; ++c) pk[c] = load_words<P, PIX>(reinterpret_cast<const P*>(x + c * ps));
  int cls[PIX];  // the pixel's class, or -1 where it has no valid label (out-of-range classes are skipped)
  bool all_valid = true;
#pragma unroll
  for (int j = 0; j < PIX; ++j) {
    const bool ok = labelled[j] && static_cast<uint64_t>(t[j]) < static_cast<uint64_t>(C) && t[j] != ignore_index;
    cls[j] = ok ? static_cast<int>(t[j]) : -1;
    valid += ok ? 1 : 0;
    all_valid &= ok;
  }
  W mx = pk[0];
#pragma unroll
  for (int c = 1; c < C; ++c) mx = words_max(mx, pk[c]);
  float xt[PIX], m[PIX], l[PIX];
#pragma unroll
  for (int j = 0; j < PIX; ++j) {
    xt[j] = cls[j] >= 0 ? to_acc(*reinterpret_cast<const P*>(x + cls[j] * ps + j * sizeof(P))) : 0.0f;
    m[j] = word_elem(mx, j);
    l[j] = 0.0f;
  }
  float e[C][PIX];
#pragma unroll
  for (int c = 0; c < C; ++c) {
#pragma unroll
    for (int j = 0; j < PIX; ++j) {
      e[c][j] = exp_diff(word_elem(pk[c], j), m[j]);
      l[j] += e[c][j];
    }
  }
#pragma unroll
  for (int j = 0; j < PIX; ++j)
    if (cls[j] >= 0) row_loss += (m[j] - xt[j]) + fast_log(l[j]);
  if (gx == nullptr) return;
  float scale[PIX];
#pragma unroll
  for (int j = 0; j < PIX; ++j) scale[j] = cls[j] >= 0 ? gi * fast_rcp(l[j]) : 0.0f;
  // A pixel without a valid label gets +0.0 (all bits clear) whatever its logits: its bits are masked out of the
  // rounded words, one AND per word rather than a select per element.
  W keep;
#pragma unroll
  for (int k = 0; k < W::kNum; ++k) keep.w[k] = ~0u;
  if (!all_valid) {
    constexpr int kPerWord = 4 / static_cast<int>(sizeof(P));
#pragma unroll
    for (int j = 0; j < PIX; ++j)
      if (cls[j] < 0) keep.w[j / kPerWord] &= ~(((1ull << (8 * sizeof(P))) - 1) << (8 * sizeof(P) * (j % kPerWord)));
  }
#pragma unroll
  for (int c = 0; c < C; ++c) {
    float out[PIX];
#pragma unroll
    for (int j = 0; j < PIX; ++j) out[j] = e[c][j] * scale[j];
    W w = words_from_floats<P, PIX>(out);
#pragma unroll
    for (int k = 0; k < W::kNum; ++k) w.w[k] &= keep.w[k];
    store_words(reinterpret_cast<P*>(gx + c * gs), w);
  }
#pragma unroll
  for (int j = 0; j < PIX; ++j) {
    if (cls[j] >= 0) {
      Pack<P, 1> one;
      one.v[0] = from_float<P>(exp_diff(xt[j], m[j]) * scale[j] - gi);
      store_pack(reinterpret_cast<P*>(gx + cls[j] * gs + j * sizeof(P)), one);
    }
  }
}

template <typename P, int C, int PIX>
__global__ void __launch_bounds__(kThreads)
    ce_pixel_vec_kernel(const P* __restrict__ pred, const int64_t* __restrict__ target, const bool* __restrict__ mask,
                        P* __restrict__ grad, CeGeometry g, int64_t ignore_index, int64_t s_blocks,
                        LossReduction red, ChainLinks links) {
  if (chain_prologue(links)) return;
  const float gi = reduction_grad_factor(red, reduction_inv(red), 1.0f);
  float row_loss = 0.0f;
  int valid = 0;
  ce_pixel_vec_tile<P, C, PIX>(pred, target, mask, grad, g, ignore_index, s_blocks, blockIdx.x, gi, row_loss, valid);
  reduction_finish(red, links.end, row_loss, valid);
}

// TPR threads per row of C contiguous logits (p_sc == 1); VPL > 0 caches VPL logits per lane (C <= TPR * VPL).
template <typename P, int TPR, int VPL>
__device__ __forceinline__ void ce_rows_tile(const P* __restrict__ pred, const int64_t* __restrict__ target,
                                             const bool* __restrict__ mask, P* __restrict__ grad, const CeGeometry& g,
                                             int64_t ignore_index, int64_t s_blocks, int64_t tile, float gi,
                                             float& row_loss, int& valid) {
  constexpr int kRows = kThreads / TPR;
  const int lane = threadIdx.x % TPR;
  const int64_t n = tile / s_blocks;
  const int64_t s = (tile - n * s_blocks) * kRows + threadIdx.x / TPR;
  const bool in_range = s < g.S;
  CeRow row{0, false};
  if (in_range) row = load_ce_row(target, mask, g, n, s, ignore_index);
  const P* x = pred + n * g.p_sn + s * g.p_ss;

  float m = -INFINITY, l = 0.0f;
  float v[VPL > 0 ? VPL : 1];
  if (row.ok) {
    if (VPL > 0) {
#pragma unroll
      for (int k = 0; k < VPL; ++k) {
        const int64_t c = lane + k * TPR;
        v[k] = c < g.C ? to_acc(x[c]) : -INFINITY;
        m = fmaxf(m, v[k]);
      }
      if (m > -INFINITY) {
#pragma unroll
        for (int k = 0; k < VPL; ++k) l += exp_diff(v[k], m);
      }
    } else {
      for (int64_t c = lane; c < g.C; c += TPR) {
        const float xv = to_acc(x[c]);
        if (xv > m) {
          l = l * exp_diff(m, xv) + 1.0f;
          m = xv;
        } else {
          l += exp_diff(xv, m);
        }
      }
    }
  }
  // Merge the lanes' (max, sum) pairs; every thread of the warp takes part (rows are whole sub-warps).
#pragma unroll
  for (int offset = TPR / 2; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset, TPR);
    const float l2 = __shfl_xor_sync(0xffffffffu, l, offset, TPR);
    const float mm = fmaxf(m, m2);
    l = (m == -INFINITY ? 0.0f : l * exp_diff(m, mm)) + (m2 == -INFINITY ? 0.0f : l2 * exp_diff(m2, mm));
    m = mm;
  }
  if (row.ok && lane == 0) {
    row_loss += (m - to_acc(x[row.t])) + fast_log(l);
    valid += 1;
  }
  if (in_range && grad != nullptr) {
    P* gx = grad + n * g.g_sn + s * g.g_ss;
    if (!row.ok) {
      for (int64_t c = lane; c < g.C; c += TPR) gx[c * g.g_sc] = from_float<P>(0.0f);
    } else if (VPL > 0) {
      const float scale = gi * fast_rcp(l);
#pragma unroll
      for (int k = 0; k < VPL; ++k) {
        const int64_t c = lane + k * TPR;
        if (c < g.C) gx[c * g.g_sc] = from_float<P>(exp_diff(v[k], m) * scale - (c == row.t ? gi : 0.0f));
      }
    } else {
      const float scale = gi * fast_rcp(l);
      for (int64_t c = lane; c < g.C; c += TPR)
        gx[c * g.g_sc] = from_float<P>(exp_diff(to_acc(x[c]), m) * scale - (c == row.t ? gi : 0.0f));
    }
  }
}

template <typename P, int TPR, int VPL>
__global__ void __launch_bounds__(kThreads)
    ce_rows_kernel(const P* __restrict__ pred, const int64_t* __restrict__ target, const bool* __restrict__ mask,
                   P* __restrict__ grad, CeGeometry g, int64_t ignore_index, int64_t s_blocks,
                   LossReduction red, ChainLinks links) {
  if (chain_prologue(links)) return;
  const float gi = reduction_grad_factor(red, reduction_inv(red), 1.0f);
  float row_loss = 0.0f;
  int valid = 0;
  ce_rows_tile<P, TPR, VPL>(pred, target, mask, grad, g, ignore_index, s_blocks, blockIdx.x, gi, row_loss, valid);
  reduction_finish(red, links.end, row_loss, valid);
}

// ---- bce / l1 / mse --------------------------------------------------------------------------------------------

template <int KIND>
__device__ __forceinline__ void element_loss(float p, float t, float& loss, float& grad) {
  if (KIND == static_cast<int>(ElementwiseKind::kBCE)) {
    const float e = expf(-fabsf(p));
    loss = fmaxf(p, 0.0f) - p * t + log1pf(e);
    grad = (p >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e)) - t;
  } else if (KIND == static_cast<int>(ElementwiseKind::kL1)) {
    const float d = p - t;
    loss = fabsf(d);
    grad = d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f);
  } else {
    const float d = p - t;
    loss = d * d;
    grad = 2.0f * d;
  }
}

// The factor a gradient is stored with when it cannot be divided by the count yet (or, float16, at all): mse's 2(p - t)
// is halved, so that it cannot overflow.
template <int KIND>
__host__ __device__ constexpr float stored_factor() {
  return KIND == static_cast<int>(ElementwiseKind::kMSE) ? 0.5f : 1.0f;
}

template <int KIND, typename P, typename T, int VEC>
__device__ __forceinline__ void elementwise_tile(const P* __restrict__ pred, const T* __restrict__ target,
                                                 const bool* __restrict__ mask, P* __restrict__ grad, int64_t total,
                                                 int64_t M, int64_t tile, float gi, float& acc, int& valid) {
  const int64_t block_base = tile * (kThreads * VEC * kElementwiseItems);
#pragma unroll
  for (int item = 0; item < kElementwiseItems; ++item) {
    const int64_t base = block_base + (static_cast<int64_t>(item) * kThreads + threadIdx.x) * VEC;
    if (base >= total) break;
    const bool full = base + VEC <= total;
    bool ok[VEC];
    bool any = false;
    if (mask != nullptr && M % VEC == 0) {  // the vector lies in one sample: one mask read
      const bool lab = mask[div_index(base, M)];
#pragma unroll
      for (int e = 0; e < VEC; ++e) ok[e] = lab && base + e < total;
      any = lab;
    } else if (mask != nullptr) {
      const int64_t n0 = div_index(base, M);
      const int64_t next = (n0 + 1) * M;  // a vector spans at most two samples when M >= VEC
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t n = M >= VEC ? n0 + (base + e >= next ? 1 : 0) : div_index(base + e, M);
        ok[e] = base + e < total && mask[n];
        any |= ok[e];
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) ok[e] = base + e < total;
      any = true;
    }
    float p[VEC], t[VEC];
    if (any && VEC > 1 && full) {  // unlabelled samples are not read at all
      const Pack<P, VEC> pp = load_pack<P, VEC>(pred + base);
      const Pack<T, VEC> tp = load_pack<T, VEC>(target + base);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        p[e] = to_acc(pp.v[e]);
        t[e] = to_acc(tp.v[e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        p[e] = ok[e] ? to_acc(pred[base + e]) : 0.0f;
        t[e] = ok[e] ? to_acc(target[base + e]) : 0.0f;
      }
    }
    Pack<P, VEC> gp;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const bool ok_e = ok[e] && !isnan(t[e]);
      float el = 0.0f, ge = 0.0f;
      element_loss<KIND>(p[e], t[e], el, ge);
      acc += ok_e ? el : 0.0f;
      valid += ok_e ? 1 : 0;
      gp.v[e] = from_float<P>(ok_e ? ge * gi : 0.0f);
    }
    if (grad != nullptr) {
      if (VEC > 1 && full) {
        store_pack(grad + base, gp);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (base + e < total) grad[base + e] = gp.v[e];
      }
    }
  }
}

template <int KIND, typename P, typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(const P* __restrict__ pred, const T* __restrict__ target, const bool* __restrict__ mask,
                       P* __restrict__ grad, int64_t total, int64_t M, LossReduction red, ChainLinks links) {
  if (chain_prologue(links)) return;
  const float gi = reduction_grad_factor(red, reduction_inv(red), stored_factor<KIND>());
  float acc = 0.0f;
  int valid = 0;
  elementwise_tile<KIND, P, T, VEC>(pred, target, mask, grad, total, M, blockIdx.x, gi, acc, valid);
  reduction_finish(red, links.end, acc, valid);
}

// ---- the grouped forward: every task in one launch -------------------------------------------------------------

// The tile function a grouped task runs (the per-task launchers' choice of kernel, as a value).
enum class GroupVariant : int {
  kCePixelVec,
  kCePixel16,
  kCePixel,
  kCeRows4x4,
  kCeRows8x4,
  kCeRows16x4,
  kCeRows32x4,
  kCeRows32x8,
  kCeRows32x0,
  kElementwise,
};

// One task of grouped_forward_kernel: its arguments, outputs and place in the schedule (tile ids [count_first,
// count_first + count_tiles) count its valid targets, [loss_first, loss_first + loss_tiles) compute its loss and
// gradient, each as blocks_per_tile blocks of the per-task kernel in turn).
struct GroupTask {
  GroupVariant variant;
  ElementwiseKind kind;
  bool target_f32;  // bce / l1 / mse: float32 targets (else the prediction's dtype)
  bool vec;         // bce / l1 / mse: 16-byte vectors
  bool count_vec;   // the count tiles read the targets as contiguous 16-byte vectors (count_vec_tile)
  int index;        // the task's position in the op (weights, loss copies)
  const void* pred;
  const void* target;
  const bool* mask;
  void* grad;
  CeGeometry geom;  // ce; bce / l1 / mse: N samples of S = M elements, mask index n (m_sn = 1, m_ss = 0)
  int64_t ignore_index;
  int64_t total, M;  // bce / l1 / mse
  int64_t s_blocks;  // ce: tiles per sample
  float stored;      // float16 gradients: stored undivided times this (mse 0.5), the rest in grad_scale; else 0
  float* loss;
  float* grad_scale;
  float* slots;  // [loss_tiles]: each loss tile's loss sum
  int64_t count_first, count_tiles, count_elems;  // count_elems: targets per count tile
  int64_t loss_first, loss_tiles;
  int64_t blocks, blocks_per_tile;  // the per-task kernel's blocks; loss tile k runs blocks [k, k + 1) * per tile
};

struct GroupTable {
  GroupTask task[kMaxGroupTasks];
  int num;        // tasks in the table (the op's tasks with elements), in schedule order
  int num_tasks;  // the op's tasks
  int64_t count_end, tile_end;
  const float* weights;
  float* total;
};

// A task's count word: (count tiles done << kDoneShift) + valid targets, so that one 64-bit load sees both.
constexpr int kDoneShift = 40;
constexpr unsigned long long kCountMask = (1ULL << kDoneShift) - 1;
constexpr int64_t kMaxGroupCountTiles = (1LL << (64 - kDoneShift)) - 1;
constexpr int kGroupCountVecs = 4;  // 16-byte vectors in flight per thread in a count tile

// The grouped forward's device state, zeroed by one memset before the launch; the op's [num_tasks] loss copies
// (for the total) follow it.
struct GroupState {
  unsigned long long next_tile;
  unsigned long long count[kMaxGroupTasks];
  unsigned blocks_done;
};
static_assert(sizeof(GroupTable) + 2 * sizeof(void*) <= 4096, "kernel arguments are limited to 4 KB");
static_assert(sizeof(GroupState) + sizeof(float) <= kMaxCountBlocks * sizeof(int32_t),
              "the state and one loss copy per task fit in the op's count workspace");

// Bit e set where element i + e (e < V, i + e < end) of the flat [N, S] targets belongs to a labelled sample: one
// division for the vector's first element, then the sample index steps on at each sample boundary.
template <int V>
__device__ __forceinline__ unsigned labelled_bits(const bool* __restrict__ mask, const CeGeometry& g, int64_t i,
                                                  int64_t end) {
  unsigned bits = 0;
  if (mask == nullptr) {
#pragma unroll
    for (int e = 0; e < V; ++e) bits |= i + e < end ? 1u << e : 0u;
    return bits;
  }
  int64_t n = div_index(i, g.S);
  int64_t s = i - n * g.S;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (i + e < end && mask[n * g.m_sn + s * g.m_ss]) bits |= 1u << e;
    if (++s == g.S) {
      s = 0;
      ++n;
    }
  }
  return bits;
}

// Valid targets among [begin, min(begin + count_elems, N * S)) of contiguous, 16-byte aligned targets, summed over
// the block: each thread loads kGroupCountVecs vectors before testing any; a vector of unlabelled samples is not read.
template <typename T, typename Valid>
__device__ __forceinline__ int count_vec_tile(const T* __restrict__ target, const bool* __restrict__ mask,
                                              const CeGeometry& g, int64_t begin, int64_t count_elems, Valid valid) {
  constexpr int V = 16 / sizeof(T);
  const int64_t total = g.N * g.S;
  const int64_t end = begin + count_elems < total ? begin + count_elems : total;
  // A tile inside one sample (the usual case: a tile is 16 KB, a sample's targets mostly more) reads its mask once:
  // an unlabelled one reads nothing, a labelled one tests no mask per element. (Per element, the mask lookup and its
  // division were most of the count tiles' instructions: H100 profile, 2026-11-27.)
  bool whole = false;
  if (mask == nullptr) {
    whole = true;
  } else if (g.m_ss == 0) {
    const int64_t n = div_index(begin, g.S);
    if (n == div_index(end - 1, g.S)) {
      if (!mask[n * g.m_sn]) return 0;  // the same for every thread of the block
      whole = true;
    }
  }
  int local = 0;
  for (int64_t base = begin + static_cast<int64_t>(threadIdx.x) * V; base < end;
       base += static_cast<int64_t>(kThreads) * V * kGroupCountVecs) {
    Pack<T, V> pk[kGroupCountVecs];
    unsigned bits[kGroupCountVecs];
#pragma unroll
    for (int u = 0; u < kGroupCountVecs; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * kThreads * V;
      bits[u] = whole ? labelled_bits<V>(nullptr, g, i, end) : labelled_bits<V>(mask, g, i, end);
      if (bits[u] != 0 && i + V <= total) {
        pk[u] = load_pack<T, V>(target + i);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) pk[u].v[e] = (bits[u] >> e) & 1u ? target[i + e] : T{};
      }
    }
#pragma unroll
    for (int u = 0; u < kGroupCountVecs; ++u)
#pragma unroll
      for (int e = 0; e < V; ++e) local += (bits[u] >> e) & 1u && valid(pk[u].v[e]) ? 1 : 0;
  }
  return block_sum(local);
}

// Non-NaN targets of count tile `local` of a bce / l1 / mse task.
template <typename T>
__device__ __forceinline__ int group_count_float(const GroupTask& task, int64_t local) {
  const T* target = static_cast<const T*>(task.target);
  if (!task.count_vec) return count_float_block(target, task.mask, task.total, task.M, local, task.count_tiles);
  return count_vec_tile(target, task.mask, task.geom, local * task.count_elems, task.count_elems,
                        [](T t) { return !isnan(to_acc(t)); });
}

// Count tile `local` of a grouped task: its valid targets go into the task's count word with one more tile done.
template <typename P>
__device__ __forceinline__ void group_count_tile(const GroupTask& task, int64_t local, unsigned long long* word) {
  int sum = 0;
  if (task.variant != GroupVariant::kElementwise) {
    const int64_t* target = static_cast<const int64_t*>(task.target);
    const int64_t ignore_index = task.ignore_index;
    const uint64_t classes = static_cast<uint64_t>(task.geom.C);  // 0 <= t < C as one unsigned compare
    sum = task.count_vec ? count_vec_tile(target, task.mask, task.geom, local * task.count_elems, task.count_elems,
                                          [=](int64_t t) {
                                            return static_cast<uint64_t>(t) < classes && t != ignore_index;
                                          })
                         : count_ce_block(target, task.mask, task.geom, ignore_index, local, task.count_tiles);
  } else {
    sum = task.target_f32 ? group_count_float<float>(task, local) : group_count_float<P>(task, local);
  }
  if (threadIdx.x == 0) atomicAdd(word, (1ULL << kDoneShift) + static_cast<unsigned long long>(sum));
}

// The task's count word once all `tiles` count tiles have added to it (thread 0 waits; loss tiles come after every
// count tile in the schedule, and a count tile waits for nothing, so the wait ends).
__device__ __forceinline__ unsigned long long wait_counted(const unsigned long long* word, int64_t tiles) {
  const volatile unsigned long long* w = word;
  unsigned long long v = *w;
  while (static_cast<int64_t>(v >> kDoneShift) < tiles) {
    __nanosleep(128);
    v = *w;
  }
  return v;
}

template <int KIND, typename P, typename T>
__device__ __forceinline__ void group_elementwise_vec(const GroupTask& task, int64_t local, float gi, float& loss,
                                                      int& valid) {
  const P* pred = static_cast<const P*>(task.pred);
  const T* target = static_cast<const T*>(task.target);
  P* grad = static_cast<P*>(task.grad);
  if (task.vec)
    elementwise_tile<KIND, P, T, 16 / sizeof(P)>(pred, target, task.mask, grad, task.total, task.M, local, gi, loss,
                                                 valid);
  else
    elementwise_tile<KIND, P, T, 1>(pred, target, task.mask, grad, task.total, task.M, local, gi, loss, valid);
}

template <typename P, typename T>
__device__ __forceinline__ void group_elementwise(const GroupTask& task, int64_t local, float gi, float& loss,
                                                  int& valid) {
  switch (task.kind) {
    case ElementwiseKind::kBCE:
      group_elementwise_vec<0, P, T>(task, local, gi, loss, valid);
      break;
    case ElementwiseKind::kL1:
      group_elementwise_vec<1, P, T>(task, local, gi, loss, valid);
      break;
    case ElementwiseKind::kMSE:
      group_elementwise_vec<2, P, T>(task, local, gi, loss, valid);
      break;
  }
}

// Block `block` of the per-task kernel of a grouped task, with gradient factor gi.
template <typename P>
__device__ __forceinline__ void group_loss_block(const GroupTask& task, int64_t block, float gi, float& loss,
                                                 int& valid) {
  const P* x = static_cast<const P*>(task.pred);
  const int64_t* t = static_cast<const int64_t*>(task.target);
  P* gx = static_cast<P*>(task.grad);
  const CeGeometry& g = task.geom;
  const int64_t ii = task.ignore_index, sb = task.s_blocks;
  switch (task.variant) {
    case GroupVariant::kCePixelVec:  // group_loss_tile runs these, with the class count as a constant
      break;
    case GroupVariant::kCePixel16:
      ce_pixel_tile<P, 16>(x, t, task.mask, gx, g, ii, sb, block, gi, loss, valid);
      break;
    case GroupVariant::kCePixel:
      ce_pixel_tile<P, 0>(x, t, task.mask, gx, g, ii, sb, block, gi, loss, valid);
      break;
    case GroupVariant::kCeRows4x4:
      ce_rows_tile<P, 4, 4>(x, t, task.mask, gx, g, ii, sb, block, gi, loss, valid);
      break;
    case GroupVariant::kCeRows8x4:
      ce_rows_tile<P, 8, 4>(x, t, task.mask, gx, g, ii, sb, block, gi, loss, valid);
      break;
    case GroupVariant::kCeRows16x4:
      ce_rows_tile<P, 16, 4>(x, t, task.mask, gx, g, ii, sb, block, gi, loss, valid);
      break;
    case GroupVariant::kCeRows32x4:
      ce_rows_tile<P, 32, 4>(x, t, task.mask, gx, g, ii, sb, block, gi, loss, valid);
      break;
    case GroupVariant::kCeRows32x8:
      ce_rows_tile<P, 32, 8>(x, t, task.mask, gx, g, ii, sb, block, gi, loss, valid);
      break;
    case GroupVariant::kCeRows32x0:
      ce_rows_tile<P, 32, 0>(x, t, task.mask, gx, g, ii, sb, block, gi, loss, valid);
      break;
    case GroupVariant::kElementwise:
      if (task.target_f32)
        group_elementwise<P, float>(task, block, gi, loss, valid);
      else
        group_elementwise<P, P>(task, block, gi, loss, valid);
      break;
  }
}

// Loss tile `local` of table task i: its count word (waited for once per block and task, then kept in `counted`),
// then its blocks of the per-task kernel with the gradient already divided by the count, and the tile's loss sum
// in its slot. No fence or atomic per tile: the kernel's last block finalizes every task.
template <typename P>
__device__ __forceinline__ void group_loss_tile(const GroupTable& table, int i, int64_t local, GroupState* state,
                                                unsigned long long* counted) {
  const GroupTask& task = table.task[i];
  if (threadIdx.x == 0 && counted[i] == 0) counted[i] = wait_counted(&state->count[i], task.count_tiles);
  __syncthreads();
  const long long count = static_cast<long long>(counted[i] & kCountMask);
  const float gi = task.stored > 0.0f ? task.stored : (count > 0 ? 1.0f / static_cast<float>(count) : 0.0f);
  float loss = 0.0f;
  int valid = 0;
  const int64_t first = local * task.blocks_per_tile;
  const int64_t end = first + task.blocks_per_tile < task.blocks ? first + task.blocks_per_tile : task.blocks;
  if (task.variant == GroupVariant::kCePixelVec) {  // the class count as a constant: one dispatch per tile
    with_classes(task.geom.C, [&](auto classes) {
      for (int64_t block = first; block < end; ++block)
        ce_pixel_vec_tile<P, decltype(classes)::value, kGroupPixelVec>(
            static_cast<const P*>(task.pred), static_cast<const int64_t*>(task.target), task.mask,
            static_cast<P*>(task.grad), task.geom, task.ignore_index, task.s_blocks, block, gi, loss, valid);
    });
  } else {
    for (int64_t block = first; block < end; ++block) group_loss_block<P>(task, block, gi, loss, valid);
  }
  const float sum = block_sum(loss);
  if (threadIdx.x == 0) task.slots[local] = sum;
}

// A grouped task's loss (slots summed in a fixed order, divided by the count), its loss copy for the total and its
// gradient factor: 1 (the gradient was divided in the kernel), or 1 / (stored * count) for float16 gradients. By one
// whole warp: lane l sums slots l, l + 32, ... in float64, then a fixed butterfly, so the result is the same every run.
__device__ __noinline__ void finalize_group_task(const float* slots, int64_t num, unsigned long long word,
                                                 float stored, float* loss_out, float* loss_copy, float* grad_scale) {
  const int lane = threadIdx.x & 31;
  double sum = 0.0;
  long long unused = 0;
  sum_slots_strided<32>(slots, nullptr, num, lane, sum, unused);
  sum = warp_sum(sum);
  if (lane != 0) return;
  const long long count = static_cast<long long>(word & kCountMask);
  const float loss = count > 0 ? static_cast<float>(sum / static_cast<double>(count)) : 0.0f;
  *loss_out = loss;
  *loss_copy = loss;
  if (stored > 0.0f)
    *grad_scale = count > 0 ? static_cast<float>(1.0 / (static_cast<double>(stored) * count)) : 0.0f;
  else
    *grad_scale = 1.0f;
}

// Tile `tile` of the schedule: a count tile or a loss tile of one of the table's tasks.
template <typename P>
__device__ __forceinline__ void group_tile(const GroupTable& table, int64_t tile, GroupState* state,
                                           unsigned long long* counted) {
  int i = 0;
  if (tile < table.count_end) {
    while (tile >= table.task[i].count_first + table.task[i].count_tiles) ++i;
    group_count_tile<P>(table.task[i], tile - table.task[i].count_first, &state->count[i]);
    return;
  }
  while (tile >= table.task[i].loss_first + table.task[i].loss_tiles) ++i;
  group_loss_tile<P>(table, i, tile - table.task[i].loss_first, state, counted);
}

// Every task's count, loss, gradient and the total in one launch. Blocks take tile ids in order from a counter
// (the next one fetched while the current tile runs), so every count tile has been taken by a running block before
// any loss tile starts: a loss tile's wait for its task's count always ends, whatever the grid and residency. A
// block out of tiles takes a ticket; the block that takes the last one (every slot written) finalizes every task
// and writes the total.
// MIN_BLOCKS: the resident blocks per SM the kernel is built for (registers: 65536 / (256 * MIN_BLOCKS)). Memory-bound
// tiles need the warps, the widest tile function sets the registers of all. Side by side on an H100 (forward + backward
// of the NYUv2-like batch in a graph, benchmarks/results/2026-11-27-h100-5/): 2 blocks 0.0545 ms, 3 blocks 0.0525 ms
// (80 registers, no spills), 4 blocks 0.0573 ms (64 registers: spills), hence the default
// (MultitaskBuffers::group_blocks). The pixel tiles take 2 pixels per thread to fit.
constexpr int kDefaultGroupBlocks = 3;
template <typename P, int MIN_BLOCKS>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS)
    grouped_forward_kernel(GroupTable table, GroupState* state, float* losses) {
  __shared__ unsigned long long tile_id[1];
  __shared__ unsigned long long counted[kMaxGroupTasks];  // count words seen complete (0: not yet)
  __shared__ unsigned last[1];
  if (threadIdx.x < kMaxGroupTasks) counted[threadIdx.x] = 0;
  if (threadIdx.x == 0) tile_id[0] = atomicAdd(&state->next_tile, 1ULL);
  __syncthreads();
  unsigned long long tile = tile_id[0];
  while (tile < static_cast<unsigned long long>(table.tile_end)) {
    __syncthreads();  // every thread has read tile_id
    unsigned long long next = 0;
    if (threadIdx.x == 0) next = atomicAdd(&state->next_tile, 1ULL);  // in flight while this tile runs
    group_tile<P>(table, static_cast<int64_t>(tile), state, counted);
    if (threadIdx.x == 0) tile_id[0] = next;
    __syncthreads();
    tile = tile_id[0];
  }
  if (threadIdx.x == 0) {
    __threadfence();  // this block's slots are visible device-wide before its ticket is taken
    last[0] = atomicAdd(&state->blocks_done, 1u) == gridDim.x - 1 ? 1u : 0u;
  }
  __syncthreads();
  if (last[0] == 0u) return;
  __threadfence();
  // This block works alone now (the launch's tail): warp w finalizes tasks w, w + 8, ... side by side.
  for (int i = threadIdx.x / 32; i < table.num; i += kThreads / 32) {
    const GroupTask& task = table.task[i];
    finalize_group_task(task.slots, task.loss_tiles, __ldcg(&state->count[i]), task.stored, task.loss,
                        losses + task.index, task.grad_scale);
  }
  __syncthreads();  // every loss copy written (bar.sync orders the block's global writes too)
  if (threadIdx.x == 0) write_total(table.total, losses, table.weights, table.num_tasks);
}

// ---- grouped scaling -------------------------------------------------------------------------------------------

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
// The most blocks an SM keeps resident (2048 threads: sm_70, sm_80, sm_90); __launch_bounds__ holds the kernel to the
// registers that allows. The grid takes what the device actually holds (DeviceCapacity).
constexpr int kScaleBlocksPerSM = 2048 / kThreads;

// One block's chunk of kScaleChunk elements: 16-byte vectors when aligned and whole, else one element at a time.
// Each element is read and written by the same thread, so in == out (in place) is safe.
template <typename X>
__device__ __forceinline__ void scale_chunk(const void* in, void* out, int64_t numel, int64_t base, float scale,
                                            bool vec) {
  const X* a = static_cast<const X*>(in);
  X* b = static_cast<X*>(out);
  constexpr int V = 16 / sizeof(X);
  static_assert(kScaleItems % V == 0, "a chunk is a whole number of vectors per thread");
  if (vec && base + kScaleChunk <= numel) {
#pragma unroll
    for (int k = 0; k < kScaleItems / V; ++k) {
      const int64_t i = base + (static_cast<int64_t>(k) * kThreads + threadIdx.x) * V;
      Pack<X, V> pk = load_pack<X, V>(a + i);
#pragma unroll
      for (int j = 0; j < V; ++j) pk.v[j] = from_float<X>(to_acc(pk.v[j]) * scale);
      store_pack(b + i, pk);
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kScaleItems; ++k) {
    const int64_t i = base + static_cast<int64_t>(k) * kThreads + threadIdx.x;
    if (i < numel) b[i] = from_float<X>(to_acc(a[i]) * scale);
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

// ---- launch helpers --------------------------------------------------------------------------------------------

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Whether ce_pixel_vec_kernel applies: C <= 16, contiguous pixels, and every PIX-pixel group of every class plane
// (of pred and of grad) starts on a PIX-element boundary.
template <typename P>
bool pixel_vec_ok(const P* pred, const P* grad, const CeGeometry& g, int pix) {
  const bool pred_ok = g.p_ss == 1 && g.p_sc % pix == 0 && g.p_sn % pix == 0 && aligned(pred, sizeof(P) * pix);
  const bool grad_ok =
      grad == nullptr || (g.g_ss == 1 && g.g_sc % pix == 0 && g.g_sn % pix == 0 && aligned(grad, sizeof(P) * pix));
  // The tile addresses a class plane by a 32-bit byte offset (c * stride * sizeof(P)).
  const int64_t limit = static_cast<int64_t>(UINT32_MAX / sizeof(P));
  const bool offsets_32 = g.C * g.p_sc <= limit && (grad == nullptr || g.C * g.g_sc <= limit);
  return g.C >= 1 && g.C <= kMaxPixelVecClasses && g.S % pix == 0 && pred_ok && grad_ok && offsets_32;
}

int rows_threads_per_row(int64_t C) { return C <= 16 ? 4 : (C <= 32 ? 8 : (C <= 64 ? 16 : 32)); }

// The rows tile function for C classes: rows_threads_per_row(C) threads per row, 4 or 8 logits cached per lane (none
// past 256 classes). Both the per-task launcher and the grouped forward pick by it.
GroupVariant rows_variant(int64_t C) {
  return C <= 16    ? GroupVariant::kCeRows4x4
         : C <= 32  ? GroupVariant::kCeRows8x4
         : C <= 64  ? GroupVariant::kCeRows16x4
         : C <= 128 ? GroupVariant::kCeRows32x4
         : C <= 256 ? GroupVariant::kCeRows32x8
                    : GroupVariant::kCeRows32x0;
}

enum class CeKernel { kRows, kPixelVec, kPixel };

template <typename P>
CeKernel ce_kernel_for(const P* pred, const P* grad, const CeGeometry& g) {
  if (g.p_sc == 1 && g.C > 1) return CeKernel::kRows;
  return pixel_vec_ok(pred, grad, g, kPixelVec) ? CeKernel::kPixelVec : CeKernel::kPixel;
}

// The grid of the cross-entropy kernel masked_loss_ce launches (the rows launcher computes the same).
template <typename P>
int64_t ce_blocks(const P* pred, const P* grad, const CeGeometry& g) {
  switch (ce_kernel_for(pred, grad, g)) {
    case CeKernel::kRows:
      return g.N * ceil_div(g.S, kThreads / rows_threads_per_row(g.C));
    case CeKernel::kPixelVec:
      return g.N * ceil_div(g.S / kPixelVec, kThreads);
    default:
      return g.N * ceil_div(g.S, kThreads);
  }
}

template <typename P, typename T>
bool elementwise_vec_ok(const P* pred, const T* target, const P* grad) {
  constexpr int kVec = 16 / sizeof(P);
  return aligned(pred, sizeof(P) * kVec) && aligned(target, sizeof(T) * kVec) &&
         (grad == nullptr || aligned(grad, sizeof(P) * kVec));
}

template <typename P, typename T>
int64_t elementwise_blocks(const P* pred, const T* target, const P* grad, int64_t total) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kElementwiseItems;
  return ceil_div(total, elementwise_vec_ok(pred, target, grad) ? per_block * (16 / sizeof(P)) : per_block);
}

// The launch's grid: the loss blocks, then the count blocks of the next task (ChainLinks).
unsigned grid_of(const ChainLinks& links) { return static_cast<unsigned>(links.loss_blocks + links.next_blocks); }

template <typename P, int TPR, int VPL>
void launch_rows(const P* pred, const int64_t* target, const bool* mask, P* grad, const CeGeometry& g,
                 int64_t ignore_index, const LossReduction& red, const ChainLinks& links, cudaStream_t stream) {
  const int64_t s_blocks = ceil_div(g.S, kThreads / TPR);
  ce_rows_kernel<P, TPR, VPL><<<grid_of(links), kThreads, 0, stream>>>(pred, target, mask, grad, g, ignore_index,
                                                                        s_blocks, red, links);
}

template <int KIND, typename P, typename T>
void launch_elementwise(const P* pred, const T* target, const bool* mask, P* grad, int64_t total, int64_t M,
                        const LossReduction& red, const ChainLinks& links, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(P);
  if (elementwise_vec_ok(pred, target, grad)) {
    elementwise_kernel<KIND, P, T, kVec><<<grid_of(links), kThreads, 0, stream>>>(pred, target, mask, grad, total, M,
                                                                                   red, links);
  } else {
    elementwise_kernel<KIND, P, T, 1><<<grid_of(links), kThreads, 0, stream>>>(pred, target, mask, grad, total, M, red,
                                                                                links);
  }
}

template <typename P, typename T>
void launch_elementwise_kind(ElementwiseKind kind, const P* pred, const T* target, const bool* mask, P* grad,
                             int64_t total, int64_t M, const LossReduction& red, const ChainLinks& links,
                             cudaStream_t stream) {
  switch (kind) {
    case ElementwiseKind::kBCE:
      launch_elementwise<0>(pred, target, mask, grad, total, M, red, links, stream);
      break;
    case ElementwiseKind::kL1:
      launch_elementwise<1>(pred, target, mask, grad, total, M, red, links, stream);
      break;
    case ElementwiseKind::kMSE:
      launch_elementwise<2>(pred, target, mask, grad, total, M, red, links, stream);
      break;
  }
}

// The loss blocks of a cross-entropy launch (the blocks launch_ce's kernel needs for its own task).
int64_t ce_loss_blocks(const void* pred, DType dtype, const void* grad, const CeGeometry& g) {
  if (g.N * g.S == 0) return 0;
  int64_t blocks = 0;
  dispatch_dtype(dtype, [&](auto zero) {
    using P = decltype(zero);
    blocks = ce_blocks(static_cast<const P*>(pred), static_cast<const P*>(grad), g);
    return cudaSuccess;
  });
  return blocks;
}

// The loss blocks of a bce / l1 / mse launch.
int64_t elementwise_loss_blocks(const void* pred, DType dtype, const void* target, DType target_dtype,
                                const void* grad, int64_t total) {
  if (total == 0) return 0;
  int64_t blocks = 0;
  dispatch_dtype(dtype, [&](auto zero) {
    using P = decltype(zero);
    const P* x = static_cast<const P*>(pred);
    const P* gx = static_cast<const P*>(grad);
    blocks = target_dtype == DType::kFloat32 ? elementwise_blocks(x, static_cast<const float*>(target), gx, total)
                                             : elementwise_blocks(x, static_cast<const P*>(target), gx, total);
    return cudaSuccess;
  });
  return blocks;
}

// The cross-entropy kernel for g's layout, with `links` (loss_blocks set here); nothing to do without pixels.
cudaError_t launch_ce(const void* pred, DType dtype, const int64_t* target, const bool* mask, void* grad,
                      const CeGeometry& g, int64_t ignore_index, const LossReduction& red, ChainLinks links,
                      cudaStream_t stream) {
  links.loss_blocks = ce_loss_blocks(pred, dtype, grad, g);
  if (links.loss_blocks == 0) return cudaSuccess;
  if (links.end.ticket != nullptr && links.next_blocks > 0) return cudaErrorInvalidValue;  // the end counts loss blocks
  if (links.loss_blocks + links.next_blocks > std::numeric_limits<int32_t>::max())
    return cudaErrorInvalidConfiguration;  // a 32-bit grid
  const cudaError_t err = dispatch_dtype(dtype, [&](auto zero) {
    using P = decltype(zero);
    const P* x = static_cast<const P*>(pred);
    P* gx = static_cast<P*>(grad);
    const CeKernel kernel = ce_kernel_for(x, gx, g);
    if (kernel == CeKernel::kRows) {
      switch (rows_variant(g.C)) {
        case GroupVariant::kCeRows4x4:
          launch_rows<P, 4, 4>(x, target, mask, gx, g, ignore_index, red, links, stream);
          break;
        case GroupVariant::kCeRows8x4:
          launch_rows<P, 8, 4>(x, target, mask, gx, g, ignore_index, red, links, stream);
          break;
        case GroupVariant::kCeRows16x4:
          launch_rows<P, 16, 4>(x, target, mask, gx, g, ignore_index, red, links, stream);
          break;
        case GroupVariant::kCeRows32x4:
          launch_rows<P, 32, 4>(x, target, mask, gx, g, ignore_index, red, links, stream);
          break;
        case GroupVariant::kCeRows32x8:
          launch_rows<P, 32, 8>(x, target, mask, gx, g, ignore_index, red, links, stream);
          break;
        default:
          launch_rows<P, 32, 0>(x, target, mask, gx, g, ignore_index, red, links, stream);
      }
    } else if (kernel == CeKernel::kPixelVec) {
      const int64_t s_blocks = ceil_div(g.S / kPixelVec, kThreads);
      with_classes(g.C, [&](auto classes) {
        ce_pixel_vec_kernel<P, decltype(classes)::value, kPixelVec><<<grid_of(links), kThreads, 0, stream>>>(
            x, target, mask, gx, g, ignore_index, s_blocks, red, links);
      });
    } else {
      const int64_t s_blocks = ceil_div(g.S, kThreads);
      if (g.C <= 16)
        ce_pixel_kernel<P, 16><<<grid_of(links), kThreads, 0, stream>>>(x, target, mask, gx, g, ignore_index,
                                                                         s_blocks, red, links);
      else
        ce_pixel_kernel<P, 0><<<grid_of(links), kThreads, 0, stream>>>(x, target, mask, gx, g, ignore_index,
                                                                        s_blocks, red, links);
    }
    return cudaSuccess;
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

// The bce / l1 / mse kernel, with `links` (loss_blocks set here); nothing to do without elements.
cudaError_t launch_elementwise_task(ElementwiseKind kind, const void* pred, DType dtype, const void* target,
                                    DType target_dtype, const bool* mask, void* grad, int64_t total, int64_t M,
                                    const LossReduction& red, ChainLinks links, cudaStream_t stream) {
  if (target_dtype != dtype && target_dtype != DType::kFloat32) return cudaErrorInvalidValue;
  links.loss_blocks = elementwise_loss_blocks(pred, dtype, target, target_dtype, grad, total);
  if (links.loss_blocks == 0) return cudaSuccess;
  if (links.end.ticket != nullptr && links.next_blocks > 0) return cudaErrorInvalidValue;  // the end counts loss blocks
  if (links.loss_blocks + links.next_blocks > std::numeric_limits<int32_t>::max())
    return cudaErrorInvalidConfiguration;  // a 32-bit grid
  const cudaError_t err = dispatch_dtype(dtype, [&](auto zero) {
    using P = decltype(zero);
    const P* x = static_cast<const P*>(pred);
    P* gx = static_cast<P*>(grad);
    if (target_dtype == DType::kFloat32)
      launch_elementwise_kind(kind, x, static_cast<const float*>(target), mask, gx, total, M, red, links, stream);
    else
      launch_elementwise_kind(kind, x, static_cast<const P*>(target), mask, gx, total, M, red, links, stream);
    return cudaSuccess;
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

// ---- the multi-task forward ------------------------------------------------------------------------------------

int64_t count_items(const LossTask& task) { return task.is_ce ? task.geom.N * task.geom.S : task.total; }

// Elements of the task's prediction (and of its gradient).
int64_t pred_elements(const LossTask& task) { return task.is_ce ? count_items(task) * task.geom.C : task.total; }

// Tasks without elements get loss 0 and factor 0 (all-zero bytes); their kernels would have no blocks.
cudaError_t zero_tasks_without_elements(const LossTask* tasks, int n, const MultitaskBuffers& buf,
                                        cudaStream_t stream) {
  for (int t = 0; t < n; ++t) {
    if (count_items(tasks[t]) > 0) continue;
    cudaError_t err = cudaMemsetAsync(tasks[t].loss, 0, sizeof(float), stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(buf.grad_scale + t, 0, sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

int64_t loss_blocks(const LossTask& task) {
  return task.is_ce ? ce_loss_blocks(task.pred, task.dtype, task.grad, task.geom)
                    : elementwise_loss_blocks(task.pred, task.dtype, task.target, task.target_dtype, task.grad,
                                              task.total);
}

CountTask count_task(const LossTask& task, float* grad_scale) {
  CountTask c{};
  c.is_ce = task.is_ce;
  c.target = task.target;
  c.target_dtype = task.target_dtype;
  c.mask = task.mask;
  c.geom = task.geom;
  c.ignore_index = task.ignore_index;
  c.total = task.total;
  c.M = task.M > 0 ? task.M : 1;
  c.loss = task.loss;
  c.grad_scale = grad_scale;
  return c;
}

cudaError_t launch_task(const LossTask& task, const LossReduction& red, const ChainLinks& links,
                        cudaStream_t stream) {
  return task.is_ce ? launch_ce(task.pred, task.dtype, static_cast<const int64_t*>(task.target), task.mask, task.grad,
                                task.geom, task.ignore_index, red, links, stream)
                    : launch_elementwise_task(task.kind, task.pred, task.dtype, task.target, task.target_dtype,
                                              task.mask, task.grad, task.total, task.M, red, links, stream);
}

// The chain's order: the lead first (the task with the fewest gradient elements, none counting as 0: only the lead's
// gradient is moved again by the backward), then the other tasks that have loss blocks, in their order. Empty when
// fewer than two tasks have loss blocks (no chain).
std::vector<int> chain_order(const LossTask* tasks, int n) {
  std::vector<int> order;
  int lead = -1;
  int64_t lead_size = 0;
  for (int t = 0; t < n; ++t) {
    if (count_items(tasks[t]) == 0) continue;  // no elements: no loss blocks
    order.push_back(t);
    const LossTask& task = tasks[t];
    const int64_t size = task.grad == nullptr ? 0 : pred_elements(task);
    if (lead < 0 || size < lead_size) {
      lead = t;
      lead_size = size;
    }
  }
  if (order.size() < 2) return {};
  order.erase(std::find(order.begin(), order.end(), lead));
  order.insert(order.begin(), lead);
  return order;
}

// A task's slots in buf.psum / buf.pcount: one per block of its loss kernel (the chain), and at least one per block of
// the grouped forward's pixel tiles (2 pixels per thread rather than the kernel's 4), so that a grouped loss tile can
// be a single block.
int64_t task_slots(const LossTask& task) {
  const int64_t blocks = loss_blocks(task);
  return task.is_ce ? std::max(blocks, task.geom.N * ceil_div(task.geom.S, kGroupPixelVec * kThreads)) : blocks;
}

// Each task's first slot in buf.psum / buf.pcount (task t owns task_slots(t) slots after those of tasks < t).
std::vector<int64_t> first_slots(const LossTask* tasks, int n) {
  std::vector<int64_t> first(n + 1, 0);
  for (int t = 0; t < n; ++t) first[t + 1] = first[t] + task_slots(tasks[t]);
  return first;
}

// The last launch's end: finalize task t (its loss and its copy) and write the total over every task.
LaunchEnd op_end(const LossTask* tasks, int n, const MultitaskBuffers& buf, int t) {
  LaunchEnd end;
  end.ticket = buf.ticket;
  end.loss = tasks[t].loss;
  end.loss_copy = buf.losses + t;
  end.total = buf.total;
  end.losses = buf.losses;
  end.weights = buf.weights;
  end.num_tasks = n;
  return end;
}

// Fewer than two tasks with elements: the count passes of every task (kMaxCountTasks per launch; they zero the losses,
// set the factors to 1 and reset the op), then the loss kernel of the task with elements, if any, which ends the op.
// Without one, the count pass writes the total (sum_t weights[t] * 0).
cudaError_t forward_unchained(const LossTask* tasks, int n, const MultitaskBuffers& buf, cudaStream_t stream) {
  int with_elements = -1;
  for (int t = 0; t < n; ++t)
    if (count_items(tasks[t]) > 0) with_elements = t;
  std::vector<int> blocks_of(n);
  for (int begin = 0; begin < n; begin += kMaxCountTasks) {
    const int end = std::min(n, begin + kMaxCountTasks);
    CountTable table{};
    table.blocks = 1;
    for (int t = begin; t < end; ++t) {
      table.task[t - begin] = count_task(tasks[t], buf.grad_scale + t);
      table.blocks = std::max(table.blocks, masked_loss_count_blocks(count_items(tasks[t])));
    }
    for (int t = begin; t < end; ++t) blocks_of[t] = table.blocks;
    OpStart start;
    if (begin == 0) start = {buf.ticket, buf.losses, n, with_elements < 0 ? buf.total : nullptr, buf.weights};
    count_tasks_kernel<<<static_cast<unsigned>((end - begin) * table.blocks), kThreads, 0, stream>>>(
        table, buf.counts + begin * kMaxCountBlocks, start);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (with_elements < 0) return cudaSuccess;
  const int t = with_elements;
  LossReduction red;
  red.counts = buf.counts + t * kMaxCountBlocks;
  red.num_counts = blocks_of[t];
  red.grad_scale = tasks[t].grad != nullptr && tasks[t].dtype == DType::kFloat16 ? buf.grad_scale + t : nullptr;
  red.psum = buf.psum;  // the only task with slots
  red.pcount = buf.pcount;
  ChainLinks links;
  links.end = op_end(tasks, n, buf, t);
  return launch_task(tasks[t], red, links, stream);
}

// The grouped forward's task order (the op's tasks with elements, largest gradient first: the last tiles taken belong
// to the smallest task, so the op ends on its short finalize), or empty when the grouped launch does not apply: no
// task with elements, mixed prediction dtypes, more than kMaxGroupTasks such tasks, a target dtype the kernels do not
// take (the chain reports it), or a count too large for a count word.
std::vector<int> group_order(const LossTask* tasks, int n, const MultitaskBuffers& buf) {
  std::vector<int> order;
  if (!buf.grouped || !aligned(buf.counts, alignof(unsigned long long))) return order;
  for (int t = 0; t < n; ++t) {
    const LossTask& task = tasks[t];
    if (count_items(task) == 0) continue;
    if (!order.empty() && task.dtype != tasks[order[0]].dtype) return {};
    if (!task.is_ce && task.target_dtype != task.dtype && task.target_dtype != DType::kFloat32) return {};
    if (count_items(task) / kCountChunk >= kMaxGroupCountTiles || count_items(task) > static_cast<int64_t>(kCountMask))
      return {};  // the count word would not hold the tiles or the count
    order.push_back(t);
  }
  if (order.size() > static_cast<size_t>(kMaxGroupTasks)) return {};
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return pred_elements(tasks[a]) > pred_elements(tasks[b]); });
  return order;
}

// The cross-entropy tile function for g's layout (launch_ce's choice) and its tiles per sample.
template <typename P>
void ce_group_variant(const P* pred, const P* grad, const CeGeometry& g, GroupVariant& variant, int64_t& s_blocks) {
  const CeKernel kernel = ce_kernel_for(pred, grad, g);
  if (kernel != CeKernel::kRows && pixel_vec_ok(pred, grad, g, kGroupPixelVec)) {
    variant = GroupVariant::kCePixelVec;
    s_blocks = ceil_div(g.S / kGroupPixelVec, kThreads);
    return;
  }
  switch (kernel) {
    case CeKernel::kRows: {
      const int tpr = rows_threads_per_row(g.C);
      s_blocks = ceil_div(g.S, kThreads / tpr);
      variant = rows_variant(g.C);
      return;
    }
    default:  // pixel_vec_ok for kPixelVec implies it for kGroupPixelVec: only the pixel kernel is left
      variant = g.C <= 16 ? GroupVariant::kCePixel16 : GroupVariant::kCePixel;
      s_blocks = ceil_div(g.S, kThreads);
  }
}

size_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

constexpr int64_t kGroupTileBytes = 48 * 1024;  // the least a loss tile moves, where a task is large enough (default)
constexpr int64_t kGroupMaxBlocksPerTile = 8;

// Task `index` of the op as a grouped task (the schedule is filled in by forward_grouped).
GroupTask group_task(const LossTask& task, int index, const MultitaskBuffers& buf, float* slots) {
  GroupTask gt{};
  gt.kind = task.kind;
  gt.index = index;
  gt.pred = task.pred;
  gt.target = task.target;
  gt.mask = task.mask;
  gt.grad = task.grad;
  gt.ignore_index = task.ignore_index;
  gt.loss = task.loss;
  gt.grad_scale = buf.grad_scale + index;
  gt.slots = slots;
  const bool mse = !task.is_ce && task.kind == ElementwiseKind::kMSE;
  gt.stored = task.grad != nullptr && task.dtype == DType::kFloat16 ? (mse ? 0.5f : 1.0f) : 0.0f;
  size_t target_size = sizeof(int64_t);
  if (task.is_ce) {
    gt.geom = task.geom;
    dispatch_dtype(task.dtype, [&](auto zero) {
      using P = decltype(zero);
      ce_group_variant(static_cast<const P*>(task.pred), static_cast<const P*>(task.grad), task.geom, gt.variant,
                       gt.s_blocks);
      return cudaSuccess;
    });
    gt.count_vec = task.geom.t_ss == 1 && task.geom.t_sn == task.geom.S && aligned(task.target, 16);
  } else {
    gt.variant = GroupVariant::kElementwise;
    gt.target_f32 = task.target_dtype == DType::kFloat32;
    gt.total = task.total;
    gt.M = task.M > 0 ? task.M : 1;
    gt.vec = dispatch_dtype(task.dtype, [&](auto zero) {
               using P = decltype(zero);
               const P* x = static_cast<const P*>(task.pred);
               const P* gx = static_cast<const P*>(task.grad);
               const bool ok = gt.target_f32 ? elementwise_vec_ok(x, static_cast<const float*>(task.target), gx)
                                             : elementwise_vec_ok(x, static_cast<const P*>(task.target), gx);
               return ok ? cudaSuccess : cudaErrorInvalidValue;
             }) == cudaSuccess;
    gt.geom.N = gt.total / gt.M;
    gt.geom.S = gt.M;
    gt.geom.m_sn = 1;
    target_size = dtype_size(task.target_dtype);
    gt.count_vec = aligned(task.target, 16);
  }
  gt.count_elems = gt.count_vec ? static_cast<int64_t>(kThreads) * kGroupCountVecs * (16 / target_size) : kCountChunk;
  gt.count_tiles = ceil_div(count_items(task), gt.count_elems);
  const int64_t slots_of_task = task_slots(task);  // what masked_loss_multitask_slots gave the task
  gt.blocks = task.is_ce ? task.geom.N * gt.s_blocks : loss_blocks(task);
  // Bytes a block of the per-task kernel moves (preds and gradients, targets): a loss tile runs enough of them to move
  // kGroupTileBytes, so that its fixed costs (the tile id, a block reduction, its slot) stay small beside its loads.
  const int64_t pred_bytes = pred_elements(task) * static_cast<int64_t>(dtype_size(task.dtype));
  const int64_t bytes = 2 * pred_bytes + count_items(task) * static_cast<int64_t>(target_size);
  const int64_t per_block = std::max<int64_t>(1, bytes / std::max<int64_t>(1, gt.blocks));
  const int64_t tile_bytes = buf.group_tile_bytes > 0 ? buf.group_tile_bytes : kGroupTileBytes;
  gt.blocks_per_tile = std::min(kGroupMaxBlocksPerTile, std::max<int64_t>(1, ceil_div(tile_bytes, per_block)));
  gt.blocks_per_tile = std::max(gt.blocks_per_tile, ceil_div(gt.blocks, slots_of_task));  // a slot per tile
  gt.loss_tiles = ceil_div(gt.blocks, gt.blocks_per_tile);
  return gt;
}

// Blocks of the grouped launch: what the device keeps resident (one wave; the blocks loop over the tiles), at most
// one per tile.
template <typename P, int MIN_BLOCKS>
unsigned group_grid(int64_t tiles) {
  static std::atomic<int> per_sm_cache{0}, sms_cache{0};  // one device kind per process is the norm; else re-queried
  int device = 0, sms = 0, per_sm = per_sm_cache.load(std::memory_order_relaxed);
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    sms = 132;
  }
  if (per_sm <= 0 || sms != sms_cache.load(std::memory_order_relaxed)) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, grouped_forward_kernel<P, MIN_BLOCKS>, kThreads, 0) !=
            cudaSuccess ||
        per_sm <= 0) {
      cudaGetLastError();
      per_sm = 2;
    }
    per_sm_cache.store(per_sm, std::memory_order_relaxed);
    sms_cache.store(sms, std::memory_order_relaxed);
  }
  return static_cast<unsigned>(std::min<int64_t>(tiles, static_cast<int64_t>(sms) * per_sm));
}

// The grouped forward (see masked_loss.h): the state zeroed, tasks without elements given loss 0 and factor 0, then
// one launch over the schedule: every task's count tiles, then every task's loss tiles, in `order`.
cudaError_t forward_grouped(const LossTask* tasks, int n, const std::vector<int>& order, const MultitaskBuffers& buf,
                            cudaStream_t stream) {
  GroupState* state = reinterpret_cast<GroupState*>(buf.counts);
  float* losses = reinterpret_cast<float*>(state + 1);
  cudaError_t err = cudaMemsetAsync(state, 0, sizeof(GroupState) + n * sizeof(float), stream);
  if (err == cudaSuccess) err = zero_tasks_without_elements(tasks, n, buf, stream);
  if (err != cudaSuccess) return err;
  const std::vector<int64_t> first = first_slots(tasks, n);
  GroupTable table{};
  table.num = static_cast<int>(order.size());
  table.num_tasks = n;
  table.weights = buf.weights;
  table.total = buf.total;
  int64_t next = 0;
  for (int i = 0; i < table.num; ++i) {
    table.task[i] = group_task(tasks[order[i]], order[i], buf, buf.psum + first[order[i]]);
    table.task[i].count_first = next;
    next += table.task[i].count_tiles;
  }
  table.count_end = next;
  for (int i = 0; i < table.num; ++i) {
    table.task[i].loss_first = next;
    next += table.task[i].loss_tiles;
  }
  table.tile_end = next;
  const int min_blocks = buf.group_blocks == 0 ? kDefaultGroupBlocks : buf.group_blocks;
  if (min_blocks < 2 || min_blocks > 4) return cudaErrorInvalidValue;
  err = dispatch_dtype(tasks[order[0]].dtype, [&](auto zero) {
    using P = decltype(zero);
    if (min_blocks == 2)
      grouped_forward_kernel<P, 2><<<group_grid<P, 2>(table.tile_end), kThreads, 0, stream>>>(table, state, losses);
    else if (min_blocks == 4)
      grouped_forward_kernel<P, 4><<<group_grid<P, 4>(table.tile_end), kThreads, 0, stream>>>(table, state, losses);
    else
      grouped_forward_kernel<P, 3><<<group_grid<P, 3>(table.tile_end), kThreads, 0, stream>>>(table, state, losses);
    return cudaSuccess;
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

// One task's count pass (masked_loss's first launch): count_tasks_kernel with a table of one; it zeroes the ticket.
cudaError_t launch_count(const CountTask& task, int32_t* counts, int num_blocks, unsigned* ticket,
                         cudaStream_t stream) {
  CountTable table{};
  table.task[0] = task;
  table.blocks = num_blocks;
  OpStart start;
  start.ticket = ticket;
  count_tasks_kernel<<<num_blocks, kThreads, 0, stream>>>(table, counts, start);
  return cudaGetLastError();
}

// One task's loss launch (masked_loss's second), ended by `end`.
ChainLinks single(const LaunchEnd& end) {
  ChainLinks links;
  links.end = end;
  return links;
}

}  // namespace

// ---- public launchers ------------------------------------------------------------------------------------------

cudaError_t masked_loss_count_ce(const int64_t* target, const bool* mask, const CeGeometry& geom, int64_t ignore_index,
                                 int32_t* counts, int num_blocks, float* loss, unsigned* ticket, cudaStream_t stream) {
  CountTask task{};
  task.is_ce = true;
  task.target = target;
  task.mask = mask;
  task.geom = geom;
  task.ignore_index = ignore_index;
  task.loss = loss;
  return launch_count(task, counts, num_blocks, ticket, stream);
}

cudaError_t masked_loss_count_float(const void* target, DType target_dtype, const bool* mask, int64_t total,
                                    int64_t M, int32_t* counts, int num_blocks, float* loss, unsigned* ticket,
                                    cudaStream_t stream) {
  if (target_dtype != DType::kFloat32 && target_dtype != DType::kFloat16 && target_dtype != DType::kBFloat16)
    return cudaErrorInvalidValue;
  CountTask task{};
  task.target = target;
  task.target_dtype = target_dtype;
  task.mask = mask;
  task.total = total;
  task.M = M > 0 ? M : 1;
  task.loss = loss;
  return launch_count(task, counts, num_blocks, ticket, stream);
}

cudaError_t masked_loss_ce(const void* pred, DType dtype, const int64_t* target, const bool* mask, void* grad,
                           const CeGeometry& g, int64_t ignore_index, const LossReduction& red, const LaunchEnd& end,
                           cudaStream_t stream) {
  return launch_ce(pred, dtype, target, mask, grad, g, ignore_index, red, single(end), stream);
}

cudaError_t masked_loss_elementwise(ElementwiseKind kind, const void* pred, DType dtype, const void* target,
                                    DType target_dtype, const bool* mask, void* grad, int64_t total, int64_t M,
                                    const LossReduction& red, const LaunchEnd& end, cudaStream_t stream) {
  return launch_elementwise_task(kind, pred, dtype, target, target_dtype, mask, grad, total, M, red, single(end),
                                 stream);
}

int64_t masked_loss_slots(const LossTask& task) { return loss_blocks(task); }

int64_t masked_loss_multitask_slots(const LossTask* tasks, int num_tasks) {
  return first_slots(tasks, num_tasks)[num_tasks];
}

cudaError_t masked_loss_multitask_forward(const LossTask* tasks, int num_tasks, const MultitaskBuffers& buf,
                                          cudaStream_t stream) {
  if (num_tasks <= 0) return cudaErrorInvalidValue;
  const std::vector<int> group = group_order(tasks, num_tasks, buf);
  if (!group.empty()) return forward_grouped(tasks, num_tasks, group, buf, stream);
  const std::vector<int> order = chain_order(tasks, num_tasks);
  if (order.empty()) return forward_unchained(tasks, num_tasks, buf, stream);
  if (const cudaError_t err = zero_tasks_without_elements(tasks, num_tasks, buf, stream); err != cudaSuccess)
    return err;  // the chain's order holds exactly the tasks with elements
  const std::vector<int64_t> first = first_slots(tasks, num_tasks);
  std::vector<int> count_blocks(num_tasks, 0);
  for (size_t i = 0; i < order.size(); ++i) {
    const int t = order[i];
    LossReduction red;
    red.psum = buf.psum + first[t];
    red.pcount = buf.pcount + first[t];
    ChainLinks links;
    if (i == 0) {  // the lead, in partials mode; its count blocks reset the op
      links.start = {buf.ticket, buf.losses, num_tasks, nullptr, nullptr};
    } else {  // normalised by the counts the previous launch wrote; block 0 finalizes the previous task
      red.counts = buf.counts + t * kMaxCountBlocks;
      red.num_counts = count_blocks[t];
      red.grad_scale = tasks[t].grad != nullptr && tasks[t].dtype == DType::kFloat16 ? buf.grad_scale + t : nullptr;
      const int prev = order[i - 1];
      TaskSlots& slots = links.prev;
      slots.psum = buf.psum + first[prev];
      slots.pcount = buf.pcount + first[prev];
      slots.num = loss_blocks(tasks[prev]);  // the slots its launch wrote (task_slots may hold more)
      slots.loss = tasks[prev].loss;
      slots.loss_copy = buf.losses + prev;
      if (i == 1) {  // the lead's gradient was stored undivided: its factor
        slots.grad_scale = buf.grad_scale + prev;
        slots.stored = !tasks[prev].is_ce && tasks[prev].kind == ElementwiseKind::kMSE ? 0.5f : 1.0f;
      }
    }
    if (i + 1 < order.size()) {  // count the next task
      const int next = order[i + 1];
      count_blocks[next] = masked_loss_count_blocks(count_items(tasks[next]));
      links.next = count_task(tasks[next], buf.grad_scale + next);
      links.next_blocks = count_blocks[next];
      links.next_counts = buf.counts + next * kMaxCountBlocks;
    } else {  // the last launch ends the op
      links.end = op_end(tasks, num_tasks, buf, t);
    }
    const cudaError_t err = launch_task(tasks[t], red, links, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

namespace {

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
