// Scalar float <-> bf16/fp16 conversions with the exact rounding torch uses (round to nearest
// even; NaN -> quiet NaN), for the scalar kernels and the tails of the SIMD loops.
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

namespace parallax::cpu {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float fp16_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
inline uint16_t float_to_fp16(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }

}  // namespace parallax::cpu
