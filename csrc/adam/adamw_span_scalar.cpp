// Portable AdamW span kernel: the fallback for CPUs without AVX2, and the tail of SIMD loops.
#include <cmath>

#include "adam/adamw_cpu_kernels.h"
#include "adam/adamw_scalar_inl.h"

namespace parallax::adam {

void adamw_span_scalar(const Hyper& h, const Span& s) { adamw_scalar_range(h, s, 0, s.n); }

}  // namespace parallax::adam
