// CUDA implementations of fastmtl::masked_loss, fastmtl::masked_loss_scale_grads(_) and
// fastmtl::masked_multitask_loss_forward (schemas in csrc/ops.cpp):
// tensor preparation (layouts, workspaces) around the raw-pointer launchers of masked_loss.h. Arguments are
// validated in Python (fastmtl/ops/masked_loss.py); the checks here only guard against calls that would make a
// kernel read out of bounds. Nothing here synchronises with the host, except the experiments' trace
// (FASTMTL_CUDA_GROUP_TRACE), which waits for its launch to write the records out.

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
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

// What the current device runs at once: the scaling kernel caps its grid at the blocks it keeps resident.
cuda::DeviceCapacity device_capacity() {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return {props->multiProcessorCount, props->maxThreadsPerMultiProcessor};
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

// One task's tensors in the layouts the kernels take, and the kernel arguments. grad always has pred's own layout
// (empty_like, as the fake implementation says); the kernels write it directly unless its layout does not fit them
// (rare), then they write work_grad and finish() copies it into grad.
struct TaskLaunch {
  bool is_ce = false;
  at::Tensor pred, target, mask, grad, work_grad;
  DType pred_dtype = DType::kFloat32, target_dtype = DType::kFloat32;
  CeGeometry geom{};                                                   // ce
  int64_t ignore_index = -100;                                         // ce
  cuda::ElementwiseKind kind = cuda::ElementwiseKind::kL1;             // bce / l1 / mse
  int64_t total = 0, M = 0;                                            // bce / l1 / mse

  const bool* mask_ptr() const { return mask.defined() ? mask.data_ptr<bool>() : nullptr; }
  void* grad_ptr() const { return work_grad.defined() ? work_grad.data_ptr() : nullptr; }

  // The count kernel of the normalised mode (it zeroes *loss and *ticket).
  void count(int32_t* counts, int num_counts, float* loss, unsigned* ticket, cudaStream_t stream) const {
    check_cuda(is_ce ? cuda::masked_loss_count_ce(target.data_ptr<int64_t>(), mask_ptr(), geom, ignore_index, counts,
                                                  num_counts, loss, ticket, stream)
                     : cuda::masked_loss_count_float(target.data_ptr(), target_dtype, mask_ptr(), total, M, counts,
                                                     num_counts, loss, ticket, stream),
               "count kernel");
  }

  int64_t count_items() const { return is_ce ? geom.N * geom.S : total; }

  // This task for masked_loss_multitask_forward, its loss written to *loss.
  cuda::LossTask loss_task(float* loss) const {
    cuda::LossTask task;
    task.is_ce = is_ce;
    task.kind = kind;
    task.pred = pred.data_ptr();
    task.dtype = pred_dtype;
    task.target = target.data_ptr();
    task.target_dtype = target_dtype;
    task.mask = mask_ptr();
    task.grad = grad_ptr();
    task.geom = geom;
    task.ignore_index = ignore_index;
    task.total = total;
    task.M = M;
    task.loss = loss;
    return task;
  }

  void run(const cuda::LossReduction& red, const cuda::LaunchEnd& end, cudaStream_t stream) const {
    check_cuda(is_ce ? cuda::masked_loss_ce(pred.data_ptr(), pred_dtype, target.data_ptr<int64_t>(), mask_ptr(),
                                            grad_ptr(), geom, ignore_index, red, end, stream)
                     : cuda::masked_loss_elementwise(kind, pred.data_ptr(), pred_dtype, target.data_ptr(),
                                                     target_dtype, mask_ptr(), grad_ptr(), total, M, red, end, stream),
               is_ce ? "cross-entropy kernel" : "loss kernel");
  }

  void finish() const {
    if (work_grad.defined() && !work_grad.is_same(grad)) grad.copy_(work_grad);
  }
};

TaskLaunch prepare_cross_entropy(at::Tensor pred, at::Tensor target, const c10::optional<at::Tensor>& mask,
                                 int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK(pred.dim() >= 2, "masked_loss (CUDA): ce pred must be [N, C, *], got ", pred.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "masked_loss (CUDA): ce target must be int64");
  TORCH_CHECK(target.dim() == pred.dim() - 1 && target.size(0) == pred.size(0),
              "masked_loss (CUDA): ce target must be [N, *spatial] matching pred");
  TaskLaunch L;
  L.is_ce = true;
  L.ignore_index = ignore_index;
  L.pred_dtype = dtype_of(pred, "pred");
  L.grad = compute_grad ? at::empty_like(pred) : pred.new_empty({0});
  if (collapsed_stride(pred, 2) < 0) pred = pred.contiguous();
  if (collapsed_stride(target, 1) < 0) target = target.contiguous();
  if (compute_grad) L.work_grad = collapsed_stride(L.grad, 2) < 0 ? at::empty_like(pred) : L.grad;
  const at::Tensor& g_src = compute_grad ? L.work_grad : pred;

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
  L.geom = g;
  L.pred = pred;
  L.target = target;
  if (mask.has_value()) L.mask = *mask;
  return L;
}

TaskLaunch prepare_elementwise(at::Tensor pred, at::Tensor target, const c10::optional<at::Tensor>& mask,
                               cuda::ElementwiseKind kind, bool compute_grad) {
  TORCH_CHECK(pred.dim() >= 1 && target.sizes() == pred.sizes(),
              "masked_loss (CUDA): target must have pred's shape ", pred.sizes(), ", got ", target.sizes());
  TaskLaunch L;
  L.kind = kind;
  L.grad = compute_grad ? at::empty_like(pred) : pred.new_empty({0});  // pred's layout
  if (!flat_by_sample(pred)) pred = pred.contiguous();
  if (compute_grad)  // rare: the kernel writes in pred's working layout, copied at the end
    L.work_grad = L.grad.is_non_overlapping_and_dense() && same_layout(L.grad, pred) ? L.grad : at::empty_like(pred);
  L.pred_dtype = dtype_of(pred, "pred");
  L.target_dtype = dtype_of(target, "target");
  if (L.target_dtype != L.pred_dtype && L.target_dtype != DType::kFloat32) {  // kernels: pred's dtype or float32
    target = target.to(at::kFloat);
    L.target_dtype = DType::kFloat32;
  }
  if (!(target.is_non_overlapping_and_dense() && same_layout(pred, target)))
    target = at::empty_like(pred, target.options()).copy_(target);  // rare: bring target to pred's layout
  L.total = pred.numel();
  const int64_t n = pred.size(0);
  L.M = n > 0 ? L.total / n : 0;
  if (mask.has_value()) L.mask = mask->contiguous();
  L.pred = pred;
  L.target = target;
  return L;
}

TaskLaunch prepare_task(const at::Tensor& pred, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
                        c10::string_view kind, int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK(pred.is_cuda() && target.device() == pred.device(),
              "masked_loss (CUDA): pred and target must be on the same CUDA device");
  if (mask.has_value()) {
    TORCH_CHECK(mask->device() == pred.device() && mask->scalar_type() == at::kBool && mask->dim() == 1 &&
                    mask->size(0) == pred.size(0),
                "masked_loss (CUDA): mask must be a bool [N] tensor on pred's device");
  }
  dtype_of(pred, "pred");
  const std::string k(kind);
  if (k == "ce") return prepare_cross_entropy(pred, target, mask, ignore_index, compute_grad);
  if (k == "bce") return prepare_elementwise(pred, target, mask, cuda::ElementwiseKind::kBCE, compute_grad);
  if (k == "l1") return prepare_elementwise(pred, target, mask, cuda::ElementwiseKind::kL1, compute_grad);
  if (k == "mse") return prepare_elementwise(pred, target, mask, cuda::ElementwiseKind::kMSE, compute_grad);
  TORCH_CHECK(false, "masked_loss (CUDA): kind must be one of ce, bce, l1, mse, got '", k, "'");
}

// The kernels' int32 / float32 scratch, carved from one int32 allocation (one call into the caching allocator).
class Workspace {
 public:
  Workspace(const at::TensorOptions& options, int64_t words) : buffer_(at::empty({words}, options.dtype(at::kInt))) {}
  int32_t* ints(int64_t n) { return take(n); }
  float* floats(int64_t n) { return reinterpret_cast<float*>(take(n)); }  // 4-byte words either way
  unsigned* ticket() { return reinterpret_cast<unsigned*>(take(1)); }

 private:
  int32_t* take(int64_t n) {
    int32_t* p = buffer_.data_ptr<int32_t>() + used_;
    used_ += n;
    TORCH_INTERNAL_ASSERT(used_ <= buffer_.numel(), "masked_loss (CUDA): workspace too small");
    return p;
  }
  at::Tensor buffer_;
  int64_t used_ = 0;
};

// One task, normalised mode: the count kernel, then the loss kernel (gradient divided by the count), whose last
// block finalizes the loss from the blocks' slots.
std::tuple<at::Tensor, at::Tensor> masked_loss_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                    const c10::optional<at::Tensor>& mask, c10::string_view kind,
                                                    int64_t ignore_index, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(pred.device().index()).stream();
  const TaskLaunch L = prepare_task(pred, target, mask, kind, ignore_index, compute_grad);
  at::Tensor loss = at::empty({}, pred.options().dtype(at::kFloat));
  const int num_counts = cuda::masked_loss_count_blocks(L.count_items());
  const int64_t slots = cuda::masked_loss_slots(L.loss_task(loss.data_ptr<float>()));
  Workspace work(pred.options(), num_counts + 2 * slots + 1);
  int32_t* counts = work.ints(num_counts);
  cuda::LossReduction red;
  red.counts = counts;
  red.num_counts = num_counts;
  red.psum = work.floats(slots);
  red.pcount = work.ints(slots);
  cuda::LaunchEnd end;
  end.ticket = work.ticket();
  end.loss = loss.data_ptr<float>();
  L.count(counts, num_counts, loss.data_ptr<float>(), end.ticket, stream);
  L.run(red, end, stream);
  L.finish();
  return {loss, L.grad};
}

