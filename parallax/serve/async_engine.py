"""The engine loop of the server: ``LLMEngine`` steps in one thread, requests in and results out
through asyncio, so the event loop stays responsive while the model runs.

The engine thread owns the ``LLMEngine`` (it is not thread-safe). The asyncio side talks to it
through a thread-safe command queue (add a request, abort one, add a LoRA adapter, stop), applied
between steps, so a request added while others run joins the next batch. A step's outputs go back
to their consumers with one ``loop.call_soon_threadsafe``. They are cumulative, so
each request keeps only its latest one: a consumer slower than the engine (a slow client) skips
intermediate outputs instead of piling them up (memory stays one output per request). With
nothing to run, the thread sleeps on the command queue (no polling).

    engine = AsyncEngine(LLMEngine(model, tokenizer), max_waiting=256)
    async for out in engine.generate(ids, SamplingParams(max_tokens=32), request_id="r1"):
        ...   # cumulative RequestOutput; the last one has finished=True
    await engine.shutdown(timeout=30)

A consumer that stops iterating (``aclose()``, its task cancelled when the client went away)
aborts its request: the abort is queued at once and applied before the engine's next step, which
frees the request's KV blocks.

``open`` gives the request's ``RequestStream`` instead: ``await stream.get()`` takes outputs as
``generate`` does, and ``stream.listen(callback)`` has them pushed to a callback on the event loop,
so that a step's outputs reach every stream's consumer in one loop callback instead of waking one
task per stream (the server streams tokens to its clients that way); ``stream.close()`` aborts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from parallax.inference import LLMEngine, SamplingParams
from parallax.inference.sequence import CompletionOutput, RequestOutput
from parallax.serve.engine_process import RemoteEngine
from parallax.serve.metrics import ServeMetrics

__all__ = ["AsyncEngine", "RequestStream", "QueueFullError", "EngineStoppedError", "STEP_ERROR"]

log = logging.getLogger(__name__)

# What a request in flight when a step fails is told (the traceback stays in the server's log).
STEP_ERROR = "internal error while running the model"
RATE_WINDOW = 10.0  # seconds of finished requests behind the Retry-After estimate
MAX_RETRY_AFTER = 60.0
# BlockManager.stats() walks every block (1.4 ms for 50k blocks, a sizeable share of a decode
# step): the prefix-cache hit rate is refreshed at most this often (and when the engine goes idle);
# the block counts are exact after every step.
STATS_INTERVAL = 0.5


class QueueFullError(Exception):
    """More than ``max_waiting`` requests wait; ``retry_after``: seconds to wait before retrying."""

    def __init__(self, retry_after: float, waiting: int, max_waiting: int) -> None:
        super().__init__(f"the server is busy: {waiting} requests wait (max_waiting={max_waiting}); "
                         f"retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class EngineStoppedError(Exception):
    """The engine is shutting down (or stopped) and takes no new work."""


@dataclass(eq=False)
class RequestStream:
    """One request in the engine, as ``AsyncEngine.open`` returns it: its outputs are taken with
    ``await get()`` (pull) or handed to a callback with ``listen`` (push), and ``close()`` ends it
    (aborting the request if it has not finished). The fields below are the engine's."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    lora: str | None
    owner: AsyncEngine | None = None
    arrival: float = field(default_factory=time.perf_counter)
    num_tokens: int = 0  # engine thread: tokens seen so far (all samples)
    last_token_time: float = 0.0
    latest: RequestOutput | BaseException | None = None  # consumer's loop: not taken yet
    waiter: asyncio.Future | None = None  # consumer's loop: set while the consumer waits
    sink: Callable[[RequestOutput | BaseException], None] | None = None  # consumer's loop: push mode
    ended: bool = False  # consumer's loop: the last item (final output or error) was taken
    closed: bool = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Engine thread: hand one output (or the exception that ends the request) to the consumer."""
        _hand_over(self.loop, [(self, item)])

    def set(self, item: RequestOutput | BaseException) -> None:
        """Consumer's loop: hand ``item`` to the listener, or keep it as the latest output and wake
        the consumer."""
        if self.ended:
            return
        if self.sink is not None:
            self._give(item)
            return
        latest = self.latest
        if latest is None or not _is_last(latest):  # an end stays
            self.latest = item
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> RequestOutput:
        """The latest output (cumulative: the ones it replaced are contained in it); raises the
        exception that ended the request (the engine refused it, or its loop died)."""
        if self.sink is not None:
            raise RuntimeError(f"request {self.request_id!r} has a listener; its outputs go there")
        while self.latest is None:
            if self.ended:
                raise RuntimeError(f"request {self.request_id!r} has ended; it has no more outputs")
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        item, self.latest = self.latest, None
        self.ended = _is_last(item)
        if isinstance(item, BaseException):
            raise item
        return item

    def listen(self, sink: Callable[[RequestOutput | BaseException], None]) -> None:
        """From now on, call ``sink(item)`` on this loop with each output as the engine hands it over
        (the latest one first, if one waits), and with the exception that ends the request, if one
        does: one call per stream per step, without waking a task (the server writes a streamed
        token to its client from there). ``sink`` must not raise or block."""
        self.sink = sink
        if self.latest is not None:
            item, self.latest = self.latest, None
            self._give(item)

    def _give(self, item: RequestOutput | BaseException) -> None:
        self.ended = _is_last(item)
        try:
            self.sink(item)
        except Exception:  # one consumer's bug must not keep the step's other outputs from theirs
            log.exception("serve: the listener of request %r failed", self.request_id)

    def close(self) -> None:
        """End the stream: a request that has not finished is aborted before the engine's next
        step, which frees its KV blocks. Safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        if self.owner is not None:
            self.owner._release(self)


