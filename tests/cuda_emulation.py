"""The CUDA kernels of csrc/cuda on the CPU: a .cu file compiled by g++ against a small emulation of CUDA (tests only).

Without a GPU the .cu kernels would otherwise only be compiled. The emulation runs each block's threads as
std::threads, blocks one after another (by index, or in a seeded random order: ``emu_set_block_order``):
``__syncthreads`` is a block-wide barrier, warp shuffles a barrier of the warp's 32 threads. Shared memory starts as
0xFF bytes (``extern __shared__`` arrays point at a buffer of the launch's dynamic size; each ``__shared__`` array is
poisoned where it is declared), so a read before a write shows. A launch configuration CUDA refuses (block over 1024
threads, an empty grid, grid y or z over 65535, over 48 KiB of dynamic shared memory) does not run and
``cudaGetLastError`` reports it; a launch that does not finish in ``FASTMTL_EMU_WATCHDOG_S`` seconds (300) aborts the
process with a message instead of hanging the run. It checks the kernels' arithmetic, indexing, masking and
reductions (and the launchers' choice of kernel), and with a random block order whether a result depends on the order
blocks run in; not memory-model or timing behaviour, and not the ATen glue (the ``@pytest.mark.cuda`` tests do).

Limits, which the kernels under test respect: a thread that returns early must not leave others waiting at a
``__syncthreads`` of the same block after it (its end-of-block arrival stands in for one), the threads of a warp call
a shuffle together (a full-warp mask; a power-of-two width), and ``__shared__`` arrays are declared where every
thread of the block passes. ``build`` returns the library loaded with ctypes: the test shim's functions,
``emu_take_launches()`` (kernel launches since its last call), ``emu_take_prefetches`` (the addresses the kernels
prefetched to L2 since its last call: ``take_prefetches``) and ``emu_set_block_order(seed)`` (0: blocks by index;
else each launch runs its blocks in a random order drawn from the seed and the launches since it was set, so a seed
gives the same orders again). The emulation defines ``FASTMTL_CUDA_EMULATION`` for the kernels' test hooks.
"""

from __future__ import annotations

import ctypes
import pathlib
import re
import shutil
import subprocess

import pytest

CSRC_CUDA = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"

