"""Sampling: ``SamplingParams`` (validated), the top-k / top-p masks, and seeded per-sequence draws.

Shapes: N rows (sequences that sample this step), V vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from parallax.validate import is_int, is_real

__all__ = ["MAX_LOGPROBS", "SamplingParams", "top_k_top_p_mask", "sample", "sample_generator", "token_logprobs"]

MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's top_logprobs limit)


@dataclass(kw_only=True)
class SamplingParams:
    """How the tokens of one request are chosen.

    max_tokens: most tokens generated per sample (>= 1).
    temperature: 0 picks the most likely token (greedy); > 0 samples from
        softmax(logits / temperature).
    top_k: keep only the k most likely tokens (ties with the k-th kept); None keeps all.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p, in
        (0, 1]; 1 keeps all. Applied after top_k, to the distribution top_k left.
    n: samples per prompt. They share the prompt's KV-cache blocks (copy-on-write).
    seed: makes every sample of the request reproducible whatever else is in the batch; None
        draws a seed from torch's global generator when the request is added.
    stop: strings that end a sample; the text is cut before the first one (needs a tokenizer).
    stop_token_ids: token ids that end a sample (kept in ``token_ids``).
    ignore_eos: do not stop at the tokenizer's end-of-sequence tokens (benchmarks).
    skip_special_tokens: leave special tokens (end of sequence, chat markers) out of the text, as
        vLLM does by default; ``token_ids`` keeps them.
    logprobs: None returns no log-probabilities; k in [0, MAX_LOGPROBS] returns, for each generated
        token, its log-probability and the k most likely tokens with theirs (``TokenLogprob``):
        ``log_softmax`` of the model's raw float32 logits, before temperature, top-k and top-p
        (vLLM's default), so they do not depend on how the token was chosen.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_tokens", "n"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"SamplingParams.{name} must be a positive integer; got {value!r}")
        if not is_real(self.temperature) or not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0; got {self.temperature!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"SamplingParams.top_k must be None or an integer >= 1; got {self.top_k!r}")
        if not is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1]; got {self.top_p!r}")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise ValueError(f"SamplingParams.seed must be None or an integer >= 0; got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must be a string or a list of non-empty strings; got {self.stop!r}")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids must be a list of token ids >= 0; "
                             f"got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SamplingParams.{name} must be True or False; got {getattr(self, name)!r}")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"SamplingParams.logprobs must be None or an integer in [0, {MAX_LOGPROBS}]; "
                             f"got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_generator(seed: int, index: int, device: torch.device | str) -> torch.Generator:
    """The generator of sample ``index`` of a request seeded with ``seed``: independent streams
    for every (seed, index) pair (numpy's SeedSequence mixes them)."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]) & (2**63 - 1)
    return torch.Generator(device=device).manual_seed(state)


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which tokens each row keeps: bool (N, V).

    logits (N, V), already divided by the temperature. top_k int64 (N,): keep the k largest
    logits (and any tied with the k-th); k >= V keeps all. top_p float (N,): of what top-k
    kept, keep the most likely tokens until their probability reaches top_p (the token that
    crosses it is kept, so at least one is); 1 keeps everything top-k kept.
    """
    n, v = logits.shape
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
    kth = sorted_logits.gather(1, (top_k.clamp(1, v) - 1)[:, None])  # (N, 1)
    keep = sorted_logits >= kth
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    # Probability of the tokens ranked above each one, as an exclusive cumulative sum: subtracting
    # probs from an inclusive cumsum rounds 0.3 + 0.5 - 0.3 down to 0.79999995 and keeps one too many.
    cum = probs.cumsum(dim=-1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
    keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1.0)  # 1 keeps all, whatever the rounding
    return torch.zeros_like(keep).scatter_(1, order, keep)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token id per row: int64 (N,).

    logits (N, V) float; row i follows ``params[i]`` and draws from ``generators[i]`` (None only
    for greedy rows). Draws use the exponential race (argmax of probs / Exp(1) noise), one
    Exp(1) per vocabulary entry per token, so a sequence's stream of draws does not depend on
    which other rows share the batch.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # greedy rows keep this
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    device = logits.device
    sub = logits[rows]
    temperature = torch.tensor([params[i].temperature for i in rows], device=device)
    vocab = sub.shape[1]
    top_k = torch.tensor([params[i].top_k or vocab for i in rows], device=device)
    top_p = torch.tensor([params[i].top_p for i in rows], device=device)
    sub = sub / temperature[:, None]
    if any(params[i].top_k is not None or params[i].top_p < 1.0 for i in rows):
        sub = sub.masked_fill(~top_k_top_p_mask(sub, top_k, top_p), float("-inf"))
    probs = torch.softmax(sub, dim=-1)  # (len(rows), V)
    noise = torch.empty_like(probs)
    for j, i in enumerate(rows):
        noise[j].exponential_(generator=generators[i])
    tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens



def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens and of each row's k most likely ones.

    logits (N, V), raw (before temperature); tokens int64 (N,). Returns float32 ``chosen`` (N,),
    ``top_values`` (N, k) sorted most likely first and int64 ``top_ids`` (N, k).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    top_values, top_ids = logprobs.topk(k, dim=-1)  # k = 0 gives (N, 0)
    return chosen, top_values, top_ids
