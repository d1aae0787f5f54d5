"""A tool loop whose second call depends on the first one's result (issue 15).

The tiny models cannot reason, so the model here is a scripted peer: an OpenAI-compatible
server on 127.0.0.1 that answers as a capable model would, from what it is sent. It calls
``price_of`` first, then ``multiply`` with the price it was given back, then answers in text.
The loop under test is nbllm's own: the remote backend, the calls' validation, the functions
run, their results fed back as OpenAI tool messages with the calls' ids."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from nbllm.core.config import Settings
from nbllm.engine import Engine
from tests.servers import serving

PRICES = {"apple": 7, "pear": 11}


def price_of(item: str) -> int:
    """The price of one item, in cents."""
    return PRICES[item]


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


class Peer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), PeerHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self.received: list[dict[str, Any]] = []  # each request's body


class PeerHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Peer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._send(b'{"object": "list", "data": [{"id": "peer", "object": "model"}]}', "application/json")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.received.append(body)
        events = [{"choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in self._script(body)]
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        stream = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
        self._send(stream.encode(), "text/event-stream")

    def _script(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """What a capable model would answer: the next call from the results so far, or text."""
        results = [m for m in body["messages"] if m["role"] == "tool"]
        if not results:
            return self._call("price_of", {"item": "pear"})
        if len(results) == 1:  # the price came back: three of them
            return self._call("multiply", {"a": json.loads(results[0]["content"]), "b": 3})
        return [{"role": "assistant", "content": f"Three pears cost {results[1]['content']} cents."}]

    @staticmethod
    def _call(name: str, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        text = json.dumps(arguments)
        return [  # as OpenAI streams a call: id and name first, then the arguments in pieces
            {"tool_calls": [{"index": 0, "id": f"call_{name}", "type": "function", "function": {"name": name}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": text[:5]}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": text[5:]}}]},
        ]

    def _send(self, data: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def peer() -> Iterator[Peer]:
    with serving(Peer()) as server:
        yield server


def test_a_call_that_needs_an_earlier_result_gets_it(settings: Settings, peer: Peer) -> None:
    engine = Engine(settings.merged({"remote_models": {"peer": {"url": peer.url}}}))
    try:
        result = engine.chat("What do three pears cost?", model="peer", tools=[price_of, multiply], run_tools=True)
    finally:
        engine.close()
    assert result.text == "Three pears cost 33 cents."
    assert [(r.call.name, r.call.arguments, r.result) for r in result.tool_runs] == [
        ("price_of", {"item": "pear"}, 11),
        ("multiply", {"a": 11, "b": 3}, 33),
    ]
    assert result.steps == 3
    # The peer was sent each result as OpenAI's tool message, after the call it answers.
    last = peer.received[-1]["messages"]
    assert [m["role"] for m in last] == ["user", "assistant", "tool", "assistant", "tool"]
    assert last[1]["tool_calls"][0]["function"] == {"name": "price_of", "arguments": '{"item": "pear"}'}
    assert last[2]["tool_call_id"] == last[1]["tool_calls"][0]["id"]
    assert last[2]["content"] == "11"
    assert [tool["function"]["name"] for tool in peer.received[0]["tools"]] == ["price_of", "multiply"]
    assert engine.stats.tool_calls == 2
    assert engine.stats.tool_steps == 3
