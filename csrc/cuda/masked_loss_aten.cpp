// CUDA implementations of fastmtl::masked_loss and fastmtl::masked_loss_scale_grads (schemas in csrc/ops.cpp):
// tensor preparation (layouts, workspaces) around the raw-pointer launchers of masked_loss.cu. Arguments are
// validated in Python (fastmtl/ops/masked_loss.py); the checks here only guard against calls that would make a
// kernel read out of bounds. Nothing here synchronises with the host.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "masked_loss.h"

namespace fastmtl {
namespace {

using cuda::CeGeometry;
using cuda::DType;

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "masked_loss (CUDA): ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "masked_loss (CUDA): ", what, " failed: ", cudaGetErrorString(err));
}

// The single stride of dims [from, dim) when they form one arithmetic progression in memory (size-1 dims ignored),
// or -1.
int64_t collapsed_stride(const at::Tensor& t, int64_t from) {
  int64_t stride = 1, expected = -1;
  bool first = true;
  for (int64_t d = t.dim() - 1; d >= from; --d) {
    if (t.size(d) == 1) continue;
    if (first) {
      stride = t.stride(d);
      first = false;
    } else if (t.stride(d) != expected) {
      return -1;
    }
    expected = t.stride(d) * t.size(d);
  }
  return stride;
}

bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// Dense with dim 0 outermost: sample n owns the storage range [n * M, (n + 1) * M).
bool flat_by_sample(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  const int64_t n = t.size(0);
  return n <= 1 || t.stride(0) == t.numel() / n;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy(at::Tensor pred, at::Tensor target,
                                                 const c10::optional<at::Tensor>& mask, int64_t ignore_index,
                                                 bool compute_grad, cudaStream_t stream) {
  TORCH_CHECK(pred.dim() >= 2, "masked_loss (CUDA): ce pred must be [N, C, *], got ", pred.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "masked_loss (CUDA): ce target must be int64");
  TORCH_CHECK(target.dim() == pred.dim() - 1 && target.size(0) == pred.size(0),
              "masked_loss (CUDA): ce target must be [N, *spatial] matching pred");
  // grad always has pred's own layout (empty_like, as the fake implementation says); the kernel writes it directly
  // unless its spatial dims do not collapse to one stride (rare), then a temporary is copied into it.
  at::Tensor loss = at::empty({}, pred.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty_like(pred) : pred.new_empty({0});
  if (collapsed_stride(pred, 2) < 0) pred = pred.contiguous();
  if (collapsed_stride(target, 1) < 0) target = target.contiguous();
  at::Tensor work_grad = grad;
  if (compute_grad && collapsed_stride(grad, 2) < 0) work_grad = at::empty_like(pred);
  const at::Tensor& g_src = compute_grad ? work_grad : pred;

  CeGeometry g{};
  g.N = pred.size(0);
  g.C = pred.size(1);
  g.S = 1;
  for (int64_t d = 2; d < pred.dim(); ++d) g.S *= pred.size(d);
  g.p_sn = pred.stride(0);
  g.p_sc = pred.stride(1);
  g.p_ss = collapsed_stride(pred, 2);
  g.g_sn = g_src.stride(0);
  g.g_sc = g_src.stride(1);
  g.g_ss = collapsed_stride(g_src, 2);
  g.t_sn = target.stride(0);
  g.t_ss = collapsed_stride(target, 1);
  g.m_sn = mask.has_value() ? mask->stride(0) : 0;
  g.m_ss = 0;
  if (pred.dim() == 2) {  // [N, C] as [1, C, N]: the rows become the pixels of one sample
    g.S = g.N;
    g.N = 1;
    g.p_ss = g.p_sn;
    g.g_ss = g.g_sn;
    g.t_ss = g.t_sn;
    g.m_ss = g.m_sn;
    g.p_sn = g.S * g.p_ss;
    g.g_sn = g.S * g.g_ss;
    g.t_sn = g.S * g.t_ss;
    g.m_sn = g.S * g.m_ss;
  }
  const bool* mask_ptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  const int num_counts = cuda::masked_loss_count_blocks(g.N * g.S);
  at::Tensor counts = at::empty({num_counts}, pred.options().dtype(at::kInt));
  check_cuda(cuda::masked_loss_count_ce(target.data_ptr<int64_t>(), mask_ptr, g, ignore_index,
                                        counts.data_ptr<int32_t>(), num_counts, loss.data_ptr<float>(), stream),
             "count kernel");
  check_cuda(cuda::masked_loss_ce(pred.data_ptr(), dtype_of(pred, "pred"), target.data_ptr<int64_t>(), mask_ptr,
                                  compute_grad ? work_grad.data_ptr() : nullptr, g, ignore_index,
                                  counts.data_ptr<int32_t>(), num_counts, loss.data_ptr<float>(), stream),
             "cross-entropy kernel");
  if (compute_grad && !work_grad.is_same(grad)) grad.copy_(work_grad);
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> elementwise(at::Tensor pred, at::Tensor target,
                                               const c10::optional<at::Tensor>& mask, cuda::ElementwiseKind kind,
                                               bool compute_grad, cudaStream_t stream) {
  TORCH_CHECK(pred.dim() >= 1 && target.sizes() == pred.sizes(),
              "masked_loss (CUDA): target must have pred's shape ", pred.sizes(), ", got ", target.sizes());
  at::Tensor loss = at::empty({}, pred.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty_like(pred) : pred.new_empty({0});  // pred's layout
  if (!flat_by_sample(pred)) pred = pred.contiguous();
  at::Tensor work_grad = grad;
  if (compute_grad && !(grad.is_non_overlapping_and_dense() && same_layout(grad, pred)))
    work_grad = at::empty_like(pred);  // rare: the kernel writes in pred's working layout, copied at the end
  const DType pdt = dtype_of(pred, "pred");
  DType tdt = dtype_of(target, "target");
  if (tdt != pdt && tdt != DType::kFloat32) {  // the kernels take a target in pred's dtype or float32
    target = target.to(at::kFloat);
    tdt = DType::kFloat32;
  }
  if (!(target.is_non_overlapping_and_dense() && same_layout(pred, target)))
    target = at::empty_like(pred, target.options()).copy_(target);  // rare: bring target to pred's layout
  const int64_t total = pred.numel();
  const int64_t n = pred.size(0);
  const int64_t M = n > 0 ? total / n : 0;
  at::Tensor mask_c;
  const bool* mask_ptr = nullptr;
  if (mask.has_value()) {
    mask_c = mask->contiguous();
    mask_ptr = mask_c.data_ptr<bool>();
  }
  const int num_counts = cuda::masked_loss_count_blocks(total);
  at::Tensor counts = at::empty({num_counts}, pred.options().dtype(at::kInt));
  check_cuda(cuda::masked_loss_count_float(target.data_ptr(), tdt, mask_ptr, total, M, counts.data_ptr<int32_t>(),
                                           num_counts, loss.data_ptr<float>(), stream),
             "count kernel");
  check_cuda(cuda::masked_loss_elementwise(kind, pred.data_ptr(), pdt, target.data_ptr(), tdt, mask_ptr,
                                           compute_grad ? work_grad.data_ptr() : nullptr, total, M,
                                           counts.data_ptr<int32_t>(), num_counts, loss.data_ptr<float>(), stream),
             "loss kernel");
  if (compute_grad && !work_grad.is_same(grad)) grad.copy_(work_grad);
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> masked_loss_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                    const c10::optional<at::Tensor>& mask, c10::string_view kind,
                                                    int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK(pred.is_cuda() && target.device() == pred.device(),
              "masked_loss (CUDA): pred and target must be on the same CUDA device");
  if (mask.has_value()) {
    TORCH_CHECK(mask->device() == pred.device() && mask->scalar_type() == at::kBool && mask->dim() == 1 &&
                    mask->size(0) == pred.size(0),
                "masked_loss (CUDA): mask must be a bool [N] tensor on pred's device");
  }
  const c10::cuda::CUDAGuard guard(pred.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(pred.device().index()).stream();
  dtype_of(pred, "pred");
  const std::string k(kind);
  if (k == "ce") return cross_entropy(pred, target, mask, ignore_index, compute_grad, stream);
  if (k == "bce") return elementwise(pred, target, mask, cuda::ElementwiseKind::kBCE, compute_grad, stream);
  if (k == "l1") return elementwise(pred, target, mask, cuda::ElementwiseKind::kL1, compute_grad, stream);
  if (k == "mse") return elementwise(pred, target, mask, cuda::ElementwiseKind::kMSE, compute_grad, stream);
  TORCH_CHECK(false, "masked_loss (CUDA): kind must be one of ce, bce, l1, mse, got '", k, "'");
}

void check_scales(at::TensorList grads, const at::Tensor& scales, const char* op) {
  TORCH_CHECK(scales.is_cuda() && scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
                  scales.size(0) == static_cast<int64_t>(grads.size()),
              op, " (CUDA): scales must be a float32 CUDA tensor of shape [", grads.size(), "]");
  for (const at::Tensor& g : grads) {
    TORCH_CHECK(g.device() == scales.device(), op, " (CUDA): grads must be on scales' device");
  }
}

// One launch per kMaxScaleTasks tasks (one launch for any realistic number of tasks).
void launch_scale(const std::vector<cuda::ScaleTask>& tasks, const at::Tensor& scales_c, cudaStream_t stream) {
  for (size_t first = 0; first < tasks.size(); first += cuda::kMaxScaleTasks) {
    const int num = static_cast<int>(std::min<size_t>(cuda::kMaxScaleTasks, tasks.size() - first));
    check_cuda(cuda::masked_loss_scale_grads(tasks.data() + first, num, scales_c.data_ptr<float>() + first, stream),
               "scale kernel");
  }
}

std::vector<at::Tensor> masked_loss_scale_grads_cuda(at::TensorList grads, const at::Tensor& scales) {
  check_scales(grads, scales, "masked_loss_scale_grads");
  const at::Tensor scales_c = scales.contiguous();
  const c10::cuda::CUDAGuard guard(scales.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(scales.device().index()).stream();
  std::vector<at::Tensor> ins, outs;
  std::vector<cuda::ScaleTask> tasks;
  for (const at::Tensor& g : grads) {
    ins.push_back(g.is_non_overlapping_and_dense() ? g : g.contiguous());
    outs.push_back(at::empty_like(ins.back()));
    tasks.push_back({ins.back().data_ptr(), outs.back().data_ptr(), ins.back().numel(), dtype_of(g, "grads")});
  }
  launch_scale(tasks, scales_c, stream);
  return outs;
}

// In place: the kernel reads element i and writes it from the same thread, so in == out is safe. A strided
// gradient (not produced by our forward, which writes dense ones) goes through ATen's in-place multiply.
void masked_loss_scale_grads_inplace_cuda(at::TensorList grads, const at::Tensor& scales) {
  check_scales(grads, scales, "masked_loss_scale_grads_");
  const at::Tensor scales_c = scales.contiguous();
  const c10::cuda::CUDAGuard guard(scales.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(scales.device().index()).stream();
  for (const at::Tensor& g : grads) dtype_of(g, "grads");  // every check before anything is written
  std::vector<cuda::ScaleTask> tasks;
  std::vector<float*> task_scales;
  for (size_t t = 0; t < grads.size(); ++t) {
    at::Tensor g = grads[t];
    if (!g.is_non_overlapping_and_dense()) {
      // In float32: a half tensor multiplied in place would round the scale to half first.
      g.copy_(g.to(at::kFloat).mul_(scales_c[static_cast<int64_t>(t)]));
      continue;
    }
    tasks.push_back({g.data_ptr(), g.data_ptr(), g.numel(), dtype_of(g, "grads")});
    task_scales.push_back(scales_c.data_ptr<float>() + t);
  }
  if (tasks.size() == grads.size()) {
    launch_scale(tasks, scales_c, stream);
    return;
  }
  // Some gradients were strided: the dense ones' scales are no longer at their task index.
  for (size_t i = 0; i < tasks.size(); ++i) {
    check_cuda(cuda::masked_loss_scale_grads(&tasks[i], 1, task_scales[i], stream), "scale kernel");
  }
}

}  // namespace
}  // namespace fastmtl

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("masked_loss", &fastmtl::masked_loss_cuda);
  m.impl("masked_loss_scale_grads", &fastmtl::masked_loss_scale_grads_cuda);
  m.impl("masked_loss_scale_grads_", &fastmtl::masked_loss_scale_grads_inplace_cuda);
}
