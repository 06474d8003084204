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
from collections.abc import Callable
from typing import Any

from parallax.serve.errors import APIError, error_body
from parallax.serve.protocol import ChatCompletionRequest, CompletionRequest, chat_logprobs, completion_logprobs, usage
from parallax.serve.streaming import SSE_DONE, ChoiceStream, ChunkFormat, sse

__all__ = ["CompletionReply", "ChatReply", "EventFeed", "raise_if_failed"]

log = logging.getLogger(__name__)


def raise_if_failed(out: Any) -> None:
    """500 for a request the engine failed (its reason goes to the log, not to the client)."""
    if out.error is not None:
        log.error("serve: request %s failed in the engine: %s", out.request_id, out.error)
        raise APIError(500, "the engine failed on this request; the server's log has the details",
                       type="server_error")


class EventFeed:
    """The server-sent events of one streamed reply, fed its requests' outputs as they come:
    ``feed(i, item)`` gives the events that output of request ``i`` adds (none when it adds no
    sendable text), and after the last request's final output the usage chunk (when asked) and
    ``data: [DONE]``. An error after the answer started (the engine's, or an exception ``item``)
    becomes an error event before ``[DONE]``: the status line is already sent. Once ``ended``, the
    feed gives nothing more."""

    def __init__(self, reply: CompletionReply | ChatReply, num_requests: int) -> None:
        self.reply = reply
        self.left = set(range(num_requests))
        self.ended = False

    def feed(self, i: int, item: Any) -> list[str]:
        if self.ended:
            return []
        try:
            if isinstance(item, BaseException):
                raise item
            raise_if_failed(item)
            events = self.reply.chunks(i, item)
            if item.finished:
                self.left.discard(i)
            if self.left:
                return events
            events += self.reply.usage_events()
        except APIError as exc:
            events = [sse(exc.body())]
        except Exception:
            log.exception("serve: stream %s failed", self.reply.id)
            events = [sse(error_body("internal server error; the server's log has the details", "server_error"))]
        self.ended = True
        return [*events, SSE_DONE]


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
        # streaming state: what each choice has sent, each prompt's latest output
        self._chunk = ChunkFormat({"id": request_id, "object": "text_completion", "created": self.created,
                                   "model": model})
        self._states: dict[int, ChoiceStream] = {}
        self._finals: dict[int, Any] = {}

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

    def chunks(self, i: int, out: Any) -> list[str]:
        """The events of prompt ``i``'s new output ``out`` (cumulative): each sample's new text."""
        self._finals[i] = out
        events = []
        for sample in out.outputs:
            index = i * self.body.n + sample.index
            state = self._states.setdefault(index, ChoiceStream())
            if state.done:
                continue
            finished = sample.finish_reason is not None
            text = state.advance(sample.text or "", self.body.stop, finished)
            entries = state.new_logprobs(sample.logprobs)
            echo = self.echoes[i] if self.echoes and not state.started else ""
            if not (text or entries or finished or echo):
                continue
            offset = state.sent_chars - len(text) + (len(self.echoes[i]) if self.echoes else 0)
            state.started, state.done = True, finished
            events.append(self._chunk.choice(index, "text", echo + text, self._logprobs(entries, offset),
                                             sample.finish_reason))
        return events

    def usage_events(self) -> list[str]:
        """The last chunk, with the usage of every request, when the client asked for it."""
        if not self.body.include_usage:
            return []
        generated = sum(len(s.token_ids) for out in self._finals.values() for s in out.outputs)
        return [sse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                     "choices": [], "usage": usage(self.prompt_tokens, generated)})]


class ChatReply:
    """The answers of one ``/v1/chat/completions`` request."""

    def __init__(self, request_id: str, model: str, body: ChatCompletionRequest,
                 token_text: Callable[[int], str]) -> None:
        self.id = request_id
        self.model = model
        self.body = body
        self.token_text = token_text
        self.created = int(time.time())
        self._chunk = ChunkFormat({"id": request_id, "object": "chat.completion.chunk", "created": self.created,
                                   "model": model})  # streaming state, as CompletionReply's
        self._states: dict[int, ChoiceStream] = {}
        self._final: Any = None

    def _logprobs(self, entries: Any) -> dict[str, Any] | None:
        return chat_logprobs(entries or [], self.token_text) if self.body.logprobs else None

    def whole(self, out: Any) -> dict[str, Any]:
        choices = [{"index": s.index, "message": {"role": "assistant", "content": s.text or ""},
                    "logprobs": self._logprobs(s.logprobs),
                    "finish_reason": s.finish_reason} for s in out.outputs]
        generated = sum(len(s.token_ids) for s in out.outputs)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(len(out.prompt_token_ids), generated)}

    def chunks(self, i: int, out: Any) -> list[str]:
        """The events of the request's new output ``out`` (cumulative; ``i`` is always 0): each
        sample's role first, then its new text."""
        self._final = out
        events = []
        for sample in out.outputs:
            state = self._states.setdefault(sample.index, ChoiceStream())
            if state.done:
                continue
            if not state.started:
                state.started = True
                events.append(self._chunk.choice(sample.index, "delta", {"role": "assistant", "content": ""},
                                                 None, None))
            finished = sample.finish_reason is not None
            text = state.advance(sample.text or "", self.body.stop, finished)
            entries = state.new_logprobs(sample.logprobs)
            if text or entries or finished:
                state.done = finished
                events.append(self._chunk.choice(sample.index, "delta", {"content": text} if text else {},
                                                 self._logprobs(entries), sample.finish_reason))
        return events

    def usage_events(self) -> list[str]:
        """The last chunk, with the usage, when the client asked for it."""
        if not self.body.include_usage or self._final is None:
            return []
        generated = sum(len(s.token_ids) for s in self._final.outputs)
        return [sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                     "choices": [], "usage": usage(len(self._final.prompt_token_ids), generated)})]
