// CUDA implementation of parallax::unscale_: a multi-tensor kernel. Gradient addresses travel in
// the kernel's parameter block (no host-to-device copy per call), up to kMaxTensors tensors and
// kMaxBlocks chunks per launch; each thread block unscales one chunk of one tensor and, when the
// chunk held an inf or NaN, sets *found_inf = 1 (every writer writes the same value: no atomics).
#include <ATen/ATen.h>
// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare
// toolkit (like the compile-check machine's) lacks, and this kernel needs neither.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/convert.cuh"
#include "cuda/multi_tensor.cuh"

#include <vector>

namespace parallax::unscale {
namespace {

constexpr int kMaxTensors = 110;
constexpr int kMaxBlocks = 320;
constexpr int kChunk = 65536;  // elements per thread block
constexpr int kThreads = 512;

// 110*8 + 110*8 + 320 + 320*4 = 3360 bytes, + 12 for the other arguments: inside the 4 KiB
// kernel-parameter limit.
using TensorListMeta = cuda::TensorListMeta<1, kMaxTensors, kMaxBlocks>;

using cuda::from_float;
using cuda::to_float;

// x * inv_scale in fp32 rounded once (as torch's mul_), then to T; the check looks at x before
// the multiply, as torch's _amp_foreach_non_finite_check_and_unscale_ does.
template <typename T>
__global__ void __launch_bounds__(kThreads) unscale_kernel(TensorListMeta meta, float* found_inf, float inv_scale) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(meta.numel[t], begin + kChunk);
  T* __restrict__ g = static_cast<T*>(meta.addr[0][t]);
  int bad = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float x = to_float<T>(g[i]);
    bad |= !isfinite(x);
    g[i] = from_float<T>(__fmul_rn(x, inv_scale));
  }
  // One store per block that saw a non-finite value.
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
}

template <typename T>
void launch_all(const std::vector<at::Tensor>& grads, float* found_inf, float inv_scale) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::for_each_launch<TensorListMeta>({grads}, kChunk, [&](const TensorListMeta& meta, int blocks) {
    unscale_kernel<T><<<blocks, kThreads, 0, stream>>>(meta, found_inf, inv_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void unscale_cuda(at::TensorList grads, at::Tensor& found_inf, double inv_scale) {
  TORCH_CHECK(found_inf.is_cuda() && found_inf.scalar_type() == at::kFloat && found_inf.numel() == 1,
              "parallax::unscale_: found_inf must be a one-element float32 CUDA tensor, got ",
              found_inf.numel(), " elements of ", found_inf.scalar_type(), " on ", found_inf.device());
  const at::Device device = found_inf.device();
  // One launch sequence per dtype: the kernel is templated on it.
  std::vector<at::Tensor> by_type[3];
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.device() == device && g.is_contiguous(), "parallax::unscale_: grads[", i,
                "] must be contiguous and on ", device, " (found_inf's device), got one on ", g.device(),
                g.is_contiguous() ? "" : " (non-contiguous)");
    switch (g.scalar_type()) {
      case at::kFloat: by_type[0].push_back(g); break;
      case at::kBFloat16: by_type[1].push_back(g); break;
      case at::kHalf: by_type[2].push_back(g); break;
      default:
        TORCH_CHECK(false, "parallax::unscale_: grads[", i, "] must be float32, bfloat16 or float16, got ",
                    g.scalar_type());
    }
  }
  const c10::cuda::CUDAGuard guard(device);
  float* flag = found_inf.data_ptr<float>();
  const float scale = static_cast<float>(inv_scale);
  if (!by_type[0].empty()) launch_all<float>(by_type[0], flag, scale);
  if (!by_type[1].empty()) launch_all<__nv_bfloat16>(by_type[1], flag, scale);
  if (!by_type[2].empty()) launch_all<__half>(by_type[2], flag, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(parallax, CUDA, m) { m.impl("unscale_", &unscale_cuda); }

}  // namespace parallax::unscale
