"""``nbllm serve``: the OpenAI-compatible server, driven by the official ``openai`` client.

The server runs on 127.0.0.1 on a free port: in this process (``serve_in_background``, the
engine behind ``nbllm.serve()``) and once as a real subprocess (``python -m nbllm.server``).
Every test uses real llama.cpp on the tiny generated models.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install 'nbllm[server]'")

from nbllm.core.config import Settings
from nbllm.core.errors import ConfigError
from nbllm.engine import Engine
from nbllm.server.addresses import is_loopback
from nbllm.server.app import create_app
from nbllm.server.options import server_options
from nbllm.server.running import ServerHandle, serve_in_background
from tests.servers import free_port

PROMPT = "Question: what is a model?\nAnswer:"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
TIMEOUT = 60.0


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's tiny-model settings, with room for long answers (context 2048) and one thread
    per model: two models generating side by side then fit a 2-core machine without fighting."""
    return settings.merged({"performance": {"context_size": 2048, "threads": 1}})


def assert_still_serving(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=4, seed=1)
    assert answer.usage is not None
    assert answer.usage.completion_tokens >= 1


def post(server: ServerHandle, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(server.url + path, timeout=TIMEOUT, **kwargs)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of a server-sent event stream, checking its framing on the way."""
    lines = list(response.iter_lines())
    events = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in events), events
    assert lines.count("") >= len(events) - 1, "events are separated by blank lines"
    return [line.removeprefix("data: ") for line in events]


# ---------------------------------------------------------------------------------- answers


def test_chat_completion_answers_like_openai_with_usage_from_the_engine_stats(
    client: openai.OpenAI, global_engine: Engine
) -> None:
    answer = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=12, seed=3, temperature=0.8)
    assert answer.object == "chat.completion"
    assert answer.id.startswith("chatcmpl-")
    assert answer.model == "tiny-a"
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    last = global_engine.stats.snapshot()["last_request"]
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == last["prompt_tokens"] > 0
    assert answer.usage.completion_tokens == last["completion_tokens"]
    assert answer.usage.total_tokens == last["prompt_tokens"] + last["completion_tokens"]
    assert (
        choice.message.content == global_engine.chat(HELLO, model="tiny-a", max_tokens=12, seed=3, temperature=0.8).text
    )


def test_completion_continues_the_prompt_with_the_openai_and_llama_cpp_parameters(
    client: openai.OpenAI, global_engine: Engine
) -> None:
    params: dict[str, Any] = {
        "max_tokens": 16,
        "seed": 5,
        "temperature": 0.9,
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.2,
    }
    extras: dict[str, Any] = {"top_k": 20, "min_p": 0.1, "repeat_penalty": 1.2}
    answer = client.completions.create(model="tiny-b", prompt=PROMPT, extra_body=extras, **params)
    assert answer.object == "text_completion"
    assert answer.model == "tiny-b"
    expected = global_engine.generate(PROMPT, model="tiny-b", **params, **extras)
    assert answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == expected.stats.finish_reason


def test_max_completion_tokens_and_stop_sequences_are_honoured(client: openai.OpenAI, global_engine: Engine) -> None:
    long = client.completions.create(model="tiny-a", prompt=PROMPT, max_tokens=40, seed=2, temperature=1.0)
    text = long.choices[0].text
    word = next(w for w in re.findall(r"[a-z]{3,}", text) if text.index(w) > 0)
    stopped = client.completions.create(
        model="tiny-a", prompt=PROMPT, max_tokens=40, seed=2, temperature=1.0, stop=[word]
    )
    assert stopped.choices[0].text == text[: text.index(word)]
    assert stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model="tiny-a", messages=HELLO, max_completion_tokens=3, seed=1)
    assert short.usage is not None
    assert short.usage.completion_tokens <= 3


def test_streamed_chat_arrives_as_openai_chunks_and_ends_with_done(server: ServerHandle) -> None:
    body = {"model": "tiny-a", "messages": HELLO, "max_tokens": 20, "seed": 4, "stream": True}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny-a" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    whole = post(server, "/v1/chat/completions", json={**body, "stream": False}).json()
    assert streamed == whole["choices"][0]["message"]["content"]


def test_streamed_completion_through_the_openai_client_reports_usage_last(
    client: openai.OpenAI, global_engine: Engine
) -> None:
    stream = client.completions.create(
        model="tiny-b", prompt=PROMPT, max_tokens=15, seed=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == global_engine.stats.snapshot()["last_request"]["completion_tokens"]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == global_engine.generate(PROMPT, model="tiny-b", max_tokens=15, seed=6).text


def test_the_model_field_picks_the_model_from_the_shared_registry(client: openai.OpenAI, global_engine: Engine) -> None:
    a = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=16, seed=1, temperature=1.0)
    b = client.chat.completions.create(model="tiny-b", messages=HELLO, max_tokens=16, seed=1, temperature=1.0)
    default = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=16, seed=1, temperature=1.0)
    assert (a.model, b.model) == ("tiny-a", "tiny-b")
    assert a.choices[0].message.content != b.choices[0].message.content
    assert a.choices[0].message.content == default.choices[0].message.content
    assert {r.name for r in global_engine.registry.resident()} == {"tiny-a", "tiny-b"}
    assert set(global_engine.stats.snapshot()["per_model"]) == {"tiny-a", "tiny-b"}


def test_models_are_listed_and_retrieved_by_name(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert {"tiny-a", "tiny-b", "tiny-c", "tiny-chat"} <= set(ids)
    model = client.models.retrieve("tiny-b")
    assert (model.id, model.object, model.owned_by) == ("tiny-b", "model", "nbllm")
    with pytest.raises(openai.NotFoundError, match="Did you mean 'tiny-b'"):
        client.models.retrieve("tiny-bb")


# ---------------------------------------------------------------------------------- monitoring


def test_health_reports_resident_models_and_the_queue(server: ServerHandle, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="tiny-c", messages=HELLO, max_tokens=2, seed=1)
    health = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok"
    assert [m["name"] for m in health["resident_models"]] == ["tiny-c"]
    assert health["resident_models"][0]["context_size"] == 2048
    assert health["server"] == {"workers": 2, "running": 0, "waiting": 0, "served": 1}


def test_admin_stats_are_nbllm_stats_and_clear_cache_empties_the_prompt_cache(
    server: ServerHandle, client: openai.OpenAI, global_engine: Engine
) -> None:
    global_engine.configure(cache={"enabled": True})
    for _ in range(2):
        client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=8, seed=9)
    stats = httpx.get(server.url + "/admin/stats", timeout=TIMEOUT).json()
    assert stats["requests"] == 2
    assert stats["prompt_cache_hits"] == 1
    assert stats["cache"]["entries"] == 1
    assert stats["server"]["served"] == 2
    cleared = post(server, "/admin/clear-cache")
    assert cleared.status_code == 200
    assert cleared.json()["cache"]["entries"] == 0
    assert global_engine.cache_stats()["entries"] == 0


# ---------------------------------------------------------------------------------- bad input


def test_malformed_json_is_a_400_in_openai_format(server: ServerHandle, client: openai.OpenAI) -> None:
    for raw in (b'{"model": "tiny-a", "messages": [', b"", b"[1, 2]", b"\xff\xfe", b"[" * 100_000):
        response = post(server, "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, raw[:20]
        error = error_of(response)
        assert error["type"] == "invalid_request_error"
        assert "JSON" in error["message"]
    assert_still_serving(client)


def test_an_unknown_model_is_a_404_with_a_suggestion(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="tiny-aa", messages=HELLO, max_tokens=4)
    error = caught.value.body
    assert isinstance(error, dict)
    assert "Unknown model 'tiny-aa'. Did you mean 'tiny-a'?" in error["message"]
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert_still_serving(client)


def test_models_are_served_by_name_never_by_file_path(client: openai.OpenAI, tiny_models: dict[str, Path]) -> None:
    for name in (str(tiny_models["a"]), "~/x.gguf", "../tiny-a.gguf", "/etc/passwd"):
        with pytest.raises(openai.NotFoundError, match="by name, not by file path"):
            client.completions.create(model=name, prompt=PROMPT, max_tokens=4)
    assert_still_serving(client)


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_longer_than_the_context_is_a_400_decided_before_streaming(
    client: openai.OpenAI, global_engine: Engine, stream: bool
) -> None:
    long_prompt = "the model " * 1500  # > 2048 tokens
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny-a", prompt=long_prompt, max_tokens=4, stream=stream)
    assert caught.value.status_code == 400
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "prompt"
    assert "holds 2,048" in error["message"], "the prompt's size and the limit, whichever path served it"
    assert_still_serving(client)


def test_an_over_long_body_is_a_413_whether_declared_or_chunked(server: ServerHandle, client: openai.OpenAI) -> None:
    body = json.dumps({"model": "tiny-a", "prompt": "x" * (2 << 20)}).encode()
    declared = post(server, "/v1/completions", content=body)
    assert declared.status_code == 413
    assert "at most 1,048,576 bytes" in error_of(declared)["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts as it reads
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    chunked = post(server, "/v1/completions", content=chunks())
    assert chunked.status_code == 413
    assert error_of(chunked)["code"] == "request_too_large"
    assert_still_serving(client)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_above_the_server_limit_is_a_400(client: openai.OpenAI, field: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-a", messages=HELLO, **{field: 100_000})  # type: ignore[call-overload]
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == field
    assert "above this server's limit of 4096 tokens" in error["message"]
    assert_still_serving(client)


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"n": 2}, "n", "one answer per request"),
        ({"logprobs": True}, "logprobs", "not supported"),
        ({"tools": "f"}, "tools", "must be a list of OpenAI tools"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"response_format": {"type": "xml"}}, "response_format", "not supported"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}},
                    },
                }
            },
            "response_format",
            "'maximum'",
        ),
        ({"mirostat": 2}, "mirostat", "Unrecognized request argument"),
        ({"temperature": 9}, "temperature", "must be a number from 0.0 to 5.0"),
        ({"seed": -1}, "seed", "seed = -1"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "function messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]", "image_url"),
    ],
)
def test_unsupported_or_invalid_parameters_are_a_400_naming_the_field(
    server: ServerHandle, client: openai.OpenAI, extra: dict[str, Any], param: str, words: str
) -> None:
    body = {"model": "tiny-a", "messages": HELLO, "max_tokens": 4, **extra}
    response = post(server, "/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param
    assert words in error["message"]
    assert_still_serving(client)


def test_harmless_openai_fields_are_accepted_and_text_parts_are_read(client: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]},
    ]
    answer = client.chat.completions.create(
        model="tiny-a", messages=messages, max_tokens=4, n=1, user="me", store=False, tool_choice="none", seed=1
    )
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_unknown_endpoints_are_404s_in_openai_format(server: ServerHandle) -> None:
    response = post(server, "/v1/audio/speech", json={"input": "x"})
    assert response.status_code == 404
    assert "Invalid URL (POST /v1/audio/speech)" in error_of(response)["message"]


# ---------------------------------------------------------------------------------- access


@pytest.fixture
def keyed_server(global_engine: Engine) -> Iterator[ServerHandle]:
    handle = serve_in_background(port=0, api_key="sekrit-key")
    yield handle
    handle.stop()


def test_with_an_api_key_every_endpoint_wants_it(keyed_server: ServerHandle) -> None:
    url = keyed_server.url
    for method, path in (
        ("GET", "/health"),
        ("GET", "/admin/stats"),
        ("POST", "/admin/clear-cache"),
        ("GET", "/v1/models"),
    ):
        missing = httpx.request(method, url + path, timeout=TIMEOUT)
        assert missing.status_code == 401, path
        assert error_of(missing)["code"] == "missing_api_key"
        good = httpx.request(method, url + path, headers={"Authorization": "Bearer sekrit-key"}, timeout=TIMEOUT)
        assert good.status_code == 200, path
    wrong = openai.OpenAI(base_url=keyed_server.base_url, api_key="guess", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        wrong.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=4)
    right = openai.OpenAI(base_url=keyed_server.base_url, api_key="sekrit-key", max_retries=0, timeout=TIMEOUT)
    assert_still_serving(right)


def test_without_a_key_it_refuses_to_listen_beyond_loopback() -> None:
    settings = Settings()
    with pytest.raises(ConfigError, match=r"Refusing to listen on 0\.0\.0\.0 without an API key"):
        server_options(settings, host="0.0.0.0")
    assert server_options(settings, host="0.0.0.0", api_key="k").api_key == "k"
    assert server_options(settings).host == "127.0.0.1"
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.1"))
    with pytest.raises(ConfigError, match="API key is empty"):
        server_options(settings, api_key=" ")


def test_the_api_key_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBLLM_API_KEY", "from-env")
    assert server_options(Settings(), host="0.0.0.0").api_key == "from-env"


def test_without_a_key_web_pages_and_rebound_host_names_are_refused(server: ServerHandle) -> None:
    page = httpx.get(server.url + "/health", headers={"Origin": "https://evil.example"}, timeout=TIMEOUT)
    assert page.status_code == 403
    assert error_of(page)["code"] == "origin_not_allowed"
    rebound = httpx.get(server.url + "/health", headers={"Host": "evil.example"}, timeout=TIMEOUT)
    assert rebound.status_code == 403
    assert error_of(rebound)["code"] == "host_not_allowed"
    local_page = httpx.get(server.url + "/health", headers={"Origin": "http://localhost:8888"}, timeout=TIMEOUT)
    assert local_page.status_code == 200


def test_without_a_key_admin_endpoints_answer_loopback_clients_only(global_engine: Engine) -> None:
    import asyncio

    app = create_app(server_options(port=0))

    async def ask(client_address: str) -> int:
        transport = httpx.ASGITransport(app=app, client=(client_address, 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as remote:
            return (await remote.get("/admin/stats")).status_code

    assert asyncio.run(ask("10.0.0.7")) == 403
    assert asyncio.run(ask("127.0.0.1")) == 200


def test_a_busy_port_is_a_clear_error_and_stop_frees_it(server: ServerHandle, global_engine: Engine) -> None:
    with pytest.raises(ConfigError, match=f"Cannot listen on 127.0.0.1:{server.port}.*nbllm.serve"):
        serve_in_background(port=server.port)
    assert "running" in repr(server)
    port = server.port
    server.stop()
    assert "stopped" in repr(server)
    again = serve_in_background(port=port)
    assert again.port == port
    again.stop()


# ---------------------------------------------------------------------------------- several users


LONG_MODEL = "tiny-b"  # of the tiny models, the one that most often runs to max_tokens


def long_answer_seed(engine: Engine, max_tokens: int) -> int:
    """A seed whose answer runs to ``max_tokens`` (random tiny models often stop early)."""
    for seed in range(40):
        stats = engine.generate(PROMPT, model=LONG_MODEL, max_tokens=max_tokens, seed=seed, temperature=1.0).stats
        if stats.finish_reason == "length":
            return seed
    pytest.fail("no seed gives a long answer")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("batched", [False, True], ids=["one-at-a-time", "batched"])
def test_a_client_that_hangs_up_mid_stream_stops_its_generation(global_engine: Engine, batched: bool) -> None:
    max_tokens = 1800
    seed = long_answer_seed(global_engine, max_tokens)
    before = global_engine.stats.snapshot()["requests"]
    body = {"model": LONG_MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "seed": seed, "temperature": 1.0}
    with serve_in_background(port=0, workers=2, batched=batched) as server:
        url = server.base_url + "/completions"
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=TIMEOUT) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first chunk has arrived: generation is under way; hang up
        wait_for(lambda: global_engine.stats.snapshot()["requests"] > before, "the request to end")
        last = global_engine.stats.snapshot()["last_request"]
        assert last["finish_reason"] == "cancelled"
        assert last["completion_tokens"] < max_tokens / 2
        assert global_engine.stats.snapshot()["cancelled"] >= 1
        wait_for(lambda: httpx.get(server.url + "/health").json()["server"]["running"] == 0, "the worker to be free")
        assert_still_serving(openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0))


def test_concurrent_clients_on_one_model_get_their_own_unmixed_answers(client: openai.OpenAI) -> None:
    def ask(index: int) -> str:
        prompt = f"{PROMPT} {['docker', 'python', 'cache', 'notebook', 'water', 'people'][index]}"
        answer = client.completions.create(
            model="tiny-a", prompt=prompt, max_tokens=60, seed=100 + index, temperature=0.9
        )
        return answer.choices[0].text

    sequential = [ask(i) for i in range(6)]
    assert len(set(sequential)) == 6, "different prompts and seeds give different answers"
    with ThreadPoolExecutor(6) as pool:
        concurrent = list(pool.map(ask, range(6)))
    assert concurrent == sequential


@pytest.fixture
def batched_client(global_engine: Engine) -> Iterator[openai.OpenAI]:
    handle = serve_in_background(port=0, workers=6, batched=True)
    yield openai.OpenAI(base_url=handle.base_url, api_key="unused", max_retries=0, timeout=TIMEOUT)
    handle.stop()


def test_batched_clients_on_one_model_get_the_answers_they_would_get_alone(
    batched_client: openai.OpenAI, global_engine: Engine
) -> None:
    words = ["docker", "python", "cache", "notebook", "water", "people"]
    prompts = [f"{PROMPT} {word}" for word in words]

    def ask(index: int) -> str:
        answer = batched_client.completions.create(
            model="tiny-a",
            prompt=prompts[index],
            max_tokens=40,
            seed=200 + index,
            temperature=0.9,
            stream=index % 2 == 0,
        )
        if isinstance(answer, openai.Stream):
            return "".join(chunk.choices[0].text for chunk in answer if chunk.choices)
        return answer.choices[0].text

    alone = [
        global_engine.generate(prompts[i], model="tiny-a", max_tokens=40, seed=200 + i, temperature=0.9).text
        for i in range(6)
    ]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, range(6)))
    assert together == alone


def test_streams_on_two_models_interleave_without_mixing(client: openai.OpenAI) -> None:
    def stream(model: str) -> str:
        chunks = client.chat.completions.create(
            model=model, messages=HELLO, max_tokens=80, seed=8, temperature=0.9, stream=True
        )
        pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices]
        return "".join(piece or "" for piece in pieces)

    expected = {model: stream(model) for model in ("tiny-a", "tiny-b")}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(stream, ["tiny-a", "tiny-b", "tiny-a", "tiny-b"]))
    assert results == [expected["tiny-a"], expected["tiny-b"], expected["tiny-a"], expected["tiny-b"]]


def test_a_busy_model_makes_its_requests_wait_while_other_models_answer(
    server: ServerHandle, client: openai.OpenAI, global_engine: Engine
) -> None:
    # A notebook cell in the same kernel is using tiny-a (an unfinished stream holds its lock).
    held = global_engine.generate(PROMPT, model="tiny-a", stream=True, max_tokens=50, seed=1)
    next(held)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.completions.create, model="tiny-a", prompt=PROMPT, max_tokens=5, seed=2)
        wait_for(lambda: httpx.get(server.url + "/health").json()["server"]["running"] == 1, "tiny-a's request")
        other = client.completions.create(model="tiny-b", prompt=PROMPT, max_tokens=5, seed=2)
        assert other.model == "tiny-b"
        assert not waiting.done(), "tiny-a is busy: its request waits for it"
        held.close()
        assert waiting.result(timeout=TIMEOUT).model == "tiny-a"


def test_a_full_queue_answers_503_at_once(global_engine: Engine) -> None:
    handle = serve_in_background(port=0, workers=1, max_waiting=1, batched=False)
    client = openai.OpenAI(base_url=handle.base_url, api_key="unused", max_retries=0, timeout=TIMEOUT)
    held = global_engine.generate(PROMPT, model="tiny-a", stream=True, max_tokens=50, seed=1)
    next(held)
    try:
        with ThreadPoolExecutor(2) as pool:

            def ask() -> openai.types.Completion:
                return client.completions.create(model="tiny-a", prompt=PROMPT, max_tokens=3)

            first = pool.submit(ask)
            wait_for(lambda: httpx.get(handle.url + "/health").json()["server"]["running"] == 1, "the first request")
            second = pool.submit(ask)
            wait_for(lambda: httpx.get(handle.url + "/health").json()["server"]["waiting"] == 1, "the second request")
            with pytest.raises(openai.APIStatusError) as caught:
                ask()
            assert caught.value.status_code == 503
            assert caught.value.response.headers["retry-after"] == "1"
            held.close()
            assert first.result(timeout=TIMEOUT).choices
            assert second.result(timeout=TIMEOUT).choices
    finally:
        held.close()
        handle.stop()


def test_stopping_the_server_ends_running_generations_at_once(global_engine: Engine) -> None:
    handle = serve_in_background(port=0)
    seed = long_answer_seed(global_engine, 1800)
    body = {"model": LONG_MODEL, "prompt": PROMPT, "max_tokens": 1800, "seed": seed, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", handle.base_url + "/completions", json=body, timeout=TIMEOUT) as response:
        lines = response.iter_lines()
        next(lines)
        started = time.monotonic()
        threading.Thread(target=handle.stop).start()
        rest = [line.removeprefix("data: ") for line in lines if line]
    wait_for(lambda: not handle.running, "the server to stop")
    assert time.monotonic() - started < 4
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["error"]["code"] == "server_shutting_down", "the client learns the answer was cut short"
    assert global_engine.stats.snapshot()["last_request"]["finish_reason"] == "cancelled"


# ---------------------------------------------------------------------------------- a real process


def test_python_m_nbllm_server_serves_the_openai_client_and_stops_on_ctrl_c(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    config = tmp_path / "nbllm.yaml"
    models = "\n".join(f"  tiny-{key}: {path}" for key, path in tiny_models.items())
    config.write_text(
        f"default_model: tiny-a\nmodels:\n{models}\nperformance:\n  context_size: 512\n  threads: 1\n"
        "cache:\n  enabled: false\n"
    )
    log = tmp_path / "server.log"
    port = free_port()
    command = [sys.executable, "-m", "nbllm.server", "--config", str(config), "--port", str(port)]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stderr=stderr, stdout=subprocess.DEVNULL, env=os.environ.copy())
    try:
        wait_for(lambda: f"serving at http://127.0.0.1:{port}" in log.read_text(), "the server to start")
        wait_for(lambda: _answers_health(port), "the server to answer")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="tiny-b", messages=HELLO, max_tokens=8, seed=1)
        assert answer.model == "tiny-b"
        stream = client.completions.create(model="tiny-a", prompt=PROMPT, max_tokens=8, seed=1, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices)
        stats = httpx.get(f"http://127.0.0.1:{port}/admin/stats").json()
        assert stats["requests"] == 2
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "Generated 8 tokens in" in text, "the guide's log lines are on the console"
    assert "nbllm: server stopped" in text


def _answers_health(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_python_m_nbllm_server_refuses_a_public_address_without_a_key() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nbllm.server", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NBLLM_API_KEY": ""},
    )
    assert result.returncode == 1
    assert "Refusing to listen on 0.0.0.0 without an API key" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_serve_subcommand_parses_its_options_without_importing_the_server() -> None:
    argv = ["serve", "--host", "0.0.0.0", "-p", "9000", "--api-key", "k", "-w", "3", "--no-batching"]
    argv += ["--max-body-bytes", "4096"]
    code = (
        "import argparse, json, sys\n"
        "from nbllm.cli.serve import add_serve_command\n"
        "from nbllm.server.options import serve_arguments\n"
        "parser = argparse.ArgumentParser()\n"
        "add_serve_command(parser.add_subparsers())\n"
        f"print(json.dumps(serve_arguments(parser.parse_args({argv!r}))))\n"
        "heavy = ('fastapi', 'starlette', 'uvicorn', 'nbllm.engine', 'nbllm.server.app', 'nbllm.server.running')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    options, heavy = map(json.loads, result.stdout.splitlines())
    assert options == {
        "host": "0.0.0.0",
        "port": 9000,
        "api_key": "k",
        "workers": 3,
        "max_tokens_limit": None,
        "max_body_bytes": 4096,
        "batched": False,
        "log_requests": True,
    }
    assert heavy == [], "building the nbllm parser must not import fastapi"


def test_the_server_package_and_its_framework_free_modules_load_no_web_framework() -> None:
    code = (
        "import json, sys\n"
        "import nbllm.server, nbllm.server.addresses, nbllm.server.options\n"
        "print(json.dumps([m for m in ('fastapi', 'starlette', 'uvicorn') if m in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(result.stdout) == [], "import nbllm.server must stay cheap: the web framework loads on serving"
