// AVX2 + FMA + F16C AdamW span kernel (8 floats per step). Everything after the target pragma
// is compiled for AVX2 and is only reached when cpu::active_isa() says the CPU supports it.
#include "adam/adamw_cpu_kernels.h"
#include "adam/adamw_scalar_inl.h"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace parallax::adam {
namespace {

inline __m256 load8(const void* base, Elem t, int64_t i) {
  if (t == Elem::kF32) return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
  if (t == Elem::kF16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
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

inline void store8(void* base, Elem t, int64_t i, __m256 x) {
  if (t == Elem::kF32) {
    _mm256_storeu_ps(static_cast<float*>(base) + i, x);
    return;
  }
  const __m128i h = t == Elem::kF16 ? _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT) : to_bf16(x);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), h);
}

}  // namespace

void adamw_span_avx2(const Hyper& h, const Span& s) {
  const __m256 beta2 = _mm256_set1_ps(h.beta2);
  const __m256 lerp_coeff = _mm256_set1_ps(h.lerp_coeff);
  const __m256 omb2 = _mm256_set1_ps(h.one_minus_beta2);
  const __m256 eps = _mm256_set1_ps(h.eps);
  const __m256 decay = _mm256_set1_ps(h.decay);
  const __m256 neg_step_size = _mm256_set1_ps(-h.step_size);
  const __m256 bc2_sqrt = _mm256_set1_ps(h.bc2_sqrt);
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(h.maximize ? static_cast<int>(0x80000000u) : 0));
  const int64_t vec_end = s.n - s.n % 8;
  for (int64_t i = 0; i < vec_end; i += 8) {
    const __m256 g = _mm256_xor_ps(load8(s.grad, s.grad_type, i), sign);
    const __m256 p = _mm256_mul_ps(_mm256_loadu_ps(s.param + i), decay);
    __m256 m = _mm256_loadu_ps(s.exp_avg + i);
    m = _mm256_fmadd_ps(lerp_coeff, _mm256_sub_ps(g, m), h.lerp_from_grad ? g : m);
    // Rounded as ATen's kernels round (lerp_ and addcmul_ are FMAs, mul_ and addcdiv_ are not),
    // so results match torch.optim.AdamW bit for bit on most elements instead of drifting.
    const __m256 v = _mm256_fmadd_ps(_mm256_mul_ps(omb2, g), g, _mm256_mul_ps(_mm256_loadu_ps(s.exp_avg_sq + i), beta2));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2_sqrt), eps);
    const __m256 p_new = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(neg_step_size, m), denom));
    _mm256_storeu_ps(s.param + i, p_new);
    _mm256_storeu_ps(s.exp_avg + i, m);
    _mm256_storeu_ps(s.exp_avg_sq + i, v);
    if (s.param_out != nullptr) store8(s.param_out, s.out_type, i, p_new);
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
void adamw_span_avx2(const Hyper& h, const Span& s) { adamw_span_scalar(h, s); }
}  // namespace parallax::adam

#endif
