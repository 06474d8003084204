// CPU implementation of parallax::adamw_: one pass over memory for a whole list of tensors.
// The list is cut into spans of at most kSpan elements, spread over OpenMP threads, and each
// span runs the SIMD kernel of the active ISA (see cpu/isa.h).
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "adam/adamw_cpu_kernels.h"
#include "adam/adamw_elem.h"
#include "cpu/isa.h"

namespace parallax::adam {
namespace {

// 64K floats = 256 KiB per array per span: large enough to amortise scheduling, small enough
// that a list of a few large tensors still spreads over all threads.
constexpr int64_t kSpan = 1 << 16;

void check_state(const at::Tensor& t, const at::Tensor& param, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "parallax::adamw_: ", what, "[", i, "] must be a contiguous float32 CPU tensor, got ",
              t.scalar_type(), " on ", t.device(), t.is_contiguous() ? "" : " (non-contiguous)");
  TORCH_CHECK(t.numel() == param.numel(), "parallax::adamw_: ", what, "[", i, "] has ", t.numel(),
              " elements but params[", i, "] has ", param.numel());
}

using SpanFn = void (*)(const Hyper&, const Span&);

SpanFn kernel_for_active_isa() {
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512: return adamw_span_avx512;
    case cpu::Isa::kAvx2: return adamw_span_avx2;
    default: return adamw_span_scalar;
  }
}

void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList params_out, double lr, double beta1,
               double beta2, double eps, double weight_decay, double step, bool maximize) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "parallax::adamw_: params, grads, exp_avgs and exp_avg_sqs must have the same length, got ",
              n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size());
  TORCH_CHECK(params_out.empty() || params_out.size() == n,
              "parallax::adamw_: params_out must be empty or as long as params (", n, "), got ",
              params_out.size());
  TORCH_CHECK(step >= 1, "parallax::adamw_: step must be >= 1, got ", step);

  const Hyper h = make_hyper(lr, beta1, beta2, eps, weight_decay, step, maximize);

  std::vector<Span> spans;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_state(p, p, "params", i);
    check_state(exp_avgs[i], p, "exp_avgs", i);
    check_state(exp_avg_sqs[i], p, "exp_avg_sqs", i);
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.device().is_cpu() && g.is_contiguous() && g.numel() == p.numel(),
                "parallax::adamw_: grads[", i, "] must be a contiguous CPU tensor with ", p.numel(),
                " elements");
    Span base{p.data_ptr<float>(), g.data_ptr(), exp_avgs[i].data_ptr<float>(),
              exp_avg_sqs[i].data_ptr<float>(), nullptr, 0, elem_of(g, "grads"), Elem::kF32};
    if (!params_out.empty()) {
      const at::Tensor& o = params_out[i];
      TORCH_CHECK(o.device().is_cpu() && o.is_contiguous() && o.numel() == p.numel(),
                  "parallax::adamw_: params_out[", i, "] must be a contiguous CPU tensor with ",
                  p.numel(), " elements");
      base.param_out = o.data_ptr();
      base.out_type = elem_of(o, "params_out");
    }
    const int64_t numel = p.numel();
    const size_t grad_bytes = g.element_size();
    const size_t out_bytes = params_out.empty() ? 0 : params_out[i].element_size();
    for (int64_t off = 0; off < numel; off += kSpan) {
      Span s = base;
      s.param += off;
      s.exp_avg += off;
      s.exp_avg_sq += off;
      s.grad = static_cast<const char*>(base.grad) + off * grad_bytes;
      if (base.param_out != nullptr) s.param_out = static_cast<char*>(base.param_out) + off * out_bytes;
      s.n = std::min(kSpan, numel - off);
      spans.push_back(s);
    }
  }

  const SpanFn kernel = kernel_for_active_isa();
  const int64_t count = static_cast<int64_t>(spans.size());
  // Honour torch.set_num_threads(); static schedule keeps each thread on a contiguous range.
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(count, 1)));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t k = 0; k < count; ++k) kernel(h, spans[k]);
}

}  // namespace

TORCH_LIBRARY_IMPL(parallax, CPU, m) { m.impl("adamw_", &adamw_cpu); }

}  // namespace parallax::adam
