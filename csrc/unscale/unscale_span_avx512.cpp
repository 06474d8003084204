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

#include "cpu/vec_avx512_inl.h"

namespace parallax::unscale {
namespace {

using cpu::load16;
using cpu::store16;

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
