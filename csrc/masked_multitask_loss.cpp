// fastmtl::masked_multitask_loss: every task of fastmtl.masked_multitask_loss in one native op, with its autograd
// in C++. The cpp and cuda backends call it in eager mode: one dispatcher round trip and one C++ autograd node
// instead of a Python autograd.Function around one op call per task (the Python layer cost about 60 us per
// forward+backward on this project's CPU machine, more than the kernels at small sizes).
//
// Forward: fastmtl::masked_multitask_loss_forward returns the total, the per-task losses and each task's gradient
// up to a factor grad_scale[t] (CUDA: a chain of one loss kernel per task, each counting the next task's valid
// elements, so gradients are written already divided by the valid count except the lead (smallest-gradient)
// task's and float16 ones; CPU: the per-task op; an empty grad_scale means every factor is 1). Backward:
// fastmtl::masked_multitask_loss_backward multiplies each saved gradient by
// scale_t = (g_total * w_t + g_task[t]) * grad_scale[t], computed on the device (CUDA: inside the one scaling
// kernel; no host synchronisation); when autograd frees the graph afterwards, the in-place form
// masked_multitask_loss_backward_ scales the saved gradients themselves. Under torch.compile the Python path
// (fastmtl/ops/masked_loss.py) is traced instead.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "masked_loss_calls.h"

namespace fastmtl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using MaskList = c10::List<std::optional<at::Tensor>>;

// The arguments that carry no gradient, passed to the autograd function by pointer (so that autograd does not
// count them as inputs). They are read during the forward only.
struct TaskInputs {
  at::TensorList targets;
  const MaskList* masks;
  const std::vector<std::string>* kinds;
  const std::vector<std::string>* names;
  int64_t ignore_index;
};

void check_lengths(at::TensorList preds, const TaskInputs& in) {
  const size_t n = preds.size();
  TORCH_CHECK_VALUE(n > 0, "masked_multitask_loss: preds must hold at least one task");
  TORCH_CHECK_VALUE(in.targets.size() == n && in.masks->size() == n && in.kinds->size() == n && in.names->size() == n,
                    "masked_multitask_loss: preds, targets, masks, kinds and names must have one entry per task (",
                    n, " preds)");
}

// Whether t is a tracing stand-in (FakeTensor, FunctionalTensor under make_fx / AOTAutograd) with no data to read.
bool is_traced(const at::Tensor& t) {
  const c10::DispatchKeySet traced =
      c10::DispatchKeySet(c10::DispatchKey::Python) | c10::DispatchKeySet(c10::DispatchKey::Functionalize);
  return t.defined() && t.key_set().has_any(traced);
}

// Whether a ce target holds a class index outside [0, num_classes) other than ignore_index (CPU tensors).
bool has_class_out_of_range(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  const at::Tensor t = target.contiguous();
  const int64_t* data = t.data_ptr<int64_t>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, t.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    bool local = false;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t v = data[i];
      local |= v != ignore_index && static_cast<uint64_t>(v) >= static_cast<uint64_t>(num_classes);
    }
    if (local) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

// The CPU half of the class-range check of fastmtl/ops/masked_loss.py (same message): a ce class index outside
// [0, C) other than ignore_index raises ValueError before any task runs. CUDA targets are checked in Python, under
// fastmtl.debug() only (the check synchronises).
void check_cpu_class_ranges(at::TensorList preds, const TaskInputs& in) {
  for (size_t t = 0; t < preds.size(); ++t) {
    const at::Tensor& target = in.targets[t];
    if ((*in.kinds)[t] != "ce" || !target.is_cpu() || target.scalar_type() != at::kLong || is_traced(target)) continue;
    const int64_t num_classes = preds[t].size(1);
    TORCH_CHECK_VALUE(!has_class_out_of_range(target, num_classes, in.ignore_index), "targets['",
                      (*in.names)[t], "'] (ce) holds a class index outside [0, ", num_classes,
                      ") that is not ignore_index=", in.ignore_index);
  }
}

using ForwardResult = std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>>;

// fastmtl::masked_multitask_loss_forward on the CPU: the per-task op (gradients already divided by the valid count,
// so grad_scale is empty: every factor is 1), the losses stacked and weighted into the total.
ForwardResult masked_multitask_loss_forward_cpu(at::TensorList preds, at::TensorList targets, const MaskList& masks,
                                                const std::vector<std::string>& kinds, int64_t ignore_index,
                                                const std::optional<at::Tensor>& weights,
                                                const c10::List<bool>& compute_grad) {
  const size_t n = preds.size();
  TORCH_CHECK(n > 0 && targets.size() == n && masks.size() == n && kinds.size() == n && compute_grad.size() == n,
              "masked_multitask_loss_forward: one pred, target, mask, kind and compute_grad per task");
  std::vector<at::Tensor> losses, grads;
  for (size_t t = 0; t < n; ++t) {
    auto [loss, grad] =
        call_masked_loss(preds[t], targets[t], masks.get(t), kinds[t], ignore_index, compute_grad.get(t));
    losses.push_back(loss);
    grads.push_back(grad);
  }
  const at::Tensor stacked = at::stack(losses);
  const bool weighted = weights.has_value() && weights->defined();
  at::Tensor total = weighted ? at::mul(stacked, *weights).sum() : stacked.sum();
  return {total, losses, at::empty({0}, stacked.options().dtype(at::kFloat)), grads};
}

ForwardResult call_forward(at::TensorList preds, const std::optional<at::Tensor>& weights, const TaskInputs& in,
                           const c10::List<bool>& compute_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastmtl::masked_multitask_loss_forward", "")
                             .typed<ForwardResult(at::TensorList, at::TensorList, const MaskList&,
                                                  const std::vector<std::string>&, int64_t,
                                                  const std::optional<at::Tensor>&, const c10::List<bool>&)>();
  return op.call(preds, in.targets, *in.masks, *in.kinds, in.ignore_index, weights, compute_grad);
}

// Checks, then the forward below autograd.
ForwardResult run_tasks(at::TensorList preds, const std::optional<at::Tensor>& weights, const TaskInputs& in,
                        const c10::List<bool>& compute_grad) {
  check_lengths(preds, in);
  check_cpu_class_ranges(preds, in);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_forward(preds, weights, in, compute_grad);
}

variable_list outputs_of(const ForwardResult& r) {
  variable_list out{std::get<0>(r)};
  out.insert(out.end(), std::get<1>(r).begin(), std::get<1>(r).end());
  return out;
}

using OptTensor = std::optional<at::Tensor>;
using BackwardSignature = std::vector<at::Tensor>(at::TensorList, const at::Tensor&, const OptTensor&,
                                                  const OptTensor&, const MaskList&);

std::vector<at::Tensor> call_backward(at::TensorList grads, const at::Tensor& grad_scale, const OptTensor& grad_total,
                                      const OptTensor& weights, const MaskList& grad_losses) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastmtl::masked_multitask_loss_backward", "")
                             .typed<BackwardSignature>();
  return op.call(grads, grad_scale, grad_total, weights, grad_losses);
}

void call_backward_inplace(at::TensorList grads, const at::Tensor& grad_scale, const OptTensor& grad_total,
                           const OptTensor& weights, const MaskList& grad_losses) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastmtl::masked_multitask_loss_backward_", "")
                             .typed<void(at::TensorList, const at::Tensor&, const OptTensor&, const OptTensor&,
                                         const MaskList&)>();
  op.call(grads, grad_scale, grad_total, weights, grad_losses);
}

// The [T] scales of the backward, (g_total * w_t + g_task[t]) * grad_scale[t] (an empty grad_scale: factors 1), as
// float32 (CPU implementation).
at::Tensor backward_scales(const at::Tensor& grad_scale, const OptTensor& grad_total, const OptTensor& weights,
                           const MaskList& grad_losses) {
  const int64_t n = static_cast<int64_t>(grad_losses.size());
  TORCH_CHECK(grad_scale.dim() == 1 && (grad_scale.size(0) == n || grad_scale.size(0) == 0),
              "masked_multitask_loss_backward: grad_scale must have ", n, " entries or none, got ", grad_scale.sizes());
  at::Tensor scales = at::zeros({n}, grad_scale.options().dtype(at::kFloat));
  if (grad_total.has_value() && grad_total->defined())
    scales = weights.has_value() && weights->defined() ? *grad_total * *weights : grad_total->expand({n});
  std::vector<at::Tensor> per_task;
  bool any_task = false;
  for (int64_t t = 0; t < n; ++t) {
    const OptTensor g = grad_losses.get(t);
    any_task |= g.has_value() && g->defined();
    per_task.push_back(g.has_value() && g->defined() ? g->reshape({}) : at::zeros({}, scales.options()));
  }
  if (any_task) scales = scales + at::stack(per_task);
  if (grad_scale.numel() > 0) scales = scales * grad_scale;
  return scales.to(at::kFloat).contiguous();
}

std::vector<at::Tensor> masked_multitask_loss_backward_cpu(at::TensorList grads, const at::Tensor& grad_scale,
                                                           const OptTensor& grad_total, const OptTensor& weights,
                                                           const MaskList& grad_losses) {
  return call_scale_grads(grads, backward_scales(grad_scale, grad_total, weights, grad_losses));
}

void masked_multitask_loss_backward_inplace_cpu(at::TensorList grads, const at::Tensor& grad_scale,
                                                const OptTensor& grad_total, const OptTensor& weights,
                                                const MaskList& grad_losses) {
  call_scale_grads_inplace(grads, backward_scales(grad_scale, grad_total, weights, grad_losses));
}

// The saved gradients may be scaled in place when nothing reads them after this backward: autograd frees the graph
// (no retain_graph), grad mode is off (no create_graph) and the tensors are real (not traced by make_fx / AOT).
bool graph_released_after_backward(const std::vector<at::Tensor>& grads) {
  if (at::GradMode::is_enabled() || torch::autograd::get_current_graph_task_keep_graph()) return false;
  for (const at::Tensor& g : grads)
    if (is_traced(g)) return false;
  return true;
}

constexpr const char* kNoSecondDerivative =
    "fastmtl.masked_multitask_loss has no second derivative: its gradients are computed in the forward and saved";

// With create_graph (grad mode on in the backward), differentiating the returned gradients would give zero second
// derivatives (the saved gradients are constants to autograd): route them through DelayedError so that it raises.
// Unlike once_differentiable this holds even when no upstream gradient requires grad: a gradient penalty on
// d loss / d preds has a nonzero second derivative through the loss itself.
void refuse_double_backward(variable_list& result, size_t n) {
  if (!at::GradMode::is_enabled()) return;
  variable_list inputs;
  for (size_t t = 0; t < n; ++t)
    if (result[t].defined()) inputs.push_back(result[t].detach().requires_grad_(true));
  if (inputs.empty()) return;
  auto error = std::make_shared<torch::autograd::DelayedError>(kNoSecondDerivative, inputs.size());
  variable_list wrapped = (*error)(std::move(inputs));
  size_t i = 0;
  for (size_t t = 0; t < n; ++t)
    if (result[t].defined()) result[t] = wrapped[i++];
}

