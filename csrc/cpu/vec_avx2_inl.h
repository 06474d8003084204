// 8-lane fp32 loads and stores of fp32/bf16/fp16 memory for AVX2 + F16C kernels. Include it after
// the file's `#pragma GCC target("avx2,...,f16c")` so these compile for AVX2 too; the anonymous
// namespace keeps each translation unit's copy private (no ODR merging with baseline code).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/elem.h"

namespace parallax::cpu {
namespace {

template <Elem T>
inline __m256 load8(const void* base, int64_t i) {
  if constexpr (T == Elem::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    if constexpr (T == Elem::kF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// Round to nearest even, NaN -> 0x7FC0: bit-identical to torch's float -> bfloat16.
inline __m128i to_bf16_x8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

template <Elem T>
inline void store8(void* base, int64_t i, __m256 x) {
  if constexpr (T == Elem::kF32) {
    _mm256_storeu_ps(static_cast<float*>(base) + i, x);
  } else {
    const __m128i h = T == Elem::kF16 ? _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT) : to_bf16_x8(x);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), h);
  }
}

}  // namespace
}  // namespace parallax::cpu
