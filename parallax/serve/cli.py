"""``parallax serve``: a checkpoint or a Hugging Face directory behind the OpenAI HTTP API.

    parallax serve --hf DIR [--port 8000] [--api-key KEY] [--lora name=DIR ...]

The model and tokenizer load as ``parallax generate`` loads them, in a process of their own
(``RemoteEngine``; ``--no-engine-process``: in this one) whose engine ``AsyncEngine``'s thread drives,
behind the FastAPI application (``build_app``) served by uvicorn. SIGTERM (or
Ctrl-C) stops accepting connections, lets running requests finish for up to ``--shutdown-timeout``
seconds, aborts the rest (their streams end with finish reason "abort") and exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from parallax.serve.engine_process import EngineSpec, available_cores, engine_threads, split_cores

__all__ = ["serve_main", "build_parser", "parse_lora", "engine_spec", "engine_threads", "available_cores",
           "cpu_split"]

log = logging.getLogger(__name__)

API_KEY_ENV = "PARALLAX_API_KEY"


def build_parser(prog: str = "parallax serve") -> argparse.ArgumentParser:
    from parallax.inference.cli import DEFAULT_RUN

    p = argparse.ArgumentParser(
        prog=prog, description="Serve a parallax checkpoint or a Hugging Face model directory over HTTP with the "
                               "OpenAI API: POST /v1/completions and /v1/chat/completions (streamed with "
                               "\"stream\": true), GET /v1/models, POST /v1/load_lora_adapter, GET /health, GET "
                               "/metrics (Prometheus). The request's \"model\" picks the base or a LoRA adapter.",
        epilog="Exit status: 0 stopped by SIGTERM or Ctrl-C, 1 could not listen, 2 bad arguments or model.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None,
                        help=f"a checkpoint directory or a run directory (its newest checkpoint); default: the newest "
                             f"under {DEFAULT_RUN}/checkpoints")
    source.add_argument("--hf", default=None, metavar="DIR",
                        help="a Hugging Face model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT-format adapter applied to the base model for every request")
    p.add_argument("--tokenizer", default=None, help="byte or a tokenizer directory (default: the model's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: the "
                        f"{API_KEY_ENV} environment variable; none: no key needed)")
    p.add_argument("--served-model-name", default=None,
                   help="the base model's name in the API (default: the --hf or --checkpoint argument as given)")
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="most sequences in one engine step (default 256, as vLLM's)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="most tokens per sequence (default: the model's context)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV-cache blocks of 16 tokens (default: a share of the free memory)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter (PEFT or parallax format) served as model NAME (repeatable)")
    p.add_argument("--enable-lora-loading", action="store_true",
                   help="let POST /v1/load_lora_adapter load adapter directories of this machine (default off)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="most requests waiting for the engine; more get 429 with Retry-After (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body; larger ones get 413 (default 1048576)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM before they are aborted (default 30)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default: cuda when available, else cpu")
    p.add_argument("--access-log", action="store_true", help="log one line per HTTP request (uvicorn's access log)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the engine on CPU (default: every core but one, left to the HTTP event "
                        "loop; OMP_NUM_THREADS when set)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine in a process of its own, so that its steps do not wait for the HTTP "
                        "side's Python (default; --no-engine-process runs it in a thread of the server's process)")
    p.add_argument("--cpu-affinity", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU, with the engine process: pin the HTTP process to the first core this process may "
                        "use and the engine process to the others, so that a step never shares a core with the "
                        "event loop (default; needs two cores or more)")
    return p


def parse_lora(values: list[str]) -> dict[str, str]:
    """``--lora NAME=DIR`` values as {name: dir}; ValueError naming the bad one."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora {value!r}: expected NAME=DIR")
        if name in adapters:
            raise ValueError(f"--lora {value!r}: the name {name!r} is given twice")
        if not Path(path).is_dir():
            raise ValueError(f"--lora {value!r}: {path} is not a directory")
        adapters[name] = path
    return adapters


def _check_args(args: argparse.Namespace) -> None:
    for name in ("max_num_seqs", "max_waiting", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    for name in ("max_model_len", "num_blocks"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535]; got {args.port}")
    if args.api_key is not None and not args.api_key.strip():  # e.g. --api-key "$KEY" with KEY unset
        raise ValueError("--api-key is empty; give a key, or leave the flag out to serve without one")
    if not args.shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout must be >= 0 seconds; got {args.shutdown_timeout}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1; got {args.threads}")


def engine_spec(args: argparse.Namespace, adapters: dict[str, str]) -> EngineSpec:
    """The engine the flags describe."""
    from parallax.inference import EngineConfig

    return EngineSpec(checkpoint=args.checkpoint, hf=args.hf, adapter=args.adapter, tokenizer=args.tokenizer,
                      device=args.device, threads=args.threads, loras=adapters,
                      config=EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                          num_blocks=args.num_blocks))