// Inputs: preds (one autograd input each), weights (one more when defined), the TaskInputs pointer. Outputs:
// (total, loss_0, ..., loss_{T-1}). Gradients are not materialised, so a backward from per_task[t] alone scales
// task t's gradient only.
struct MaskedMultitaskLossFunction : public torch::autograd::Function<MaskedMultitaskLossFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList preds, const std::optional<at::Tensor>& weights,
                               const TaskInputs* in, bool grad_enabled) {
    c10::List<bool> compute_grad;
    for (const at::Tensor& p : preds) compute_grad.push_back(grad_enabled && p.requires_grad());
    const ForwardResult r = run_tasks(preds, weights, *in, compute_grad);
    const bool weighted = weights.has_value() && weights->defined();
    const auto& [total, losses, grad_scale, grads] = r;
    // Saved: grad_scale, weights, the gradients, then the losses (for the weights' gradient).
    std::vector<at::Tensor> saved{grad_scale, weighted ? *weights : at::Tensor()};
    saved.insert(saved.end(), grads.begin(), grads.end());
    saved.insert(saved.end(), losses.begin(), losses.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["weighted"] = weighted;
    ctx->saved_data["computed"] = compute_grad;  // which saved gradients are real (the others are empty tensors)
    ctx->set_materialize_grads(false);
    return outputs_of(r);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool weighted = ctx->saved_data["weighted"].toBool();
    const c10::List<bool> computed = ctx->saved_data["computed"].toBoolList();
    const variable_list saved = ctx->get_saved_variables();
    const size_t n = (saved.size() - 2) / 2;
    const at::Tensor& grad_scale = saved[0];
    const at::Tensor& weights = saved[1];
    const std::vector<at::Tensor> grads(saved.begin() + 2, saved.begin() + 2 + n);
    const std::vector<at::Tensor> losses(saved.begin() + 2 + n, saved.end());
    variable_list result(n + 3);  // preds..., weights, the TaskInputs pointer, grad_enabled
    const at::Tensor& g_total = grad_outputs[0];

    MaskList grad_losses;
    for (size_t t = 0; t < n; ++t)
      grad_losses.push_back(grad_outputs[1 + t].defined() ? std::optional<at::Tensor>(grad_outputs[1 + t])
                                                          : std::nullopt);
    std::vector<bool> active(n);
    bool any_active = false;
    for (size_t t = 0; t < n; ++t) {
      active[t] = ctx->needs_input_grad(t) && (g_total.defined() || grad_outputs[1 + t].defined()) && computed[t];
      any_active |= active[t];
    }
    if (any_active) {
      std::vector<at::Tensor> inputs;
      for (size_t t = 0; t < n; ++t) inputs.push_back(active[t] ? grads[t] : grads[t].new_empty({0}));
      const std::optional<at::Tensor> total_opt = g_total.defined() ? std::optional<at::Tensor>(g_total) : std::nullopt;
      const std::optional<at::Tensor> weights_opt = weighted ? std::optional<at::Tensor>(weights) : std::nullopt;
      std::vector<at::Tensor> scaled;
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // constants: no graph is recorded (see below)
      if (graph_released_after_backward(inputs)) {
        // The saved gradients die with the graph: scale them in place and hand them on (peak memory: one gradient
        // per task instead of two).
        call_backward_inplace(inputs, grad_scale, total_opt, weights_opt, grad_losses);
        scaled = inputs;
      } else {
        scaled = call_backward(inputs, grad_scale, total_opt, weights_opt, grad_losses);
      }
      for (size_t t = 0; t < n; ++t)
        if (active[t]) result[t] = scaled[t];
    }
    refuse_double_backward(result, n);
    if (weighted && g_total.defined() && ctx->needs_input_grad(n)) result[n] = g_total * at::stack(losses);
    return result;
  }
};

// Without autograd (inference mode, or below the Autograd key): losses only.
std::vector<at::Tensor> masked_multitask_loss_no_autograd(at::TensorList preds, at::TensorList targets,
                                                          const MaskList& masks, const std::vector<std::string>& kinds,
                                                          const std::vector<std::string>& names, int64_t ignore_index,
                                                          const std::optional<at::Tensor>& weights) {
  const TaskInputs in{targets, &masks, &kinds, &names, ignore_index};
  c10::List<bool> no_grad;
  for (size_t t = 0; t < preds.size(); ++t) no_grad.push_back(false);
  return outputs_of(run_tasks(preds, weights, in, no_grad));
}

std::vector<at::Tensor> masked_multitask_loss_autograd(at::TensorList preds, at::TensorList targets,
                                                       const MaskList& masks, const std::vector<std::string>& kinds,
                                                       const std::vector<std::string>& names, int64_t ignore_index,
                                                       const std::optional<at::Tensor>& weights) {
  const TaskInputs in{targets, &masks, &kinds, &names, ignore_index};
  return MaskedMultitaskLossFunction::apply(preds, weights, &in, at::GradMode::is_enabled());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("masked_multitask_loss", &masked_multitask_loss_no_autograd);
  m.impl("masked_multitask_loss_forward", &masked_multitask_loss_forward_cpu);
  m.impl("masked_multitask_loss_backward", &masked_multitask_loss_backward_cpu);
  m.impl("masked_multitask_loss_backward_", &masked_multitask_loss_backward_inplace_cpu);
}
TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) { m.impl("masked_multitask_loss", &masked_multitask_loss_no_autograd); }
TORCH_LIBRARY_IMPL(fastmtl, Autograd, m) { m.impl("masked_multitask_loss", &masked_multitask_loss_autograd); }

}  // namespace fastmtl
