// CUDA kernels of the masked loss of one task (fastmtl::masked_loss) and of the grouped gradient scaling
// (fastmtl::masked_loss_scale_grads). Raw pointers only: csrc/cuda/masked_loss_aten.cpp prepares the tensors.
//
// Two ways to run the loss kernels (LossReduction), on the caller's stream, with no host synchronisation:
//
// Normalised (fastmtl::masked_loss, one task, two launches):
//   1. masked_loss_count_*: at most kMaxCountBlocks blocks write their partial valid counts (no buffer needs zeroing);
//      block 0 zeroes the float32 loss accumulator.
//   2. masked_loss_ce / masked_loss_elementwise: every block sums the partial counts, computes the element losses and
//      the gradient already scaled by 1/count in one sweep, and adds its loss partial times 1/count to the
//      accumulator with one atomicAdd. No valid element: count 0, loss stays 0.0, the gradient is all zeros.
//
// Partials (fastmtl::masked_multitask_loss_forward, T tasks, T + 1 launches, each target read once):
//   1. per task, masked_loss_ce / masked_loss_elementwise write the element gradient (not divided by the count; for
//      mse halved, p - t, so that float16 cannot overflow) and
//      one (loss sum, valid count) partial per block (masked_loss_*_blocks says how many);
//   2. masked_loss_finalize (one launch for up to kMaxFinalizeTasks tasks) turns the partials into each task's loss,
//      its gradient factor 1/count (0 without a valid element) and the weighted total. The backward multiplies the
//      saved gradients by that factor together with the upstream gradient.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastmtl {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class ElementwiseKind : int { kBCE = 0, kL1 = 1, kMSE = 2 };

constexpr int kMaxCountBlocks = 256;  // = the block size of the loss kernels, which reduce the partial counts
constexpr int kCountElemsPerBlock = 256 * 8;
constexpr int kMaxScaleTasks = 32;  // tasks per masked_loss_scale_grads launch (the table is a kernel argument)
constexpr int kMaxFinalizeTasks = 32;  // tasks per masked_loss_finalize launch (likewise)

// Where a loss kernel's result goes. Normalised mode (counts != nullptr): the gradient is divided by the valid count
// (the sum of the num_counts partial counts of the count kernel) and each block adds loss partial / count to *loss.
// Partials mode (partial_sums != nullptr): the gradient is the element gradient, and block b writes its loss sum and
// valid count to partial_sums[b] and partial_counts[b].
struct LossReduction {
  const int32_t* counts = nullptr;
  int num_counts = 0;
  float* loss = nullptr;
  float* partial_sums = nullptr;
  int32_t* partial_counts = nullptr;
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

// Partial counts of valid class targets (t != ignore_index and 0 <= t < C, and mask) into counts[0, num_blocks).
cudaError_t masked_loss_count_ce(const int64_t* target, const bool* mask, const CeGeometry& geom, int64_t ignore_index,
                                 int32_t* counts, int num_blocks, float* loss, cudaStream_t stream);

// Partial counts of non-NaN float targets (contiguous storage order, sample n owns [n*M, (n+1)*M)).
cudaError_t masked_loss_count_float(const void* target, DType target_dtype, const bool* mask, int64_t total,
                                    int64_t M, int32_t* counts, int num_blocks, float* loss, cudaStream_t stream);

// Cross entropy: the loss as `red` says, the gradient (pred's dtype, geom's grad strides) when grad != nullptr.
cudaError_t masked_loss_ce(const void* pred, DType dtype, const int64_t* target, const bool* mask, void* grad,
                           const CeGeometry& geom, int64_t ignore_index, const LossReduction& red,
                           cudaStream_t stream);

// bce / l1 / mse over flat storage: pred and target share one dense layout; grad != nullptr gets the gradient.
cudaError_t masked_loss_elementwise(ElementwiseKind kind, const void* pred, DType dtype, const void* target,
                                    DType target_dtype, const bool* mask, void* grad, int64_t total, int64_t M,
                                    const LossReduction& red, cudaStream_t stream);

// The number of blocks (= partials) the two launchers above use for these arguments.
int64_t masked_loss_ce_blocks(const void* pred, DType dtype, const void* grad, const CeGeometry& geom);
int64_t masked_loss_elementwise_blocks(const void* pred, DType dtype, const void* target, DType target_dtype,
                                       const void* grad, int64_t total);

struct FinalizeTask {
  int64_t first_partial;  // the task's partials are [first_partial, first_partial + num_partials)
  int64_t num_partials;
  float* loss;  // 0-dim float32 output
  float grad_multiplier = 1.0f;  // 2 for mse, whose partials-mode gradient is stored halved
};

// One launch for num_tasks <= kMaxFinalizeTasks tasks: *tasks[t].loss = L_t, grad_scale[t] = grad_multiplier / count_t
// (0 when the count is 0), *total (+)= sum_t weights[t] * L_t (weights == nullptr: all 1; accumulate_total adds to *total).
cudaError_t masked_loss_finalize(const FinalizeTask* tasks, int num_tasks, const float* partial_sums,
                                 const int32_t* partial_counts, const float* weights, float* grad_scale, float* total,
                                 bool accumulate_total, cudaStream_t stream);

struct ScaleTask {
  const void* in;
  void* out;
  int64_t numel;
  DType dtype;
  const float* g_task = nullptr;  // masked_loss_scale_grads_by: the upstream gradient of this task's loss, or none
};

// out[t] = in[t] * scales[t] for num_tasks <= kMaxScaleTasks dense tensors, in one launch.
cudaError_t masked_loss_scale_grads(const ScaleTask* tasks, int num_tasks, const float* scales, cudaStream_t stream);

// The backward of masked_multitask_loss_forward: scale_t = (g_total * weights[t] + tasks[t].g_task) * factor[t],
// computed in the kernel (absent g_total / g_task count as 0, absent weights as 1); all float32 device pointers.
struct ScaleFactors {
  const float* g_total = nullptr;  // 0-dim
  const float* weights = nullptr;  // [num_tasks]
  const float* factor = nullptr;   // [num_tasks], required (grad_scale)
};

// out[t] = in[t] * scale_t for num_tasks <= kMaxScaleTasks dense tensors, in one launch.
cudaError_t masked_loss_scale_grads_by(const ScaleTask* tasks, int num_tasks, const ScaleFactors& factors,
                                       cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmtl
