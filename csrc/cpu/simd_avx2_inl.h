// SimdAvx2: the AVX2 + FMA + F16C: 8 fp32 lanes vector type of the ISA-generic CPU kernels (paged
// attention, sgmv); its interface is described in cpu/simd_scalar_inl.h. Include it after the
// file's target pragma (it compiles for that ISA), after cpu/vec_avx2_inl.h.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/elem.h"
#include "cpu/vec_avx2_inl.h"

namespace parallax::cpu {
namespace {

struct SimdAvx2 {
  using Reg = __m256;
  static constexpr int kWidth = 8;

  template <Elem T>
  static __m256 load(const void* base, int64_t i) { return cpu::load8<T>(base, i); }
  template <Elem T>
  static void store(void* base, int64_t i, __m256 x) { cpu::store8<T>(base, i, x); }
  static __m256 zero() { return _mm256_setzero_ps(); }
  static __m256 set1(float x) { return _mm256_set1_ps(x); }
  static __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
  static __m256 sub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
  static __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
  static __m256 max(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
  static __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
  static float reduce_add(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
  }
  static float reduce_max(__m256 x) {
    __m128 r = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
  }
  // Cephes' expf: 2^n * p(r) with n = floor(x log2(e) + 1/2), r = x - n ln(2) in two parts, p a
  // degree-7 polynomial; ~1 ulp. x is clamped to [-87.3, 88] (2^-126 .. below inf); a NaN stays
  // NaN (the min/max return their second operand when one is NaN).
  static __m256 exp(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
    x = _mm256_max_ps(_mm256_set1_ps(-87.3365447504f), x);
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  }
};

}  // namespace
}  // namespace parallax::cpu
