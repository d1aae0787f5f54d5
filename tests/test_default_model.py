"""Integration: the real default model (Gemma 3 270M Q4_K_M), as a new user meets it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nbllm.engine import Engine

pytestmark = pytest.mark.default_model


def test_the_default_model_answers_a_question_sensibly(default_engine: Engine) -> None:
    result = default_engine.chat("What is Docker?", max_tokens=80, seed=2)
    text = result.text
    assert text, "an empty answer"
    assert text == text.strip()
    assert "Question:" not in text, "the transcript's stop sequence ended the answer"
    assert "docker" in text.lower() or "container" in text.lower(), text
    assert result.stats.model == "gemma-3-270m"
    assert result.stats.completion_tokens > 5


def test_streaming_on_the_default_model_is_incremental(default_engine: Engine) -> None:
    stream = default_engine.generate("Question: What is Python?\nAnswer:", stream=True, max_tokens=24, seed=1)
    pieces = list(stream)
    assert len(pieces) >= 10, "tokens arrive one by one, not as one block"
    assert stream.stats is not None
    assert stream.stats.time_to_first_token < stream.stats.total_seconds


def test_greedy_answers_are_deterministic(default_engine: Engine) -> None:
    prompt = "Question: What is the capital of France?\nAnswer:"
    first = default_engine.generate(prompt, max_tokens=8, temperature=0, stop=["\n"]).text
    second = default_engine.generate(prompt, max_tokens=8, temperature=0, stop=["\n"]).text
    assert first == second
    assert "Paris" in first


def test_a_follow_up_question_reuses_the_shared_prefix(default_engine: Engine) -> None:
    history = [{"role": "system", "content": "You are a concise assistant. " * 20}]
    default_engine.chat([*history, {"role": "user", "content": "What is Docker?"}], max_tokens=4, seed=1)
    second = default_engine.chat([*history, {"role": "user", "content": "What is Git?"}], max_tokens=4, seed=1)
    assert second.stats.reused_prompt_tokens > 100


def test_ctrl_c_while_a_long_prompt_is_read_stops_within_a_step(default_engine: Engine) -> None:
    """A real SIGINT (what Ctrl-C and Jupyter's interrupt send) during the prompt: llama.cpp's
    abort callback ends the decode in progress instead of reading the whole prompt first, and
    the model answers the same prompt exactly as before afterwards."""
    prompt = "Green frogs sing loudly near the quiet pond at night. " * 130 + "Summarize."

    def read_from_scratch(interrupt_after: float | None = None) -> tuple[float, str | None]:
        default_engine.generate("An unrelated prompt.", max_tokens=1, cache=False)  # replaces the KV...
        default_engine.clear_cache()  # ...and this drops the snapshot taken of the long prompt
        if interrupt_after is not None:
            threading.Timer(interrupt_after, os.kill, (os.getpid(), signal.SIGINT)).start()
        started = time.perf_counter()
        try:
            text = default_engine.generate(prompt, max_tokens=6, temperature=0, cache=False).text
        except KeyboardInterrupt:
            return time.perf_counter() - started, None
        return time.perf_counter() - started, text

    full_seconds, reference = read_from_scratch()
    interrupted_seconds, nothing = read_from_scratch(interrupt_after=full_seconds * 0.1)
    assert nothing is None, "the interrupt arrived after the answer: make the prompt longer"
    assert interrupted_seconds < full_seconds * 0.5, (interrupted_seconds, full_seconds)
    # Straight after the abort, with whatever it left in the KV cache: the same answer.
    after = default_engine.generate(prompt, max_tokens=6, temperature=0, cache=False).text
    assert after == reference, "the KV cache and llama-cpp-python agree after the abort"


def test_the_readme_main_job_runs_in_a_terminal(default_model_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nbllm.cli", "run", "What is Docker?", "--max-tokens", "60", "--seed", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 20
    stats_line = result.stderr.strip().splitlines()[-1]
    assert stats_line.startswith("Generated ")
    assert "model gemma-3-270m" in stats_line
