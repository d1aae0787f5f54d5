"""Messages -> prompt text for models without a chat template of their own.

A base model such as the default Gemma 3 270M has no chat template in its file. Its own turn
format and llama-cpp-python's fallback both make it loop on garbage; a plain transcript is what
it continues sensibly. Of the transcripts tried on the default model (User/Assistant,
the same with a preamble, Question/Answer; three questions, two seeds each) Question/Answer gave
the most on-topic answers, so that is the fallback. Models that carry a template use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nbllm.core.errors import ParameterError

ROLES = ("system", "user", "assistant")
_LABELS = {"user": "Question", "assistant": "Answer"}
TRANSCRIPT_STOPS = ("\nQuestion:",)


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


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Validated ``[{'role': ..., 'content': ...}]``; a bare string is one user message."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or not messages:
        raise ParameterError(
            "messages must be a non-empty list of {'role': 'user'|'assistant'|'system', 'content': str}, or a string."
        )
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ParameterError(f"messages[{index}] must be a dict with 'role' and 'content', not {message!r}.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ParameterError(f"messages[{index}]['role'] = {role!r}: must be one of {', '.join(ROLES)}.")
        if not isinstance(content, str):
            raise ParameterError(f"messages[{index}]['content'] must be a string, not {type(content).__name__}.")
        result.append({"role": role, "content": content})
    return result


def transcript(messages: Iterable[Mapping[str, str]]) -> FormattedPrompt:
    """``<system text>\n\nQuestion: ...\nAnswer: ...\nQuestion: ...\nAnswer:``, stopping at the next question."""
    lines = []
    for message in messages:
        content = message["content"].strip()
        if message["role"] == "system":
            lines.append(f"{content}\n")
        else:
            lines.append(f"{_LABELS[message['role']]}: {content}")
    lines.append(f"{_LABELS['assistant']}:")
    return FormattedPrompt("\n".join(lines), TRANSCRIPT_STOPS, trim_whitespace=True)
