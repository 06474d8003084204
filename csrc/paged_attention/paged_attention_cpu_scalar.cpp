// Portable PagedAttention decode kernel (one float per "vector"): the fallback for CPUs without
// AVX2, and the reference the SIMD kernels are tested against in tests/ops.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/convert.h"
#include "paged_attention/paged_attention_cpu.h"
#include "paged_attention/paged_attention_cpu_impl_inl.h"

namespace parallax::paged_attention {
namespace {

struct VecScalar {
  using Reg = float;
  static constexpr int kWidth = 1;

  template <Elem T>
  static float load(const void* base, int64_t i) {
    if constexpr (T == Elem::kF32) return static_cast<const float*>(base)[i];
    const uint16_t h = static_cast<const uint16_t*>(base)[i];
    if constexpr (T == Elem::kF16) return cpu::fp16_to_float(h);
    return cpu::bf16_to_float(h);
  }
  template <Elem T>
  static void store(void* base, int64_t i, float x) {
    if constexpr (T == Elem::kF32) {
      static_cast<float*>(base)[i] = x;
    } else {
      static_cast<uint16_t*>(base)[i] = T == Elem::kF16 ? cpu::float_to_fp16(x) : cpu::float_to_bf16(x);
    }
  }
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

AttendFn attend_kernel_scalar(Elem type, int64_t head_dim) { return kernel_for<VecScalar>(type, head_dim); }

}  // namespace parallax::paged_attention
