// 16-lane fp32 loads and stores of fp32/bf16/fp16 memory for AVX-512F kernels. Include it after
// the file's `#pragma GCC target("avx512f")` so these compile for AVX-512 too; the anonymous
// namespace keeps each translation unit's copy private (no ODR merging with baseline code).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/elem.h"

namespace parallax::cpu {
namespace {

template <Elem T>
inline __m512 load16(const void* base, int64_t i) {
  if constexpr (T == Elem::kF32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
    if constexpr (T == Elem::kF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// Round to nearest even, NaN -> 0x7FC0: bit-identical to torch's float -> bfloat16.
inline __m256i to_bf16_x16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

template <Elem T>
inline void store16(void* base, int64_t i, __m512 x) {
  if constexpr (T == Elem::kF32) {
    _mm512_storeu_ps(static_cast<float*>(base) + i, x);
  } else {
    const __m256i h = T == Elem::kF16 ? _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                      : to_bf16_x16(x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i), h);
  }
}

}  // namespace
}  // namespace parallax::cpu
