// parallax::reshape_and_cache on CUDA: writes new tokens' keys and values (T, H_kv, D) into their
// slots of the paged caches (num_blocks, block_size, H_kv, D); slot = block * block_size +
// offset, a negative slot skips the token (padding).
//
// One thread block per token copies its H_kv * D keys and values, 16 bytes per thread and
// instruction when every address allows it, else one element at a time. A slot past the cache
// is skipped (the host check would need a sync; CPU tensors are checked in Python).
//
// Included by paged_attention_cuda.cu, which registers it: one translation unit for both ops
// (the torch headers dominate the compile time of each).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace parallax::paged_attention {
namespace cache_write {

constexpr int kThreads = 128;

struct CacheParams {
  const void* k;
  const void* v;
  void* k_cache;
  void* v_cache;
  const void* slot_mapping;
  int64_t k_stride_t, k_stride_h, v_stride_t, v_stride_h;  // elements
  int64_t cache_stride_block;                              // block_size * H_kv * D
  int64_t num_slots;
  int block_size;
  int head_dim;
  int row;  // H_kv * D: one token's slot is contiguous in the cache
};

// W: the unit one thread moves (uint4 = 16 bytes, or the element type itself); I: slot index type.
template <typename W, typename I>
__global__ void __launch_bounds__(kThreads) reshape_and_cache_kernel(const CacheParams p, int elems_per_unit) {
  const int64_t tok = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(static_cast<const I*>(p.slot_mapping)[tok]);
  if (slot < 0 || slot >= p.num_slots) return;
  const int64_t dst = (slot / p.block_size) * p.cache_stride_block + (slot % p.block_size) * p.row;
  const int units = p.row / elems_per_unit;
  for (int u = threadIdx.x; u < units; u += kThreads) {
    const int e = u * elems_per_unit;  // element index in (H_kv, D)
    const int h = e / p.head_dim;
    const int d = e % p.head_dim;
    // Byte offsets are multiples of sizeof(W) here: the host picked W so.
    const int64_t src_k = tok * p.k_stride_t + h * p.k_stride_h + d;
    const int64_t src_v = tok * p.v_stride_t + h * p.v_stride_h + d;
    const int64_t out = dst + e;
    const int64_t esize = static_cast<int64_t>(sizeof(W)) / elems_per_unit;  // bytes per element
    const char* k = static_cast<const char*>(p.k) + src_k * esize;
    const char* v = static_cast<const char*>(p.v) + src_v * esize;
    *reinterpret_cast<W*>(static_cast<char*>(p.k_cache) + out * esize) = *reinterpret_cast<const W*>(k);
    *reinterpret_cast<W*>(static_cast<char*>(p.v_cache) + out * esize) = *reinterpret_cast<const W*>(v);
  }
}

template <typename W>
void launch(const CacheParams& p, bool int64_slots, int elems_per_unit, int64_t tokens, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tokens));
  if (int64_slots) {
    reshape_and_cache_kernel<W, int64_t><<<grid, kThreads, 0, stream>>>(p, elems_per_unit);
  } else {
    reshape_and_cache_kernel<W, int32_t><<<grid, kThreads, 0, stream>>>(p, elems_per_unit);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

inline void reshape_and_cache_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "parallax::reshape_and_cache";
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), op, ": k and v must be (T, H_kv, D) of one shape, got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), op,
              ": k_cache and v_cache must be (num_blocks, block_size, H_kv, D) of one shape");
  TORCH_CHECK(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2), op, ": k has (H_kv, D) = (", k.size(1),
              ", ", k.size(2), ") but k_cache has (", k_cache.size(2), ", ", k_cache.size(3), ")");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0), op,
              ": slot_mapping must be (T,) with one slot per token");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kInt || slot_mapping.scalar_type() == at::kLong, op,
              ": slot_mapping must be int32 or int64");
  const at::Device device = k.device();
  for (const at::Tensor* t : {&v, &k_cache, &v_cache, &slot_mapping}) {
    TORCH_CHECK(t->device() == device, op, ": every tensor must be on ", device, ", got one on ", t->device());
  }
  for (const at::Tensor* t : {&v, &k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == k.scalar_type(), op, ": k, v, k_cache and v_cache must have one dtype");
  }
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf || k.scalar_type() == at::kBFloat16, op,
              ": dtype must be float32, float16 or bfloat16, got ", k.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": k_cache and v_cache must be contiguous");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && slot_mapping.stride(0) == 1, op,
              ": the last dim of k and v, and slot_mapping, must be contiguous");
  const int64_t tokens = k.size(0);
  TORCH_CHECK(tokens <= INT32_MAX, op, ": too many tokens");
  if (tokens == 0 || k.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  CacheParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr();
  p.k_stride_t = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.v_stride_t = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.cache_stride_block = k_cache.stride(0);
  p.num_slots = k_cache.size(0) * k_cache.size(1);
  p.block_size = static_cast<int>(k_cache.size(1));
  p.head_dim = static_cast<int>(k.size(2));
  p.row = static_cast<int>(k.size(1) * k.size(2));

  const bool int64_slots = slot_mapping.scalar_type() == at::kLong;
  const int esize = static_cast<int>(k.element_size());
  const int vec = 16 / esize;
  const bool wide = p.head_dim % vec == 0 && p.k_stride_t % vec == 0 && p.k_stride_h % vec == 0 &&
                    p.v_stride_t % vec == 0 && p.v_stride_h % vec == 0 && aligned16(p.k) && aligned16(p.v) &&
                    aligned16(p.k_cache) && aligned16(p.v_cache);
  if (wide) return launch<uint4>(p, int64_slots, vec, tokens, stream);
  switch (esize) {
    case 4: return launch<float>(p, int64_slots, 1, tokens, stream);
    default: return launch<uint16_t>(p, int64_slots, 1, tokens, stream);
  }
}

}  // namespace cache_write
}  // namespace parallax::paged_attention
