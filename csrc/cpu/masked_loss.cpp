// masked_loss on the CPU: one task's masked mean loss and d loss / d pred, in one sweep over the logits.
//
// Two passes per call: a cheap count pass over (target, mask) gives the number of valid elements, so the main pass
// writes the gradient already divided by that count (no second pass over the gradient). Kinds:
//
//   ce   softmax cross entropy over dim 1. Logits [N, C] / channels_last [N, C, H, W] ("rows": C contiguous per
//        position) or NCHW-contiguous [N, C, *spatial] ("planes": a tile of positions x all C planes at a time, the
//        tile kept in cache). Per position: max over C, exp and sum (the exponentials kept in a float scratch
//        tile), then loss = max + log(sum) - x[target] and grad = (softmax - onehot) / count, all from cache.
//   bce  binary cross entropy with logits; l1; mse: fused elementwise.
//
// Validity: sample mask (bool [N], optional) AND element valid (ce: target != ignore_index and 0 <= target < C,
// bce/l1/mse: target not NaN). Out-of-range classes are skipped here; the Python layer raises for them on the CPU.
// float16 / bfloat16 / float32 use float32 math (float64 uses float64, for gradcheck). Reductions are
// deterministic: fixed-size work items, each with its own partial sum, combined in order.
// Arguments are validated in Python (fastmtl/ops/masked_loss.py).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace fastmtl {
namespace {

constexpr int64_t kElemBlock = 16384;  // elements per work item of the elementwise kinds and the count passes
constexpr int64_t kSumChunk = 512;     // float partial sums are folded into double every kSumChunk elements
constexpr int64_t kPlaneTile = 256;    // positions per work item of the NCHW cross entropy

// exp(x) for float, branch-free so that loops over it vectorise: 2^k * p(r) with x = k ln2 + r, |r| <= ln2 / 2,
// p a degree-7 Taylor polynomial (relative error < 2e-7). Inputs below -87 flush to ~0, above 88 saturate.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - k * 0.693145751953125f) - k * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float exp_acc(float x) { return fast_exp(x); }
inline double exp_acc(double x) { return std::exp(x); }

inline bool is_nan(float v) { return v != v; }
inline bool is_nan(double v) { return v != v; }

enum class Kind { CE, BCE, L1, MSE };

Kind parse_kind(const std::string& kind) {
  if (kind == "ce") return Kind::CE;
  if (kind == "bce") return Kind::BCE;
  if (kind == "l1") return Kind::L1;
  if (kind == "mse") return Kind::MSE;
  TORCH_CHECK(false, "masked_loss: kind must be one of ce, bce, l1, mse, got '", kind, "'");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs body(item) for item in [0, n_items) on the OpenMP pool (each item runs on exactly one thread).
template <typename F>
void for_items(int64_t n_items, const F& body) {
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) body(item);
  });
}

