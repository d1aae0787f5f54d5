"""Messages -> prompt text for models without a chat template of their own.

A base model such as the default Gemma 3 270M has no chat template in its file. Its own turn
format and llama-cpp-python's fallback both make it loop on garbage; a plain transcript is what
it continues sensibly. Of the transcripts tried on the default model (User/Assistant,
the same with a preamble, Question/Answer; three questions, two seeds each) Question/Answer gave
the most on-topic answers, so that is the fallback. Models that carry a template use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nbllm.core.errors import ParameterError

ROLES = ("system", "user", "assistant")
_LABELS = {"user": "Question", "assistant": "Answer"}
# The next question ends the answer, and so does a line that starts another answer: asked for a
# quiz, Gemma 3 270M wrote "...\nAnswer: ..." turns of its own (tests/test_default_model.py).
TRANSCRIPT_STOPS = ("\nQuestion:", "\nAnswer:")


@dataclass(frozen=True)
class FormattedPrompt:
    """Prompt text plus how to tokenize it and where to stop."""

    text: str
    stop: tuple[str, ...] = ()
    # Template output already holds the BOS token and special tokens as text.
    special: bool = False
    add_bos: bool = True
    # A chat answer starts after "Answer:": the space the model emits first, and blank space
    # at the very end, are not content.
    trim_whitespace: bool = False


def with_default_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """``messages`` with ``system`` first when they bring no system message of their own."""
    if system is None or any(message.get("role") == "system" for message in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


def normalize_messages(messages: Any, *, tool_turns: bool = False) -> list[dict[str, Any]]:
    """Validated ``[{'role': ..., 'content': ...}]``; a bare string is one user message.

    Tool calls and results become plain turns as nbllm's instructions describe them
    (core/tools.py), unless ``tool_turns``: for a chat template that renders tools itself, they
    stay OpenAI's messages (role "tool"; an assistant's ``tool_calls`` with their arguments as
    objects, which templates write with ``tojson``)."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or not messages:
        raise ParameterError(
            "messages must be a non-empty list of {'role': 'user'|'assistant'|'system', 'content': str}, or a string."
        )
    result: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ParameterError(f"messages[{index}] must be a dict with 'role' and 'content', not {message!r}.")
        role, content = message.get("role"), message.get("content")
        from_tool = role == "tool"
        if from_tool or (role == "assistant" and message.get("tool_calls")):
            if tool_turns:
                result.append(_tool_turn(index, message))
                continue
            role, content = _tool_message_as_text(index, message)
        if role not in ROLES:
            raise ParameterError(f"messages[{index}]['role'] = {role!r}: must be one of {', '.join((*ROLES, 'tool'))}.")
        if not isinstance(content, str):
            raise ParameterError(f"messages[{index}]['content'] must be a string, not {type(content).__name__}.")
        if from_tool and result and result[-1]["role"] == role:
            # Tool results after one another become one message: chat templates want user and
            # assistant turns to alternate.
            result[-1] = {"role": role, "content": f"{result[-1]['content']}\n\n{content}"}
            continue
        result.append({"role": role, "content": content})
    return result


def _tool_turn(index: int, message: Mapping[str, Any]) -> dict[str, Any]:
    """A tool call or result as a template that renders tools takes it."""
    if message.get("role") == "tool":
        content = _result_text(index, message)
        name = str(message.get("name") or message.get("tool_call_id") or "the tool")
        return {"role": "tool", "content": content, "name": name, "tool_call_id": str(message.get("tool_call_id", ""))}
    text = message.get("content") or ""
    if not isinstance(text, str):
        raise ParameterError(f"messages[{index}]['content'] must be a string, not {type(text).__name__}.")
    calls = [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        for call_id, name, arguments in _calls(index, message)
    ]
    return {"role": "assistant", "content": text, "tool_calls": calls}


def _result_text(index: int, message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise ParameterError(f"messages[{index}]['content'] (a tool result) must be a string.")
    return content


def _calls(index: int, message: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, name, arguments) of each OpenAI tool call in an assistant message."""
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ParameterError(f"messages[{index}]['tool_calls'] must be OpenAI tool calls with a function name.")
        arguments = function.get("arguments", "{}")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError as error:
            raise ParameterError(f"messages[{index}]: a tool call's arguments are not JSON ({error}).") from None
        if not isinstance(parsed, Mapping):
            raise ParameterError(f"messages[{index}]: a tool call's arguments must be a JSON object.")
        calls.append((str(call.get("id") or ""), function["name"], dict(parsed)))
    return calls


def _tool_message_as_text(index: int, message: Mapping[str, Any]) -> tuple[str, str]:
    """A tool call or a tool result as the plain turn the model was taught (core/tools.py): the
    calls as the JSON array it wrote, a result as a user turn naming the tool."""
    if message.get("role") == "tool":
        content = _result_text(index, message)
        name = message.get("name") or message.get("tool_call_id") or "the tool"
        return "user", f"Result of {name}: {content}"
    calls = [{"name": name, "arguments": arguments} for _, name, arguments in _calls(index, message)]
    text = message.get("content") or ""
    return "assistant", (f"{text}\n" if isinstance(text, str) and text else "") + json.dumps(calls)


def plain_turns(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Messages with tool turns as plain text (for the transcript, which knows no tools)."""
    return [{"role": m["role"], "content": m["content"]} for m in normalize_messages(messages)]


def transcript(messages: Iterable[Mapping[str, str]]) -> FormattedPrompt:
    """``<system text>\n\nQuestion: ...\nAnswer: ...\nQuestion: ...\nAnswer:``, stopping at the next turn."""
    lines = []
    for message in messages:
        content = message["content"].strip()
        if message["role"] == "system":
            lines.append(f"{content}\n")
        else:
            lines.append(f"{_LABELS[message['role']]}: {content}")
    lines.append(f"{_LABELS['assistant']}:")
    return FormattedPrompt("\n".join(lines), TRANSCRIPT_STOPS, trim_whitespace=True)
