// Schemas of every parallax op (torch.library), and the few build/CPU facts Python asks for.
// Kernels register themselves next to their code with TORCH_LIBRARY_IMPL; fake (meta)
// implementations are registered in Python beside each op's launcher (parallax/ops/).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/isa.h"

TORCH_LIBRARY(parallax, m) {
  // One AdamW step over a list of fp32 params (or fp32 master weights), in place. When
  // params_out is non-empty, the updated values are also written there in its dtype.
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] params_out, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float step, bool maximize) -> ()");
  // grads *= inv_scale in place (computed in fp32), one pass; found_inf (one float32 element on
  // the grads' device) is set to 1 when any element was inf or NaN before, else left unchanged.
  m.def("unscale_(Tensor(a!)[] grads, Tensor(b!) found_inf, float inv_scale) -> ()");
  // a = b + scalar * c (b may be a): memory-bandwidth probe for benchmark floors.
  m.def("stream_triad_(Tensor(a!) a, Tensor b, Tensor c, float scalar) -> ()");
  // PagedAttention decode: q (N, H, D) attends over its sequence's cached keys/values, caches
  // (num_blocks, block_size, H_kv, D) found through block_tables (N, max_blocks) int32, the first
  // context_lens[n] (int32) tokens. partition_size 0: one program per sequence and KV head; > 0:
  // split-K partitions of that many tokens, then a reduce kernel (CUDA; the CPU kernel ignores it:
  // one task per sequence and KV head). Returns (N, H, D) in q's dtype.
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
      "float softmax_scale, int partition_size) -> Tensor");
  // Writes k, v (T, H_kv, D) into the caches at slot_mapping (T,) int32/int64 (block * block_size
  // + offset); a negative slot skips the token.
  m.def("reshape_and_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  // Batched multi-LoRA (Punica's SGMV): delta[t] = scaling[i] * (x[t] @ lora_a[i]^T) @ lora_b[i]^T with
  // i = indices[t], zero where i == -1. x (T, K); lora_a (S, R, K); lora_b (S, N, R) (fastest with its N
  // dim contiguous); indices (T,) int32/int64 in [-1, S); scaling (S,). Returns (T, N) in lora_a's dtype.
  m.def("sgmv(Tensor x, Tensor lora_a, Tensor lora_b, Tensor indices, Tensor scaling) -> Tensor");
  // y (T, N) += sgmv(x, lora_a, lora_b, indices, scaling) in place (Punica's add_lora): only the adapted
  // tokens' rows are touched; y any of float32/bfloat16/float16 with its N dim contiguous.
  m.def("sgmv_add_(Tensor(a!) y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor indices, Tensor scaling) -> ()");
}

namespace {

bool built_with_cuda() {
#ifdef PARALLAX_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "parallax compiled ops; the ops themselves live under torch.ops.parallax";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("built_with_openmp", &built_with_openmp, "True when the CPU kernels use OpenMP threads");
  m.def("cpu_isa", [] { return parallax::cpu::isa_name(parallax::cpu::active_isa()); },
        "SIMD instruction set the CPU kernels use now: avx512, avx2 or scalar");
  m.def("detected_cpu_isa", [] { return parallax::cpu::isa_name(parallax::cpu::detected_isa()); },
        "Best SIMD instruction set this CPU supports");
  m.def("set_cpu_isa", &parallax::cpu::set_isa, "Force the CPU kernels onto scalar, avx2 or avx512");
}
