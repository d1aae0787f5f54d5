"""``nbllm serve`` under attack and neglect (issue 13, "Server leaks"): requests bounded by time as
well as tokens, clients that leave, names that must not probe the disk, paths that must not leak,
and a key that guards every route.

Real servers on 127.0.0.1 (``serve_in_background`` and a real ``python -m nbllm.server``), real
llama.cpp. A slow prompt is real too: a bigger tiny model (4 layers of 256) reading an
8,000-token prompt on one thread takes seconds, and llama.cpp's abort callback must stop it.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install 'nbllm[server]'")

from nbllm.core import paths
from nbllm.core.config import Settings, validate
from nbllm.core.errors import ConfigError
from nbllm.engine import Engine
from nbllm.server.openai_format import MAX_MODEL_NAME_CHARS, redact_paths
from nbllm.server.options import server_options
from nbllm.server.running import ServerHandle, serve_in_background
from nbllm.testing import make_tiny_model

TIMEOUT = 60.0
HELLO = [{"role": "user", "content": "hello there"}]
SHORT_PROMPT = "Question: what is a model?\nAnswer:"
# About 7,500 tokens (the tiny vocabulary spells most text letter by letter): seconds of prompt
# reading for tiny-slow on one thread. Two of them, so that one never reuses the other's KV cache.
LONG_PROMPT = "the model " * 750
OTHER_LONG_PROMPT = "the cache " * 750


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slow-model")
    return make_tiny_model(
        folder / "tiny-slow.gguf", seed=7, n_embd=256, n_layer=4, n_head=4, n_head_kv=4, n_ff=1024, context_length=8192
    )


@pytest.fixture
def settings(settings: Settings, slow_model: Path) -> Settings:
    """The suite's tiny models plus tiny-slow, a context that holds the long prompt, one thread."""
    return settings.merged(
        {
            "models": {"tiny-slow": str(slow_model)},
            "performance": {"context_size": 8192, "threads": 1},
        }
    )


@pytest.fixture
def server(global_engine: Engine) -> Iterator[ServerHandle]:
    handle = serve_in_background(port=0, workers=2)
    yield handle
    handle.stop()


def post(server: ServerHandle, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=TIMEOUT, **kwargs)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    return error


def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> float:
    """Seconds it took ``condition`` to hold."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic() - started


def queue_state(server: ServerHandle) -> dict[str, int]:
    state: dict[str, int] = httpx.get(server.url + "/health", timeout=TIMEOUT).json()["server"]
    return state


def send(server: ServerHandle, path: str, body: Any) -> http.client.HTTPConnection:
    """A request sent and not read: ``close()`` the connection to hang up, or ``getresponse()``."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    return connection


def local_paths(*extra: Path) -> list[str]:
    """Folders whose names must never appear in an answer."""
    home = os.environ.get("NBLLM_HOME")
    found = [str(paths.models_dir()), os.getcwd(), str(Path.home()), *(str(p) for p in extra)]
    return [p for p in [*found, home] if p and p != "/"]


def assert_no_local_path(text: str, *extra: Path) -> None:
    for folder in local_paths(*extra):
        assert folder not in text, f"{folder} leaked into {text!r}"


def assert_still_serving(server: ServerHandle, model: str = "tiny-a") -> float:
    """Seconds a short answer took."""
    started = time.monotonic()
    answer = post(server, "/v1/chat/completions", {"model": model, "messages": HELLO, "max_tokens": 4, "seed": 1})
    assert answer.status_code == 200, answer.text
    return time.monotonic() - started


# ------------------------------------------------------------------------ names and paths


