// Element types the AdamW kernels read and write besides fp32 state, shared by CPU and CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace parallax::adam {

enum class Elem : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline Elem elem_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return Elem::kF32;
    case at::kBFloat16: return Elem::kBF16;
    case at::kHalf: return Elem::kF16;
    default:
      TORCH_CHECK(false, "parallax::adamw_: ", what, " must be float32, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

}  // namespace parallax::adam
