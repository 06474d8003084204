// Element types the kernels read and write besides fp32 (gradients, low-precision parameters).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace parallax::cpu {

enum class Elem : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Bytes of one element of type T.
template <Elem T>
constexpr int64_t kElemBytes = T == Elem::kF32 ? 4 : 2;

// `op` and `what` name the operator and the argument in the error.
inline Elem elem_of(const at::Tensor& t, const char* op, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return Elem::kF32;
    case at::kBFloat16: return Elem::kBF16;
    case at::kHalf: return Elem::kF16;
    default:
      TORCH_CHECK(false, op, ": ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

}  // namespace parallax::cpu
