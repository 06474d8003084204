// CUDA implementation of parallax::paged_attention: single-token decode attention over a paged
// KV cache (vLLM's layout: caches (num_blocks, block_size, H_kv, D), int32 block tables), with
// optional split-K over the context ("v2" partitions) and a reduce kernel. Also registers
// parallax::reshape_and_cache (cache_write.cuh), the cache write.
//
// One thread block (4 warps) serves one (KV head, group of up to kMaxGroup query heads) of one
// sequence and one partition of its tokens, so each K/V element is read from memory once for
// all query heads that share it (GQA). The partition is walked in tiles of kTile tokens:
//   1. scores: kTpt lanes share one token's K row, each lane reading whole 16-byte vectors
//      (a warp instruction reads kTpt * 16 contiguous bytes per token: full sectors); every lane
//      holds its slice of the group's queries in registers, dots it with its slice of K for all
//      heads, and a butterfly reduce-scatter over the kTpt lanes leaves each lane the full
//      scores of some heads (G - 1 + log2(kTpt / G) shuffles per token instead of
//      G * log2(kTpt)); scores go to shared memory, in base 2 (the scale carries log2(e)).
//   2. softmax: one warp per head takes the tile's max, rescales the running sum (online
//      softmax across tiles) and turns the scores into probabilities in place.
//   3. values: the same lane layout reads V rows and accumulates p * v for every head in fp32
//      registers; accumulators from earlier tiles are rescaled first.
// At the end the per-warp accumulators are summed through shared memory and either normalised
// into the output, or written unnormalised with the running max and sum as one partition's
// partial result for the reduce kernel.
//
// A block id outside [0, num_blocks) or a context length outside [0, max_blocks * block_size]
// is never dereferenced: the sequence's output becomes NaN (the host check would need a sync).
// The narrow ATen headers (not ATen/ATen.h, whose parsing dominated this file's compile time),
// and c10's CUDA headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a
// bare toolkit (like the compile-check machine's) lacks, and these kernels need neither.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "cuda/convert.cuh"
#include "paged_attention/cache_write.cuh"
#include "paged_attention/pack.cuh"

namespace parallax::paged_attention {
namespace {

using parallax::cuda::from_float;
using parallax::cuda::to_float;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = 256;     // tokens whose scores one pass keeps in shared memory
constexpr int kMaxGroup = 8;   // query heads one thread block serves
constexpr int kReduceThreads = 128;
constexpr unsigned kFull = 0xffffffffu;

struct Params {
  const void* q;
  void* out;
  const void* k_cache;
  const void* v_cache;
  const int* block_tables;
  const int* context_lens;
  float* part_acc;  // (N, H, P, D), unnormalised; only with P > 1
  float* part_m;    // (N, H, P) running max (base 2)
  float* part_l;    // (N, H, P) running sum; NaN marks a bad block id or context length
  int64_t q_stride_n;
  int64_t q_stride_h;
  int64_t cache_stride_block;  // block_size * H_kv * D
  int cache_stride_token;      // H_kv * D
  int bt_stride;
  int num_heads;
  int group;        // query heads per KV head
  int head_chunks;  // thread blocks per KV head: ceil(group / G)
  int num_blocks;
  int max_blocks;
  int block_size_log2;
  int partition_size;
  int num_partitions;
  float scale_log2;
};

// Butterfly reduce-scatter of N per-lane partial sums over the lanes of one token group, lane
// masks M, M/2, ..., 1. While more than one value is left, partners swap halves (each keeps the
// half its mask bit selects and adds the partner's copy of it); once one value is left, the
// remaining masks reduce it fully. Afterwards v[0 .. N / min(N, 2M)) hold complete sums of heads
// hbase, hbase + 1, ... .
template <int N, int M>
__device__ __forceinline__ void reduce_scatter(float* v, int& hbase, int lane) {
  if constexpr (M >= 1) {
    if constexpr (N > 1) {
      constexpr int H = N / 2;
      const bool upper = (lane & M) != 0;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const float send = upper ? v[i] : v[i + H];
        const float keep = upper ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(kFull, send, M);
      }
      if (upper) hbase += H;
      reduce_scatter<H, M / 2>(v, hbase, lane);
    } else {
      v[0] += __shfl_xor_sync(kFull, v[0], M);
      reduce_scatter<1, M / 2>(v, hbase, lane);
    }
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int m = 16; m >= 1; m /= 2) x = fmaxf(x, __shfl_xor_sync(kFull, x, m));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int m = 16; m >= 1; m /= 2) x += __shfl_xor_sync(kFull, x, m);
  return x;
}

