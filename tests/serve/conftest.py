"""Fixtures of the HTTP server tests: a tiny Hugging Face Llama directory (Llama 3 tokenizer and chat
template, random weights), and ``parallax serve``'s application running in a background thread with
uvicorn on a free 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.data.tokenizer_dirs import write_style

CONTEXT = 512  # the tiny model's max_position_embeddings: room for streams long enough to cut


def write_hf_llama(path: Path, seed: int = 0) -> Path:
    """A tiny Llama written by transformers' save_pretrained, with a Llama 3 style tokenizer."""
    import transformers

    from parallax.data import load_tokenizer

    write_style(path, "llama3")
    vocab = load_tokenizer(path).vocab_size
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CONTEXT, tie_word_embeddings=True))
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="package")
def hf_dir(tmp_path_factory) -> Path:
    return write_hf_llama(tmp_path_factory.mktemp("serve") / "llama")


@dataclass
class Served:
    """A running server: its address, the engine behind it and its tokenizer."""

    base_url: str
    engine: Any  # AsyncEngine
    tokenizer: Any
    name: str
    api_key: str | None

    def client(self, **kwargs: Any):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "unused", max_retries=0,
                             **kwargs)

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """The engine's snapshot once nothing runs, waits or holds KV blocks (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.engine.snapshot()
            if state["running"] == 0 and state["waiting"] == 0 and state["kv_blocks_used"] == 0:
                return state
            assert time.monotonic() < deadline, f"the engine is not idle after {timeout} s: {state}"
            time.sleep(0.01)


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a background thread on a free port; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def make_engine(hf_dir: Path, *, max_waiting: int = 256, max_num_seqs: int = 64, num_blocks: int | None = 256,
                loras: dict[str, Path] | None = None, engine_process: bool = False):
    """The ``AsyncEngine`` of ``parallax serve --hf hf_dir [--lora NAME=DIR ...]`` (not started), its
    engine in this process's thread, or in a process of its own (``engine_process``, one torch thread)."""
    from parallax.inference import EngineConfig, LLMEngine
    from parallax.serve.async_engine import AsyncEngine
    from parallax.serve.engine_process import EngineSpec, RemoteEngine
    from parallax.train.model_source import load_trained

    config = EngineConfig(max_num_seqs=max_num_seqs, num_blocks=num_blocks)
    if engine_process:
        spec = EngineSpec(hf=str(hf_dir), device="cpu", threads=1, config=config,
                          loras={name: str(path) for name, path in (loras or {}).items()})
        return AsyncEngine(RemoteEngine(spec), max_waiting=max_waiting)
    model, tokenizer, _ = load_trained(hf=str(hf_dir))
    engine = LLMEngine(model, tokenizer, config)
    for lora, path in (loras or {}).items():
        engine.add_lora(lora, path)
    return AsyncEngine(engine, max_waiting=max_waiting)


@contextlib.contextmanager
def serve(hf_dir: Path, *, api_key: str | None = None, max_waiting: int = 256, max_num_seqs: int = 64,
          max_body_bytes: int = 1 << 20, num_blocks: int | None = 256, name: str = "tiny-llama",
          loras: dict[str, Path] | None = None, allow_lora_loading: bool = True,
          engine_process: bool = False) -> Iterator[Served]:
    """The application of ``parallax serve --hf hf_dir [--lora NAME=DIR ...] --enable-lora-loading``
    (``allow_lora_loading``) running on a free port; ``engine_process``: its engine in a process of
    its own (``parallax serve``'s default), else in a thread (``--no-engine-process``)."""
    from parallax.serve.app import ServeLimits, build_app

    engine = make_engine(hf_dir, max_waiting=max_waiting, max_num_seqs=max_num_seqs, num_blocks=num_blocks,
                         loras=loras, engine_process=engine_process)
    app = build_app(engine, model_name=name, api_key=api_key, limits=ServeLimits(max_body_bytes=max_body_bytes),
                    allow_lora_loading=allow_lora_loading)
    try:
        with running(app) as url:
            yield Served(url, engine, engine.tokenizer, name, api_key)
    finally:
        asyncio.run(engine.shutdown(timeout=1))


@pytest.fixture(scope="package")
def adapter_dirs(hf_dir, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters of the tiny model in PEFT's format (random nonzero A and B, so that each
    changes the greedy tokens), of different ranks and target modules."""
    import parallax as px
    from parallax.train.model_source import load_trained

    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for k, (name, fields) in enumerate({"alpha": dict(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
                                        "beta": dict(r=8, lora_alpha=64, target_modules="all-linear")}.items()):
        model, _, _ = load_trained(hf=str(hf_dir))
        torch.manual_seed(100 + k)
        model = px.peft.get_peft_model(model, px.peft.LoraConfig(init_lora_weights=False, **fields))
        dirs[name] = root / name
        model.save_adapter(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def served(hf_dir) -> Iterator[Served]:
    with serve(hf_dir) as s:
        yield s


@pytest.fixture(scope="module")
def reference(hf_dir):
    """``px.inference.LLM`` on its own copy of the served model: the outputs the server must give."""
    from parallax.inference import LLM
    from parallax.train.model_source import load_trained

    model, tokenizer, _ = load_trained(hf=str(hf_dir))
    return LLM(model, tokenizer=tokenizer, num_blocks=256)
