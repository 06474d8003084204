// The CPU PagedAttention decode algorithm, written once over a vector type V and included by
// each ISA's translation unit after its target pragma (the anonymous namespace keeps every
// copy private to its unit). V provides: Reg, kWidth, load<T>/store<T> (fp32 lanes from/to
// elements of type T), zero, set1, add, sub, mul, max, fmadd(a, b, c) = a * b + c, reduce_add,
// reduce_max and exp.
//
// One task = one sequence and one KV head with its G query heads, in three passes over fp32
// scratch: scores q.k * scale for every context token (each key row read once, for all G
// heads), softmax numerators exp(s - max) and their sums, then the weighted sum of the value
// rows (each read once). Two passes over the context instead of an online softmax: no
// rescaling of the accumulator, and the scores (4 bytes per token and head) stay in L1/L2.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "paged_attention/paged_attention_cpu.h"

namespace parallax::paged_attention {
namespace {

// Writes `value` (0 or NaN) to the G output rows of one task.
template <class V, Elem T, int kD>
void fill_rows(const Problem& p, int64_t first_row, int64_t group, float value) {
  for (int64_t g = 0; g < group; ++g) {
    for (int i = 0; i < kD; i += V::kWidth) V::template store<T>(p.out, (first_row + g) * kD + i, V::set1(value));
  }
}

// True when the context length is in range and every block the context uses is in the cache.
inline bool context_in_cache(const Problem& p, const int32_t* table, int64_t ctx) {
  if (ctx < 0 || ctx > p.max_blocks * p.block_size) return false;
  const int64_t used = (ctx + p.block_size - 1) / p.block_size;
  for (int64_t b = 0; b < used; ++b) {
    if (table[b] < 0 || table[b] >= p.num_blocks) return false;
  }
  return true;
}

// Row of KV head `kv_head` at the first slot of block `block` of a cache, as bytes (the next
// slots' rows follow every H_kv * D elements). The passes walk blocks, then slots: no division
// per token (with a division and a modulo per token and pass, a cache-resident decode took 12.6
// instead of 10.2 ns per token and KV head, D 64 fp32 AVX-512).
template <Elem T, int kD>
inline const char* block_row(const void* cache, const Problem& p, int64_t block, int64_t kv_head) {
  return static_cast<const char*>(cache) + ((block * p.block_size) * p.num_kv_heads + kv_head) * kD * cpu::kElemBytes<T>;
}

// q . k over D lanes: k a cache row of type T, q fp32.
template <class V, Elem T, int kD>
inline float dot(const char* k, const float* q) {
  using Reg = typename V::Reg;
  constexpr int W = V::kWidth;
  Reg a0 = V::zero(), a1 = V::zero();  // two chains: the FMA latency is hidden for D >= 2W
  for (int i = 0; i < kD; i += 2 * W) {
    a0 = V::fmadd(V::template load<T>(k, i), V::template load<Elem::kF32>(q, i), a0);
    if (i + W < kD) a1 = V::fmadd(V::template load<T>(k, i + W), V::template load<Elem::kF32>(q, i + W), a1);
  }
  return V::reduce_add(V::add(a0, a1));
}

// exp(row[t] - m) in place for t < n; returns their sum.
template <class V>
float exp_and_sum(float* row, int64_t n, float m) {
  using Reg = typename V::Reg;
  constexpr int W = V::kWidth;
  const Reg vm = V::set1(m);
  Reg sum = V::zero();
  int64_t t = 0;
  for (; t + W <= n; t += W) {
    const Reg e = V::exp(V::sub(V::template load<Elem::kF32>(row, t), vm));
    V::template store<Elem::kF32>(row, t, e);
    sum = V::add(sum, e);
  }
  float total = V::reduce_add(sum);
  for (; t < n; ++t) {
    row[t] = std::exp(row[t] - m);
    total += row[t];
  }
  return total;
}

template <class V>
float row_max(const float* row, int64_t n) {
  constexpr int W = V::kWidth;
  float m = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
  if (n >= W) {
    typename V::Reg vm = V::template load<Elem::kF32>(row, 0);
    for (t = W; t + W <= n; t += W) vm = V::max(vm, V::template load<Elem::kF32>(row, t));
    m = V::reduce_max(vm);
  }
  for (; t < n; ++t) m = row[t] > m ? row[t] : m;
  return m;
}

template <class V, Elem T, int kD>
void attend(const Problem& p, int64_t seq, int64_t kv_head, float* scratch) {
  using Reg = typename V::Reg;
  constexpr int W = V::kWidth;
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t first_row = seq * p.num_heads + kv_head * group;  // output rows of this task
  const int64_t ctx = p.context_lens[seq];
  const int32_t* table = p.block_tables + seq * p.max_blocks;
  if (ctx == 0) return fill_rows<V, T, kD>(p, first_row, group, 0.0f);
  if (!context_in_cache(p, table, ctx)) return fill_rows<V, T, kD>(p, first_row, group, std::nanf(""));

  const int64_t stride = (ctx + 15) / 16 * 16;  // scores row stride (see scratch_floats)
  float* qs = scratch;            // (G, D): q * scale
  float* acc = qs + group * kD;   // (G, D): sum of p * v
  float* sums = acc + group * kD;  // (G,)
  float* scores = sums + group;   // (G, stride)

  const Reg scale = V::set1(p.scale);
  for (int64_t g = 0; g < group; ++g) {
    const char* q = static_cast<const char*>(p.q) + (seq * p.q_seq_stride + (kv_head * group + g) * p.q_head_stride) * cpu::kElemBytes<T>;
    for (int i = 0; i < kD; i += W) V::template store<Elem::kF32>(qs + g * kD, i, V::mul(V::template load<T>(q, i), scale));
  }
  const int64_t row_bytes = p.num_kv_heads * kD * cpu::kElemBytes<T>;
  // 1. scores: each key row once, for all G heads
  for (int64_t t0 = 0, b = 0; t0 < ctx; t0 += p.block_size, ++b) {
    const int64_t t1 = std::min<int64_t>(t0 + p.block_size, ctx);
    const char* k = block_row<T, kD>(p.k_cache, p, table[b], kv_head);
    for (int64_t t = t0; t < t1; ++t, k += row_bytes) {
      for (int64_t g = 0; g < group; ++g) scores[g * stride + t] = dot<V, T, kD>(k, qs + g * kD);
    }
  }
  // 2. softmax numerators and sums
  for (int64_t g = 0; g < group; ++g) {
    float* row = scores + g * stride;
    sums[g] = exp_and_sum<V>(row, ctx, row_max<V>(row, ctx));
  }
  // 3. sum of p * v, a block of tokens at a time: each value row read from memory once (for the
  // first head of the group; from L1 for the others), the accumulator in registers across the block
  constexpr int kVecs = kD / W;
  for (int64_t t0 = 0, b = 0; t0 < ctx; t0 += p.block_size, ++b) {
    const int64_t t1 = std::min<int64_t>(t0 + p.block_size, ctx);
    const char* v0 = block_row<T, kD>(p.v_cache, p, table[b], kv_head);
    for (int64_t g = 0; g < group; ++g) {
      float* a_mem = acc + g * kD;
      const float* w_row = scores + g * stride;
      Reg a[kVecs];
      for (int i = 0; i < kVecs; ++i) a[i] = t0 == 0 ? V::zero() : V::template load<Elem::kF32>(a_mem, i * W);
      for (int64_t t = t0; t < t1; ++t) {
        const Reg w = V::set1(w_row[t]);
        const char* v = v0 + (t - t0) * row_bytes;
        for (int i = 0; i < kVecs; ++i) a[i] = V::fmadd(w, V::template load<T>(v, i * W), a[i]);
      }
      for (int i = 0; i < kVecs; ++i) V::template store<Elem::kF32>(a_mem, i * W, a[i]);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const Reg inv = V::set1(1.0f / sums[g]);
    for (int i = 0; i < kD; i += W) {
      V::template store<T>(p.out, (first_row + g) * kD + i, V::mul(V::template load<Elem::kF32>(acc + g * kD, i), inv));
    }
  }
}

template <class V, Elem T>
AttendFn kernel_for_dim(int64_t head_dim) {
  switch (head_dim) {
    case 16: return attend<V, T, 16>;
    case 32: return attend<V, T, 32>;
    case 64: return attend<V, T, 64>;
    case 128: return attend<V, T, 128>;
    case 256: return attend<V, T, 256>;
    default: return nullptr;
  }
}

template <class V>
AttendFn kernel_for(Elem type, int64_t head_dim) {
  switch (type) {
    case Elem::kBF16: return kernel_for_dim<V, Elem::kBF16>(head_dim);
    case Elem::kF16: return kernel_for_dim<V, Elem::kF16>(head_dim);
    default: return kernel_for_dim<V, Elem::kF32>(head_dim);
  }
}

}  // namespace
}  // namespace parallax::paged_attention
