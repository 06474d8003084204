// CPU implementation of parallax::paged_attention (single-token decode over a paged KV cache).
// One task per (sequence, KV head): the G query heads of a KV head are computed together, so
// each key and value row is read once. Tasks are spread over OpenMP threads (dynamic schedule:
// context lengths differ), each with its own fp32 scratch; every task runs the kernel of the
// active ISA (see cpu/isa.h). partition_size is accepted for the schema and ignored: split-K
// exists to fill a GPU's SMs, and a batch's (sequence, KV head) tasks already outnumber the cores.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/isa.h"
#include "paged_attention/paged_attention_cpu.h"

namespace parallax::paged_attention {
namespace {

constexpr const char* kOp = "parallax::paged_attention";

AttendFn kernel_for_active_isa(Elem type, int64_t head_dim) {
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512: return attend_kernel_avx512(type, head_dim);
    case cpu::Isa::kAvx2: return attend_kernel_avx2(type, head_dim);
    default: return attend_kernel_scalar(type, head_dim);
  }
}

at::Tensor paged_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables_in, const at::Tensor& context_lens_in,
                               double softmax_scale, int64_t /*partition_size: see the file comment*/) {
  TORCH_CHECK(q_in.dim() == 3, kOp, ": q must be (N, H, D), got ", q_in.sizes());
  TORCH_CHECK(k_cache.dim() == 4, kOp, ": k_cache must be (num_blocks, block_size, H_kv, D), got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), kOp, ": v_cache has shape ", v_cache.sizes(), " but k_cache has ",
              k_cache.sizes());
  TORCH_CHECK(block_tables_in.dim() == 2 && block_tables_in.scalar_type() == at::kInt, kOp,
              ": block_tables must be int32 (N, max_blocks)");
  TORCH_CHECK(context_lens_in.dim() == 1 && context_lens_in.scalar_type() == at::kInt, kOp,
              ": context_lens must be int32 (N,)");
  for (const at::Tensor* t : {&q_in, &k_cache, &v_cache, &block_tables_in, &context_lens_in}) {
    TORCH_CHECK(t->device().is_cpu(), kOp, ": every tensor must be on the CPU, got one on ", t->device());
  }
  const Elem type = cpu::elem_of(q_in, kOp, "q");
  TORCH_CHECK(k_cache.scalar_type() == q_in.scalar_type() && v_cache.scalar_type() == q_in.scalar_type(), kOp,
              ": k_cache and v_cache must have q's dtype ", q_in.scalar_type());
  const int64_t n = q_in.size(0), h = q_in.size(1), d = q_in.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), h_kv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d, kOp, ": q has head dim ", d, " but k_cache has ", k_cache.size(3));
  TORCH_CHECK(h_kv > 0 && h % h_kv == 0, kOp, ": q's ", h, " heads are not a multiple of k_cache's ", h_kv,
              " KV heads");
  TORCH_CHECK(block_size == 8 || block_size == 16 || block_size == 32, kOp, ": block size ", block_size,
              " is not supported (8, 16, 32)");
  TORCH_CHECK(block_tables_in.size(0) == n && context_lens_in.size(0) == n, kOp,
              ": block_tables and context_lens must have one row per sequence of q");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), kOp, ": k_cache and v_cache must be contiguous");
  const AttendFn kernel = kernel_for_active_isa(type, d);
  TORCH_CHECK(kernel != nullptr, kOp, ": head dim ", d, " is not supported (16, 32, 64, 128, 256)");

  at::Tensor out = at::empty({n, h, d}, q_in.options());
  if (n == 0 || h == 0) return out;
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor block_tables = block_tables_in.contiguous();
  const at::Tensor context_lens = context_lens_in.contiguous();

  Problem p{};
  p.q = q.data_ptr();
  p.q_seq_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.context_lens = context_lens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.num_heads = h;
  p.num_kv_heads = h_kv;
  p.block_size = block_size;
  p.num_blocks = num_blocks;
  p.max_blocks = block_tables.size(1);
  p.scale = static_cast<float>(softmax_scale);

  // Scratch sized for the longest context a task may read (longer ones are NaN-ed, not read).
  const int64_t cap = p.max_blocks * block_size;
  int64_t max_context = 0;
  for (int64_t i = 0; i < n; ++i) max_context = std::max<int64_t>(max_context, std::min<int64_t>(p.context_lens[i], cap));
  const int64_t per_thread = scratch_floats(h / h_kv, d, max_context);
  const int64_t tasks = n * h_kv;
  // Honour torch.set_num_threads().
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), tasks));
  std::vector<float> scratch(static_cast<size_t>(per_thread * threads));
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    float* mine = scratch.data() + per_thread * omp_get_thread_num();
#else
    float* mine = scratch.data();
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) kernel(p, t / h_kv, t % h_kv, mine);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(parallax, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

}  // namespace parallax::paged_attention
