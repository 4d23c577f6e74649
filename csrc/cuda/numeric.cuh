// Scalar conversions, vector packs and launch arithmetic shared by the CUDA kernels (conv_bias_relu.cu,
// relu_bias_grad.cu, masked_loss*.cu). torch builds with the implicit half / bfloat16 conversions disabled, hence the
// explicit ones. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastmtl {
namespace cuda {

// The accumulator of T: float, and double for double.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
  return from_float<T>(v);
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }

// VEC consecutive elements, loaded and stored as one access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// A Pack loaded or stored as 16-byte accesses (or one smaller access), in PTX on the device. A plain copy of a Pack of
// 16-bit elements, or of a uint4 through memcpy, may be split into narrower accesses where the copy is inlined into a
// large kernel: the grouped masked-loss kernel's 16-byte gradient stores became four 4-byte stores each (its PTX,
// 2026-11-27), using 12 of every 32 bytes of the sectors they wrote (Nsight Compute, H100). The CPU emulation of the
// kernels (tests/cuda_emulation.py) copies plainly.
template <int BYTES>
struct NativeVec;
template <>
struct NativeVec<16> {
  using type = uint4;
};
template <>
struct NativeVec<8> {
  using type = uint2;
};
template <>
struct NativeVec<4> {
  using type = unsigned int;
};
template <>
struct NativeVec<2> {
  using type = unsigned short;
};

template <int BYTES>
__device__ __forceinline__ typename NativeVec<BYTES>::type load_native(const void* p) {
  typename NativeVec<BYTES>::type v;
#if defined(__CUDA_ARCH__)
  if constexpr (BYTES == 16)
    asm("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  else if constexpr (BYTES == 8)
    asm("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  else if constexpr (BYTES == 4)
    asm("ld.global.u32 %0, [%1];" : "=r"(v) : "l"(p));
  else
    asm("ld.global.u16 %0, [%1];" : "=h"(v) : "l"(p));
#else
  v = *static_cast<const typename NativeVec<BYTES>::type*>(p);
#endif
  return v;
}

// A hint that the 128-byte line holding p will be read soon: the L2 fetches it, and the thread does not wait (no
// register is written). A prefetch of an address outside any allocation does nothing. The CPU emulation of the kernels
// (tests/cuda_emulation.py, FASTMTL_CUDA_EMULATION) records the address, so tests can check what a kernel prefetches.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(__cvta_generic_to_global(p)));
#elif defined(FASTMTL_CUDA_EMULATION)
  emu_prefetch_l2(p);
#else
  (void)p;
#endif
}

template <int BYTES>
__device__ __forceinline__ void store_native(void* p, const typename NativeVec<BYTES>::type& v) {
#if defined(__CUDA_ARCH__)
  if constexpr (BYTES == 16)
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
  else if constexpr (BYTES == 8)
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(v.x), "r"(v.y));
  else if constexpr (BYTES == 4)
    asm volatile("st.global.u32 [%0], %1;" ::"l"(p), "r"(v));
  else
    asm volatile("st.global.u16 [%0], %1;" ::"l"(p), "h"(v));
#else
  *static_cast<typename NativeVec<BYTES>::type*>(p) = v;
#endif
}

// Packs over 16 bytes (8 float targets beside 16-bit predictions) move as 16-byte accesses. p: global memory, aligned
// to the access.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  constexpr int kBytes = sizeof(T) * VEC;
  constexpr int kAccess = kBytes < 16 ? kBytes : 16;
  static_assert(kBytes % kAccess == 0, "a pack is a whole number of accesses");
  Pack<T, VEC> out;
#pragma unroll
  for (int k = 0; k < kBytes / kAccess; ++k) {
    const auto v = load_native<kAccess>(reinterpret_cast<const char*>(p) + k * kAccess);
    memcpy(reinterpret_cast<char*>(&out) + k * kAccess, &v, kAccess);
  }
  return out;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& value) {
  constexpr int kBytes = sizeof(T) * VEC;
  constexpr int kAccess = kBytes < 16 ? kBytes : 16;
  static_assert(kBytes % kAccess == 0, "a pack is a whole number of accesses");
#pragma unroll
  for (int k = 0; k < kBytes / kAccess; ++k) {
    typename NativeVec<kAccess>::type v;
    memcpy(&v, reinterpret_cast<const char*>(&value) + k * kAccess, kAccess);
    store_native<kAccess>(reinterpret_cast<char*>(p) + k * kAccess, v);
  }
}

// VEC elements of T held as raw 32-bit words (element 0 in the low bits of word 0): the form the pixel cross entropy
// keeps its logits in. Held as a Pack of 16-bit elements, a pair was split into halves by the compiler and rejoined
// (a PRMT) around every packed instruction (sm_90 SASS, 2026-11-27); as words it is not.
template <typename T, int VEC>
struct Words {
  static_assert(VEC * sizeof(T) % 4 == 0, "whole 32-bit words");
  static constexpr int kNum = static_cast<int>(VEC * sizeof(T) / 4);
  uint32_t w[kNum];
};

template <typename T, int VEC>
__device__ __forceinline__ Words<T, VEC> load_words(const T* p) {
  Words<T, VEC> out;
  const auto pk = load_pack<T, VEC>(p);
  memcpy(out.w, &pk, sizeof(out.w));
  return out;
}

// load_words(p) where `cond`, else zero bits; p need not point to memory where cond is false. On the device the zeros
// are put in the destination registers and one predicated load per access overwrites them. Written as `if (cond) x =
// load_words(p)`, the loaded and the zero value got registers of their own, and the copy of one into the other right
// after the load waited for its data there: a thread's next load was not issued before (sm_90 SASS, 2026-11-28).
template <typename T, int VEC>
__device__ __forceinline__ Words<T, VEC> load_words_if(const T* p, bool cond) {
  Words<T, VEC> out;
#pragma unroll
  for (int k = 0; k < Words<T, VEC>::kNum; ++k) out.w[k] = 0u;
#if defined(__CUDA_ARCH__)
  constexpr int kNum = Words<T, VEC>::kNum;
  static_assert(kNum % 4 == 0 || kNum < 4, "16-byte accesses, or one smaller one");
  const unsigned c = cond ? 1u : 0u;
  const char* q = reinterpret_cast<const char*>(p);
  if constexpr (kNum >= 4) {
#pragma unroll
    for (int k = 0; k < kNum; k += 4)
      asm("{\n .reg .pred p;\n setp.ne.u32 p, %5, 0;\n @p ld.global.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
          : "+r"(out.w[k]), "+r"(out.w[k + 1]), "+r"(out.w[k + 2]), "+r"(out.w[k + 3])
          : "l"(q + 4 * k), "r"(c));
  } else if constexpr (kNum == 2) {
    asm("{\n .reg .pred p;\n setp.ne.u32 p, %3, 0;\n @p ld.global.v2.u32 {%0, %1}, [%2];\n}"
        : "+r"(out.w[0]), "+r"(out.w[1])
        : "l"(q), "r"(c));
  } else {
    asm("{\n .reg .pred p;\n setp.ne.u32 p, %2, 0;\n @p ld.global.u32 %0, [%1];\n}" : "+r"(out.w[0]) : "l"(q), "r"(c));
  }
#else
  if (cond) out = load_words<T, VEC>(p);
#endif
  return out;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_words(T* p, const Words<T, VEC>& x) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * VEC;
  constexpr int kAccess = kBytes < 16 ? kBytes : 16;
#pragma unroll
  for (int k = 0; k < kBytes / kAccess; ++k) {
    typename NativeVec<kAccess>::type v;
    memcpy(&v, &x.w[k * kAccess / 4], kAccess);
    store_native<kAccess>(reinterpret_cast<char*>(p) + k * kAccess, v);
  }
}

// Element j of x as a float (j a constant once unrolled). A bfloat16 is the top half of its float: one shift or mask.
template <typename T, int VEC>
__device__ __forceinline__ float word_elem(const Words<T, VEC>& x, int j) {
  float f;
  if constexpr (std::is_same_v<T, float>) {
    memcpy(&f, &x.w[j], 4);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t u = j % 2 == 0 ? x.w[j / 2] << 16 : x.w[j / 2] & 0xffff0000u;
    memcpy(&f, &u, 4);
  } else {
    const uint16_t bits = static_cast<uint16_t>(j % 2 == 0 ? x.w[j / 2] & 0xffffu : x.w[j / 2] >> 16);
    T h;
    memcpy(&h, &bits, 2);
    f = to_acc(h);
  }
  return f;
}

// VEC floats rounded to T, as words: on the device one cvt.rn.bf16x2 / f16x2 per pair of 16-bit elements.
template <typename T, int VEC>
__device__ __forceinline__ Words<T, VEC> words_from_floats(const float (&v)[VEC]) {
  Words<T, VEC> out;
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
#pragma unroll
    for (int k = 0; k < VEC / 2; ++k)
      asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(out.w[k]) : "f"(v[2 * k + 1]), "f"(v[2 * k]));
    return out;
  } else if constexpr (std::is_same_v<T, __half>) {
#pragma unroll
    for (int k = 0; k < VEC / 2; ++k)
      asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(out.w[k]) : "f"(v[2 * k + 1]), "f"(v[2 * k]));
    return out;
  } else
#endif
  {
    Pack<T, VEC> pk;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pk.v[k] = from_float<T>(v[k]);
    memcpy(out.w, &pk, sizeof(out.w));
    return out;
  }
}

// VEC elements of T as a thread loads them: raw 32-bit words where they fill whole words, else a Pack. A Pack of
// 16-bit elements is held split into 16-bit halves, and the split (a PRMT per element) right after the load waits for
// the load's data there: the next item's loads would not be issued before it (sm_90 SASS of the masked loss,
// 2026-11-28).
template <typename T, int VEC>
using Loaded = std::conditional_t<(VEC * sizeof(T)) % 4 == 0, Words<T, VEC>, Pack<T, VEC>>;

// Element j (a constant once unrolled) as a float, or as a T.
template <typename T, int VEC>
__device__ __forceinline__ float loaded_elem(const Words<T, VEC>& x, int j) {
  return word_elem(x, j);
}

template <typename T, int VEC>
__device__ __forceinline__ float loaded_elem(const Pack<T, VEC>& x, int j) {
  return to_acc(x.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ T loaded_value(const Words<T, VEC>& x, int j) {
  T v;
  memcpy(&v, reinterpret_cast<const char*>(x.w) + j * sizeof(T), sizeof(T));
  return v;
}

template <typename T, int VEC>
__device__ __forceinline__ T loaded_value(const Pack<T, VEC>& x, int j) {
  return x.v[j];
}

// VEC elements from p, aligned to the vector: 16-byte accesses.
template <typename T, int VEC>
__device__ __forceinline__ Loaded<T, VEC> load_vector(const T* p) {
  if constexpr (std::is_same_v<Loaded<T, VEC>, Words<T, VEC>>)
    return load_words<T, VEC>(p);
  else
    return load_pack<T, VEC>(p);
}

// Element e of p where ok[e], else zero bits (+0.0), one at a time. Words are assembled with integer operations, so
// that both ways of loading leave the same registers (a Pack copied into words is split into 16-bit halves again).
template <typename T, int VEC>
__device__ __forceinline__ Loaded<T, VEC> load_elements(const T* p, const bool (&ok)[VEC]) {
  if constexpr (std::is_same_v<Loaded<T, VEC>, Words<T, VEC>>) {
    Words<T, VEC> out;
    if constexpr (sizeof(T) >= 4) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const T v = ok[e] ? p[e] : T{};
        memcpy(&out.w[e * sizeof(T) / 4], &v, sizeof(T));
      }
    } else {
      static_assert(sizeof(T) == 2, "16-bit elements, or whole words");
#pragma unroll
      for (int k = 0; k < VEC / 2; ++k) {
        const T v0 = ok[2 * k] ? p[2 * k] : T{}, v1 = ok[2 * k + 1] ? p[2 * k + 1] : T{};
        uint16_t lo, hi;
        memcpy(&lo, &v0, 2);
        memcpy(&hi, &v1, 2);
        out.w[k] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
    }
    return out;
  } else {
    Pack<T, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) out.v[e] = ok[e] ? p[e] : T{};
    return out;
  }
}

// g rounded to T at p: one vector store when `whole` (aligned, all VEC in range), else the first `left` elements one
// at a time.
template <typename T, int VEC>
__device__ __forceinline__ void store_elements(T* p, const float (&g)[VEC], bool whole, int64_t left) {
  if (whole) {
    if constexpr (std::is_same_v<Loaded<T, VEC>, Words<T, VEC>>) {
      store_words(p, words_from_floats<T, VEC>(g));
    } else {
      Pack<T, VEC> pk;
#pragma unroll
      for (int e = 0; e < VEC; ++e) pk.v[e] = from_float<T>(g[e]);
      store_pack(p, pk);
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e)
    if (e < left) p[e] = from_float<T>(g[e]);
}

// Elementwise max in T's own dtype (exact; on the device one max.bf16x2 / f16x2 per pair). A NaN loses to a number,
// as with fmaxf.
template <typename T, int VEC>
__device__ __forceinline__ Words<T, VEC> words_max(const Words<T, VEC>& a, const Words<T, VEC>& b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) {
    Words<T, VEC> out;
#pragma unroll
    for (int k = 0; k < Words<T, VEC>::kNum; ++k) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>)
        asm("max.bf16x2 %0, %1, %2;" : "=r"(out.w[k]) : "r"(a.w[k]), "r"(b.w[k]));
      else
        asm("max.f16x2 %0, %1, %2;" : "=r"(out.w[k]) : "r"(a.w[k]), "r"(b.w[k]));
    }
    return out;
  } else
#endif
  {
    float m[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) m[j] = fmaxf(word_elem(a, j), word_elem(b, j));
    return words_from_floats<T, VEC>(m);  // exact: each max is a value of T
  }
}

// 2^x and log2(x) on the special-function unit (ex2 / lg2.approx.ftz: a few ulp; results under 2^-126 flush to 0).
// The accurate expf / logf wrap the same instruction in several more (range reduction, denormal handling), and the
// pixel cross entropy computes one exponential per logit (11.5M for the NYUv2-like batch). Triton's exp and log are
// these instructions too. The CPU emulation of the kernels uses exp2f / log2f.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

__device__ __forceinline__ float fast_log2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return log2f(x);
#endif
}

// 1 / x (rcp.approx.ftz: about 1 ulp).
__device__ __forceinline__ float fast_rcp(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.0f / x;
#endif
}

// The natural logarithm through lg2.
__device__ __forceinline__ float fast_log(float x) { return fast_log2(x) * kLn2; }

// e^(a - b), exactly 1 for a == b. (2^(a * log2(e) - b * log2(e)), one instruction fewer, is not: the rounding of
// b * log2(e) scales every term of a softmax sum by the same 2^r, r up to |b| * 2^-24, and shifts the log-sum-exp by r:
// a one-class cross entropy came out -6e-8 instead of 0.)
__device__ __forceinline__ float exp_diff(float a, float b) { return fast_exp2((a - b) * kLog2e); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace cuda
}  // namespace fastmtl