HEADER = r"""
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#define FASTMTL_CUDA_EMULATION 1  // kernels' hooks for tests (numeric.cuh's prefetch_l2)

// The addresses the kernels prefetched (numeric.cuh's prefetch_l2) since emu_take_prefetches last took them.
inline std::mutex emu_prefetch_mutex;
inline std::vector<uintptr_t> emu_prefetches;
inline void emu_prefetch_l2(const void* p) {
  std::lock_guard<std::mutex> lock(emu_prefetch_mutex);
  emu_prefetches.push_back(reinterpret_cast<uintptr_t>(p));
}

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
inline std::vector<unsigned char> emu_dynamic_smem;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
inline cudaError_t emu_last_error = cudaSuccess;  // a launch with a configuration CUDA refuses sets it
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu_last_error;
  emu_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }

using std::isfinite;
using std::isnan;
using std::max;
using std::min;

inline unsigned emu_thread_index() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

// A __shared__ array at the point of its declaration: 0xFF bytes, as if left by another block (static storage would
// otherwise hand over zeros, or the previous block's values). The block meets before (no thread still reads it) and
// after (no thread writes it before it is poisoned); every kernel under test declares its arrays where all threads
// of the block pass.
inline void emu_poison_shared(void* p, size_t bytes) {
  __syncthreads();
  if (emu_thread_index() == 0) std::memset(p, 0xFF, bytes);
  __syncthreads();
}

[[noreturn]] inline void emu_fail(const char* what) {
  std::fprintf(stderr, "CUDA emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// Every lane writes its value, the warp meets, each lane reads its source lane's, the warp meets again.
template <typename T, typename Source>
T emu_shuffle(T v, Source source_lane) {
  static T buf[1024];
  const unsigned tid = emu_thread_index(), lane = tid % 32, base = tid - lane;
  std::barrier<>& warp = *emu_warp_barriers[tid / 32];
  buf[tid] = v;
  warp.arrive_and_wait();
  const unsigned src = source_lane(lane);
  T r = src < 32 && base + src < blockDim.x * blockDim.y * blockDim.z ? buf[base + src] : v;
  warp.arrive_and_wait();
  return r;
}
// width: lanes in segments of `width`; a source lane past the caller's segment gives the caller's own value.
inline unsigned emu_shuffle_source(unsigned lane, unsigned src, unsigned mask, int width) {
  if (mask != 0xffffffffu || width < 1 || width > 32 || (width & (width - 1)) != 0)
    emu_fail("only full-warp shuffles (mask 0xffffffff) with a power-of-two width up to 32 are emulated");
  const unsigned segment_end = (lane & ~static_cast<unsigned>(width - 1)) + static_cast<unsigned>(width);
  return src < segment_end ? src : lane;
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return emu_shuffle(v, [&](unsigned lane) {
    return emu_shuffle_source(lane, lane ^ static_cast<unsigned>(lane_mask), mask, width);
  });
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return emu_shuffle(v, [&](unsigned lane) { return emu_shuffle_source(lane, lane + delta, mask, width); });
}

// fastmtl's kernels are run-to-run deterministic: a floating-point atomicAdd (whose sum depends on the order blocks
// finish in) does not compile here.
float atomicAdd(float* p, float v) = delete;
double atomicAdd(double* p, double v) = delete;
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline void __nanosleep(unsigned) { std::this_thread::yield(); }

// The emulated device: EMU_SMS multiprocessors that each keep EMU_BLOCKS_PER_SM blocks of any kernel resident (a
// kernel that sizes its grid by them still runs its blocks one after another here).
constexpr int EMU_SMS = 4;
constexpr int EMU_BLOCKS_PER_SM = 2;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? EMU_SMS : 0;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = EMU_BLOCKS_PER_SM;
  return cudaSuccess;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
T __ldcg(const T* p) { return *p; }

struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

struct __half { _Float16 v; __half() = default; };
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { __half h; h.v = static_cast<_Float16>(f); return h; }
struct __nv_bfloat16 { uint16_t bits; __nv_bfloat16() = default; };
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  __nv_bfloat16 b;
  if (std::isnan(f)) { b.bits = 0x7fc0; return b; }
  u += 0x7fff + ((u >> 16) & 1);
  b.bits = uint16_t(u >> 16);
  return b;
}

inline int emu_launches = 0;  // kernel launches so far (emu_take_launches reads and resets it)
// The order the blocks of a launch run in: 0 = by index (x fastest, then y, z); any other value = a random
// permutation drawn from that seed and the launch's index since the seed was set, so that a result that depends on
// the order blocks finish in (a floating-point atomicAdd, a block that assumes it runs last) shows, and the same
// orders come back for the same seed (emu_set_block_order).
inline unsigned emu_block_order_seed = 0;
inline unsigned emu_block_order_launches = 0;

inline dim3 emu_dim3(dim3 d) { return d; }
inline dim3 emu_dim3(long long n) { return n < 1 || n > 0x7fffffffLL ? dim3(0) : dim3(static_cast<unsigned>(n)); }

// Seconds a launch may take before the emulation declares it hung (a barrier or shuffle that not every thread
// reaches) and aborts the test process with a message, rather than hanging the test run.
inline int emu_watchdog_seconds() {
  const char* s = std::getenv("FASTMTL_EMU_WATCHDOG_S");
  return s != nullptr ? std::atoi(s) : 300;
}

template <typename G, typename B, typename F>
void emu_launch(G grid_arg, B block_arg, size_t smem_bytes, F&& body) {
  ++emu_launches;
  const dim3 grid = emu_dim3(grid_arg), block = emu_dim3(block_arg);
  const unsigned long long threads = 1ULL * block.x * block.y * block.z;
  // What CUDA refuses: the launch does not run and cudaGetLastError reports it.
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535 || threads < 1 ||
      threads > 1024 || block.z > 64 || smem_bytes > 48 * 1024) {
    emu_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  gridDim = grid;
  blockDim = block;
  emu_dynamic_smem.assign(smem_bytes, 0xFF);
  std::barrier<> bar(static_cast<std::ptrdiff_t>(threads));
  emu_block_barrier = &bar;
  emu_warp_barriers.clear();
  for (unsigned w = 0; w * 32 < threads; ++w)
    emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min<unsigned long long>(32, threads - w * 32)));
  std::mutex m;
  std::condition_variable finished;
  bool done = false;
  std::thread watchdog([&] {
    std::unique_lock<std::mutex> lock(m);
    if (!finished.wait_for(lock, std::chrono::seconds(emu_watchdog_seconds()), [&] { return done; }))
      emu_fail("a kernel launch did not finish: a __syncthreads or shuffle that not every thread reaches?");
  });
  std::vector<unsigned long long> order(1ULL * grid.x * grid.y * grid.z);
  std::iota(order.begin(), order.end(), 0ULL);
  if (emu_block_order_seed != 0) {
    std::mt19937_64 rng(1000003ULL * emu_block_order_seed + emu_block_order_launches++);
    std::shuffle(order.begin(), order.end(), rng);
  }
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (const unsigned long long b : order) {  // blocks one after another, all threads of a block together
        blockIdx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (1ULL * grid.x * grid.y));
        body();
        bar.arrive_and_wait();
      }
    });
  for (auto& th : pool) th.join();
  {
    std::lock_guard<std::mutex> lock(m);
    done = true;
  }
  finished.notify_one();
  watchdog.join();
}
"""


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "(<"
        depth -= ch in ")>"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def rewrite(src: str, min_launches: int) -> str:
    """CUDA-only syntax in ``src`` made plain C++ for the emulation.

    ``kernel<<<grid, block[, smem[, stream]]>>>(args);`` becomes ``emu_launch(grid, block, smem, [&]() {
    kernel(args); });`` (at least ``min_launches`` of them, so that a launch the pattern misses fails loudly), and
    ``extern __shared__ T name[];`` a pointer into the launch's dynamic shared memory.
    """

    def launch(m):
        config = [x.strip() for x in _split_top(m.group(2))]
        smem = config[2] if len(config) > 2 else "0"
        return f"emu_launch({config[0]}, {config[1]}, {smem}, [&]() {{ {m.group(1)}({m.group(3)}); }});"

    out, n = re.subn(r"([\w:]+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\((.*?)\);", launch, src, flags=re.S)
    assert n >= min_launches, f"expected at least {min_launches} kernel launches to be rewritten, got {n}"
    out = re.sub(
        r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\[\];",
        r"\1* \2 = reinterpret_cast<\1*>(emu_dynamic_smem.data());",
        out,
    )
    out, n = re.subn(
        r"(?<!#define )__shared__\s+([\w:<> ]+?)\s+(\w+)\[([^\]]+)\];",
        r"static \1 \2[\3]; emu_poison_shared(\2, sizeof(\2));",
        out,
    )
    return out


