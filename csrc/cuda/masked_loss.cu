// CUDA kernels of fastmtl::masked_loss (one task), fastmtl::masked_multitask_loss_forward (all tasks) and the grouped
// gradient scaling; see masked_loss.h for the launch design. No torch headers: this file compiles in seconds.
//
// Kernels:
//   count_ce_kernel / count_float_kernel   partial valid counts (grid-stride, at most kMaxCountBlocks blocks)
//   count_tasks_kernel                     the same for up to kMaxCountTasks tasks in one launch
//   ce_pixel_kernel                        one thread per pixel, loop over C (NCHW: coalesced along the pixels);
//                                          up to 16 logits cached in registers, else an online softmax and a re-read
//   ce_pixel_vec_kernel                    NCHW with contiguous pixels and C <= 16: 4 pixels per thread, so each
//                                          class plane is read and written in 8- or 16-byte vectors
//   ce_rows_kernel                         TPR threads per row when C is contiguous ([N, C], channels_last);
//                                          per-lane online softmax merged with shuffles
//   elementwise_kernel                     bce / l1 / mse, 16-byte vector loads and stores where aligned
//   scale_grads_kernel                     grouped out[t] = in[t] * scale_t over a task table passed by value,
//                                          16-byte vectors where aligned; scale_t given, or computed from the
//                                          upstream gradients (ScaleFactors); a block whose scale is exactly 1 in
//                                          place returns at once (no memory traffic)
// Every loss kernel starts by summing the partial counts (one per thread, blockDim == kMaxCountBlocks) and ends
// with a block reduction and one atomicAdd of its loss partial times 1/count (and one into the weighted total).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <limits>

#include "masked_loss.h"

