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
#include <cmath>
#include <limits>
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

// A task's loss (and, with grad_scale, its factor) from its slots, in a fixed order (every thread of the block takes
// part; TaskSlots documents the arguments). The slots may have been written by other blocks of this launch: read
// through L2. Not inlined, and given scalars rather than the kernel's parameter struct: inlined, its float64 sums
// made the lighter loss kernels spill registers in their main loop.
__device__ __noinline__ void finalize_slots(const float* psum, const int32_t* pcount, int64_t num, float* loss_out,
                                            float* loss_copy, float* grad_scale, float stored) {
  constexpr int kUnroll = 4;  // loads in flight per thread: one block walks every slot (many for huge tasks)
  double sum = 0.0;
  long long count = 0;
  for (int64_t base = threadIdx.x; base < num; base += kThreads * kUnroll) {
    float s[kUnroll];
    int32_t c[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      s[u] = i < num ? __ldcg(psum + i) : 0.0f;
      c[u] = i < num ? __ldcg(pcount + i) : 0;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      sum += s[u];
      count += c[u];
    }
  }
  sum = block_sum(sum);
  count = block_sum(count);
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
    t = flat_target ? target[r * g.t_ss] : target[n * g.t_sn + s * g.t_ss];
    return mask == nullptr || (flat_mask ? mask[r * g.m_ss] : mask[n * g.m_sn + s * g.m_ss]);
  };
  const auto valid = [&](int64_t t) { return t != ignore_index && t >= 0 && t < g.C; };
  return count_in_chunks<int64_t>(g.N * g.S, block, blocks, load, valid);
}

// Non-NaN float targets (contiguous storage, sample n owns [n*M, (n+1)*M)) seen by block `block` of `blocks`.
template <typename T>
__device__ int count_float_block(const T* __restrict__ target, const bool* __restrict__ mask, int64_t total,
                                 int64_t M, int64_t block, int64_t blocks) {
  const auto load = [&](int64_t i, float& t) {
    t = to_acc(target[i]);
    return mask == nullptr || mask[div_index(i, M)];
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
  CeRow row;
  row.t = target[n * g.t_sn + s * g.t_ss];
  row.ok = row.t != ignore_index && row.t >= 0 && row.t < g.C;  // out-of-range classes are skipped, never read
  if (row.ok && mask != nullptr) row.ok = mask[n * g.m_sn + s * g.m_ss];
  return row;
}

template <typename P, int CREG>
__global__ void __launch_bounds__(kThreads)
    ce_pixel_kernel(const P* __restrict__ pred, const int64_t* __restrict__ target, const bool* __restrict__ mask,
                    P* __restrict__ grad, CeGeometry g, int64_t ignore_index, int64_t s_blocks,
                    LossReduction red, ChainLinks links) {
  if (chain_prologue(links)) return;
  const float inv = reduction_inv(red);
  const float gi = reduction_grad_factor(red, inv, 1.0f);
  const int64_t n = blockIdx.x / s_blocks;
  const int64_t s = (blockIdx.x - n * s_blocks) * kThreads + threadIdx.x;
  float row_loss = 0.0f;
  int valid = 0;
  if (s < g.S) {
    const CeRow row = load_ce_row(target, mask, g, n, s, ignore_index);
    valid = row.ok ? 1 : 0;
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
        v[c] = expf(v[c] - m);
        l += v[c];
      }
      row_loss = (m - xt) + logf(l);
      if (gx != nullptr) {
        const float scale = gi / l;
#pragma unroll
        for (int c = 0; c < CREG; ++c)
          if (c < g.C) gx[c * g.g_sc] = from_float<P>(v[c] * scale - (c == row.t ? gi : 0.0f));
      }
    } else {  // online softmax, then a second read (from cache) for the gradient
      float m = -INFINITY, l = 0.0f;
      for (int64_t c = 0; c < g.C; ++c) {
        const float xv = to_acc(x[c * g.p_sc]);
        if (xv > m) {
          l = l * expf(m - xv) + 1.0f;
          m = xv;
        } else {
          l += expf(xv - m);
        }
      }
      row_loss = (m - to_acc(x[row.t * g.p_sc])) + logf(l);
      if (gx != nullptr) {
        const float scale = gi / l;
        for (int64_t c = 0; c < g.C; ++c)
          gx[c * g.g_sc] = from_float<P>(expf(to_acc(x[c * g.p_sc]) - m) * scale - (c == row.t ? gi : 0.0f));
      }
    }
  }
  reduction_finish(red, links.end, row_loss, valid);
}

