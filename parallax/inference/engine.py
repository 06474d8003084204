"""The engine: ``LLMEngine`` (add requests, run steps) and ``LLM`` (generate, stream) on top.

One ``LLMEngine.step`` schedules a batch (``Scheduler``), applies queued copy-on-write block
copies, runs the model once over every scheduled token (``ModelRunner``), forks sequences of
n > 1 requests at their first sample (sharing blocks), samples, and retires finished sequences.

    llm = px.inference.LLM(model, tokenizer=ByteTokenizer())
    for out in llm.generate(["Once upon", "The "], px.inference.SamplingParams(max_tokens=32, temperature=0)):
        print(out.text, out.finish_reason)

Many LoRA adapters over the one base model, mixed in every batch (``parallax.inference.lora``):

    llm.add_lora("sql", "runs/sql/adapter")            # a PEFT-format adapter directory
    llm.generate(["SELECT", "Once upon"], params, lora=["sql", None])   # None: the base model
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import time
from collections import abc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn

from parallax.inference.block_manager import BlockManager, KVCacheStats
from parallax.inference.lora import LoraRegistry
from parallax.inference.model_runner import ATTENTION_IMPLS, ModelRunner, SeqInput, attention_layers
from parallax.inference.sampling import SamplingParams, sample, sample_generator, token_logprobs
from parallax.inference.scheduler import Scheduler
from parallax.inference.sequence import (
    CompletionOutput,
    Request,
    RequestOutput,
    Sequence,
    TokenLogprob,
)
from parallax.progress import progress_bar
from parallax.validate import is_int, positive_int

__all__ = ["EngineConfig", "LLMEngine", "LLM", "Tokenizer", "Prompt", "encode_prompt"]

log = logging.getLogger(__name__)

Prompt = str | abc.Sequence[int]
# Share of memory the KV pool takes when neither num_blocks nor kv_cache_memory is given: of the
# free device memory on CUDA (after the weights; the rest is for activations), of the available
# host memory on CPU.
CUDA_KV_FRACTION = 0.8
CPU_KV_FRACTION = 0.25


class Tokenizer(Protocol):
    """What the engine needs of a tokenizer (``parallax.data.ByteTokenizer`` is one). An end-of-
    sequence ids, when it has them, are read from ``eos_token_ids``, ``eot_id`` and ``eos_token_id``."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: abc.Sequence[int]) -> str: ...


