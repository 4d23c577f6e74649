// CUDA kernels of the masked loss: one task (fastmtl::masked_loss), all tasks (fastmtl::masked_multitask_loss_forward)
// and the grouped gradient scaling (fastmtl::masked_loss_scale_grads, masked_multitask_loss_backward). Raw pointers
// only: csrc/cuda/masked_loss_aten.cpp prepares the tensors.
//
// On the caller's stream, with no host synchronisation, and deterministic: no floating-point atomics. Every loss block
// writes its loss sum and valid count to its own slot; a task's loss is the sum of its slots in a fixed order, taken
// by one block (a finalize), so no result depends on the order blocks run or finish in.
//
// One task (fastmtl::masked_loss), two launches:
//   1. masked_loss_count_*: at most kMaxCountBlocks blocks write their partial valid counts (no buffer needs zeroing);
//      block 0 zeroes the ticket counter.
//   2. masked_loss_ce / masked_loss_elementwise: every block sums the partial counts, computes the element losses and
//      the gradient already scaled by 1/count in one sweep and writes its slot, then takes a ticket (LaunchEnd); the
//      block that takes the last one finalizes the loss. No valid element: count 0, loss 0.0, an all-zero gradient.
//
// T tasks (fastmtl::masked_multitask_loss_forward, masked_loss_multitask_forward below). When the tasks with elements
// share one prediction dtype and there are at most kMaxGroupTasks of them: one memset of a small state, then one
// launch (the grouped forward). Its blocks (one wave) take tile ids in order from a counter in that state: first the
// count tiles of every task (16 KB of targets each, unlabelled samples' targets not read), which add their valid
// counts to the task's count word, then the loss tiles (a few of the per-task kernels' blocks each, about 48 KB),
// largest task first. A loss tile waits for its task's count (once per block and task; every count tile was taken by
// a running block before it, so the wait ends), computes the element losses and the gradient already divided by the
// count in one sweep and writes its slot. A block out of tiles takes a ticket; the last one finalizes every task and
// writes the weighted total, sum_t weights[t] * L_t. Every gradient is then final up to the upstream gradient
// (float16: up to a factor, see LossReduction), so the backward (masked_loss_scale_grads_by) skips every task whose
// scale is exactly 1 in place.
//
// Otherwise (mixed dtypes, more tasks), T launches when at least two tasks have elements (a chain; T >= 2):
//   1. the lead task (the one with the fewest gradient elements) in partials mode: its gradient undivided; extra
//      blocks count the next task's valid elements, and the first of them zeroes the ticket and the loss copies.
//   2. each other task in turn, normalised as above (its gradient already divided by the count the previous launch
//      wrote), its extra blocks counting the task after it; block 0 finalizes the previous launch's task (the lead:
//      also its gradient factor, grad_scale); the last launch's last block finalizes its own task and writes the
//      weighted total, sum_t weights[t] * L_t, over every task.
// The gradients are final up to the upstream gradient except the lead's (a factor), so the backward moves only the
// lead's (smallest) gradient when the scale is 1. Float16 predictions keep undivided gradients and a factor
// (LossReduction). Fewer than two tasks with elements: one count launch, then the loss kernel of the task with
// elements (if any), which finishes the op.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastmtl {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class ElementwiseKind : int { kBCE = 0, kL1 = 1, kMSE = 2 };

// Count blocks per task: one per kCountElemsPerBlock targets, at most kMaxCountBlocks (4 partial counts per thread of
// the loss kernels, which sum them). A count block is latency-bound (4 loads in flight per thread; more cost the loss
// kernels registers, as the count blocks run inside them), so the targets are spread over many blocks: one chunk of
// 4 x 256 targets each up to a million targets. The H100 profile of 2026-11-27, with 256 blocks of 2048 targets at
// least, had a launch that counted 7 MB of int64 targets take 9.8 us (0.7 TB/s).
constexpr int kMaxCountBlocks = 1024;
constexpr int kCountElemsPerBlock = 4 * 256;
constexpr int kMaxScaleTasks = 32;  // tasks per masked_loss_scale_grads launch (the table is a kernel argument)
constexpr int kMaxGroupTasks = 8;   // tasks with elements in one grouped forward launch (the table is an argument)

// A loss launch's own task: the gradient is divided by the valid count (the sum of the num_counts partial counts of the
// count pass), or, with counts == nullptr (partials mode), stored undivided (mse: halved) for a factor the finalize
// computes. With grad_scale != nullptr (float16 predictions, whose range cannot hold gradient / count for large
// counts) a normalised gradient is stored undivided too and block 0 writes the remaining factor (1 / count, mse
// 2 / count) to *grad_scale. Loss block b writes its loss sum to psum[b] and its valid count to pcount[b].
struct LossReduction {
  const int32_t* counts = nullptr;
  int num_counts = 0;
  float* grad_scale = nullptr;
  float* psum = nullptr;
  int32_t* pcount = nullptr;
};

