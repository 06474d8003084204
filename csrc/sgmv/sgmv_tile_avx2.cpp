// AVX2 + FMA + F16C SGMV tile kernels (8 floats per vector). Everything after the target pragma is
// compiled for AVX2 and is only reached when cpu::active_isa() says the CPU supports it.
#include "sgmv/sgmv_cpu_kernels.h"
#include "cpu/simd_scalar_inl.h"

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
#include "sgmv/sgmv_tile_inl.h"

namespace parallax::sgmv {

Kernels kernels_avx2() { return {&shrink<cpu::SimdAvx2>, &expand<cpu::SimdAvx2>}; }

}  // namespace parallax::sgmv

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never selected by the dispatcher

namespace parallax::sgmv {
Kernels kernels_avx2() { return kernels_scalar(); }
}  // namespace parallax::sgmv

#endif