@dataclass(kw_only=True)
class EngineConfig:
    """Sizes of the KV pool and of a step.

    block_size: tokens per KV block. num_blocks: blocks in the pool; None sizes it from
        kv_cache_memory (bytes), whose default is ``CUDA_KV_FRACTION`` of the free GPU memory or
        ``CPU_KV_FRACTION`` of the available host memory, capped at what max_num_seqs sequences
        of max_model_len tokens can use.
    max_num_seqs: most sequences in a step. max_num_batched_tokens: most tokens in a step
        (longer prompts are prefilled in chunks).
    max_model_len: most tokens a sequence may feed to the model; None is the model's block_size
        (less the virtual tokens of a prefix-tuned model).
    enable_prefix_caching: reuse the KV of full blocks whose whole prefix was seen before.
    attention: 'auto', 'paged' or 'torch' (see ``parallax.inference.model_runner``).
    """

    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    attention: str = "auto"

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            positive_int(name, getattr(self, name))
        for name in ("num_blocks", "max_model_len", "kv_cache_memory"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True or False; got {self.enable_prefix_caching!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}; got {self.attention!r}")



def encode_prompt(prompt: Prompt, tokenizer: Tokenizer | None, vocab_size: int, name: str = "prompt") -> list[int]:
    """Token ids of a prompt (a string needs a tokenizer); ValueError naming ``name`` when it is
    empty or holds ids outside the vocabulary [0, vocab_size)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"{name} is a string but the engine has no tokenizer; pass token ids or a tokenizer")
        ids = list(tokenizer.encode(prompt))
    elif isinstance(prompt, (abc.Sequence, torch.Tensor)) and all(is_int(t) for t in prompt):
        ids = [int(t) for t in prompt]
    else:
        raise ValueError(f"{name} must be a string or a list of token ids; got {type(prompt).__name__}")
    if not ids:
        raise ValueError(f"{name} is empty: a prompt needs at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name} holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})")
    return ids

class LLMEngine:
    """Requests in, one batch per ``step``, results out. Holds the model, KV pool and scheduler."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None,
                 config: EngineConfig | None = None) -> None:
        attention_layers(model, "the inference engine")  # raises ValueError for a model the runner cannot serve
        config = config or EngineConfig()
        self.config = config
        self.model = model.eval()  # the runner calls its modules directly: no dropout
        self.tokenizer = tokenizer
        # tokenizers whose decode can leave special tokens out (parallax's do; a user's may not)
        self._decode_skips = (tokenizer is not None
                              and "skip_special_tokens" in inspect.signature(tokenizer.decode).parameters)
        self.eos_token_ids = _eos_ids(tokenizer)
        # prefix tuning's virtual tokens take the first positions of the model's context
        virtual = getattr(model, "position_offset", 0)
        context = model.config.block_size - virtual
        self.max_model_len = config.max_model_len or context
        if self.max_model_len > context:
            prefix = f" less {virtual} prefix-tuning virtual tokens" if virtual else ""
            raise ValueError(f"max_model_len={self.max_model_len} is longer than the model's context "
                             f"(block_size={model.config.block_size}{prefix})")
        bs = config.block_size
        per_seq = -(-self.max_model_len // bs)
        num_blocks = config.num_blocks or _blocks_from_memory(model, config, per_seq)
        if num_blocks < per_seq:
            source = f"num_blocks={num_blocks}" if config.num_blocks else \
                f"a KV memory budget of {_memory_budget(model, config)} bytes ({num_blocks} blocks)"
            raise ValueError(f"the KV pool is too small for one sequence: {source} of {bs} tokens holds "
                             f"{num_blocks * bs} tokens, but a sequence of max_model_len={self.max_model_len} "
                             f"tokens needs {per_seq} blocks; raise num_blocks (or kv_cache_memory) or lower "
                             f"max_model_len")
        self.blocks = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.loras = LoraRegistry(model)  # adapters served per request (add_lora)
        self.runner = ModelRunner(model, num_blocks, bs, config.attention, loras=self.loras)
        log.info("inference: KV pool of %d blocks x %d tokens (%.1f MiB), attention %s", num_blocks, bs,
                 num_blocks * ModelRunner.bytes_per_block(model, bs) / 2**20, self.runner.attention)
        self._requests: dict[str, Request] = {}
        self._failed: list[Request] = []  # rejected by add_request, reported by the next step
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self.num_steps = 0

    # -- requests ---------------------------------------------------------------------------------

    def encode(self, prompt: Prompt, name: str = "prompt") -> list[int]:
        """Token ids of a prompt (see ``encode_prompt``)."""
        return encode_prompt(prompt, self.tokenizer, self.model.config.vocab_size, name)

    def add_lora(self, name: str, path: str | os.PathLike) -> None:
        """Serve the PEFT-format LoRA adapter directory ``path`` to requests that name it (``lora=``).
        ValueError for a name in use, a bad directory or an adapter of another base model. Call it
        between steps (not thread-safe)."""
        self.loras.add(name, path)

    @property
    def lora_names(self) -> list[str]:
        """The adapters added with ``add_lora``, in order."""
        return self.loras.names

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    *, prompt_token_ids: list[int] | None = None, lora: str | None = None) -> str:
        """Queue a prompt; returns its request id. A prompt longer than max_model_len does not
        raise: its request fails alone (finish reason 'error', reason in ``error``).
        ``prompt_token_ids`` skips encoding (already checked by ``encode``). ``lora``: the name
        of an adapter added with ``add_lora`` to serve it through (None: the base model)."""
        self.loras.slot(lora)  # ValueError naming lora for an unknown adapter
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams; got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer (stop strings are matched on the text); "
                             "use stop_token_ids")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"SamplingParams.n={params.n} is more than max_num_seqs={self.config.max_num_seqs}")
        ids = prompt_token_ids if prompt_token_ids is not None else self.encode(prompt)
        request_id = str(next(self._request_ids)) if request_id is None else request_id
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = Request(request_id, prompt if isinstance(prompt, str) else None, ids, params, lora=lora)
        if len(ids) > self.max_model_len:
            request.error = (f"the prompt has {len(ids)} tokens, more than the model's context of "
                             f"{self.max_model_len} tokens")
            request.finished_time = time.perf_counter()
            self._failed.append(request)
            return request_id
        if not params.greedy:
            request.seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
        seq = Sequence(next(self._seq_ids), request, 0, list(ids),
                       None if params.greedy else sample_generator(request.seed, 0, self.runner.device),
                       fork_n=params.n)
        request.seqs.append(seq)
        self._requests[request_id] = request
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request; its sequences release their blocks. Returns its final output (finished,
        finish reason 'abort' for the samples still running), None for an unknown or done request."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        request.finished_time = time.perf_counter()
        out = self._output(request)
        out.finished = True
        for sample_out in out.outputs:  # samples of an n > 1 request not forked yet
            sample_out.finish_reason = sample_out.finish_reason or "abort"
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests or self._failed)

    def stats(self) -> KVCacheStats:
        """The KV pool: blocks used / free / cached, prefix-cache hit rate, waste."""
        return self.blocks.stats()

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def num_running(self) -> int:
        """Requests with a sequence in the running batch."""
        return len({seq.request.request_id for seq in self.scheduler.running})

    @property
    def num_waiting(self) -> int:
        """Unfinished requests with no running sequence (not admitted yet, or preempted)."""
        return len(self._requests) - self.num_running

    # -- one step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns the requests that got tokens, finished or failed meanwhile."""
        changed: dict[str, Request] = {r.request_id: r for r in self._failed}
        self._failed = []
        plan = self.scheduler.schedule()
        if not plan.scheduled and self.scheduler.has_work():
            # cannot happen: the pool holds a full-length sequence and n <= max_num_seqs
            raise RuntimeError("inference: the scheduler could not run any of the waiting sequences")
        if plan.scheduled:
            self.num_steps += 1
            self.runner.copy_blocks(self.blocks.take_copies())
            inputs = [SeqInput(seq.token_ids[seq.num_computed:seq.num_computed + n], seq.num_computed,
                               self.blocks.block_table(seq.seq_id), seq.num_computed + n == len(seq.token_ids))
                      for seq, n in plan.scheduled]
            lora_slots = [self.loras.slot(seq.request.lora) for seq, _ in plan.scheduled] if len(self.loras) else None
            logits = self.runner.forward(inputs, lora_slots)  # (sampling sequences, V)
            groups = []  # per logits row: the sequences sampling from it (n > 1 forks share a row)
            for (seq, n), inp in zip(plan.scheduled, inputs):
                seq.num_computed += n
                self.blocks.cache_full_blocks(seq.seq_id, seq.token_ids, seq.num_computed)
                if inp.sample:
                    groups.append([seq] + self._fork(seq))
            rows = [i for i, group in enumerate(groups) for _ in group]
            flat = [s for group in groups for s in group]
            if flat:
                tokens = sample(logits[rows], [s.request.params for s in flat], [s.generator for s in flat])
                logprobs = self._logprobs(logits, rows, flat, tokens)
                now = time.perf_counter()
                for seq, token, logprob in zip(flat, tokens.tolist(), logprobs):
                    self._append(seq, token, now, logprob)
                    changed[seq.request.request_id] = seq.request
        outputs = []
        for request in changed.values():
            if request.finished:
                self._requests.pop(request.request_id, None)
                if request.finished_time is None:
                    request.finished_time = time.perf_counter()
            outputs.append(self._output(request))
        return outputs

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """At an n > 1 request's first sample: n - 1 new sequences sharing the parent's blocks."""
        if parent.fork_n == 1:
            return []
        request, children = parent.request, []
        for index in range(1, parent.fork_n):
            generator = None if parent.generator is None else sample_generator(request.seed, index, self.runner.device)
            child = Sequence(next(self._seq_ids), request, index, list(parent.token_ids), generator,
                             num_computed=parent.num_computed)
            self.blocks.fork(parent.seq_id, child.seq_id)
            self.scheduler.add_running(child)
            request.seqs.append(child)
            children.append(child)
        parent.fork_n = 1
        return children

    @staticmethod
    def _logprobs(logits: torch.Tensor, rows: list[int], flat: list[Sequence],
                  tokens: torch.Tensor) -> list[TokenLogprob | None]:
        """Per sampled sequence, its token's ``TokenLogprob`` when its request asked, else None.
        Nothing is computed when no request asks. logits (rows sampled, V) raw float32."""
        want = [j for j, seq in enumerate(flat) if seq.request.params.logprobs is not None]
        result: list[TokenLogprob | None] = [None] * len(flat)
        if not want:
            return result
        k = max(flat[j].request.params.logprobs for j in want)
        chosen, top_values, top_ids = token_logprobs(logits[[rows[j] for j in want]], tokens[want], k)
        chosen, top_values, top_ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()  # one copy each
        token_ids = tokens[want].tolist()
        for i, j in enumerate(want):
            kj = flat[j].request.params.logprobs
            result[j] = TokenLogprob(token_ids[i], chosen[i], list(zip(top_ids[i][:kj], top_values[i][:kj])))
        return result

    def _append(self, seq: Sequence, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        """Add a sampled token (and its logprob, when asked) and retire the sequence if it is done."""
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        request, params = seq.request, seq.request.params
        if request.first_token_time is None:
            request.first_token_time = now
        reason = None
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        elif params.stop:
            text = self._decode(seq.output_token_ids, params)
            cuts = [i for i in (text.find(s) for s in params.stop) if i >= 0]
            if cuts:
                seq.stop_text = text[:min(cuts)]
                reason = "stop"
        if reason is None and (len(seq.output_token_ids) >= params.max_tokens
                               or len(seq.token_ids) > self.max_model_len):  # the next token could not be fed
            reason = "length"
        if reason is not None:
            seq.finish_reason = reason
            self.scheduler.finish(seq)

    def _decode(self, ids: list[int], params: SamplingParams) -> str:
        if params.skip_special_tokens and self._decode_skips:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids)

    def _output(self, request: Request) -> RequestOutput:
        want_logprobs = request.params.logprobs is not None
        if request.error is not None:
            outputs = [CompletionOutput(0, [], None if self.tokenizer is None else "", "error",
                                        [] if want_logprobs else None)]
        else:
            outputs = []
            for i in range(request.params.n):
                seq = request.seqs[i] if i < len(request.seqs) else None
                ids = list(seq.output_token_ids) if seq is not None else []
                text = None
                if self.tokenizer is not None:
                    text = seq.stop_text if seq is not None and seq.stop_text is not None else \
                        self._decode(ids, request.params)
                logprobs = (list(seq.logprobs) if seq is not None else []) if want_logprobs else None
                outputs.append(CompletionOutput(i, ids, text, seq.finish_reason if seq is not None else None,
                                                logprobs))
        return RequestOutput(request.request_id, request.prompt, list(request.prompt_token_ids), outputs,
                             finished=request.finished, error=request.error, arrival_time=request.arrival_time,
                             first_token_time=request.first_token_time, finished_time=request.finished_time,
                             lora=request.lora)


