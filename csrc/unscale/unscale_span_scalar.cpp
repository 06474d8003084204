// Portable unscale-and-check span kernel: the fallback for CPUs without AVX2.
#include "unscale/unscale_cpu_kernels.h"
#include "unscale/unscale_scalar_inl.h"

namespace parallax::unscale {

bool unscale_span_scalar(const Span& s, float inv_scale) { return unscale_scalar_range(s, inv_scale, 0, s.n); }

}  // namespace parallax::unscale
