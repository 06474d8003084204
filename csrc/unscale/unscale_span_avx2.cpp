// AVX2 + F16C unscale-and-check span kernel (8 floats per step). Everything after the target
// pragma is compiled for AVX2 and is only reached when cpu::active_isa() says the CPU supports it.
#include "unscale/unscale_cpu_kernels.h"
#include "unscale/unscale_scalar_inl.h"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif

namespace parallax::unscale {
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
inline __m128i to_bf16(__m256 x) {
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
    const __m128i h = T == Elem::kF16 ? _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT) : to_bf16(x);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), h);
  }
}

template <Elem T>
bool run(const Span& s, float inv_scale) {
  const __m256 scale = _mm256_set1_ps(inv_scale);
  // A float is inf or NaN exactly when its exponent bits are all ones (bf16 and fp16 widen
  // to fp32 keeping inf and NaN), so an integer compare per lane, OR-ed over the span.
  const __m256i exp_mask = _mm256_set1_epi32(0x7F800000);
  __m256i bad = _mm256_setzero_si256();
  const int64_t vec_end = s.n - s.n % 8;
  for (int64_t i = 0; i < vec_end; i += 8) {
    const __m256 x = load8<T>(s.data, i);
    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x), exp_mask), exp_mask));
    store8<T>(s.data, i, _mm256_mul_ps(x, scale));
  }
  const bool tail_bad = unscale_scalar_range(s, inv_scale, vec_end, s.n);
  return tail_bad || !_mm256_testz_si256(bad, bad);
}

}  // namespace

bool unscale_span_avx2(const Span& s, float inv_scale) {
  switch (s.type) {
    case Elem::kBF16: return run<Elem::kBF16>(s, inv_scale);
    case Elem::kF16: return run<Elem::kF16>(s, inv_scale);
    default: return run<Elem::kF32>(s, inv_scale);
  }
}

}  // namespace parallax::unscale

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never selected by the dispatcher

namespace parallax::unscale {
bool unscale_span_avx2(const Span& s, float inv_scale) { return unscale_span_scalar(s, inv_scale); }
}  // namespace parallax::unscale

#endif
