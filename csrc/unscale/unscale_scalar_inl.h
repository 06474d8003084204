// Unscale-and-check on [begin, end) of a span, in plain C++. Included by every ISA kernel for its
// tail, before that file switches its target, so it is always compiled for the baseline.
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/convert.h"
#include "unscale/unscale_cpu_kernels.h"

namespace parallax::unscale {
namespace {

// x * inv_scale rounded once to fp32 (as torch's mul_), then to the span's dtype with torch's
// rounding; the check looks at x before the multiply, as torch's _amp_foreach_non_finite_check_and_unscale_.
inline bool unscale_scalar_range(const Span& s, float inv_scale, int64_t begin, int64_t end) {
  bool bad = false;
  switch (s.type) {
    case Elem::kBF16: {
      uint16_t* p = static_cast<uint16_t*>(s.data);
      for (int64_t i = begin; i < end; ++i) {
        const float x = cpu::bf16_to_float(p[i]);
        bad |= !std::isfinite(x);
        p[i] = cpu::float_to_bf16(x * inv_scale);
      }
      break;
    }
    case Elem::kF16: {
      uint16_t* p = static_cast<uint16_t*>(s.data);
      for (int64_t i = begin; i < end; ++i) {
        const float x = cpu::fp16_to_float(p[i]);
        bad |= !std::isfinite(x);
        p[i] = cpu::float_to_fp16(x * inv_scale);
      }
      break;
    }
    default: {
      float* p = static_cast<float*>(s.data);
      for (int64_t i = begin; i < end; ++i) {
        const float x = p[i];
        bad |= !std::isfinite(x);
        p[i] = x * inv_scale;
      }
    }
  }
  return bad;
}

}  // namespace
}  // namespace parallax::unscale
