// The bce / l1 / mse tile of the masked loss: one block's share of a task over flat storage, run as a block of
// elementwise_kernel (csrc/cuda/masked_loss.cu) or inside a loss tile of the grouped forward (masked_loss_grouped.cu).
#pragma once

#include <cmath>
#include <cstdint>

#include "masked_loss.h"
#include "masked_loss_reduce.cuh"
#include "numeric.cuh"

namespace fastmtl {
namespace cuda {

constexpr int kElementwiseItems = 2;  // vectors per thread in elementwise_tile

template <int KIND>
__device__ __forceinline__ void element_loss(float p, float t, float& loss, float& grad) {
  if (KIND == static_cast<int>(ElementwiseKind::kBCE)) {
    const float e = expf(-fabsf(p));
    loss = fmaxf(p, 0.0f) - p * t + log1pf(e);
    grad = (p >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e)) - t;
  } else if (KIND == static_cast<int>(ElementwiseKind::kL1)) {
    const float d = p - t;
    loss = fabsf(d);
    grad = d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f);
  } else {
    const float d = p - t;
    loss = d * d;
    grad = 2.0f * d;
  }
}

// The factor a gradient is stored with when it cannot be divided by the count yet (or, float16, at all): mse's 2(p - t)
// is halved, so that it cannot overflow.
template <int KIND>
__host__ __device__ constexpr float stored_factor() {
  return KIND == static_cast<int>(ElementwiseKind::kMSE) ? 0.5f : 1.0f;
}

template <int KIND, typename P, typename T, int VEC>
__device__ __forceinline__ void elementwise_tile(const P* __restrict__ pred, const T* __restrict__ target,
                                                 const bool* __restrict__ mask, P* __restrict__ grad, int64_t total,
                                                 int64_t M, int64_t tile, float gi, float& acc, int& valid) {
  const int64_t block_base = tile * (kThreads * VEC * kElementwiseItems);
#pragma unroll
  for (int item = 0; item < kElementwiseItems; ++item) {
    const int64_t base = block_base + (static_cast<int64_t>(item) * kThreads + threadIdx.x) * VEC;
    if (base >= total) break;
    const bool full = base + VEC <= total;
    bool ok[VEC];
    bool any = false;
    if (mask != nullptr && M % VEC == 0) {  // the vector lies in one sample: one mask read
      const bool lab = mask[div_index(base, M)];
#pragma unroll
      for (int e = 0; e < VEC; ++e) ok[e] = lab && base + e < total;
      any = lab;
    } else if (mask != nullptr) {
      const int64_t n0 = div_index(base, M);
      const int64_t next = (n0 + 1) * M;  // a vector spans at most two samples when M >= VEC
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t n = M >= VEC ? n0 + (base + e >= next ? 1 : 0) : div_index(base + e, M);
        ok[e] = base + e < total && mask[n];
        any |= ok[e];
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) ok[e] = base + e < total;
      any = true;
    }
    float p[VEC], t[VEC];
    if (any && VEC > 1 && full) {  // unlabelled samples are not read at all
      const Pack<P, VEC> pp = load_pack<P, VEC>(pred + base);
      const Pack<T, VEC> tp = load_pack<T, VEC>(target + base);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        p[e] = to_acc(pp.v[e]);
        t[e] = to_acc(tp.v[e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        p[e] = ok[e] ? to_acc(pred[base + e]) : 0.0f;
        t[e] = ok[e] ? to_acc(target[base + e]) : 0.0f;
      }
    }
    Pack<P, VEC> gp;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const bool ok_e = ok[e] && !isnan(t[e]);
      float el = 0.0f, ge = 0.0f;
      element_loss<KIND>(p[e], t[e], el, ge);
      acc += ok_e ? el : 0.0f;
      valid += ok_e ? 1 : 0;
      gp.v[e] = from_float<P>(ok_e ? ge * gi : 0.0f);
    }
    if (grad != nullptr) {
      if (VEC > 1 && full) {
        store_pack(grad + base, gp);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (base + e < total) grad[base + e] = gp.v[e];
      }
    }
  }
}

}  // namespace cuda
}  // namespace fastmtl
