"""Requests, their sequences (one per sample), and the results handed back to callers."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from parallax.inference.sampling import SamplingParams

__all__ = ["SequenceStatus", "Sequence", "Request", "TokenLogprob", "CompletionOutput", "RequestOutput"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV dropped, to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the ``k`` most likely tokens at its position.

    ``top`` holds (token id, logprob) pairs, most likely first, k of them (``SamplingParams.logprobs``);
    it may or may not contain ``token_id``. Log-probabilities are those of the raw logits (before
    temperature / top-k / top-p).
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Sequence:
    """One sample of a request: its tokens and how many of them have KV in the cache.

    ``token_ids`` is the prompt followed by the generated tokens; the KV of the first
    ``num_computed`` of them is in the cache. A running sequence always has at least one token
    to compute (the last sampled one), so one engine step feeds
    ``token_ids[num_computed:]`` (or a chunk of it) and, when that reaches the end, samples.
    """

    seq_id: int
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]
    generator: torch.Generator | None
    fork_n: int = 1  # sequences this one becomes at its first sample (n > 1 before forking)
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_text: str | None = None  # the text cut before a stop string, once one was generated
    num_preemptions: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when asked

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(eq=False)
class Request:
    """A prompt with its sampling parameters; grows to ``params.n`` sequences at its first sample."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.perf_counter)
    seqs: list[Sequence] = field(default_factory=list)
    first_token_time: float | None = None
    finished_time: float | None = None
    error: str | None = None
    seed: int = 0  # of the samples' generators (SamplingParams.seed, or drawn when it is None)
    lora: str | None = None  # the LoRA adapter serving it (None: the base model)

    @property
    def finished(self) -> bool:
        return self.error is not None or (len(self.seqs) == self.params.n and all(s.finished for s in self.seqs))


@dataclass
class CompletionOutput:
    """One sample: generated ``token_ids``, their ``text`` (None without a tokenizer), and why it
    ended: 'stop' (a stop token or string), 'length' (max_tokens or the model's context),
    'error' (see ``RequestOutput.error``), 'abort', or None while it runs. ``logprobs``: one
    ``TokenLogprob`` per generated token when the request asked (``SamplingParams.logprobs``), else None."""

    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """The result of one prompt: its samples (``outputs``, n of them) and timings.

    ``token_ids``, ``text`` and ``finish_reason`` are those of the first sample. ``error`` says
    why a request failed (it then has finish reason 'error' and no tokens). Times are
    ``time.perf_counter()`` values. ``lora``: the LoRA adapter that served it (None: the base model).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None
    lora: str | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
