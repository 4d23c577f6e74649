// L2 prefetch of a grouped loss tile's reads (MultitaskBuffers::group_prefetch, an experiment knob: off by default
// until timed on a GPU). At the start of a pixel cross-entropy or elementwise loss tile, before its wait for the task's
// count, the block's threads ask the L2 for every 128-byte line the tile's blocks will read: a prefetch writes no
// register and is not waited for, so the whole tile's reads are in flight at once, and the tile's loads then mostly
// hit the L2. Without them a thread has only its own few loads in flight between computing (a latency-bound kernel:
// the H100 profile of 2026-11-27 had the issue slots 26% busy, long-scoreboard stalls first). CUB's DeviceTransform
// prefetches its tiles the same way on Hopper. Unlabelled samples are skipped, except under a per-pixel mask (not
// read here: all is prefetched); an elementwise tile over more than kPrefetchMaxSamples samples, and the rows and
// one-pixel cross-entropy tiles, are not prefetched.
//   prefetch_lines              the lines of one byte range, spread over a warp's or the block's threads
//   prefetch_ce_pixel_blocks    blocks [first, end) of ce_pixel_vec_tile: every class plane's pixels and the targets
//   prefetch_elementwise_blocks blocks [first, end) of elementwise_tile: pred and target, labelled samples' parts
#pragma once

#include <cstdint>

#include "masked_loss.h"
#include "masked_loss_elementwise.cuh"
#include "masked_loss_reduce.cuh"
#include "numeric.cuh"

namespace fastmtl {
namespace cuda {

constexpr int64_t kPrefetchLine = 128;  // bytes the L2 fetches per prefetch
// A tile of elementwise blocks spanning more samples than this is not prefetched (per-sample mask reads would cost
// more than they save: a task with few elements per sample is small).
constexpr int64_t kPrefetchMaxSamples = 4;

// The lines of [begin, begin + bytes) (bytes >= 1) that fall to lane `lane` of `lanes`: line k by lane k % lanes, every
// address inside the range (the first line's is begin itself).
__device__ __forceinline__ void prefetch_lines(const char* begin, int64_t bytes, int lane, int lanes) {
  const uintptr_t first_line = reinterpret_cast<uintptr_t>(begin) / kPrefetchLine;
  const int64_t lines = static_cast<int64_t>((reinterpret_cast<uintptr_t>(begin) + bytes - 1) / kPrefetchLine -
                                             first_line) + 1;
#pragma unroll 1  // a prefetch does not stall: unrolled copies would only add code
  for (int64_t k = lane; k < lines; k += lanes)
    prefetch_l2(k == 0 ? begin : reinterpret_cast<const char*>((first_line + k) * kPrefetchLine));
}

// Blocks [first, end) of ce_pixel_vec_tile<P, C, PIX> (NCHW, contiguous pixels): each block's pixels of every class
// plane, and its targets where they are contiguous, for a labelled sample (a per-pixel mask, m_ss != 0, is not read
// here: everything is prefetched). A block's C + 1 ranges are short (a class plane of a 512-pixel bf16 block: 8 lines),
// so each warp takes whole ranges, its lanes their lines: a few instructions per thread, where spreading every range
// over the block would cost each thread a pass over all of them.
template <typename P, int PIX>
__device__ __forceinline__ void prefetch_ce_pixel_blocks(const P* __restrict__ pred, const int64_t* __restrict__ target,
                                                         const bool* __restrict__ mask, const CeGeometry& g,
                                                         int64_t s_blocks, int64_t first, int64_t end) {
  constexpr int kWarps = kThreads / 32;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t per_block = g.C + 1;  // ranges of a block: its class planes, then its targets
#pragma unroll 1
  for (int64_t r = threadIdx.x / 32; r < (end - first) * per_block; r += kWarps) {
    const int64_t q = div_index(r, per_block);  // 32-bit divisions where the values fit (always, in practice)
    const int64_t block = first + q, c = r - q * per_block;
    const int64_t n = div_index(block, s_blocks);
    const int64_t s0 = (block - n * s_blocks) * kThreads * PIX;
    const int64_t pixels = g.S - s0 < kThreads * PIX ? g.S - s0 : kThreads * PIX;
    if (pixels <= 0 || (c == g.C && g.t_ss != 1)) continue;
    if (mask != nullptr && g.m_ss == 0 && !mask[n * g.m_sn]) continue;  // an unlabelled sample is not read
    if (c < g.C)
      prefetch_lines(reinterpret_cast<const char*>(pred + n * g.p_sn + c * g.p_sc + s0),
                     pixels * static_cast<int64_t>(sizeof(P)), lane, 32);
    else
      prefetch_lines(reinterpret_cast<const char*>(target + n * g.t_sn + s0),
                     pixels * static_cast<int64_t>(sizeof(int64_t)), lane, 32);
  }
}

// Blocks [first, end) of elementwise_tile<KIND, P, T, VEC> over flat [total] storage of samples of M elements: the
// labelled samples' parts of pred and target (the tile is one range of both).
template <typename P, typename T, int VEC>
__device__ __forceinline__ void prefetch_elementwise_blocks(const P* __restrict__ pred, const T* __restrict__ target,
                                                            const bool* __restrict__ mask, int64_t total, int64_t M,
                                                            int64_t first, int64_t end) {
  constexpr int64_t kBlockElements = static_cast<int64_t>(kThreads) * VEC * kElementwiseItems;
  const int64_t begin = first * kBlockElements;
  const int64_t stop = end * kBlockElements < total ? end * kBlockElements : total;
  if (begin >= stop) return;
  const int lane = static_cast<int>(threadIdx.x);
  if (mask == nullptr) {
    prefetch_lines(reinterpret_cast<const char*>(pred + begin), (stop - begin) * sizeof(P), lane, kThreads);
    prefetch_lines(reinterpret_cast<const char*>(target + begin), (stop - begin) * sizeof(T), lane, kThreads);
    return;
  }
  const int64_t n_first = div_index(begin, M), n_last = div_index(stop - 1, M);
  if (n_last - n_first >= kPrefetchMaxSamples) return;
#pragma unroll 1
  for (int64_t n = n_first; n <= n_last; ++n) {
    if (!mask[n]) continue;
    const int64_t lo = n * M > begin ? n * M : begin;
    const int64_t hi = (n + 1) * M < stop ? (n + 1) * M : stop;
    prefetch_lines(reinterpret_cast<const char*>(pred + lo), (hi - lo) * sizeof(P), lane, kThreads);
    prefetch_lines(reinterpret_cast<const char*>(target + lo), (hi - lo) * sizeof(T), lane, kThreads);
  }
}

}  // namespace cuda
}  // namespace fastmtl