// FASTMTL_CUDA_GROUP_BLOCKS: which build of the grouped forward runs, by the resident blocks per SM it is built for
// (2 or 3; unset or empty: 3, the fastest measured), so that the builds can be timed side by side
// (benchmarks/group_blocks_experiment.py). Read at every call; anything else raises before any launch.
int group_blocks_from_env() {
  const char* env = std::getenv("FASTMTL_CUDA_GROUP_BLOCKS");
  if (env == nullptr || *env == '\0') return 0;
  const std::string value(env);
  TORCH_CHECK(value == "2" || value == "3",
              "FASTMTL_CUDA_GROUP_BLOCKS must be 2 or 3 (resident blocks per SM of the grouped masked-loss kernel), "
              "got '", value, "'");
  return value[0] - '0';
}

// FASTMTL_CUDA_GROUP_TILE_KB: the least a loss tile of the grouped forward moves, in KiB (4 to 1024; unset or empty:
// 48), so that tile sizes can be timed side by side (benchmarks/group_blocks_experiment.py). Read at every call;
// anything else raises before any launch. Returns bytes, or 0 for the default.
int64_t group_tile_bytes_from_env() {
  const char* env = std::getenv("FASTMTL_CUDA_GROUP_TILE_KB");
  if (env == nullptr || *env == '\0') return 0;
  const std::string value(env);
  int64_t kb = -1;
  if (value.size() <= 4 && value.find_first_not_of("0123456789") == std::string::npos) kb = std::stoll(value);
  TORCH_CHECK(kb >= 4 && kb <= 1024,
              "FASTMTL_CUDA_GROUP_TILE_KB must be a whole number of KiB from 4 to 1024 (the least a loss tile of the "
              "grouped masked-loss kernel moves), got '", value, "'");
  return kb * 1024;
}

