#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>

#include <c10/util/Exception.h>

namespace parallax::cpu {
namespace {

Isa parse(const std::string& name) {
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  TORCH_CHECK(false, "unknown CPU ISA '", name, "'; expected one of: scalar, avx2, avx512");
}

Isa detect() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // libgcc's checks include the OS's XCR0 state for AVX and AVX-512 registers.
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa initial_active() {
  const Isa best = detect();
  const char* env = std::getenv("PARALLAX_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const Isa wanted = parse(env);
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_active())};
  return slot;
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

void set_isa(const std::string& name) {
  const Isa wanted = parse(name);
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(detected_isa()), "this CPU does not support ",
              name, "; the best it supports is ", isa_name(detected_isa()));
  active_slot().store(static_cast<int>(wanted), std::memory_order_relaxed);
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace parallax::cpu
