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
import re
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .timing import quantile

_EVENT_END = re.compile(rb"\r?\n\r?\n")  # a blank line ends a server-sent event

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

    def settle(self, no_token: str) -> Result:
        """A finished stream: TTFT from the first event, ok when there was one, else ``no_token`` as
        the error."""
        self.ttft_s = self.event_times[0] if self.event_times else None
        self.ok = self.ttft_s is not None
        if not self.ok:
            self.error = no_token
        return self

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


def http_sender(base_url: str, *, headers: dict[str, str] | None = None) -> Sender:
    """A sender streaming ``POST {base_url}/v1/completions`` (greedy, ``max_tokens`` = the request's,
    usage in the last event), each request on its own HTTP/1.1 connection (``Connection: close``).

    The client shares the server's cores, so while a stream runs it only stamps each read with its
    arrival time (``_StampedReads``, an asyncio protocol: no task wakes per event); the response
    is de-chunked, cut into events and parsed once the server has closed the connection. At 64
    streams on 2 cores this client takes 6.5% of a core where aiohttp's stream reader took 9.4%
    (a process busy 10% of a core slowed the in-process engine by 13% there)."""
    url = urllib.parse.urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())

    async def send(req: LoadRequest) -> Result:
        body: dict[str, Any] = {"prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
                                "stream": True, "stream_options": {"include_usage": True}}
        if req.model is not None:
            body["model"] = req.model
        payload = json.dumps(body).encode()
        head = (f"POST {url.path.rstrip('/')}/v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n"
                f"{extra}\r\n").encode()
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        transport, reads = await loop.create_connection(lambda: _StampedReads(loop), host, port)
        try:
            transport.write(head + payload)
            await reads.closed
        finally:
            transport.close()
        result = Result(latency_s=time.perf_counter() - t0)
        status, events = _http_events(reads.chunks, t0)
        if status != 200:
            result.error = f"HTTP {status}: {b''.join(e for _, e in events).decode('utf-8', 'replace')[:300]}"
            return result
        return _parse_events(result, events)

    return send


class _StampedReads(asyncio.Protocol):
    """The bytes of one connection as read, each read with its ``time.perf_counter()``; ``closed``
    is done when the server closed the connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.closed: asyncio.Future[None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.chunks.append((time.perf_counter(), data))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _http_events(chunks: list[tuple[float, bytes]], t0: float) -> tuple[int, list[tuple[float, bytes]]]:
    """(status, the body's server-sent events as (seconds from ``t0`` to the read that completed
    each, raw event)); a body that is not an event stream comes back whole as one 'event'. Handles
    chunked and plain bodies."""
    raw = b"".join(data for _, data in chunks)
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return 0, [(0.0, raw)]
    header, body_start = raw[:end].decode("latin-1"), end + 4
    status = int(header.split(" ", 2)[1])
    chunked = "transfer-encoding: chunked" in header.lower()
    # the time each body byte arrived: reads in order, by offset
    bounds, offset = [], 0
    for when, data in chunks:
        offset += len(data)
        bounds.append((offset, when - t0))
    body, stamps = _dechunk(raw, body_start) if chunked else (raw[body_start:], [(body_start, len(raw) - body_start)])
    if status != 200 or b"data:" not in body:
        return status, [(bounds[-1][1], body)]
    # map each event's end (a body offset) back to the raw offset, then to the read that brought it
    events, pos, read, piece, before = [], 0, 0, 0, 0
    for sep in _EVENT_END.finditer(body):
        while before + stamps[piece][1] < sep.end():  # body offsets before piece `piece`: `before`
            before += stamps[piece][1]
            piece += 1
        raw_end = stamps[piece][0] + sep.end() - before
        while bounds[read][0] < raw_end:
            read += 1
        events.append((bounds[read][1], body[pos:sep.start()]))
        pos = sep.end()
    return status, events


def _dechunk(raw: bytes, pos: int) -> tuple[bytes, list[tuple[int, int]]]:
    """The body of a chunked response starting at ``pos``, and (raw offset, length) of each piece."""
    parts, stamps = [], []
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(raw[pos:eol].split(b";")[0], 16)
        if size == 0:
            break
        parts.append(raw[eol + 2:eol + 2 + size])
        stamps.append((eol + 2, size))
        pos = eol + 2 + size + 2
    return b"".join(parts), stamps


def _parse_events(result: Result, events: list[tuple[float, bytes]]) -> Result:
    """Fill ``result`` from a stream's events, (arrival time, raw event) in order."""
    texts = 0
    for now, event in events:
        lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
        if not lines:
            continue
        data = b"\n".join(lines)
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = f"stream error: {str(chunk['error'])[:300]}"
            return result
        for choice in chunk.get("choices") or []:
            if choice.get("text"):
                texts += 1
                result.event_times.append(now)
        usage = chunk.get("usage")
        if usage:
            result.output_tokens = int(usage["completion_tokens"])
            result.prompt_tokens = int(usage["prompt_tokens"])
    if not result.output_tokens:
        result.output_tokens = texts
    return result.settle("no token arrived")


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
        return result.settle("no token generated")

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