// T: element type; D: head dim; G: query heads per block (power of two, <= kMaxGroup).
template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(const Params p) {
  constexpr int kVec = Pack<T>::kElems;                     // elements per 16-byte vector
  constexpr int kTpt = D / kVec < 32 ? D / kVec : 32;        // lanes per token
  constexpr int kNvec = D / (kVec * kTpt);                   // vectors per lane per token
  constexpr int kDl = kNvec * kVec;                          // dims per lane
  constexpr int kToks = 32 / kTpt;                           // tokens per warp per step
  constexpr int kUnrollLoads = 8 / kNvec > 0 ? 8 / kNvec : 1;  // 128 bytes in flight per lane
  constexpr int kUnrollTile = kTile / (kWarps * kToks) > 0 ? kTile / (kWarps * kToks) : 1;
  constexpr int kUnroll = kUnrollLoads < kUnrollTile ? kUnrollLoads : kUnrollTile;
  constexpr int kStep = kWarps * kToks * kUnroll;            // tokens per block step
  constexpr int kScatter = G < kTpt ? G : kTpt;
  constexpr int kOut = G / kScatter;                         // full scores per lane
  constexpr int kSmem = G * kTile > kWarps * G * D ? G * kTile : kWarps * G * D;
  static_assert(D % (kVec * kTpt) == 0, "head dim must be a multiple of 16 bytes per lane");
  static_assert(32 % kTpt == 0 && (G & (G - 1)) == 0 && G <= kMaxGroup, "bad tile shape");

  // Scores/probabilities of the current tile, then (after the last tile) the per-warp
  // accumulators: the two are never live together.
  __shared__ float smem[kSmem];
  __shared__ float m_s[G], l_s[G], alpha_s[G];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int slot = lane / kTpt;  // which token of the warp's step
  const int rank = lane % kTpt;  // which slice of the token's row
  const int kv_head = blockIdx.x / p.head_chunks;
  const int head0 = kv_head * p.group + (blockIdx.x % p.head_chunks) * G;
  const int heads = min(G, p.group - (blockIdx.x % p.head_chunks) * G);
  const int seq = blockIdx.y;
  const int part = blockIdx.z;
  const bool split = p.num_partitions > 1;

  const int ctx = p.context_lens[seq];
  const bool bad_ctx = ctx < 0 || ctx > (p.max_blocks << p.block_size_log2);
  const int start = part * p.partition_size;
  const int end = bad_ctx ? start : min(ctx, start + p.partition_size);
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(seq) * p.num_heads + head0) * D;
  if (start >= end && !bad_ctx) {
    // No tokens here: the reduce kernel skips this partition; without split-K (one partition
    // per sequence) the context is empty and the output zero.
    if (!split) {
      for (int i = threadIdx.x; i < heads * D; i += kThreads) out[i] = from_float<T>(0.f);
    }
    return;
  }

  // This lane's slice of the group's queries, scaled into base 2; heads past the group are 0.
  float qf[G][kDl];
  const T* qp = static_cast<const T*>(p.q) + seq * p.q_stride_n;
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int i = 0; i < kNvec; ++i) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int d = (i * kTpt + rank) * kVec + e;
        qf[g][i * kVec + e] = g < heads ? to_float<T>(qp[(head0 + g) * p.q_stride_h + d]) * p.scale_log2 : 0.f;
      }
    }
  }
  float acc[G][kDl];
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int j = 0; j < kDl; ++j) acc[g][j] = 0.f;
  }
  if (threadIdx.x < G) {
    m_s[threadIdx.x] = -INFINITY;
    l_s[threadIdx.x] = 0.f;
  }
  __syncthreads();

  const int* bt = p.block_tables + static_cast<int64_t>(seq) * p.bt_stride;
  const int64_t lane_off = static_cast<int64_t>(kv_head) * D + rank * kVec;
  const T* k_base = static_cast<const T*>(p.k_cache) + lane_off;
  const T* v_base = static_cast<const T*>(p.v_cache) + lane_off;
  const int block_mask = (1 << p.block_size_log2) - 1;
  int bad = bad_ctx;
  // Element offset of token `tok`'s row (this KV head, this lane's first vector). A block id
  // outside the cache reads block 0 instead and marks the result bad.
  auto row_offset = [&](int tok) -> int64_t {
    int block = bt[tok >> p.block_size_log2];
    if (static_cast<unsigned>(block) >= static_cast<unsigned>(p.num_blocks)) {
      bad = 1;
      block = 0;
    }
    return block * p.cache_stride_block + static_cast<int64_t>(tok & block_mask) * p.cache_stride_token;
  };

  for (int tile = start; tile < end; tile += kTile) {
    const int n = min(kTile, end - tile);

    // 1. scores of the tile's tokens for every head of the group
    for (int base = 0; base < n; base += kStep) {
      uint4 kr[kUnroll][kNvec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int t = base + (u * kWarps + warp) * kToks + slot;
        if (t < n) {
          const T* row = k_base + row_offset(tile + t);
#pragma unroll
          for (int i = 0; i < kNvec; ++i) kr[u][i] = load16(row + i * kTpt * kVec);
        } else {
#pragma unroll
          for (int i = 0; i < kNvec; ++i) kr[u][i] = make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int t = base + (u * kWarps + warp) * kToks + slot;
        float s[G];
#pragma unroll
        for (int g = 0; g < G; ++g) s[g] = 0.f;
#pragma unroll
        for (int i = 0; i < kNvec; ++i) {
          float kf[kVec];
          Pack<T>::unpack(kr[u][i], kf);
#pragma unroll
          for (int g = 0; g < G; ++g) {
#pragma unroll
            for (int e = 0; e < kVec; ++e) s[g] = fmaf(qf[g][i * kVec + e], kf[e], s[g]);
          }
        }
        int hbase = 0;
        reduce_scatter<G, kTpt / 2>(s, hbase, rank);  // every lane takes part (shuffles)
        if (t < n && (rank & (kTpt / kScatter - 1)) == 0) {
#pragma unroll
          for (int j = 0; j < kOut; ++j) smem[(hbase + j) * kTile + t] = s[j];
        }
      }
    }
    __syncthreads();

    // 2. online softmax over the tile, one warp per head
    for (int g = warp; g < G; g += kWarps) {
      float* row = smem + g * kTile;
      float mx = -INFINITY;
      for (int t = lane; t < n; t += 32) mx = fmaxf(mx, row[t]);
      mx = warp_max(mx);
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int t = lane; t < n; t += 32) {
        const float e = exp2f(row[t] - m_new);
        row[t] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);
        alpha_s[g] = alpha;
        l_s[g] = l_s[g] * alpha + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();

    // 3. accumulate p * v, after rescaling what earlier tiles accumulated
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float alpha = alpha_s[g];
#pragma unroll
      for (int j = 0; j < kDl; ++j) acc[g][j] *= alpha;
    }
    for (int base = 0; base < n; base += kStep) {
      uint4 vr[kUnroll][kNvec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int t = base + (u * kWarps + warp) * kToks + slot;
        if (t < n) {
          const T* row = v_base + row_offset(tile + t);
#pragma unroll
          for (int i = 0; i < kNvec; ++i) vr[u][i] = load16(row + i * kTpt * kVec);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int t = base + (u * kWarps + warp) * kToks + slot;
        if (t < n) {
#pragma unroll
          for (int i = 0; i < kNvec; ++i) {
            float vf[kVec];
            Pack<T>::unpack(vr[u][i], vf);
#pragma unroll
            for (int g = 0; g < G; ++g) {
              const float pg = smem[g * kTile + t];
#pragma unroll
              for (int e = 0; e < kVec; ++e) acc[g][i * kVec + e] = fmaf(pg, vf[e], acc[g][i * kVec + e]);
            }
          }
        }
      }
    }
    __syncthreads();  // the next tile overwrites the probabilities
  }

  // Sum the accumulators of the warp's token slots (lanes with the same rank), then of the warps.
#pragma unroll
  for (int m = kTpt; m < 32; m *= 2) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int j = 0; j < kDl; ++j) acc[g][j] += __shfl_xor_sync(kFull, acc[g][j], m);
    }
  }
  bad = __syncthreads_or(bad);
  if (slot == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int i = 0; i < kNvec; ++i) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) smem[(warp * G + g) * D + (i * kTpt + rank) * kVec + e] = acc[g][i * kVec + e];
      }
    }
  }
  __syncthreads();

  const int64_t row0 = static_cast<int64_t>(seq) * p.num_heads + head0;  // (seq, head0) of (N, H)
  for (int idx = threadIdx.x; idx < heads * D; idx += kThreads) {
    const int g = idx / D;
    const int d = idx % D;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += smem[(w * G + g) * D + d];
    if (split) {
      p.part_acc[((row0 + g) * p.num_partitions + part) * D + d] = o;
    } else {
      const float l = l_s[g];
      out[idx] = from_float<T>(bad ? NAN : (l > 0.f ? o / l : 0.f));
    }
  }
  if (split && threadIdx.x < heads) {
    const int64_t i = (row0 + threadIdx.x) * p.num_partitions + part;
    p.part_m[i] = m_s[threadIdx.x];
    p.part_l[i] = bad ? NAN : l_s[threadIdx.x];
  }
}

