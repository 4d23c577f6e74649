// The per-task CUDA kernels of the masked loss and their launchers: fastmtl::masked_loss (one task: a count launch,
// then a loss launch) and the chain of masked_loss_multitask_forward (mixed dtypes, more tasks than the grouped
// forward takes; its grouped forward is masked_loss_grouped.cu). See masked_loss.h for the launch design.
//
// Kernels (each block runs one tile of masked_loss_count.cuh, masked_loss_ce.cuh or masked_loss_elementwise.cuh):
//   count_tasks_kernel   partial valid counts (grid-stride, at most kMaxCountBlocks blocks per task) for up to
//                        kMaxCountTasks tasks in one launch, or one task
//   ce_pixel_kernel      ce_pixel_tile: NCHW logits, one pixel per thread
//   ce_pixel_vec_kernel  ce_pixel_vec_tile: NCHW with contiguous pixels and C <= 16, 4 pixels per thread
//   ce_rows_kernel       ce_rows_tile: contiguous classes ([N, C], channels_last)
//   elementwise_kernel   elementwise_tile: bce / l1 / mse, 16-byte vector loads and stores where aligned
// Every loss kernel starts with its chain links (ChainLinks: count blocks for the next task of the multi-task
// forward, the previous task's finalize), then sums the partial counts (up to kMaxCountBlocks / kThreads per thread),
// and ends with a block reduction writing its loss sum and valid count to its own slot; in the op's last launch each
// block then takes a ticket and the last one finalizes (LaunchEnd). No floating-point atomics: deterministic.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "masked_loss.h"
#include "masked_loss_ce.cuh"
#include "masked_loss_count.cuh"
#include "masked_loss_elementwise.cuh"
#include "masked_loss_grouped.h"
#include "masked_loss_plan.cuh"
#include "masked_loss_reduce.cuh"
#include "numeric.cuh"

namespace fastmtl {
namespace cuda {
namespace {

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
      with_rows_shape(rows_variant(g.C), [&](auto tpr, auto vpl) {
        launch_rows<P, decltype(tpr)::value, decltype(vpl)::value>(x, target, mask, gx, g, ignore_index, red, links,
                                                                   stream);
      });
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

}  // namespace cuda
}  // namespace fastmtl