def _is_last(item: RequestOutput | BaseException) -> bool:
    return isinstance(item, BaseException) or item.finished


def _hand_over(loop: asyncio.AbstractEventLoop,
               items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    """Engine thread: give a step's outputs to their consumers on ``loop`` with one wake-up of the
    loop (one per stream wrote the loop's self-pipe 64 times a step at 64 streams)."""
    try:
        loop.call_soon_threadsafe(_set_all, items)
    except RuntimeError:  # the consumers' event loop is closed: nobody listens any more
        pass


def _set_all(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream.set(item)


class AsyncEngine:
    """An ``LLMEngine`` run by a daemon thread, driven from asyncio.

    engine: the engine (only the thread uses it once started): an ``LLMEngine``, or a
    ``RemoteEngine`` whose model runs in a process of its own (closed by ``shutdown``).
    max_waiting: most requests that may wait (queued, not admitted, or preempted); one more raises
    ``QueueFullError``.
    """

    def __init__(self, engine: LLMEngine | RemoteEngine, *, max_waiting: int = 256) -> None:
        if not isinstance(engine, (LLMEngine, RemoteEngine)):
            raise ValueError(f"engine must be an LLMEngine or a RemoteEngine; got {type(engine).__name__}")
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 1:
            raise ValueError(f"max_waiting must be a positive integer; got {max_waiting!r}")
        self.engine = engine
        self._remote = isinstance(engine, RemoteEngine)
        self.max_waiting = max_waiting
        self.metrics = ServeMetrics(snapshot=self.snapshot)
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        # guards the fields shared with the engine thread below
        self._lock = threading.Lock()
        self._streams: dict[str, RequestStream] = {}  # requests whose consumer is still iterating
        self._queued = 0  # add commands not applied yet
        self._stopping = False
        self._idle = threading.Event()  # no queued adds and nothing left in the engine
        self._idle.set()
        self._stats = engine.stats()
        self._stats_time = time.perf_counter()
        self._snapshot = self._engine_state()
        self._finish_times: deque[float] = deque()  # when requests ended, for Retry-After
        self._thread: threading.Thread | None = None
        # engine thread only: the requests the engine holds, and what to hand out after publishing
        # the state (a consumer that sees its request end then sees its blocks freed in snapshot())
        self._active: dict[str, RequestStream] = {}
        self._outbox: list[tuple[RequestStream, RequestOutput | BaseException]] = []

    # -- asyncio side ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (a daemon); does nothing if it runs already."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="parallax-engine", daemon=True)
                self._thread.start()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def lora_names(self) -> list[str]:
        return list(self.engine.lora_names)

    def snapshot(self) -> dict[str, float]:
        """The engine state after its last step: running, waiting (including queued requests),
        kv_blocks_used, kv_blocks_total, kv_usage, prefix_hit_rate, num_steps, num_preemptions."""
        with self._lock:
            state = dict(self._snapshot)
            state["waiting"] += self._queued
        return state

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, *, request_id: str,
                       lora: str | None = None, prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Run one request; yields its cumulative ``RequestOutput`` each step it changes (the
        latest one only, when the consumer is slower than the engine), the last with ``finished`` set.

        Raises at the first ``__anext__``, before yielding, what ``open`` raises. Stopping early
        (``aclose()``, the task cancelled) aborts the request before the engine's next step.
        """
        stream = self.open(prompt_token_ids, params, request_id=request_id, lora=lora, prompt=prompt)
        try:
            while not stream.ended:
                yield await stream.get()
        finally:
            stream.close()

    def open(self, prompt_token_ids: list[int], params: SamplingParams, *, request_id: str,
             lora: str | None = None, prompt: str | None = None) -> RequestStream:
        """Queue one request (it joins the engine's next step) and return its stream, on the running
        event loop. Raises ValueError for bad input (naming the argument), ``QueueFullError``,
        ``EngineStoppedError``; the engine's own refusal (an unknown adapter) comes as the stream's
        first item."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams; got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string; got {request_id!r}")
        if isinstance(prompt_token_ids, str):
            raise ValueError("prompt_token_ids must be a list of token ids; got a string (encode it first)")
        ids = self.engine.encode(prompt_token_ids, "prompt_token_ids")  # pure: checks ids against the vocabulary
        stream = RequestStream(request_id, asyncio.get_running_loop(), prompt, ids, params, lora, self)
        with self._lock:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            waiting = self._snapshot["waiting"] + self._queued
            if waiting >= self.max_waiting:
                raise QueueFullError(self._retry_after(waiting), waiting, self.max_waiting)
            self._streams[request_id] = stream
            self._queued += 1
            self._idle.clear()
            self._commands.put(("add", stream))
        self.start()
        return stream

    def _release(self, stream: RequestStream) -> None:
        """A closed stream: forget it, and abort its request if it has not ended."""
        with self._lock:
            self._streams.pop(stream.request_id, None)
        if not stream.ended:  # the consumer went away: free the request's blocks before the next step
            self._commands.put(("abort", stream.request_id))

    async def add_lora(self, name: str, path: str) -> None:
        """Load a LoRA adapter (``LLMEngine.add_lora``) in the engine thread, between steps;
        raises what it raises (ValueError for a bad name or directory)."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            self._commands.put(("lora", name, path, future))
        self.start()
        await future

    async def shutdown(self, timeout: float) -> None:
        """Refuse new requests, let the engine finish what it holds for up to ``timeout`` seconds,
        abort the rest (their streams end with finish reason 'abort'), and stop the thread (and the
        engine's process, for a ``RemoteEngine``)."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0; got {timeout!r}")
        with self._lock:
            self._stopping = True
            thread = self._thread
        if thread is not None:
            if not await asyncio.to_thread(self._idle.wait, timeout):
                log.warning("serve: shutdown: aborting the requests still running after %.1f s", timeout)
            self._commands.put(("stop",))  # aborts what is left
            await asyncio.to_thread(thread.join)
        if isinstance(self.engine, RemoteEngine):
            await asyncio.to_thread(self.engine.close)

    def _retry_after(self, waiting: int) -> float:
        """Seconds until the excess of waiting requests should have drained at the recent finish
        rate (requests finished over the last ``RATE_WINDOW`` s), between 1 and ``MAX_RETRY_AFTER``.
        Called with the lock held."""
        now = time.perf_counter()
        recent = sum(1 for t in self._finish_times if t >= now - RATE_WINDOW)
        if recent == 0:
            return RATE_WINDOW
        excess = waiting - self.max_waiting + 1
        return float(min(MAX_RETRY_AFTER, max(1, math.ceil(excess * RATE_WINDOW / recent))))

    # -- engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # a bug in the loop itself: fail loudly rather than leave clients hanging
            log.exception("serve: the engine loop stopped")
            with self._lock:
                self._stopping = True
                streams = list(self._streams.values())
            for stream in streams:
                stream.put(EngineStoppedError("the engine loop stopped"))
            while True:  # adapters waiting to load
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command[0] == "lora":
                    command[3].get_loop().call_soon_threadsafe(_settle, command[3],
                                                               EngineStoppedError("the engine loop stopped"))
            self._idle.set()

    def _loop(self) -> None:
        added = 0
        # a RemoteEngine's last step, its outputs not delivered yet: the engine process starts the
        # next step first (with the requests just added), and this thread records and hands the
        # outputs over while it runs. Recording them first left the engine process idle ~4 ms a
        # step (5% of its time) at 64 req/s on 2 cores, in a scratch run that timed its waits.
        outputs: list[RequestOutput] | None = None
        while True:
            if self.engine.has_unfinished_requests() or outputs is not None:
                commands = []
            else:  # idle: hand over what is left, then sleep until a command comes
                self._hand_over_step(added)
                added = 0
                commands = [self._commands.get()]
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command[0] == "stop":
                    self._deliver_all(outputs or [])
                    self._abort_all()  # nothing is left hanging, whatever came before
                    self._hand_over_step(added)
                    return
                added += command[0] == "add"
                try:
                    self._apply(command)
                except Exception:  # a bug here must not kill the loop
                    log.exception("serve: engine command %r failed", command[0])
            busy = self.engine.has_unfinished_requests()
            if busy and self._remote:
                self.engine.start_step()
            if outputs is not None:
                self._deliver_all(outputs)
                outputs = None
            self._hand_over_step(added)
            added = 0
            if busy:
                outputs = self._step()
                if not self._remote:
                    self._deliver_all(outputs)
                    outputs = None

    def _hand_over_step(self, added: int) -> None:
        """Publish the engine's state, then hand the outputs over (a consumer that sees its request
        end then sees its blocks freed in ``snapshot()``)."""
        self._publish(added)
        self._send_outbox()

    def _send_outbox(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput | BaseException]]] = {}
        for stream, item in self._outbox:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        self._outbox = []
        for loop, items in by_loop.items():
            _hand_over(loop, items)

    def _apply(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "add":
            stream: RequestStream = command[1]
            try:
                self.engine.add_request(stream.prompt, stream.params, stream.request_id,
                                        prompt_token_ids=stream.prompt_token_ids, lora=stream.lora)
            except ValueError as e:  # bad input: the consumer's error
                self._outbox.append((stream, e))
                return
            except Exception:  # a bug: logged here, a generic error for the consumer
                log.exception("serve: adding request %r failed", stream.request_id)
                self._outbox.append((stream, RuntimeError(STEP_ERROR)))
                return
            self._active[stream.request_id] = stream
        elif kind == "abort":
            # a request that ended in the last step (its outputs not delivered yet) is left to them
            out = self.engine.abort(command[1])
            stream = None if out is None else self._active.pop(command[1], None)
            if stream is not None:
                self._record(stream, out, time.perf_counter())
        elif kind == "lora":
            _, name, path, future = command
            try:
                self.engine.add_lora(name, path)
            except Exception as e:
                future.get_loop().call_soon_threadsafe(_settle, future, e)
            else:
                future.get_loop().call_soon_threadsafe(_settle, future, None)
        else:
            raise ValueError(f"unknown engine command {kind!r}")

    def _step(self) -> list[RequestOutput]:
        """One engine step's outputs; none when it failed (its requests are failed then)."""
        try:
            return self.engine.step()
        except Exception:
            log.exception("serve: an engine step failed; failing the %d requests in flight", len(self._active))
            self._fail_all()
            return []

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        for out in outputs:
            stream = self._active.get(out.request_id)
            if stream is not None:
                self._deliver(stream, out, now)

    def _abort_all(self) -> None:
        """End every request in the engine with its final output, finish reason 'abort'."""
        now = time.perf_counter()
        for request_id, stream in list(self._active.items()):
            # None: a request refused by the engine whose error output was not reported yet
            out = self.engine.abort(request_id) or self._empty_output(stream, "abort", None, now)
            self._deliver(stream, out, now)

    def _fail_all(self) -> None:
        """End every request in the engine with an error output (their blocks freed)."""
        now = time.perf_counter()
        for request_id, stream in list(self._active.items()):
            self.engine.abort(request_id)
            self._deliver(stream, self._empty_output(stream, "error", STEP_ERROR, now), now)

    def _empty_output(self, stream: RequestStream, reason: str, error: str | None, now: float) -> RequestOutput:
        """A final output with no tokens (an engine error, or aborted before the engine reported it)."""
        want = stream.params.logprobs is not None
        text = None if self.engine.tokenizer is None else ""
        n = 1 if error is not None else stream.params.n  # a failed request has one output, as the engine's
        return RequestOutput(stream.request_id, stream.prompt, list(stream.prompt_token_ids),
                             [CompletionOutput(i, [], text, reason, [] if want else None) for i in range(n)],
                             finished=True, error=error, arrival_time=stream.arrival, finished_time=now,
                             lora=stream.lora)

    def _deliver(self, stream: RequestStream, out: RequestOutput, now: float) -> None:
        self._record(stream, out, now)
        if out.finished:
            self._active.pop(stream.request_id, None)
        self._outbox.append((stream, out))

    def _record(self, stream: RequestStream, out: RequestOutput, now: float) -> None:
        """Metrics of one output: first token, later tokens, the end."""
        total = sum(len(o.token_ids) for o in out.outputs)
        new = total - stream.num_tokens
        if new > 0:
            if stream.num_tokens == 0:
                self.metrics.on_first_token(now - stream.arrival, len(stream.prompt_token_ids))
                self.metrics.on_tokens(new)
            else:
                self.metrics.on_tokens(new, now - stream.last_token_time)
            stream.num_tokens, stream.last_token_time = total, now
        if out.finished:
            self.metrics.on_finished(out.finish_reason or "abort", now - stream.arrival)
            with self._lock:  # _retry_after reads it
                self._finish_times.append(now)
                while self._finish_times and self._finish_times[0] < now - RATE_WINDOW:
                    self._finish_times.popleft()

    def _publish(self, added: int) -> None:
        """Share the engine state with the asyncio side (applied adds leave the queued count at
        the same time as they enter the engine's)."""
        state = self._engine_state()
        with self._lock:
            self._queued -= added
            self._snapshot = state
            if self._queued == 0 and not self.engine.has_unfinished_requests():
                self._idle.set()

    def _engine_state(self) -> dict[str, float]:
        blocks, now = self.engine.blocks, time.perf_counter()
        if now - self._stats_time >= STATS_INTERVAL or not self.engine.has_unfinished_requests():
            self._stats, self._stats_time = self.engine.stats(), now
        used = blocks.num_blocks - blocks.num_available  # free + cached (evictable) blocks are available
        return {"running": self.engine.num_running, "waiting": self.engine.num_waiting,
                "kv_blocks_used": used, "kv_blocks_total": blocks.num_blocks,
                "kv_usage": used / blocks.num_blocks, "prefix_hit_rate": self._stats.hit_rate,
                "num_steps": self.engine.num_steps, "num_preemptions": self.engine.num_preemptions}


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