double sum_in_order(const std::vector<double>& partial) {
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

// Calls f(begin, end, n) for the pieces of [p0, p1) that lie in one sample each (inner elements per sample).
template <typename F>
void for_sample_segments(int64_t p0, int64_t p1, int64_t inner, const F& f) {
  int64_t n = p0 / inner;
  for (int64_t p = p0; p < p1; ++n) {
    const int64_t end = std::min(p1, (n + 1) * inner);
    f(p, end, n);
    p = end;
  }
}

// ---- count passes ----------------------------------------------------------------------------------------------

int64_t count_ce(const int64_t* tgt, const bool* mask, int64_t positions, int64_t per_sample, int64_t C,
                 int64_t ignore_index) {
  const int64_t items = ceil_div(positions, kElemBlock);
  std::vector<int64_t> partial(items, 0);
  for_items(items, [&](int64_t item) {
    int64_t count = 0;
    const int64_t p0 = item * kElemBlock, p1 = std::min(positions, p0 + kElemBlock);
    for_sample_segments(p0, p1, per_sample, [&](int64_t b, int64_t e, int64_t n) {
      if (mask && !mask[n]) return;
      for (int64_t p = b; p < e; ++p) {
        const int64_t t = tgt[p];
        count += (t != ignore_index && t >= 0 && t < C) ? 1 : 0;
      }
    });
    partial[item] = count;
  });
  int64_t total = 0;
  for (int64_t v : partial) total += v;
  return total;
}

template <typename target_t>
int64_t count_not_nan(const target_t* tgt, const bool* mask, int64_t numel, int64_t per_sample) {
  const int64_t items = ceil_div(numel, kElemBlock);
  std::vector<int64_t> partial(items, 0);
  for_items(items, [&](int64_t item) {
    int64_t count = 0;
    const int64_t p0 = item * kElemBlock, p1 = std::min(numel, p0 + kElemBlock);
    for_sample_segments(p0, p1, per_sample, [&](int64_t b, int64_t e, int64_t n) {
      if (mask && !mask[n]) return;
      for (int64_t p = b; p < e; ++p) count += is_nan(static_cast<float>(tgt[p])) ? 0 : 1;
    });
    partial[item] = count;
  });
  int64_t total = 0;
  for (int64_t v : partial) total += v;
  return total;
}

// ---- cross entropy ---------------------------------------------------------------------------------------------

struct CeArgs {
  const int64_t* tgt;
  const bool* mask;
  int64_t N, C, S;  // S = positions per sample (product of the spatial sizes, 1 for [N, C])
  int64_t ignore_index;
};

// C contiguous per position: [N, C] or channels_last [N, C, H, W] (position p = n * S + s at offset p * C).
template <typename scalar_t>
double ce_rows(const scalar_t* x, scalar_t* grad, const CeArgs& a, double inv_count) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = a.C, positions = a.N * a.S;
  const int64_t rows_per_item = std::max<int64_t>(1, kElemBlock / std::max<int64_t>(C, 1));
  const int64_t items = ceil_div(positions, rows_per_item);
  const acc_t inv = static_cast<acc_t>(inv_count);
  std::vector<double> partial(items, 0.0);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> e(C);
    for (int64_t item = begin; item < end; ++item) {
      double loss = 0.0;
      const int64_t p0 = item * rows_per_item, p1 = std::min(positions, p0 + rows_per_item);
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* row = x + p * C;
        const int64_t t = a.tgt[p];
        const bool valid = (!a.mask || a.mask[p / a.S]) && t != a.ignore_index && t >= 0 && t < C;
        if (!valid) {
          if (grad) std::fill(grad + p * C, grad + (p + 1) * C, scalar_t(0));
          continue;
        }
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t c = 0; c < C; ++c) m = std::max(m, static_cast<acc_t>(row[c]));
        acc_t d = 0;
#pragma omp simd reduction(+ : d)
        for (int64_t c = 0; c < C; ++c) {
          e[c] = exp_acc(static_cast<acc_t>(row[c]) - m);
          d += e[c];
        }
        loss += static_cast<double>(m) + std::log(static_cast<double>(d)) - static_cast<double>(row[t]);
        if (grad) {
          scalar_t* g = grad + p * C;
          const acc_t r = inv / d;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) g[c] = static_cast<scalar_t>(e[c] * r - (c == t ? inv : acc_t(0)));
        }
      }
      partial[item] = loss;
    }
  });
  return sum_in_order(partial);
}

