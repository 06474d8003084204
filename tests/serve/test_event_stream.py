"""``EventStreamResponse`` against a fake ASGI server and fake engine streams: events are written in
the engine's hand-over callback (no task woken per token); a client whose socket is full gets the
latest output once it drains (nothing in between piles up, nothing is lost from the text); several
requests end with one ``[DONE]``; an error becomes an error event; a client that disconnects, or a
cancelled response, closes the streams (which aborts their requests)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from parallax.inference.sequence import CompletionOutput, RequestOutput
from parallax.serve.event_stream import EventStreamResponse
from parallax.serve.protocol import CompletionRequest, parse_request
from parallax.serve.replies import CompletionReply, EventFeed


class FakeStream:
    """What the response uses of a ``RequestStream``: ``listen`` and ``close``."""

    def __init__(self) -> None:
        self.sink = None
        self.closed = False

    def listen(self, sink) -> None:
        self.sink = sink

    def close(self) -> None:
        self.closed = True


class FakeClient:
    """An ASGI server's ``send`` and ``receive``: ``send`` waits while ``writable`` is clear (a full
    socket buffer, as uvicorn's drain), ``receive`` answers ``http.disconnect`` once ``gone`` is set."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.writable = asyncio.Event()
        self.writable.set()
        self.gone = asyncio.Event()

    async def send(self, message: dict) -> None:
        await self.writable.wait()
        self.messages.append(message)

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.messages if m["type"] == "http.response.body"]

    def events(self) -> list[str]:
        return [e for body in self.bodies() for e in body.decode().split("\n\n") if e]

    def text(self) -> str:
        return "".join(body_text(b) for b in self.bodies())


def body_text(body: bytes) -> str:
    """The text the completion chunks of one written body carry."""
    chunks = [json.loads(e[len("data: "):]) for e in body.decode().split("\n\n") if e and e != "data: [DONE]"]
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def output(i: int, text: str, finished: bool = False) -> RequestOutput:
    sample = CompletionOutput(0, list(range(len(text))), text, "length" if finished else None)
    return RequestOutput(f"r-{i}", "p", [1], [sample], finished=finished)


def start(num_requests: int, **body) -> tuple[FakeClient, list[FakeStream], asyncio.Task]:
    request = parse_request(CompletionRequest, {"prompt": ["p"] * num_requests, "stream": True, **body})
    reply = CompletionReply("cmpl-1", "m", request, None, str, [[1]] * num_requests)
    streams = [FakeStream() for _ in range(num_requests)]
    firsts = [output(i, "") for i in range(num_requests)]
    response = EventStreamResponse(EventFeed(reply, num_requests), streams, firsts)
    client = FakeClient()
    task = asyncio.ensure_future(response({"type": "http"}, client.receive, client.send))
    return client, streams, task


async def listening(streams: list[FakeStream]) -> None:
    for _ in range(100):
        if all(s.sink is not None for s in streams):
            return
        await asyncio.sleep(0)
    raise AssertionError("the response never listened to its streams")


def test_events_are_written_in_the_hand_over_callback():
    async def main():
        client, (stream,), task = start(1)
        await listening([stream])
        assert client.messages[0]["type"] == "http.response.start" and client.messages[0]["status"] == 200
        stream.sink(output(0, "Hello"))
        assert client.text() == "Hello"  # written before any other task ran
        stream.sink(output(0, "Hello world", finished=True))
        assert client.events()[-1] == "data: [DONE]" and client.messages[-1]["more_body"] is False
        await asyncio.wait_for(task, 5)
        return client, stream
    client, stream = asyncio.run(main())
    assert client.text() == "Hello world" and stream.closed
    assert json.loads(client.events()[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"


def test_a_slow_client_gets_the_latest_output_once_its_socket_drains():
    async def main():
        client, (stream,), task = start(1)
        await listening([stream])
        client.writable.clear()  # the client stops reading
        stream.sink(output(0, "Hel"))  # its write waits
        for text in ("Hell", "Hello", "Hello, w"):  # kept: only the latest
            stream.sink(output(0, text))
        await asyncio.sleep(0.01)
        waiting = len(client.bodies())
        client.writable.set()
        for _ in range(5):
            await asyncio.sleep(0)
        stream.sink(output(0, "Hello, world", finished=True))
        await asyncio.wait_for(task, 5)
        return client, waiting
    client, waiting = asyncio.run(main())
    assert waiting == 0
    assert client.text() == "Hello, world"
    # "Hel" (the write that waited), then "lo, w" (the latest output only), the rest and [DONE]
    assert [body_text(b) for b in client.bodies()] == ["Hel", "lo, w", "orld"]
    assert client.bodies()[-1].endswith(b"data: [DONE]\n\n")


def test_several_requests_end_with_one_done():
    async def main():
        client, streams, task = start(2)
        await listening(streams)
        streams[0].sink(output(0, "a", finished=True))
        assert "data: [DONE]" not in client.events()
        streams[1].sink(output(1, "b", finished=True))
        await asyncio.wait_for(task, 5)
        return client
    client = asyncio.run(main())
    events = client.events()
    assert events.count("data: [DONE]") == 1 and events[-1] == "data: [DONE]"
    indexes = [json.loads(e[6:])["choices"][0]["index"] for e in events[:-1]]
    assert sorted(indexes) == [0, 1]


def test_an_error_after_the_start_is_an_error_event(caplog):
    async def main():
        client, (stream,), task = start(1)
        await listening([stream])
        stream.sink(output(0, "Hi"))
        with caplog.at_level(logging.ERROR, logger="parallax.serve.replies"):
            stream.sink(RuntimeError("secret detail"))
        await asyncio.wait_for(task, 5)
        return client
    client = asyncio.run(main())
    events = client.events()
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert error["type"] == "server_error" and "secret" not in events[-2]
    assert "secret detail" in caplog.text  # the server's log has it


@pytest.mark.parametrize("how", ["disconnect", "cancel"])
def test_a_client_gone_or_a_cancelled_response_closes_the_streams(how):
    async def main():
        client, streams, task = start(2)
        await listening(streams)
        streams[0].sink(output(0, "x"))
        client.writable.clear()
        streams[0].sink(output(0, "xy"))  # a write waits for the client
        if how == "disconnect":
            client.gone.set()
            await asyncio.wait_for(task, 5)
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        written = len(client.messages)
        client.writable.set()
        streams[1].sink(output(1, "late"))  # after the end: ignored
        await asyncio.sleep(0.01)
        return client, streams, written
    client, streams, written = asyncio.run(main())
    assert all(s.closed for s in streams)
    assert len(client.messages) == written  # the waiting write was cancelled, nothing came after
