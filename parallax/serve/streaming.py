"""Streaming pieces: which part of a growing text may be sent yet, merging several requests' outputs,
and server-sent events.

The engine hands back each sample's whole text so far (``CompletionOutput.text``, cut before a stop
string once one is generated). A stream sends the new part of it, holding back

- a trailing U+FFFD: a byte-level token can end mid-character, and the rest of the character comes
  with the next token (as ``parallax generate`` does);
- a tail that could be the start of a stop string: if the stop string completes, the engine cuts the
  text there, and what was already sent cannot be taken back.

Once a sample has finished, its text is final and everything left is sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["sendable_text", "ChoiceStream", "merge_outputs", "sse", "SSE_DONE"]

SSE_DONE = "data: [DONE]\n\n"


def sendable_text(text: str, stops: Sequence[str], finished: bool) -> str:
    """The prefix of ``text`` that can no longer change: all of it once finished; otherwise without a
    trailing U+FFFD and without the longest tail that is a proper prefix of a stop string."""
    if finished:
        return text
    text = text.rstrip("\ufffd")
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):  # longest first; only longer than held
            if text.endswith(stop[:k]):
                held = k
                break
    return text[:len(text) - held]


@dataclass
class ChoiceStream:
    """What one streamed choice has sent: characters of its text, tokens of its logprobs, and whether
    its last chunk (with the finish reason) went out."""

    sent_chars: int = 0
    sent_logprobs: int = 0
    started: bool = False  # chat: the first chunk (with the role) went out
    done: bool = False

    def advance(self, text: str, stops: Sequence[str], finished: bool) -> str:
        """The new sendable text of a choice whose whole text is now ``text``."""
        ready = sendable_text(text, stops, finished)
        delta = ready[self.sent_chars:]
        self.sent_chars = max(self.sent_chars, len(ready))
        return delta

    def new_logprobs(self, logprobs: Sequence[Any] | None) -> list[Any]:
        """The ``TokenLogprob`` entries not sent yet."""
        if not logprobs:
            return []
        fresh = list(logprobs[self.sent_logprobs:])
        self.sent_logprobs = len(logprobs)
        return fresh


async def merge_outputs(firsts: Sequence[Any], generators: Sequence[AsyncIterator[Any]]
                        ) -> AsyncIterator[tuple[int, Any]]:
    """(request index, output) from several engine streams as they come, starting with each one's
    first output (already taken, ``firsts``). Closing this iterator (or cancelling its consumer, a
    client gone) closes every stream, which aborts their requests."""
    for i, first in enumerate(firsts):
        yield i, first
    if len(generators) == 1:  # the common case: no task needed
        try:
            async for out in generators[0]:
                yield 0, out
        finally:
            await generators[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[Any]) -> None:
        try:
            async for out in gen:
                await queue.put((i, out, None))
            await queue.put((i, None, None))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((i, None, exc))
        finally:
            await gen.aclose()

    tasks = [asyncio.ensure_future(pump(i, gen)) for i, gen in enumerate(generators)]
    try:
        left = len(tasks)
        while left:
            i, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                left -= 1
            else:
                yield i, out
    finally:
        for task in tasks:
            task.cancel()


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event holding ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
