// SimdAvx512: the AVX-512F: 16 fp32 lanes vector type of the ISA-generic CPU kernels (paged
// attention, sgmv); its interface is described in cpu/simd_scalar_inl.h. Include it after the
// file's target pragma (it compiles for that ISA), after cpu/vec_avx512_inl.h.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/elem.h"
#include "cpu/vec_avx512_inl.h"

namespace parallax::cpu {
namespace {

struct SimdAvx512 {
  using Reg = __m512;
  static constexpr int kWidth = 16;

  template <Elem T>
  static __m512 load(const void* base, int64_t i) { return cpu::load16<T>(base, i); }
  template <Elem T>
  static void store(void* base, int64_t i, __m512 x) { cpu::store16<T>(base, i, x); }
  static __m512 zero() { return _mm512_setzero_ps(); }
  static __m512 set1(float x) { return _mm512_set1_ps(x); }
  static __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
  static __m512 sub(__m512 a, __m512 b) { return _mm512_sub_ps(a, b); }
  static __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
  static __m512 max(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
  static __m512 fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
  static float reduce_add(__m512 x) { return _mm512_reduce_add_ps(x); }
  static float reduce_max(__m512 x) { return _mm512_reduce_max_ps(x); }
  // Cephes' expf as in the AVX2 kernel (~1 ulp), with the 2^n scaling done by vscalefps.
  static __m512 exp(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
    x = _mm512_max_ps(_mm512_set1_ps(-87.3365447504f), x);
    const __m512 n = _mm512_roundscale_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
  }
};

}  // namespace
}  // namespace parallax::cpu
