"""The OpenAI-compatible HTTP application: ``build_app(engine, model_name=..., api_key=..., limits=...)``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events ending with
``data: [DONE]`` when ``stream`` is true), ``GET /v1/models``, ``POST /v1/load_lora_adapter`` (vLLM's
``{"lora_name", "lora_path"}``), ``GET /health`` (never needs the key), ``GET /metrics`` (Prometheus text).

Every error answer is an OpenAI error object (``parallax.serve.errors``): 400 naming the field, 401 without
the API key, 404 for an unknown model, 413 for a body over ``limits.max_body_bytes`` (counted while it is
read), 429 with ``Retry-After`` when the engine's queue is full, 503 while shutting down, 500 with a generic
message for anything unexpected (its traceback goes to the server's log, never to the client).

A client that goes away (a closed stream, or a closed connection while a non-streamed answer is computed)
closes the request's engine stream, which aborts it and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from parallax.serve.errors import APIError, error_body, invalid_request
from parallax.serve.protocol import ChatCompletionRequest, CompletionRequest, check_model, parse_request
from parallax.serve.event_stream import EventStreamResponse
from parallax.serve.replies import ChatReply, CompletionReply, EventFeed, raise_if_failed

__all__ = ["build_app", "ServeLimits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeLimits:
    """max_body_bytes: the largest request body read (larger ones get 413 before any parsing)."""

    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer; got {self.max_body_bytes!r}")


def build_app(engine: Any, *, model_name: str, api_key: str | None = None,
              limits: ServeLimits | None = None, allow_lora_loading: bool = False) -> FastAPI:
    """The FastAPI application serving ``engine`` (a ``parallax.serve.async_engine.AsyncEngine``) as
    ``model_name``, its LoRA adapters by their names. The engine is started with the application.
    ``allow_lora_loading``: whether ``/v1/load_lora_adapter`` may load adapter directories of the
    server's filesystem (off by default, as vLLM's runtime LoRA updating)."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty string; got {model_name!r}")
    limits = limits or ServeLimits()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield

    app = FastAPI(title="parallax", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    _add_error_handlers(app)
    server = _Server(engine, model_name)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return server.models()

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        if not allow_lora_loading:
            raise APIError(404, "loading LoRA adapters at run time is off; start the server with "
                                "--enable-lora-loading", type="invalid_request_error", code="not_found")
        return await server.load_lora(await read_json(request, limits.max_body_bytes))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_request(CompletionRequest, await read_json(request, limits.max_body_bytes))
        return await server.complete(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_request(ChatCompletionRequest, await read_json(request, limits.max_body_bytes))
        return await server.chat(request, body)

    return app


# -- reading and checking requests ------------------------------------------------------------------------


async def read_json(request: Request, max_bytes: int) -> Any:
    """The parsed JSON body, read chunk by chunk: 413 as soon as it passes ``max_bytes`` (or when
    Content-Length announces more), 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise invalid_request(f"the request body is not valid JSON: {_short(exc)}", None) from None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _short(exc: BaseException) -> str:
    return str(exc)[:200]


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {max_bytes} bytes",
                    code="request_too_large")


class APIKeyMiddleware:
    """401 (with ``WWW-Authenticate: Bearer``) for every request but ``GET /health`` that does not carry
    ``Authorization: Bearer <key>``; the key is compared in constant time."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest on every request, even with a wrong scheme: the time does not tell which part failed
        if hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer":
            await self.app(scope, receive, send)
            return
        message = "a valid API key is required: send the header 'Authorization: Bearer <key>'"
        response = JSONResponse(error_body(message, "invalid_request_error", None, "invalid_api_key"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # one line here; the server (uvicorn) logs the traceback, which Starlette re-raises to it
        log.error("serve: %s %s failed: %s", request.method, request.url.path, type(exc).__name__)
        return JSONResponse(error_body("internal server error; the server's log has the details", "server_error"),
                            status_code=500)


# -- the routes' work ---------------------------------------------------------------------------------------


class _ClientGone(Exception):
    """The client closed the connection before its non-streamed answer was ready."""


class _Server:
    """What the routes do, on one engine."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.created = int(time.time())
        tokenizer = engine.tokenizer

        @lru_cache(maxsize=65536)
        def token_text(token_id: int) -> str:
            return tokenizer.decode([token_id])

        self.token_text = token_text

    # models and adapters

    def models(self) -> dict[str, Any]:
        def card(name: str, parent: str | None) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "parallax",
                    "root": name, "parent": parent, "max_model_len": self.engine.max_model_len}

        return {"object": "list", "data": [card(self.model_name, None)]
                + [card(name, self.model_name) for name in self.engine.lora_names]}

    async def load_lora(self, body: Any) -> Response:
        if not isinstance(body, dict):
            raise invalid_request("the request body must be a JSON object", None)
        name, path = body.get("lora_name"), body.get("lora_path")
        for field, value in (("lora_name", name), ("lora_path", path)):
            if not isinstance(value, str) or not value:
                raise invalid_request(f"'{field}' must be a non-empty string", field)
        if name == self.model_name or name in self.engine.lora_names:
            raise invalid_request(f"'lora_name': {name!r} is already in use", "lora_name")
        if not Path(path).is_dir():
            raise invalid_request(f"'lora_path': {path} is not a directory on the server", "lora_path")
        try:
            await self.engine.add_lora(name, path)
        except (ValueError, OSError) as exc:
            raise invalid_request(f"'lora_path': {exc}", "lora_path") from None
        log.info("serve: LoRA adapter %r loaded from %s", name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    def _lora(self, model: str | None) -> str | None:
        check_model(model, [self.model_name, *self.engine.lora_names])
        return None if model in (None, self.model_name) else model

    # completions

    async def complete(self, request: Request, body: CompletionRequest) -> Response:
        lora = self._lora(body.model)
        self._check_n(body.n)
        prompts = [p if isinstance(p, list) else await self._encode(p, "prompt") for p in body.prompt]
        for i, ids in enumerate(prompts):
            self._check_length(ids, "prompt", f"prompt {i} has" if len(prompts) > 1 else "the prompt has")
        echoes = [self._echo(p, ids) for p, ids in zip(body.prompt, prompts)] if body.echo else None
        params = [body.sampling_params(self._max_tokens(body.max_tokens, ids)) for ids in prompts]
        texts = [p if isinstance(p, str) else None for p in body.prompt]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams, firsts = await self._start(request, prompts, texts, params, request_id, lora, "prompt")
        reply = CompletionReply(request_id, lora or self.model_name, body, echoes, self.token_text, prompts)
        if body.stream:
            return EventStreamResponse(EventFeed(reply, len(streams)), streams, firsts)
        return JSONResponse(reply.whole(await self._collect(request, streams, firsts)))

    def _echo(self, prompt: str | list[int], ids: list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(ids)

    # chat

    async def chat(self, request: Request, body: ChatCompletionRequest) -> Response:
        lora = self._lora(body.model)
        self._check_n(body.n)
        text = self._chat_text(body)
        ids = await self._encode(text, "messages")
        self._check_length(ids, "messages", "the messages through the chat template have")
        params = body.sampling_params(self._max_tokens(body.requested_max_tokens, ids))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams, firsts = await self._start(request, [ids], [text], [params], request_id, lora, "messages")
        reply = ChatReply(request_id, lora or self.model_name, body, self.token_text)
        if body.stream:
            return EventStreamResponse(EventFeed(reply, 1), streams, firsts)
        return JSONResponse(reply.whole((await self._collect(request, streams, firsts))[0]))

    def _chat_text(self, body: ChatCompletionRequest) -> str:
        tokenizer = self.engine.tokenizer
        if not hasattr(tokenizer, "apply_chat_template"):
            raise invalid_request("this model's tokenizer has no chat template; use /v1/completions", "messages")
        from parallax.data.errors import TokenizerError

        messages = [{"role": m.role, "content": m.content or ""} for m in body.messages]
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                                 tokenize=False)
        except TokenizerError as exc:  # e.g. a template that raises for roles out of order
            raise invalid_request(f"'messages': the chat template refused them: {exc}", "messages") from None

    # shared

    async def _encode(self, text: str, param: str) -> list[int]:
        """Token ids of a prompt text, encoded off the event loop (a 1 MB prompt takes a while)."""
        ids = await asyncio.to_thread(self.engine.tokenizer.encode, text)
        if not ids:
            raise invalid_request(f"'{param}' is empty: a prompt needs at least one token", param)
        return list(ids)

    def _max_tokens(self, requested: int | None, ids: list[int]) -> int:
        """``requested`` (None: no limit) fitted to what the context leaves after the prompt (the last
        token is sampled, never fed, hence the + 1)."""
        room = self.engine.max_model_len + 1 - len(ids)
        return room if requested is None else min(requested, room)

    def _check_n(self, n: int) -> None:
        most = self.engine.engine.config.max_num_seqs  # the samples of a request run in one batch
        if n > most:
            raise invalid_request(f"'n': {n} samples is more than this server runs at once ({most})", "n")

    def _check_length(self, ids: list[int], param: str, what: str) -> None:
        context = self.engine.max_model_len
        if len(ids) > context:
            raise invalid_request(f"this model's context is {context} tokens, but {what} {len(ids)} tokens; "
                                  "send fewer", param)

    async def _start(self, request: Request, prompts: list[list[int]], texts: list[str | None], params: list[Any],
                     request_id: str, lora: str | None, param: str) -> tuple[list[Any], list[Any]]:
        """Queue every prompt (with its ``SamplingParams``) and take each one's first output (errors come
        there: full queue, bad input, shutting down): their ``RequestStream``s and first outputs. On any
        error, or the client leaving while they wait, all are closed (aborted)."""
        streams: list[Any] = []
        try:
            for i, (ids, text, p) in enumerate(zip(prompts, texts, params)):
                streams.append(self.engine.open(ids, p, request_id=f"{request_id}-{i}", lora=lora, prompt=text))
            # every first output (or error) is awaited, so none is left waiting once the streams close
            firsts = await _unless_gone(request, asyncio.gather(*(s.get() for s in streams), return_exceptions=True))
            failed = next((r for r in firsts if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed
            for out in firsts:
                raise_if_failed(out)  # a 500 before the answer starts, streamed or not
        except BaseException as exc:
            for stream in streams:
                stream.close()
            if isinstance(exc, Exception) and not isinstance(exc, (APIError, _ClientGone)):
                raise _engine_error(exc, param) from None
            raise
        return streams, firsts

    async def _collect(self, request: Request, streams: list[Any], firsts: list[Any]) -> list[Any]:
        """Every request's final output; aborts them all if the client disconnects meanwhile."""
        async def final(stream: Any, out: Any) -> Any:
            while not out.finished:
                out = await stream.get()
            return out

        try:
            outputs = await _unless_gone(request, asyncio.gather(*(final(s, f) for s, f in zip(streams, firsts))))
        finally:
            for stream in streams:
                stream.close()
        for out in outputs:
            raise_if_failed(out)
        return outputs


async def _unless_gone(request: Request, awaitable: Any) -> Any:
    """The result of ``awaitable``, unless the client closes the connection first: then it is cancelled
    and ``_ClientGone`` raised (the caller closes its engine streams, which aborts their requests)."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work.cancelled() or not work.done():
        raise _ClientGone
    return work.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _engine_error(exc: BaseException, param: str) -> BaseException:
    """The HTTP error of an exception the engine raised when a request was queued."""
    from parallax.serve.async_engine import EngineStoppedError, QueueFullError

    if isinstance(exc, QueueFullError):
        seconds = max(1, math.ceil(exc.retry_after))
        return APIError(429, f"the server's queue is full; retry in {seconds} s", type="rate_limit_error",
                        code="rate_limit_exceeded", headers={"Retry-After": str(seconds)})
    if isinstance(exc, EngineStoppedError):
        return APIError(503, "the server is shutting down", type="server_error", code="service_unavailable")
    if isinstance(exc, ValueError):  # the engine's checks of the prompt (token ids outside the vocabulary)
        return invalid_request(f"'{param}': {exc}", param)
    return exc
