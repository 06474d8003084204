"""Streams under load and cancellation: a client that goes away mid-request frees its KV blocks (the
engine back to idle, the request counted as aborted), and 64 concurrent streaming clients all get
the outputs ``LLM.generate`` gives for the same requests."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from urllib.parse import urlparse

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parallax.inference import SamplingParams


def _aborted(served) -> float:
    text = httpx.get(f"{served.base_url}/metrics").text
    line = next((line for line in text.splitlines()
                 if line.startswith('parallax:request_success_total{finished_reason="abort"}')), None)
    return 0.0 if line is None else float(line.split(" ")[1])


def _send(base_url: str, path: str, body: dict) -> socket.socket:
    """A raw HTTP/1.1 POST on its own connection (closing the socket is the client going away)."""
    url = urlparse(base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _wait_running(served, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while (state := served.engine.snapshot())["running"] == 0:
        assert time.monotonic() < deadline, "the request never started running"
        time.sleep(0.005)
    return state


LONG = {"max_tokens": 480, "temperature": 0, "ignore_eos": True}  # ~0.5 s of steps: still running when cut


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "The history of", **LONG, "stream": True}),
    ("/v1/completions", {"prompt": ["The history of", "A list is"], **LONG, "stream": True}),  # two requests
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **LONG, "stream": True}),
    ("/v1/completions", {"prompt": "The history of", **LONG}),  # not streamed: the server watches the socket
])
def test_a_client_going_away_frees_its_blocks(served, path, body):
    served.wait_idle()
    before = _aborted(served)
    sock = _send(served.base_url, path, {"model": served.name, **body})
    if body.get("stream"):
        received = b""
        while received.count(b"data: ") < 3:  # the answer streams
            received += sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200")
    state = _wait_running(served)
    assert state["kv_blocks_used"] > 0
    sock.close()
    served.wait_idle()
    assert _aborted(served) == before + (len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1)
    # the engine goes on serving
    reply = served.client().completions.create(model=served.name, prompt="A list is", max_tokens=3)
    assert reply.choices[0].finish_reason is not None


def test_64_concurrent_streaming_clients(served, reference):
    """Greedy and seeded requests streamed at once: each gets LLM.generate's text and finish reason,
    and the engine batches them (many run in the same step)."""
    served.wait_idle()
    prompts = [f"Question {i}: what is a {word}?" for i, word in
               enumerate(["list", "tree", "graph", "queue", "stack", "heap", "map", "set"] * 8)]
    params = [SamplingParams(max_tokens=16, temperature=0) if i % 2 == 0 else
              SamplingParams(max_tokens=16, temperature=1.0, seed=i) for i in range(64)]
    expected = reference.generate(prompts, params)

    async def one(client: openai.AsyncOpenAI, prompt: str, p: SamplingParams) -> tuple[str, str]:
        stream = await client.completions.create(model=served.name, prompt=prompt, max_tokens=p.max_tokens,
                                                 temperature=p.temperature, seed=p.seed, stream=True)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def watch(done: asyncio.Event) -> int:
        most = 0
        while not done.is_set():
            most = max(most, served.engine.snapshot()["running"])
            await asyncio.sleep(0.002)
        return most

    async def run() -> tuple[list[tuple[str, str]], int]:
        async with openai.AsyncOpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0) as client:
            done = asyncio.Event()
            watcher = asyncio.create_task(watch(done))
            results = await asyncio.gather(*(one(client, q, p) for q, p in zip(prompts, params)))
            done.set()
            return results, await watcher

    results, most_running = asyncio.run(run())
    assert [r[0] for r in results] == [e.text for e in expected]
    assert [r[1] for r in results] == [e.finish_reason for e in expected]
    assert most_running >= 16
    served.wait_idle()


@pytest.mark.parametrize("text, stops, finished, sendable", [
    ("Hello wor", [], False, "Hello wor"),
    ("caf\ufffd", [], False, "caf"),  # the rest of the character comes with the next token
    ("caf\ufffd", [], True, "caf\ufffd"),  # finished: an invalid byte stays in the text
    ("a\ufffdb", [], False, "a\ufffdb"),  # not at the end: it never completes
    ("Hello wo", ["world"], False, "Hello "),  # "wo" may start "world"
    ("Hello w", ["xyz", "wor", "llo wx"], False, "He"),  # the longest tail that starts a stop string
    ("Hello w", ["world"], True, "Hello w"),
    ("Hello", ["Hello!"], False, ""),
    ("Hello", ["o"], False, "Hello"),  # a one-character stop string would have cut the text already
    ("ab\ufffd", ["b\ufffd"], False, "a"),
])
def test_sendable_text_holds_back_what_can_change(text, stops, finished, sendable):
    from parallax.serve.streaming import sendable_text

    assert sendable_text(text, stops, finished) == sendable


@settings(max_examples=200, deadline=None)
@given(text=st.text(), index=st.integers(0, 1000), reason=st.sampled_from([None, "stop", "length", "abort"]),
       logprobs=st.one_of(st.none(), st.fixed_dictionaries({"tokens": st.lists(st.text(), max_size=3),
                                                           "token_logprobs": st.lists(st.floats(-50, 0), max_size=3)})),
       delta=st.booleans())
def test_chunk_format_writes_what_json_dumps_of_the_whole_chunk_writes(text, index, reason, logprobs, delta):
    """The template (fixed part encoded once) against the event of the whole object: the same bytes,
    for any text (quotes, backslashes, control characters, non-ASCII, lone surrogates)."""
    from parallax.serve.streaming import ChunkFormat

    fixed = {"id": "cmpl-\"x\u2028", "object": "text_completion", "created": 1733300000, "model": "base/\u00e9"}
    member, value = ("delta", {"content": text}) if delta else ("text", text)
    choice = {"index": index, member: value, "logprobs": logprobs, "finish_reason": reason}
    expected = f"data: {json.dumps({**fixed, 'choices': [choice]}, ensure_ascii=False, separators=(',', ':'))}\n\n"
    assert ChunkFormat(fixed).choice(index, member, value, logprobs, reason) == expected


def test_choice_stream_sends_each_character_once():
    """Token by token, the deltas add up to the final text (stop strings cut it)."""
    from parallax.serve.streaming import ChoiceStream

    state, sent = ChoiceStream(), []
    for text, finished in [("It ", False), ("It is", False), ("It is \ufffd", False), ("It is é", False),
                           ("It is é E", False), ("It is é EN", False), ("It is é ", True)]:  # cut at "END"
        sent.append(state.advance(text, ["END"], finished))
    assert sent == ["It ", "is", " ", "é", " ", "", ""] and "".join(sent) == "It is é "


def test_a_client_leaving_while_queued_never_runs(hf_dir):
    """With one sequence at a time, a second stream waits; its client leaves before its first token:
    the request leaves the queue while the first still runs."""
    from tests.serve.conftest import serve

    with serve(hf_dir, max_num_seqs=1) as s:
        body = {"model": s.name, "prompt": "The history of", **LONG, "stream": True}
        first = _send(s.base_url, "/v1/completions", body)
        _wait_running(s)
        second = _send(s.base_url, "/v1/completions", body)
        deadline = time.monotonic() + 10
        while s.engine.snapshot()["waiting"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        before = _aborted(s)
        second.close()
        while s.engine.snapshot()["waiting"] == 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert s.engine.snapshot()["running"] == 1 and _aborted(s) == before + 1
        first.close()
        s.wait_idle()
        assert _aborted(s) == before + 2
