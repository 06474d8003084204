// AVX-512F PagedAttention decode kernel (16 floats per vector). Everything after the target
// pragma is compiled for AVX-512 and is only reached when cpu::active_isa() allows it.
// Standard headers before the target pragma: their inline functions must not be compiled for it.
#include <cmath>
#include <algorithm>
#include <limits>

#include "paged_attention/paged_attention_cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f"))), apply_to = function)
#else
#pragma GCC push_options
// GCC 12 flags its own _mm512_undefined_* helpers (false positive, GCC bug 105593), here
// through _mm512_reduce_add_ps.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f")
#endif

#include "cpu/vec_avx512_inl.h"
#include "cpu/simd_avx512_inl.h"
#include "paged_attention/paged_attention_cpu_impl_inl.h"

namespace parallax::paged_attention {

AttendFn attend_kernel_avx512(Elem type, int64_t head_dim) { return kernel_for<cpu::SimdAvx512>(type, head_dim); }

}  // namespace parallax::paged_attention

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never selected by the dispatcher

namespace parallax::paged_attention {
AttendFn attend_kernel_avx512(Elem type, int64_t head_dim) { return attend_kernel_scalar(type, head_dim); }
}  // namespace parallax::paged_attention

#endif