// NCHW-contiguous [N, C, *spatial]: a work item is (n, a tile of kPlaneTile positions) across all C planes.
template <typename scalar_t>
double ce_planes(const scalar_t* x, scalar_t* grad, const CeArgs& a, double inv_count) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = a.C, S = a.S;
  const int64_t tiles = ceil_div(S, kPlaneTile);
  const int64_t items = a.N * tiles;
  const acc_t inv = static_cast<acc_t>(inv_count);
  std::vector<double> partial(items, 0.0);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> e(grad ? C * kPlaneTile : 0);  // exp(x - max) of the tile, reused for the gradient
    acc_t m[kPlaneTile], d[kPlaneTile], r[kPlaneTile];
    int32_t tc[kPlaneTile];
    bool ok[kPlaneTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles, s0 = (item % tiles) * kPlaneTile;
      const int64_t L = std::min(kPlaneTile, S - s0);
      const scalar_t* xb = x + n * C * S + s0;
      scalar_t* gb = grad ? grad + n * C * S + s0 : nullptr;
      const int64_t* tb = a.tgt + n * S + s0;
      if (a.mask && !a.mask[n]) {
        if (gb)
          for (int64_t c = 0; c < C; ++c) std::fill(gb + c * S, gb + c * S + L, scalar_t(0));
        partial[item] = 0.0;
        continue;
      }
      bool any = false;
      for (int64_t j = 0; j < L; ++j) {
        const int64_t t = tb[j];
        ok[j] = t != a.ignore_index && t >= 0 && t < C;
        tc[j] = ok[j] ? static_cast<int32_t>(t) : -1;
        any = any || ok[j];
        m[j] = -std::numeric_limits<acc_t>::infinity();
        d[j] = 0;
      }
      if (!any) {
        if (gb)
          for (int64_t c = 0; c < C; ++c) std::fill(gb + c * S, gb + c * S + L, scalar_t(0));
        partial[item] = 0.0;
        continue;
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* xr = xb + c * S;
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) m[j] = std::max(m[j], static_cast<acc_t>(xr[j]));
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* xr = xb + c * S;
        if (gb) {
          acc_t* er = e.data() + c * kPlaneTile;
#pragma omp simd
          for (int64_t j = 0; j < L; ++j) {
            er[j] = exp_acc(static_cast<acc_t>(xr[j]) - m[j]);
            d[j] += er[j];
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < L; ++j) d[j] += exp_acc(static_cast<acc_t>(xr[j]) - m[j]);
        }
      }
      double loss = 0.0;
      for (int64_t j = 0; j < L; ++j) {
        if (!ok[j]) continue;
        const double xt = static_cast<double>(xb[static_cast<int64_t>(tc[j]) * S + j]);
        loss += static_cast<double>(m[j]) + std::log(static_cast<double>(d[j])) - xt;
      }
      partial[item] = loss;
      if (!gb) continue;
      for (int64_t j = 0; j < L; ++j) r[j] = inv / d[j];
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* er = e.data() + c * kPlaneTile;
        scalar_t* gr = gb + c * S;
        const int32_t ci = static_cast<int32_t>(c);
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) {
          const acc_t g = er[j] * r[j] - (tc[j] == ci ? inv : acc_t(0));
          gr[j] = static_cast<scalar_t>(ok[j] ? g : acc_t(0));
        }
      }
    }
  });
  return sum_in_order(partial);
}

// ---- bce / l1 / mse --------------------------------------------------------------------------------------------

template <Kind kind, typename acc_t>
inline void elementwise_loss_grad(acc_t x, acc_t y, acc_t& loss, acc_t& dloss) {
  if constexpr (kind == Kind::L1) {
    const acc_t diff = x - y;
    loss = std::abs(diff);
    dloss = diff > 0 ? acc_t(1) : (diff < 0 ? acc_t(-1) : acc_t(0));
  } else if constexpr (kind == Kind::MSE) {
    const acc_t diff = x - y;
    loss = diff * diff;
    dloss = acc_t(2) * diff;
  } else {  // BCE with logits: max(x, 0) - x y + log(1 + exp(-|x|)); d/dx = sigmoid(x) - y
    const acc_t z = exp_acc(-std::abs(x));
    loss = std::max(x, acc_t(0)) - x * y + std::log1p(z);
    const acc_t sig = x >= 0 ? acc_t(1) / (acc_t(1) + z) : z / (acc_t(1) + z);
    dloss = sig - y;
  }
}

