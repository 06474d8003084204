// AVX2 + FMA + F16C PagedAttention decode kernel (8 floats per vector). Everything after the
// target pragma is compiled for AVX2 and is only reached when cpu::active_isa() allows it.
// Standard headers before the target pragma: their inline functions must not be compiled for it.
#include <cmath>
#include <algorithm>
#include <limits>

#include "paged_attention/paged_attention_cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#include "cpu/vec_avx2_inl.h"
#include "cpu/simd_avx2_inl.h"
#include "paged_attention/paged_attention_cpu_impl_inl.h"

namespace parallax::paged_attention {

AttendFn attend_kernel_avx2(Elem type, int64_t head_dim) { return kernel_for<cpu::SimdAvx2>(type, head_dim); }

}  // namespace parallax::paged_attention

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never selected by the dispatcher

namespace parallax::paged_attention {
AttendFn attend_kernel_avx2(Elem type, int64_t head_dim) { return attend_kernel_scalar(type, head_dim); }
}  // namespace parallax::paged_attention

#endif
