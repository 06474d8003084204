"""The engine in a process of its own, as ``parallax serve`` runs it by default.

``RemoteEngine`` stands for an ``LLMEngine`` held by a child process: ``AsyncEngine``'s thread
drives it as it drives a local one (``add_request``, ``abort``, ``add_lora``, ``step``,
``stats``), each call one round trip over a pipe (arguments and results pickled). Every reply
carries the engine's counters (running, waiting, steps, preemptions, free blocks, whether work is
left), which the properties answer from without another round trip. ``start_step`` asks for a
step without waiting, so that the engine computes it while the server hands the previous step's
outputs over.

Why a process: in one process the engine's steps and the HTTP side share one GIL. A step is
hundreds of torch ops, each releasing the GIL and taking it back, and whenever the event loop is
parsing a request, validating it or writing tokens, the engine waits. ``bench serve --http`` on
2 cores at 64 req/s (run 20261204T194919Z-4d481f): the engine's own inter-token latency was 18.5%
longer in the server than in the benchmark's process. In its own process the engine has a GIL
of its own; what the HTTP side still shares with it is the bookkeeping between steps.

    engine = AsyncEngine(RemoteEngine(EngineSpec(hf="models/llama")))
    ...
    await engine.shutdown(timeout=30)
    engine.engine.close()

The child ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group; the server's own
shutdown decides when requests end) and exits on ``close()``, or when the pipe closes because the
server went away.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from parallax.inference.block_manager import KVCacheStats
from parallax.inference.engine import EngineConfig, LLMEngine, Prompt, encode_prompt
from parallax.inference.sampling import SamplingParams
from parallax.inference.sequence import RequestOutput

__all__ = ["EngineSpec", "RemoteEngine", "EngineProcessError", "engine_threads", "available_cores", "split_cores"]

log = logging.getLogger(__name__)

# The LLMEngine methods a RemoteEngine forwards: nothing else runs in the child.
FORWARDED = frozenset({"add_request", "abort", "add_lora", "step", "stats"})
CLOSE_TIMEOUT = 10.0  # seconds the child gets to exit after close() before it is killed


class EngineProcessError(RuntimeError):
    """The engine process is gone (it crashed, was killed, or was closed)."""


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def engine_threads(requested: int | None, device_type: str, cores: int, env: dict[str, str], *,
                   shared: bool = True) -> int | None:
    """The torch thread count to set for the engine, or None to leave torch's. On CPU the default
    is one per core, less one left to the HTTP side when it runs on the same ``cores`` (``shared``;
    not when the engine process is pinned to cores of its own): a step on every core waits for the
    one the event loop (or a client) took. ``bench serve --http`` on 2 cores, 64 req/s: parallax
    serve's mean ITL 72.6 ms with 2 threads (1.47x the in-process engine's), 66.4 ms with 1 (1.00x),
    ~1,046 tokens/s both (runs 20261204T181300Z-7fc9be and 20261204T183237Z-60ac52)."""
    if requested is not None:
        return requested
    if device_type != "cpu" or "OMP_NUM_THREADS" in env:
        return None
    return max(1, cores - shared)


def split_cores(cores: Iterable[int]) -> tuple[frozenset[int], frozenset[int]] | None:
    """(the HTTP process's cores, the engine process's) out of ``cores`` (the ones this process may
    run on): the lowest for the event loop, the rest for the engine; None with fewer than two.

    Why pin on CPU: unpinned, the scheduler moves the engine's thread onto the core the event loop
    (or a local client) is on, and the step shares it. ``bench serve --http`` on 2 cores, 64 req/s,
    the engine's own inter-token latency against the in-process engine's, paired rounds: 1.31x,
    1.12x, 0.96x, 1.12x unpinned, 1.08x, 0.94x, 1.03x pinned (scratch runs of 160 requests)."""
    ordered = sorted(set(cores))
    if len(ordered) < 2:
        return None
    return frozenset(ordered[:1]), frozenset(ordered[1:])


@dataclass(frozen=True)
class EngineSpec:
    """What an engine loads, given as ``parallax serve``'s flags give it: the model and tokenizer
    (``load_trained``'s checkpoint / hf / adapter / tokenizer), the device ('auto', 'cpu',
    'cuda'), torch threads (None: ``engine_threads``' default), the engine's sizes, the LoRA
    adapters to serve ({name: directory}) and the cores the building process is pinned to (None:
    not pinned; ``split_cores``). Picklable: the engine process builds it."""

    checkpoint: str | None = None
    hf: str | None = None
    adapter: str | None = None
    tokenizer: str | None = None
    device: str = "auto"
    threads: int | None = None
    config: EngineConfig = field(default_factory=EngineConfig)
    loras: dict[str, str] = field(default_factory=dict)
    cpu_affinity: frozenset[int] | None = None

    def __post_init__(self) -> None:
        cores = self.cpu_affinity
        if cores is not None and (not isinstance(cores, frozenset) or not cores or
                                  not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cores)):
            raise ValueError(f"cpu_affinity must be None or a non-empty frozenset of core numbers >= 0; got {cores!r}")

    def build(self) -> tuple[LLMEngine, str]:
        """The engine, its adapters added, and where it came from (source, device, torch threads,
        cores). Pins this process to ``cpu_affinity`` first (the threads torch starts later inherit
        it) and sets its torch thread count. ValueError naming the flag for bad input."""
        if self.cpu_affinity is not None:
            _pin(self.cpu_affinity)
        import torch

        from parallax.train.model_source import load_trained

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch.cuda.is_available() is False")
        device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available() else
                              "cpu" if self.device == "auto" else self.device)
        threads = engine_threads(self.threads, device.type, available_cores(), dict(os.environ),
                                 shared=self.cpu_affinity is None)
        if threads is not None:
            torch.set_num_threads(threads)
        model, tokenizer, source = load_trained(self.checkpoint, self.hf, self.adapter, self.tokenizer)
        model = model.to(device)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"{source}: the model's vocab_size ({model.config.vocab_size}) is smaller than the "
                             f"vocabulary of the tokenizer {tokenizer.source} ({tokenizer.vocab_size} ids)")
        engine = LLMEngine(model, tokenizer, self.config)
        for name, path in self.loras.items():
            try:
                engine.add_lora(name, path)
            except ValueError as exc:
                raise ValueError(f"--lora {name}={path}: {exc}") from None
        pinned = "" if self.cpu_affinity is None else f", cores {_cores(self.cpu_affinity)}"
        return engine, f"{source} on {device}, torch threads: {torch.get_num_threads()}{pinned}"


def _pin(cores: frozenset[int]) -> None:
    """Pin this process (its calling thread, and the threads it starts from now on) to ``cores``."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("cpu_affinity: this platform cannot pin a process to cores (no os.sched_setaffinity)")
    try:
        os.sched_setaffinity(0, cores)
    except OSError as exc:
        raise ValueError(f"cpu_affinity {_cores(cores)}: {exc.strerror or exc}") from None


def _cores(cores: Iterable[int]) -> str:
    return ",".join(map(str, sorted(cores)))


@dataclass(frozen=True)
class BlockCounts:
    """The KV pool's size and its blocks free or evictable, after the engine's last call."""

    num_blocks: int
    num_available: int


class RemoteEngine:
    """An ``LLMEngine`` in a child process (see the module's docstring); one caller at a time
    (``AsyncEngine``'s thread), plus ``encode`` and the read-only fields from anywhere.

    Starts the process and waits up to ``start_timeout`` seconds for the model to load; raises
    ValueError with the child's message when the spec cannot be loaded (a bad directory or flag).
    """

    def __init__(self, spec: EngineSpec, *, start_timeout: float = 600.0) -> None:
        if not isinstance(spec, EngineSpec):
            raise ValueError(f"spec must be an EngineSpec; got {type(spec).__name__}")
        context = multiprocessing.get_context("spawn")  # a fork would copy the server's threads and locks
        self._conn, child_end = context.Pipe()
        self._lock = threading.Lock()
        self._process = context.Process(target=_engine_main, args=(spec, child_end, logging.getLogger().level),
                                        name="parallax-engine", daemon=True)
        self._process.start()
        child_end.close()
        self._closed = False
        self._step_in_flight = False  # a step asked for (start_step) whose reply is not read yet
        self._prefetched: tuple[str, Any] | None = None  # that reply, read before a later call's
        # multiprocessing's exit handler SIGTERMs daemonic children (ignored here) and joins them:
        # registered later, this one runs first
        atexit.register(self.close)
        if not self._conn.poll(start_timeout):
            self.close()
            raise EngineProcessError(f"the engine process did not load the model within {start_timeout:.0f} s")
        kind, payload = self._receive()
        if kind == "error":
            self.close()
            raise ValueError(payload)
        self.tokenizer = payload["tokenizer"]
        self.config: EngineConfig = payload["config"]
        self.max_model_len: int = payload["max_model_len"]
        self.vocab_size: int = payload["vocab_size"]
        self.lora_names: list[str] = payload["lora_names"]
        self.where: str = payload["where"]
        self._counts: dict[str, int] = payload["counts"]

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def encode(self, prompt: Prompt, name: str = "prompt") -> list[int]:
        """Token ids of a prompt, checked here as ``LLMEngine.encode`` does (no round trip)."""
        return encode_prompt(prompt, self.tokenizer, self.vocab_size, name)

    def add_request(self, prompt: Prompt | None, params: SamplingParams | None = None, request_id: str | None = None,
                    *, prompt_token_ids: list[int] | None = None, lora: str | None = None) -> str:
        return self._call("add_request", prompt, params, request_id, prompt_token_ids=prompt_token_ids, lora=lora)

    def abort(self, request_id: str) -> RequestOutput | None:
        return self._call("abort", request_id)

    def add_lora(self, name: str, path: str | os.PathLike) -> None:
        self._call("add_lora", name, os.fspath(path))
        self.lora_names = [*self.lora_names, name]

    def start_step(self) -> None:
        """Ask the engine process for its next step without waiting for it: the next ``step`` call
        returns its outputs, and a call made meanwhile (an add, an abort) is answered after it.
        ``AsyncEngine`` asks right after applying new requests, then hands the last step's outputs
        over while the engine computes (in lock-step the engine process waited for that, and for
        the server's interpreter lock, every step)."""
        with self._lock:
            self._check_open()
            if not self._step_in_flight and self._prefetched is None:
                self._send(("step", (), {}))
                self._step_in_flight = True

    def step(self) -> list[RequestOutput]:
        """The outputs of one engine step (the one ``start_step`` asked for, if it did)."""
        with self._lock:
            self._check_open()
            if self._prefetched is None:
                if not self._step_in_flight:
                    self._send(("step", (), {}))
                self._prefetched = self._receive_reply()
                self._step_in_flight = False
            status, value = self._prefetched
            self._prefetched = None
        if status == "raise":
            raise value
        return value

    def stats(self) -> KVCacheStats:
        return self._call("stats")

    def has_unfinished_requests(self) -> bool:
        return bool(self._counts["unfinished"] or self._step_in_flight or self._prefetched is not None)

    @property
    def num_running(self) -> int:
        return self._counts["running"]

    @property
    def num_waiting(self) -> int:
        return self._counts["waiting"]

    @property
    def num_steps(self) -> int:
        return self._counts["steps"]

    @property
    def num_preemptions(self) -> int:
        return self._counts["preemptions"]

    @property
    def blocks(self) -> BlockCounts:
        return BlockCounts(self._counts["num_blocks"], self._counts["num_available"])

    def close(self) -> None:
        """Stop the engine process (it drops what it holds); waits for it to exit. Safe to call
        more than once; calls after it raise ``EngineProcessError``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self.close)
            try:
                if self._step_in_flight:  # read its reply: a child blocked writing it into a full pipe never exits
                    self._conn.recv()
                self._conn.send(("close", (), {}))
            except (EOFError, OSError):  # the process is gone already
                pass
            self._process.join(CLOSE_TIMEOUT)
            if self._process.is_alive():
                log.warning("serve: the engine process did not exit within %.0f s; killing it", CLOSE_TIMEOUT)
                self._process.kill()
                self._process.join()
            self._conn.close()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._check_open()
            self._send((method, args, kwargs))
            if self._step_in_flight:  # its reply comes first: kept for step()
                self._prefetched = self._receive_reply()
                self._step_in_flight = False
            status, value = self._receive_reply()
        if status == "raise":
            raise value
        return value

    def _check_open(self) -> None:
        if self._closed:
            raise EngineProcessError("the engine process was closed")

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError:
            raise self._gone() from None

    def _receive_reply(self) -> tuple[str, Any]:
        """(status, value) of the next reply; its counters become the engine's (replies come in order)."""
        status, value, self._counts = self._receive()
        return status, value

    def _receive(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise self._gone() from None

    def _gone(self) -> EngineProcessError:
        self._process.join(CLOSE_TIMEOUT)
        return EngineProcessError(f"the engine process exited (exit code {self._process.exitcode})")


def _counts(engine: LLMEngine) -> dict[str, int]:
    return {"unfinished": int(engine.has_unfinished_requests()), "running": engine.num_running,
            "waiting": engine.num_waiting, "steps": engine.num_steps, "preemptions": engine.num_preemptions,
            "num_blocks": engine.blocks.num_blocks, "num_available": engine.blocks.num_available}


def _engine_main(spec: EngineSpec, conn: Connection, log_level: int) -> None:
    """The engine process: build the engine, say so (or why not), then answer calls until told to
    close or the pipe closes."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [engine] %(message)s")
    try:
        engine, where = spec.build()
    except (ValueError, OSError) as exc:
        conn.send(("error", str(exc)))
        return
    except Exception as exc:  # a bug: the traceback stays in this process's log
        log.exception("serve: the engine could not be built")
        conn.send(("error", f"the engine could not be built: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", {"tokenizer": engine.tokenizer, "config": engine.config, "max_model_len": engine.max_model_len,
                         "vocab_size": engine.model.config.vocab_size, "lora_names": list(engine.lora_names),
                         "where": where, "counts": _counts(engine)}))
    while True:
        try:
            method, args, kwargs = conn.recv()
        except (EOFError, OSError):  # the server went away
            return
        if method == "close":
            return
        try:
            if method not in FORWARDED:
                raise ValueError(f"the engine process does not run {method!r}")
            reply = ("ok", getattr(engine, method)(*args, **kwargs))
        except Exception as exc:  # the caller's to handle, as from a local engine
            reply = ("raise", exc)
        try:
            try:
                conn.send((*reply, _counts(engine)))
            except (pickle.PicklingError, TypeError, AttributeError) as exc:  # pickling failed: nothing was written
                error = reply[1] if reply[0] == "raise" else exc
                conn.send(("raise", RuntimeError(f"{type(error).__name__}: {error}"), _counts(engine)))
        except OSError:  # the server went away
            return
