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

#include "cpu/vec_avx2_inl.h"

namespace parallax::unscale {
namespace {

using cpu::load8;
using cpu::store8;

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