def cpu_split(args: argparse.Namespace) -> tuple[frozenset[int], frozenset[int]] | None:
    """(the HTTP process's cores, the engine process's) when the flags pin them (``split_cores``):
    the engine in a process of its own, on CPU, --cpu-affinity, two cores or more; else None."""
    if not (args.engine_process and args.cpu_affinity and hasattr(os, "sched_setaffinity")):
        return None
    if args.device == "cuda":
        return None
    if args.device == "auto":
        import torch

        if torch.cuda.is_available():
            return None
    return split_cores(os.sched_getaffinity(0))


def _load_engine(args: argparse.Namespace, adapters: dict[str, str]) -> tuple[Any, str]:
    """The ``AsyncEngine`` over the model ``args`` name, its adapters loaded (in a process of its
    own unless --no-engine-process, then pinned as ``cpu_split`` says); and where it came from."""
    from parallax.serve.async_engine import AsyncEngine
    from parallax.serve.engine_process import RemoteEngine

    spec = engine_spec(args, adapters)
    if args.engine_process:
        split = cpu_split(args)
        remote = RemoteEngine(spec if split is None else replace(spec, cpu_affinity=split[1]))
        engine, where = remote, f"{remote.where}, engine process {remote.pid}"
        if split is not None:  # after the start: the engine process began with every core, as this one had
            os.sched_setaffinity(0, split[0])
            where += f", HTTP on core {min(split[0])}"
    else:
        engine, where = spec.build()
    return AsyncEngine(engine, max_waiting=args.max_waiting), where


class GracefulServer:
    """uvicorn's server with the engine's shutdown in its own: on SIGTERM the listening sockets close,
    the engine lets running requests finish for ``timeout`` seconds and aborts the rest, and the
    connections end with their streams."""

    def __init__(self, app: Any, engine: Any, *, host: str, port: int, timeout: float, access_log: bool,
                 banner: str) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            async def startup(self, sockets=None) -> None:
                await super().startup(sockets)
                if self.started:
                    bound_host, bound_port = self.servers[0].sockets[0].getsockname()[:2]
                    log.info("parallax serve: %s ready on http://%s:%d", banner, bound_host, bound_port)

            async def shutdown(self, sockets=None) -> None:
                finishing = asyncio.ensure_future(engine.shutdown(timeout))
                await super().shutdown(sockets)
                await finishing

        # uvicorn's own limit is a backstop for connections that outlive the engine's (a client not reading)
        config = uvicorn.Config(app, host=host, port=port, lifespan="on", access_log=access_log,
                                timeout_graceful_shutdown=timeout + 5, log_level="info")
        self.server = Server(config)

    def run(self) -> int:
        """Serve until SIGTERM / SIGINT; 0, or 1 when the address could not be bound."""
        with _signals_end_quietly():
            try:
                self.server.run()
            except SystemExit:  # uvicorn exits when it cannot bind (the reason is logged)
                return 1
        return 0 if self.server.started else 1


@contextlib.contextmanager
def _signals_end_quietly() -> Iterator[None]:
    """uvicorn re-raises the signal that stopped it once it is done, to the handler that was there
    before: make that handler a no-op so a graceful stop exits with status 0. (Outside the main thread
    uvicorn handles no signals, and neither does this.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_main(argv: list[str], prog: str = "parallax serve") -> int:
    """Entry point of ``parallax serve``; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{prog}: error: {', '.join(missing)} not installed; pip install 'parallax[serve]'", file=sys.stderr)
        return 2
    from parallax.serve.app import ServeLimits, build_app

    try:
        _check_args(args)
        adapters = parse_lora(args.lora)
        engine, source = _load_engine(args, adapters)
    except (ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    name = args.served_model_name or args.hf or args.checkpoint or "parallax"
    app = build_app(engine, model_name=name, api_key=api_key, limits=ServeLimits(max_body_bytes=args.max_body_bytes),
                    allow_lora_loading=args.enable_lora_loading)
    names = ", ".join([name, *engine.lora_names])
    banner = f"{source} as {names} ({'API key required' if api_key else 'no API key'})"
    return GracefulServer(app, engine, host=args.host, port=args.port, timeout=args.shutdown_timeout,
                          access_log=args.access_log, banner=banner).run()