// pred, target (and grad) share one dense layout with the sample dimension outermost: sample n is the
// contiguous range [n * per_sample, (n + 1) * per_sample) of the storage.
template <Kind kind, typename scalar_t, typename target_t>
double elementwise(const scalar_t* x, const target_t* y, const bool* mask, scalar_t* grad, int64_t numel,
                   int64_t per_sample, double inv_count) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t items = ceil_div(numel, kElemBlock);
  const acc_t inv = static_cast<acc_t>(inv_count);
  std::vector<double> partial(items, 0.0);
  for_items(items, [&](int64_t item) {
    double loss = 0.0;
    const int64_t p0 = item * kElemBlock, p1 = std::min(numel, p0 + kElemBlock);
    for_sample_segments(p0, p1, per_sample, [&](int64_t b, int64_t e, int64_t n) {
      if (mask && !mask[n]) {
        if (grad) std::fill(grad + b, grad + e, scalar_t(0));
        return;
      }
      for (int64_t c0 = b; c0 < e; c0 += kSumChunk) {
        const int64_t c1 = std::min(e, c0 + kSumChunk);
        acc_t chunk = 0;
        if (grad) {
#pragma omp simd reduction(+ : chunk)
          for (int64_t i = c0; i < c1; ++i) {
            const acc_t yv = static_cast<acc_t>(y[i]);
            acc_t l, dl;
            elementwise_loss_grad<kind, acc_t>(static_cast<acc_t>(x[i]), yv, l, dl);
            const bool valid = !is_nan(yv);
            chunk += valid ? l : acc_t(0);
            grad[i] = static_cast<scalar_t>(valid ? dl * inv : acc_t(0));
          }
        } else {
#pragma omp simd reduction(+ : chunk)
          for (int64_t i = c0; i < c1; ++i) {
            const acc_t yv = static_cast<acc_t>(y[i]);
            acc_t l, dl;
            elementwise_loss_grad<kind, acc_t>(static_cast<acc_t>(x[i]), yv, l, dl);
            chunk += is_nan(yv) ? acc_t(0) : l;
          }
        }
        loss += static_cast<double>(chunk);
      }
    });
    partial[item] = loss;
  });
  return sum_in_order(partial);
}

// ---- op entry points -------------------------------------------------------------------------------------------

bool sample_outermost_dense(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  if (t.dim() == 0 || t.size(0) <= 1) return true;
  return t.stride(0) * t.size(0) == t.numel();
}

// C innermost, positions (n, *spatial) in row-major order after it: [N, C] contiguous or channels_last.
bool is_rows_layout(const at::Tensor& x) {
  if (x.dim() == 2) return x.is_contiguous();
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return true;
  int64_t spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) spatial *= x.size(d);
  return spatial == 1 && x.is_contiguous();
}

double run_ce(const at::Tensor& x, const at::Tensor& target, const bool* mask, at::Tensor* grad, int64_t ignore_index,
              int64_t& count) {
  const at::Tensor tgt = target.contiguous();
  CeArgs a{tgt.data_ptr<int64_t>(), mask, x.size(0), x.size(1), 1, ignore_index};
  for (int64_t d = 2; d < x.dim(); ++d) a.S *= x.size(d);
  count = count_ce(a.tgt, mask, a.N * a.S, a.S, a.C, ignore_index);
  const double inv = count > 0 ? 1.0 / static_cast<double>(count) : 0.0;
  const bool rows = is_rows_layout(x);
  double sum = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_loss_ce", [&] {
    scalar_t* g = grad ? grad->data_ptr<scalar_t>() : nullptr;
    sum = rows ? ce_rows<scalar_t>(x.const_data_ptr<scalar_t>(), g, a, inv)
               : ce_planes<scalar_t>(x.const_data_ptr<scalar_t>(), g, a, inv);
  });
  return sum;
}

template <typename scalar_t, typename target_t>
double run_elementwise_typed(Kind kind, const at::Tensor& x, const at::Tensor& y, const bool* mask, at::Tensor* grad,
                             int64_t& count) {
  const int64_t numel = x.numel();
  const int64_t per_sample = x.size(0) > 0 ? numel / x.size(0) : 1;
  const target_t* yp = y.const_data_ptr<target_t>();
  count = count_not_nan(yp, mask, numel, std::max<int64_t>(per_sample, 1));
  const double inv = count > 0 ? 1.0 / static_cast<double>(count) : 0.0;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* g = grad ? grad->data_ptr<scalar_t>() : nullptr;
  const int64_t ps = std::max<int64_t>(per_sample, 1);
  switch (kind) {
    case Kind::BCE: return elementwise<Kind::BCE>(xp, yp, mask, g, numel, ps, inv);
    case Kind::L1: return elementwise<Kind::L1>(xp, yp, mask, g, numel, ps, inv);
    default: return elementwise<Kind::MSE>(xp, yp, mask, g, numel, ps, inv);
  }
}