struct ReduceParams {
  void* out;
  const float* part_acc;
  const float* part_m;
  const float* part_l;
  const int* context_lens;
  int num_heads;
  int head_dim;
  int partition_size;
  int num_partitions;
};

// Combines the partitions of one (sequence, head): out = sum_p 2^(m_p - m) acc_p / sum_p 2^(m_p - m) l_p
// over the partitions that hold tokens (the others were never written).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) paged_attention_reduce_kernel(const ReduceParams p) {
  __shared__ float warp_m[kReduceThreads / 32];
  const int head = blockIdx.x;
  const int seq = blockIdx.y;
  const int ctx = p.context_lens[seq];
  const int64_t row = static_cast<int64_t>(seq) * p.num_heads + head;
  T* out = static_cast<T*>(p.out) + row * p.head_dim;
  const int used = ctx <= 0 ? 0 : min((ctx - 1) / p.partition_size + 1, p.num_partitions);
  const float* m = p.part_m + row * p.num_partitions;
  const float* l = p.part_l + row * p.num_partitions;
  const float* acc = p.part_acc + row * p.num_partitions * p.head_dim;

  float mx = -INFINITY;
  for (int i = threadIdx.x; i < used; i += kReduceThreads) mx = fmaxf(mx, m[i]);
  mx = warp_max(mx);
  if (threadIdx.x % 32 == 0) warp_m[threadIdx.x / 32] = mx;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kReduceThreads / 32; ++w) mx = fmaxf(mx, warp_m[w]);

  for (int d = threadIdx.x; d < p.head_dim; d += kReduceThreads) {
    float o = 0.f;
    float sum = 0.f;
    for (int i = 0; i < used; ++i) {
      const float w = exp2f(m[i] - mx);
      sum += w * l[i];
      o += w * acc[static_cast<int64_t>(i) * p.head_dim + d];
    }
    // sum is NaN when a partition saw a bad block id; an empty context gives 0.
    out[d] = from_float<T>(ctx < 0 ? NAN : (used == 0 ? 0.f : o / sum));
  }
}

