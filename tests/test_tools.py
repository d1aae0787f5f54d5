"""Tool calls (issue 15, first part): tools from Python functions and OpenAI dicts, calls made
under a grammar (a random tiny model still always makes a valid call), and the run loop."""

from __future__ import annotations

import io
import time
from typing import Literal

import pytest

from nbllm.core.config import Settings
from nbllm.core.errors import SchemaError
from nbllm.core.tools import make_toolset
from nbllm.engine import Engine
from nbllm.engine.tool_loop import ToolLoopError


def get_weather(city: Literal["Paris", "Lima", "Oslo"], unit: Literal["C", "F"] = "C") -> dict[str, object]:
    """The current weather in a city.

    More details that the model does not need."""
    return {"city": city, "temperature": 21 if unit == "C" else 70, "unit": unit}


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@pytest.fixture
def engine(settings: Settings) -> Engine:
    return Engine(
        settings.merged({"performance": {"context_size": 2048, "parallel": 4, "parallel_context_size": 2048}})
    )


def test_a_function_becomes_a_tool_from_its_signature_and_docstring() -> None:
    tools = make_toolset([get_weather, add])
    assert tools is not None
    weather = tools.by_name("get_weather")
    assert weather is not None
    assert weather.description == "The current weather in a city."
    assert weather.parameters["properties"]["city"]["enum"] == ["Paris", "Lima", "Oslo"]
    assert weather.parameters["required"] == ["city"]
    openai_style = make_toolset([{"type": "function", "function": weather.as_openai()["function"]}])
    assert openai_style is not None
    assert openai_style.tools[0].parameters == weather.parameters


def bad_file(handle: io.TextIOWrapper) -> None:
    """Reads a file."""


def bad_star(*names: str) -> None:
    """Takes anything."""


@pytest.mark.parametrize(
    ("tools", "choice", "words"),
    [
        ([bad_file], None, "parameter 'handle'"),
        ([bad_star], None, "'names'"),
        ([add, add], None, "unique"),
        ([], None, "empty"),
        ([add], "mul", "tool_choice='mul'"),
        (None, "required", "needs tools"),
        ([{"type": "function", "function": {"name": "x y"}}], None, "letters, digits"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "n": {"type": "integer", "minimum": 1}}}}}], None, "'minimum'"),
    ],
)  # fmt: skip
def test_tools_that_cannot_be_described_are_refused_when_given(tools: object, choice: object, words: str) -> None:
    with pytest.raises(SchemaError, match=words):
        make_toolset(tools, choice)


def test_a_required_call_is_always_a_valid_call_even_from_random_weights(engine: Engine) -> None:
    for seed in range(4):
        result = engine.chat("Weather?", tools=[get_weather, add], tool_choice="required", seed=seed,
                             temperature=1.0, max_tokens=900)  # fmt: skip
        assert result.tool_calls, result.text
        for call in result.tool_calls:
            if call.name == "get_weather":
                assert call.arguments["city"] in ("Paris", "Lima", "Oslo")
            else:
                assert isinstance(call.arguments["a"], int)
                assert isinstance(call.arguments["b"], int)


def test_a_named_tool_choice_calls_that_tool_and_batches_keep_their_own_state(engine: Engine) -> None:
    results = engine.chat_many(["one", "two", "three"], tools=[get_weather, add], tool_choice="add", seed=1,
                               max_tokens=900, progress=False)  # fmt: skip
    assert all(r.ok for r in results), [str(r.error) for r in results]
    single = engine.chat("sum", tools=[get_weather, add], tool_choice="add", seed=2, max_tokens=900)
    assert [c.name for c in single.tool_calls] == ["add"] * len(single.tool_calls)


def test_tool_choice_none_answers_in_text_and_auto_allows_text(engine: Engine) -> None:
    none = engine.chat("Hi", tools=[add], tool_choice="none", seed=1, max_tokens=8)
    assert none.tool_calls == ()
    assert none.stats.schema is None
    auto = engine.chat("Hi", tools=[add], seed=3, max_tokens=900)
    assert auto.tool_calls == () or all(c.name == "add" for c in auto.tool_calls)


