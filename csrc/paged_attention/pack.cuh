// 16-byte vectors of cache elements: one load instruction per lane, unpacked to fp32 with the
// shared conversions of cuda/convert.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/convert.cuh"

namespace parallax::paged_attention {

// Read-only 16-byte load through the non-coherent (texture) path; `ptr` must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ uint4 load16(const T* ptr) {
  return __ldg(reinterpret_cast<const uint4*>(ptr));
}

// kElems elements of T in one 16-byte vector; unpack converts them to fp32 in order.
template <typename T>
struct Pack {
  static constexpr int kElems = static_cast<int>(16 / sizeof(T));
  __device__ __forceinline__ static void unpack(const uint4& r, float* f) {
    const T* e = reinterpret_cast<const T*>(&r);  // register-resident: the cast compiles to moves
#pragma unroll
    for (int i = 0; i < kElems; ++i) f[i] = parallax::cuda::to_float<T>(e[i]);
  }
};

}  // namespace parallax::paged_attention
