// STREAM triad, a = b + scalar * c, over OpenMP threads: the memory-bandwidth probe that
// benchmarks divide bytes by to get the physical floor of a memory-bound op. (torch's copy_
// is not a proper probe: on the 2-core dev box it measured ~40 GB/s while AdamW moved ~88.)
#include <algorithm>

#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace parallax::stream {
namespace {

// `b` may alias `a` (the in-place variant the benchmark also measures), so no __restrict.
// One clone per ISA, picked by the loader (ifunc) on first call, so the probe runs at the
// widest vector width the CPU has without raising the extension's baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void triad_range(float* a, const float* b, const float* c, float scalar,
                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = b[i] + scalar * c[i];
}

void stream_triad_cpu(at::Tensor& a, const at::Tensor& b, const at::Tensor& c, double scalar) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&a, &b, &c}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "parallax::stream_triad_: a, b and c must be contiguous float32 CPU tensors");
    TORCH_CHECK(t->numel() == a.numel(), "parallax::stream_triad_: a, b and c must have the same size");
  }
  float* pa = a.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  const float* pc = c.data_ptr<float>();
  const int64_t n = a.numel();
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int64_t tid = 0, nt = 1;
#endif
    // Contiguous 64-byte-aligned slices per thread, as STREAM's static schedule does.
    const int64_t per = ((n + nt - 1) / nt + 15) / 16 * 16;
    const int64_t begin = std::min(n, tid * per), end = std::min(n, begin + per);
    triad_range(pa + begin, pb + begin, pc + begin, static_cast<float>(scalar), end - begin);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(parallax, CPU, m) { m.impl("stream_triad_", &stream_triad_cpu); }

}  // namespace parallax::stream
