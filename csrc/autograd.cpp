// Autograd kernels of the native ops (the Autograd dispatch key), written in C++ so that a call from Python costs
// one dispatcher round trip instead of torch.library's Python autograd wrapper (about 70 us per call measured on
// this project's CPU machine, more than the kernels themselves at small shapes).
//
// Each forward re-enters the dispatcher below autograd, so the CPU and CUDA kernels (and, under torch.compile, the
// fake implementations registered in Python) do the work. Gradients are not materialised: an output nobody
// back-propagates into arrives undefined and its backward is skipped (gradient-level weighting takes one
// torch.autograd.grad per task through shared nodes and relies on this).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "masked_loss_calls.h"

namespace fastmtl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- conv_bias_relu ------------------------------------------------------------------------------------------

at::Tensor call_conv_bias_relu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                               int64_t groups, c10::string_view algo) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmtl::conv_bias_relu", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::IntArrayRef,
                            c10::IntArrayRef, c10::IntArrayRef, int64_t, c10::string_view)>();
  return op.call(x, weight, bias, stride, padding, dilation, groups, algo);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_conv_bias_relu_backward(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, c10::string_view algo) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastmtl::conv_bias_relu_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t, std::array<bool, 3>,
                                 c10::string_view)>();
  return op.call(grad_y, y, x, weight, stride, padding, dilation, groups, output_mask, algo);
}

// Saves x, weight and the output y (y > 0 is the ReLU mask); the pre-activation is never kept.
struct ConvBiasReluFunction : public torch::autograd::Function<ConvBiasReluFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
                            c10::IntArrayRef dilation, int64_t groups, c10::string_view algo) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      y = call_conv_bias_relu(x, weight, bias, stride, padding, dilation, groups, algo);
    }
    ctx->save_for_backward({x, weight, y});
    ctx->set_materialize_grads(false);
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["algo"] = std::string(algo);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(8);  // x, weight, bias, stride, padding, dilation, groups, algo
    const at::Tensor& grad_y = grad_outputs[0];
    if (!grad_y.defined()) return grads;
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the tensor inputs that were given: x, weight, then bias if present.
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2)};
    if (!mask[0] && !mask[1] && !mask[2]) return grads;
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const std::string algo = ctx->saved_data["algo"].toStringRef();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    at::Tensor grad_x, grad_w, grad_b;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: the gradients from PyTorch's differentiable ops, so that they can be differentiated again
      // (fastmtl.reference.conv_bias_relu_backward does the same for the triton backend).
      const at::Tensor grad_z = at::threshold_backward(grad_y, saved[2], 0);
      const at::OptionalIntArrayRef bias_sizes =
          mask[2] ? at::OptionalIntArrayRef(saved[1].sizes().slice(0, 1)) : at::OptionalIntArrayRef();
      std::tie(grad_x, grad_w, grad_b) = at::convolution_backward(grad_z, saved[0], saved[1], bias_sizes, stride,
                                                                  padding, dilation, false, {0, 0}, groups, mask);
    } else {
      std::tie(grad_x, grad_w, grad_b) = call_conv_bias_relu_backward(grad_y, saved[2], saved[0], saved[1], stride,
                                                                      padding, dilation, groups, mask, algo);
    }
    if (mask[0]) grads[0] = grad_x;
    if (mask[1]) grads[1] = grad_w;
    if (mask[2]) grads[2] = grad_b;
    return grads;
  }
};

at::Tensor conv_bias_relu_autograd(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                   c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                   c10::string_view algo) {
  return ConvBiasReluFunction::apply(x, weight, bias, stride, padding, dilation, groups, algo);
}

// ---- masked_loss ---------------------------------------------------------------------------------------------

// The gradient d loss / d pred is computed in the forward and saved; the backward scales it by the upstream
// gradient (one launch, on the device: no host synchronisation). The returned gradient output is a constant.
struct MaskedLossFunction : public torch::autograd::Function<MaskedLossFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& target,
                               const std::optional<at::Tensor>& mask, c10::string_view kind, int64_t ignore_index,
                               bool compute_grad) {
    at::Tensor loss, grad;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, grad) = call_masked_loss(pred, target, mask, kind, ignore_index, compute_grad);
    }
    ctx->save_for_backward({grad});
    ctx->saved_data["compute_grad"] = compute_grad;
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({grad});
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(6);  // pred, target, mask, kind, ignore_index, compute_grad
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return grads;
    TORCH_CHECK(ctx->saved_data["compute_grad"].toBool(),
                "fastmtl::masked_loss was called with compute_grad=False: it has no gradient to return");
    const at::Tensor grad = ctx->get_saved_variables()[0];
    grads[0] = call_scale_grads({grad}, grad_loss.reshape({1}).to(at::kFloat))[0];
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor> masked_loss_autograd(const at::Tensor& pred, const at::Tensor& target,
                                                        const std::optional<at::Tensor>& mask, c10::string_view kind,
                                                        int64_t ignore_index, bool compute_grad) {
  auto outputs = MaskedLossFunction::apply(pred, target, mask, kind, ignore_index, compute_grad);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, Autograd, m) {
  m.impl("conv_bias_relu", &conv_bias_relu_autograd);
  m.impl("masked_loss", &masked_loss_autograd);
}

}  // namespace fastmtl