// FASTMTL_CUDA_GROUP_PREFETCH: 1 prefetches each loss tile's reads of the grouped forward to L2 before the tile runs
// (masked_loss_prefetch.cuh), 0 does not (unset or empty: 0, until it is timed on a GPU), so that both can be timed
// side by side (benchmarks/group_blocks_experiment.py).
// FASTMTL_CUDA_GROUP_SMALL_TAIL: 1 runs the last wave of the grouped forward's loss work (one block's worth per
// resident block) as tiles of one block each, 0 does not (unset or empty: 0, until it is timed on a GPU).
// Both: read at every call; anything else raises before any launch.
bool group_flag_from_env(const char* name, const char* what) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return false;
  const std::string value(env);
  TORCH_CHECK(value == "0" || value == "1", name, " must be 0 or 1 (", what, "), got '", value, "'");
  return value == "1";
}

// FASTMTL_CUDA_GROUP_TRACE=<path>: experiments only (benchmarks/group_trace.py). The grouped forward records every
// tile (cuda::GroupTraceField: task, kind, SM, block, and its start, count-wait end and end on the GPU's global timer)
// and the call writes the records to <path> as CSV, after waiting for the launch (a host synchronisation). Read at
// every call; unset or empty: nothing recorded.
constexpr int64_t kMaxTraceTiles = 1 << 16;

std::string group_trace_path_from_env() {
  const char* env = std::getenv("FASTMTL_CUDA_GROUP_TRACE");
  return env == nullptr ? std::string() : std::string(env);
}