class LLM:
    """Offline generation with the paged-KV engine.

    model: a parallax model of any family (``parallax.models.from_preset`` / ``from_hf``); its
        device and dtype are used; it is put in eval mode.
    tokenizer: encodes string prompts and decodes outputs (``encode``/``decode``; its
    end-of-sequence ids end a sample); None takes token-id prompts only. The rest configure the
    KV pool and the scheduler (``EngineConfig``).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None, block_size: int = 16,
                 num_blocks: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 **config: Any) -> None:
        self.engine = LLMEngine(model, tokenizer, EngineConfig(
            block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, **config))

    def add_lora(self, name: str, path: str | os.PathLike) -> None:
        """Serve a PEFT-format LoRA adapter directory to prompts that name it (``LLMEngine.add_lora``)."""
        self.engine.add_lora(name, path)

    def generate(self, prompts: Prompt | abc.Sequence[Prompt],
                 params: SamplingParams | abc.Sequence[SamplingParams] | None = None, *,
                 lora: str | None | abc.Sequence[str | None] = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; one ``RequestOutput`` per prompt, in order.

        prompts: a string, a list of token ids, or a list of those. params: one SamplingParams
        for all, or one per prompt (default: SamplingParams()). lora: the adapter (``add_lora``)
        serving all prompts, or one per prompt; None is the base model. use_tqdm: a progress bar
        over finished requests (vLLM's flag).
        """
        final: dict[str, RequestOutput] = {}
        ids: list[str] = []
        outputs = self._run(prompts, params, ids, lora)
        bar = progress_bar(len(ids), "generate", "request", enabled=use_tqdm)
        for out in outputs:
            if out.finished:
                final[out.request_id] = out
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [final[i] for i in ids]

    def stream(self, prompts: Prompt | abc.Sequence[Prompt],
               params: SamplingParams | abc.Sequence[SamplingParams] | None = None, *,
               lora: str | None | abc.Sequence[str | None] = None) -> Iterator[RequestOutput]:
        """Like ``generate``, but yields a request's ``RequestOutput`` (everything so far) each
        step it gets tokens; the last one of each request has ``finished`` set. Closing the
        iterator early aborts the requests still running."""
        return self._run(prompts, params, [], lora)

    def stats(self) -> KVCacheStats:
        """The KV pool: blocks used / free / cached, prefix-cache hit rate, waste."""
        return self.engine.stats()

    def _run(self, prompts, params, ids: list[str], lora=None) -> Iterator[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"params has {len(params)} entries for {len(prompts)} prompts; pass one "
                             "SamplingParams or one per prompt")
        loras = _as_lora_list(lora, len(prompts))
        for name in loras:
            self.engine.loras.slot(name)  # ValueError naming lora for an unknown adapter
        encoded = [self.engine.encode(p, f"prompts[{i}]") for i, p in enumerate(prompts)]  # all checked first
        for prompt, tokens, p, name in zip(prompts, encoded, params, loras):
            ids.append(self.engine.add_request(prompt, p, prompt_token_ids=tokens, lora=name))
        return self._loop(set(ids))

    def _loop(self, pending: set[str]) -> Iterator[RequestOutput]:
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for request_id in pending:
                self.engine.abort(request_id)


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, str) or (isinstance(prompts, abc.Sequence) and prompts and all(is_int(t) for t in prompts)):
        return [prompts]
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 1:
        return [prompts.tolist()]
    if not isinstance(prompts, abc.Sequence) or not prompts:
        raise ValueError(f"prompts must be a string, a list of token ids, or a non-empty list of those; "
                         f"got {prompts!r}")
    return list(prompts)


