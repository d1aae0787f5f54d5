"""The public API: small, fast to import, free of front-end libraries, errors that say what to do."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import subprocess
import sys

import pytest

import nbllm
from nbllm.engine import Completion, Engine, Stream


def test_import_is_light_and_pulls_no_front_end_or_llama_cpp() -> None:
    code = (
        "import sys, nbllm; "
        "heavy = [m for m in ('llama_cpp', 'IPython', 'ipywidgets', 'plotly', 'numpy') if m in sys.modules]; "
        "print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# Which modules may import IPython, ipywidgets, plotly, tqdm and llama_cpp: tests/test_architecture.py.


def test_public_functions_survive_importing_every_submodule() -> None:
    # Importing a submodule sets an attribute of the same name on the package; a module named
    # like a public function (stats.py vs nbllm.stats()) would silently replace the function.
    for module in pkgutil.walk_packages(nbllm.__path__, "nbllm."):
        if module.name.startswith(("nbllm.notebook", "nbllm.server")) or module.name.endswith("__main__"):
            continue  # front ends with optional extras (fastapi) and display libraries; programs
        importlib.import_module(module.name)
    for name in nbllm.__all__:
        value = getattr(nbllm, name)
        assert callable(value), f"nbllm.{name} is {value!r}"


def test_errors_are_exceptions_not_base_exceptions() -> None:
    assert issubclass(nbllm.NbllmError, Exception)
    for name in nbllm.__all__:
        value = getattr(nbllm, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, nbllm.NbllmError)
    assert issubclass(nbllm.ParameterError, ValueError)


def test_generate_chat_stats_and_models_through_the_facade(global_engine: Engine) -> None:
    completion = nbllm.generate("the", max_tokens=4, seed=1)
    assert isinstance(completion, Completion)
    stream = nbllm.chat("hello", stream=True, max_tokens=4, seed=1)
    assert isinstance(stream, Stream)
    assert stream.result().stats.model == "tiny-a"
    stats = nbllm.stats()
    assert stats["requests"] == 2
    table = nbllm.models()
    assert any(row["name"] == "tiny-a" and row["resident"] for row in table)
    assert "tiny-a" in str(table)
    assert "<table>" in table._repr_html_()
    assert nbllm.health()["resident_models"][0]["name"] == "tiny-a"
    assert nbllm.unload("tiny-a") is True
    assert nbllm.load("tiny-b")
    assert [r.name for r in global_engine.registry.resident()] == ["tiny-b"]
    assert nbllm.unload() is True
    assert global_engine.registry.resident() == []


def test_completion_renders_as_markdown_with_its_stats(global_engine: Engine) -> None:
    completion = nbllm.generate("the", max_tokens=4, seed=1)
    markdown = completion._repr_markdown_()
    assert markdown.startswith(completion.text)
    assert "Generated" in markdown


def test_log_lines_use_the_guides_words(global_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nbllm"):
        nbllm.generate("the", max_tokens=3, seed=1)
        nbllm.generate("the", max_tokens=3, seed=1)
    messages = [r.getMessage() for r in caplog.records if r.name == "nbllm"]
    assert any(m.startswith("Model loaded in ") for m in messages)
    assert "Using cached model: tiny-a" in messages
    assert any(m.startswith("Generated 3 tokens in ") and m.endswith(" t/s)") for m in messages)


def test_llama_cpp_chatter_is_off_by_default_and_routed_to_logging(
    global_engine: Engine, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    nbllm.generate("the", max_tokens=2, seed=1)
    captured = capfd.readouterr()
    assert "llama_model_loader" not in captured.err + captured.out
    assert "llama_context" not in captured.err + captured.out
    nbllm.unload()
    nbllm.configure(logging={"llama_cpp": "DEBUG"})
    with caplog.at_level(logging.DEBUG, logger="nbllm.llama_cpp"):
        nbllm.generate("the", max_tokens=2, seed=1)
    routed = [r.getMessage() for r in caplog.records if r.name == "nbllm.llama_cpp"]
    assert any("llama_model_loader" in m or "load_tensors" in m for m in routed)
    captured = capfd.readouterr()
    assert "llama_model_loader" not in captured.err, "routed to logging, not printed"
