// Unscale-and-check over one contiguous span, per instruction set. unscale_cpu.cpp splits the
// gradient list into spans, runs them under OpenMP and picks the kernel for the active ISA.
//
// Why per-ISA files (as csrc/adam) rather than GCC target_clones (as csrc/stream): the bf16 and
// fp16 loads and stores need hand-written intrinsics to vectorise, and tests must be able to run
// every path on one machine (cpu::set_isa), which target_clones' loader-time choice does not allow.
#pragma once

#include <cstdint>

#include "cpu/elem.h"

namespace parallax::unscale {

using cpu::Elem;

// `n` elements of type `type` at `data`, multiplied by inv_scale in place (computed in fp32).
struct Span {
  void* data;
  int64_t n;
  Elem type;
};

// Each returns true when the span held an inf or NaN *before* unscaling.
bool unscale_span_scalar(const Span& s, float inv_scale);
bool unscale_span_avx2(const Span& s, float inv_scale);
bool unscale_span_avx512(const Span& s, float inv_scale);

}  // namespace parallax::unscale
