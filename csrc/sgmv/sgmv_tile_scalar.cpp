// Portable SGMV tile kernels: the fallback for CPUs without AVX2 (plain C++, one float a "vector").
#include "sgmv/sgmv_cpu_kernels.h"
#include "cpu/simd_scalar_inl.h"
#include "sgmv/sgmv_tile_inl.h"

namespace parallax::sgmv {

Kernels kernels_scalar() { return {&shrink<cpu::SimdScalar>, &expand<cpu::SimdScalar>}; }

}  // namespace parallax::sgmv
