// Calls of the per-task masked-loss ops through the dispatcher, for the C++ code built on them (the autograd of
// fastmtl::masked_loss in autograd.cpp, the grouped op in masked_multitask_loss.cpp). Each looks its op up once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastmtl {

inline std::tuple<at::Tensor, at::Tensor> call_masked_loss(const at::Tensor& pred, const at::Tensor& target,
                                                           const std::optional<at::Tensor>& mask,
                                                           c10::string_view kind, int64_t ignore_index,
                                                           bool compute_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastmtl::masked_loss", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const std::optional<at::Tensor>&,
                                                                       c10::string_view, int64_t, bool)>();
  return op.call(pred, target, mask, kind, ignore_index, compute_grad);
}

inline std::vector<at::Tensor> call_scale_grads(at::TensorList grads, const at::Tensor& scales) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastmtl::masked_loss_scale_grads", "")
                             .typed<std::vector<at::Tensor>(at::TensorList, const at::Tensor&)>();
  return op.call(grads, scales);
}

inline void call_scale_grads_inplace(at::TensorList grads, const at::Tensor& scales) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastmtl::masked_loss_scale_grads_", "")
                             .typed<void(at::TensorList, const at::Tensor&)>();
  op.call(grads, scales);
}

}  // namespace fastmtl