// NCHW logits with contiguous pixels (p_ss == g_ss == 1): PIX neighbouring pixels per thread, so every load and store
// of a class plane moves PIX elements at once (8 or 16 bytes instead of 2 or 4). The launcher checks that S and the
// sample and class strides are multiples of PIX and that pred and grad are aligned to PIX elements. C <= CREG.
template <typename P, int CREG, int PIX>
__global__ void __launch_bounds__(kThreads)
    ce_pixel_vec_kernel(const P* __restrict__ pred, const int64_t* __restrict__ target, const bool* __restrict__ mask,
                        P* __restrict__ grad, CeGeometry g, int64_t ignore_index, int64_t s_blocks,
                        LossReduction red, ChainLinks links) {
  using Vec = Pack<P, PIX>;
  if (chain_prologue(links)) return;
  const float inv = reduction_inv(red);
  const float gi = reduction_grad_factor(red, inv, 1.0f);
  const int64_t n = blockIdx.x / s_blocks;
  const int64_t s0 = ((blockIdx.x - n * s_blocks) * kThreads + threadIdx.x) * PIX;
  float row_loss = 0.0f;
  int valid = 0;
  if (s0 < g.S) {
    int64_t cls[PIX];
    bool ok[PIX];
    bool any = false;
#pragma unroll
    for (int j = 0; j < PIX; ++j) {
      const CeRow row = load_ce_row(target, mask, g, n, s0 + j, ignore_index);
      cls[j] = row.t;
      ok[j] = row.ok;
      any |= row.ok;
      valid += row.ok ? 1 : 0;
    }
    const P* x = pred + n * g.p_sn + s0;
    P* gx = grad != nullptr ? grad + n * g.g_sn + s0 : nullptr;
    if (!any) {  // no labelled pixel here (e.g. an unlabelled sample): the logits are not read at all
      if (gx != nullptr) {
        Vec zero;
#pragma unroll
        for (int j = 0; j < PIX; ++j) zero.v[j] = from_float<P>(0.0f);
        for (int64_t c = 0; c < g.C; ++c) *reinterpret_cast<Vec*>(gx + c * g.g_sc) = zero;
      }
    } else {
      float v[CREG][PIX];
      float m[PIX], l[PIX], xt[PIX];
#pragma unroll
      for (int j = 0; j < PIX; ++j) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
        xt[j] = 0.0f;
      }
#pragma unroll
      for (int c = 0; c < CREG; ++c) {
        if (c < g.C) {
          const Vec pk = *reinterpret_cast<const Vec*>(x + c * g.p_sc);
#pragma unroll
          for (int j = 0; j < PIX; ++j) v[c][j] = to_acc(pk.v[j]);
        } else {
#pragma unroll
          for (int j = 0; j < PIX; ++j) v[c][j] = -INFINITY;
        }
#pragma unroll
        for (int j = 0; j < PIX; ++j) {
          m[j] = fmaxf(m[j], v[c][j]);
          if (c == cls[j]) xt[j] = v[c][j];
        }
      }
#pragma unroll
      for (int c = 0; c < CREG; ++c) {
#pragma unroll
        for (int j = 0; j < PIX; ++j) {
          v[c][j] = expf(v[c][j] - m[j]);
          l[j] += v[c][j];
        }
      }
#pragma unroll
      for (int j = 0; j < PIX; ++j)
        if (ok[j]) row_loss += (m[j] - xt[j]) + logf(l[j]);
      if (gx != nullptr) {
        float scale[PIX];
#pragma unroll
        for (int j = 0; j < PIX; ++j) scale[j] = gi / l[j];
#pragma unroll
        for (int c = 0; c < CREG; ++c) {
          if (c < g.C) {
            Vec out;
#pragma unroll
            for (int j = 0; j < PIX; ++j)
              out.v[j] = from_float<P>(ok[j] ? v[c][j] * scale[j] - (c == cls[j] ? gi : 0.0f) : 0.0f);
            *reinterpret_cast<Vec*>(gx + c * g.g_sc) = out;
          }
        }
      }
    }
  }
  reduction_finish(red, links.end, row_loss, valid);
}

