// The grouped forward of the masked loss (masked_loss_multitask_forward, when its tasks share a prediction dtype):
// every task's count, loss, gradient and the weighted total in one launch of grouped_forward_kernel, whose blocks (one
// wave) take count tiles, then loss tiles, from a counter. The design is at the top of masked_loss.h.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <vector>

#include "masked_loss.h"
#include "masked_loss_ce.cuh"
#include "masked_loss_count.cuh"
#include "masked_loss_elementwise.cuh"
#include "masked_loss_grouped.h"
#include "masked_loss_plan.cuh"
#include "masked_loss_prefetch.cuh"
#include "masked_loss_reduce.cuh"
#include "numeric.cuh"

namespace fastmtl {
namespace cuda {
namespace {

// One task of grouped_forward_kernel: its arguments, outputs and place in the schedule (tile ids [count_first,
// count_first + count_tiles) count its valid targets, [loss_first, loss_first + loss_tiles) compute its loss and
// gradient: the first big_tiles as blocks_per_tile blocks of the per-task kernel in turn, over blocks [0,
// split_block), then one block each over [split_block, blocks): tile_blocks).
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
  int64_t blocks, blocks_per_tile;  // the per-task kernel's blocks; loss tile k < big_tiles runs [k, k + 1) * per tile
  int64_t split_block, big_tiles;   // blocks from split_block on run one per tile (split_tail; else = blocks)
};

struct GroupTable {
  GroupTask task[kMaxGroupTasks];
  int num;        // tasks in the table (the op's tasks with elements), in schedule order
  int num_tasks;  // the op's tasks
  int64_t count_end, tile_end;
  const float* weights;
  float* total;
  int64_t* trace;  // or nullptr: MultitaskBuffers::group_trace
  int64_t trace_len;
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
  // Whole vectors in the loop, the loads of a thread's kGroupCountVecs vectors issued together (load_words_if: a
  // vector of unlabelled samples is zeros, not a load). A partial vector (the end of the targets) is read element by
  // element after the loop: with that path inside it, the copy between the two ways' registers right after each vector
  // load had every load wait for the one before (sm_90 SASS, 2026-11-28).
  int local = 0;
  for (int64_t base = begin + static_cast<int64_t>(threadIdx.x) * V; base < end;
       base += static_cast<int64_t>(kThreads) * V * kGroupCountVecs) {
    Words<T, V> pk[kGroupCountVecs];
    unsigned bits[kGroupCountVecs];
#pragma unroll
    for (int u = 0; u < kGroupCountVecs; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * kThreads * V;
      bits[u] = i + V > end ? 0u : whole ? labelled_bits<V>(nullptr, g, i, end) : labelled_bits<V>(mask, g, i, end);
      pk[u] = load_words_if<T, V>(target + i, bits[u] != 0);
    }
#pragma unroll
    for (int u = 0; u < kGroupCountVecs; ++u)
#pragma unroll
      for (int e = 0; e < V; ++e) local += (bits[u] >> e) & 1u && valid(loaded_value(pk[u], e)) ? 1 : 0;
  }
  const int64_t tail = end - end % V;  // a partial vector at [tail, end): only where end == total
  if (tail < end && tail >= begin && ((tail - begin) / V) % kThreads == threadIdx.x) {
    const unsigned bits = whole ? labelled_bits<V>(nullptr, g, tail, end) : labelled_bits<V>(mask, g, tail, end);
    for (int e = 0; e < end - tail; ++e) local += (bits >> e) & 1u && valid(target[tail + e]) ? 1 : 0;
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

// The GPU's global timer in ns (one clock for every SM) and the SM this thread runs on, for the trace.
__device__ __forceinline__ int64_t global_time_ns() {
#if defined(__CUDA_ARCH__)
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return static_cast<int64_t>(t);
#else
  return static_cast<int64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::steady_clock::now().time_since_epoch())
                                  .count());
#endif
}

__device__ __forceinline__ int sm_id() {
#if defined(__CUDA_ARCH__)
  unsigned id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return static_cast<int>(id);
#else
  return 0;
#endif
}

// The trace record of `tile` (thread 0; nothing without a trace or past its length).
__device__ __forceinline__ int64_t* trace_record(const GroupTable& table, int64_t tile) {
  if (table.trace == nullptr || tile >= table.trace_len) return nullptr;
  return table.trace + tile * kGroupTraceFields;
}

// Count tile `local` of a grouped task (schedule tile `tile`): its valid targets go into the task's count word with one
// more tile done. Traced, its end is taken before that release, so that no loss tile's count wait seems to end first.
template <typename P>
__device__ __forceinline__ void group_count_tile(const GroupTable& table, int64_t tile, const GroupTask& task,
                                                 int64_t local, unsigned long long* word) {
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
  if (threadIdx.x == 0) {
    if (table.trace != nullptr) {
      if (int64_t* record = trace_record(table, tile)) record[kTraceEnd] = global_time_ns();
    }
    atomicAdd(word, (1ULL << kDoneShift) + static_cast<unsigned long long>(sum));
  }
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
    case GroupVariant::kCeRows8x4:
    case GroupVariant::kCeRows16x4:
    case GroupVariant::kCeRows32x4:
    case GroupVariant::kCeRows32x8:
    case GroupVariant::kCeRows32x0:
      with_rows_shape(task.variant, [&](auto tpr, auto vpl) {
        ce_rows_tile<P, decltype(tpr)::value, decltype(vpl)::value>(x, t, task.mask, gx, g, ii, sb, block, gi, loss,
                                                                    valid);
      });
      break;
    case GroupVariant::kElementwise:
      if (task.target_f32)
        group_elementwise<P, float>(task, block, gi, loss, valid);
      else
        group_elementwise<P, P>(task, block, gi, loss, valid);
      break;
  }
}

// The reads of a loss tile's blocks [first, end), prefetched to L2 (the pixel and elementwise tiles; the others read as
// they go).
template <typename P>
__device__ __forceinline__ void prefetch_loss_tile(const GroupTask& task, int64_t first, int64_t end) {
  const P* pred = static_cast<const P*>(task.pred);
  if (task.variant == GroupVariant::kCePixelVec) {
    prefetch_ce_pixel_blocks<P, kGroupPixelVec>(pred, static_cast<const int64_t*>(task.target), task.mask, task.geom,
                                                task.s_blocks, first, end);
  } else if (task.variant == GroupVariant::kElementwise) {
    constexpr int V = 16 / sizeof(P);
    if (task.target_f32) {
      const float* t = static_cast<const float*>(task.target);
      if (task.vec)
        prefetch_elementwise_blocks<P, float, V>(pred, t, task.mask, task.total, task.M, first, end);
      else
        prefetch_elementwise_blocks<P, float, 1>(pred, t, task.mask, task.total, task.M, first, end);
    } else {
      const P* t = static_cast<const P*>(task.target);
      if (task.vec)
        prefetch_elementwise_blocks<P, P, V>(pred, t, task.mask, task.total, task.M, first, end);
      else
        prefetch_elementwise_blocks<P, P, 1>(pred, t, task.mask, task.total, task.M, first, end);
    }
  }
}

// The blocks [first, end) of the per-task kernel that loss tile `local` of a task runs.
__device__ __forceinline__ void tile_blocks(const GroupTask& task, int64_t local, int64_t& first, int64_t& end) {
  if (local < task.big_tiles) {
    first = local * task.blocks_per_tile;
    end = first + task.blocks_per_tile < task.split_block ? first + task.blocks_per_tile : task.split_block;
  } else {
    first = task.split_block + (local - task.big_tiles);
    end = first + 1;
  }
}

// Loss tile `local` of table task i: its count word (waited for once per block and task, then kept in `counted`),
// then its blocks of the per-task kernel with the gradient already divided by the count, and the tile's loss sum
// in its slot. No fence or atomic per tile: the kernel's last block finalizes every task. PREFETCH: the tile's reads
// are prefetched first, so that they arrive during the count wait and the first block's loads.
template <typename P, bool PREFETCH>
__device__ __forceinline__ void group_loss_tile(const GroupTable& table, int i, int64_t local, GroupState* state,
                                                unsigned long long* counted) {
  const GroupTask& task = table.task[i];
  if constexpr (PREFETCH) {
    int64_t first = 0, end = 0;
    tile_blocks(task, local, first, end);
    prefetch_loss_tile<P>(task, first, end);
  }
  if (threadIdx.x == 0 && counted[i] == 0) counted[i] = wait_counted(&state->count[i], task.count_tiles);
  if (threadIdx.x == 0 && table.trace != nullptr) {
    if (int64_t* record = trace_record(table, task.loss_first + local)) record[kTraceCounted] = global_time_ns();
  }
  __syncthreads();
  const long long count = static_cast<long long>(counted[i] & kCountMask);
  const float gi = task.stored > 0.0f ? task.stored : (count > 0 ? 1.0f / static_cast<float>(count) : 0.0f);
  float loss = 0.0f;
  int valid = 0;
  int64_t first = 0, end = 0;  // found again here, not kept over the wait: the registers are short
  tile_blocks(task, local, first, end);
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
// The launch's tail (every other block has finished): each lane loads kFinalizeUnroll slots at once, so that the
// NYUv2-like segmentation task's 864 slots take 2 rounds of L2 latency rather than 7.
constexpr int kFinalizeUnroll = 16;
__device__ __noinline__ void finalize_group_task(const float* slots, int64_t num, unsigned long long word,
                                                 float stored, float* loss_out, float* loss_copy, float* grad_scale) {
  const int lane = threadIdx.x & 31;
  double sum = 0.0;
  long long unused = 0;
  sum_slots_strided<32, kFinalizeUnroll>(slots, nullptr, num, lane, sum, unused);
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

// The table index of the task that schedule tile `tile` belongs to (its count tiles, then its loss tiles).
__device__ __forceinline__ int task_of_tile(const GroupTable& table, int64_t tile) {
  int i = 0;
  if (tile < table.count_end) {
    while (tile >= table.task[i].count_first + table.task[i].count_tiles) ++i;
  } else {
    while (tile >= table.task[i].loss_first + table.task[i].loss_tiles) ++i;
  }
  return i;
}

// Tile `tile` of the schedule: a count tile or a loss tile of one of the table's tasks.
template <typename P, bool PREFETCH>
__device__ __forceinline__ void group_tile(const GroupTable& table, int64_t tile, GroupState* state,
                                           unsigned long long* counted) {
  const int i = task_of_tile(table, tile);
  if (tile < table.count_end)
    group_count_tile<P>(table, tile, table.task[i], tile - table.task[i].count_first, &state->count[i]);
  else
    group_loss_tile<P, PREFETCH>(table, i, tile - table.task[i].loss_first, state, counted);
}

// The trace record of finished tile `tile` (thread 0): which task and kind, where and when (group_loss_tile wrote a
// loss tile's kTraceCounted, group_count_tile a count tile's kTraceEnd).
__device__ __forceinline__ void trace_tile(const GroupTable& table, int64_t tile, int64_t start) {
  int64_t* record = trace_record(table, tile);
  if (record == nullptr) return;
  const bool is_loss = tile >= table.count_end;
  if (is_loss)
    record[kTraceEnd] = global_time_ns();
  else
    record[kTraceCounted] = start;
  record[kTraceTile] = tile;
  record[kTraceStart] = start;
  record[kTraceSm] = sm_id();
  record[kTraceBlock] = blockIdx.x;
  record[kTraceTask] = table.task[task_of_tile(table, tile)].index;
  record[kTraceIsLoss] = is_loss ? 1 : 0;
}

// The trace record of the launch's finalize (thread 0 of the last block), in the row after the last tile's: task -1,
// kind 2.
__device__ __forceinline__ void trace_finalize(const GroupTable& table, int64_t start) {
  int64_t* record = trace_record(table, table.tile_end);
  if (record == nullptr) return;
  record[kTraceTile] = table.tile_end;
  record[kTraceStart] = start;
  record[kTraceCounted] = start;
  record[kTraceEnd] = global_time_ns();
  record[kTraceSm] = sm_id();
  record[kTraceBlock] = blockIdx.x;
  record[kTraceTask] = -1;
  record[kTraceIsLoss] = 2;
}

// Every task's count, loss, gradient and the total in one launch. Blocks take tile ids in order from a counter
// (the next one fetched while the current tile runs), so every count tile has been taken by a running block before
// any loss tile starts: a loss tile's wait for its task's count always ends, whatever the grid and residency. A
// block out of tiles takes a ticket; the block that takes the last one (every slot written) finalizes every task
// and writes the total.
// MIN_BLOCKS: the resident blocks per SM the kernel is built for (registers: 65536 / (256 * MIN_BLOCKS)). Memory-bound
// tiles need the warps, the widest tile function sets the registers of all. Side by side on an H100 (forward + backward
// of the NYUv2-like batch in a graph, benchmarks/results/2026-11-27-h100-5/): 2 blocks 0.0545 ms, 3 blocks 0.0525 ms
// (80 registers, no spills), 4 blocks 0.0573 ms (64 registers: spills; no longer built), hence the default
// (MultitaskBuffers::group_blocks). The pixel tiles take 2 pixels per thread to fit.
// PREFETCH (MultitaskBuffers::group_prefetch): each loss tile's reads prefetched to L2 first (masked_loss_prefetch.cuh),
// in builds of their own, so that the default build keeps its registers (sm_90: with the prefetch, the 3-block build
// spills the next tile id, whose store then waits for its atomic at each tile's start; the 2-block build spills
// nothing).
constexpr int kDefaultGroupBlocks = 3;
template <typename P, int MIN_BLOCKS, bool PREFETCH>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS)
    grouped_forward_kernel(GroupTable table, GroupState* state, float* losses) {
  __shared__ unsigned long long tile_id[1];
  __shared__ unsigned long long counted[kMaxGroupTasks];  // count words seen complete (0: not yet)
  __shared__ unsigned last[1];
  __shared__ int64_t trace_start[1];  // shared, not a register live across the tile: registers are the limit here
  if (threadIdx.x < kMaxGroupTasks) counted[threadIdx.x] = 0;
  if (threadIdx.x == 0) tile_id[0] = atomicAdd(&state->next_tile, 1ULL);
  __syncthreads();
  unsigned long long tile = tile_id[0];
  while (tile < static_cast<unsigned long long>(table.tile_end)) {
    __syncthreads();  // every thread has read tile_id
    unsigned long long next = 0;
    if (threadIdx.x == 0) next = atomicAdd(&state->next_tile, 1ULL);  // in flight while this tile runs
    if (table.trace != nullptr && threadIdx.x == 0) trace_start[0] = global_time_ns();
    group_tile<P, PREFETCH>(table, static_cast<int64_t>(tile), state, counted);
    if (threadIdx.x == 0) {
      tile_id[0] = next;
      if (table.trace != nullptr) trace_tile(table, static_cast<int64_t>(tile), trace_start[0]);
    }
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
  if (table.trace != nullptr && threadIdx.x == 0) trace_start[0] = global_time_ns();
  // This block works alone now (the launch's tail): warp w finalizes tasks w, w + 8, ... side by side.
  for (int i = threadIdx.x / 32; i < table.num; i += kThreads / 32) {
    const GroupTask& task = table.task[i];
    finalize_group_task(task.slots, task.loss_tiles, __ldcg(&state->count[i]), task.stored, task.loss,
                        losses + task.index, task.grad_scale);
  }
  __syncthreads();  // every loss copy written (bar.sync orders the block's global writes too)
  if (threadIdx.x == 0) write_total(table.total, losses, table.weights, table.num_tasks);
  if (threadIdx.x == 0 && table.trace != nullptr) trace_finalize(table, trace_start[0]);
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
  // A count_vec tile is a whole number of 16-byte vectors, so that the only partial one is at the end of the targets
  // (count_vec_tile counts it after its loop).
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
  gt.split_block = gt.blocks;
  gt.big_tiles = gt.loss_tiles;
  return gt;
}

// MultitaskBuffers::group_small_tail: the last `blocks` blocks of the schedule's loss work (from its last task back)
// run as tiles of one block each, so that when the tile counter runs out the blocks are left with short tiles, and
// finish closer together (a tile of the NYUv2-like batch's segmentation task is 2 blocks, 61 KB). A task keeps at most
// one tile per slot of its own.
void split_tail(GroupTable& table, const LossTask* tasks, const std::vector<int>& order, int64_t blocks) {
  for (int i = table.num - 1; i >= 0 && blocks > 0; --i) {
    GroupTask& gt = table.task[i];
    int64_t k = std::min(blocks, gt.blocks);
    blocks -= k;
    if (gt.blocks_per_tile == 1) continue;  // its tiles are single blocks already
    const int64_t slots = task_slots(tasks[order[i]]);
    while (k > 0 && ceil_div(gt.blocks - k, gt.blocks_per_tile) + k > slots) --k;
    gt.split_block = gt.blocks - k;
    gt.big_tiles = ceil_div(gt.split_block, gt.blocks_per_tile);
    gt.loss_tiles = gt.big_tiles + k;
  }
}

// One build of the grouped forward, <P, MIN_BLOCKS, PREFETCH>, as a type to pass to a generic lambda.
template <typename P, int MIN_BLOCKS, bool PREFETCH>
struct GroupBuild {
  static constexpr auto kernel = grouped_forward_kernel<P, MIN_BLOCKS, PREFETCH>;
};

// Calls f(GroupBuild<...>{}) for the build that the pred dtype and the knobs (2 or 3 blocks per SM, prefetch or not)
// pick: the one place that maps the knobs to a build.
template <typename F>
cudaError_t with_group_build(DType dtype, int min_blocks, bool prefetch, F&& f) {
  return dispatch_dtype(dtype, [&](auto zero) {
    using P = decltype(zero);
    if (min_blocks == 2) return prefetch ? f(GroupBuild<P, 2, true>{}) : f(GroupBuild<P, 2, false>{});
    return prefetch ? f(GroupBuild<P, 3, true>{}) : f(GroupBuild<P, 3, false>{});
  });
}

// Blocks of the grouped launch: what the device keeps resident (one wave; the blocks loop over the tiles), at most
// one per tile.
template <typename Build>
unsigned group_grid(int64_t tiles) {
  static std::atomic<int> per_sm_cache{0}, sms_cache{0};  // one device kind per process is the norm; else re-queried
  int device = 0, sms = 0, per_sm = per_sm_cache.load(std::memory_order_relaxed);
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    sms = 132;
  }
  if (per_sm <= 0 || sms != sms_cache.load(std::memory_order_relaxed)) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Build::kernel, kThreads, 0) != cudaSuccess ||
        per_sm <= 0) {
      cudaGetLastError();
      per_sm = 2;
    }
    per_sm_cache.store(per_sm, std::memory_order_relaxed);
    sms_cache.store(sms, std::memory_order_relaxed);
  }
  return static_cast<unsigned>(std::min<int64_t>(tiles, static_cast<int64_t>(sms) * per_sm));
}

