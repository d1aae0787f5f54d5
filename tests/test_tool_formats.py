"""Tool calls in the model's own format (issue 15): a GGUF whose chat template renders tools
(Qwen 2.5's Hermes-style <tool_call> blocks, Llama 3.1's JSON) is given the tools through its
template and writes calls as it was trained to, under a grammar: even random weights make a
valid call. Templates without tools keep nbllm's own format and instructions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import openai
import pytest

from nbllm.core.chat_template import ChatTemplate
from nbllm.core.config import Settings
from nbllm.core.errors import ParameterError
from nbllm.core.tool_syntax import HERMES, LLAMA3, NBLLM, syntax_for_template
from nbllm.engine import Engine
from nbllm.engine.request import Request
from nbllm.engine.tool_loop import ToolLoopError
from nbllm.testing import make_tiny_model

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
QWEN = (TEMPLATES / "qwen2.5-instruct.jinja").read_text()
LLAMA = (TEMPLATES / "llama3.1-instruct.jinja").read_text()


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def double(x: int) -> int:
    """Double an integer."""
    return 2 * x


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("family-models")
    return {
        "tiny-qwen": make_tiny_model(folder / "tiny-qwen.gguf", seed=11, chat_template=QWEN),
        "tiny-llama3": make_tiny_model(folder / "tiny-llama3.gguf", seed=12, chat_template=LLAMA),
    }


@pytest.fixture
def settings(settings: Settings, family_models: dict[str, Path]) -> Settings:
    return settings.merged(
        {"models": {name: str(path) for name, path in family_models.items()}, "performance": {"context_size": 2048}}
    )


def prompt_of(request: Request, template: str) -> str:
    """The prompt text the model is given for ``request`` (its template, as the backend renders it)."""
    assert request.messages is not None
    return ChatTemplate(template, name="test").format(request.messages, request.params.template_tools()).text


def test_the_call_format_is_read_from_the_chat_template(tiny_models: dict[str, Path]) -> None:
    assert syntax_for_template(QWEN) is HERMES
    assert syntax_for_template(LLAMA) is LLAMA3
    assert syntax_for_template(None) is NBLLM
    assert syntax_for_template("{% for m in messages %}{{ m.content }}{% endfor %}") is NBLLM


def test_a_qwen_template_describes_the_tools_and_the_model_writes_tool_call_blocks(engine: Engine) -> None:
    request = engine.make_request(
        messages="What is 2 + 3?", model="tiny-qwen", params={"tools": [add, double], "tool_choice": "required"}
    )
    prompt = prompt_of(request, QWEN)
    assert "<tools>\n" in prompt
    assert '"name": "add"' in prompt
    assert '"name": "double"' in prompt
    assert "You can call these tools" not in prompt  # nbllm's own instructions are not added
    for seed in range(3):
        answer = engine.chat("What is 2 + 3?", model="tiny-qwen", tools=[add, double], tool_choice="required",
                             max_tokens=300, seed=seed)  # fmt: skip
        assert re.match(r'<tool_call>\n\{\s*"name"\s*:', answer.text), answer.text
        assert answer.text.endswith("\n</tool_call>"), answer.text
        assert answer.tool_calls, answer.text
        for call in answer.tool_calls:
            assert call.name in ("add", "double")
            assert all(isinstance(value, int) for value in call.arguments.values())


def test_the_loop_renders_calls_and_results_as_the_template_writes_them(engine: Engine) -> None:
    try:
        result = engine.chat("Add 2 and 3.", model="tiny-qwen", tools=[add], tool_choice="add", run_tools=True,
                             max_steps=2, max_tokens=200, seed=3)  # fmt: skip
        exchange = list(result.messages)
    except ToolLoopError as error:  # a random model may go on calling: the exchange is kept
        exchange = error.messages
    call = exchange[1]["tool_calls"][0]
    arguments = json.loads(call["function"]["arguments"])
    total = json.dumps(arguments["a"] + arguments["b"])
    assert exchange[2] == {"role": "tool", "tool_call_id": call["id"], "name": "add", "content": total}
    # The next step's prompt holds the call and its result as Qwen was trained on them.
    request = engine.make_request(messages=exchange[:3], model="tiny-qwen", params={"tools": [add]})
    prompt = prompt_of(request, QWEN)
    assert f'<tool_call>\n{{"name": "add", "arguments": {json.dumps(arguments)}}}\n</tool_call>' in prompt
    assert f"<|im_start|>user\n<tool_response>\n{exchange[2]['content']}\n</tool_response><|im_end|>" in prompt


def test_a_llama3_template_gets_one_json_call_with_parameters(engine: Engine) -> None:
    request = engine.make_request(messages="Double 4.", model="tiny-llama3", params={"tools": [add, double]})
    prompt = prompt_of(request, LLAMA)
    assert 'Respond in the format {"name": function name, "parameters": dictionary' in prompt
    assert '"name": "double"' in prompt
    for seed in range(3):
        answer = engine.chat("Double 4.", model="tiny-llama3", tools=[add, double], tool_choice="required",
                             max_tokens=300, seed=seed)  # fmt: skip
        assert re.match(r'\{\s*"name"\s*:', answer.text), answer.text
        assert re.search(r'"parameters"\s*:\s*\{', answer.text), answer.text
        assert len(answer.tool_calls) == 1
    # A result goes back as Llama's ipython turn.
    messages = [
        {"role": "user", "content": "Double 4."},
        {"role": "assistant", "content": "", "tool_calls": [answer.tool_calls[0].as_openai()]},
        {"role": "tool", "tool_call_id": answer.tool_calls[0].id, "content": "8"},
    ]
    request = engine.make_request(messages=messages, model="tiny-llama3", params={"tools": [add, double]})
    prompt = prompt_of(request, LLAMA)
    assert f'"parameters": {json.dumps(answer.tool_calls[0].arguments)}}}<|eot_id|>' in prompt
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"8"<|eot_id|>' in prompt


def test_tool_choice_auto_on_a_native_format_may_answer_in_text(engine: Engine) -> None:
    kinds = set()
    for seed in range(8):
        answer = engine.chat("Hello", model="tiny-qwen", tools=[add], max_tokens=40, seed=seed)
        kinds.add("calls" if answer.tool_calls else "text")
        if not answer.tool_calls:
            assert not answer.text.lstrip().startswith("<")  # text never starts as a call would
    assert "text" in kinds


def test_batches_and_the_cache_key_keep_the_format(engine: Engine) -> None:
    many = engine.chat_many(["Add 1 and 2.", "Double 5."], model="tiny-qwen", tools=[add, double],
                            tool_choice="required", max_tokens=300, seed=4)  # fmt: skip
    for item in many:
        assert item.ok, item.error
        assert item.data
        assert item.text.startswith("<tool_call>\n")
        assert {call.name for call in item.data} <= {"add", "double"}
    request = engine.make_request(messages="x", model="tiny-qwen", params={"tools": [add]})
    assert request.params.as_dict()["tools"]["syntax"] == "hermes"
    assert engine.make_request(messages="x", model="tiny-chat", params={"tools": [add]}).params.tools is not None


def test_the_server_streams_hermes_calls_as_openai_tool_call_deltas(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"],
                },
            },
        }
    ]
    stream = client.chat.completions.create(model="tiny-qwen", messages=[{"role": "user", "content": "2+3?"}],
                                            tools=tools, tool_choice="required", max_tokens=300, seed=5, stream=True)  # type: ignore[arg-type]  # fmt: skip
    names, arguments, finish = [], "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        assert not delta.content  # the <tool_call> text is never sent as content
        for part in delta.tool_calls or []:
            if part.function and part.function.name:
                names.append(part.function.name)
            if part.function and part.function.arguments:
                arguments += part.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert names
    assert set(names) == {"add"}
    assert arguments.startswith("{")


def test_a_conversation_the_llama3_format_cannot_hold_is_refused_before_any_work(engine: Engine) -> None:
    two_calls = [
        {"role": "user", "content": "Double 4 and add 1 and 2."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "double", "arguments": '{"x": 4}'}},
            {"id": "b", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "8"},
        {"role": "tool", "tool_call_id": "b", "content": "3"},
    ]  # fmt: skip
    with pytest.raises(ParameterError, match=r"holds 2 tool calls; tiny-llama3's format \(llama3\) has at most 1"):
        engine.chat(two_calls, model="tiny-llama3", tools=[add, double])
    assert engine.registry.resident() == []
