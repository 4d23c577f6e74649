// How the masked-loss launchers choose and size their kernels (host code shared by the per-task launchers of
// csrc/cuda/masked_loss.cu and the grouped forward of masked_loss_grouped.cu): the cross-entropy kernel for a layout,
// vector widths, loss blocks and slots per task.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "masked_loss.h"
#include "masked_loss_ce.cuh"
#include "masked_loss_elementwise.cuh"
#include "masked_loss_reduce.cuh"
#include "numeric.cuh"

namespace fastmtl {
namespace cuda {

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

inline int rows_threads_per_row(int64_t C) { return C <= 16 ? 4 : (C <= 32 ? 8 : (C <= 64 ? 16 : 32)); }

// The rows tile function for C classes: rows_threads_per_row(C) threads per row, 4 or 8 logits cached per lane (none
// past 256 classes). Both the per-task launcher and the grouped forward pick by it.
inline GroupVariant rows_variant(int64_t C) {
  return C <= 16    ? GroupVariant::kCeRows4x4
         : C <= 32  ? GroupVariant::kCeRows8x4
         : C <= 64  ? GroupVariant::kCeRows16x4
         : C <= 128 ? GroupVariant::kCeRows32x4
         : C <= 256 ? GroupVariant::kCeRows32x8
                    : GroupVariant::kCeRows32x0;
}

// f(threads per row, logits cached per lane), both as std::integral_constant, for a rows variant (nothing for the
// others): the one switch from a variant to the template arguments of ce_rows_tile, for the per-task launcher (host)
// and the grouped forward (device), hence the check disabled.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename F>
__host__ __device__ __forceinline__ void with_rows_shape(GroupVariant variant, F&& f) {
  using std::integral_constant;
  switch (variant) {
    case GroupVariant::kCeRows4x4:
      f(integral_constant<int, 4>{}, integral_constant<int, 4>{});
      break;
    case GroupVariant::kCeRows8x4:
      f(integral_constant<int, 8>{}, integral_constant<int, 4>{});
      break;
    case GroupVariant::kCeRows16x4:
      f(integral_constant<int, 16>{}, integral_constant<int, 4>{});
      break;
    case GroupVariant::kCeRows32x4:
      f(integral_constant<int, 32>{}, integral_constant<int, 4>{});
      break;
    case GroupVariant::kCeRows32x8:
      f(integral_constant<int, 32>{}, integral_constant<int, 8>{});
      break;
    case GroupVariant::kCeRows32x0:
      f(integral_constant<int, 32>{}, integral_constant<int, 0>{});
      break;
    default:
      break;
  }
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

// The loss blocks of a cross-entropy launch (the blocks launch_ce's kernel needs for its own task).
inline int64_t ce_loss_blocks(const void* pred, DType dtype, const void* grad, const CeGeometry& g) {
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
inline int64_t elementwise_loss_blocks(const void* pred, DType dtype, const void* target, DType target_dtype,
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

inline int64_t count_items(const LossTask& task) { return task.is_ce ? task.geom.N * task.geom.S : task.total; }

// Elements of the task's prediction (and of its gradient).
inline int64_t pred_elements(const LossTask& task) { return task.is_ce ? count_items(task) * task.geom.C : task.total; }

// Tasks without elements get loss 0 and factor 0 (all-zero bytes); their kernels would have no blocks.
inline cudaError_t zero_tasks_without_elements(const LossTask* tasks, int n, const MultitaskBuffers& buf,
                                               cudaStream_t stream) {
  for (int t = 0; t < n; ++t) {
    if (count_items(tasks[t]) > 0) continue;
    cudaError_t err = cudaMemsetAsync(tasks[t].loss, 0, sizeof(float), stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(buf.grad_scale + t, 0, sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

inline int64_t loss_blocks(const LossTask& task) {
  return task.is_ce ? ce_loss_blocks(task.pred, task.dtype, task.grad, task.geom)
                    : elementwise_loss_blocks(task.pred, task.dtype, task.target, task.target_dtype, task.grad,
                                              task.total);
}

// A task's slots in buf.psum / buf.pcount: one per block of its loss kernel (the chain), and at least one per block of
// the grouped forward's pixel tiles (2 pixels per thread rather than the kernel's 4), so that a grouped loss tile can
// be a single block.
inline int64_t task_slots(const LossTask& task) {
  const int64_t blocks = loss_blocks(task);
  return task.is_ce ? std::max(blocks, task.geom.N * ceil_div(task.geom.S, kGroupPixelVec * kThreads)) : blocks;
}

// Each task's first slot in buf.psum / buf.pcount (task t owns task_slots(t) slots after those of tasks < t).
inline std::vector<int64_t> first_slots(const LossTask* tasks, int n) {
  std::vector<int64_t> first(n + 1, 0);
  for (int t = 0; t < n; ++t) first[t + 1] = first[t] + task_slots(tasks[t]);
  return first;
}

inline size_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

}  // namespace cuda
}  // namespace fastmtl
