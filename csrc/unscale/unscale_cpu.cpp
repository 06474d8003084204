// CPU implementation of parallax::unscale_: one pass over a whole list of gradients that
// multiplies by inv_scale and notes any inf/NaN. The list is cut into spans of at most kSpan
// elements, spread over OpenMP threads, and each span runs the SIMD kernel of the active ISA.
#include <algorithm>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "unscale/unscale_cpu_kernels.h"

namespace parallax::unscale {
namespace {

// 64K elements per span, as the AdamW kernel: amortises scheduling and still spreads a list of a
// few large tensors over all threads.
constexpr int64_t kSpan = 1 << 16;

using SpanFn = bool (*)(const Span&, float);

SpanFn kernel_for_active_isa() {
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512: return unscale_span_avx512;
    case cpu::Isa::kAvx2: return unscale_span_avx2;
    default: return unscale_span_scalar;
  }
}

void unscale_cpu(at::TensorList grads, at::Tensor& found_inf, double inv_scale) {
  TORCH_CHECK(found_inf.device().is_cpu() && found_inf.scalar_type() == at::kFloat && found_inf.numel() == 1,
              "parallax::unscale_: found_inf must be a one-element float32 CPU tensor, got ",
              found_inf.numel(), " elements of ", found_inf.scalar_type(), " on ", found_inf.device());
  std::vector<Span> spans;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.device().is_cpu() && g.is_contiguous(), "parallax::unscale_: grads[", i,
                "] must be a contiguous CPU tensor, got one on ", g.device(),
                g.is_contiguous() ? "" : " (non-contiguous)");
    const std::string what = "grads[" + std::to_string(i) + "]";
    const Elem type = cpu::elem_of(g, "parallax::unscale_", what.c_str());
    const int64_t numel = g.numel();
    char* base = static_cast<char*>(g.data_ptr());
    for (int64_t off = 0; off < numel; off += kSpan)
      spans.push_back(Span{base + off * g.element_size(), std::min(kSpan, numel - off), type});
  }

  const SpanFn kernel = kernel_for_active_isa();
  const float scale = static_cast<float>(inv_scale);  // as torch's mul_ rounds a Python float
  const int64_t count = static_cast<int64_t>(spans.size());
  // Honour torch.set_num_threads(); static schedule keeps each thread on a contiguous range.
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(count, 1)));
  bool found = false;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(|| : found)
  for (int64_t k = 0; k < count; ++k) found = kernel(spans[k], scale) || found;
  if (found) found_inf.data_ptr<float>()[0] = 1.0f;
}

}  // namespace

TORCH_LIBRARY_IMPL(parallax, CPU, m) { m.impl("unscale_", &unscale_cpu); }

}  // namespace parallax::unscale
