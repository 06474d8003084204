"""The server's defences: the API key (401 everywhere but /health), validated bodies (400 naming the
field), a body size limit enforced while reading (413), unknown models (404), a full queue (429 with
Retry-After), and errors that never show a traceback (500)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

from tests.serve.conftest import CONTEXT, serve

KEY = "sekrit-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def guarded(hf_dir):
    with serve(hf_dir, api_key=KEY, max_body_bytes=1 << 20) as s:
        yield s


def _post(served, path: str, body=None, *, content: bytes | None = None, headers=None) -> httpx.Response:
    return httpx.post(f"{served.base_url}{path}", json=body, content=content, headers={**AUTH, **(headers or {})},
                      timeout=30)


def _assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in response.text and 'File "' not in response.text
    return error


ROUTES = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/metrics"),
          ("POST", "/v1/load_lora_adapter"), ("GET", "/no/such/route")]


@pytest.mark.parametrize("method, path", ROUTES)
def test_every_route_but_health_needs_the_key(guarded, method, path):
    url = f"{guarded.base_url}{path}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}):
        response = httpx.request(method, url, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.request(method, url, headers=AUTH).status_code != 401
    assert httpx.request(method, url, headers={"authorization": f"bearer {KEY}"}).status_code != 401


def test_health_is_open_and_the_client_authenticates(guarded):
    assert httpx.get(f"{guarded.base_url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.base_url}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in guarded.client().models.list().data] == [guarded.name]


@pytest.mark.parametrize("content", [b"{bad json", b"", b'{"prompt": "x", "max_tokens": NaN}', b"\xff\xfe{}",
                                     b"[1, 2]", b'"just a string"', b"[" * 100_000])
def test_malformed_bodies(guarded, content):
    error = _assert_error(_post(guarded, "/v1/completions", content=content,
                                headers={"Content-Type": "application/json"}), 400)
    assert error["type"] == "invalid_request_error"


def test_bodies_over_the_limit_get_413(guarded):
    big = {"model": guarded.name, "prompt": "a" * (10 << 20)}
    _assert_error(_post(guarded, "/v1/completions", big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit is enforced while the body is read
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'
    _assert_error(_post(guarded, "/v1/completions", content=chunks()), 413)
    # under the limit, a prompt too long for the context is a 400 naming it
    _assert_error(_post(guarded, "/v1/completions", {"prompt": "a " * 200_000}), 400, "prompt")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 65}, "n"),  # more than max_num_seqs
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["ok", "s" * 257]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [1, -2]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**9]}, "prompt"),  # outside the vocabulary
    ("/v1/completions", {}, "prompt"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
     "messages[1].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 21, "logprobs": True},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": -3},
     "max_completion_tokens"),
])
def test_bad_fields_are_named(guarded, path, body, param):
    _assert_error(_post(guarded, path, body), 400, param)


def test_unknown_model_and_too_long_prompts(guarded):
    _assert_error(_post(guarded, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, "model",
                  code="model_not_found")
    _assert_error(_post(guarded, "/v1/chat/completions", {"model": "gpt-9", "messages": [
        {"role": "user", "content": "x"}]}), 404, "model", code="model_not_found")
    ids = [20 + i % 300 for i in range(CONTEXT + 1)]
    error = _assert_error(_post(guarded, "/v1/completions", {"prompt": ids}), 400, "prompt")
    assert str(CONTEXT) in error["message"] and str(CONTEXT + 1) in error["message"]
    assert _post(guarded, "/v1/completions", {"prompt": ids[:-1], "max_tokens": 1}).status_code == 200
    long_chat = {"messages": [{"role": "user", "content": "word " * CONTEXT}]}
    _assert_error(_post(guarded, "/v1/chat/completions", long_chat), 400, "messages")


def test_method_and_route_errors_are_openai_shaped(guarded):
    assert httpx.get(f"{guarded.base_url}/v1/completions", headers=AUTH).json()["error"]["message"]
    assert httpx.get(f"{guarded.base_url}/v1/completions", headers=AUTH).status_code == 405
    assert httpx.get(f"{guarded.base_url}/v2/nothing", headers=AUTH).json()["error"]["type"] == "not_found_error"


def test_load_lora_adapter_checks_its_body(guarded, tmp_path):
    _assert_error(_post(guarded, "/v1/load_lora_adapter", {"lora_path": str(tmp_path)}), 400, "lora_name")
    _assert_error(_post(guarded, "/v1/load_lora_adapter", {"lora_name": guarded.name, "lora_path": str(tmp_path)}),
                  400, "lora_name")
    _assert_error(_post(guarded, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(tmp_path / "none")}),
                  400, "lora_path")


def test_loading_adapters_at_run_time_is_off_unless_enabled(hf_dir, tmp_path):
    """Without --enable-lora-loading the endpoint loads nothing from the server's disk: 404 saying how to turn it on."""
    with serve(hf_dir, allow_lora_loading=False) as off:
        error = _assert_error(_post(off, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(tmp_path)}), 404)
        assert "--enable-lora-loading" in error["message"]
        assert off.engine.lora_names == []