namespace fastmtl {
namespace cuda {
namespace {

constexpr int kThreads = 256;
static_assert(kThreads == kMaxCountBlocks, "each loss-kernel thread reads one partial count");
constexpr int kElementwiseItems = 2;  // vectors per thread in elementwise_kernel
constexpr int kScaleItems = 8;        // elements per thread in scale_grads_kernel
constexpr int kPixelVec = 4;          // neighbouring pixels per thread in ce_pixel_vec_kernel

// ---- conversions and reductions --------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (blockDim.x == kThreads); every thread gets the result. Safe to call repeatedly.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T partial[kThreads / 32];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the previous call's readers are done with `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  return warp_sum(lane < kThreads / 32 ? partial[lane] : T(0));
}

// 1 / (total valid count), or 0 when there is no valid element (every element is then masked out anyway).
__device__ __forceinline__ float block_inv_count(const int32_t* __restrict__ counts, int num_counts) {
  long long c = threadIdx.x < num_counts ? static_cast<long long>(counts[threadIdx.x]) : 0LL;
  c = block_sum(c);
  return c > 0 ? 1.0f / static_cast<float>(c) : 0.0f;
}

// i / d with a 32-bit division when both fit (the common case; 64-bit division is slow on the GPU).
__device__ __forceinline__ int64_t div_index(int64_t i, int64_t d) {
  if (d == 1) return i;
  if (((i | d) >> 31) == 0) return static_cast<int64_t>(static_cast<uint32_t>(i) / static_cast<uint32_t>(d));
  return i / d;
}

// The gradient's factor: 1 / (the task's valid count), from the count pass's partial counts.
__device__ __forceinline__ float reduction_inv(const LossReduction& red) {
  return block_inv_count(red.counts, red.num_counts);
}

// The gradient's factor: 1 / count, so the gradient is final; or, when red.grad_scale is set (float16 predictions,
// whose range cannot hold g / count for large counts: it would round to subnormals and zeros), `stored` (1, or 0.5
// for mse whose 2(p - t) could overflow), block 0 writing the rest of the factor, inv / stored, to *red.grad_scale
// for the backward.
__device__ __forceinline__ float reduction_grad_factor(const LossReduction& red, float inv, float stored) {
  if (red.grad_scale == nullptr) return inv;
  if (blockIdx.x == 0 && threadIdx.x == 0) *red.grad_scale = inv / stored;
  return stored;
}

// The block's end: its loss partial / count is added to *loss and, weighted, to *total (no atomic for a zero sum).
__device__ __forceinline__ void reduction_finish(const LossReduction& red, float row_loss, float inv) {
  const float sum = block_sum(row_loss);
  if (threadIdx.x == 0 && sum != 0.0f) {
    atomicAdd(red.loss, sum * inv);
    if (red.total != nullptr) atomicAdd(red.total, sum * inv * (red.weight != nullptr ? *red.weight : 1.0f));
  }
}

// ---- count kernels ---------------------------------------------------------------------------------------------

// Valid class targets (t != ignore_index, 0 <= t < C, and mask) seen by block `block` of `blocks` (grid-stride);
// every thread returns the block's sum.
__device__ int count_ce_block(const int64_t* __restrict__ target, const bool* __restrict__ mask, const CeGeometry& g,
                              int64_t ignore_index, int64_t block, int64_t blocks) {
  const int64_t total = g.N * g.S;
  const bool flat_target = g.t_sn == g.S * g.t_ss;
  const bool flat_mask = g.m_sn == g.S * g.m_ss;
  int local = 0;
  for (int64_t r = block * kThreads + threadIdx.x; r < total; r += blocks * kThreads) {
    int64_t n = 0, s = r;
    if (!(flat_target && (mask == nullptr || flat_mask))) {
      n = div_index(r, g.S);
      s = r - n * g.S;
    }
    const int64_t t = flat_target ? target[r * g.t_ss] : target[n * g.t_sn + s * g.t_ss];
    bool ok = t != ignore_index && t >= 0 && t < g.C;
    if (ok && mask != nullptr) ok = flat_mask ? mask[r * g.m_ss] : mask[n * g.m_sn + s * g.m_ss];
    local += ok ? 1 : 0;
  }
  return block_sum(local);
}

// Non-NaN float targets (contiguous storage, sample n owns [n*M, (n+1)*M)) seen by block `block` of `blocks`.
template <typename T>
__device__ int count_float_block(const T* __restrict__ target, const bool* __restrict__ mask, int64_t total,
                                 int64_t M, int64_t block, int64_t blocks) {
  int local = 0;
  for (int64_t i = block * kThreads + threadIdx.x; i < total; i += blocks * kThreads) {
    const float t = to_float(target[i]);
    bool ok = !isnan(t);
    if (ok && mask != nullptr) ok = mask[div_index(i, M)];
    local += ok ? 1 : 0;
  }
  return block_sum(local);
}

__global__ void __launch_bounds__(kThreads)
    count_ce_kernel(const int64_t* __restrict__ target, const bool* __restrict__ mask, CeGeometry g,
                    int64_t ignore_index, int32_t* __restrict__ counts, float* __restrict__ loss) {
  const int sum = count_ce_block(target, mask, g, ignore_index, blockIdx.x, gridDim.x);
  if (threadIdx.x == 0) {
    counts[blockIdx.x] = sum;
    if (blockIdx.x == 0) *loss = 0.0f;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    count_float_kernel(const T* __restrict__ target, const bool* __restrict__ mask, int64_t total, int64_t M,
                       int32_t* __restrict__ counts, float* __restrict__ loss) {
  const int sum = count_float_block(target, mask, total, M, blockIdx.x, gridDim.x);
  if (threadIdx.x == 0) {
    counts[blockIdx.x] = sum;
    if (blockIdx.x == 0) *loss = 0.0f;
  }
}

struct CountTable {
  CountTask task[kMaxCountTasks];
  int blocks;  // count blocks per task (each task's slots: counts[t * kMaxCountBlocks + b], b < blocks)
};
static_assert(sizeof(CountTable) + 2 * sizeof(void*) <= 4096, "kernel arguments are limited to 4 KB");

// All tasks' count passes in one launch: block x counts for task x / blocks; the first block of each task zeroes its
// loss, block 0 the total (when given).
__global__ void __launch_bounds__(kThreads)
    count_tasks_kernel(CountTable table, int32_t* __restrict__ counts, float* __restrict__ total) {
  const int t = blockIdx.x / table.blocks;
  const int b = blockIdx.x - t * table.blocks;
  const CountTask& task = table.task[t];
  int sum = 0;
  if (task.is_ce) {
    sum = count_ce_block(static_cast<const int64_t*>(task.target), task.mask, task.geom, task.ignore_index, b,
                         table.blocks);
  } else if (task.target_dtype == DType::kFloat16) {
    sum = count_float_block(static_cast<const __half*>(task.target), task.mask, task.total, task.M, b, table.blocks);
  } else if (task.target_dtype == DType::kBFloat16) {
    sum = count_float_block(static_cast<const __nv_bfloat16*>(task.target), task.mask, task.total, task.M, b,
                            table.blocks);
  } else {
    sum = count_float_block(static_cast<const float*>(task.target), task.mask, task.total, task.M, b, table.blocks);
  }
  if (threadIdx.x == 0) {
    counts[t * kMaxCountBlocks + b] = sum;
    if (b == 0) {
      *task.loss = 0.0f;
      if (task.grad_scale != nullptr) *task.grad_scale = 1.0f;  // a loss kernel storing undivided gradients resets it
    }
    if (blockIdx.x == 0 && total != nullptr) *total = 0.0f;
  }
}

// ---- cross entropy ---------------------------------------------------------------------------------------------

struct CeRow {
  int64_t t;
  bool ok;
};

__device__ __forceinline__ CeRow load_ce_row(const int64_t* __restrict__ target, const bool* __restrict__ mask,
                                             const CeGeometry& g, int64_t n, int64_t s, int64_t ignore_index) {
  CeRow row;
  row.t = target[n * g.t_sn + s * g.t_ss];
  row.ok = row.t != ignore_index && row.t >= 0 && row.t < g.C;  // out-of-range classes are skipped, never read
  if (row.ok && mask != nullptr) row.ok = mask[n * g.m_sn + s * g.m_ss];
  return row;
}

template <typename P, int CREG>
__global__ void __launch_bounds__(kThreads)
    ce_pixel_kernel(const P* __restrict__ pred, const int64_t* __restrict__ target, const bool* __restrict__ mask,
                    P* __restrict__ grad, CeGeometry g, int64_t ignore_index, int64_t s_blocks,
                    LossReduction red) {
  const float inv = reduction_inv(red);
  const float gi = reduction_grad_factor(red, inv, 1.0f);
  const int64_t n = blockIdx.x / s_blocks;
  const int64_t s = (blockIdx.x - n * s_blocks) * kThreads + threadIdx.x;
  float row_loss = 0.0f;
  if (s < g.S) {
    const CeRow row = load_ce_row(target, mask, g, n, s, ignore_index);
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
        v[c] = c < g.C ? to_float(x[c * g.p_sc]) : -INFINITY;
        m = fmaxf(m, v[c]);
        if (c == row.t) xt = v[c];
      }
      float l = 0.0f;
#pragma unroll
      for (int c = 0; c < CREG; ++c) {
        v[c] = expf(v[c] - m);
        l += v[c];
      }
      row_loss = m + logf(l) - xt;
      if (gx != nullptr) {
        const float scale = gi / l;
#pragma unroll
        for (int c = 0; c < CREG; ++c)
          if (c < g.C) gx[c * g.g_sc] = from_float<P>(v[c] * scale - (c == row.t ? gi : 0.0f));
      }
    } else {  // online softmax, then a second read (from cache) for the gradient
      float m = -INFINITY, l = 0.0f;
      for (int64_t c = 0; c < g.C; ++c) {
        const float xv = to_float(x[c * g.p_sc]);
        if (xv > m) {
          l = l * expf(m - xv) + 1.0f;
          m = xv;
        } else {
          l += expf(xv - m);
        }
      }
      row_loss = m + logf(l) - to_float(x[row.t * g.p_sc]);
      if (gx != nullptr) {
        const float scale = gi / l;
        for (int64_t c = 0; c < g.C; ++c)
          gx[c * g.g_sc] = from_float<P>(expf(to_float(x[c * g.p_sc]) - m) * scale - (c == row.t ? gi : 0.0f));
      }
    }
  }
  reduction_finish(red, row_loss, inv);
}

template <typename X, int V>
struct alignas(sizeof(X) * V) Pack {
  X v[V];
};

// NCHW logits with contiguous pixels (p_ss == g_ss == 1): PIX neighbouring pixels per thread, so every load and store
// of a class plane moves PIX elements at once (8 or 16 bytes instead of 2 or 4). The launcher checks that S and the
// sample and class strides are multiples of PIX and that pred and grad are aligned to PIX elements. C <= CREG.
template <typename P, int CREG, int PIX>
__global__ void __launch_bounds__(kThreads)
    ce_pixel_vec_kernel(const P* __restrict__ pred, const int64_t* __restrict__ target, const bool* __restrict__ mask,
                        P* __restrict__ grad, CeGeometry g, int64_t ignore_index, int64_t s_blocks,
                        LossReduction red) {
  using Vec = Pack<P, PIX>;
  const float inv = reduction_inv(red);
  const float gi = reduction_grad_factor(red, inv, 1.0f);
  const int64_t n = blockIdx.x / s_blocks;
  const int64_t s0 = ((blockIdx.x - n * s_blocks) * kThreads + threadIdx.x) * PIX;
  float row_loss = 0.0f;
  if (s0 < g.S) {
    int64_t cls[PIX];
    bool ok[PIX];
    bool any = false;
#pragma unroll
    for (int j = 0; j < PIX; ++j) {
      const CeRow row = load_ce_row(target, mask, g, n, s0 + j, ignore_index);
      cls[j] = row.t;
      ok[j] = row.ok;
      any |= row.ok;
    }
    const P* x = pred + n * g.p_sn + s0;
    P* gx = grad != nullptr ? grad + n * g.g_sn + s0 : nullptr;
    if (!any) {  // no labelled pixel here (e.g. an unlabelled sample): the logits are not read at all
      if (gx != nullptr) {
        Vec zero;
#pragma unroll
        for (int j = 0; j < PIX; ++j) zero.v[j] = from_float<P>(0.0f);
        for (int64_t c = 0; c < g.C; ++c) *reinterpret_cast<Vec*>(gx + c * g.g_sc) = zero;
      }
    } else {
      float v[CREG][PIX];
      float m[PIX], l[PIX], xt[PIX];
#pragma unroll
      for (int j = 0; j < PIX; ++j) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
        xt[j] = 0.0f;
      }
#pragma unroll
      for (int c = 0; c < CREG; ++c) {
        if (c < g.C) {
          const Vec pk = *reinterpret_cast<const Vec*>(x + c * g.p_sc);
#pragma unroll
          for (int j = 0; j < PIX; ++j) v[c][j] = to_float(pk.v[j]);
        } else {
#pragma unroll
          for (int j = 0; j < PIX; ++j) v[c][j] = -INFINITY;
        }
#pragma unroll
        for (int j = 0; j < PIX; ++j) {
          m[j] = fmaxf(m[j], v[c][j]);
          if (c == cls[j]) xt[j] = v[c][j];
        }
      }
#pragma unroll
      for (int c = 0; c < CREG; ++c) {
#pragma unroll
        for (int j = 0; j < PIX; ++j) {
          v[c][j] = expf(v[c][j] - m[j]);
          l[j] += v[c][j];
        }
      }
#pragma unroll
      for (int j = 0; j < PIX; ++j)
        if (ok[j]) row_loss += m[j] + logf(l[j]) - xt[j];
      if (gx != nullptr) {
        float scale[PIX];
#pragma unroll
        for (int j = 0; j < PIX; ++j) scale[j] = gi / l[j];
#pragma unroll
        for (int c = 0; c < CREG; ++c) {
          if (c < g.C) {
            Vec out;
#pragma unroll
            for (int j = 0; j < PIX; ++j)
              out.v[j] = from_float<P>(ok[j] ? v[c][j] * scale[j] - (c == cls[j] ? gi : 0.0f) : 0.0f);
            *reinterpret_cast<Vec*>(gx + c * g.g_sc) = out;
          }
        }
      }
    }
  }
  reduction_finish(red, row_loss, inv);
}

// TPR threads per row of C contiguous logits (p_sc == 1); VPL > 0 caches VPL logits per lane (C <= TPR * VPL).
template <typename P, int TPR, int VPL>
__global__ void __launch_bounds__(kThreads)
    ce_rows_kernel(const P* __restrict__ pred, const int64_t* __restrict__ target, const bool* __restrict__ mask,
                   P* __restrict__ grad, CeGeometry g, int64_t ignore_index, int64_t s_blocks,
                   LossReduction red) {
  constexpr int kRows = kThreads / TPR;
  const float inv = reduction_inv(red);
  const float gi = reduction_grad_factor(red, inv, 1.0f);
  const int lane = threadIdx.x % TPR;
  const int64_t n = blockIdx.x / s_blocks;
  const int64_t s = (blockIdx.x - n * s_blocks) * kRows + threadIdx.x / TPR;
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
        v[k] = c < g.C ? to_float(x[c]) : -INFINITY;
        m = fmaxf(m, v[k]);
      }
      if (m > -INFINITY) {
#pragma unroll
        for (int k = 0; k < VPL; ++k) l += expf(v[k] - m);
      }
    } else {
      for (int64_t c = lane; c < g.C; c += TPR) {
        const float xv = to_float(x[c]);
        if (xv > m) {
          l = l * expf(m - xv) + 1.0f;
          m = xv;
        } else {
          l += expf(xv - m);
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
    l = (m == -INFINITY ? 0.0f : l * expf(m - mm)) + (m2 == -INFINITY ? 0.0f : l2 * expf(m2 - mm));
    m = mm;
  }
  float row_loss = 0.0f;
  if (row.ok && lane == 0) row_loss = m + logf(l) - to_float(x[row.t]);
  if (in_range && grad != nullptr) {
    P* gx = grad + n * g.g_sn + s * g.g_ss;
    if (!row.ok) {
      for (int64_t c = lane; c < g.C; c += TPR) gx[c * g.g_sc] = from_float<P>(0.0f);
    } else if (VPL > 0) {
      const float scale = gi / l;
#pragma unroll
      for (int k = 0; k < VPL; ++k) {
        const int64_t c = lane + k * TPR;
        if (c < g.C) gx[c * g.g_sc] = from_float<P>(expf(v[k] - m) * scale - (c == row.t ? gi : 0.0f));
      }
    } else {
      const float scale = gi / l;
      for (int64_t c = lane; c < g.C; c += TPR)
        gx[c * g.g_sc] = from_float<P>(expf(to_float(x[c]) - m) * scale - (c == row.t ? gi : 0.0f));
    }
  }
  reduction_finish(red, row_loss, inv);
}

// ---- bce / l1 / mse --------------------------------------------------------------------------------------------

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

template <int KIND, typename P, typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(const P* __restrict__ pred, const T* __restrict__ target, const bool* __restrict__ mask,
                       P* __restrict__ grad, int64_t total, int64_t M, LossReduction red) {
  const float inv = reduction_inv(red);
  const float gi = reduction_grad_factor(red, inv, KIND == static_cast<int>(ElementwiseKind::kMSE) ? 0.5f : 1.0f);
  float acc = 0.0f;
  const int64_t block_base = static_cast<int64_t>(blockIdx.x) * (kThreads * VEC * kElementwiseItems);
#pragma unroll
  for (int item = 0; item < kElementwiseItems; ++item) {
    const int64_t base = block_base + (static_cast<int64_t>(item) * kThreads + threadIdx.x) * VEC;
    if (base >= total) break;
    const bool full = base + VEC <= total;
    bool ok[VEC];
    bool any = false;
    if (mask != nullptr) {
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
      const Pack<P, VEC> pp = *reinterpret_cast<const Pack<P, VEC>*>(pred + base);
      const Pack<T, VEC> tp = *reinterpret_cast<const Pack<T, VEC>*>(target + base);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        p[e] = to_float(pp.v[e]);
        t[e] = to_float(tp.v[e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        p[e] = ok[e] ? to_float(pred[base + e]) : 0.0f;
        t[e] = ok[e] ? to_float(target[base + e]) : 0.0f;
      }
    }
    Pack<P, VEC> gp;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const bool ok_e = ok[e] && !isnan(t[e]);
      float el = 0.0f, ge = 0.0f;
      element_loss<KIND>(p[e], t[e], el, ge);
      acc += ok_e ? el : 0.0f;
      gp.v[e] = from_float<P>(ok_e ? ge * gi : 0.0f);
    }
    if (grad != nullptr) {
      if (VEC > 1 && full) {
        *reinterpret_cast<Pack<P, VEC>*>(grad + base) = gp;
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (base + e < total) grad[base + e] = gp.v[e];
      }
    }
  }
  reduction_finish(red, acc, inv);
}

// ---- grouped scaling -------------------------------------------------------------------------------------------

struct ScaleTable {
  const void* in[kMaxScaleTasks];
  void* out[kMaxScaleTasks];
  int64_t numel[kMaxScaleTasks];
  int64_t first_block[kMaxScaleTasks + 1];
  int dtype[kMaxScaleTasks];
  bool vec[kMaxScaleTasks];  // in and out are 16-byte aligned
  const float* g_task[kMaxScaleTasks];
  int num;
};

// One block's chunk of kThreads * kScaleItems elements: 16-byte vectors when aligned and whole, else one element at
// a time. Each element is read and written by the same thread, so in == out (in place) is safe.
template <typename X>
__device__ __forceinline__ void scale_chunk(const void* in, void* out, int64_t numel, int64_t base, float scale,
                                            bool vec) {
  const X* a = static_cast<const X*>(in);
  X* b = static_cast<X*>(out);
  constexpr int V = 16 / sizeof(X);
  static_assert(kScaleItems % V == 0, "a chunk is a whole number of vectors per thread");
  if (vec && base + static_cast<int64_t>(kThreads) * kScaleItems <= numel) {
#pragma unroll
    for (int k = 0; k < kScaleItems / V; ++k) {
      const int64_t i = base + (static_cast<int64_t>(k) * kThreads + threadIdx.x) * V;
      Pack<X, V> pk = *reinterpret_cast<const Pack<X, V>*>(a + i);
#pragma unroll
      for (int j = 0; j < V; ++j) pk.v[j] = from_float<X>(to_float(pk.v[j]) * scale);
      *reinterpret_cast<Pack<X, V>*>(b + i) = pk;
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kScaleItems; ++k) {
    const int64_t i = base + static_cast<int64_t>(k) * kThreads + threadIdx.x;
    if (i < numel) b[i] = from_float<X>(to_float(a[i]) * scale);
  }
}

// The task's scale: scales[task], or (without scales) (g_total * weights[task] + g_task) * factor[task].
__device__ __forceinline__ float task_scale(const ScaleTable& table, const float* scales, const ScaleFactors& f,
                                            int task) {
  if (scales != nullptr) return scales[task];
  float s = 0.0f;
  if (f.g_total != nullptr) s = *f.g_total * (f.weights != nullptr ? f.weights[task] : 1.0f);
  if (table.g_task[task] != nullptr) s += *table.g_task[task];
  return f.factor != nullptr ? s * f.factor[task] : s;
}

__global__ void __launch_bounds__(kThreads)
    scale_grads_kernel(ScaleTable table, const float* __restrict__ scales, ScaleFactors factors) {
  int task = 0;
  while (task + 1 < table.num && static_cast<int64_t>(blockIdx.x) >= table.first_block[task + 1]) ++task;
  const int64_t base = (static_cast<int64_t>(blockIdx.x) - table.first_block[task]) * (kThreads * kScaleItems);
  const float scale = task_scale(table, scales, factors, task);
  // In place by exactly 1 (upstream gradient 1, unit weight, gradient already divided by the count: the usual
  // training step): nothing to do, so no memory traffic.
  if (scale == 1.0f && table.in[task] == table.out[task]) return;
  switch (table.dtype[task]) {
    case static_cast<int>(DType::kFloat16):
      scale_chunk<__half>(table.in[task], table.out[task], table.numel[task], base, scale,
                              table.vec[task]);
      break;
    case static_cast<int>(DType::kBFloat16):
      scale_chunk<__nv_bfloat16>(table.in[task], table.out[task], table.numel[task], base, scale,
                              table.vec[task]);
      break;
    default:
      scale_chunk<float>(table.in[task], table.out[task], table.numel[task], base, scale,
                              table.vec[task]);
  }
}

// ---- launch helpers --------------------------------------------------------------------------------------------

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether ce_pixel_vec_kernel applies: C <= 16, contiguous pixels, and every PIX-pixel group of every class plane
// (of pred and of grad) starts on a PIX-element boundary.
template <typename P>
bool pixel_vec_ok(const P* pred, const P* grad, const CeGeometry& g, int pix) {
  const bool pred_ok = g.p_ss == 1 && g.p_sc % pix == 0 && g.p_sn % pix == 0 && aligned(pred, sizeof(P) * pix);
  const bool grad_ok =
      grad == nullptr || (g.g_ss == 1 && g.g_sc % pix == 0 && g.g_sn % pix == 0 && aligned(grad, sizeof(P) * pix));
  return g.C <= 16 && g.S % pix == 0 && pred_ok && grad_ok;
}

int rows_threads_per_row(int64_t C) { return C <= 16 ? 4 : (C <= 32 ? 8 : (C <= 64 ? 16 : 32)); }

enum class CeKernel { kRows, kPixelVec, kPixel };

template <typename P>
CeKernel ce_kernel_for(const P* pred, const P* grad, const CeGeometry& g) {
  if (g.p_sc == 1 && g.C > 1) return CeKernel::kRows;
  return pixel_vec_ok(pred, grad, g, kPixelVec) ? CeKernel::kPixelVec : CeKernel::kPixel;
}

// The grid of the cross-entropy kernel masked_loss_ce launches (the rows launcher computes the same).
template <typename P>
int64_t ce_blocks(const P* pred, const P* grad, const CeGeometry& g) {
  switch (ce_kernel_for(pred, grad, g)) {
    case CeKernel::kRows:
      return g.N * ceil_div(g.S, kThreads / rows_threads_per_row(g.C));
    case CeKernel::kPixelVec:
      return g.N * ceil_div(g.S / kPixelVec, kThreads);
    default:
      return g.N * ceil_div(g.S, kThreads);
  }
}

template <typename P, typename T>
bool elementwise_vec_ok(const P* pred, const T* target, const P* grad) {
  constexpr int kVec = 16 / sizeof(P);
  return aligned(pred, sizeof(P) * kVec) && aligned(target, sizeof(T) * kVec) &&
         (grad == nullptr || aligned(grad, sizeof(P) * kVec));
}

template <typename P, typename T>
int64_t elementwise_blocks(const P* pred, const T* target, const P* grad, int64_t total) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kElementwiseItems;
  return ceil_div(total, elementwise_vec_ok(pred, target, grad) ? per_block * (16 / sizeof(P)) : per_block);
}

template <typename P, int TPR, int VPL>
void launch_rows(const P* pred, const int64_t* target, const bool* mask, P* grad, const CeGeometry& g,
                 int64_t ignore_index, const LossReduction& red, cudaStream_t stream) {
  const int64_t s_blocks = ceil_div(g.S, kThreads / TPR);
  ce_rows_kernel<P, TPR, VPL><<<static_cast<unsigned>(g.N * s_blocks), kThreads, 0, stream>>>(
      pred, target, mask, grad, g, ignore_index, s_blocks, red);
}

template <int KIND, typename P, typename T>
void launch_elementwise(const P* pred, const T* target, const bool* mask, P* grad, int64_t total, int64_t M,
                        const LossReduction& red, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(P);
  const int64_t blocks = elementwise_blocks(pred, target, grad, total);
  if (elementwise_vec_ok(pred, target, grad)) {
    elementwise_kernel<KIND, P, T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        pred, target, mask, grad, total, M, red);
  } else {
    elementwise_kernel<KIND, P, T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        pred, target, mask, grad, total, M, red);
  }
}