void write_group_trace(const at::Tensor& trace, const std::string& path) {
  const at::Tensor host = trace.cpu();  // waits for the launch
  const int64_t* r = host.data_ptr<int64_t>();
  if (r[(host.size(0) - 1) * cuda::kGroupTraceFields + cuda::kTraceTile] >= 0)
    TORCH_WARN("FASTMTL_CUDA_GROUP_TRACE: the launch had more than ", host.size(0) - 1,
               " tiles; the records stop there (and the finalize is not recorded)");
  std::ofstream out(path);
  TORCH_CHECK(out.good(), "FASTMTL_CUDA_GROUP_TRACE: cannot write '", path, "'");
  out << "tile,task,is_loss,sm,block,start_ns,counted_ns,end_ns\n";
  for (int64_t k = 0; k < host.size(0); ++k, r += cuda::kGroupTraceFields) {
    if (r[cuda::kTraceTile] < 0) continue;  // not a tile of this launch (or no grouped launch)
    out << r[cuda::kTraceTile] << ',' << r[cuda::kTraceTask] << ',' << r[cuda::kTraceIsLoss] << ','
        << r[cuda::kTraceSm] << ',' << r[cuda::kTraceBlock] << ',' << r[cuda::kTraceStart] << ','
        << r[cuda::kTraceCounted] << ',' << r[cuda::kTraceEnd] << '\n';
  }
  TORCH_CHECK(out.good(), "FASTMTL_CUDA_GROUP_TRACE: writing '", path, "' failed");
}

// All tasks, by masked_loss_multitask_forward (masked_loss.h): one grouped launch, or a chain (mixed dtypes, over 8
// tasks with elements).
// Returns (total, losses, grad_scale, grads): grads[t] * grad_scale[t] = d L_t / d pred_t, where grad_scale[t] is 1
// for gradients already divided by the valid count, the remaining factor for the chain's lead task and for float16
// gradients, stored undivided (g / count underflows float16 for large counts), and 0 for a task without elements;
// csrc/masked_multitask_loss.cpp documents the op.
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>> masked_multitask_loss_forward_cuda(
    at::TensorList preds, at::TensorList targets, const c10::List<c10::optional<at::Tensor>>& masks,
    const std::vector<std::string>& kinds, int64_t ignore_index, const c10::optional<at::Tensor>& weights,
    const c10::List<bool>& compute_grad) {
  const size_t n = preds.size();
  TORCH_CHECK(n > 0 && targets.size() == n && masks.size() == n && kinds.size() == n && compute_grad.size() == n,
              "masked_multitask_loss_forward (CUDA): one pred, target, mask, kind and compute_grad per task");
  const int group_blocks = group_blocks_from_env();
  const int64_t group_tile_bytes = group_tile_bytes_from_env();
  const bool group_prefetch =
      group_flag_from_env("FASTMTL_CUDA_GROUP_PREFETCH", "L2 prefetch of the grouped masked-loss kernel's loss tiles");
  const bool group_small_tail = group_flag_from_env(
      "FASTMTL_CUDA_GROUP_SMALL_TAIL", "one-block loss tiles at the end of the grouped masked-loss kernel's schedule");
  const std::string trace_path = group_trace_path_from_env();
  const c10::cuda::CUDAGuard guard(preds[0].device());
  TORCH_CHECK(trace_path.empty() ||
                  c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "FASTMTL_CUDA_GROUP_TRACE waits for the launch to write its records: unset it while capturing a CUDA "
              "graph");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(preds[0].device().index()).stream();
  const auto options = preds[0].options().dtype(at::kFloat);
  at::Tensor weights_c;
  if (weights.has_value() && weights->defined()) {
    TORCH_CHECK(weights->device() == preds[0].device() && weights->dim() == 1 &&
                    weights->size(0) == static_cast<int64_t>(n) && weights->scalar_type() == at::kFloat,
                "masked_multitask_loss_forward (CUDA): weights must be a float32 [", n, "] tensor on the preds' device");
    weights_c = weights->contiguous();
  }
  std::vector<TaskLaunch> launches;
  for (size_t t = 0; t < n; ++t) {
    TORCH_CHECK(preds[t].device() == preds[0].device(), "masked_multitask_loss_forward (CUDA): preds on one device");
    launches.push_back(prepare_task(preds[t], targets[t], masks.get(t), kinds[t], ignore_index, compute_grad.get(t)));
  }
  at::Tensor total = at::empty({}, options);
  std::vector<at::Tensor> losses, grads;
  for (size_t t = 0; t < n; ++t) {
    losses.push_back(at::empty({}, options));
    grads.push_back(launches[t].grad);
  }
  std::vector<cuda::LossTask> tasks;
  for (size_t t = 0; t < n; ++t) tasks.push_back(launches[t].loss_task(losses[t].data_ptr<float>()));
  const int num_tasks = static_cast<int>(n);
  const int64_t T = num_tasks;
  const int64_t slots = cuda::masked_loss_multitask_slots(tasks.data(), num_tasks);
  at::Tensor grad_scale = at::empty({T}, options);  // set by the kernels
  Workspace work(options, T * cuda::kMaxCountBlocks + 2 * slots + T + 1);
  cuda::MultitaskBuffers buffers;
  buffers.total = total.data_ptr<float>();
  buffers.weights = weights_c.defined() ? weights_c.data_ptr<float>() : nullptr;
  buffers.grad_scale = grad_scale.data_ptr<float>();
  buffers.counts = work.ints(T * cuda::kMaxCountBlocks);
  buffers.psum = work.floats(slots);
  buffers.pcount = work.ints(slots);
  buffers.losses = work.floats(T);
  buffers.ticket = work.ticket();
  buffers.group_blocks = group_blocks;
  buffers.group_tile_bytes = group_tile_bytes;
  buffers.group_prefetch = group_prefetch;
  buffers.group_small_tail = group_small_tail;
  at::Tensor trace;
  if (!trace_path.empty()) {
    trace = at::full({kMaxTraceTiles, cuda::kGroupTraceFields}, -1, options.dtype(at::kLong));
    buffers.group_trace = trace.data_ptr<int64_t>();
    buffers.group_trace_len = kMaxTraceTiles;
  }
  check_cuda(cuda::masked_loss_multitask_forward(tasks.data(), num_tasks, buffers, stream), "multi-task forward");
  if (trace.defined()) write_group_trace(trace, trace_path);
  for (const TaskLaunch& launch : launches) launch.finish();
  return {total, losses, grad_scale, grads};
}

