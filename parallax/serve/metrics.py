"""Prometheus metrics of the server, with vLLM's names under the ``parallax:`` prefix.

The engine loop (``parallax.serve.async_engine``) records events as they happen: the first token
of a request (time to first token, prompt tokens), later tokens (inter-token latency, generated
tokens), the end of a request (end-to-end latency, finish reason). Gauges (running and waiting
requests, KV blocks, prefix-cache hit rate, tokens/s) are refreshed from an engine snapshot on
each ``render``. The metrics live in their own ``CollectorRegistry``, so several servers (or
tests) in one process do not collide.

    metrics = ServeMetrics(snapshot=async_engine.snapshot)
    body = metrics.render()   # bytes, content type prometheus_client.CONTENT_TYPE_LATEST
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServeMetrics", "PREFIX", "TOKENS_PER_SECOND_WINDOW"]

PREFIX = "parallax:"
TOKENS_PER_SECOND_WINDOW = 10.0  # seconds over which generation_tokens_per_second is averaged

# vLLM's buckets, with finer ones below 10 ms: a small model on CPU steps in about a millisecond.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0)

# snapshot key -> gauge name (without the prefix) and help text
SNAPSHOT_GAUGES = {
    "running": ("num_requests_running", "Requests in the running batch."),
    "waiting": ("num_requests_waiting", "Requests waiting to run (queued, not admitted, or preempted)."),
    "kv_blocks_used": ("kv_cache_blocks_used", "KV-cache blocks held by running sequences."),
    "kv_blocks_total": ("kv_cache_blocks_total", "KV-cache blocks in the pool."),
    "kv_usage": ("kv_cache_usage_perc", "Share of the KV-cache blocks in use (0 to 1)."),
    "prefix_hit_rate": ("prefix_cache_hit_rate", "Share of looked-up prompt tokens found in the prefix cache."),
}


class ServeMetrics:
    """The server's metrics. Recording methods are thread-safe (the engine thread calls them).

    snapshot: returns the engine state for the gauges, a mapping with the keys of
    ``SNAPSHOT_GAUGES`` (``AsyncEngine.snapshot``); None leaves those gauges at 0.
    clock: ``time.perf_counter`` (tests pass a fake one).
    """

    def __init__(self, snapshot: Callable[[], Mapping[str, float]] | None = None, *,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.registry = CollectorRegistry()
        self._snapshot = snapshot
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated) of the last window
        r = self.registry
        self._gauges = {key: Gauge(PREFIX + name, doc, registry=r) for key, (name, doc) in SNAPSHOT_GAUGES.items()}
        self.tokens_per_second = Gauge(PREFIX + "generation_tokens_per_second",
                                       f"Tokens generated per second over the last {TOKENS_PER_SECOND_WINDOW:g} s.",
                                       registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Time from a request's arrival to its first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds",
                             "Time between successive engine outputs of a request that bring new tokens.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "Time from a request's arrival to its end (finished, failed or aborted).",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of the requests that got a token.",
                                     registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated (all samples).",
                                         registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Requests ended, by finish reason.",
                                       ["finished_reason"], registry=r)

    # -- events (engine thread) ------------------------------------------------------------------

    def on_first_token(self, ttft: float, num_prompt_tokens: int) -> None:
        """A request got its first token ``ttft`` seconds after it arrived."""
        self.ttft.observe(ttft)
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_tokens(self, count: int, itl: float | None = None) -> None:
        """A request got ``count`` new tokens (all its samples), ``itl`` seconds after its previous
        ones (None for its first)."""
        if itl is not None:
            self.itl.observe(itl)
        self.generation_tokens.inc(count)
        now = self._clock()
        with self._lock:
            self._recent.append((now, count))
            self._trim(now)

    def on_finished(self, reason: str, e2e: float) -> None:
        """A request ended with ``reason`` ('stop', 'length', 'abort', 'error') ``e2e`` s after it arrived."""
        self.request_success.labels(finished_reason=reason).inc()
        self.e2e.observe(e2e)

    # -- exposition --------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition, gauges refreshed first."""
        if self._snapshot is not None:
            state = self._snapshot()
            for key, gauge in self._gauges.items():
                gauge.set(float(state.get(key, 0.0)))
        now = self._clock()
        with self._lock:
            self._trim(now)
            tokens = sum(n for _, n in self._recent)
        # before a full window has passed, average over the time since the start
        window = min(TOKENS_PER_SECOND_WINDOW, max(now - self._start, 1e-9))
        self.tokens_per_second.set(tokens / window)
        return generate_latest(self.registry)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - TOKENS_PER_SECOND_WINDOW:
            self._recent.popleft()