def test_a_model_name_longer_than_the_bound_is_a_400_that_names_no_path(server: ServerHandle) -> None:
    for name in ("x" * 100_000, "é" * (MAX_MODEL_NAME_CHARS + 1)):
        for path in ("/v1/chat/completions", "/v1/completions"):
            body = {"model": name, "messages": HELLO, "prompt": "hi"}
            body.pop("prompt" if path.endswith("chat/completions") else "messages")
            response = post(server, path, body)
            assert response.status_code == 400, response.text[:300]
            error = error_of(response)
            assert (error["param"], error["code"]) == ("model", "model_name_too_long")
            assert f"at most {MAX_MODEL_NAME_CHARS}" in error["message"]
            assert len(response.text) < 1000, "the name is not echoed back"
            assert_no_local_path(response.text)
    retrieved = httpx.get(f"{server.base_url}/models/{'y' * 300}", timeout=TIMEOUT)
    assert retrieved.status_code == 400
    assert error_of(retrieved)["code"] == "model_name_too_long"
    assert_still_serving(server)


def test_names_that_exist_on_disk_get_the_answer_of_names_that_exist_nowhere(
    home: Path, server: ServerHandle, tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's working folder holds a config file, a folder and a real model file.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("performance: {threads: 1}\n")
    (tmp_path / "somewhere").mkdir()
    shutil.copy(tiny_models["a"], tmp_path / "model.gguf")
    on_disk = [
        "config.yaml",
        "..",
        ".",
        "somewhere",
        "model.gguf",
        "./model.gguf",
        str(tmp_path / "model.gguf"),
        str(tmp_path),
        "/etc/passwd",
        "/etc",
        "~",
        "$HOME",
        f"../{tmp_path.name}/config.yaml",
    ]
    nowhere = ["nowhere-at-all", "nowhere/at/all.gguf", "~/nowhere.gguf", "é" * MAX_MODEL_NAME_CHARS, "a\x00b"]

    def answer(name: str) -> tuple[int, dict[str, Any]]:
        response = post(server, "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2})
        error = error_of(response)
        # The name itself is echoed back; everything else must be the same for every name.
        return response.status_code, {**error, "message": error["message"].replace(repr(name), "NAME")}

    reference = answer("no-such-model")
    assert reference[0] == 404
    assert reference[1]["code"] == "model_not_found"
    assert "by name, not by file path" in reference[1]["message"]
    for name in on_disk + nowhere:
        assert answer(name) == reference, name
    for name in ("config.yaml", "somewhere", "model.gguf", "nowhere-at-all"):  # ".." would be normalised away
        retrieved = httpx.get(f"{server.base_url}/models/{name}", timeout=TIMEOUT)
        assert retrieved.status_code == 404, name
        assert error_of(retrieved)["message"].replace(repr(name), "NAME") == reference[1]["message"], name
    # The same name, with and without a file of that name in the working folder: one answer.
    before = answer("config.yaml")
    (tmp_path / "config.yaml").unlink()
    assert answer("config.yaml") == before
    assert_still_serving(server)


def test_error_bodies_never_show_local_paths(
    global_engine: Engine, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    broken = tmp_path / "secret-folder" / "broken.gguf"
    broken.parent.mkdir()
    broken.write_bytes(b"GGUF" + os.urandom(200))
    global_engine.configure(models={"ghost": str(tmp_path / "secret-folder" / "ghost.gguf"), "broken": str(broken)})
    with serve_in_background(port=0) as server:
        ghost = post(server, "/v1/completions", {"model": "ghost", "prompt": "hi", "max_tokens": 2})
        assert ghost.status_code == 404
        assert ".../ghost.gguf" in error_of(ghost)["message"], "the file's name is still there to help"
        bad = post(server, "/v1/completions", {"model": "broken", "prompt": "hi", "max_tokens": 2})
        assert bad.status_code >= 500
        assert ".../broken.gguf" in error_of(bad)["message"]
        for response in (ghost, bad):
            assert_no_local_path(response.text, tmp_path)
            assert "secret-folder" not in response.text
        assert_still_serving(server)


def test_local_paths_are_cut_to_file_names_and_urls_are_left_alone() -> None:
    assert (
        redact_paths("Model 'x' is configured as /home/u/models/x.gguf, which does not exist. Fix it in ~/cfg/a.yaml.")
        == "Model 'x' is configured as .../x.gguf, which does not exist. Fix it in .../a.yaml."
    )
    assert redact_paths("File name too long: '/srv/m/abc.gguf'") == "File name too long: '.../abc.gguf'"
    assert redact_paths(r"Cannot load C:\Users\me\m.gguf now") == "Cannot load .../m.gguf now"
    kept = "Cannot reach http://gpu-box:8080/v1/chat/completions: 12.5 t/s, 1/2 done"
    assert redact_paths(kept) == kept


# ------------------------------------------------------------------------ the API key, everywhere


@pytest.fixture
def keyed_server(global_engine: Engine) -> Iterator[ServerHandle]:
    handle = serve_in_background(port=0, api_key="sekrit-key")
    yield handle
    handle.stop()


def test_with_an_api_key_the_schema_the_docs_and_unknown_urls_want_it_too(keyed_server: ServerHandle) -> None:
    url = keyed_server.url
    key = {"Authorization": "Bearer sekrit-key"}
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/no/such/page", "/"):
        missing = httpx.get(url + path, timeout=TIMEOUT)
        assert missing.status_code == 401, path
        assert error_of(missing)["code"] == "missing_api_key", path
        wrong = httpx.get(url + path, headers={"Authorization": "Bearer guess"}, timeout=TIMEOUT)
        assert wrong.status_code == 401, path
        assert error_of(wrong)["code"] == "invalid_api_key", path
    schema = httpx.get(url + "/openapi.json", headers=key, timeout=TIMEOUT)
    assert schema.status_code == 200
    assert "/v1/chat/completions" in schema.json()["paths"]
    for page in ("/docs", "/redoc"):  # a browser cannot send the key with the schema request they make
        assert httpx.get(url + page, headers=key, timeout=TIMEOUT).status_code == 404, page


def test_without_a_key_the_docs_are_for_local_callers_only(server: ServerHandle) -> None:
    assert httpx.get(server.url + "/docs", timeout=TIMEOUT).status_code == 200
    assert httpx.get(server.url + "/openapi.json", timeout=TIMEOUT).status_code == 200
    for headers in ({"Origin": "https://evil.example"}, {"Host": "evil.example"}):
        for path in ("/docs", "/openapi.json", "/no/such/page"):
            assert httpx.get(server.url + path, headers=headers, timeout=TIMEOUT).status_code == 403, (headers, path)


# ------------------------------------------------------------------------ time limits and clients that leave


_measured: dict[str, float] = {}


@pytest.fixture
def prompt_seconds(global_engine: Engine) -> float:
    """How long tiny-slow takes to read a long prompt when nothing stops it (measured here, once
    per session: the tests compare against it rather than against absolute times). The model is
    loaded, so that no test's timing includes the load."""
    global_engine.registry.load("tiny-slow")
    if "prompt" not in _measured:
        started = time.monotonic()
        global_engine.generate(OTHER_LONG_PROMPT, model="tiny-slow", max_tokens=1, seed=1)
        _measured["prompt"] = time.monotonic() - started
    seconds = _measured["prompt"]
    assert seconds > 2.0, f"the long prompt took only {seconds:.2f}s: make it longer for these tests to mean anything"
    return seconds


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_stuck_reading_its_prompt_is_stopped_at_the_timeout_and_the_model_is_free(
    global_engine: Engine, prompt_seconds: float, stream: bool
) -> None:
    limit = 0.5
    with serve_in_background(port=0, batched=False, request_timeout=limit) as server:
        started = time.monotonic()
        body = {"model": "tiny-slow", "prompt": LONG_PROMPT, "max_tokens": 2, "stream": stream}
        response = post(server, "/v1/completions", body)
        answered = time.monotonic() - started
        assert response.status_code == 504, response.text
        assert response.headers["x-should-retry"] == "false", "the OpenAI clients would send it again"
        error = error_of(response)
        assert (error["type"], error["code"]) == ("server_error", "request_timeout")
        assert "server.request_timeout" in error["message"]
        assert answered < prompt_seconds / 2
        freed = wait_for(lambda: queue_state(server)["running"] == 0, "the model to be free")
        assert answered + freed < prompt_seconds / 2, "llama.cpp stopped reading the prompt"
        last = global_engine.stats.snapshot()["last_request"]
        assert (last["model"], last["finish_reason"], last["completion_tokens"]) == ("tiny-slow", "cancelled", 0)
        assert assert_still_serving(server, "tiny-slow") < prompt_seconds / 2


def test_a_request_waiting_for_a_busy_model_times_out_and_leaves_no_trace(global_engine: Engine) -> None:
    # A notebook cell holds tiny-a (an unfinished stream holds its lock): the server's request for
    # it waits inside the engine, a request for tiny-b waits for the one worker.
    with serve_in_background(port=0, workers=1, batched=False, request_timeout=1.0) as server:
        held = global_engine.generate(SHORT_PROMPT, model="tiny-a", stream=True, max_tokens=50, seed=1)
        next(held)
        try:
            with ThreadPoolExecutor(2) as pool:
                body = {"prompt": SHORT_PROMPT, "max_tokens": 3}
                first = pool.submit(post, server, "/v1/completions", {**body, "model": "tiny-a"})
                wait_for(lambda: queue_state(server)["running"] == 1, "the first request to run")
                second = pool.submit(post, server, "/v1/completions", {**body, "model": "tiny-b"})
                assert first.result(TIMEOUT).status_code == 504
                assert second.result(TIMEOUT).status_code == 504
            assert queue_state(server)["waiting"] == 0
        finally:
            held.close()
        wait_for(lambda: queue_state(server)["running"] == 0, "the abandoned request to end")
        assert_still_serving(server)
        assert_still_serving(server, "tiny-b")


def long_answer_seed(engine: Engine, model: str, max_tokens: int) -> int:
    for seed in range(40):
        stats = engine.generate(SHORT_PROMPT, model=model, max_tokens=max_tokens, seed=seed, temperature=1.0).stats
        if stats.finish_reason == "length":
            return seed
    pytest.fail("no seed gives a long answer")


@pytest.mark.parametrize(("stream", "batched"), [(False, True), (True, False)], ids=["whole-batched", "streamed"])
def test_an_answer_that_runs_past_the_timeout_is_cut_off_with_a_clear_error(
    global_engine: Engine, stream: bool, batched: bool
) -> None:
    max_tokens = 4000
    seed = long_answer_seed(global_engine, "tiny-b", max_tokens)
    alone = global_engine.generate(SHORT_PROMPT, model="tiny-b", max_tokens=max_tokens, seed=seed, temperature=1.0)
    assert alone.stats.total_seconds > 20 * alone.stats.time_to_first_token
    limit = alone.stats.total_seconds / 4
    body = {"model": "tiny-b", "prompt": SHORT_PROMPT, "max_tokens": max_tokens, "seed": seed, "temperature": 1.0}
    with serve_in_background(port=0, batched=batched, request_timeout=limit) as server:
        started = time.monotonic()
        if stream:
            streamed = {**body, "stream": True}
            with httpx.stream("POST", server.base_url + "/completions", json=streamed, timeout=TIMEOUT) as response:
                assert response.status_code == 200
                events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "request_timeout"
            text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
            assert text, "the answer's beginning arrived before the limit"
            assert alone.text.startswith(text)
        else:
            response = post(server, "/v1/completions", body)
            assert response.status_code == 504
            assert error_of(response)["code"] == "request_timeout"
        assert time.monotonic() - started < alone.stats.total_seconds * 0.75
        wait_for(lambda: queue_state(server)["running"] == 0, "the generation to stop")
        last = global_engine.stats.snapshot()["last_request"]
        assert last["finish_reason"] == "cancelled"
        assert last["completion_tokens"] < max_tokens


def test_clients_that_leave_while_waiting_or_while_the_prompt_is_read_free_the_model_at_once(
    global_engine: Engine, prompt_seconds: float
) -> None:
    with serve_in_background(port=0, workers=1, batched=False, request_timeout=0) as server:
        reading = send(server, "/v1/completions", {"model": "tiny-slow", "prompt": LONG_PROMPT, "max_tokens": 2})
        wait_for(lambda: queue_state(server)["running"] == 1, "the long prompt to be read")
        waiting = send(server, "/v1/completions", {"model": "tiny-slow", "prompt": SHORT_PROMPT, "max_tokens": 2})
        wait_for(lambda: queue_state(server)["waiting"] == 1, "the second request to wait")
        started = time.monotonic()
        waiting.close()
        wait_for(lambda: queue_state(server)["waiting"] == 0, "the waiting request to go")
        assert queue_state(server)["running"] == 1, "the first one is still reading its prompt"
        reading.close()
        wait_for(lambda: queue_state(server)["running"] == 0, "the model to be free")
        assert time.monotonic() - started < prompt_seconds / 2, "llama.cpp stopped reading the prompt"
        last = global_engine.stats.snapshot()["last_request"]
        assert (last["model"], last["finish_reason"]) == ("tiny-slow", "cancelled")
        assert assert_still_serving(server, "tiny-slow") < prompt_seconds / 2
        assert queue_state(server)["served"] == 2, "the request that left while waiting never ran"


def test_in_a_batch_a_client_that_leaves_while_its_prompt_is_read_frees_the_model_at_once(
    global_engine: Engine, prompt_seconds: float
) -> None:
    global_engine.configure(performance={"parallel": 2, "parallel_context_size": 8192})
    global_engine.registry.load("tiny-slow")
    with serve_in_background(port=0, workers=1, batched=True, request_timeout=0) as server:
        reading = send(server, "/v1/completions", {"model": "tiny-slow", "prompt": LONG_PROMPT, "max_tokens": 2})
        wait_for(lambda: queue_state(server)["running"] == 1, "the long prompt to be read")
        time.sleep(0.2)  # the batch loop has started on it
        started = time.monotonic()
        reading.close()
        wait_for(lambda: queue_state(server)["running"] == 0, "the model to be free")
        assert time.monotonic() - started < prompt_seconds / 2


def test_a_body_that_never_finishes_arriving_is_a_408(global_engine: Engine) -> None:
    with serve_in_background(port=0, request_timeout=0.5) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
        connection.putrequest("POST", "/v1/completions")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", "1000")
        connection.endheaders(b'{"model": "tiny-a", ')
        started = time.monotonic()
        response = connection.getresponse()
        assert response.status == 408
        assert json.loads(response.read())["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 10
        connection.close()
        assert_still_serving(server)


# ------------------------------------------------------------------------ the setting and the flag


def test_the_timeout_comes_from_the_config_the_flag_or_the_call() -> None:
    assert Settings().server.request_timeout == 600.0
    assert server_options(Settings()).request_timeout == 600.0
    configured = validate({"server": {"request_timeout": 30}})
    assert server_options(configured).request_timeout == 30.0
    assert server_options(configured, request_timeout=5).request_timeout == 5.0
    assert server_options(configured, request_timeout=0).request_timeout is None, "0: no limit"
    assert server_options(validate({"server": {"request_timeout": None}})).request_timeout is None
    with pytest.raises(ConfigError, match=r"server\.request_timeout = 0"):
        validate({"server": {"request_timeout": 0}})
    with pytest.raises(ConfigError, match="request_timeout = -1"):
        server_options(Settings(), request_timeout=-1)


def test_nbllm_serve_takes_request_timeout() -> None:
    code = (
        "import argparse, json\n"
        "from nbllm.cli.serve import add_serve_command\n"
        "from nbllm.server.options import serve_arguments\n"
        "parser = argparse.ArgumentParser()\n"
        "add_serve_command(parser.add_subparsers())\n"
        "print(json.dumps(serve_arguments(parser.parse_args(['serve', '--request-timeout', '2.5']))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(result.stdout)["request_timeout"] == 2.5
    refused = subprocess.run(
        [sys.executable, "-m", "nbllm.server", "--port", "0", "--request-timeout", "-3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "request_timeout = -3: must be seconds above 0" in refused.stderr
    assert "Traceback" not in refused.stderr
