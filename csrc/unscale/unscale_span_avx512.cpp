// AVX-512F unscale-and-check span kernel (16 floats per step). Everything after the target
// pragma is compiled for AVX-512 and is only reached when cpu::active_isa() says the CPU supports it.
#include "unscale/unscale_cpu_kernels.h"
#include "unscale/unscale_scalar_inl.h"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f"))), apply_to = function)
#else
#pragma GCC push_options
// GCC 12 flags its own _mm512_undefined_* helpers (false positive, GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f")
#endif

namespace parallax::unscale {
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
inline __m256i to_bf16(__m512 x) {
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
                                      : to_bf16(x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i), h);
  }
}

template <Elem T>
bool run(const Span& s, float inv_scale) {
  const __m512 scale = _mm512_set1_ps(inv_scale);
  // A float is inf or NaN exactly when its exponent bits are all ones (bf16 and fp16 widen
  // to fp32 keeping inf and NaN), so an integer compare per lane, OR-ed into a mask.
  const __m512i exp_mask = _mm512_set1_epi32(0x7F800000);
  __mmask16 bad = 0;
  const int64_t vec_end = s.n - s.n % 16;
  for (int64_t i = 0; i < vec_end; i += 16) {
    const __m512 x = load16<T>(s.data, i);
    bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(x), exp_mask), exp_mask);
    store16<T>(s.data, i, _mm512_mul_ps(x, scale));
  }
  const bool tail_bad = unscale_scalar_range(s, inv_scale, vec_end, s.n);
  return tail_bad || bad != 0;
}

}  // namespace

bool unscale_span_avx512(const Span& s, float inv_scale) {
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
bool unscale_span_avx512(const Span& s, float inv_scale) { return unscale_span_scalar(s, inv_scale); }
}  // namespace parallax::unscale

#endif
