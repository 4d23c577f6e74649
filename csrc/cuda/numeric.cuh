// Scalar conversions, vector packs and launch arithmetic shared by the CUDA kernels (conv_bias_relu.cu,
// relu_bias_grad.cu, masked_loss.cu). torch builds with the implicit half / bfloat16 conversions disabled, hence the
// explicit ones. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace cuda
}  // namespace fastmtl
