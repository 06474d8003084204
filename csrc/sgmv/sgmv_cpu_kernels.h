// The two halves of SGMV on CPU (Punica's shrink and expand) for a group of tokens that share one
// adapter slot, per instruction set. sgmv_cpu.cpp sorts the tokens by slot, cuts each slot's run
// into tiles, runs the tiles under OpenMP and picks the kernels for the active ISA.
#pragma once

#include <cstdint>

#include "cpu/elem.h"

namespace parallax::sgmv {

using cpu::Elem;

// Strides are in elements of type `w` (x, lora_a, lora_b and out share it). The innermost dim of
// x and lora_a (k) and of lora_b (n) is contiguous: sgmv_cpu.cpp copies an operand otherwise.
struct Problem {
  const void* x;      // x[t, k] at x + t * x_row + k
  int64_t x_row;
  const void* a;      // lora_a[s, r, k] at a + s * a_slot + r * a_row + k
  int64_t a_slot, a_row;
  const void* b;      // lora_b[s, n, r] at b + s * b_slot + r * b_row + n
  int64_t b_slot, b_row;
  const float* scaling;  // (S,)
  void* out;          // out[t, n] at out + t * out_row + n, of type `y`
  int64_t out_row;
  int64_t k, n, r;
  Elem w;
  Elem y;             // out's type: w, except when accumulating (sgmv_add_ into any float y)
  bool accumulate;    // out += update (sgmv_add_), else out = update
};

// u (m, R) fp32, row i = scaling[slot] * x[tokens[i]] @ lora_a[slot]^T.
using ShrinkFn = void (*)(const Problem& p, const int64_t* tokens, int64_t m, int64_t slot, float* u);
// out[tokens[i], n0:n1] = u[i] @ lora_b[slot, n0:n1]^T (fp32 accumulation, rounded once to w); with
// p.accumulate, out[tokens[i], n0:n1] += that (the sum in fp32, rounded once to y).
using ExpandFn = void (*)(const Problem& p, const int64_t* tokens, int64_t m, int64_t slot, const float* u,
                          int64_t n0, int64_t n1);

struct Kernels {
  ShrinkFn shrink;
  ExpandFn expand;
};

Kernels kernels_scalar();
Kernels kernels_avx2();
Kernels kernels_avx512();

}  // namespace parallax::sgmv