def test_the_loop_runs_the_tools_and_keeps_the_exchange(engine: Engine) -> None:
    seen: list[tuple[int, int]] = []

    def add_logged(a: int, b: int) -> int:
        """Add two integers."""
        seen.append((a, b))
        return a + b

    with pytest.raises(ToolLoopError, match="max_steps=1") as caught:
        engine.chat("Add.", tools=[add_logged], tool_choice="required", run_tools=True, max_steps=1, seed=1,
                    max_tokens=900)  # fmt: skip
    runs, messages = caught.value.runs, caught.value.messages
    assert runs
    counted = engine.stats.snapshot()
    assert counted["tool_calls"] == len(runs)
    assert counted["tool_steps"] == 1
    assert seen == [(r.call.arguments["a"], r.call.arguments["b"]) for r in runs], "the function really ran"
    assert all(r.ok and r.result == r.call.arguments["a"] + r.call.arguments["b"] for r in runs)
    assert messages[1]["role"] == "assistant"
    assert messages[1]["tool_calls"][0]["function"]["name"] == "add_logged"
    assert messages[2]["role"] == "tool"
    assert messages[2]["tool_call_id"] == runs[0].call.id


def test_confirm_can_refuse_a_call_and_a_raising_or_hanging_tool_is_told_to_the_model(engine: Engine) -> None:
    ran: list[str] = []

    def explode(a: int, b: int) -> int:
        """Fails."""
        ran.append("explode")
        raise RuntimeError("disk on fire")

    def hang(a: int, b: int) -> int:
        """Never returns in time."""
        time.sleep(5)
        return 0

    def never(a: int, b: int) -> int:
        """Must not run."""
        ran.append("never")
        return 0

    for tool, options, words in [
        (never, {"confirm": lambda call: False}, "refused"),
        (explode, {}, "RuntimeError: disk on fire"),
        (hang, {"tool_timeout": 0.3}, "Timed out after 0.3 s"),
    ]:
        with pytest.raises(ToolLoopError) as caught:
            engine.chat("Go.", tools=[tool], tool_choice="required", run_tools=True, max_steps=1, seed=1,
                        max_tokens=900, **options)  # fmt: skip
        run = caught.value.runs[0]
        assert run.error is not None
        assert words in run.error
        assert words.split(":")[0] in caught.value.messages[2]["content"]
    assert "never" not in ran
    assert "explode" in ran


def test_bad_loop_options_are_clear_errors(engine: Engine) -> None:
    with pytest.raises(Exception, match="needs tools"):
        engine.chat("x", run_tools=True)
    with pytest.raises(Exception, match="without one"):
        engine.chat("x", tools=[{"type": "function", "function": {"name": "f"}}], run_tools=True)
    with pytest.raises(Exception, match="cannot stream"):
        engine.chat("x", tools=[add], run_tools=True, stream=True)
    with pytest.raises(Exception, match="use chat"):
        engine.generate("x", tools=[add])


def test_the_default_model_calls_a_tool_and_answers_from_its_result(default_engine: Engine) -> None:
    called: list[dict[str, object]] = []

    def weather(city: Literal["Paris", "Lima", "Oslo"], unit: Literal["C", "F"] = "C") -> dict[str, object]:
        """The current weather in a city."""
        called.append({"city": city, "unit": unit})
        return get_weather(city, unit)

    asked = default_engine.chat("What is the weather in Lima?", tools=[weather, add], tool_choice="required",
                                max_tokens=200, seed=1)  # fmt: skip
    assert asked.tool_calls
    for call in asked.tool_calls:
        assert call.name in ("weather", "add")
    result = default_engine.chat("What is the weather in Lima?", tools=[weather], tool_choice="weather",
                                 run_tools=True, max_steps=3, max_tokens=200, seed=1)  # fmt: skip
    assert called  # the function really ran, with arguments that fit its signature
    assert called[0]["city"] in ("Paris", "Lima", "Oslo")
    assert result.tool_runs[0].result == get_weather(called[0]["city"], called[0]["unit"])  # type: ignore[arg-type]
    assert result.messages[-1]["role"] == "assistant"
    assert result.text == result.messages[-1]["content"]
