// AVX-512F SGMV tile kernels (16 floats per vector). Everything after the target pragma is
// compiled for AVX-512 and is only reached when cpu::active_isa() says the CPU supports it.
#include "sgmv/sgmv_cpu_kernels.h"
#include "cpu/simd_scalar_inl.h"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f"))), apply_to = function)
#else
#pragma GCC push_options
// GCC 12 flags its own _mm512_undefined_* helpers (false positive, GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// and _mm512_reduce_add_ps's own _mm512_undefined_* helpers (plain -Wuninitialized in GCC 12).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f")
#endif

#include "cpu/vec_avx512_inl.h"
#include "cpu/simd_avx512_inl.h"
#include "sgmv/sgmv_tile_inl.h"

namespace parallax::sgmv {

Kernels kernels_avx512() { return {&shrink<cpu::SimdAvx512>, &expand<cpu::SimdAvx512>}; }

}  // namespace parallax::sgmv

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never selected by the dispatcher

namespace parallax::sgmv {
Kernels kernels_avx512() { return kernels_scalar(); }
}  // namespace parallax::sgmv

#endif
