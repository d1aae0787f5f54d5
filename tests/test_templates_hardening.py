"""Hostile and broken chat templates, prompts too large to tokenize, and damaged model files
(issue 13, items 1, 2 and 7): each case reproduced with real llama.cpp on tiny generated GGUFs,
through the Python API, ``generate_many``, the console script and a real server on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import nbllm
from nbllm.core import chat_template
from nbllm.core.chat_format import FormattedPrompt
from nbllm.core.chat_template import ChatTemplate, ChatTemplateWarning
from nbllm.core.config import Settings
from nbllm.core.errors import ChatTemplateError, ContextLengthError, GenerationError, ModelLoadError
from nbllm.engine import Engine
from nbllm.testing import GEMMA_LIKE_TEMPLATE, make_tiny_model

HELLO = [{"role": "user", "content": "hello there"}]
SYNTAX_ERROR = "{% for m in messages %}{{ m['content'] }"  # the example: '}' where '%}' belongs
LOOPING = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HUGE_STRING = "{{ 'x' * 400000000 }}"
# No loop at all: 2**40 macro calls, so only the deadline can stop it.
EXPONENTIAL = "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}"
REFUSES_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    + GEMMA_LIKE_TEMPLATE
)
MISSING_TENSOR = "blk.1.ffn_down.weight"


@pytest.fixture(scope="session")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile-models")
    templates = {
        "syntax-error": SYNTAX_ERROR,
        "looping": LOOPING,
        "huge-string": HUGE_STRING,
        "exponential": EXPONENTIAL,
        "refuses-system": REFUSES_SYSTEM,
    }
    models = {
        name: make_tiny_model(folder / f"{name}.gguf", seed=7, chat_template=template)
        for name, template in templates.items()
    }
    models["missing-tensor"] = make_tiny_model(folder / "missing-tensor.gguf", seed=7, omit_tensors={MISSING_TENSOR})
    return models


@pytest.fixture
def settings(settings: Settings, hostile: dict[str, Path]) -> Settings:
    """The suite's tiny models plus the hostile ones, by name (the server serves names only)."""
    return settings.merged({"models": {name: str(path) for name, path in hostile.items()}})


def render_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "nbllm-chat-template" and t.is_alive()]


def wait_until(condition: Any, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


# ---------------------------------------------------------------------------------- item 1: syntax errors


def test_a_template_with_a_syntax_error_fails_the_load_with_a_chat_template_error_naming_the_file(
    global_engine: Engine, hostile: dict[str, Path]
) -> None:
    path = str(hostile["syntax-error"])
    for call in (lambda: nbllm.chat(HELLO, model=path, max_tokens=4), lambda: nbllm.load(path)):
        with pytest.raises(ChatTemplateError) as caught:
            call()
        message = str(caught.value)
        assert "syntax-error.gguf" in message
        assert "does not compile: unexpected '}' (template line 1)" in message
        assert "gguf-new-metadata" in message, "the error says what to do next"
        assert isinstance(caught.value, ModelLoadError)
    assert global_engine.registry.resident() == [], "nothing half-loaded stays behind"
    assert nbllm.chat(HELLO, model="tiny-chat", max_tokens=4, seed=1).stats.completion_tokens >= 1


@pytest.mark.timeout(60)
def test_generate_many_on_a_model_whose_template_does_not_compile_returns_the_error_at_once(
    engine: Engine, hostile: dict[str, Path]
) -> None:
    path = str(hostile["syntax-error"])
    started = time.perf_counter()
    results = engine.generate_many(["hi", "there"], model=path, progress=False)
    chats = engine.chat_many(["hi"], model=path, progress=False)
    assert time.perf_counter() - started < 30
    for result in [*results, *chats]:
        assert isinstance(result.error, ChatTemplateError)
        assert "syntax-error.gguf" in str(result.error)
    assert [r.ok for r in engine.generate_many(["hi"], model="tiny-a", progress=False, max_tokens=2)] == [True]


def nbllm_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbllm.cli", "run", *args, "-n", "4", "--seed", "1", "--no-cache"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ("syntax-error", "does not compile: unexpected '}' (template line 1)"),
        ("huge-string", "would make a value of 400,000,000 characters or items (with *"),
        ("missing-tensor", f"tensor '{MISSING_TENSOR}' not found"),
    ],
)
def test_nbllm_run_reports_a_broken_model_file_in_one_line_and_exits_1(
    hostile: dict[str, Path], model: str, fragment: str
) -> None:
    result = nbllm_run("hi", "--model", str(hostile[model]))
    assert result.returncode == 1, result.stderr  # not a crash (-6, std::bad_alloc), not a traceback
    line = result.stderr.strip()
    assert "\n" not in line, result.stderr
    assert line.startswith("nbllm: error: "), line
    assert f"{model}.gguf" in line
    assert fragment in line


