"""``ParallaxLM``: lm-evaluation-harness's three request types scored by any parallax model.

The semantics are lm-eval's ``HFLM`` (``lm_eval/models/huggingface.py`` and ``lm_eval/api/model.py``),
so scores agree with its ``hf`` backend on the same model and tokenizer:

* tokenization (``TemplateLM._encode_pair``): trailing spaces of the context move to the
  continuation; the continuation's tokens are those of ``encode(context + continuation)`` after
  the context's; strings are encoded with the tokenizer's special tokens (a BOS where its
  post-processor adds one) unless they already start with the BOS text; an empty context
  conditions on the prefix token (BOS, else end-of-text);
* ``loglikelihood``: the sum of the continuation tokens' log-probabilities and whether each was
  the argmax, the input left-truncated to ``max_length`` tokens;
* ``loglikelihood_rolling``: ``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window``
  over the whole document, summed;
* ``generate_until``: greedy generation through ``parallax.inference.LLM`` (continuous batching,
  prefix caching of shared few-shot prompts), cut at the first ``until`` string.

Scoring batches requests longest first (few pad tokens, and the memory peak comes first);
requests whose inputs coincide (several one-token choices after one context, repeated requests)
share one forward. Only the continuation rows go through the LM head.

Shapes: B batch, T tokens, C model width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from parallax.progress import progress_bar

__all__ = ["ParallaxLM", "rolling_windows"]


class ParallaxLM:
    """lm-eval's LM interface (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``)
    over a parallax model of any family and a parallax tokenizer.

    batch_size: sequences per forward. max_length: longest input (default: the model's
    ``config.block_size``). progress: a tqdm bar per call over its requests.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 8, max_length: int | None = None,
                 progress: bool = False) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.max_length = max_length or model.config.block_size
        self.device = next(model.parameters()).device
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix_token_id = bos if bos is not None else tokenizer.eot_id
        self._bos_text = tokenizer.decode([bos]) if bos is not None else None

    # -- tokenization, as lm-eval's HFLM ------------------------------------------------------

    def tok_encode(self, text: str) -> list[int]:
        """Token ids with the tokenizer's special tokens, unless text already starts with BOS."""
        starts_with_bos = bool(self._bos_text) and text.startswith(self._bos_text)
        return self.tokenizer.encode(text, add_special_tokens=not starts_with_bos)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval splits them."""
        if context == "":
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    # -- the three request types ------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy) for each (context, continuation)."""
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """The whole log-likelihood of each text, in windows of max_length tokens."""
        pairs, owner = [], []
        for i, text in enumerate(texts):
            for window in rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length):
                pairs.append(window)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (logprob, _) in zip(owner, self.score_tokens(pairs)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Greedy continuations of each context, cut at the first of ``until`` (and the end of
        text); ``max_gen_toks`` (default 256) new tokens at most."""
        from parallax.inference import LLM, SamplingParams

        llm = LLM(self.model, tokenizer=self.tokenizer, max_num_seqs=max(self.batch_size, 1))
        prompts, params = [], []
        for context, kwargs in requests:
            unknown = set(kwargs) - {"until", "max_gen_toks", "do_sample", "temperature"}
            if unknown or kwargs.get("do_sample") or kwargs.get("temperature", 0):
                raise ValueError(f"generate_until supports greedy decoding with until/max_gen_toks; got {kwargs}")
            until = kwargs.get("until") or []
            max_new = int(kwargs.get("max_gen_toks", 256))
            if max_new >= self.max_length:
                raise ValueError(f"generate_until: max_gen_toks {max_new} leaves no room for a context in the "
                                 f"model's {self.max_length} positions")
            ids = self.tok_encode(context)[-(self.max_length - max_new):]  # lm-eval keeps the context's end
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=max_new, temperature=0.0,
                                         stop=[until] if isinstance(until, str) else list(until)))
        if not prompts:
            return []
        return [out.outputs[0].text for out in llm.generate(prompts, params, use_tqdm=self.progress)]

    # -- scoring ----------------------------------------------------------------------------

    @torch.inference_mode()
    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log-probability, greedy) of each continuation after its context, batched."""
        inputs: dict[tuple[tuple[int, ...], int], list[int]] = {}  # (input ids, continuation length) -> requests
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError(f"request {i}: the continuation is empty after tokenization")
            if len(continuation) > self.max_length:
                raise ValueError(f"request {i}: the continuation has {len(continuation)} tokens, more than "
                                 f"max_length {self.max_length}")
            ids = (context + continuation)[-(self.max_length + 1):][:-1]
            inputs.setdefault((tuple(ids), len(continuation)), []).append(i)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        keys = sorted(inputs, key=lambda k: -len(k[0]))
        bar = progress_bar(len(pairs), "loglikelihood", "request", enabled=self.progress)
        for start in range(0, len(keys), self.batch_size):
            batch = keys[start:start + self.batch_size]
            for key, logprobs in zip(batch, self._continuation_logprobs(batch)):
                for i in inputs[key]:
                    targets = torch.tensor(pairs[i][1], device=logprobs.device)
                    picked = logprobs.gather(1, targets[:, None])[:, 0]
                    results[i] = (float(picked.sum()), bool((logprobs.argmax(-1) == targets).all()))
                if bar is not None:
                    bar.update(len(inputs[key]))
        if bar is not None:
            bar.close()
        return results

    def _continuation_logprobs(self, batch: list[tuple[tuple[int, ...], int]]) -> list[torch.Tensor]:
        """For each (input ids, n): log-softmax (n, V) float32 of the last n positions."""
        width = len(batch[0][0])
        idx = torch.zeros((len(batch), width), dtype=torch.long)  # right-padded: causal rows ignore the padding
        for row, (ids, _) in enumerate(batch):
            idx[row, :len(ids)] = torch.tensor(ids)
        h = self.model.hidden_states(idx.to(self.device))  # (B, T, C)
        rows = torch.cat([h[row, len(ids) - n:len(ids)] for row, (ids, n) in enumerate(batch)])  # (sum n, C)
        logprobs = self.model.logits(rows).float().log_softmax(-1)
        return list(logprobs.split([n for _, n in batch]))


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window``: (context,
    continuation) pairs that predict every token once, each with the longest context that fits."""
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token] + tokens[:first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_length)
        end = predicted + n
        windows.append((tokens[end - max_length - 1:end - 1], tokens[end - n:end]))
        predicted += n
    # disjoint: drop the context tokens that are also predicted in the window
    return [(context[:len(context) - (len(cont) - 1)], cont) for context, cont in windows]
