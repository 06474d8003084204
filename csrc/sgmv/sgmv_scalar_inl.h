// One-element loads and stores of fp32/bf16/fp16 memory as float, for the scalar kernel and the
// tails of the SIMD loops. Included by every ISA file before it switches its target, so these are
// always compiled for the baseline; the anonymous namespace keeps each file's copy private.
#pragma once

#include <cstdint>

#include "cpu/convert.h"
#include "sgmv/sgmv_cpu_kernels.h"

namespace parallax::sgmv {
namespace {

template <Elem W>
constexpr int64_t kBytes = W == Elem::kF32 ? 4 : 2;

template <Elem W>
inline float load1(const void* base, int64_t i) {
  if constexpr (W == Elem::kF32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (W == Elem::kBF16) {
    return cpu::bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return cpu::fp16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

template <Elem W>
inline void store1(void* base, int64_t i, float v) {
  if constexpr (W == Elem::kF32) {
    static_cast<float*>(base)[i] = v;
  } else if constexpr (W == Elem::kBF16) {
    static_cast<uint16_t*>(base)[i] = cpu::float_to_bf16(v);
  } else {
    static_cast<uint16_t*>(base)[i] = cpu::float_to_fp16(v);
  }
}

}  // namespace
}  // namespace parallax::sgmv