# ---------------------------------------------------------------------------------- item 2: loops, huge strings


def test_a_looping_template_is_stopped_by_its_loop_budget_long_before_the_deadline(
    engine: Engine, hostile: dict[str, Path]
) -> None:
    engine.registry.load(str(hostile["looping"]))  # it compiles: the loop only shows when it runs
    started = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=r"looping\.gguf would loop more than [\d,]+ times"):
        engine.chat(HELLO, model=str(hostile["looping"]), max_tokens=4)
    assert time.perf_counter() - started < chat_template.SECONDS
    assert not engine.registry.resident()[0].lock.locked(), "the model is free for the next request"
    assert wait_until(lambda: not render_threads())


def test_a_template_that_never_ends_is_stopped_at_the_deadline_and_its_thread_ends_too(
    engine: Engine, hostile: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat_template, "SECONDS", 0.5)
    path = str(hostile["exponential"])
    started = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=r"exponential\.gguf did not finish within 0\.5 s"):
        engine.chat(HELLO, model=path, max_tokens=4)
    assert time.perf_counter() - started < 5  # the load plus the deadline, not 2**40 macro calls
    assert wait_until(lambda: not render_threads()), "the render thread was stopped, not left burning CPU"
    results = engine.chat_many([HELLO], model=path, progress=False)  # the batched path: the same
    assert isinstance(results[0].error, ChatTemplateError)
    assert engine.chat(HELLO, model="tiny-chat", max_tokens=2, seed=1).text is not None


def test_a_template_that_builds_a_huge_string_is_refused_before_allocating_it(
    engine: Engine, hostile: dict[str, Path]
) -> None:
    path = str(hostile["huge-string"])
    started = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="would make a value of 400,000,000 characters"):
        engine.chat(HELLO, model=path, max_tokens=4)
    results = engine.chat_many([HELLO, HELLO], model=path, progress=False)
    assert all(isinstance(r.error, ChatTemplateError) for r in results)
    assert time.perf_counter() - started < 10


def test_a_prompt_too_large_for_the_context_is_refused_without_tokenizing_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    resident = engine.registry.load("tiny-a")
    llm = resident.model._llm
    calls: list[int] = []
    tokenize = llm.tokenize
    monkeypatch.setattr(llm, "tokenize", lambda *a, **k: calls.append(1) or tokenize(*a, **k))
    huge = "the quick brown fox " * 2_500_000  # 50 MB: once aborted the process in llama.cpp's tokenizer
    with pytest.raises(ContextLengthError) as caught:
        engine.generate(huge, model="tiny-a", max_tokens=4)
    assert str(caught.value) == (
        "The prompt is at least 4,166,667 tokens but the context holds 512 (50,000,000 characters; no token of "
        "tiny-a.gguf covers more than 12 bytes). tiny-a.gguf was trained for at most 2,048 tokens: shorten the prompt."
    )
    assert calls == []
    result = engine.generate_many([huge], model="tiny-a", progress=False)[0]
    assert isinstance(result.error, ContextLengthError)
    assert "tokens but a batched sequence holds" in str(result.error)
    assert calls == []
    with pytest.raises(ContextLengthError):  # a chat's text goes through the template first
        engine.chat([{"role": "user", "content": huge}], model="tiny-chat", max_tokens=4)
    assert engine.generate("the", model="tiny-a", max_tokens=2, seed=1).stats.completion_tokens >= 1
    assert calls, "ordinary prompts are tokenized as before"