template <typename P, typename T>
void launch_elementwise_kind(ElementwiseKind kind, const P* pred, const T* target, const bool* mask, P* grad,
                             int64_t total, int64_t M, const LossReduction& red, cudaStream_t stream) {
  switch (kind) {
    case ElementwiseKind::kBCE:
      launch_elementwise<0>(pred, target, mask, grad, total, M, red, stream);
      break;
    case ElementwiseKind::kL1:
      launch_elementwise<1>(pred, target, mask, grad, total, M, red, stream);
      break;
    case ElementwiseKind::kMSE:
      launch_elementwise<2>(pred, target, mask, grad, total, M, red, stream);
      break;
  }
}

}  // namespace

// ---- public launchers ------------------------------------------------------------------------------------------

cudaError_t masked_loss_count_ce(const int64_t* target, const bool* mask, const CeGeometry& geom, int64_t ignore_index,
                                 int32_t* counts, int num_blocks, float* loss, cudaStream_t stream) {
  count_ce_kernel<<<num_blocks, kThreads, 0, stream>>>(target, mask, geom, ignore_index, counts, loss);
  return cudaGetLastError();
}

cudaError_t masked_loss_count_float(const void* target, DType target_dtype, const bool* mask, int64_t total,
                                    int64_t M, int32_t* counts, int num_blocks, float* loss, cudaStream_t stream) {
  const int64_t m = M > 0 ? M : 1;
  const cudaError_t err = dispatch_dtype(target_dtype, [&](auto zero) {
    using T = decltype(zero);
    count_float_kernel<T><<<num_blocks, kThreads, 0, stream>>>(static_cast<const T*>(target), mask, total, m, counts,
                                                               loss);
    return cudaSuccess;
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

cudaError_t masked_loss_ce(const void* pred, DType dtype, const int64_t* target, const bool* mask, void* grad,
                           const CeGeometry& g, int64_t ignore_index, const LossReduction& red,
                           cudaStream_t stream) {
  if (g.N * g.S == 0) return cudaSuccess;
  const cudaError_t err = dispatch_dtype(dtype, [&](auto zero) {
    using P = decltype(zero);
    const P* x = static_cast<const P*>(pred);
    P* gx = static_cast<P*>(grad);
    const CeKernel kernel = ce_kernel_for(x, gx, g);
    const int64_t blocks = ce_blocks(x, gx, g);
    if (blocks > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidConfiguration;  // a 32-bit grid
    if (kernel == CeKernel::kRows) {
      if (g.C <= 16)
        launch_rows<P, 4, 4>(x, target, mask, gx, g, ignore_index, red, stream);
      else if (g.C <= 32)
        launch_rows<P, 8, 4>(x, target, mask, gx, g, ignore_index, red, stream);
      else if (g.C <= 64)
        launch_rows<P, 16, 4>(x, target, mask, gx, g, ignore_index, red, stream);
      else if (g.C <= 128)
        launch_rows<P, 32, 4>(x, target, mask, gx, g, ignore_index, red, stream);
      else if (g.C <= 256)
        launch_rows<P, 32, 8>(x, target, mask, gx, g, ignore_index, red, stream);
      else
        launch_rows<P, 32, 0>(x, target, mask, gx, g, ignore_index, red, stream);
    } else if (kernel == CeKernel::kPixelVec) {
      const int64_t s_blocks = ceil_div(g.S / kPixelVec, kThreads);
      ce_pixel_vec_kernel<P, 16, kPixelVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          x, target, mask, gx, g, ignore_index, s_blocks, red);
    } else {
      const int64_t s_blocks = ceil_div(g.S, kThreads);
      if (g.C <= 16)
        ce_pixel_kernel<P, 16><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, target, mask, gx, g,
                                                                                       ignore_index, s_blocks, red);
      else
        ce_pixel_kernel<P, 0><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, target, mask, gx, g,
                                                                                      ignore_index, s_blocks, red);
    }
    return cudaSuccess;
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

cudaError_t masked_loss_elementwise(ElementwiseKind kind, const void* pred, DType dtype, const void* target,
                                    DType target_dtype, const bool* mask, void* grad, int64_t total, int64_t M,
                                    const LossReduction& red, cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  if (target_dtype != dtype && target_dtype != DType::kFloat32) return cudaErrorInvalidValue;
  const cudaError_t err = dispatch_dtype(dtype, [&](auto zero) {
    using P = decltype(zero);
    const P* x = static_cast<const P*>(pred);
    P* gx = static_cast<P*>(grad);
    const int64_t blocks = target_dtype == DType::kFloat32
                               ? elementwise_blocks(x, static_cast<const float*>(target), gx, total)
                               : elementwise_blocks(x, static_cast<const P*>(target), gx, total);
    if (blocks > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidConfiguration;  // a 32-bit grid
    if (target_dtype == DType::kFloat32)
      launch_elementwise_kind(kind, x, static_cast<const float*>(target), mask, gx, total, M, red, stream);
    else
      launch_elementwise_kind(kind, x, static_cast<const P*>(target), mask, gx, total, M, red, stream);
    return cudaSuccess;
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

cudaError_t masked_loss_count_tasks(const CountTask* tasks, int num_tasks, int blocks, int32_t* counts, float* total,
                                    cudaStream_t stream) {
  if (num_tasks <= 0 || num_tasks > kMaxCountTasks || blocks < 1 || blocks > kMaxCountBlocks)
    return cudaErrorInvalidValue;
  CountTable table{};
  for (int i = 0; i < num_tasks; ++i) table.task[i] = tasks[i];
  table.blocks = blocks;
  count_tasks_kernel<<<static_cast<unsigned>(num_tasks * blocks), kThreads, 0, stream>>>(table, counts, total);
  return cudaGetLastError();
}

namespace {

cudaError_t launch_scale_grads(const ScaleTask* tasks, int num_tasks, const float* scales, const ScaleFactors& factors,
                               cudaStream_t stream) {
  if (num_tasks <= 0) return cudaSuccess;
  if (num_tasks > kMaxScaleTasks) return cudaErrorInvalidValue;
  ScaleTable table{};
  int64_t blocks = 0;
  for (int i = 0; i < num_tasks; ++i) {
    table.in[i] = tasks[i].in;
    table.out[i] = tasks[i].out;
    table.numel[i] = tasks[i].numel;
    table.dtype[i] = static_cast<int>(tasks[i].dtype);
    table.vec[i] = aligned(tasks[i].in, 16) && aligned(tasks[i].out, 16);
    table.g_task[i] = tasks[i].g_task;
    table.first_block[i] = blocks;
    blocks += ceil_div(tasks[i].numel, static_cast<int64_t>(kThreads) * kScaleItems);
  }
  table.first_block[num_tasks] = blocks;
  table.num = num_tasks;
  if (blocks == 0) return cudaSuccess;
  scale_grads_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, scales, factors);
  return cudaGetLastError();
}

}  // namespace

cudaError_t masked_loss_scale_grads(const ScaleTask* tasks, int num_tasks, const float* scales, cudaStream_t stream) {
  return launch_scale_grads(tasks, num_tasks, scales, ScaleFactors{}, stream);
}

cudaError_t masked_loss_scale_grads_by(const ScaleTask* tasks, int num_tasks, const ScaleFactors& factors,
                                       cudaStream_t stream) {
  return launch_scale_grads(tasks, num_tasks, nullptr, factors, stream);
}

}  // namespace cuda
}  // namespace fastmtl
