// AVX-512F AdamW span kernel (16 floats per step). Everything after the target pragma is
// compiled for AVX-512 and is only reached when cpu::active_isa() says the CPU supports it.
#include "adam/adamw_cpu_kernels.h"
#include "adam/adamw_scalar_inl.h"

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

namespace parallax::adam {
namespace {

inline __m512 load16(const void* base, Elem t, int64_t i) {
  if (t == Elem::kF32) return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
  if (t == Elem::kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Round to nearest even, NaN -> 0x7FC0: bit-identical to torch's float -> bfloat16.
inline __m256i to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

inline void store16(void* base, Elem t, int64_t i, __m512 x) {
  if (t == Elem::kF32) {
    _mm512_storeu_ps(static_cast<float*>(base) + i, x);
    return;
  }
  const __m256i h = t == Elem::kF16 ? _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                    : to_bf16(x);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i), h);
}

}  // namespace

void adamw_span_avx512(const Hyper& h, const Span& s) {
  const __m512 beta2 = _mm512_set1_ps(h.beta2);
  const __m512 lerp_coeff = _mm512_set1_ps(h.lerp_coeff);
  const __m512 omb2 = _mm512_set1_ps(h.one_minus_beta2);
  const __m512 eps = _mm512_set1_ps(h.eps);
  const __m512 decay = _mm512_set1_ps(h.decay);
  const __m512 neg_step_size = _mm512_set1_ps(-h.step_size);
  const __m512 bc2_sqrt = _mm512_set1_ps(h.bc2_sqrt);
  const __m512i sign = _mm512_set1_epi32(h.maximize ? static_cast<int>(0x80000000u) : 0);
  const int64_t vec_end = s.n - s.n % 16;
  for (int64_t i = 0; i < vec_end; i += 16) {
    const __m512 g = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(load16(s.grad, s.grad_type, i)), sign));
    const __m512 p = _mm512_mul_ps(_mm512_loadu_ps(s.param + i), decay);
    __m512 m = _mm512_loadu_ps(s.exp_avg + i);
    m = _mm512_fmadd_ps(lerp_coeff, _mm512_sub_ps(g, m), h.lerp_from_grad ? g : m);
    // Rounded as ATen's kernels round (lerp_ and addcmul_ are FMAs, mul_ and addcdiv_ are not),
    // so results match torch.optim.AdamW bit for bit on most elements instead of drifting.
    const __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(omb2, g), g, _mm512_mul_ps(_mm512_loadu_ps(s.exp_avg_sq + i), beta2));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), bc2_sqrt), eps);
    const __m512 p_new = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(neg_step_size, m), denom));
    _mm512_storeu_ps(s.param + i, p_new);
    _mm512_storeu_ps(s.exp_avg + i, m);
    _mm512_storeu_ps(s.exp_avg_sq + i, v);
    if (s.param_out != nullptr) store16(s.param_out, s.out_type, i, p_new);
  }
  adamw_scalar_range(h, s, vec_end, s.n);
}

}  // namespace parallax::adam

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never selected by the dispatcher

namespace parallax::adam {
void adamw_span_avx512(const Hyper& h, const Span& s) { adamw_span_scalar(h, s); }
}  // namespace parallax::adam

#endif
