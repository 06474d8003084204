// AdamW coefficients for one step, shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

namespace parallax::adam {

// Coefficients are rounded to float from double, as torch converts its Python-float scalars;
// (1 - beta) is formed in double first: 1 - 0.999f in float is off by 1e-5 relative.
struct Hyper {
  // exp_avg.lerp_(grad, w) with w = 1 - beta1, as ATen computes it: fma(w, g - m, m) when
  // w < 0.5, else fma(w - 1, g - m, g). With beta1 = 0 the second form gives exactly g.
  float lerp_coeff;
  bool lerp_from_grad;
  float beta2;
  float one_minus_beta2;
  float eps;
  float decay;       // 1 - lr * weight_decay, applied to the parameter first (decoupled decay)
  float step_size;   // lr / (1 - beta1^step)
  float bc2_sqrt;    // sqrt(1 - beta2^step)
  bool maximize;
};

// Bias corrections in double, as torch.optim.AdamW computes them in Python floats.
inline Hyper make_hyper(double lr, double beta1, double beta2, double eps, double weight_decay,
                        double step, bool maximize) {
  Hyper h{};
  const float weight = static_cast<float>(1.0 - beta1);
  h.lerp_from_grad = !(std::fabs(weight) < 0.5f);
  h.lerp_coeff = h.lerp_from_grad ? weight - 1.0f : weight;
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  h.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, step)));
  h.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
  h.maximize = maximize;
  return h;
}

}  // namespace parallax::adam