def test_internal_errors_never_show_a_traceback(guarded, monkeypatch):
    """A failure in the app (the tokenizer) and in an engine step: 500 with a generic message; a stream
    already answering ends with an error event and [DONE]; the server goes on serving."""
    secret = "secret-internal-detail"

    def broken(*args, **kwargs):
        raise RuntimeError(secret)

    with monkeypatch.context() as patch:
        patch.setattr(guarded.tokenizer, "encode", broken)
        response = _post(guarded, "/v1/completions", {"prompt": "x"})
        error = _assert_error(response, 500)
        assert secret not in response.text and error["type"] == "server_error"
    with monkeypatch.context() as patch:
        patch.setattr(guarded.engine.engine.runner, "forward", broken)
        for stream in (False, True):  # failed before the answer started: a 500 either way
            response = _post(guarded, "/v1/completions", {"prompt": "x", "max_tokens": 4, "stream": stream})
            _assert_error(response, 500)
            assert secret not in response.text
    guarded.wait_idle()
    with monkeypatch.context() as patch:
        calls = 0
        forward = guarded.engine.engine.runner.forward

        def fails_later(*args, **kwargs):  # the answer has started streaming when the step fails
            nonlocal calls
            calls += 1
            if calls > 3:
                raise RuntimeError(secret)
            return forward(*args, **kwargs)

        patch.setattr(guarded.engine.engine.runner, "forward", fails_later)
        response = _post(guarded, "/v1/completions", {"prompt": "x", "max_tokens": 50, "ignore_eos": True,
                                                      "stream": True})
        assert response.status_code == 200 and secret not in response.text and "Traceback" not in response.text
        events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and '"error"' in events[-2] and '"text"' in events[0]
    guarded.wait_idle()
    assert _post(guarded, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(hf_dir):
    """One request runs (max_num_seqs=1), one waits (max_waiting=1): the next one gets 429. Once the
    engine shuts down, requests get 503."""
    with serve(hf_dir, max_waiting=1, max_num_seqs=1) as s:
        url = f"{s.base_url}/v1/completions"
        body = {"prompt": "The history of", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as running, httpx.Client(timeout=30) as waiting:
            with running.stream("POST", url, json=body) as first:
                assert first.status_code == 200
                second = threading.Thread(target=lambda: waiting.post(url, json={**body, "stream": False}))
                second.start()
                deadline = time.monotonic() + 10
                while s.engine.snapshot()["waiting"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                response = httpx.post(url, json={"prompt": "x"})
                _assert_error(response, 429, code="rate_limit_exceeded")
                assert int(response.headers["Retry-After"]) >= 1
                with pytest.raises(openai.RateLimitError):
                    s.client().completions.create(model=s.name, prompt="x")
            second.join(30)
            assert not second.is_alive()
        s.wait_idle()
        assert httpx.post(url, json={"prompt": "x", "max_tokens": 2}).status_code == 200
        asyncio.run(s.engine.shutdown(timeout=0))  # as at SIGTERM, before the listening socket closes
        _assert_error(httpx.post(url, json={"prompt": "x"}), 503, code="service_unavailable")