double run_elementwise(Kind kind, const at::Tensor& x, const at::Tensor& target, const bool* mask, at::Tensor* grad,
                       int64_t& count) {
  // Targets follow the pred's layout (a copy only when strides differ); float32 or the pred's own dtype.
  at::Tensor y = target;
  if (y.scalar_type() != x.scalar_type() && y.scalar_type() != at::kFloat) y = y.to(at::kFloat);
  if (y.strides() != x.strides()) y = at::empty_like(x, y.options()).copy_(target);
  double sum = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_loss_elementwise", [&] {
    if (y.scalar_type() == x.scalar_type()) {
      sum = run_elementwise_typed<scalar_t, scalar_t>(kind, x, y, mask, grad, count);
    } else {
      sum = run_elementwise_typed<scalar_t, float>(kind, x, y, mask, grad, count);
    }
  });
  return sum;
}

std::tuple<at::Tensor, at::Tensor> masked_loss_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                   const c10::optional<at::Tensor>& mask, c10::string_view kind_name,
                                                   int64_t ignore_index, bool compute_grad) {
  const Kind kind = parse_kind(std::string(kind_name));
  TORCH_CHECK(pred.dim() >= 1, "masked_loss: pred must have a sample dimension");
  // Kernels read one of the supported dense layouts; anything else is computed on a contiguous copy and the
  // gradient copied back into pred's layout.
  at::Tensor x = pred;
  if (kind == Kind::CE) {
    if (!is_rows_layout(x) && !x.is_contiguous()) x = x.contiguous();
  } else if (!sample_outermost_dense(x)) {
    x = x.contiguous();
  }
  at::Tensor mask_c;
  const bool* mask_p = nullptr;
  if (mask.has_value() && mask->defined()) {
    mask_c = mask->to(at::kBool).contiguous();
    mask_p = mask_c.const_data_ptr<bool>();
  }
  at::Tensor grad_work;
  if (compute_grad) grad_work = at::empty_like(x);
  int64_t count = 0;
  const double sum = kind == Kind::CE
                         ? run_ce(x, target, mask_p, compute_grad ? &grad_work : nullptr, ignore_index, count)
                         : run_elementwise(kind, x, target, mask_p, compute_grad ? &grad_work : nullptr, count);
  const auto loss_dtype = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({}, pred.options().dtype(loss_dtype));
  loss.fill_(count > 0 ? sum / static_cast<double>(count) : 0.0);
  if (!compute_grad) return {loss, at::empty({0}, pred.options())};
  at::Tensor grad = at::empty_like(pred);
  if (grad.strides() == grad_work.strides()) return {loss, grad_work};
  grad.copy_(grad_work);
  return {loss, grad};
}

template <typename scalar_t>
void scale_dense(const scalar_t* in, scalar_t* out, int64_t numel, float scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sc = static_cast<acc_t>(scale);
  at::parallel_for(0, numel, kElemBlock, [&](int64_t b, int64_t e) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) out[i] = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * sc);
  });
}

std::vector<at::Tensor> masked_loss_scale_grads_cpu(at::TensorList grads, const at::Tensor& scales) {
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == static_cast<int64_t>(grads.size()),
              "masked_loss_scale_grads: scales must have shape [", grads.size(), "], got ", scales.sizes());
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  const float* sp = s.const_data_ptr<float>();
  std::vector<at::Tensor> out;
  out.reserve(grads.size());
  for (size_t t = 0; t < grads.size(); ++t) {
    // empty_like keeps a dense gradient's strides, so the scaling is one linear pass over the storage.
    at::Tensor o = at::empty_like(grads[t]);
    const bool dense = grads[t].is_non_overlapping_and_dense() && o.strides() == grads[t].strides();
    const at::Tensor g = dense ? grads[t] : grads[t].contiguous();
    at::Tensor work = dense ? o : at::empty_like(g);
    const float scale = sp[t];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "masked_loss_scale_grads", [&] {
      scale_dense(g.const_data_ptr<scalar_t>(), work.data_ptr<scalar_t>(), g.numel(), scale);
    });
    if (!dense) o.copy_(work);
    out.push_back(o);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("masked_loss", &masked_loss_cpu);
  m.impl("masked_loss_scale_grads", &masked_loss_scale_grads_cpu);
}

}  // namespace fastmtl
