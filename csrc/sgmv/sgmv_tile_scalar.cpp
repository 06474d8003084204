// Portable SGMV tile kernels: the fallback for CPUs without AVX2 (plain C++, one float a "vector").
#include "sgmv/sgmv_cpu_kernels.h"
#include "sgmv/sgmv_scalar_inl.h"
#include "sgmv/sgmv_tile_inl.h"

namespace parallax::sgmv {
namespace {

struct VScalar {
  using reg = float;
  static constexpr int kLanes = 1;
  static constexpr int kRanks = 4;
  static reg zero() { return 0.0f; }
  static reg set1(float v) { return v; }
  static reg fma(reg a, reg b, reg c) { return a * b + c; }  // two roundings (-ffp-contract=off)
  static float sum(reg a) { return a; }
  template <Elem W>
  static reg load(const void* base, int64_t i) { return load1<W>(base, i); }
  template <Elem W>
  static void store(void* base, int64_t i, reg v) { store1<W>(base, i, v); }
};

}  // namespace

Kernels kernels_scalar() { return {&shrink<VScalar>, &expand<VScalar>}; }

}  // namespace parallax::sgmv