_TAKE_LAUNCHES = r"""
extern "C" int emu_take_launches() {
  const int n = emu_launches;
  emu_launches = 0;
  return n;
}
// The number of addresses prefetched since the last call; the first `capacity` of them go to `out`.
extern "C" long long emu_take_prefetches(unsigned long long* out, long long capacity) {
  std::lock_guard<std::mutex> lock(emu_prefetch_mutex);
  const long long n = static_cast<long long>(emu_prefetches.size());
  for (long long i = 0; i < n && i < capacity; ++i) out[i] = emu_prefetches[i];
  emu_prefetches.clear();
  return n;
}
extern "C" void emu_set_block_order(unsigned seed) {
  emu_block_order_seed = seed;
  emu_block_order_launches = 0;
}
"""


def build(out_dir: pathlib.Path, kernels: dict[str, int], headers: list[str], shim: str) -> ctypes.CDLL:
    """Compile the ``.cu`` files of csrc/cuda named in ``kernels`` (name -> the fewest launches it holds) with
    ``headers`` (also from csrc/cuda) and the test's ``shim`` (extern "C" entry points, CUDA syntax allowed), and
    load the library.

    Skips the calling test where g++ or the CUDA sources are missing."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++ (C++20) to build the CPU emulation of the CUDA kernels")
    if not all((CSRC_CUDA / name).exists() for name in [*kernels, *headers]):
        pytest.skip("the CUDA sources are not beside the tests (installed package without csrc/)")
    inc = out_dir / "inc"
    inc.mkdir(parents=True, exist_ok=True)
    (out_dir / "emu_cuda.h").write_text(HEADER)
    for name in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"):
        (inc / name).write_text('#pragma once\n#include "../emu_cuda.h"\n')
    for name in headers:  # rewritten too: device code in a header may declare __shared__ arrays
        (inc / name).write_text(rewrite((CSRC_CUDA / name).read_text(), 0))
    sources = []
    for name, min_launches in kernels.items():
        path = out_dir / (pathlib.Path(name).stem + "_emulated.cpp")
        path.write_text('#include "emu_cuda.h"\n' + rewrite((CSRC_CUDA / name).read_text(), min_launches))
        sources.append(str(path))
    (out_dir / "shim.cpp").write_text('#include "emu_cuda.h"\n' + rewrite(shim, 0) + _TAKE_LAUNCHES)
    lib = out_dir / "libemu.so"
    cmd = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", f"-I{inc}", f"-I{out_dir}", *sources,
           str(out_dir / "shim.cpp"), "-o", str(lib)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def ptr(t) -> ctypes.c_void_p:
    """A tensor's data pointer for a ctypes call (null for None)."""
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def take_prefetches(lib: ctypes.CDLL, capacity: int = 1 << 20) -> list[int]:
    """The addresses the emulated kernels prefetched to L2 (numeric.cuh's prefetch_l2) since the last call, in the
    order they were issued (at most ``capacity``: more fails)."""
    lib.emu_take_prefetches.restype = ctypes.c_longlong
    out = (ctypes.c_ulonglong * capacity)()
    n = lib.emu_take_prefetches(out, ctypes.c_longlong(capacity))
    assert n <= capacity, f"{n} prefetches, more than the {capacity} asked for"
    return list(out[:n])
