// CPU implementation of parallax::sgmv and parallax::sgmv_add_ (Punica's SGMV and add_lora): each
// token's LoRA update through its own adapter slot, returned (sgmv) or added into y in place (sgmv_add_:
// no (T, N) update tensor, no separate add pass, base tokens' rows untouched). The tokens are sorted by slot (a counting sort on the host: the indices are CPU
// tensors) and each slot's run is cut into tiles of kTileTokens tokens; then two parallel passes:
// shrink u = scaling[s] * x_tile @ A[s]^T (fp32, (adapted tokens, R)), and expand
// out[tile, n-chunk] = u_tile @ B[s, n-chunk]^T (fp32 accumulation, rounded once). Cost: T * R *
// (K + N) multiply-adds, one read of each adapted x row and one write of every output row (zeros for
// -1 tokens). The kernels for the active ISA are in sgmv_tile_*.cpp.
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/elem.h"
#include "cpu/isa.h"
#include "sgmv/sgmv_cpu_kernels.h"

namespace parallax::sgmv {
namespace {

// Tokens of one slot per shrink work item: 4 register blocks of 4 tokens.
constexpr int64_t kTileTokens = 16;
// Multiply-adds (T * R * (K + N)) below which the call runs on the calling thread alone. Measured
// (2 threads, K 256, N 768, R 8, 8 slots): 64 tokens (0.5M) 17.7 us on one thread, 16 us on two;
// and while another process kept both cores busy, a call with two OpenMP regions took ~3 ms (a
// region waits for a descheduled thread) against the linear layers' ~10x slowdown. A decode step's
// calls stay serial; prefill chunks (256+ tokens here) are split.
constexpr int64_t kParallelWork = 1 << 21;
// Multiply-adds per work item at least, when split.
constexpr int64_t kItemWork = 1 << 15;

Kernels kernels_for_active_isa() {
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512: return kernels_avx512();
    case cpu::Isa::kAvx2: return kernels_avx2();
    default: return kernels_scalar();
  }
}

struct Tile {
  int64_t slot, begin, end;  // positions [begin, end) of the slot-sorted adapted tokens
};

void check_args(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                const at::Tensor& scaling, const char* op) {
  for (const auto* t : {&x, &a, &b, &indices, &scaling})
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": every tensor must be on the CPU, got one on ",
                      t->device());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must have shape (T, K), got ", x.sizes());
  TORCH_CHECK_VALUE(a.dim() == 3 && a.size(2) == x.size(1) && a.size(1) >= 1,
                    op, ": lora_a must have shape (S, R, K) with R >= 1 and K=", x.size(1), ", got ",
                    a.sizes());
  TORCH_CHECK_VALUE(b.dim() == 3 && b.size(0) == a.size(0) && b.size(2) == a.size(1),
                    op, ": lora_b must have shape (S, N, R) with S=", a.size(0), " and R=", a.size(1),
                    ", got ", b.sizes());
  TORCH_CHECK_VALUE(b.scalar_type() == a.scalar_type(), op, ": lora_b has dtype ", b.scalar_type(),
                    " but lora_a has ", a.scalar_type(), "; they must share a dtype");
  for (const auto& [t, name] : {std::pair{&x, "x"}, std::pair{&a, "lora_a"}}) {
    const at::ScalarType st = t->scalar_type();
    TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, ": ", name,
                      " must be float32, bfloat16 or float16, got ", st);
  }
  TORCH_CHECK_VALUE(indices.dim() == 1 && indices.size(0) == x.size(0),
                    op, ": indices must have shape (T,) = (", x.size(0), ",), got ", indices.sizes());
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
                    op, ": indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(scaling.dim() == 1 && scaling.size(0) == a.size(0) && at::isFloatingType(scaling.scalar_type()),
                    op, ": scaling must be a floating tensor of shape (S,) = (", a.size(0), ",), got ",
                    scaling.scalar_type(), " ", scaling.sizes());
}

// The tokens' slots as int64, checked to lie in [-1, S) (ValueError naming the range found).
std::vector<int64_t> read_slots(const at::Tensor& indices, int64_t num_slots) {
  const at::Tensor idx = indices.contiguous();
  const int64_t t = idx.numel();
  std::vector<int64_t> slots(t);
  if (idx.scalar_type() == at::kInt) {
    const int32_t* p = idx.data_ptr<int32_t>();
    for (int64_t i = 0; i < t; ++i) slots[i] = p[i];
  } else {
    std::memcpy(slots.data(), idx.data_ptr<int64_t>(), t * sizeof(int64_t));
  }
  if (t > 0) {
    const auto [low, high] = std::minmax_element(slots.begin(), slots.end());
    TORCH_CHECK_VALUE(*low >= -1 && *high < num_slots, "sgmv: indices must lie in [-1, ", num_slots,
                      ") (-1: no adapter; else a slot of the ", num_slots, " in lora_a), got values in [", *low,
                      ", ", *high, "]");
  }
  return slots;
}

// The update of every adapted token written to (accumulate false: out is (T, N) contiguous in the
// adapters' dtype, base tokens' rows zeroed) or added into (accumulate true: any float out whose rows
// have their N dim contiguous; base tokens' rows untouched) out's rows.
void run(const at::Tensor& x_in, const at::Tensor& lora_a_in, const at::Tensor& lora_b_in, const at::Tensor& indices,
         const at::Tensor& scaling_in, const at::Tensor& out, bool accumulate) {
  const int64_t t = x_in.size(0), k = x_in.size(1), s = lora_a_in.size(0), r = lora_a_in.size(1);
  const int64_t n = lora_b_in.size(1);
  const at::ScalarType wt = lora_a_in.scalar_type();
  const std::vector<int64_t> slots = read_slots(indices, s);
  if (out.numel() == 0) return;

  // x in the adapters' dtype (as PEFT runs the LoRA path); the innermost dims contiguous (any row
  // strides are read as they are). lora_b with n contiguous is the fast layout: a contiguous
  // (S, R, N) tensor transposed to (S, N, R); another layout is copied into it here, every call.
  at::Tensor x = x_in.scalar_type() == wt ? x_in : x_in.to(wt);
  if (x.stride(1) != 1 && k > 1) x = x.contiguous();
  at::Tensor a = lora_a_in.stride(2) == 1 || k <= 1 ? lora_a_in : lora_a_in.contiguous();
  at::Tensor b = lora_b_in.stride(1) == 1 || n <= 1 ? lora_b_in : lora_b_in.transpose(1, 2).contiguous().transpose(1, 2);
  const at::Tensor scaling = scaling_in.to(at::kFloat).contiguous();

  // Counting sort by slot: base tokens (-1) first, then slot 0, 1, ...; tiles over the adapted ones.
  std::vector<int64_t> start(s + 2, 0);
  for (int64_t v : slots) ++start[v + 2];
  for (int64_t i = 1; i < s + 2; ++i) start[i] += start[i - 1];
  std::vector<int64_t> order(t);
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < t; ++i) order[next[slots[i] + 1]++] = i;
  }
  const int64_t base_count = start[1];
  if (!accumulate) {
    const size_t row_bytes = n * out.element_size();
    char* out_bytes = static_cast<char*>(out.data_ptr());
    for (int64_t i = 0; i < base_count; ++i) std::memset(out_bytes + order[i] * row_bytes, 0, row_bytes);
  }
  const int64_t* adapted = order.data() + base_count;  // positions in u
  std::vector<Tile> tiles;
  for (int64_t slot = 0; slot < s; ++slot)
    for (int64_t p = start[slot + 1]; p < start[slot + 2]; p += kTileTokens)
      tiles.push_back({slot, p - base_count, std::min(p + kTileTokens, start[slot + 2]) - base_count});
  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  if (num_tiles == 0) return;

  const Problem p{x.data_ptr(), x.stride(0), a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0),
                  b.stride(2), scaling.data_ptr<float>(), out.data_ptr(), out.stride(0), k, n, r,
                  cpu::elem_of(a, "parallax::sgmv", "lora_a"), cpu::elem_of(out, "parallax::sgmv_add_", "y"),
                  accumulate};
  const Kernels kern = kernels_for_active_isa();
  const int64_t adapted_count = t - base_count;
  std::vector<float> u(adapted_count * r);

  const bool serial = adapted_count * r * (k + n) < kParallelWork;
  auto shrink_tiles = [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Tile& tl = tiles[i];
      kern.shrink(p, adapted + tl.begin, tl.end - tl.begin, tl.slot, u.data() + tl.begin * r);
    }
  };
  if (serial) {
    shrink_tiles(0, num_tiles);
  } else {
    at::parallel_for(0, num_tiles, std::max<int64_t>(1, kItemWork / std::max<int64_t>(1, kTileTokens * r * k)),
                     shrink_tiles);
  }

  // Expand work items: (tile, column chunk); chunks of a multiple of 32 columns, enough of them
  // that few tiles (a decode batch of one adapter) still spread over the threads.
  const int64_t threads = serial ? 1 : at::get_num_threads();
  const int64_t want_chunks = std::max<int64_t>(1, (4 * threads + num_tiles - 1) / num_tiles);
  const int64_t chunk = std::max<int64_t>(32, ((n + want_chunks - 1) / want_chunks + 31) / 32 * 32);
  const int64_t chunks = (n + chunk - 1) / chunk;
  auto expand_items = [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Tile& tl = tiles[i / chunks];
      const int64_t n0 = (i % chunks) * chunk;
      kern.expand(p, adapted + tl.begin, tl.end - tl.begin, tl.slot, u.data() + tl.begin * r, n0,
                  std::min(n0 + chunk, n));
    }
  };
  if (serial) {
    expand_items(0, num_tiles * chunks);
  } else {
    at::parallel_for(0, num_tiles * chunks,
                     std::max<int64_t>(1, kItemWork / std::max<int64_t>(1, kTileTokens * r * chunk)), expand_items);
  }
}

at::Tensor sgmv_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& indices,
                    const at::Tensor& scaling) {
  check_args(x, lora_a, lora_b, indices, scaling, "parallax::sgmv");
  at::Tensor out = at::empty({x.size(0), lora_b.size(1)}, lora_a.options().memory_format(at::MemoryFormat::Contiguous));
  run(x, lora_a, lora_b, indices, scaling, out, false);
  return out;
}

void sgmv_add_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                  const at::Tensor& indices, const at::Tensor& scaling) {
  check_args(x, lora_a, lora_b, indices, scaling, "parallax::sgmv_add_");
  TORCH_CHECK_VALUE(y.device().is_cpu(), "parallax::sgmv_add_: y must be on the CPU, got ", y.device());
  TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == lora_b.size(1),
                    "parallax::sgmv_add_: y must have shape (T, N) = (", x.size(0), ", ", lora_b.size(1), "), got ",
                    y.sizes());
  const at::ScalarType yt = y.scalar_type();
  TORCH_CHECK_VALUE(yt == at::kFloat || yt == at::kBFloat16 || yt == at::kHalf,
                    "parallax::sgmv_add_: y must be float32, bfloat16 or float16, got ", yt);
  TORCH_CHECK_VALUE(y.stride(1) == 1 || y.size(1) <= 1,
                    "parallax::sgmv_add_: y's rows must be contiguous (stride 1 along N), got strides ", y.strides());
  run(x, lora_a, lora_b, indices, scaling, y, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(parallax, CPU, m) {
  m.impl("sgmv", &sgmv_cpu);
  m.impl("sgmv_add_", &sgmv_add_cpu);
}

}  // namespace parallax::sgmv
