// CUDA implementation of parallax::adamw_: a multi-tensor kernel. Tensor addresses travel in
// the kernel's parameter block (no host-to-device copy per step), up to kMaxTensors tensors
// and kMaxBlocks chunks per launch; each thread block updates one chunk of one tensor.
#include <ATen/ATen.h>
// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare
// toolkit (like the compile-check machine's) lacks, and this kernel needs neither.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "adam/adamw_elem.h"
#include "adam/adamw_hyper.h"

namespace parallax::adam {
namespace {

constexpr int kDepth = 5;  // param (fp32), grad, exp_avg, exp_avg_sq, param_out
constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;
constexpr int kChunk = 65536;  // elements per thread block
constexpr int kThreads = 512;

// 5*36*8 + 36*8 + 320 + 320*4 = 3328 bytes: inside the 4 KiB kernel-parameter limit.
struct TensorListMeta {
  void* addr[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
};

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

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
  const size_t n = lists[0].size();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TensorListMeta meta{};
  int tensors = 0;
  int blocks = 0;
  auto flush = [&] {
    if (blocks == 0) return;
    adamw_kernel<G, O, kHasOut><<<blocks, kThreads, 0, stream>>>(meta, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    blocks = 0;
  };
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = lists[0][i].numel();
    if (numel == 0) continue;
    for (int d = 0; d < kDepth; ++d)
      meta.addr[d][tensors] = (d < 4 || kHasOut) ? lists[d][i].data_ptr() : nullptr;
    meta.numel[tensors] = numel;
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(tensors);
      meta.block_to_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (last_chunk && tensors + 1 == kMaxTensors)) {
        flush();
        if (!last_chunk) {
          // The tensor continues in the next launch: keep it in slot 0.
          for (int d = 0; d < kDepth; ++d) meta.addr[d][0] = meta.addr[d][tensors];
          meta.numel[0] = numel;
          tensors = 0;
        } else {
          tensors = -1;
        }
      }
    }
    ++tensors;
  }
  flush();
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