// In-place scaling of tensors that share memory would race (and scale shared elements twice).
void check_no_overlap(at::TensorList grads) {
  for (size_t i = 0; i < grads.size(); ++i)
    for (size_t j = i + 1; j < grads.size(); ++j) at::assert_no_overlap(grads[i], grads[j]);
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
    const float* scales = scales_c.data_ptr<float>() + first;
    check_cuda(cuda::masked_loss_scale_grads(tasks.data() + first, num, scales, device_capacity(), stream),
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
  check_no_overlap(grads);
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
    check_cuda(cuda::masked_loss_scale_grads(&tasks[i], 1, task_scales[i], device_capacity(), stream),
               "scale kernel");
  }
}

// The backward of masked_multitask_loss_forward: out[t] = grads[t] * (g_total * w_t + g_task[t]) * grad_scale[t], the
// scales computed in the kernel (one launch per kMaxScaleTasks tasks, no [T]-sized torch ops). In place when
// `inplace` (each element is read and written by the same thread). An empty gradient (a task without one) stays
// empty; a strided one (not produced by our forward) is scaled by ATen in float32.
std::vector<at::Tensor> multitask_backward(at::TensorList grads, const at::Tensor& grad_scale,
                                           const c10::optional<at::Tensor>& grad_total,
                                           const c10::optional<at::Tensor>& weights,
                                           const c10::List<c10::optional<at::Tensor>>& grad_losses, bool inplace) {
  const char* op = inplace ? "masked_multitask_loss_backward_" : "masked_multitask_loss_backward";
  const int64_t n = static_cast<int64_t>(grads.size());
  TORCH_CHECK(grad_scale.is_cuda() && grad_scale.dim() == 1 && (grad_scale.size(0) == n || grad_scale.size(0) == 0) &&
                  static_cast<int64_t>(grad_losses.size()) == n,
              op, " (CUDA): grad_scale must be a CUDA [", n, "] (or empty) tensor and grad_losses have ", n,
              " entries");
  const c10::cuda::CUDAGuard guard(grad_scale.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad_scale.device().index()).stream();
  const auto on_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == grad_scale.device(), op, " (CUDA): ", name, " must be on grad_scale's device");
    return t.to(at::kFloat).contiguous();
  };
  for (const at::Tensor& g : grads) {
    TORCH_CHECK(g.device() == grad_scale.device(), op, " (CUDA): grads must be on grad_scale's device");
    if (g.numel() > 0) dtype_of(g, "grads");  // every check before anything is written
  }
  if (inplace) check_no_overlap(grads);
  // An empty grad_scale means every factor is 1 (what masked_multitask_loss_forward_cuda returns).
  const at::Tensor factor = grad_scale.numel() > 0 ? on_device(grad_scale, "grad_scale") : at::Tensor();
  const bool has_total = grad_total.has_value() && grad_total->defined();
  const bool has_weights = weights.has_value() && weights->defined();
  const at::Tensor g_total = has_total ? on_device(*grad_total, "grad_total") : at::Tensor();
  const at::Tensor w = has_weights ? on_device(*weights, "weights") : at::Tensor();
  TORCH_CHECK(!has_weights || w.numel() == n, op, " (CUDA): weights must have ", n, " entries");
  std::vector<at::Tensor> g_tasks(n), outs(n);
  std::vector<cuda::ScaleTask> tasks(n);
  for (int64_t t = 0; t < n; ++t) {
    const c10::optional<at::Tensor> g_t = grad_losses.get(t);
    if (g_t.has_value() && g_t->defined()) g_tasks[t] = on_device(*g_t, "grad_losses");
    const at::Tensor& g = grads[t];
    outs[t] = inplace ? g : at::empty_like(g);
    tasks[t] = {g.data_ptr(), outs[t].data_ptr(), 0, g.numel() > 0 ? dtype_of(g, "grads") : DType::kFloat32,
                g_tasks[t].defined() ? g_tasks[t].data_ptr<float>() : nullptr};
    if (g.numel() == 0) continue;
    if (g.is_non_overlapping_and_dense() && (inplace || same_layout(g, outs[t]))) {
      tasks[t].numel = g.numel();
      continue;
    }
    // Rare: a strided gradient, scaled by ATen in float32 (numel 0 keeps it out of the kernel).
    const auto float_options = grad_scale.options().dtype(at::kFloat);
    at::Tensor scale = at::zeros({}, float_options);
    if (has_total) scale = g_total.reshape({}) * (has_weights ? w[t] : at::ones({}, float_options));
    if (g_tasks[t].defined()) scale = scale + g_tasks[t].reshape({});
    if (factor.defined()) scale = scale * factor[t];
    outs[t].copy_(g.to(at::kFloat) * scale);
  }
  for (int64_t begin = 0; begin < n; begin += cuda::kMaxScaleTasks) {
    const int count = static_cast<int>(std::min<int64_t>(cuda::kMaxScaleTasks, n - begin));
    cuda::ScaleFactors f;
    f.g_total = has_total ? g_total.data_ptr<float>() : nullptr;
    f.weights = has_weights ? w.data_ptr<float>() + begin : nullptr;
    f.factor = factor.defined() ? factor.data_ptr<float>() + begin : nullptr;
    check_cuda(cuda::masked_loss_scale_grads_by(tasks.data() + begin, count, f, device_capacity(), stream),
               "scale kernel");
  }
  return outs;
}

