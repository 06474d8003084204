"""The streamed answer (server-sent events), written from the engine's hand-over instead of a task
per stream.

``EventStreamResponse`` sends the status line, then listens to its requests' ``RequestStream``s: each
output the engine hands over is turned into events (``EventFeed``) and written to the client in that
same loop callback. Streaming through Starlette's ``StreamingResponse`` woke the response's task for
every token and walked an async-generator chain to reach ``send``: with 160 streams on 2 cores that
was half of the event loop's time, which took the GIL from the engine thread (per-token latency over
HTTP 1.25x the in-process engine's at the same request rate).

``send`` is an ASGI coroutine; uvicorn's completes without suspending unless the client's socket
buffer is full. So it is stepped once by hand: when it completes, the events are on their way; when
it suspends (a slow client), a task finishes it, and meanwhile each request's latest output is kept
(outputs are cumulative, so the ones in between are not needed) and written when the task is done.
A client that disconnects (``http.disconnect`` from ``receive``) closes the streams, which aborts
their requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Generator
from functools import partial
from typing import Any

from starlette.responses import Response

from parallax.serve.replies import EventFeed

__all__ = ["EventStreamResponse"]

log = logging.getLogger(__name__)


class EventStreamResponse(Response):
    """200 ``text/event-stream``: the events of ``feed`` for ``streams`` (the requests of one reply,
    their first outputs ``firsts`` already taken), ending with ``data: [DONE]``."""

    media_type = "text/event-stream"

    def __init__(self, feed: EventFeed, streams: list[Any], firsts: list[Any]) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._feed = feed
        self._streams = streams
        self._firsts = firsts
        self._send: Any = None
        self._done: asyncio.Future | None = None  # set when the last event is written (or the client failed)
        self._writing: asyncio.Task | None = None  # a write waiting for the client's socket
        self._pending: dict[int, Any] = {}  # request index -> latest item, while a write waits

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self._send = send
        self._done = asyncio.get_running_loop().create_future()
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for i, first in enumerate(self._firsts):
                self._on_item(i, first)
            for i, stream in enumerate(self._streams):
                stream.listen(partial(self._on_item, i))
            await asyncio.wait({self._done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not self._done.done():  # the client went away (or the server stops): nothing more is written
                self._done.set_result(None)
            for stream in self._streams:
                stream.close()  # aborts what has not finished (the client went away)
            if self._writing is not None:
                self._writing.cancel()

    def _on_item(self, i: int, item: Any) -> None:
        """An output (or the exception ending it) of request ``i``: its events go out now, or once the
        write that waits for the client is done."""
        if self._done.done():
            return
        if self._writing is not None:
            self._pending[i] = item
            return
        events = self._feed.feed(i, item)
        if events:
            self._write("".join(events).encode(), last=self._feed.ended)

    def _write(self, body: bytes, last: bool) -> None:
        coro = self._send({"type": "http.response.body", "body": body, "more_body": not last})
        try:
            blocker = coro.send(None)
        except StopIteration:
            self._written(last)
            return
        except Exception as exc:  # the coroutine is finished, with this exception
            self._failed(exc)
            return
        self._writing = asyncio.ensure_future(_finish(coro, blocker))
        self._writing.add_done_callback(partial(self._wrote, last))

    def _wrote(self, last: bool, task: asyncio.Task) -> None:
        self._writing = None
        if task.cancelled():
            return
        if task.exception() is not None:
            self._failed(task.exception())
            return
        self._written(last)
        pending, self._pending = self._pending, {}
        for i, item in pending.items():
            self._on_item(i, item)

    def _written(self, last: bool) -> None:
        if last and not self._done.done():
            self._done.set_result(None)

    def _failed(self, exc: BaseException) -> None:
        if not isinstance(exc, OSError):  # OSError: the client is gone (ASGI servers may raise it)
            log.error("serve: writing stream %s failed: %r", self._feed.reply.id, exc)
        if not self._done.done():
            self._done.set_result(None)


async def _finish(coro: Any, blocker: Any) -> None:
    await _resume(coro, blocker)


@types.coroutine
def _resume(coro: Any, blocker: Any) -> Generator[Any, None, None]:
    """Run ``coro`` on from where it suspended, yielding ``blocker`` (the future it waits on), as
    ``yield from`` would: what the task sends or throws in goes on to ``coro``."""
    while True:
        try:
            yield blocker
        except BaseException as exc:
            try:
                blocker = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                blocker = coro.send(None)
            except StopIteration:
                return


async def _disconnected(receive: Any) -> None:
    """Returns when the client closes the connection (the request body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