template <typename T, int D, int G>
void launch(const Params& p, dim3 grid, cudaStream_t stream) {
  paged_attention_kernel<T, D, G><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_group(int g, const Params& p, dim3 grid, cudaStream_t stream) {
  switch (g) {
    case 1: return launch<T, D, 1>(p, grid, stream);
    case 2: return launch<T, D, 2>(p, grid, stream);
    case 4: return launch<T, D, 4>(p, grid, stream);
    default: return launch<T, D, 8>(p, grid, stream);
  }
}

template <typename T>
void launch_dim(int d, int g, const Params& p, dim3 grid, cudaStream_t stream) {
  switch (d) {
    case 16: return launch_group<T, 16>(g, p, grid, stream);
    case 32: return launch_group<T, 32>(g, p, grid, stream);
    case 64: return launch_group<T, 64>(g, p, grid, stream);
    case 128: return launch_group<T, 128>(g, p, grid, stream);
    case 256: return launch_group<T, 256>(g, p, grid, stream);
    default:
      TORCH_CHECK(false, "parallax::paged_attention: head dim ", d, " is not supported (16, 32, 64, 128, 256)");
  }
}

template <typename T>
void launch_reduce(const ReduceParams& p, dim3 grid, cudaStream_t stream) {
  paged_attention_reduce_kernel<T><<<grid, kReduceThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor paged_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_tables, const at::Tensor& context_lens,
                                double softmax_scale, int64_t partition_size) {
  constexpr const char* op = "parallax::paged_attention";
  TORCH_CHECK(q.dim() == 3, op, ": q must be (N, H, D), got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be (num_blocks, block_size, H_kv, D), got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache has shape ", v_cache.sizes(), " but k_cache has ",
              k_cache.sizes());
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kInt, op,
              ": block_tables must be int32 (N, max_blocks)");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.scalar_type() == at::kInt, op, ": context_lens must be int32 (N,)");
  const at::Device device = q.device();
  for (const at::Tensor* t : {&k_cache, &v_cache, &block_tables, &context_lens}) {
    TORCH_CHECK(t->device() == device, op, ": every tensor must be on ", device, ", got one on ", t->device());
  }
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), op,
              ": k_cache and v_cache must have q's dtype ", q.scalar_type());
  const int64_t n = q.size(0), h = q.size(1), d = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), h_kv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d, op, ": q has head dim ", d, " but k_cache has ", k_cache.size(3));
  TORCH_CHECK(h_kv > 0 && h % h_kv == 0, op, ": q's ", h, " heads are not a multiple of k_cache's ", h_kv, " KV heads");
  TORCH_CHECK(block_size == 8 || block_size == 16 || block_size == 32, op, ": block size ", block_size,
              " is not supported (8, 16, 32)");
  TORCH_CHECK(block_tables.size(0) == n && context_lens.size(0) == n, op,
              ": block_tables and context_lens must have one row per sequence of q");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": k_cache and v_cache must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && block_tables.stride(1) == 1 && context_lens.stride(0) == 1, op,
              ": q's last dim, block_tables' rows and context_lens must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % 16 == 0,
              op, ": k_cache and v_cache must be 16-byte aligned");
  TORCH_CHECK(partition_size >= 0, op, ": partition_size must be >= 0, got ", partition_size);
  TORCH_CHECK(num_blocks * block_size * h_kv * d < (int64_t{1} << 62) && block_tables.size(1) * block_size < (1 << 30),
              op, ": cache or block table too large");

  at::Tensor out = at::empty({n, h, d}, q.options());
  if (n == 0 || h == 0) return out;
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t max_context = std::max<int64_t>(block_tables.size(1) * block_size, 1);
  const int64_t ps = partition_size > 0 ? std::min(partition_size, max_context) : max_context;
  const int64_t parts = (max_context + ps - 1) / ps;
  TORCH_CHECK(parts <= 65535 && n <= 65535, op, ": at most 65535 sequences and partitions per launch, got ", n,
              " sequences and ", parts, " partitions");
  const int group = static_cast<int>(h / h_kv);
  int g_tile = 1;
  while (g_tile < group && g_tile < kMaxGroup) g_tile *= 2;
  const int head_chunks = (group + g_tile - 1) / g_tile;

  at::Tensor part_acc, part_m, part_l;
  if (parts > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    part_acc = at::empty({n, h, parts, d}, f32);
    part_m = at::empty({n, h, parts}, f32);
    part_l = at::empty({n, h, parts}, f32);
  }

  Params p{};
  p.q = q.data_ptr();
  p.out = out.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int>();
  p.context_lens = context_lens.data_ptr<int>();
  p.part_acc = parts > 1 ? part_acc.data_ptr<float>() : nullptr;
  p.part_m = parts > 1 ? part_m.data_ptr<float>() : nullptr;
  p.part_l = parts > 1 ? part_l.data_ptr<float>() : nullptr;
  p.q_stride_n = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.cache_stride_block = k_cache.stride(0);
  p.cache_stride_token = static_cast<int>(k_cache.stride(1));
  p.bt_stride = static_cast<int>(block_tables.stride(0));
  p.num_heads = static_cast<int>(h);
  p.group = group;
  p.head_chunks = head_chunks;
  p.num_blocks = static_cast<int>(std::min<int64_t>(num_blocks, INT32_MAX));
  p.max_blocks = static_cast<int>(block_tables.size(1));
  p.block_size_log2 = block_size == 8 ? 3 : (block_size == 16 ? 4 : 5);
  p.partition_size = static_cast<int>(ps);
  p.num_partitions = static_cast<int>(parts);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);  // log2(e)

  const dim3 grid(static_cast<unsigned>(h_kv * head_chunks), static_cast<unsigned>(n), static_cast<unsigned>(parts));
  switch (q.scalar_type()) {
    case at::kFloat: launch_dim<float>(static_cast<int>(d), g_tile, p, grid, stream); break;
    case at::kHalf: launch_dim<__half>(static_cast<int>(d), g_tile, p, grid, stream); break;
    case at::kBFloat16: launch_dim<__nv_bfloat16>(static_cast<int>(d), g_tile, p, grid, stream); break;
    default: TORCH_CHECK(false, op, ": q must be float32, float16 or bfloat16, got ", q.scalar_type());
  }
  if (parts > 1) {
    ReduceParams r{};
    r.out = out.data_ptr();
    r.part_acc = part_acc.data_ptr<float>();
    r.part_m = part_m.data_ptr<float>();
    r.part_l = part_l.data_ptr<float>();
    r.context_lens = context_lens.data_ptr<int>();
    r.num_heads = static_cast<int>(h);
    r.head_dim = static_cast<int>(d);
    r.partition_size = static_cast<int>(ps);
    r.num_partitions = static_cast<int>(parts);
    const dim3 rgrid(static_cast<unsigned>(h), static_cast<unsigned>(n));
    switch (q.scalar_type()) {
      case at::kFloat: launch_reduce<float>(r, rgrid, stream); break;
      case at::kHalf: launch_reduce<__half>(r, rgrid, stream); break;
      default: launch_reduce<__nv_bfloat16>(r, rgrid, stream);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(parallax, CUDA, m) {
  m.impl("paged_attention", &paged_attention_cuda);
  m.impl("reshape_and_cache", &cache_write::reshape_and_cache_cuda);
}

}  // namespace parallax::paged_attention