def _as_lora_list(lora: Any, n: int) -> list[str | None]:
    """One adapter name (or None) per prompt from ``lora``: a name or None for all, or a list of n."""
    if lora is None or isinstance(lora, str):
        return [lora] * n
    if not isinstance(lora, abc.Sequence) or len(lora) != n:
        raise ValueError(f"lora must be an adapter name, None, or a list of one per prompt ({n}); got {lora!r}")
    return list(lora)


def _eos_ids(tokenizer: Tokenizer | None) -> frozenset[int]:
    """Every id that ends a sample: the tokenizer's ``eos_token_ids`` (Llama 3 has two, from
    generation_config.json), ``eos_token_id`` and ``eot_id``."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or ())
    for name in ("eot_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    return frozenset(ids)


def _memory_budget(model: nn.Module, config: EngineConfig) -> int:
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_KV_FRACTION)
    return int(_available_host_memory() * CPU_KV_FRACTION)


def _blocks_from_memory(model: nn.Module, config: EngineConfig, per_seq: int) -> int:
    """Blocks that the memory budget holds, capped at what max_num_seqs full sequences can use."""
    fits = _memory_budget(model, config) // ModelRunner.bytes_per_block(model, config.block_size)
    return min(fits, config.max_num_seqs * per_seq)


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")



