// Run-time choice of the CPU instruction set for the SIMD kernels.
//
// The extension is compiled for baseline x86-64; the AVX2 and AVX-512 kernels live in their own
// translation units compiled for those targets, and are only called when the CPU (and the OS,
// through XCR0) supports them. So a wheel built on one machine never crashes on an older one.
#pragma once

#include <string>

namespace parallax::cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Best ISA this CPU supports.
Isa detected_isa();
// ISA the kernels use now: the detected one unless lowered by PARALLAX_CPU_ISA or set_isa().
Isa active_isa();
// Force an ISA (tests use this to run every path). Throws if the CPU lacks it.
void set_isa(const std::string& name);
std::string isa_name(Isa isa);

}  // namespace parallax::cpu
