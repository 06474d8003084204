"""``parallax serve`` as a command: its help, bad flags (exit 2 with one line naming the flag), and a
real process: ready line, requests with the API key from the environment, then SIGTERM while a
stream runs: the stream ends (finish reason "abort", then [DONE]) and the process exits 0."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from parallax.cli import main
from parallax.serve.engine_process import EngineSpec, split_cores

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """``EngineSpec.build`` sets torch's thread count for the process: the tests after these keep theirs."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--hf", "--checkpoint", "--api-key", "--lora", "--max-num-seqs", "--max-waiting", "--max-body-bytes",
                 "--shutdown-timeout", "--served-model-name", "--port", "--host", "--threads", "--engine-process",
                 "--cpu-affinity", "--no-cpu-affinity"):
        assert flag in out
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--no-such-flag"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be at least 1"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout must be >= 0"),
    (["--api-key", ""], "--api-key is empty"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--lora", "nameonly"], "expected NAME=DIR"),
    (["--lora", "a=/no/such/dir"], "/no/such/dir is not a directory"),
])
def test_bad_flags_exit_2_naming_the_flag(hf_dir, flags, message, capsys):
    assert main(["serve", "--hf", str(hf_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("parallax serve: error:") and message in err


def test_a_missing_model_directory_exits_2(tmp_path, capsys):
    assert main(["serve", "--hf", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def _ready_line(process: subprocess.Popen, timeout: float) -> str:
    """The server's "ready on http://..." log line (its stderr read in a thread, so a server that hangs
    fails the test after ``timeout`` seconds instead of blocking it)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for text in process.stderr:
            lines.put(text)
            if "ready on http://" in text:
                return
        lines.put(None)  # the server exited first

    threading.Thread(target=read, daemon=True).start()
    seen = []
    while True:
        line = lines.get(timeout=timeout)
        assert line is not None, "the server exited before it was ready:\n" + "".join(seen[-20:])
        if "ready on http://" in line:
            return line
        seen.append(line)


def test_the_server_process_answers_and_stops_gracefully_on_sigterm(hf_dir, adapter_dirs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PARALLAX_API_KEY": "k3y"}
    process = subprocess.Popen([sys.executable, "-m", "parallax", "serve", "--hf", str(hf_dir), "--port", "0",
                                "--served-model-name", "tiny", "--shutdown-timeout", "0",
                                "--lora", f"alpha={adapter_dirs['alpha']}"],
                               stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = _ready_line(process, timeout=60)
        url = re.search(r"ready on (http://\S+)", line).group(1)
        assert "API key required" in line
        engine_pid = int(re.search(r"engine process (\d+)", line).group(1))  # the default: a process of its own
        split = split_cores(os.sched_getaffinity(0))
        if split is not None:  # the default on CPU: the engine on cores of its own, the HTTP side on the first
            assert os.sched_getaffinity(engine_pid) == split[1] and os.sched_getaffinity(process.pid) == split[0]
            assert f"HTTP on core {min(split[0])}" in line
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)
        reply = client.completions.create(model="tiny", prompt="A list is", max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens >= 1 and reply.model == "tiny"
        assert [m.id for m in client.models.list().data] == ["tiny", "alpha"]
        assert client.completions.create(model="alpha", prompt="A list is", max_tokens=4).model == "alpha"

        # a stream still running at SIGTERM, with no time allowed to finish: aborted
        stream = client.completions.create(model="tiny", prompt="The history of", max_tokens=480, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 3:
                process.send_signal(signal.SIGTERM)
                sent = time.monotonic()
        # the openai client stops at [DONE]; a connection cut before it would raise instead
        assert chunks[-1].choices[0].finish_reason == "abort"
        assert 3 < sum(len(c.choices[0].text) > 0 for c in chunks) < 480
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - sent < 20
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
        _assert_gone(engine_pid)  # the engine process stopped with the server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def _assert_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"process {pid} is still there"
        time.sleep(0.05)


def test_no_engine_process_runs_the_engine_in_a_thread_of_the_server(hf_dir):
    from parallax.inference import LLMEngine
    from parallax.serve.cli import _load_engine, build_parser

    assert build_parser().parse_args(["--hf", str(hf_dir)]).engine_process  # the default
    args = build_parser().parse_args(["--hf", str(hf_dir), "--device", "cpu", "--threads", "1",
                                      "--no-engine-process"])
    engine, where = _load_engine(args, {})
    assert isinstance(engine.engine, LLMEngine) and "engine process" not in where


def test_a_graceful_stop_lets_running_requests_finish(hf_dir):
    """Within --shutdown-timeout a running stream finishes normally (uvicorn's exit flag, as SIGTERM
    sets it, on a server in a thread), then the server stops and new connections are refused."""
    from parallax.serve.app import build_app
    from parallax.serve.cli import GracefulServer
    from tests.serve.conftest import make_engine

    engine = make_engine(hf_dir)
    graceful = GracefulServer(build_app(engine, model_name="tiny"), engine, host="127.0.0.1", port=0, timeout=10.0,
                              access_log=False, banner="test")
    thread = threading.Thread(target=graceful.run, daemon=True)
    thread.start()
    while not graceful.server.started:
        assert thread.is_alive()
        time.sleep(0.01)
    url = "http://127.0.0.1:%d" % graceful.server.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(model="tiny", prompt="The history of", max_tokens=100, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 3:
            graceful.server.should_exit = True
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(len(c.choices[0].text) > 0 for c in chunks) > 50
    thread.join(20)
    assert not thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")

    from parallax.inference import SamplingParams
    from parallax.serve.async_engine import EngineStoppedError

    async def one_more():
        return await engine.generate([1, 2], SamplingParams(), request_id="late").__anext__()

    with pytest.raises(EngineStoppedError):  # the server's shutdown stopped the engine
        asyncio.run(one_more())


@pytest.mark.parametrize("flags, seats", [([], 256), (["--max-num-seqs", "8"], 8)])
def test_max_num_seqs_reaches_the_engine(hf_dir, flags, seats):
    """vLLM's default of 256 seats (with 64, the ~100 requests in flight at 24 req/s in `bench serve
    --http` queued: p99 TTFT 3.3 s), or the flag's value, is what the engine schedules with."""
    from parallax.serve.cli import build_parser, engine_spec

    engine, _ = engine_spec(build_parser().parse_args(["--hf", str(hf_dir), "--device", "cpu", *flags]), {}).build()
    assert engine.config.max_num_seqs == engine.scheduler.max_num_seqs == seats


def test_engine_threads_leave_a_core_to_the_http_side():
    from parallax.serve.cli import engine_threads

    assert engine_threads(None, "cpu", 2, {}) == 1
    assert engine_threads(None, "cpu", 16, {}) == 15
    assert engine_threads(None, "cpu", 1, {}) == 1
    assert engine_threads(3, "cpu", 2, {}) == 3  # the flag wins
    assert engine_threads(None, "cpu", 8, {"OMP_NUM_THREADS": "4"}) is None  # torch follows the variable
    assert engine_threads(None, "cuda", 8, {}) is None
    assert engine_threads(None, "cpu", 15, {}, shared=False) == 15  # pinned away from the HTTP side: every core


def test_split_cores_gives_the_lowest_to_the_http_side():
    assert split_cores([0, 1]) == ({0}, {1})
    assert split_cores({9, 3, 5}) == ({3}, {5, 9})
    assert split_cores(range(16)) == ({0}, set(range(1, 16)))
    assert split_cores([2]) is None and split_cores([]) is None


@pytest.mark.parametrize("flags, pinned", [
    (["--device", "cpu"], True),
    (["--device", "cpu", "--no-cpu-affinity"], False),
    (["--device", "cpu", "--no-engine-process"], False),  # the engine shares this process: nothing to split
    (["--device", "cuda"], False),
])
def test_cpu_split_follows_the_flags(hf_dir, flags, pinned):
    from parallax.serve.cli import build_parser, cpu_split

    got = cpu_split(build_parser().parse_args(["--hf", str(hf_dir), *flags]))
    assert got == (split_cores(os.sched_getaffinity(0)) if pinned else None)


def test_threads_reach_torch(hf_dir):
    import torch

    from parallax.serve.cli import build_parser, engine_spec

    torch.set_num_threads(2)
    args = build_parser().parse_args(["--hf", str(hf_dir), "--device", "cpu", "--threads", "1"])
    _, where = engine_spec(args, {}).build()
    assert torch.get_num_threads() == 1 and where.endswith("torch threads: 1")


def test_a_pinned_engine_takes_one_thread_per_core_it_has(hf_dir, monkeypatch):
    """Pinned to cores of its own, the engine leaves none to the HTTP side (it has one elsewhere):
    the default torch threads are one per pinned core. (Pinned here to the cores this process has.)"""
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = frozenset(os.sched_getaffinity(0))
    engine, where = EngineSpec(hf=str(hf_dir), device="cpu", cpu_affinity=cores).build()
    assert torch.get_num_threads() == len(cores) and os.sched_getaffinity(0) == cores
    assert where.endswith(f"torch threads: {len(cores)}, cores {','.join(map(str, sorted(cores)))}")