std::vector<at::Tensor> masked_multitask_loss_backward_cuda(at::TensorList grads, const at::Tensor& grad_scale,
                                                            const c10::optional<at::Tensor>& grad_total,
                                                            const c10::optional<at::Tensor>& weights,
                                                            const c10::List<c10::optional<at::Tensor>>& grad_losses) {
  return multitask_backward(grads, grad_scale, grad_total, weights, grad_losses, /*inplace=*/false);
}

void masked_multitask_loss_backward_inplace_cuda(at::TensorList grads, const at::Tensor& grad_scale,
                                                 const c10::optional<at::Tensor>& grad_total,
                                                 const c10::optional<at::Tensor>& weights,
                                                 const c10::List<c10::optional<at::Tensor>>& grad_losses) {
  multitask_backward(grads, grad_scale, grad_total, weights, grad_losses, /*inplace=*/true);
}

}  // namespace
}  // namespace fastmtl

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("masked_loss", &fastmtl::masked_loss_cuda);
  m.impl("masked_loss_scale_grads", &fastmtl::masked_loss_scale_grads_cuda);
  m.impl("masked_loss_scale_grads_", &fastmtl::masked_loss_scale_grads_inplace_cuda);
  m.impl("masked_multitask_loss_forward", &fastmtl::masked_multitask_loss_forward_cuda);
  m.impl("masked_multitask_loss_backward", &fastmtl::masked_multitask_loss_backward_cuda);
  m.impl("masked_multitask_loss_backward_", &fastmtl::masked_multitask_loss_backward_inplace_cuda);
}
