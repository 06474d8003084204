// Multi-tensor launches: tensor addresses travel in the kernel's parameter block (no
// host-to-device copy per call), with up to kMaxTensors tensors and kMaxBlocks chunks of kChunk
// elements per launch; each thread block then handles one chunk of one tensor.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace parallax::cuda {

// kDepth lists of tensors with matching sizes (e.g. params, grads, moments). The struct must
// stay within the 4 KiB kernel-parameter limit: kDepth*kMaxTensors*8 + kMaxTensors*8 + kMaxBlocks*5.
template <int kDepth, int kMaxTensors, int kMaxBlocks>
struct TensorListMeta {
  static constexpr int depth = kDepth;
  static constexpr int max_tensors = kMaxTensors;
  static constexpr int max_blocks = kMaxBlocks;
  void* addr[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
};

// Calls launch(meta, blocks) as often as needed so that every chunk of every tensor of
// lists[0..depth) is in exactly one launch. lists[d] may be empty for d > 0 (a null address).
template <typename Meta, typename Launch>
void for_each_launch(const std::vector<std::vector<at::Tensor>>& lists, int64_t chunk, Launch launch) {
  Meta meta{};
  int tensors = 0;
  int blocks = 0;
  auto flush = [&] {
    if (blocks > 0) launch(meta, blocks);
    blocks = 0;
  };
  for (size_t i = 0; i < lists[0].size(); ++i) {
    const int64_t numel = lists[0][i].numel();
    if (numel == 0) continue;
    for (int d = 0; d < Meta::depth; ++d)
      meta.addr[d][tensors] = lists[d].empty() ? nullptr : lists[d][i].data_ptr();
    meta.numel[tensors] = numel;
    const int64_t chunks = (numel + chunk - 1) / chunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(tensors);
      meta.block_to_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == Meta::max_blocks || (last_chunk && tensors + 1 == Meta::max_tensors)) {
        flush();
        if (!last_chunk) {  // the tensor continues in the next launch: keep it in slot 0
          for (int d = 0; d < Meta::depth; ++d) meta.addr[d][0] = meta.addr[d][tensors];
          meta.numel[0] = numel;
          tensors = 0;
        } else {
          tensors = -1;
        }
      }
    }
    ++tensors;
  }
  flush();
}

}  // namespace parallax::cuda
