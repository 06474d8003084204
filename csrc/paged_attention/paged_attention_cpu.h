// PagedAttention decode on the CPU: one task per (sequence, KV head), per instruction set.
// paged_attention_cpu.cpp checks the tensors, picks the kernel of the active ISA and runs the
// tasks under OpenMP; paged_attention_cpu_{scalar,avx2,avx512}.cpp compile the same algorithm
// (paged_attention_cpu_impl_inl.h) for each ISA.
#pragma once

#include <cstdint>

#include "cpu/elem.h"

namespace parallax::paged_attention {

using cpu::Elem;

// One launch (the element type and head dim D are the kernel's template parameters). Element
// strides; q rows (its last dim) and the caches are contiguous, out is (N, H, D) contiguous,
// block_tables is (N, max_blocks) contiguous.
struct Problem {
  const void* q;
  int64_t q_seq_stride;
  int64_t q_head_stride;
  const void* k_cache;  // (num_blocks, block_size, H_kv, D)
  const void* v_cache;
  const int32_t* block_tables;
  const int32_t* context_lens;
  void* out;
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t block_size;
  int64_t num_blocks;
  int64_t max_blocks;
  float scale;
};

// Floats of scratch one task needs for contexts of up to `max_context` tokens.
inline int64_t scratch_floats(int64_t group, int64_t head_dim, int64_t max_context) {
  // q * scale and the output accumulator (G x D each), the softmax sums (G), the scores
  // (G x context, each row padded to a multiple of 16 floats).
  return 2 * group * head_dim + group + group * ((max_context + 15) / 16 * 16);
}

// Attends the G = H / H_kv query heads of KV head `kv_head` of sequence `seq`, writing their
// output rows. A context length of 0 writes zeros; a context length outside [0, max_blocks *
// block_size] or a used block id outside [0, num_blocks) writes NaN (nothing is read there).
using AttendFn = void (*)(const Problem& p, int64_t seq, int64_t kv_head, float* scratch);

// The kernel for `type` and `head_dim` (16, 32, 64, 128 or 256), or nullptr for another head dim.
AttendFn attend_kernel_scalar(Elem type, int64_t head_dim);
AttendFn attend_kernel_avx2(Elem type, int64_t head_dim);
AttendFn attend_kernel_avx512(Elem type, int64_t head_dim);

}  // namespace parallax::paged_attention
