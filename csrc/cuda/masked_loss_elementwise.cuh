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

// For each of ITEMS vectors of VEC elements (item k from base[k]): which elements are in range (< total) and belong to
// a labelled sample, into ok[k], and whether any does, into any[k]. Where a vector lies in one sample (M % VEC == 0,
// the common case), the mask reads of all items come before any test, so that they are in flight together; else each
// element's sample is looked up in turn.
template <int VEC, int ITEMS>
__device__ __forceinline__ void labelled_elements(const bool* __restrict__ mask, const int64_t (&base)[ITEMS],
                                                  int64_t total, int64_t M, bool (&ok)[ITEMS][VEC],
                                                  bool (&any)[ITEMS]) {
  if (mask != nullptr && M % VEC == 0) {  // a vector lies in one sample: one mask read
    bool labelled[ITEMS];
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) labelled[k] = base[k] < total && mask[div_index(base[k], M)];
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      any[k] = labelled[k];
#pragma unroll
      for (int e = 0; e < VEC; ++e) ok[k][e] = labelled[k] && base[k] + e < total;
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    any[k] = false;
    if (mask == nullptr) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) ok[k][e] = base[k] + e < total;
      any[k] = base[k] < total;
    } else if (base[k] >= total) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) ok[k][e] = false;
    } else {  // a vector may span samples (at most two when M >= VEC)
      const int64_t n0 = div_index(base[k], M);
      const int64_t next = (n0 + 1) * M;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t n = M >= VEC ? n0 + (base[k] + e >= next ? 1 : 0) : div_index(base[k] + e, M);
        ok[k][e] = base[k] + e < total && mask[n];
        any[k] |= ok[k][e];
      }
    }
  }
}

// kElementwiseItems vectors of VEC elements per thread. Every item is loaded before any is computed, so that a
// thread's loads are in flight together (its mask reads, then the loads they gate): one item after the other, each
// waited a full memory latency (the H100 profile of 2026-11-27 had these tiles stalled on their loads, long
// scoreboard, for 28% of the grouped forward's samples while moving 14% of its bytes). Unlabelled samples are not
// read.
template <int KIND, typename P, typename T, int VEC>
__device__ __forceinline__ void elementwise_tile(const P* __restrict__ pred, const T* __restrict__ target,
                                                 const bool* __restrict__ mask, P* __restrict__ grad, int64_t total,
                                                 int64_t M, int64_t tile, float gi, float& acc, int& valid) {
  constexpr int kItems = kElementwiseItems;
  const int64_t block_base = tile * (kThreads * VEC * kItems);
  int64_t base[kItems];
#pragma unroll
  for (int item = 0; item < kItems; ++item)
    base[item] = block_base + (static_cast<int64_t>(item) * kThreads + threadIdx.x) * VEC;
  bool ok[kItems][VEC];
  bool any[kItems];
  labelled_elements<VEC, kItems>(mask, base, total, M, ok, any);
  Loaded<P, VEC> pv[kItems];
  Loaded<T, VEC> tv[kItems];
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    if (any[item] && VEC > 1 && base[item] + VEC <= total) {
      pv[item] = load_vector<P, VEC>(pred + base[item]);
      tv[item] = load_vector<T, VEC>(target + base[item]);
    } else {
      pv[item] = load_elements<P, VEC>(pred + base[item], ok[item]);
      tv[item] = load_elements<T, VEC>(target + base[item], ok[item]);
    }
  }
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    if (base[item] >= total) break;  // and every later item
    float g[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float p = loaded_elem(pv[item], e), t = loaded_elem(tv[item], e);
      const bool ok_e = ok[item][e] && !isnan(t);
      float el = 0.0f, ge = 0.0f;
      element_loss<KIND>(p, t, el, ge);
      acc += ok_e ? el : 0.0f;
      valid += ok_e ? 1 : 0;
      g[e] = ok_e ? ge * gi : 0.0f;
    }
    if (grad != nullptr)
      store_elements<P, VEC>(grad + base[item], g, VEC > 1 && base[item] + VEC <= total, total - base[item]);
  }
}

}  // namespace cuda
}  // namespace fastmtl
