// Cross-entropy tiles of the masked loss: one block's share of a task, run as a block of a per-task kernel
// (csrc/cuda/masked_loss.cu) or inside a loss tile of the grouped forward (masked_loss_grouped.cu).
//   ce_pixel_tile      one thread per pixel, loop over C (NCHW: coalesced along the pixels); up to 16 logits cached
//                      in registers, else an online softmax and a re-read
//   ce_pixel_vec_tile  NCHW with contiguous pixels and C <= 16 (a constant): PIX pixels per thread, so each class
//                      plane is read and written in 4- to 16-byte vectors
//   ce_rows_tile       TPR threads per row when C is contiguous ([N, C], channels_last); per-lane online softmax
//                      merged with shuffles
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "masked_loss.h"
#include "masked_loss_reduce.cuh"
#include "numeric.cuh"

namespace fastmtl {
namespace cuda {

constexpr int kPixelVec = 4;       // neighbouring pixels per thread in ce_pixel_vec_kernel
constexpr int kGroupPixelVec = 2;  // the same in the grouped forward (its registers: 80 at 3 blocks per SM)

struct CeRow {
  int64_t t;
  bool ok;
};

__device__ __forceinline__ CeRow load_ce_row(const int64_t* __restrict__ target, const bool* __restrict__ mask,
                                             const CeGeometry& g, int64_t n, int64_t s, int64_t ignore_index) {
  CeRow row{0, false};
  if (mask != nullptr && !mask[n * g.m_sn + s * g.m_ss]) return row;  // an unlabelled sample's target is not read
  row.t = target[n * g.t_sn + s * g.t_ss];
  row.ok = row.t != ignore_index && row.t >= 0 && row.t < g.C;  // out-of-range classes are skipped, never read
  return row;
}

// The tile functions below are one block's share of a task (a kernel block, or a tile of the grouped forward): they
// add the thread's element losses to row_loss and its valid elements to valid, and write the gradient times gi.

// One thread per pixel, loop over C; up to CREG logits cached in registers.
template <typename P, int CREG>
__device__ __forceinline__ void ce_pixel_tile(const P* __restrict__ pred, const int64_t* __restrict__ target,
                                              const bool* __restrict__ mask, P* __restrict__ grad, const CeGeometry& g,
                                              int64_t ignore_index, int64_t s_blocks, int64_t tile, float gi,
                                              float& row_loss, int& valid) {
  const int64_t n = tile / s_blocks;
  const int64_t s = (tile - n * s_blocks) * kThreads + threadIdx.x;
  if (s < g.S) {
    const CeRow row = load_ce_row(target, mask, g, n, s, ignore_index);
    valid += row.ok ? 1 : 0;
    const P* x = pred + n * g.p_sn + s * g.p_ss;
    P* gx = grad != nullptr ? grad + n * g.g_sn + s * g.g_ss : nullptr;
    if (!row.ok) {
      if (gx != nullptr)
        for (int64_t c = 0; c < g.C; ++c) gx[c * g.g_sc] = from_float<P>(0.0f);
    } else if (CREG > 0 && g.C <= CREG) {  // logits stay in registers: one read
      float v[CREG > 0 ? CREG : 1];
      float m = -INFINITY, xt = 0.0f;
#pragma unroll
      for (int c = 0; c < CREG; ++c) {
        v[c] = c < g.C ? to_acc(x[c * g.p_sc]) : -INFINITY;
        m = fmaxf(m, v[c]);
        if (c == row.t) xt = v[c];
      }
      float l = 0.0f;
#pragma unroll
      for (int c = 0; c < CREG; ++c) {
        v[c] = exp_diff(v[c], m);
        l += v[c];
      }
      row_loss += (m - xt) + fast_log(l);
      if (gx != nullptr) {
        const float scale = gi * fast_rcp(l);
#pragma unroll
        for (int c = 0; c < CREG; ++c)
          if (c < g.C) gx[c * g.g_sc] = from_float<P>(v[c] * scale - (c == row.t ? gi : 0.0f));
      }
    } else {  // online softmax, then a second read (from cache) for the gradient
      float m = -INFINITY, l = 0.0f;
      for (int64_t c = 0; c < g.C; ++c) {
        const float xv = to_acc(x[c * g.p_sc]);
        if (xv > m) {
          l = l * exp_diff(m, xv) + 1.0f;
          m = xv;
        } else {
          l += exp_diff(xv, m);
        }
      }
      row_loss += (m - to_acc(x[row.t * g.p_sc])) + fast_log(l);
      if (gx != nullptr) {
        const float scale = gi * fast_rcp(l);
        for (int64_t c = 0; c < g.C; ++c)
          gx[c * g.g_sc] = from_float<P>(exp_diff(to_acc(x[c * g.p_sc]), m) * scale - (c == row.t ? gi : 0.0f));
      }
    }
  }
}

// f(std::integral_constant<int, C>{}) for a runtime class count 1 <= C <= 16 (one switch), so that a tile can take C
// as a constant. Called from host code (the per-task launcher) and device code (the grouped forward) with lambdas of
// the caller's side only, hence the check disabled.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename F>
__host__ __device__ __forceinline__ void with_classes(int64_t C, F&& f) {
#define FASTMTL_CLASSES_CASE(c) \
  case c:                       \
    f(std::integral_constant<int, c>{}); \
    break;
  switch (C) {
    FASTMTL_CLASSES_CASE(1)
    FASTMTL_CLASSES_CASE(2)
    FASTMTL_CLASSES_CASE(3)
    FASTMTL_CLASSES_CASE(4)
    FASTMTL_CLASSES_CASE(5)
    FASTMTL_CLASSES_CASE(6)
    FASTMTL_CLASSES_CASE(7)
    FASTMTL_CLASSES_CASE(8)
    FASTMTL_CLASSES_CASE(9)
    FASTMTL_CLASSES_CASE(10)
    FASTMTL_CLASSES_CASE(11)
    FASTMTL_CLASSES_CASE(12)
    FASTMTL_CLASSES_CASE(13)
    FASTMTL_CLASSES_CASE(14)
    FASTMTL_CLASSES_CASE(15)
    FASTMTL_CLASSES_CASE(16)
    default:
      break;
  }
#undef FASTMTL_CLASSES_CASE
}
constexpr int kMaxPixelVecClasses = 16;

// NCHW logits with contiguous pixels (p_ss == g_ss == 1) and C = g.C classes, a constant (with_classes): PIX
// neighbouring pixels per thread, so every load and store of a class plane moves PIX elements at once. The launcher
// checks that S and the sample and class strides are multiples of PIX, that pred and grad are aligned to PIX elements
// and that C * stride * sizeof(P) fits in 32 bits (pixel_vec_ok).
// Written for the instruction count: the NYUv2-like batch has 11.5M 13-class logits, and the op is meant to
// run near memory bandwidth. C as a constant leaves no test per class (a runtime C cost two or three instructions per
// class and pass, and put the logits in local memory); class planes are addressed by 32-bit byte offsets. The logits
// stay in registers as raw words of their own dtype; their max is taken in it (exact; two 16-bit elements per
// instruction); each exponential is computed once (ex2, exp_diff) and kept as a float for the gradient. The target
// class is handled apart rather than with a compare and select per class: its logit is read again (an L1 hit: the
// thread just loaded it), and its gradient element, stored after its class plane's, overwrites it (same thread, same
// address: in order). (Before all this: ~700 instructions per thread and 2 pixels, H100 SASS counters, 2026-11-27.)
// The logits' loads depend on the sample mask only, not on the targets: both are in flight together (an unlabelled
// sample reads neither; a labelled pixel whose target is ignored is read anyway).
template <typename P, int C, int PIX>
__device__ __forceinline__ void ce_pixel_vec_tile(const P* __restrict__ pred, const int64_t* __restrict__ target,
                                                  const bool* __restrict__ mask, P* __restrict__ grad,
                                                  const CeGeometry& g, int64_t ignore_index, int64_t s_blocks,
                                                  int64_t tile, float gi, float& row_loss, int& valid) {
  using W = Words<P, PIX>;
  const int64_t n = tile / s_blocks;
  const int64_t s0 = ((tile - n * s_blocks) * kThreads + threadIdx.x) * PIX;
  if (s0 >= g.S) return;
  const uint32_t ps = static_cast<uint32_t>(g.p_sc * sizeof(P)), gs = static_cast<uint32_t>(g.g_sc * sizeof(P));
  bool labelled[PIX];
  bool any = false;
#pragma unroll
  for (int j = 0; j < PIX; ++j) {
    labelled[j] = mask == nullptr || mask[n * g.m_sn + (s0 + j) * g.m_ss];
    any |= labelled[j];
  }
  char* gx = grad != nullptr ? reinterpret_cast<char*>(grad + n * g.g_sn + s0) : nullptr;
  if (!any) {  // an unlabelled sample: neither logits nor targets are read
    if (gx != nullptr) {
      W zero;
#pragma unroll
      for (int k = 0; k < W::kNum; ++k) zero.w[k] = 0u;  // +0.0 in every dtype
#pragma unroll
      for (int c = 0; c < C; ++c) store_words(reinterpret_cast<P*>(gx + c * gs), zero);
    }
    return;
  }
  int64_t t[PIX];
#pragma unroll
  for (int j = 0; j < PIX; ++j) t[j] = labelled[j] ? target[n * g.t_sn + (s0 + j) * g.t_ss] : ignore_index;
  const char* x = reinterpret_cast<const char*>(pred + n * g.p_sn + s0);
  W pk[C];
#pragma unroll
  for (int c = 0; c < C; ++c) pk[c] = load_words<P, PIX>(reinterpret_cast<const P*>(x + c * ps));
  int cls[PIX];  // the pixel's class, or -1 where it has no valid label (out-of-range classes are skipped)
  bool all_valid = true;
#pragma unroll
  for (int j = 0; j < PIX; ++j) {
    const bool ok = labelled[j] && static_cast<uint64_t>(t[j]) < static_cast<uint64_t>(C) && t[j] != ignore_index;
    cls[j] = ok ? static_cast<int>(t[j]) : -1;
    valid += ok ? 1 : 0;
    all_valid &= ok;
  }
  W mx = pk[0];
#pragma unroll
  for (int c = 1; c < C; ++c) mx = words_max(mx, pk[c]);
  float xt[PIX], m[PIX], l[PIX];
#pragma unroll
  for (int j = 0; j < PIX; ++j) {
    xt[j] = cls[j] >= 0 ? to_acc(*reinterpret_cast<const P*>(x + cls[j] * ps + j * sizeof(P))) : 0.0f;
    m[j] = word_elem(mx, j);
    l[j] = 0.0f;
  }
  float e[C][PIX];
#pragma unroll
  for (int c = 0; c < C; ++c) {
#pragma unroll
    for (int j = 0; j < PIX; ++j) {
      e[c][j] = exp_diff(word_elem(pk[c], j), m[j]);
      l[j] += e[c][j];
    }
  }
#pragma unroll
  for (int j = 0; j < PIX; ++j)
    if (cls[j] >= 0) row_loss += (m[j] - xt[j]) + fast_log(l[j]);
  if (gx == nullptr) return;
  float scale[PIX];
#pragma unroll
  for (int j = 0; j < PIX; ++j) scale[j] = cls[j] >= 0 ? gi * fast_rcp(l[j]) : 0.0f;
  // A pixel without a valid label gets +0.0 (all bits clear) whatever its logits: its bits are masked out of the
  // rounded words, one AND per word rather than a select per element.
  W keep;
#pragma unroll
  for (int k = 0; k < W::kNum; ++k) keep.w[k] = ~0u;
  if (!all_valid) {
    constexpr int kPerWord = 4 / static_cast<int>(sizeof(P));
#pragma unroll
    for (int j = 0; j < PIX; ++j)
      if (cls[j] < 0) keep.w[j / kPerWord] &= ~(((1ull << (8 * sizeof(P))) - 1) << (8 * sizeof(P) * (j % kPerWord)));
  }
#pragma unroll
  for (int c = 0; c < C; ++c) {
    float out[PIX];
#pragma unroll
    for (int j = 0; j < PIX; ++j) out[j] = e[c][j] * scale[j];
    W w = words_from_floats<P, PIX>(out);
#pragma unroll
    for (int k = 0; k < W::kNum; ++k) w.w[k] &= keep.w[k];
    store_words(reinterpret_cast<P*>(gx + c * gs), w);
  }
#pragma unroll
  for (int j = 0; j < PIX; ++j) {
    if (cls[j] >= 0) {
      Pack<P, 1> one;
      one.v[0] = from_float<P>(exp_diff(xt[j], m[j]) * scale[j] - gi);
      store_pack(reinterpret_cast<P*>(gx + cls[j] * gs + j * sizeof(P)), one);
    }
  }
}

// TPR threads per row of C contiguous logits (p_sc == 1); VPL > 0 caches VPL logits per lane (C <= TPR * VPL).
template <typename P, int TPR, int VPL>
__device__ __forceinline__ void ce_rows_tile(const P* __restrict__ pred, const int64_t* __restrict__ target,
                                             const bool* __restrict__ mask, P* __restrict__ grad, const CeGeometry& g,
                                             int64_t ignore_index, int64_t s_blocks, int64_t tile, float gi,
                                             float& row_loss, int& valid) {
  constexpr int kRows = kThreads / TPR;
  const int lane = threadIdx.x % TPR;
  const int64_t n = tile / s_blocks;
  const int64_t s = (tile - n * s_blocks) * kRows + threadIdx.x / TPR;
  const bool in_range = s < g.S;
  CeRow row{0, false};
  if (in_range) row = load_ce_row(target, mask, g, n, s, ignore_index);
  const P* x = pred + n * g.p_sn + s * g.p_ss;

  float m = -INFINITY, l = 0.0f;
  float v[VPL > 0 ? VPL : 1];
  if (row.ok) {
    if (VPL > 0) {
#pragma unroll
      for (int k = 0; k < VPL; ++k) {
        const int64_t c = lane + k * TPR;
        v[k] = c < g.C ? to_acc(x[c]) : -INFINITY;
        m = fmaxf(m, v[k]);
      }
      if (m > -INFINITY) {
#pragma unroll
        for (int k = 0; k < VPL; ++k) l += exp_diff(v[k], m);
      }
    } else {
      for (int64_t c = lane; c < g.C; c += TPR) {
        const float xv = to_acc(x[c]);
        if (xv > m) {
          l = l * exp_diff(m, xv) + 1.0f;
          m = xv;
        } else {
          l += exp_diff(xv, m);
        }
      }
    }
  }
  // Merge the lanes' (max, sum) pairs; every thread of the warp takes part (rows are whole sub-warps).
#pragma unroll
  for (int offset = TPR / 2; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset, TPR);
    const float l2 = __shfl_xor_sync(0xffffffffu, l, offset, TPR);
    const float mm = fmaxf(m, m2);
    l = (m == -INFINITY ? 0.0f : l * exp_diff(m, mm)) + (m2 == -INFINITY ? 0.0f : l2 * exp_diff(m2, mm));
    m = mm;
  }
  if (row.ok && lane == 0) {
    row_loss += (m - to_acc(x[row.t])) + fast_log(l);
    valid += 1;
  }
  if (in_range && grad != nullptr) {
    P* gx = grad + n * g.g_sn + s * g.g_ss;
    if (!row.ok) {
      for (int64_t c = lane; c < g.C; c += TPR) gx[c * g.g_sc] = from_float<P>(0.0f);
    } else if (VPL > 0) {
      const float scale = gi * fast_rcp(l);
#pragma unroll
      for (int k = 0; k < VPL; ++k) {
        const int64_t c = lane + k * TPR;
        if (c < g.C) gx[c * g.g_sc] = from_float<P>(exp_diff(v[k], m) * scale - (c == row.t ? gi : 0.0f));
      }
    } else {
      const float scale = gi * fast_rcp(l);
      for (int64_t c = lane; c < g.C; c += TPR)
        gx[c * g.g_sc] = from_float<P>(exp_diff(to_acc(x[c]), m) * scale - (c == row.t ? gi : 0.0f));
    }
  }
}

}  // namespace cuda
}  // namespace fastmtl
