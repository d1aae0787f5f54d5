"""OpenAI's ``tools`` on ``nbllm serve`` (issue 15): the official client, streamed and not, a
tool message sent back, and an agent library (pydantic-ai) completing a tool round trip."""

from __future__ import annotations

import json
from typing import Any, Literal

import openai
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install 'nbllm[server]'")

from nbllm.core.config import Settings
from nbllm.engine import Engine
from nbllm.server.running import ServerHandle

TIMEOUT = 60.0
WEATHER: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Lima"]}},
                "required": ["city"],
            },
        },
    }
]
ASK: list[Any] = [{"role": "user", "content": "Weather in Lima?"}]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.merged({"performance": {"context_size": 2048}})


def test_a_required_tool_call_comes_back_as_openai_tool_calls(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tiny-chat", messages=ASK, tools=WEATHER, tool_choice="required", max_tokens=600, seed=1
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Lima")
    # The result goes back as a tool message; with tool_choice none the model answers in text.
    follow = client.chat.completions.create(
        model="tiny-chat", max_tokens=8, seed=2, tools=WEATHER, tool_choice="none",
        messages=[*ASK, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21}'}],
    )  # fmt: skip
    assert follow.choices[0].message.content is not None
    assert follow.choices[0].message.tool_calls is None


def test_streamed_tool_calls_arrive_as_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny-chat", messages=ASK, tools=WEATHER, tool_choice={"type": "function", "function":
        {"name": "get_weather"}}, max_tokens=600, seed=3, stream=True,
    )  # fmt: skip
    names, arguments, finish = [], "", None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    names.append(call.function.name)
                if call.function and call.function.arguments:
                    arguments += call.function.arguments
            finish = choice.finish_reason or finish
    assert names == ["get_weather"]
    assert json.loads(arguments)["city"] in ("Paris", "Lima")
    assert finish == "tool_calls"


def test_pydantic_ai_completes_a_tool_round_trip(server: ServerHandle) -> None:
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("tiny-chat", provider=OpenAIProvider(base_url=server.base_url, api_key="unused"))
    # A random tiny model answers in text when it may: the request asks for a call each time, so
    # the loop runs until the limit. Each step after the first carries the tool's result back.
    settings = {"max_tokens": 600, "seed": 4, "temperature": 0.0, "extra_body": {"tool_choice": "required"}}
    agent = pydantic_ai.Agent(model, model_settings=settings)
    calls: list[str] = []

    @agent.tool_plain
    def get_weather(city: Literal["Paris", "Lima"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"21 degrees in {city}"

    with pytest.raises(pydantic_ai.exceptions.UsageLimitExceeded):
        agent.run_sync("Weather in Lima?", usage_limits=pydantic_ai.UsageLimits(request_limit=3))
    assert len(calls) >= 2, "the agent ran the tool, sent its result back, and nbllm serve answered with a call"
    assert all(isinstance(city, str) for city in calls)


def test_the_remote_backend_passes_tools_on_and_reads_the_calls_back(settings: Settings, server: ServerHandle) -> None:
    def get_weather(city: Literal["Paris", "Lima"]) -> str:
        """The weather in a city."""
        return f"21 degrees in {city}"

    engine = Engine(settings.merged({"remote_models": {"far": {"url": server.base_url, "model": "tiny-chat"}}}))
    try:
        result = engine.chat("Weather?", model="far", tools=[get_weather], tool_choice="required", max_tokens=600,
                             seed=5)  # fmt: skip
        assert result.tool_calls
        assert result.tool_calls[0].name == "get_weather"
        assert result.tool_calls[0].arguments["city"] in ("Paris", "Lima")
    finally:
        engine.close()