// The end of an op's last launch (ticket != nullptr; its grid is its loss blocks alone): after writing its slot each
// block takes a ticket, and the block that takes the last one turns the launch's slots into the task's loss (sum /
// count, 0 without a valid element), written to *loss and to *loss_copy when given, then, when total != nullptr,
// writes *total = sum over t < num_tasks of weights[t] * losses[t] (weights == nullptr: 1 each; a task without a
// valid element adds weights[t] * 0, NaN for a NaN or infinite weight, as on the other backends). The ticket counter
// must be 0 when the launch starts (the count launches zero it).
struct LaunchEnd {
  unsigned* ticket = nullptr;
  float* loss = nullptr;
  float* loss_copy = nullptr;
  float* total = nullptr;
  const float* losses = nullptr;
  const float* weights = nullptr;
  int num_tasks = 0;
};

// Number of count blocks (= partial counts) for `total` targets.
inline int masked_loss_count_blocks(int64_t total) {
  int64_t blocks = (total + kCountElemsPerBlock - 1) / kCountElemsPerBlock;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxCountBlocks ? kMaxCountBlocks : blocks));
}

// Cross-entropy logits viewed as [N, C, S] (S = product of spatial dims; an [N, C] input as [1, C, N]) with the
// element strides of pred, grad, target ([N, S]) and mask (index n * m_sn + s * m_ss).
struct CeGeometry {
  int64_t N, C, S;
  int64_t p_sn, p_sc, p_ss;
  int64_t g_sn, g_sc, g_ss;
  int64_t t_sn, t_ss;
  int64_t m_sn, m_ss;
};

// Partial counts of valid class targets (t != ignore_index and 0 <= t < C, and mask) into counts[0, num_blocks);
// block 0 zeroes *loss (what a task without elements keeps: its loss launch has no blocks) and *ticket.
cudaError_t masked_loss_count_ce(const int64_t* target, const bool* mask, const CeGeometry& geom, int64_t ignore_index,
                                 int32_t* counts, int num_blocks, float* loss, unsigned* ticket, cudaStream_t stream);

// Partial counts of non-NaN float targets (contiguous storage order, sample n owns [n*M, (n+1)*M)).
cudaError_t masked_loss_count_float(const void* target, DType target_dtype, const bool* mask, int64_t total,
                                    int64_t M, int32_t* counts, int num_blocks, float* loss, unsigned* ticket,
                                    cudaStream_t stream);

// Cross entropy: the slots and gradient as `red` says (pred's dtype, geom's grad strides; grad == nullptr: no
// gradient), finished by `end`. Both launchers return cudaErrorInvalidConfiguration when their grid would not fit
// 32 bits; masked_loss_slots gives the slots (= loss blocks) they write.
cudaError_t masked_loss_ce(const void* pred, DType dtype, const int64_t* target, const bool* mask, void* grad,
                           const CeGeometry& geom, int64_t ignore_index, const LossReduction& red, const LaunchEnd& end,
                           cudaStream_t stream);

// bce / l1 / mse over flat storage: pred and target share one dense layout; grad != nullptr gets the gradient.
cudaError_t masked_loss_elementwise(ElementwiseKind kind, const void* pred, DType dtype, const void* target,
                                    DType target_dtype, const bool* mask, void* grad, int64_t total, int64_t M,
                                    const LossReduction& red, const LaunchEnd& end, cudaStream_t stream);

// One task of masked_loss_multitask_forward.
struct LossTask {
  bool is_ce = false;
  ElementwiseKind kind = ElementwiseKind::kL1;  // bce / l1 / mse
  const void* pred = nullptr;
  DType dtype = DType::kFloat32;
  const void* target = nullptr;  // ce: int64 (geom's target strides); else target_dtype, in pred's dense layout
  DType target_dtype = DType::kFloat32;
  const bool* mask = nullptr;  // or nullptr
  void* grad = nullptr;        // nullptr: no gradient
  CeGeometry geom{};           // ce
  int64_t ignore_index = -100;  // ce
  int64_t total = 0, M = 0;    // bce / l1 / mse: elements, elements per sample
  float* loss = nullptr;       // output
};

// The slots (loss blocks) of one task's loss launch: 0 for a task without elements.
int64_t masked_loss_slots(const LossTask& task);

