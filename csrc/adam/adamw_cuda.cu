// CUDA implementation of parallax::adamw_: a multi-tensor kernel (cuda/multi_tensor.cuh); each
// thread block updates one chunk of one tensor.
#include <ATen/ATen.h>
// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare
// toolkit (like the compile-check machine's) lacks, and this kernel needs neither.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "adam/adamw_elem.h"
#include "adam/adamw_hyper.h"
#include "cuda/convert.cuh"
#include "cuda/multi_tensor.cuh"

namespace parallax::adam {
namespace {

constexpr int kDepth = 5;  // param (fp32), grad, exp_avg, exp_avg_sq, param_out
constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;
constexpr int kChunk = 65536;  // elements per thread block
constexpr int kThreads = 512;

// 5*36*8 + 36*8 + 320*5 = 3328 bytes: inside the 4 KiB kernel-parameter limit.
using TensorListMeta = cuda::TensorListMeta<kDepth, kMaxTensors, kMaxBlocks>;

using cuda::from_float;
using cuda::to_float;

// Same operations and roundings as the CPU kernel and torch's ATen ops (explicit _rn
// intrinsics, so nvcc's default contraction into FMAs cannot change them).
template <typename G, typename O, bool kHasOut>
__global__ void __launch_bounds__(kThreads) adamw_kernel(TensorListMeta meta, Hyper h) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(meta.numel[t], begin + kChunk);
  float* __restrict__ p = static_cast<float*>(meta.addr[0][t]);
  const G* __restrict__ g = static_cast<const G*>(meta.addr[1][t]);
  float* __restrict__ m = static_cast<float*>(meta.addr[2][t]);
  float* __restrict__ v = static_cast<float*>(meta.addr[3][t]);
  O* __restrict__ out = static_cast<O*>(meta.addr[4][t]);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    float gi = to_float<G>(g[i]);
    if (h.maximize) gi = -gi;
    const float pi = __fmul_rn(p[i], h.decay);
    const float mi = __fmaf_rn(h.lerp_coeff, __fsub_rn(gi, m[i]), h.lerp_from_grad ? gi : m[i]);
    const float vi = __fmaf_rn(__fmul_rn(h.one_minus_beta2, gi), gi, __fmul_rn(v[i], h.beta2));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), h.bc2_sqrt), h.eps);
    const float pn = __fadd_rn(pi, __fdiv_rn(__fmul_rn(-h.step_size, mi), denom));
    p[i] = pn;
    m[i] = mi;
    v[i] = vi;
    if constexpr (kHasOut) out[i] = from_float<O>(pn);
  }
}

template <typename G, typename O, bool kHasOut>
void launch_all(const std::vector<std::vector<at::Tensor>>& lists, const Hyper& h) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::for_each_launch<TensorListMeta>(lists, kChunk, [&](const TensorListMeta& meta, int blocks) {
    adamw_kernel<G, O, kHasOut><<<blocks, kThreads, 0, stream>>>(meta, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename G>
void dispatch_out(const std::vector<std::vector<at::Tensor>>& lists, const Hyper& h, bool has_out, Elem out) {
  if (!has_out) return launch_all<G, float, false>(lists, h);
  switch (out) {
    case Elem::kBF16: return launch_all<G, __nv_bfloat16, true>(lists, h);
    case Elem::kF16: return launch_all<G, __half, true>(lists, h);
    default: return launch_all<G, float, true>(lists, h);
  }
}

void adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList params_out, double lr, double beta1,
                double beta2, double eps, double weight_decay, double step, bool maximize) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "parallax::adamw_: params, grads, exp_avgs and exp_avg_sqs must have the same length");
  TORCH_CHECK(params_out.empty() || params_out.size() == n,
              "parallax::adamw_: params_out must be empty or as long as params");
  TORCH_CHECK(step >= 1, "parallax::adamw_: step must be >= 1, got ", step);
  if (n == 0) return;
  const bool has_out = !params_out.empty();
  const at::Device device = params[0].device();
  // One launch sequence per (grad dtype, out dtype) pair: the kernel is templated on both.
  std::vector<std::vector<std::vector<at::Tensor>>> by_types(9, std::vector<std::vector<at::Tensor>>(kDepth));
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor* row[kDepth] = {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i],
                                     has_out ? &params_out[i] : &params[i]};
    for (int d = 0; d < kDepth; ++d) {
      const at::Tensor& t = *row[d];
      TORCH_CHECK(t.device() == device && t.is_contiguous() && t.numel() == params[i].numel(),
                  "parallax::adamw_: tensor ", i, " of list ", d, " must be contiguous, on ", device,
                  ", with ", params[i].numel(), " elements");
    }
    TORCH_CHECK(params[i].scalar_type() == at::kFloat && exp_avgs[i].scalar_type() == at::kFloat &&
                    exp_avg_sqs[i].scalar_type() == at::kFloat,
                "parallax::adamw_: params, exp_avgs and exp_avg_sqs must be float32");
    const int g = static_cast<int>(elem_of(grads[i], "grads"));
    const int o = has_out ? static_cast<int>(elem_of(params_out[i], "params_out")) : 0;
    for (int d = 0; d < kDepth; ++d) by_types[g * 3 + o][d].push_back(*row[d]);
  }
  const c10::cuda::CUDAGuard guard(device);
  const Hyper h = make_hyper(lr, beta1, beta2, eps, weight_decay, step, maximize);
  for (int key = 0; key < 9; ++key) {
    const auto& lists = by_types[key];
    if (lists[0].empty()) continue;
    const Elem out_type = static_cast<Elem>(key % 3);
    switch (static_cast<Elem>(key / 3)) {
      case Elem::kBF16: dispatch_out<__nv_bfloat16>(lists, h, has_out, out_type); break;
      case Elem::kF16: dispatch_out<__half>(lists, h, has_out, out_type); break;
      default: dispatch_out<float>(lists, h, has_out, out_type);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(parallax, CUDA, m) { m.impl("adamw_", &adamw_cuda); }

}  // namespace parallax::adam
