"""Sampling without a KV cache, for any model family: the end-of-training sample and small tests.
Serving uses ``parallax.inference.LLM`` (paged KV cache) instead."""

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens).

    temperature 0 picks the most likely token (greedy). top_k keeps only the k most likely
    tokens before sampling. The context is cropped to the model's last ``config.block_size``
    tokens. Call model.eval() first unless dropout is wanted. Each step reruns the context.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1; got {top_k}")
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -model.config.block_size:]  # (B, <= block_size)
        logits = model(idx_cond)[:, -1, :]  # (B, V)
        if temperature == 0:
            idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