def test_the_length_check_refuses_only_what_the_longest_token_cannot_make_fit(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound is the context times the vocabulary's longest token (12 bytes, "▁Assistant"):
    anything up to it is tokenized and judged by its tokens, only what is longer is refused unread."""
    from nbllm.backends import llama_cpp as backend

    monkeypatch.setattr(backend, "_ROUGH_BYTES_PER_TOKEN", 1)  # compare every prompt with the longest token
    resident = engine.registry.load("tiny-a")
    llm = resident.model._llm
    calls: list[int] = []
    tokenize = llm.tokenize
    monkeypatch.setattr(llm, "tokenize", lambda *a, **k: calls.append(1) or tokenize(*a, **k))
    fits = "x" * 500
    assert resident.model.count_tokens(FormattedPrompt(fits)) < 512
    assert engine.generate(fits, model="tiny-a", max_tokens=2, seed=1).stats.completion_tokens >= 1
    with pytest.raises(ContextLengthError, match="tokens but the context holds 512"):  # read, then refused
        engine.generate("x" * (512 * 12), model="tiny-a", max_tokens=2)
    read = len(calls)
    with pytest.raises(ContextLengthError, match=r"at least 513 tokens but the context holds 512 \(6,145 characters;"):
        engine.generate("x" * (512 * 12 + 1), model="tiny-a", max_tokens=2)
    assert len(calls) == read, "refused unread"


# ---------------------------------------------------------------------------------- the server


@pytest.fixture
def server(global_engine: Engine) -> Iterator[Any]:
    pytest.importorskip("fastapi", reason="the server extra is not installed")
    from nbllm.server.running import serve_in_background

    handle = serve_in_background(port=0, workers=2)
    yield handle
    handle.stop()


@pytest.mark.timeout(180)
def test_the_server_answers_an_error_for_a_broken_template_and_goes_on_serving_other_models(server: Any) -> None:
    import httpx

    def ask(model: str, kind: str = "chat") -> httpx.Response:
        body: dict[str, Any] = {"model": model, "max_tokens": 4, "seed": 1}
        if kind == "chat":
            body["messages"] = HELLO
            return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        body["prompt"] = "Question: what is a model?\nAnswer:"
        return httpx.post(server.url + "/v1/completions", json=body, timeout=60)

    with ThreadPoolExecutor(4) as pool:  # concurrent requests for the broken model: none hangs
        answers = list(pool.map(ask, ["syntax-error"] * 3 + ["looping"], ["chat", "chat", "completion", "chat"]))
    for response, fragment in zip(answers, ["does not compile"] * 3 + ["would loop more than"], strict=True):
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert fragment in error["message"]
        assert error["code"] == "model_load_failed"
    health = httpx.get(server.url + "/health", timeout=60).json()
    assert health["server"]["running"] == 0
    assert health["server"]["waiting"] == 0
    served = ask("tiny-a")
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------------------------- item 7: load errors, fallback


def test_a_missing_tensor_is_named_in_the_load_error_as_llama_cpp_reports_it(
    engine: Engine, hostile: dict[str, Path]
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        engine.generate("hi", model=str(hostile["missing-tensor"]), max_tokens=2)
    message = str(caught.value)
    assert f"llama.cpp could not load missing-tensor.gguf: tensor '{MISSING_TENSOR}' not found." in message
    assert "damaged or incomplete" in message
    assert "newer architecture" not in message


def test_a_template_that_refuses_a_conversation_falls_back_to_the_transcript_with_one_warning(
    engine: Engine, hostile: dict[str, Path]
) -> None:
    path = str(hostile["refuses-system"])
    system = [{"role": "system", "content": "Be brief."}, *HELLO]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            answer = engine.chat(system, model=path, max_tokens=4, seed=1)
            assert answer.stats.completion_tokens >= 0
        engine.chat_many([system, system], model=path, progress=False, max_tokens=2)
        engine.chat(HELLO, model=path, max_tokens=2, seed=1)  # no system message: the template applies
        resident = engine.registry.resident()[0]
        assert resident.model.format_chat(system).text == "Be brief.\n\nQuestion: hello there\nAnswer:"
        assert resident.model.format_chat(HELLO).text.startswith("<s><start_of_turn>user")
    shown = [w for w in caught if issubclass(w.category, ChatTemplateWarning)]
    assert len(shown) == 1, [str(w.message) for w in caught]
    assert str(shown[0].message) == (
        "refuses-system.gguf's chat template failed (System role not supported); this chat is formatted as a "
        "plain transcript instead."
    )
    assert shown[0].filename == "<refuses-system.gguf chat template>"


def test_the_fallback_warning_is_one_line_once_in_the_console(hostile: dict[str, Path]) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbllm.cli",
            "run",
            "hi",
            "--system",
            "Be brief.",
            "--model",
            str(hostile["refuses-system"]),
            "-n",
            "4",
            "--seed",
            "1",
            "--no-cache",
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "chat template" in line]
    assert lines == [
        "<refuses-system.gguf chat template>:1: ChatTemplateWarning: refuses-system.gguf's chat template failed "
        "(System role not supported); this chat is formatted as a plain transcript instead."
    ], result.stderr


# ---------------------------------------------------------------------------------- any backend exception


def test_any_exception_from_the_backend_becomes_an_nbllm_error_and_frees_the_model(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    resident = engine.registry.load("tiny-a")
    llm = resident.model._llm

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug deep inside")

    with monkeypatch.context() as patch:
        patch.setattr(llm, "tokenize", broken)
        with pytest.raises(GenerationError, match="Generating with tiny-a failed: ValueError: a bug deep inside"):
            engine.generate("hi", model="tiny-a", max_tokens=2)
        assert not resident.lock.locked()
        result = engine.generate_many(["hi"], model="tiny-a", progress=False)[0]
        assert isinstance(result.error, GenerationError)
        assert "ValueError: a bug deep inside" in str(result.error)
    with monkeypatch.context() as patch:  # a failure in the middle of a batch's decoding
        from nbllm.backends import llama_cpp_batch

        patch.setattr(llama_cpp_batch.llama_cpp, "llama_decode", broken)
        results = engine.generate_many(["hi", "there"], model="tiny-a", progress=False, max_tokens=4)
        assert all(isinstance(r.error, GenerationError) for r in results), results
        assert "ValueError: a bug deep inside" in str(results[0].error)
    assert wait_until(lambda: not resident.lock.locked())
    assert engine.generate("hi", model="tiny-a", max_tokens=2, seed=1).stats.completion_tokens >= 1
    assert all(r.ok for r in engine.generate_many(["hi", "there"], model="tiny-a", progress=False, max_tokens=2))


# ---------------------------------------------------------------------------------- the sandbox itself


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        (LOOPING, "would loop more than"),
        (HUGE_STRING, "400,000,000 characters or items (with *"),
        ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "with ~"),
        ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "with +"),
        ("{{ 'x'.ljust(1000000000) }}", "with .ljust()"),
        ("{{ '{:>999999999}'.format('x') }}", "with .format()"),
        ("{{ '%999999999d' % 1 }}", "with %"),
        ("{{ 'x'|center(999999999) }}", "with |center"),
        ("{{ ('a\n' * 100000)|indent(100000) }}", "with |indent"),
        ("{{ [1]|batch(1000000000, 'x')|list }}", "with |batch"),
        ("{{ ('x' * 100000).replace('x', 'y' * 100000) }}", "with replace"),
        ("{{ messages|tojson(indent=100000) }}", "would indent JSON by 100,000"),
        ("{{ 10 ** 100000000 }}", "to a power past"),
        ("{% set x = ['y' * 100000] * 1000 %}{{ x }}", "printing a value"),
        (
            "{% set x %}{% for i in range(100000) %}{% for j in range(100000) %}y{% endfor %}{% endfor %}{% endset %}",
            "loop",
        ),
        ("{{ range(1000000000)|list }}", "a range of 1,000,000,000 numbers"),
    ],
)
def test_the_sandbox_refuses_what_would_cost_too_much_quickly(source: str, fragment: str) -> None:
    template = ChatTemplate(source, name="hostile.gguf")
    started = time.perf_counter()
    with pytest.raises(ChatTemplateError) as caught:
        template.format(HELLO)
    assert time.perf_counter() - started < chat_template.SECONDS
    assert fragment in str(caught.value)
    assert str(caught.value).startswith("The chat template in hostile.gguf ")


@pytest.mark.parametrize(
    "source",
    [
        "{% for m in messages %}" * 25 + "{% endfor %}" * 25,  # Python's own limit on nested blocks
        "{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}",
        "{{ messages|no_such_filter }}",
        "{% generation %}",
    ],
)
def test_templates_that_do_not_compile_are_chat_template_errors(source: str) -> None:
    with pytest.raises(ChatTemplateError, match=r"The chat template in odd\.gguf does not compile: "):
        ChatTemplate(source, name="odd.gguf")


def test_an_oversized_template_is_refused_before_compiling() -> None:
    with pytest.raises(ChatTemplateError, match="1,000,001 characters long"):
        ChatTemplate("x" * 1_000_001, name="big.gguf")


REAL_TEMPLATES = {
    "gemma": GEMMA_LIKE_TEMPLATE,
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
        "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
        "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] "
        "== 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
    ),
    "tools": (
        "{% set ns = namespace(system='') %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.system = "
        "m.content %}{% endif %}{% endfor %}{{ ns.system ~ '\n' }}{{ messages|tojson(indent=2) }}{% for m in messages"
        " if m.role != 'system' %}{{ '{}: {}'.format(m.role, m.content)|indent(2) }}{{ '%s|%5d' % (m.role, loop.index) "
        "}}{% generation %}{{ m.content|center(20) }}{% endgeneration %}{% endfor %}{{ strftime_now('%Y')|length }}"
    ),
}


@pytest.mark.parametrize("name", sorted(REAL_TEMPLATES))
def test_real_templates_render_exactly_as_llama_cpp_python_renders_them(name: str) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    source = REAL_TEMPLATES[name]
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a tensor? Ünïcödé {{ not a tag }} %s"},
        {"role": "assistant", "content": "An array."},
        {"role": "user", "content": "And a model?"},
    ]
    if name == "mistral":
        conversation = conversation[1:]
    theirs = Jinja2ChatFormatter(template=source, eos_token="</s>", bos_token="<s>")(messages=conversation)
    ours = ChatTemplate(source, name=f"{name}.gguf", bos_token="<s>", eos_token="</s>").format(conversation)
    assert ours == FormattedPrompt(theirs.prompt, ("</s>",), special=True, add_bos=False, trim_whitespace=True)


# ---------------------------------------------------------------------------------- fuzzing

FUZZ_FRAGMENTS = (  # whole statements, hostile ones among them
    "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "{{ messages[0]['role'] }}",
    "{% if messages|length > 1 %}{{ bos_token }}{% endif %}",
    "{{ eos_token }}",
    "{% if add_generation_prompt %}{{ 'model' }}{% endif %}",
    "{{ raise_exception('refused') }}",
    "{{ 'x' * 99999999 }}",
    "{{ [0] * 99999999 }}",
    "{{ 9 ** 9 ** 9 }}",
    "{{ range(99999)|list|join(',') }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{{ (messages|tojson) * 1000000 }}",
    "{{ '%*d' % (999999999, 1) }}",
    "{{ '{:^99999999}'.format(1) }}",
    "{{ 'a'|center(99999999) }}",
    "{{ 'a\\n'|indent(99999999) }}",
    "{{ messages|batch(99999999, 0)|list }}",
    "{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{% set x %}{% for m in messages %}{{ m }}{% endfor %}{% endset %}{{ x ~ x ~ x ~ x }}",
    "{{ ''.join(messages|map(attribute='content')|list) * 99 }}",
    "{{ messages.__class__ }}",
    "{{ cycler(1, 2).next() }}",
    "{{ lipsum(9999999) }}",
    "{% generation %}{{ eos_token }}{% endgeneration %}",
    "{% for m in messages %}{% break %}{% endfor %}",
    "{% for m in messages %}{{ m.content|replace('e', 'e' * 99999) }}{% endfor %}",
    "{{ strftime_now('%Y' * 9999) }}",
    "{{ messages[9]['content'] }}",
    "{{ messages|tojson(indent=2) }}",
)
FUZZ_JUNK = (
    "{{",
    "}}",
    "{%",
    "%}",
    "(",
    ")",
    "'",
    "|",
    "[",
    "]",
    "~",
    "*",
)

FUZZ_SCRIPT = """
import json, sys
from nbllm.core import chat_template
from nbllm.core.errors import ChatTemplateError
chat_template.SECONDS = 2.0
source = sys.stdin.read()
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
try:
    prompt = chat_template.ChatTemplate(source, name="fuzz.gguf", bos_token="<s>", eos_token="</s>").format(messages)
except ChatTemplateError as error:
    print("specific error:", str(error)[:200])
else:
    print("rendered" if prompt.special else "transcript", len(prompt.text))
"""


def fuzz_templates(count: int, seed: int) -> list[str]:
    """Real templates mutated (fragments inserted, slices cut or doubled) and templates built from
    fragments alone, hostile ones included."""
    import random
    import re

    rng = random.Random(seed)
    bases = [*REAL_TEMPLATES.values(), ""]
    templates = []
    for index in range(count):
        source = rng.choice(bases) if index % 3 else ""
        for _ in range(rng.randint(1, 5)):
            # Mostly between tags, where a statement makes sense; sometimes anywhere.
            boundaries = [0, len(source), *(m.end() for m in re.finditer(r"\}\}|%\}", source))]
            at = rng.choice(boundaries) if rng.random() < 0.8 else rng.randint(0, len(source))
            action = rng.random()
            if action < 0.6 or not source:
                fragment = rng.choice(FUZZ_JUNK if rng.random() < 0.15 else FUZZ_FRAGMENTS)
                source = source[:at] + fragment + source[at:]
            elif action < 0.8:
                source = source[:at] + source[at + rng.randint(1, 20) :]
            else:
                end = min(len(source), at + rng.randint(1, 60))
                source = source[:end] + source[at:end] + source[end:]
        templates.append(source)
    return templates


@pytest.mark.timeout(900)
def test_a_hundred_random_templates_each_in_its_own_process_give_no_crash_and_no_hang() -> None:
    limit = 2.0 * 2 + 30  # compile and render deadlines, plus starting Python, on a busy machine

    def run(source: str) -> str:
        try:
            done = subprocess.run(
                [sys.executable, "-c", FUZZ_SCRIPT], input=source, capture_output=True, text=True, timeout=limit
            )
        except subprocess.TimeoutExpired:
            return f"hang: {source!r}"
        if done.returncode != 0:
            return f"crash ({done.returncode}): {source!r}\n{done.stderr[-2000:]}"
        kind = done.stdout.split(":")[0].split()[0]
        if kind == "specific":
            said = done.stdout
            kind = (
                "compile-error" if "does not compile" in said else "deadline" if "did not finish" in said else "limit"
            )
        return kind

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(run, fuzz_templates(100, seed=13)))
    counts: dict[str, int] = {}
    for outcome in outcomes:
        kind = outcome.split(" ")[0].rstrip(":")
        counts[kind] = counts.get(kind, 0) + 1
    print("outcomes of 100 random templates:", counts)
    failures = [o for o in outcomes if o.startswith(("hang", "crash"))]
    assert not failures, "\n\n".join(failures)
    assert counts.get("limit", 0) >= 10, counts  # the hostile fragments were met by nbllm's limits
    assert counts.get("rendered", 0) + counts.get("transcript", 0) >= 10, counts  # what still works, works
