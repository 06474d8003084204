// Element-wise AdamW on [begin, end) of a span, in plain C++. Included by every ISA kernel for
// its tail, before that file switches its target, so it is always compiled for the baseline.
#pragma once

#include <cmath>
#include <cstdint>

#include "adam/adamw_cpu_kernels.h"
#include "cpu/convert.h"

namespace parallax::adam {
namespace {

inline float load_elem(const void* base, Elem t, int64_t i) {
  switch (t) {
    case Elem::kBF16: return cpu::bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    case Elem::kF16: return cpu::fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

inline void store_elem(void* base, Elem t, int64_t i, float v) {
  switch (t) {
    case Elem::kBF16: static_cast<uint16_t*>(base)[i] = cpu::float_to_bf16(v); break;
    case Elem::kF16: static_cast<uint16_t*>(base)[i] = cpu::float_to_fp16(v); break;
    default: static_cast<float*>(base)[i] = v;
  }
}

// Same operations, in the same order and with the same roundings, as torch.optim.AdamW's
// ATen kernels: p *= decay; m = lerp_(m, g, 1 - beta1) (see Hyper); v = fma(omb2 * g, g, v * beta2)
// (mul_, addcmul_); denom = sqrt(v) / sqrt(bc2) + eps; p += (-step_size * m) / denom (addcdiv_).
inline void adamw_scalar_range(const Hyper& h, const Span& s, int64_t begin, int64_t end) {
  const float omb2 = h.one_minus_beta2;
  for (int64_t i = begin; i < end; ++i) {
    float g = load_elem(s.grad, s.grad_type, i);
    if (h.maximize) g = -g;
    float p = s.param[i] * h.decay;
    const float m = std::fma(h.lerp_coeff, g - s.exp_avg[i], h.lerp_from_grad ? g : s.exp_avg[i]);
    const float v = std::fma(omb2 * g, g, s.exp_avg_sq[i] * h.beta2);
    const float denom = std::sqrt(v) / h.bc2_sqrt + h.eps;
    p = p + (-h.step_size * m) / denom;
    s.param[i] = p;
    s.exp_avg[i] = m;
    s.exp_avg_sq[i] = v;
    if (s.param_out != nullptr) store_elem(s.param_out, s.out_type, i, p);
  }
}

}  // namespace
}  // namespace parallax::adam
