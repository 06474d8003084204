"""An open-loop load generator for OpenAI-compatible servers and for the in-process async engine.

Requests are sent at Poisson arrival times (exponential gaps; ``rate=inf``: all at t=0) and never
wait for each other, as independent users would; each streams its tokens, so the client sees when
each one arrives:

* TTFT: from sending the request to its first generated text (server-sent events over HTTP; the
  first token of the engine's cumulative outputs in process).
* ITL: a request's mean inter-token latency, (last token time - first token time) / (tokens - 1)
  (vLLM's TPOT). ``transformers serve`` joins the tokens of a stream that fell behind into one
  event, so per-event gaps would not be per-token there; this definition is the same for every
  server. The p99 of the gaps between events is kept too (``event_gap_p99_ms``): stalls show there.

Output tokens are the server's ``usage.completion_tokens`` (``stream_options.include_usage``), else
the number of text events.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .timing import quantile

__all__ = ["LoadRequest", "Result", "poisson_arrivals", "run_load", "http_sender", "engine_sender", "summarize"]


@dataclass(frozen=True)
class LoadRequest:
    """One request: the prompt as text (HTTP) and as token ids (in process), how many tokens to
    generate, and the model (HTTP ``model`` field; in process, the adapter name or None)."""

    prompt: str
    prompt_ids: list[int]
    max_tokens: int
    model: str | None = None


@dataclass
class Result:
    """What one request measured; times in seconds from sending it."""

    ok: bool = False
    output_tokens: int = 0
    prompt_tokens: int | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    event_times: list[float] = field(default_factory=list)  # each text event's arrival
    error: str | None = None

    @property
    def itl_s(self) -> float | None:
        """Mean inter-token latency (TPOT); None with fewer than 2 tokens."""
        if self.output_tokens < 2 or len(self.event_times) < 1:
            return None
        return (self.event_times[-1] - self.event_times[0]) / (self.output_tokens - 1)


Sender = Callable[[LoadRequest], Awaitable[Result]]


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """``n`` arrival times (seconds, the first at 0) of a Poisson process of ``rate`` requests/s;
    ``rate=inf`` puts every request at 0."""
    if n < 0:
        raise ValueError(f"poisson_arrivals: n must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"poisson_arrivals: rate must be > 0 (requests/s) or inf, got {rate}")
    if math.isinf(rate) or n == 0:
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


async def run_load(send: Sender, requests: Sequence[LoadRequest], arrivals: Sequence[float], *,
                   timeout_s: float) -> tuple[list[Result], float]:
    """Send ``requests[i]`` at ``arrivals[i]`` (seconds from now) without waiting for earlier ones;
    (results in request order, wall seconds from the first send to the last completion). Requests
    not done ``timeout_s`` after the start are cancelled and fail with error "timeout"."""
    if len(requests) != len(arrivals):
        raise ValueError(f"run_load: {len(requests)} requests but {len(arrivals)} arrival times")
    loop = asyncio.get_running_loop()
    start = loop.time()
    ends: list[float] = []

    async def one(req: LoadRequest, at: float) -> Result:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        try:
            result = await send(req)
        finally:
            ends.append(loop.time())
        return result

    tasks = [asyncio.ensure_future(one(r, t)) for r, t in zip(requests, arrivals)]
    _, pending = await asyncio.wait(tasks, timeout=timeout_s) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    results = []
    for task in tasks:
        if task in pending:
            results.append(Result(error="timeout"))
        elif task.exception() is not None:
            exc = task.exception()
            results.append(Result(error=f"{type(exc).__name__}: {exc}"))
        else:
            results.append(task.result())
    # a timed-out run lasted until the timeout; otherwise until its last request ended
    wall = (loop.time() if pending or not ends else max(ends)) - start
    return results, wall


def http_sender(session: Any, base_url: str, *, headers: dict[str, str] | None = None) -> Sender:
    """A sender streaming ``POST {base_url}/v1/completions`` over an ``aiohttp.ClientSession``
    (greedy, ``max_tokens`` = the request's, usage in the last event)."""

    async def send(req: LoadRequest) -> Result:
        body: dict[str, Any] = {"prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
                                "stream": True, "stream_options": {"include_usage": True}}
        if req.model is not None:
            body["model"] = req.model
        result = Result()
        events = 0
        t0 = time.perf_counter()
        async with session.post(f"{base_url}/v1/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return result
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {str(chunk['error'])[:300]}"
                    return result
                now = time.perf_counter() - t0
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        events += 1
                        result.event_times.append(now)
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = int(usage["completion_tokens"])
                    result.prompt_tokens = int(usage["prompt_tokens"])
        result.latency_s = time.perf_counter() - t0
        if not result.output_tokens:
            result.output_tokens = events
        result.ttft_s = result.event_times[0] if result.event_times else None
        result.ok = result.ttft_s is not None
        if not result.ok:
            result.error = "no token arrived"
        return result

    return send


def engine_sender(engine: Any) -> Sender:
    """A sender for ``parallax.serve.async_engine.AsyncEngine``: the request's token ids, greedy,
    exactly ``max_tokens`` tokens (end-of-sequence ignored), adapter ``req.model``."""
    from parallax.inference import SamplingParams

    async def send(req: LoadRequest) -> Result:
        params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
        result = Result(prompt_tokens=len(req.prompt_ids))
        seen = 0
        t0 = time.perf_counter()
        async for out in engine.generate(req.prompt_ids, params, request_id=uuid.uuid4().hex, lora=req.model):
            if getattr(out, "error", None):
                result.error = f"engine error: {out.error}"
                return result
            n = len(out.outputs[0].token_ids)
            if n > seen:
                result.event_times.append(time.perf_counter() - t0)
                seen = n
        result.latency_s = time.perf_counter() - t0
        result.output_tokens = seen
        result.ttft_s = result.event_times[0] if result.event_times else None
        result.ok = result.ttft_s is not None
        if not result.ok:
            result.error = "no token generated"
        return result

    return send


def _ms(values: list[float], q: float | None = None) -> float | None:
    if not values:
        return None
    return 1e3 * (float(np.mean(values)) if q is None else quantile(values, q))


def summarize(results: Sequence[Result], wall_s: float, requests: Sequence[LoadRequest]) -> dict[str, Any]:
    """One row's measurements: completed/failed requests, output tokens/s, achieved request rate
    (completed / wall), TTFT and ITL mean and p99, the p99 gap between events, the requests that
    generated fewer tokens than asked (a server that stopped early) and those whose prompt the
    server counted as another number of tokens than ``prompt_ids`` has."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok]
    itl = [r.itl_s for r in ok if r.itl_s is not None]
    gaps = [b - a for r in ok for a, b in zip(r.event_times, r.event_times[1:])]
    tokens = sum(r.output_tokens for r in ok)
    errors = sorted({r.error for r in results if not r.ok and r.error})
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "output_tokens": tokens, "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "achieved_rate": len(ok) / wall_s if wall_s > 0 else None,
        "ttft_mean_ms": _ms(ttft), "ttft_p99_ms": _ms(ttft, 0.99),
        "itl_mean_ms": _ms(itl), "itl_p99_ms": _ms(itl, 0.99), "event_gap_p99_ms": _ms(gaps, 0.99),
        "short_requests": sum(r.output_tokens < q.max_tokens for r, q in zip(results, requests) if r.ok),
        # the server tokenized the prompt text to other ids than the load generator (and the in-process engine) did
        "prompt_mismatches": sum(r.prompt_tokens not in (None, len(q.prompt_ids))
                                 for r, q in zip(results, requests) if r.ok),
        "wall_s": wall_s, "errors": errors[:5] or None,
    }
