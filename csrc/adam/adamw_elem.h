// AdamW's element types: the shared cpu::Elem, with errors naming this operator.
#pragma once

#include "cpu/elem.h"

namespace parallax::adam {

using cpu::Elem;

inline Elem elem_of(const at::Tensor& t, const char* what) { return cpu::elem_of(t, "parallax::adamw_", what); }

}  // namespace parallax::adam
