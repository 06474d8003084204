"""The OpenAI answers of one request, whole or as server-sent events: ``CompletionReply``
(``text_completion`` objects; choice ``i * n + j`` is sample j of prompt i) and ``ChatReply``
(``chat.completion`` / ``chat.completion.chunk``: the role in each choice's first chunk, then content).

A stream sends each choice's new text as the engine's outputs come (``ChoiceStream``: nothing that could
still change), its finish reason with its last chunk, a ``usage`` chunk when asked
(``stream_options.include_usage``), then ``data: [DONE]``. An error after the answer started (a failed
engine step) becomes an error event before ``[DONE]``: the status line is already sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from parallax.serve.errors import APIError, error_body
from parallax.serve.protocol import ChatCompletionRequest, CompletionRequest, chat_logprobs, completion_logprobs, usage
from parallax.serve.streaming import SSE_DONE, ChoiceStream, ChunkFormat, sse

__all__ = ["CompletionReply", "ChatReply", "raise_if_failed"]

log = logging.getLogger(__name__)


def raise_if_failed(out: Any) -> None:
    """500 for a request the engine failed (its reason goes to the log, not to the client)."""
    if out.error is not None:
        log.error("serve: request %s failed in the engine: %s", out.request_id, out.error)
        raise APIError(500, "the engine failed on this request; the server's log has the details",
                       type="server_error")


async def _guarded(events: AsyncIterator[str], request_id: str) -> AsyncIterator[str]:
    """The events, then ``[DONE]``; an error after the answer started becomes an error event (the
    status line is gone by then), its details logged."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        yield sse(exc.body())
    except Exception:
        log.exception("serve: stream %s failed", request_id)
        yield sse(error_body("internal server error; the server's log has the details", "server_error"))
    yield SSE_DONE


class CompletionReply:
    """The answers of one ``/v1/completions`` request: choice ``i * n + j`` is sample j of prompt i."""

    def __init__(self, request_id: str, model: str, body: CompletionRequest, echoes: list[str] | None,
                 token_text: Callable[[int], str], prompts: list[list[int]]) -> None:
        self.id = request_id
        self.model = model
        self.body = body
        self.echoes = echoes
        self.token_text = token_text
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.created = int(time.time())

    def _logprobs(self, entries: Any, offset: int) -> dict[str, Any] | None:
        if self.body.logprobs is None:
            return None
        return completion_logprobs(entries or [], self.token_text, offset)

    def whole(self, finals: list[Any]) -> dict[str, Any]:
        choices, generated = [], 0
        for i, out in enumerate(finals):
            echo = self.echoes[i] if self.echoes else ""
            for sample in out.outputs:
                generated += len(sample.token_ids)
                choices.append({"index": i * self.body.n + sample.index, "text": echo + (sample.text or ""),
                                "logprobs": self._logprobs(sample.logprobs, len(echo)),
                                "finish_reason": sample.finish_reason})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(self.prompt_tokens, generated)}

    def events(self, outputs: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[str]:
        return _guarded(self._events(outputs), self.id)

    async def _events(self, outputs: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[str]:
        n, stops = self.body.n, self.body.stop
        chunk = ChunkFormat({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model})
        states: dict[int, ChoiceStream] = {}
        finals: dict[int, Any] = {}
        async for i, out in outputs:
            raise_if_failed(out)
            finals[i] = out
            for sample in out.outputs:
                index = i * n + sample.index
                state = states.setdefault(index, ChoiceStream())
                if state.done:
                    continue
                finished = sample.finish_reason is not None
                text = state.advance(sample.text or "", stops, finished)
                entries = state.new_logprobs(sample.logprobs)
                echo = self.echoes[i] if self.echoes and not state.started else ""
                if not (text or entries or finished or echo):
                    continue
                offset = state.sent_chars - len(text) + (len(self.echoes[i]) if self.echoes else 0)
                state.started, state.done = True, finished
                yield chunk.choice(index, "text", echo + text, self._logprobs(entries, offset), sample.finish_reason)
        if self.body.include_usage:
            generated = sum(len(s.token_ids) for out in finals.values() for s in out.outputs)
            yield sse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                       "choices": [], "usage": usage(self.prompt_tokens, generated)})


class ChatReply:
    """The answers of one ``/v1/chat/completions`` request."""

    def __init__(self, request_id: str, model: str, body: ChatCompletionRequest,
                 token_text: Callable[[int], str]) -> None:
        self.id = request_id
        self.model = model
        self.body = body
        self.token_text = token_text
        self.created = int(time.time())

    def _logprobs(self, entries: Any) -> dict[str, Any] | None:
        return chat_logprobs(entries or [], self.token_text) if self.body.logprobs else None

    def whole(self, out: Any) -> dict[str, Any]:
        choices = [{"index": s.index, "message": {"role": "assistant", "content": s.text or ""},
                    "logprobs": self._logprobs(s.logprobs),
                    "finish_reason": s.finish_reason} for s in out.outputs]
        generated = sum(len(s.token_ids) for s in out.outputs)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(len(out.prompt_token_ids), generated)}

    def events(self, outputs: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[str]:
        return _guarded(self._events(outputs), self.id)

    async def _events(self, outputs: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[str]:
        stops = self.body.stop
        chunk = ChunkFormat({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                             "model": self.model})
        states: dict[int, ChoiceStream] = {}
        final = None
        async for _, out in outputs:
            raise_if_failed(out)
            final = out
            for sample in out.outputs:
                state = states.setdefault(sample.index, ChoiceStream())
                if state.done:
                    continue
                if not state.started:
                    state.started = True
                    yield chunk.choice(sample.index, "delta", {"role": "assistant", "content": ""}, None, None)
                finished = sample.finish_reason is not None
                text = state.advance(sample.text or "", stops, finished)
                entries = state.new_logprobs(sample.logprobs)
                if text or entries or finished:
                    state.done = finished
                    yield chunk.choice(sample.index, "delta", {"content": text} if text else {},
                                       self._logprobs(entries), sample.finish_reason)
        if self.body.include_usage and final is not None:
            generated = sum(len(s.token_ids) for s in final.outputs)
            yield sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.model, "choices": [],
                       "usage": usage(len(final.prompt_token_ids), generated)})