// Device buffers of masked_loss_multitask_forward (float32 / int32, on the tasks' device).
struct MultitaskBuffers {
  float* total = nullptr;          // 0-dim output: sum_t weights[t] * L_t
  const float* weights = nullptr;  // [T], or nullptr (every weight 1)
  float* grad_scale = nullptr;     // [T] output: grads[t] * grad_scale[t] = d L_t / d pred_t
  int32_t* counts = nullptr;       // [T * kMaxCountBlocks] workspace (grouped: its state, 8-byte aligned)
  float* psum = nullptr;           // [masked_loss_multitask_slots(...)] workspace (or nullptr when that is 0)
  int32_t* pcount = nullptr;       // same length
  float* losses = nullptr;         // [T] workspace: a copy of every task's loss, for the total
  unsigned* ticket = nullptr;      // [1] workspace
  bool grouped = true;             // false: never the grouped launch (tests of the chain)
  int group_blocks = 0;            // resident blocks per SM the grouped kernel is built for: 2 or 3; 0: 3
  int64_t group_tile_bytes = 0;    // bytes a loss tile of the grouped forward moves at least; 0: 48 KB
  bool group_prefetch = false;     // experiments: each grouped loss tile's reads prefetched to L2 first
  bool group_small_tail = false;   // experiments: the grouped schedule's last wave of loss tiles one block each
  int64_t* group_trace = nullptr;  // experiments: [group_trace_len, kGroupTraceFields] tile records (GroupTraceField)
  int64_t group_trace_len = 0;     // of the grouped forward, by tile id; later tiles are not recorded
};

// A tile record of the grouped forward's trace (MultitaskBuffers::group_trace, written by the block that ran the tile):
// times are the GPU's global timer (ns), comparable across SMs. A count tile's kCounted is its start; a loss tile's is
// when its block saw its task's count complete (the wait for the count tiles ends there). The row after the last
// tile's records the launch's finalize (task -1, kind 2), by the block that finished last.
enum GroupTraceField : int {
  kTraceTile = 0,   // the tile id (the record's row)
  kTraceStart,      // ns
  kTraceCounted,    // ns
  kTraceEnd,        // ns: the tile's slot or count written
  kTraceSm,         // the SM that ran it
  kTraceBlock,      // its block
  kTraceTask,       // the op's task index
  kTraceIsLoss,     // 1: a loss tile, 0: a count tile, 2: the finalize
  kGroupTraceFields
};

// The number of slots (psum / pcount) masked_loss_multitask_forward needs for these tasks: every task's loss blocks.
int64_t masked_loss_multitask_slots(const LossTask* tasks, int num_tasks);

// Every task's loss, gradient (up to grad_scale) and the weighted total, on `stream` without host synchronisation:
// the grouped launch, or the chain (see the top of this file). A task without elements gets loss 0 and factor 0.
cudaError_t masked_loss_multitask_forward(const LossTask* tasks, int num_tasks, const MultitaskBuffers& buffers,
                                          cudaStream_t stream);

struct ScaleTask {
  const void* in;
  void* out;
  int64_t numel;
  DType dtype;
  const float* g_task = nullptr;  // masked_loss_scale_grads_by: the upstream gradient of this task's loss, or none
};

// What the device runs at once (cudaDeviceProp's multiProcessorCount and maxThreadsPerMultiProcessor): the scaling
// kernel's grid is capped at the blocks it keeps resident, each block striding over the chunks.
struct DeviceCapacity {
  int sms = 0;
  int threads_per_sm = 0;
};

// out[t] = in[t] * scales[t] for num_tasks <= kMaxScaleTasks dense tensors, in one launch.
cudaError_t masked_loss_scale_grads(const ScaleTask* tasks, int num_tasks, const float* scales,
                                    const DeviceCapacity& device, cudaStream_t stream);

// The backward of masked_multitask_loss_forward: scale_t = (g_total * weights[t] + tasks[t].g_task) * factor[t],
// computed in the kernel (absent g_total / g_task count as 0, absent weights and factor as 1); all float32 device
// pointers.
struct ScaleFactors {
  const float* g_total = nullptr;  // 0-dim
  const float* weights = nullptr;  // [num_tasks]
  const float* factor = nullptr;   // [num_tasks] (grad_scale)
};

// out[t] = in[t] * scale_t for num_tasks <= kMaxScaleTasks dense tensors, in one launch. A task whose scale is
// exactly 1 in place is skipped whole: no memory traffic.
cudaError_t masked_loss_scale_grads_by(const ScaleTask* tasks, int num_tasks, const ScaleFactors& factors,
                                       const DeviceCapacity& device, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmtl
