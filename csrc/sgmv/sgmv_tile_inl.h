// Shrink and expand for one ISA, written once over a vector type V (cpu/simd_*_inl.h, included
// after each ISA file's target pragma): V::Reg holds V::kWidth floats; zero, set1, fmadd (a * b + c,
// one rounding where the ISA has FMA), reduce_add, load<W>/store<W> (kWidth elements of type W as
// floats). The tails past the last full vector use cpu::load1/store1 (cpu/simd_scalar_inl.h).
// No std:: calls here: a library template instantiated under an ISA target could be merged with
// the baseline copy by the linker.
//
// Register blocking: shrink computes kRows tokens x kRanks<V> ranks at once (each A row chunk
// loaded once for kRows tokens, each x chunk once for kRanks ranks); expand kRows tokens x 2
// vectors of columns (each B chunk loaded once for kRows tokens).
#pragma once

#include <cstdint>

#include "sgmv/sgmv_cpu_kernels.h"
#include "cpu/simd_scalar_inl.h"

namespace parallax::sgmv {
namespace {

constexpr int kRows = 4;
// Ranks per shrink block: kRows x kRanks accumulators fit the vector registers (16 ymm: 4 x 2;
// 32 zmm: 4 x 4).
template <class V>
constexpr int kRanks = V::kWidth == 8 ? 2 : 4;

using cpu::kElemBytes;
using cpu::load1;
using cpu::store1;

template <class V, Elem W, int M, int RB>
void shrink_block(const Problem& p, const int64_t* tokens, int64_t slot, int64_t r0, float* u) {
  constexpr int64_t L = V::kWidth;
  const char* xr[M];
  const char* ar[RB];
  for (int i = 0; i < M; ++i) xr[i] = static_cast<const char*>(p.x) + tokens[i] * p.x_row * kElemBytes<W>;
  for (int j = 0; j < RB; ++j)
    ar[j] = static_cast<const char*>(p.a) + (slot * p.a_slot + (r0 + j) * p.a_row) * kElemBytes<W>;
  typename V::Reg acc[M][RB];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < RB; ++j) acc[i][j] = V::zero();
  const int64_t kv = p.k - p.k % L;
  for (int64_t k = 0; k < kv; k += L) {
    typename V::Reg av[RB];
    for (int j = 0; j < RB; ++j) av[j] = V::template load<W>(ar[j], k);
    for (int i = 0; i < M; ++i) {
      const typename V::Reg xv = V::template load<W>(xr[i], k);
      for (int j = 0; j < RB; ++j) acc[i][j] = V::fmadd(xv, av[j], acc[i][j]);
    }
  }
  const float scale = p.scaling[slot];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < RB; ++j) {
      float s = V::reduce_add(acc[i][j]);
      for (int64_t k = kv; k < p.k; ++k) s += load1<W>(xr[i], k) * load1<W>(ar[j], k);
      u[i * p.r + r0 + j] = s * scale;
    }
  }
}

template <class V, Elem W, int M>
void shrink_rows(const Problem& p, const int64_t* tokens, int64_t slot, float* u) {
  int64_t r = 0;
  for (; r + kRanks<V> <= p.r; r += kRanks<V>) shrink_block<V, W, M, kRanks<V>>(p, tokens, slot, r, u);
  for (; r < p.r; ++r) shrink_block<V, W, M, 1>(p, tokens, slot, r, u);
}

// NB vectors of columns from n for M tokens; out rows of type Y, added to when ACC.
template <class V, Elem W, Elem Y, bool ACC, int M, int NB>
void expand_block(const Problem& p, const char* bs, void* const* orow, const float* u, int64_t n) {
  typename V::Reg acc[M][NB];
  for (int i = 0; i < M; ++i)
    for (int c = 0; c < NB; ++c) acc[i][c] = V::zero();
  for (int64_t r = 0; r < p.r; ++r) {
    const char* br = bs + r * p.b_row * kElemBytes<W>;
    typename V::Reg bv[NB];
    for (int c = 0; c < NB; ++c) bv[c] = V::template load<W>(br, n + c * V::kWidth);
    for (int i = 0; i < M; ++i) {
      const typename V::Reg uv = V::set1(u[i * p.r + r]);
      for (int c = 0; c < NB; ++c) acc[i][c] = V::fmadd(uv, bv[c], acc[i][c]);
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int c = 0; c < NB; ++c) {
      const int64_t col = n + c * V::kWidth;
      if constexpr (ACC) acc[i][c] = V::add(acc[i][c], V::template load<Y>(orow[i], col));
      V::template store<Y>(orow[i], col, acc[i][c]);
    }
  }
}

