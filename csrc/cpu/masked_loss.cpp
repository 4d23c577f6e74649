// masked_loss on the CPU: one task's masked mean loss and d loss / d pred, in one sweep over the logits.
//
// Two passes per call: a cheap count pass over (target, mask) gives the number of valid elements, so the main pass
// writes the gradient already divided by that count (no second pass over the gradient). Kinds:
//
//   ce   softmax cross entropy over dim 1. Logits [N, C] / channels_last [N, C, H, W] ("rows": C contiguous per
//        position) or NCHW-contiguous [N, C, *spatial] ("planes": a tile of positions x all C planes at a time, the
//        tile kept in cache). Per position: max over C, exp and sum (the exponentials kept in a float scratch
//        tile), then loss = (max - x[target]) + log(sum) and grad = (softmax - onehot) / count, all from cache.
//   bce  binary cross entropy with logits; l1; mse: fused elementwise.
//
// Validity: sample mask (bool [N], optional) AND element valid (ce: target != ignore_index and 0 <= target < C,
// bce/l1/mse: target not NaN). Out-of-range classes are skipped here; the Python layer raises for them on the CPU.
// float16 / bfloat16 / float32 use float32 math (float64 uses float64, for gradcheck). Reductions are
// deterministic: fixed-size work items, each with its own partial sum, combined in order.
// Arguments are validated in Python (fastmtl/ops/masked_loss.py).

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastmtl {
namespace {

constexpr int64_t kElemBlock = 16384;  // elements per work item of the elementwise kinds and the count passes
constexpr int64_t kSumChunk = 512;     // float partial sums are folded into double every kSumChunk elements
constexpr int64_t kPlaneTile = 256;    // positions per work item of the NCHW cross entropy

#define FASTMTL_INLINE inline __attribute__((always_inline))
// On a lambda: inline it into the ISA-specific clones of run_range below.
#define FASTMTL_INLINE_LAMBDA __attribute__((always_inline))

// The arithmetic of exp and log below, shared by the scalar forms and the vector forms (T = float or a GCC vector
// of floats; the scalar constants broadcast).
//
// exp: for x clamped to [-87, 88], k = round(x / ln2) and p(r) = exp(r) with x = k ln2 + r, |r| <= ln2 / 2, by a
// degree-7 Taylor polynomial (relative error < 2e-7); exp(x) = 2^k * p. Rounding adds and subtracts 1.5 * 2^23
// (std::nearbyint is a library call without SSE4.1, which would stop the vectoriser).
template <typename T>
FASTMTL_INLINE T exp_split(T x, T& k) {
  k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const T r = (x - k * 0.693145751953125f) - k * 1.42860682030941723212e-6f;
  T p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

// log: for the mantissa m in [sqrt(1/2), sqrt(2)) of x = 2^e * m, log(m) = 2 atanh(f), f = (m - 1) / (m + 1),
// |f| <= 0.172, by its odd series to f^9 (relative error < 1e-7); log(x) = e ln2 + log(m).
template <typename T>
FASTMTL_INLINE T log_mantissa(T m) {
  const T f = (m - 1.0f) / (m + 1.0f);
  const T f2 = f * f;
  const T series = 1.0f + f2 * (1.0f / 3.0f + f2 * (1.0f / 5.0f + f2 * (1.0f / 7.0f + f2 * (1.0f / 9.0f))));
  return 2.0f * f * series;
}

// exp(x) for float, branch-free so that loops over it vectorise (see exp_split). Inputs below -87 flush to ~0,
// above 88 saturate; NaN stays NaN (the comparisons are false for it).
FASTMTL_INLINE float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  float k;
  const float p = exp_split(x, k);
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// log(x) for float x > 0 (normal numbers), branch-free (see log_mantissa); NaN and +inf pass through, so that a
// non-finite logit shows in the loss as it does in PyTorch's.
FASTMTL_INLINE float fast_log(float x) {
  const float in = x;
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 127;
  bits = (bits & 0x007fffff) | 0x3f800000;
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool big = m > 1.41421356237f;
  m = big ? m * 0.5f : m;
  e += big ? 1 : 0;
  const float y = static_cast<float>(e) * 0.693147180559945f + log_mantissa(m);
  return in < std::numeric_limits<float>::infinity() ? y : in;  // false for NaN and +inf
}

FASTMTL_INLINE float exp_acc(float x) { return fast_exp(x); }
FASTMTL_INLINE double exp_acc(double x) { return std::exp(x); }
FASTMTL_INLINE float log_acc(float x) { return fast_log(x); }
FASTMTL_INLINE double log_acc(double x) { return std::log(x); }

FASTMTL_INLINE bool is_nan(float v) { return v != v; }
FASTMTL_INLINE bool is_nan(double v) { return v != v; }

enum class Kind { CE, BCE, L1, MSE };

Kind parse_kind(const std::string& kind) {
  if (kind == "ce") return Kind::CE;
  if (kind == "bce") return Kind::BCE;
  if (kind == "l1") return Kind::L1;
  if (kind == "mse") return Kind::MSE;
  TORCH_CHECK(false, "masked_loss: kind must be one of ce, bce, l1, mse, got '", kind, "'");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The kernels are compiled twice: for the baseline ISA and for AVX2+FMA (8 floats a vector instead of 4), the
// latter used when the CPU has it. Kernel bodies are always-inline lambdas, so each clone of run_range gets its own
// vectorised copy of the whole body.
#if defined(__GNUC__) && defined(__x86_64__)
bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
template <typename Body>
__attribute__((target("avx2,fma"))) void run_range_avx2(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}
#endif
template <typename Body>
void run_range_baseline(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}

// Runs body(begin, end) over chunks of [0, n) on the OpenMP pool (chunks of at least `grain`).
template <typename Body>
void parallel_simd(int64_t n, int64_t grain, const Body& body) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
#if defined(__GNUC__) && defined(__x86_64__)
    if (cpu_has_avx2_fma()) {
      run_range_avx2(body, begin, end);
      return;
    }
#endif
    run_range_baseline(body, begin, end);
  });
}

// Runs body(item) for item in [0, n_items), at least `grain` items per chunk (each item on exactly one thread).
template <typename F>
void for_items(int64_t n_items, int64_t grain, const F& body) {
  parallel_simd(n_items, grain, [&](int64_t begin, int64_t end) FASTMTL_INLINE_LAMBDA {
    for (int64_t item = begin; item < end; ++item) body(item);
  });
}

// Work items of kElemBlock elements: a thread takes at least this many, so small tensors run on one thread.
constexpr int64_t kMinItemsPerThread = 4;

double sum_in_order(const std::vector<double>& partial) {
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

// Calls f(begin, end, n) for the pieces of [p0, p1) that lie in one sample each (inner elements per sample).
template <typename F>
FASTMTL_INLINE void for_sample_segments(int64_t p0, int64_t p1, int64_t inner, const F& f) {
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
  for_items(items, kMinItemsPerThread, [&](int64_t item) FASTMTL_INLINE_LAMBDA {
    int64_t count = 0;
    const int64_t p0 = item * kElemBlock, p1 = std::min(positions, p0 + kElemBlock);
    for_sample_segments(p0, p1, per_sample, [&](int64_t b, int64_t e, int64_t n) FASTMTL_INLINE_LAMBDA {
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
  for_items(items, kMinItemsPerThread, [&](int64_t item) FASTMTL_INLINE_LAMBDA {
    int64_t count = 0;
    const int64_t p0 = item * kElemBlock, p1 = std::min(numel, p0 + kElemBlock);
    for_sample_segments(p0, p1, per_sample, [&](int64_t b, int64_t e, int64_t n) FASTMTL_INLINE_LAMBDA {
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

// ---- explicit SIMD kernels (float32 / bfloat16) -------------------------------------------------------
//
// GCC leaves the loops above mostly scalar, so the hot kernels are also written with GCC vector extensions over W
// float lanes, compiled twice: W = 16 inside AVX-512 functions and W = 8 inside AVX2+FMA functions (chosen at run
// time). Every helper is always_inline and only called from those ISA-specific entry points. A partial vector (the
// tail of a tile or segment) goes through the same code on a padded copy. The scalar kernels above remain for
// float64, float16 and for CPUs without AVX2.

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTMTL_HAVE_SIMD 1
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always_inline helpers never cross an ABI boundary

#define FASTMTL_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#define FASTMTL_TARGET_AVX2 __attribute__((target("avx2,fma")))

template <int W>
struct Vec {
  typedef float F __attribute__((vector_size(W * 4)));
  typedef int32_t I __attribute__((vector_size(W * 4)));
  typedef uint32_t U __attribute__((vector_size(W * 4)));
  typedef int64_t L __attribute__((vector_size(W * 8)));
  typedef uint16_t H __attribute__((vector_size(W * 2)));
};

template <int W>
FASTMTL_INLINE typename Vec<W>::F splat(float v) {
  typename Vec<W>::F r;
  for (int i = 0; i < W; ++i) r[i] = v;
  return r;
}

template <int W>
FASTMTL_INLINE float hsum(typename Vec<W>::F v) {
  // Pairwise halving: a fixed order, so the result does not depend on anything but the lane values.
  float buf[W];
  std::memcpy(buf, &v, sizeof(v));
  for (int w = W / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) buf[i] += buf[i + w];
  return buf[0];
}

template <int W>
FASTMTL_INLINE typename Vec<W>::F vmax(typename Vec<W>::F a, typename Vec<W>::F b) {
  return a > b ? a : b;
}

// Vector forms of fast_exp / fast_log above (the same exp_split / log_mantissa).
template <int W>
FASTMTL_INLINE typename Vec<W>::F vexp(typename Vec<W>::F x) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  x = x < -87.0f ? splat<W>(-87.0f) : x;  // NaN stays NaN: both comparisons are false for it
  x = x > 88.0f ? splat<W>(88.0f) : x;
  F k;
  const F p = exp_split(x, k);
  const I bits = (__builtin_convertvector(k, I) + 127) << 23;
  return p * (F)bits;
}

template <int W>
FASTMTL_INLINE typename Vec<W>::F vlog(typename Vec<W>::F x) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  I bits = (I)x;
  I e = ((bits >> 23) & 0xff) - 127;
  bits = (bits & 0x007fffff) | 0x3f800000;
  F m = (F)bits;
  const I big = m > 1.41421356237f;  // -1 where true
  m = big ? m * 0.5f : m;
  e -= big;
  const F y = __builtin_convertvector(e, F) * 0.693147180559945f + log_mantissa(m);
  return x < std::numeric_limits<float>::infinity() ? y : x;  // NaN and +inf pass through, as in fast_log
}

// Loads / stores of W elements as float lanes.
template <int W>
FASTMTL_INLINE typename Vec<W>::F load_f(const float* p) {
  typename Vec<W>::F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int W>
FASTMTL_INLINE typename Vec<W>::F load_f(const c10::BFloat16* p) {
  typename Vec<W>::H h;
  std::memcpy(&h, p, sizeof(h));
  const typename Vec<W>::U u = __builtin_convertvector(h, typename Vec<W>::U) << 16;
  return (typename Vec<W>::F)u;
}
template <int W>
FASTMTL_INLINE void store_f(float* p, typename Vec<W>::F v) {
  std::memcpy(p, &v, sizeof(v));
}
template <int W>
FASTMTL_INLINE void store_f(c10::BFloat16* p, typename Vec<W>::F v) {
  // Round to nearest even, NaN to the canonical quiet NaN (as c10::BFloat16 does).
  using U = typename Vec<W>::U;
  const U u = (U)v;
  const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U bits = (u & 0x7fffffffu) > 0x7f800000u ? U{} + 0x7fc0u : rounded;
  const typename Vec<W>::H h = __builtin_convertvector(bits, typename Vec<W>::H);
  std::memcpy(p, &h, sizeof(h));
}
// A partial vector: the first n (< W) elements, padded with `pad`.
template <int W, typename T>
FASTMTL_INLINE typename Vec<W>::F load_part(const T* p, int64_t n, T pad) {
  T buf[W];
  for (int i = 0; i < W; ++i) buf[i] = i < n ? p[i] : pad;
  return load_f<W>(buf);
}
template <int W, typename T>
FASTMTL_INLINE void store_part(T* p, int64_t n, typename Vec<W>::F v) {
  T buf[W];
  store_f<W>(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
}
template <int W, bool Part, typename T>
FASTMTL_INLINE typename Vec<W>::F load_any(const T* p, int64_t n, T pad) {
  if constexpr (Part) return load_part<W>(p, n, pad);
  else return load_f<W>(p);
}
template <int W, bool Part, typename T>
FASTMTL_INLINE void store_any(T* p, int64_t n, typename Vec<W>::F v) {
  if constexpr (Part) store_part<W>(p, n, v);
  else store_f<W>(p, v);
}

// Valid-class lanes of W int64 targets: the class as int32 where valid, -1 elsewhere.
template <int W, bool Part>
FASTMTL_INLINE typename Vec<W>::I ce_classes(const int64_t* t, int64_t n, int64_t C, int64_t ignore_index) {
  using L = typename Vec<W>::L;
  L tv;
  if constexpr (Part) {
    int64_t buf[W];
    for (int i = 0; i < W; ++i) buf[i] = i < n ? t[i] : -1;
    std::memcpy(&tv, buf, sizeof(tv));
  } else {
    std::memcpy(&tv, t, sizeof(tv));
  }
  const L ok = (tv != ignore_index) & (tv >= 0) & (tv < C);
  return __builtin_convertvector(ok ? tv : L{} - 1, typename Vec<W>::I);
}

// ---- ce, NCHW planes: W positions at a time, all C planes. x is read twice (max, then exp) from L1; the
// exponentials stay in a C x W scratch for the gradient sweep.
template <int W, bool Part, typename scalar_t>
FASTMTL_INLINE typename Vec<W>::F ce_planes_vec(const scalar_t* xb, scalar_t* gb, const int64_t* tb, int64_t L,
                                               const CeArgs& a, float inv, float* e) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  const int64_t C = a.C, S = a.S;
  const I tc = ce_classes<W, Part>(tb, L, C, a.ignore_index);
  const scalar_t pad = scalar_t(0.0f);
  F m = load_any<W, Part>(xb, L, pad);
  F xt = tc == 0 ? m : F{};
  for (int64_t c = 1; c < C; ++c) {
    const F v = load_any<W, Part>(xb + c * S, L, pad);
    m = vmax<W>(m, v);
    xt = tc == static_cast<int32_t>(c) ? v : xt;
  }
  F d{};
  for (int64_t c = 0; c < C; ++c) {
    const F ev = vexp<W>(load_any<W, Part>(xb + c * S, L, pad) - m);
    d += ev;
    if (gb) store_f<W>(e + c * W, ev);
  }
  const I ok = tc >= 0;
  const F loss = ok ? (m - xt) + vlog<W>(d) : F{};
  if (gb) {
    const F r = inv / d;
    const F invv = splat<W>(inv);
    for (int64_t c = 0; c < C; ++c) {
      const F g = load_f<W>(e + c * W) * r - (tc == static_cast<int32_t>(c) ? invv : F{});
      store_any<W, Part>(gb + c * S, L, ok ? g : F{});  // a select: an unlabelled NaN logit must not leak (NaN * 0)
    }
  }
  return loss;
}

template <int W, typename scalar_t>
FASTMTL_INLINE void ce_planes_range(const scalar_t* x, scalar_t* grad, const CeArgs& a, float inv,
                                    double* partial, int64_t tiles, int64_t begin, int64_t end) {
  using F = typename Vec<W>::F;
  const int64_t C = a.C, S = a.S;
  std::vector<float> scratch(grad ? C * W : 0);
  float* e = scratch.data();
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / tiles, s0 = (item % tiles) * kPlaneTile;
    const int64_t L = std::min(kPlaneTile, S - s0);
    const scalar_t* xb = x + n * C * S + s0;
    scalar_t* gb = grad ? grad + n * C * S + s0 : nullptr;
    if (a.mask && !a.mask[n]) {
      if (gb)
        for (int64_t c = 0; c < C; ++c) std::memset(static_cast<void*>(gb + c * S), 0, L * sizeof(scalar_t));
      partial[item] = 0.0;
      continue;
    }
    const int64_t* tb = a.tgt + n * S + s0;
    F acc{};
    int64_t j = 0;
    for (; j + W <= L; j += W)
      acc += ce_planes_vec<W, false>(xb + j, gb ? gb + j : nullptr, tb + j, W, a, inv, e);
    if (j < L) acc += ce_planes_vec<W, true>(xb + j, gb ? gb + j : nullptr, tb + j, L - j, a, inv, e);
    partial[item] = static_cast<double>(hsum<W>(acc));
  }
}

// ---- bce / l1 / mse over W elements.
template <Kind kind, int W>
FASTMTL_INLINE void elementwise_vec(typename Vec<W>::F x, typename Vec<W>::F y, typename Vec<W>::F& loss,
                                    typename Vec<W>::F& dloss) {
  using F = typename Vec<W>::F;
  const F zero{};
  const F one = splat<W>(1.0f);
  if constexpr (kind == Kind::L1) {
    const F diff = x - y;
    loss = diff >= 0 ? diff : -diff;
    dloss = (diff > 0 ? one : zero) - (diff < 0 ? one : zero);
  } else if constexpr (kind == Kind::MSE) {
    const F diff = x - y;
    loss = diff * diff;
    dloss = 2.0f * diff;
  } else {
    const F relu = x > 0 ? x : zero;
    const F z = vexp<W>(x - 2.0f * relu);
    const F sig = (x >= 0 ? one : z) / (1.0f + z);
    loss = relu - x * y + vlog<W>(1.0f + z);
    dloss = sig - y;
  }
}

template <Kind kind, int W, bool Part, typename scalar_t, typename target_t>
FASTMTL_INLINE typename Vec<W>::F elementwise_chunk(const scalar_t* x, const target_t* y, scalar_t* g, int64_t n,
                                                   float inv) {
  using F = typename Vec<W>::F;
  const F xv = load_any<W, Part>(x, n, scalar_t(0.0f));
  // padded lanes get a NaN target, so they count as unlabelled
  const F yv = load_any<W, Part>(y, n, target_t(std::numeric_limits<float>::quiet_NaN()));
  F loss, dloss;
  elementwise_vec<kind, W>(xv, yv, loss, dloss);
  // not NaN, tested on the bits (a float self-comparison here trips GCC 12 with AVX-512)
  const typename Vec<W>::I valid = ((typename Vec<W>::I)yv & 0x7fffffff) <= 0x7f800000;
  if (g) store_any<W, Part>(g, n, valid ? dloss * inv : F{});
  return valid ? loss : F{};
}

template <Kind kind, int W, typename scalar_t, typename target_t>
FASTMTL_INLINE void elementwise_range(const scalar_t* x, const target_t* y, const bool* mask, scalar_t* grad,
                                      int64_t numel, int64_t per_sample, float inv, double* partial, int64_t begin,
                                      int64_t end) {
  using F = typename Vec<W>::F;
  for (int64_t item = begin; item < end; ++item) {
    double loss = 0.0;
    const int64_t p0 = item * kElemBlock, p1 = std::min(numel, p0 + kElemBlock);
    int64_t n = p0 / per_sample;
    for (int64_t b = p0; b < p1; ++n) {
      const int64_t e = std::min(p1, (n + 1) * per_sample);
      if (mask && !mask[n]) {
        if (grad) std::memset(static_cast<void*>(grad + b), 0, (e - b) * sizeof(scalar_t));
        b = e;
        continue;
      }
      for (int64_t c0 = b; c0 < e; c0 += kSumChunk) {
        const int64_t c1 = std::min(e, c0 + kSumChunk);
        F acc{};
        int64_t i = c0;
        for (; i + W <= c1; i += W)
          acc += elementwise_chunk<kind, W, false>(x + i, y + i, grad ? grad + i : nullptr, W, inv);
        if (i < c1) acc += elementwise_chunk<kind, W, true>(x + i, y + i, grad ? grad + i : nullptr, c1 - i, inv);
        loss += static_cast<double>(hsum<W>(acc));
      }
      b = e;
    }
    partial[item] = loss;
  }
}

template <int W, typename scalar_t>
FASTMTL_INLINE void scale_range(const scalar_t* in, scalar_t* out, float sc, int64_t b, int64_t e) {
  int64_t i = b;
  for (; i + W <= e; i += W) store_f<W>(out + i, load_f<W>(in + i) * sc);
  if (i < e) store_part<W>(out + i, e - i, load_part<W>(in + i, e - i, scalar_t(0.0f)) * sc);
}

// ISA-specific entry points (one per kernel and ISA). Work splitting stays outside, in plain code.
#define FASTMTL_SIMD_ENTRY_POINTS(ISA, TARGET, W)                                                                 \
  template <typename scalar_t>                                                                                    \
  TARGET void ce_planes_range_##ISA(const scalar_t* x, scalar_t* grad, const CeArgs& a, float inv,               \
                                    double* partial, int64_t tiles, int64_t begin, int64_t end) {                \
    ce_planes_range<W>(x, grad, a, inv, partial, tiles, begin, end);                                              \
  }                                                                                                               \
  template <Kind kind, typename scalar_t, typename target_t>                                                      \
  TARGET void elementwise_range_##ISA(const scalar_t* x, const target_t* y, const bool* mask, scalar_t* grad,    \
                                      int64_t numel, int64_t per_sample, float inv, double* partial,              \
                                      int64_t begin, int64_t end) {                                               \
    elementwise_range<kind, W>(x, y, mask, grad, numel, per_sample, inv, partial, begin, end);                    \
  }                                                                                                               \
  template <typename scalar_t>                                                                                    \
  TARGET void scale_range_##ISA(const scalar_t* in, scalar_t* out, float sc, int64_t b, int64_t e) {              \
    scale_range<W>(in, out, sc, b, e);                                                                            \
  }

FASTMTL_SIMD_ENTRY_POINTS(avx512, FASTMTL_TARGET_AVX512, 16)
FASTMTL_SIMD_ENTRY_POINTS(avx2, FASTMTL_TARGET_AVX2, 8)
#undef FASTMTL_SIMD_ENTRY_POINTS

enum class Isa { None, Avx2, Avx512 };

Isa simd_isa() {
  static const Isa isa = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Isa::Avx2;
    return Isa::None;
  }();
  return isa;
}

#else
#define FASTMTL_HAVE_SIMD 0
#endif

template <typename scalar_t>
constexpr bool kSimdType = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;


// C contiguous per position: [N, C] or channels_last [N, C, H, W] (position p = n * S + s at offset p * C).
template <typename scalar_t>
double ce_rows(const scalar_t* x, scalar_t* grad, const CeArgs& a, double inv_count) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = a.C, positions = a.N * a.S;
  const int64_t rows_per_item = std::max<int64_t>(1, kElemBlock / std::max<int64_t>(C, 1));
  const int64_t items = ceil_div(positions, rows_per_item);
  const acc_t inv = static_cast<acc_t>(inv_count);
  std::vector<double> partial(items, 0.0);
  parallel_simd(items, kMinItemsPerThread, [&](int64_t begin, int64_t end) FASTMTL_INLINE_LAMBDA {
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
        loss += (static_cast<double>(m) - static_cast<double>(row[t])) + std::log(static_cast<double>(d));
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
  const int64_t grain = std::max<int64_t>(1, kMinItemsPerThread * kElemBlock / (C * kPlaneTile));
#if FASTMTL_HAVE_SIMD
  if constexpr (kSimdType<scalar_t>) {
    const Isa isa = simd_isa();
    if (isa != Isa::None) {
      const float inv_f = static_cast<float>(inv_count);
      at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
        if (isa == Isa::Avx512)
          ce_planes_range_avx512(x, grad, a, inv_f, partial.data(), tiles, begin, end);
        else
          ce_planes_range_avx2(x, grad, a, inv_f, partial.data(), tiles, begin, end);
      });
      return sum_in_order(partial);
    }
  }
#endif
  parallel_simd(items, grain, [&](int64_t begin, int64_t end) FASTMTL_INLINE_LAMBDA {
    std::vector<acc_t> e(grad ? C * kPlaneTile : 0);  // exp(x - max) of the tile, reused for the gradient
    acc_t m[kPlaneTile], d[kPlaneTile], r[kPlaneTile], xt[kPlaneTile];
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
        xt[j] = 0;
      }
      if (!any) {
        if (gb)
          for (int64_t c = 0; c < C; ++c) std::fill(gb + c * S, gb + c * S + L, scalar_t(0));
        partial[item] = 0.0;
        continue;
      }
      for (int64_t c = 0; c < C; ++c) {  // max over C, and the target's logit picked up on the way
        const scalar_t* xr = xb + c * S;
        const int32_t ci = static_cast<int32_t>(c);
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) {
          const acc_t v = static_cast<acc_t>(xr[j]);
          m[j] = std::max(m[j], v);
          xt[j] = tc[j] == ci ? v : xt[j];
        }
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
      acc_t loss = 0;
#pragma omp simd reduction(+ : loss)
      for (int64_t j = 0; j < L; ++j) loss += ok[j] ? (m[j] - xt[j]) + log_acc(d[j]) : acc_t(0);
      partial[item] = static_cast<double>(loss);
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

template <typename acc_t>
struct LossGrad {
  acc_t loss, dloss;
};

// Element loss and d loss / d x, branch-free (so the loops over it vectorise).
template <Kind kind, typename acc_t>
FASTMTL_INLINE LossGrad<acc_t> elementwise_loss_grad(acc_t x, acc_t y) {
  if constexpr (kind == Kind::L1) {
    const acc_t diff = x - y;
    const acc_t pos = diff > 0 ? acc_t(1) : acc_t(0);
    const acc_t neg = diff < 0 ? acc_t(1) : acc_t(0);
    return {diff >= 0 ? diff : -diff, pos - neg};
  } else if constexpr (kind == Kind::MSE) {
    const acc_t diff = x - y;
    return {diff * diff, acc_t(2) * diff};
  } else {  // BCE with logits: max(x, 0) - x y + log(1 + exp(-|x|)); d/dx = sigmoid(x) - y
    const acc_t relu = x > 0 ? x : acc_t(0);
    const acc_t z = exp_acc(x - acc_t(2) * relu);  // exp(-|x|)
    const acc_t sig = (x >= 0 ? acc_t(1) : z) / (acc_t(1) + z);
    // z in (0, 1]: log(1 + z) needs no log1p accuracy here
    return {relu - x * y + log_acc(acc_t(1) + z), sig - y};
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
#if FASTMTL_HAVE_SIMD
  if constexpr (kSimdType<scalar_t>) {
    const Isa isa = simd_isa();
    if (isa != Isa::None) {
      const float inv_f = static_cast<float>(inv_count);
      at::parallel_for(0, items, kMinItemsPerThread, [&](int64_t begin, int64_t end) {
        if (isa == Isa::Avx512)
          elementwise_range_avx512<kind>(x, y, mask, grad, numel, per_sample, inv_f, partial.data(), begin, end);
        else
          elementwise_range_avx2<kind>(x, y, mask, grad, numel, per_sample, inv_f, partial.data(), begin, end);
      });
      return sum_in_order(partial);
    }
  }
#endif
  for_items(items, kMinItemsPerThread, [&](int64_t item) FASTMTL_INLINE_LAMBDA {
    double loss = 0.0;
    const int64_t p0 = item * kElemBlock, p1 = std::min(numel, p0 + kElemBlock);
    for_sample_segments(p0, p1, per_sample, [&](int64_t b, int64_t e, int64_t n) FASTMTL_INLINE_LAMBDA {
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
            const LossGrad<acc_t> lg = elementwise_loss_grad<kind, acc_t>(static_cast<acc_t>(x[i]), yv);
            const bool valid = !is_nan(yv);
            chunk += valid ? lg.loss : acc_t(0);
            grad[i] = static_cast<scalar_t>(valid ? lg.dloss * inv : acc_t(0));
          }
        } else {
#pragma omp simd reduction(+ : chunk)
          for (int64_t i = c0; i < c1; ++i) {
            const acc_t yv = static_cast<acc_t>(y[i]);
            const acc_t l = elementwise_loss_grad<kind, acc_t>(static_cast<acc_t>(x[i]), yv).loss;
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
  // grad_work = empty_like(pred) already, unless pred was copied: then allocate pred's layout only if it differs.
  if (x.is_same(pred)) return {loss, grad_work};
  at::Tensor grad = at::empty_like(pred);
  if (grad.strides() == grad_work.strides()) return {loss, grad_work};
  grad.copy_(grad_work);
  return {loss, grad};
}

template <typename scalar_t>
void scale_dense(const scalar_t* in, scalar_t* out, int64_t numel, float scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sc = static_cast<acc_t>(scale);
#if FASTMTL_HAVE_SIMD
  if constexpr (kSimdType<scalar_t>) {
    const Isa isa = simd_isa();
    if (isa != Isa::None) {
      at::parallel_for(0, numel, kMinItemsPerThread * kElemBlock, [&](int64_t b, int64_t e) {
        if (isa == Isa::Avx512)
          scale_range_avx512(in, out, scale, b, e);
        else
          scale_range_avx2(in, out, scale, b, e);
      });
      return;
    }
  }
#endif
  parallel_simd(numel, kMinItemsPerThread * kElemBlock, [&](int64_t b, int64_t e) FASTMTL_INLINE_LAMBDA {
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

void masked_loss_scale_grads_inplace_cpu(at::TensorList grads, const at::Tensor& scales) {
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == static_cast<int64_t>(grads.size()),
              "masked_loss_scale_grads_: scales must have shape [", grads.size(), "], got ", scales.sizes());
  for (const at::Tensor& g : grads) {  // every check before anything is written
    TORCH_CHECK(at::isFloatingType(g.scalar_type()), "masked_loss_scale_grads_: grads must be floating, got ",
                g.scalar_type());
  }
  for (size_t i = 0; i < grads.size(); ++i)  // one tensor twice would be scaled twice
    for (size_t j = i + 1; j < grads.size(); ++j) at::assert_no_overlap(grads[i], grads[j]);
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  const float* sp = s.const_data_ptr<float>();
  for (size_t t = 0; t < grads.size(); ++t) {
    at::Tensor g = grads[t];
    if (!g.is_non_overlapping_and_dense()) {
      // A strided view: ATen walks its strides, in the math type (a half tensor multiplied in place would round
      // the scale to half first), so it rounds like the dense kernel.
      g.copy_(g.to(at::toOpMathType(g.scalar_type())).mul_(static_cast<double>(sp[t])));
      continue;
    }
    // Element i is read and then written by the same iteration: scaling in place is safe.
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "masked_loss_scale_grads_", [&] {
      scale_dense(g.const_data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), g.numel(), sp[t]);
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("masked_loss", &masked_loss_cpu);
  m.impl("masked_loss_scale_grads", &masked_loss_scale_grads_cpu);
  m.impl("masked_loss_scale_grads_", &masked_loss_scale_grads_inplace_cpu);
}

}  // namespace fastmtl