// TPR threads per row of C contiguous logits (p_sc == 1); VPL > 0 caches VPL logits per lane (C <= TPR * VPL).
template <typename P, int TPR, int VPL>
__global__ void __launch_bounds__(kThreads)
    ce_rows_kernel(const P* __restrict__ pred, const int64_t* __restrict__ target, const bool* __restrict__ mask,
                   P* __restrict__ grad, CeGeometry g, int64_t ignore_index, int64_t s_blocks,
                   LossReduction red, ChainLinks links) {
  constexpr int kRows = kThreads / TPR;
  if (chain_prologue(links)) return;
  const float inv = reduction_inv(red);
  const float gi = reduction_grad_factor(red, inv, 1.0f);
  const int lane = threadIdx.x % TPR;
  const int64_t n = blockIdx.x / s_blocks;
  const int64_t s = (blockIdx.x - n * s_blocks) * kRows + threadIdx.x / TPR;
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
        for (int k = 0; k < VPL; ++k) l += expf(v[k] - m);
      }
    } else {
      for (int64_t c = lane; c < g.C; c += TPR) {
        const float xv = to_acc(x[c]);
        if (xv > m) {
          l = l * expf(m - xv) + 1.0f;
          m = xv;
        } else {
          l += expf(xv - m);
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
    l = (m == -INFINITY ? 0.0f : l * expf(m - mm)) + (m2 == -INFINITY ? 0.0f : l2 * expf(m2 - mm));
    m = mm;
  }
  float row_loss = 0.0f;
  if (row.ok && lane == 0) row_loss = (m - to_acc(x[row.t])) + logf(l);
  const int valid = row.ok && lane == 0 ? 1 : 0;
  if (in_range && grad != nullptr) {
    P* gx = grad + n * g.g_sn + s * g.g_ss;
    if (!row.ok) {
      for (int64_t c = lane; c < g.C; c += TPR) gx[c * g.g_sc] = from_float<P>(0.0f);
    } else if (VPL > 0) {
      const float scale = gi / l;
#pragma unroll
      for (int k = 0; k < VPL; ++k) {
        const int64_t c = lane + k * TPR;
        if (c < g.C) gx[c * g.g_sc] = from_float<P>(expf(v[k] - m) * scale - (c == row.t ? gi : 0.0f));
      }
    } else {
      const float scale = gi / l;
      for (int64_t c = lane; c < g.C; c += TPR)
        gx[c * g.g_sc] = from_float<P>(expf(to_acc(x[c]) - m) * scale - (c == row.t ? gi : 0.0f));
    }
  }
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

template <int KIND, typename P, typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(const P* __restrict__ pred, const T* __restrict__ target, const bool* __restrict__ mask,
                       P* __restrict__ grad, int64_t total, int64_t M, LossReduction red, ChainLinks links) {
  if (chain_prologue(links)) return;
  const float inv = reduction_inv(red);
  const float gi =
      reduction_grad_factor(red, inv, KIND == static_cast<int>(ElementwiseKind::kMSE) ? 0.5f : 1.0f);
  float acc = 0.0f;
  int valid = 0;
  const int64_t block_base = static_cast<int64_t>(blockIdx.x) * (kThreads * VEC * kElementwiseItems);
#pragma unroll
  for (int item = 0; item < kElementwiseItems; ++item) {
    const int64_t base = block_base + (static_cast<int64_t>(item) * kThreads + threadIdx.x) * VEC;
    if (base >= total) break;
    const bool full = base + VEC <= total;
    bool ok[VEC];
    bool any = false;
    if (mask != nullptr) {
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
      const Pack<P, VEC> pp = *reinterpret_cast<const Pack<P, VEC>*>(pred + base);
      const Pack<T, VEC> tp = *reinterpret_cast<const Pack<T, VEC>*>(target + base);
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
        *reinterpret_cast<Pack<P, VEC>*>(grad + base) = gp;
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (base + e < total) grad[base + e] = gp.v[e];
      }
    }
  }
  reduction_finish(red, links.end, acc, valid);
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
      Pack<X, V> pk = *reinterpret_cast<const Pack<X, V>*>(a + i);
#pragma unroll
      for (int j = 0; j < V; ++j) pk.v[j] = from_float<X>(to_acc(pk.v[j]) * scale);
      *reinterpret_cast<Pack<X, V>*>(b + i) = pk;
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
  return g.C <= 16 && g.S % pix == 0 && pred_ok && grad_ok;
}

int rows_threads_per_row(int64_t C) { return C <= 16 ? 4 : (C <= 32 ? 8 : (C <= 64 ? 16 : 32)); }

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
      if (g.C <= 16)
        launch_rows<P, 4, 4>(x, target, mask, gx, g, ignore_index, red, links, stream);
      else if (g.C <= 32)
        launch_rows<P, 8, 4>(x, target, mask, gx, g, ignore_index, red, links, stream);
      else if (g.C <= 64)
        launch_rows<P, 16, 4>(x, target, mask, gx, g, ignore_index, red, links, stream);
      else if (g.C <= 128)
        launch_rows<P, 32, 4>(x, target, mask, gx, g, ignore_index, red, links, stream);
      else if (g.C <= 256)
        launch_rows<P, 32, 8>(x, target, mask, gx, g, ignore_index, red, links, stream);
      else
        launch_rows<P, 32, 0>(x, target, mask, gx, g, ignore_index, red, links, stream);
    } else if (kernel == CeKernel::kPixelVec) {
      const int64_t s_blocks = ceil_div(g.S / kPixelVec, kThreads);
      ce_pixel_vec_kernel<P, 16, kPixelVec><<<grid_of(links), kThreads, 0, stream>>>(x, target, mask, gx, g,
                                                                                      ignore_index, s_blocks, red,
                                                                                      links);
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
    const int64_t size = task.grad == nullptr ? 0 : task.is_ce ? count_items(task) * task.geom.C : task.total;
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

// Each task's first slot in buf.psum / buf.pcount (task t owns loss_blocks(t) slots after those of tasks < t).
std::vector<int64_t> first_slots(const LossTask* tasks, int n) {
  std::vector<int64_t> first(n + 1, 0);
  for (int t = 0; t < n; ++t) first[t + 1] = first[t] + loss_blocks(tasks[t]);
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
  const std::vector<int> order = chain_order(tasks, num_tasks);
  if (order.empty()) return forward_unchained(tasks, num_tasks, buf, stream);
  for (int t = 0; t < num_tasks; ++t) {  // tasks without elements: loss 0, factor 0 (all-zero bytes)
    if (std::find(order.begin(), order.end(), t) != order.end()) continue;
    cudaError_t err = cudaMemsetAsync(tasks[t].loss, 0, sizeof(float), stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(buf.grad_scale + t, 0, sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }
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
      slots.num = first[prev + 1] - first[prev];
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
