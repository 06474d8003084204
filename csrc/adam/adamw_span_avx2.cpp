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

#include "cpu/vec_avx2_inl.h"

namespace parallax::adam {
namespace {

using cpu::load8;
using cpu::store8;

template <Elem G, Elem O, bool kHasOut>
void run(const Hyper& h, const Span& s) {
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
    const __m256 g = _mm256_xor_ps(load8<G>(s.grad, i), sign);
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
    if constexpr (kHasOut) store8<O>(s.param_out, i, p_new);
  }
  adamw_scalar_range(h, s, vec_end, s.n);
}

template <Elem G>
void with_out(const Hyper& h, const Span& s) {
  if (s.param_out == nullptr) return run<G, Elem::kF32, false>(h, s);
  switch (s.out_type) {
    case Elem::kBF16: return run<G, Elem::kBF16, true>(h, s);
    case Elem::kF16: return run<G, Elem::kF16, true>(h, s);
    default: return run<G, Elem::kF32, true>(h, s);
  }
}

}  // namespace

void adamw_span_avx2(const Hyper& h, const Span& s) {
  switch (s.grad_type) {
    case Elem::kBF16: return with_out<Elem::kBF16>(h, s);
    case Elem::kF16: return with_out<Elem::kF16>(h, s);
    default: return with_out<Elem::kF32>(h, s);
  }
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
