// One AdamW step over one contiguous span, per instruction set. adamw_cpu.cpp splits the
// tensor list into spans, runs them under OpenMP and picks the kernel for the active ISA.
#pragma once

#include <cstdint>

#include "adam/adamw_elem.h"
#include "adam/adamw_hyper.h"

namespace parallax::adam {


// param, exp_avg and exp_avg_sq are fp32 and updated in place. grad is `grad_type`. When
// `param_out` is not null the updated parameter is also written there as `out_type`
// (the low-precision model weight next to its fp32 master), in the same pass.
struct Span {
  float* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* param_out;
  int64_t n;
  Elem grad_type;
  Elem out_type;
};

void adamw_span_scalar(const Hyper& h, const Span& s);
void adamw_span_avx2(const Hyper& h, const Span& s);
void adamw_span_avx512(const Hyper& h, const Span& s);

}  // namespace parallax::adam