template <class V, Elem W, Elem Y, bool ACC, int M>
void expand_rows(const Problem& p, const int64_t* tokens, int64_t slot, const float* u, int64_t n0, int64_t n1) {
  constexpr int64_t L = V::kWidth;
  void* orow[M];
  for (int i = 0; i < M; ++i) orow[i] = static_cast<char*>(p.out) + tokens[i] * p.out_row * kElemBytes<Y>;
  const char* bs = static_cast<const char*>(p.b) + slot * p.b_slot * kElemBytes<W>;
  int64_t n = n0;
  for (; n + 2 * L <= n1; n += 2 * L) expand_block<V, W, Y, ACC, M, 2>(p, bs, orow, u, n);
  for (; n + L <= n1; n += L) expand_block<V, W, Y, ACC, M, 1>(p, bs, orow, u, n);
  for (; n < n1; ++n) {
    for (int i = 0; i < M; ++i) {
      float s = 0.0f;
      for (int64_t r = 0; r < p.r; ++r) s += u[i * p.r + r] * load1<W>(bs + r * p.b_row * kElemBytes<W>, n);
      if constexpr (ACC) s += load1<Y>(orow[i], n);
      store1<Y>(orow[i], n, s);
    }
  }
}

// Tokens in blocks of kRows, the last block smaller.
template <class V, Elem W>
void shrink_w(const Problem& p, const int64_t* tokens, int64_t m, int64_t slot, float* u) {
  for (int64_t i = 0; i < m; i += kRows) {
    float* ui = u + i * p.r;
    switch (m - i < kRows ? m - i : kRows) {
      case 4: shrink_rows<V, W, 4>(p, tokens + i, slot, ui); break;
      case 3: shrink_rows<V, W, 3>(p, tokens + i, slot, ui); break;
      case 2: shrink_rows<V, W, 2>(p, tokens + i, slot, ui); break;
      default: shrink_rows<V, W, 1>(p, tokens + i, slot, ui);
    }
  }
}

template <class V, Elem W, Elem Y, bool ACC>
void expand_wy(const Problem& p, const int64_t* tokens, int64_t m, int64_t slot, const float* u, int64_t n0,
               int64_t n1) {
  for (int64_t i = 0; i < m; i += kRows) {
    const float* ui = u + i * p.r;
    switch (m - i < kRows ? m - i : kRows) {
      case 4: expand_rows<V, W, Y, ACC, 4>(p, tokens + i, slot, ui, n0, n1); break;
      case 3: expand_rows<V, W, Y, ACC, 3>(p, tokens + i, slot, ui, n0, n1); break;
      case 2: expand_rows<V, W, Y, ACC, 2>(p, tokens + i, slot, ui, n0, n1); break;
      default: expand_rows<V, W, Y, ACC, 1>(p, tokens + i, slot, ui, n0, n1);
    }
  }
}

// sgmv writes rows of the adapters' type; sgmv_add_ adds into rows of any float type.
template <class V, Elem W>
void expand_w(const Problem& p, const int64_t* tokens, int64_t m, int64_t slot, const float* u, int64_t n0,
              int64_t n1) {
  if (!p.accumulate) return expand_wy<V, W, W, false>(p, tokens, m, slot, u, n0, n1);
  switch (p.y) {
    case Elem::kBF16: return expand_wy<V, W, Elem::kBF16, true>(p, tokens, m, slot, u, n0, n1);
    case Elem::kF16: return expand_wy<V, W, Elem::kF16, true>(p, tokens, m, slot, u, n0, n1);
    default: return expand_wy<V, W, Elem::kF32, true>(p, tokens, m, slot, u, n0, n1);
  }
}

template <class V>
void shrink(const Problem& p, const int64_t* tokens, int64_t m, int64_t slot, float* u) {
  switch (p.w) {
    case Elem::kBF16: return shrink_w<V, Elem::kBF16>(p, tokens, m, slot, u);
    case Elem::kF16: return shrink_w<V, Elem::kF16>(p, tokens, m, slot, u);
    default: return shrink_w<V, Elem::kF32>(p, tokens, m, slot, u);
  }
}

template <class V>
void expand(const Problem& p, const int64_t* tokens, int64_t m, int64_t slot, const float* u, int64_t n0,
            int64_t n1) {
  switch (p.w) {
    case Elem::kBF16: return expand_w<V, Elem::kBF16>(p, tokens, m, slot, u, n0, n1);
    case Elem::kF16: return expand_w<V, Elem::kF16>(p, tokens, m, slot, u, n0, n1);
    default: return expand_w<V, Elem::kF32>(p, tokens, m, slot, u, n0, n1);
  }
}

}  // namespace
}  // namespace parallax::sgmv
