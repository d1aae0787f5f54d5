"""Remote backends: nbllm on a model served by llama-cpp-python's own OpenAI-compatible server,
started by the test on 127.0.0.1 with a tiny generated model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbllm.core.config import Settings
from nbllm.engine.engine import Engine
from nbllm.core.errors import ModelLoadError, ModelNotFoundError, NbllmError
from tests.servers import free_port


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
        remote_engine.tune("far", progress=False)


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