// The blocks the build of the grouped forward that the knobs pick keeps resident: its grid for a long schedule.
unsigned group_capacity(DType dtype, int min_blocks, bool prefetch) {
  constexpr int64_t kMany = int64_t{1} << 40;
  unsigned blocks = 0;
  with_group_build(dtype, min_blocks, prefetch, [&](auto build) {
    blocks = group_grid<decltype(build)>(kMany);
    return cudaSuccess;
  });
  return blocks;
}

}  // namespace

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
  table.trace = buf.group_trace_len > 0 ? buf.group_trace : nullptr;
  table.trace_len = buf.group_trace_len;
  int64_t next = 0;
  for (int i = 0; i < table.num; ++i) {
    table.task[i] = group_task(tasks[order[i]], order[i], buf, buf.psum + first[order[i]]);
    table.task[i].count_first = next;
    next += table.task[i].count_tiles;
  }
  table.count_end = next;
  const int min_blocks = buf.group_blocks == 0 ? kDefaultGroupBlocks : buf.group_blocks;
  if (min_blocks < 2 || min_blocks > 3) return cudaErrorInvalidValue;
  if (buf.group_small_tail)
    split_tail(table, tasks, order, group_capacity(tasks[order[0]].dtype, min_blocks, buf.group_prefetch));
  for (int i = 0; i < table.num; ++i) {
    table.task[i].loss_first = next;
    next += table.task[i].loss_tiles;
  }
  table.tile_end = next;
  err = with_group_build(tasks[order[0]].dtype, min_blocks, buf.group_prefetch, [&](auto build) {
    using Build = decltype(build);
    Build::kernel<<<group_grid<Build>(table.tile_end), kThreads, 0, stream>>>(table, state, losses);
    return cudaSuccess;
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastmtl
