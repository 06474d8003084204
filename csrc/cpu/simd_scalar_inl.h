// One-element loads and stores of fp32/bf16/fp16 memory as float (torch's rounding), and
// SimdScalar: the one-float "vector" type of the ISA-generic CPU kernels (paged attention, sgmv),
// their fallback for CPUs without AVX2. Every SIMD type (cpu/simd_avx2_inl.h, cpu/simd_avx512_inl.h)
// offers the same: Reg, kWidth, load<T>/store<T> (kWidth elements of type T as fp32 lanes), zero,
// set1, add, sub, mul, max, fmadd (a * b + c), reduce_add, reduce_max, exp. The anonymous namespace
// keeps each translation unit's copy private (no ODR merging of copies compiled for other ISAs).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/convert.h"
#include "cpu/elem.h"

namespace parallax::cpu {
namespace {

template <Elem T>
inline float load1(const void* base, int64_t i) {
  if constexpr (T == Elem::kF32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (T == Elem::kBF16) {
    return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

template <Elem T>
inline void store1(void* base, int64_t i, float v) {
  if constexpr (T == Elem::kF32) {
    static_cast<float*>(base)[i] = v;
  } else if constexpr (T == Elem::kBF16) {
    static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
  } else {
    static_cast<uint16_t*>(base)[i] = float_to_fp16(v);
  }
}

struct SimdScalar {
  using Reg = float;
  static constexpr int kWidth = 1;

  template <Elem T>
  static float load(const void* base, int64_t i) { return load1<T>(base, i); }
  template <Elem T>
  static void store(void* base, int64_t i, float x) { store1<T>(base, i, x); }
  static float zero() { return 0.0f; }
  static float set1(float x) { return x; }
  static float add(float a, float b) { return a + b; }
  static float sub(float a, float b) { return a - b; }
  static float mul(float a, float b) { return a * b; }
  static float max(float a, float b) { return std::max(a, b); }
  // Two roundings: std::fma is a library call on baseline x86-64.
  static float fmadd(float a, float b, float c) { return a * b + c; }
  static float reduce_add(float x) { return x; }
  static float reduce_max(float x) { return x; }
  static float exp(float x) { return std::exp(x); }
};

}  // namespace
}  // namespace parallax::cpu
