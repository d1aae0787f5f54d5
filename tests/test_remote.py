"""Remote backends: nbllm on a model served by llama-cpp-python's own OpenAI-compatible server,
started by the test on 127.0.0.1 with a tiny generated model."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from nbllm.core.config import Settings
from nbllm.core.errors import GenerationError, ModelLoadError, ModelNotFoundError, NbllmError
from nbllm.engine import Engine
from nbllm.measure import tuner
from tests.servers import free_port, serving


@pytest.fixture(scope="module")
def remote_server(tiny_models: dict[str, Path]) -> Iterator[str]:
    """``python -m llama_cpp.server`` (llama-cpp-python's [server] extra) on a tiny model."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_models["chat"]), "--model_alias", "far-model",
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                json.loads(response.read())
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(
                    f"llama_cpp.server did not start: {process.stderr.read().decode()[-2000:]}"
                ) from None  # type: ignore[union-attr]
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def remote_engine(settings: Settings, remote_server: str) -> Iterator[Engine]:
    engine = Engine(
        settings.merged(
            {
                "remote_models": {
                    "far": {"url": remote_server, "model": "far-model", "context_size": 512},
                    "wrong-name": {"url": remote_server, "model": "far-modle"},
                },
                "cache": {"enabled": True},
            }
        )
    )
    yield engine
    engine.close()


def test_a_remote_model_answers_like_a_local_one(remote_engine: Engine) -> None:
    completion = remote_engine.generate("the model", model="far", max_tokens=8, seed=1, cache=False)
    assert completion.stats.model == "far"
    assert 0 < completion.stats.completion_tokens <= 8
    assert completion.stats.finish_reason in ("stop", "length")
    chat = remote_engine.chat("hello", model="far", max_tokens=8, seed=1, cache=False)
    assert chat.text == chat.text.strip()
    assert remote_engine.health()["resident_models"][0]["architecture"] == "remote"


def test_a_remote_stream_arrives_in_pieces_and_can_be_stopped(remote_engine: Engine) -> None:
    stream = remote_engine.generate("the", model="far", stream=True, max_tokens=200, seed=2, cache=False)
    for index, _ in enumerate(stream):
        if index == 2:
            stream.stop()
    assert stream.stats is not None
    assert stream.stats.finish_reason == "cancelled"
    assert stream.stats.completion_tokens < 200


def test_the_prompt_cache_and_stats_work_on_remote_models(remote_engine: Engine) -> None:
    first = remote_engine.generate("the model cache", model="far", max_tokens=6, seed=3)
    again = remote_engine.generate("the model cache", model="far", max_tokens=6, seed=3)
    assert again.stats.cached
    assert again.text == first.text
    assert remote_engine.stats.snapshot()["per_model"]["far"]["requests"] == 2


def test_remote_answers_match_the_servers_own_for_the_same_seed(remote_engine: Engine, remote_server: str) -> None:
    payload = {"model": "far-model", "prompt": "the model", "max_tokens": 6, "temperature": 0, "seed": 4}
    request = urllib.request.Request(
        f"{remote_server}/completions", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        direct = json.loads(response.read())["choices"][0]["text"]
    ours = remote_engine.generate("the model", model="far", max_tokens=6, temperature=0, seed=4, cache=False)
    assert ours.text == direct


def test_generate_many_and_bench_work_on_a_remote_model(remote_engine: Engine) -> None:
    results = remote_engine.generate_many(
        ["a", "b", "c"], model="far", max_tokens=4, seed=1, progress=False, cache=False
    )
    assert all(r.ok for r in results)
    from nbllm.measure.bench import bench

    records = bench(remote_engine, "far", pp=16, tg=4, repetitions=1, progress=False).records
    assert [r["test"] for r in records] == ["pp16", "tg4"]
    assert all(r["tokens_per_second"] > 0 for r in records)
    assert records[0]["build"]["backend"] == "remote"


def test_a_model_the_server_does_not_have_is_named_with_a_suggestion(remote_engine: Engine) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no model 'far-modle'.*Did you mean 'far-model'\?"):
        remote_engine.generate("the", model="wrong-name", max_tokens=2)


def test_a_server_that_is_down_is_a_clear_error(settings: Settings) -> None:
    engine = Engine(settings.merged({"remote_models": {"gone": {"url": f"http://127.0.0.1:{free_port()}/v1"}}}))
    with pytest.raises(ModelLoadError, match=r"Cannot reach http://127\.0\.0\.1"):
        engine.generate("the", model="gone", max_tokens=2)
    assert engine.generate("the", max_tokens=2, seed=1).stats.completion_tokens > 0, "local models still work"


def test_tuning_a_remote_model_says_where_to_tune(remote_engine: Engine) -> None:
    with pytest.raises(NbllmError, match="Tune on that server"):
        tuner.tune(remote_engine, "far", progress=False)


def test_remote_models_are_validated_in_the_config() -> None:
    from nbllm.core.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"remote_models.x.url = 'localhost:8080'.*must be an http\(s\) URL"):
        validate({"remote_models": {"x": {"url": "localhost:8080"}}})
    with pytest.raises(ConfigError, match="Did you mean 'api_key'"):
        validate({"remote_models": {"x": {"url": "http://h/v1", "apikey": "k"}}})
    settings = validate({"remote_models": {"x": {"url": "http://h/v1", "api_key": "secret"}}})
    from nbllm.core.config import describe_settings

    shown = {key: value for key, value, _ in describe_settings(settings)}
    assert "secret" not in shown["remote_models.x"]


def test_the_magics_and_the_chat_panel_work_on_a_remote_model(remote_engine: Engine, tmp_path: Path) -> None:
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    import nbllm

    previous, nbllm._engine = nbllm._engine, remote_engine
    try:
        shell = InteractiveShell.instance()
        shell.run_cell("%load_ext nbllm").raise_error()
        with capture_output() as captured:
            shell.run_cell("%%llm -m far -n 5 --seed 1 --out remote_answer\nhello").raise_error()
        shell.run_cell("%unload_ext nbllm").raise_error()
        assert isinstance(shell.user_ns["remote_answer"], str)
        metadata = next(o.metadata["nbllm"] for o in captured.outputs if o.metadata and "nbllm" in o.metadata)
        assert metadata["model"] == "far"

        panel = nbllm.ChatPanel(engine=remote_engine, model="far")
        panel.max_tokens.value = 8
        panel.send("hi")
        panel.wait(60)
        assert panel.history[-1]["role"] == "assistant"
        assert "Error" not in panel.status_text
    finally:
        nbllm._engine = previous


# ------------------------------------------------------------------ the HTTP plumbing, on a tiny server


class TinyServer(ThreadingHTTPServer):
    """An OpenAI-compatible server in a thread on 127.0.0.1 that counts the connections it
    accepts and the completions asked for, and answers as ``mode`` says: ``ok`` (two pieces),
    ``json`` (no stream), ``drop`` (cuts the connection mid-stream), ``hangup`` (closes it without
    an answer), ``slow`` (a piece every 20 ms until the client goes), ``stall`` (one piece, then
    nothing). With ``api_key`` set, it answers 401 to requests without that key."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), TinyHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self.mode = "ok"
        self.api_key: str | None = None
        self.connections = 0
        self.completions = 0
        self.client_gone = threading.Event()  # a streaming client closed its connection


class TinyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked bodies
    server: TinyServer

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1  # one handler per accepted connection

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _event(self, data: object) -> None:
        line = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()

    def _piece(self, text: str) -> None:
        self._event({"choices": [{"text": text, "finish_reason": None}]})

    def _gone(self, wait: float) -> bool:
        """Whether the client closed the connection (it reads as at its end), waiting ``wait`` s."""
        readable, _, _ = select.select([self.connection], [], [], wait)
        return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""

    def _refused(self) -> bool:
        if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            self._json(401, {"error": {"message": "Invalid API key", "type": "auth"}})
            return True
        return False

    def do_GET(self) -> None:
        if not self._refused():
            self._json(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def do_POST(self) -> None:
        json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self._refused():
            return
        self.server.completions += 1
        mode = self.server.mode
        if mode == "hangup":
            self.close_connection = True
            return
        if mode == "json":
            self._json(200, {"choices": [{"text": "Hello there", "finish_reason": "stop"}], "usage": None})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._piece("Hello")
        if mode == "drop":
            self._piece(" there")
            self.close_connection = True  # no final chunk: the body breaks off
            return
        if mode in ("slow", "stall"):
            for _ in range(500 if mode == "slow" else 1):
                if self._gone(0.02 if mode == "slow" else 10):
                    self.server.client_gone.set()
                    self.close_connection = True
                    return
                if mode == "slow":
                    self._piece(" again")
        self._event({"choices": [{"text": " there", "finish_reason": "stop"}]})
        self._event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
        self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def tiny_server() -> Iterator[TinyServer]:
    with serving(TinyServer()) as server:
        yield server


def tiny_engine(settings: Settings, server: TinyServer, **config: object) -> Engine:
    return Engine(settings.merged({"remote_models": {"tiny": {"url": server.url, **config}}}))


def test_requests_to_a_remote_model_reuse_one_connection(settings: Settings, tiny_server: TinyServer) -> None:
    engine = tiny_engine(settings, tiny_server)
    try:
        assert engine.generate("a", model="tiny", cache=False).text == "Hello there"
        assert engine.generate("b", model="tiny", cache=False).text == "Hello there"
        assert engine.chat("c", model="tiny", cache=False).text == "Hello there"
        tiny_server.mode = "json"  # a server that ignores "stream": one JSON body
        completion = engine.generate("d", model="tiny", cache=False)
        assert completion.text == "Hello there"
        assert completion.stats.finish_reason == "stop"
        assert tiny_server.completions == 4
        assert tiny_server.connections == 1, "GET /models and four answers, one after another, on one connection"
        results = engine.generate_many(["e", "f", "g"], model="tiny", progress=False, cache=False)
        assert [r.text for r in results] == ["Hello there"] * 3
        assert tiny_server.connections <= 3, "three at once: the idle connection and two more at most"
    finally:
        engine.close()


def test_a_real_servers_connection_is_reused(remote_engine: Engine, remote_server: str) -> None:
    port = int(remote_server.split(":")[2].split("/")[0])

    def ours() -> set[int]:
        connections = psutil.Process().net_connections(kind="tcp")
        return {c.laddr.port for c in connections if c.raddr and c.raddr.port == port and c.status == "ESTABLISHED"}

    before = ours()
    remote_engine.generate("the model", model="far", max_tokens=4, seed=1, cache=False)
    first = ours() - before
    remote_engine.generate("the model", model="far", max_tokens=4, seed=2, cache=False)
    assert len(first) == 1
    assert ours() - before == first, "the second answer came over the first one's connection"


def test_a_stream_that_breaks_off_is_an_error_and_the_model_still_works(
    settings: Settings, tiny_server: TinyServer
) -> None:
    engine = tiny_engine(settings, tiny_server)
    try:
        tiny_server.mode = "drop"
        with pytest.raises(GenerationError, match=r"The stream from http://127\.0\.0\.1:\d+/v1 broke off: "):
            engine.generate("a", model="tiny", cache=False)
        tiny_server.mode = "ok"
        assert engine.generate("b", model="tiny", cache=False).text == "Hello there"
    finally:
        engine.close()
    assert tiny_server.connections == 2, "the broken connection is replaced, not reused"


@pytest.mark.parametrize("how", ["stop", "close"])
def test_a_cancelled_request_closes_its_connection(settings: Settings, tiny_server: TinyServer, how: str) -> None:
    engine = tiny_engine(settings, tiny_server)
    try:
        tiny_server.mode = "slow"
        stream = engine.generate("a", model="tiny", stream=True, cache=False)
        for index, _ in enumerate(stream):
            if index == 2:
                if how == "close":
                    stream.close()  # the consumer leaves
                    break
                stream.stop()  # from any thread, in general: ends the stream after this piece
        assert tiny_server.client_gone.wait(5), "the server saw the client go"
        assert stream.stats is not None
        assert stream.stats.finish_reason == "cancelled"
        tiny_server.mode = "ok"
        assert engine.generate("b", model="tiny", cache=False).text == "Hello there"
    finally:
        engine.close()


def test_a_stream_that_stalls_times_out(settings: Settings, tiny_server: TinyServer) -> None:
    engine = tiny_engine(settings, tiny_server, timeout=1)
    try:
        tiny_server.mode = "stall"
        started = time.monotonic()
        with pytest.raises(GenerationError, match=r"The stream from http://127\.0\.0\.1:\d+/v1 broke off: timed out\."):
            engine.generate("a", model="tiny", cache=False)
        assert time.monotonic() - started < 5
        assert tiny_server.client_gone.wait(5)
    finally:
        engine.close()


def test_a_wrong_api_key_is_named(settings: Settings, tiny_server: TinyServer) -> None:
    tiny_server.api_key = "right"
    engine = tiny_engine(settings, tiny_server, api_key="wrong")
    try:
        with pytest.raises(
            GenerationError,
            match=r"The server at http://127\.0\.0\.1:\d+/v1 answered 401: Invalid API key\. "
            r"Check remote_models' api_key\.",
        ):
            engine.generate("a", model="tiny")
    finally:
        engine.close()
    engine = tiny_engine(settings, tiny_server, api_key="right")
    try:
        assert engine.generate("a", model="tiny", cache=False).text == "Hello there"
        assert tiny_server.completions == 1, "the key went with GET /models and the completion"
    finally:
        engine.close()


def test_a_request_the_server_received_is_never_sent_twice(settings: Settings, tiny_server: TinyServer) -> None:
    engine = tiny_engine(settings, tiny_server)
    try:
        engine.generate("a", model="tiny", cache=False)  # loaded: GET /models answered
        tiny_server.mode = "hangup"
        with pytest.raises(
            ModelLoadError,
            match=r"Cannot reach http://127\.0\.0\.1:\d+/v1: Server disconnected without sending a response\. ",
        ):
            engine.generate("a", model="tiny", cache=False)
        assert tiny_server.completions == 2, "a generation is not idempotent: no retry once it was sent"
    finally:
        engine.close()


def test_schemas_reach_a_server_that_knows_only_json_object_with_a_schema(remote_engine: Engine) -> None:
    """llama-cpp-python's own server refuses OpenAI's json_schema (422): nbllm asks again in the
    form it takes, {"type": "json_object", "schema": ...}, and keeps that form for the model."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pick(BaseModel):
        color: Literal["red", "green"]
        size: int
        tags: list[Literal["a", "b"]] = Field(max_length=2)

    for seed in (1, 2):
        result = remote_engine.chat("Pick one.", model="far", schema=Pick, max_tokens=200, seed=seed, cache=False)
        assert isinstance(result.data, Pick), result.text
