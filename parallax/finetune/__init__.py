"""Supervised fine-tuning: JSONL prompt/completion or chat data with loss masks
(``parallax.finetune.data``) and padding-free packed batches (``parallax.finetune.packing``).

    from parallax.finetune import load_sft_data, pack_examples, collate_packed
    splits = load_sft_data("train.jsonl", tokenizer, max_length=model.config.block_size, val_fraction=0.05)
    for bin_ in pack_examples(splits.train, max_length=model.config.block_size):
        batch = collate_packed(bin_)
        loss = model(batch.input_ids, batch.targets, positions=batch.positions)
"""

from .data import (IGNORE_INDEX, LOSS_MODES, SFTDataError, SFTExample, SFTSplits, format_masks, load_sft_data,
                   load_sft_examples, render_row, split_validation)
from .packing import (PackedBatch, PaddedBatch, best_fit_decreasing, collate_packed, collate_padded, pack_examples,
                      packing_padding_share)

__all__ = ["IGNORE_INDEX", "LOSS_MODES", "SFTDataError", "SFTExample", "SFTSplits", "format_masks", "load_sft_data",
           "load_sft_examples", "render_row", "split_validation", "PackedBatch", "PaddedBatch", "best_fit_decreasing",
           "collate_packed", "collate_padded", "pack_examples", "packing_padding_share"]
