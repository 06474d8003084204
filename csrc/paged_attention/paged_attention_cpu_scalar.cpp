// Portable PagedAttention decode kernel (one float per "vector"): the fallback for CPUs without
// AVX2, and the reference the SIMD kernels are tested against in tests/ops.
#include "cpu/simd_scalar_inl.h"
#include "paged_attention/paged_attention_cpu.h"
#include "paged_attention/paged_attention_cpu_impl_inl.h"

namespace parallax::paged_attention {

AttendFn attend_kernel_scalar(Elem type, int64_t head_dim) { return kernel_for<cpu::SimdScalar>(type, head_dim); }

}  // namespace parallax::paged_attention
