// Operator schemas of the `fastmtl` namespace, and the Python module that loads them.
//
// Only schemas live here. Each kernel file registers its own implementation with TORCH_LIBRARY_IMPL
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*_aten.cpp for CUDA, csrc/autograd.cpp for autograd); fake (meta)
// implementations are registered in Python (fastmtl/ops/*.py). Importing fastmtl._C runs these registrations;
// the module itself exports nothing, so pybind11 is not needed and the file compiles in seconds.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastmtl, m) {
  // ---- conv_bias_relu: y = relu(conv2d(x, weight, bias)) -------------------------------------------------
  // algo: "default" (oneDNN's fused kernel on CPU, "library" on CUDA), "library" (vendor convolution + our
  //       fused epilogue), "implicit_gemm" (our own convolution kernel, CUDA only; measured slower than cuDNN,
  //       so never the default).
  m.def(
      "conv_bias_relu(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, str algo) -> Tensor");
  // Gradients from grad_y and the saved output y (y > 0 is the ReLU mask). output_mask selects
  // (grad_x, grad_weight, grad_bias); an output that is not asked for comes back as an empty tensor.
  m.def(
      "conv_bias_relu_backward(Tensor grad_y, Tensor y, Tensor x, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool[3] output_mask, str algo) -> (Tensor, Tensor, Tensor)");
  // The fused backward epilogue alone: grad_z = grad_y * (y > 0) and grad_bias = sum of grad_z over N, H, W
  // (float32 accumulation, returned in y's dtype; empty when compute_bias_grad is false).
  m.def("relu_bias_grad(Tensor grad_y, Tensor y, bool compute_bias_grad) -> (Tensor, Tensor)");

  // ---- masked_loss: one task's masked mean loss and its gradient, in one pass ---------------------------
  // kind in {"ce", "bce", "l1", "mse"}. Returns (loss, grad): loss is the float32 0-dim mean of the element
  // losses over valid elements (0 when there is none), grad = d loss / d pred in pred's dtype (an empty
  // tensor when compute_grad is false).
  m.def(
      "masked_loss(Tensor pred, Tensor target, Tensor? mask, str kind, int ignore_index, bool compute_grad) "
      "-> (Tensor, Tensor)");
  // Backward of a set of tasks in one launch: out[t] = grads[t] * scales[t] (scales: float32 [T] on device).
  m.def("masked_loss_scale_grads(Tensor[] grads, Tensor scales) -> Tensor[]");
  // The same in place: grads[t] *= scales[t]. Used by the backward when autograd will not keep the graph (the
  // saved gradients die with it anyway), so the backward allocates nothing of the gradients' size.
  m.def("masked_loss_scale_grads_(Tensor(a!)[] grads, Tensor scales) -> ()");
  // All tasks of fastmtl.masked_multitask_loss in one call (its autograd in C++, csrc/masked_multitask_loss.cpp):
  // returns [total, loss_0, ..., loss_{T-1}], total = sum_t weights[t] * loss_t (weights: [T] or None = all 1).
  // names are the task names, for error messages. On the CPU a ce class index outside [0, C) other than
  // ignore_index raises ValueError before any task runs.
  m.def(
      "masked_multitask_loss(Tensor[] preds, Tensor[] targets, Tensor?[] masks, str[] kinds, str[] names, "
      "int ignore_index, Tensor? weights) -> Tensor[]");
  // Its forward, as the C++ autograd calls it: (total, losses, grad_scale, grads) where grads[t] * grad_scale[t]
  // = d loss_t / d pred_t (grads[t] empty where compute_grad[t] is false; an empty grad_scale means every factor
  // is 1, what the CPU's per-task masked_loss returns; CUDA returns [T] factors from its chain of one loss kernel
  // per task, csrc/cuda/masked_loss.h). weights: float32 [T] or None.
  m.def(
      "masked_multitask_loss_forward(Tensor[] preds, Tensor[] targets, Tensor?[] masks, str[] kinds, "
      "int ignore_index, Tensor? weights, bool[] compute_grad) -> (Tensor, Tensor[], Tensor, Tensor[])");
  // Its backward: out[t] = grads[t] * (grad_total * weights[t] + grad_losses[t]) * grad_scale[t] (absent
  // grad_total / grad_losses[t] count as 0, absent weights and an empty grad_scale as 1; an empty grads[t] gives an
  // empty out[t]). CUDA computes the scales inside the one scaling kernel, whose blocks skip a scale of exactly 1
  // in place. The in-place form scales grads themselves.
  m.def(
      "masked_multitask_loss_backward(Tensor[] grads, Tensor grad_scale, Tensor? grad_total, Tensor? weights, "
      "Tensor?[] grad_losses) -> Tensor[]");
  m.def(
      "masked_multitask_loss_backward_(Tensor(a!)[] grads, Tensor grad_scale, Tensor? grad_total, Tensor? weights, "
      "Tensor?[] grad_losses) -> ()");
}

static struct PyModuleDef fastmtl_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastmtl_C_module); }
