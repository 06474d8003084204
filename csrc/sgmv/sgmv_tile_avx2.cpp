// AVX2 + FMA + F16C SGMV tile kernels (8 floats per vector). Everything after the target pragma is
// compiled for AVX2 and is only reached when cpu::active_isa() says the CPU supports it.
#include "sgmv/sgmv_cpu_kernels.h"
#include "sgmv/sgmv_scalar_inl.h"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#include "cpu/vec_avx2_inl.h"
#include "sgmv/sgmv_tile_inl.h"

namespace parallax::sgmv {
namespace {

struct V256 {
  using reg = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kRanks = 2;  // 4 tokens x 2 ranks = 8 accumulators of the 16 ymm registers
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float v) { return _mm256_set1_ps(v); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  template <Elem W>
  static reg load(const void* base, int64_t i) { return cpu::load8<W>(base, i); }
  template <Elem W>
  static void store(void* base, int64_t i, reg v) { cpu::store8<W>(base, i, v); }
};

}  // namespace

Kernels kernels_avx2() { return {&shrink<V256>, &expand<V256>}; }

}  // namespace parallax::sgmv

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never selected by the dispatcher

namespace parallax::sgmv {
Kernels kernels_avx2() { return kernels_scalar(); }
}  // namespace parallax::sgmv

#endif
