"""Fitting a conversation into a model's context: the oldest turns go first, the system prompt stays.

Engine-neutral: the caller passes a function that counts a list of chat messages in tokens (the
model's own template and tokenizer, ``Engine.count_chat_tokens``, or any estimate). The chat
panel uses it before every message; ``%%llm --chat`` does not (it sends the whole conversation,
and a too-long one is the model's context error). What was left out is counted, for the note
a front end shows ("3 earlier messages left out to fit the context"): a model that silently
forgets is worse than one that says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Trimmed", "left_out_note", "trim_to_fit"]

Message = Mapping[str, Any]


@dataclass(frozen=True)
class Trimmed:
    """The messages to send and how many of the conversation's (non-system) messages were left out."""

    messages: list[Message]
    left_out: int
    tokens: int  # the count of ``messages``; over the budget when even the newest turn alone does not fit


def left_out_note(count: int) -> str:
    """The one wording for trimmed turns."""
    return f"{count} earlier message{'' if count == 1 else 's'} left out to fit the context"


def trim_to_fit(messages: Sequence[Message], count_tokens: Callable[[list[Message]], int], budget: int) -> Trimmed:
    """The longest tail of ``messages`` (after the leading system messages, which are always
    kept) whose count is at most ``budget`` tokens.

    A kept tail never starts with an assistant or tool message: chat templates expect a user turn
    after the system prompt, and a tool result without its call means nothing. The newest user
    turn is always kept, even when it alone is over the budget (the model then says so itself).
    Counts are monotonic in the number of messages kept, so the cut is found by bisection:
    about log2(n) counts, each of a whole conversation.
    """
    system = _leading_system(messages)
    rest = list(messages[len(system) :])
    starts = [i for i, m in enumerate(rest) if m.get("role") == "user"] or [0]
    # starts[k]: keep rest[starts[k]:]; later starts keep fewer messages.
    total = count_tokens([*system, *rest])
    if total <= budget or not rest:
        return Trimmed([*system, *rest], 0, total)
    low, high = 0, len(starts) - 1  # the answer is the first start that fits; the last is kept regardless
    best = high
    while low <= high:
        middle = (low + high) // 2
        if count_tokens([*system, *rest[starts[middle] :]]) <= budget:
            best, high = middle, middle - 1
        else:
            low = middle + 1
    kept = [*system, *rest[starts[best] :]]
    return Trimmed(kept, starts[best], count_tokens(kept))


def _leading_system(messages: Sequence[Message]) -> list[Message]:
    leading: list[Message] = []
    for message in messages:
        if message.get("role") != "system":
            break
        leading.append(message)
    return leading


# --------------------------------------------------------------------- Markdown transcripts

# A transcript is Markdown a person can read (each turn under a small heading) and nbllm can load
# back exactly: the heading carries the role in an HTML comment, which Markdown viewers hide. A
# line of a message that would read as such a heading is escaped with one more backslash (and
# unescaped on loading), so any text survives the round trip.
_ROLES = ("system", "user", "assistant", "tool")
_HEADING = re.compile(r"^#### (.*) <!-- nbllm-chat:(system|user|assistant|tool) -->$")
_LOOKS_LIKE_HEADING = re.compile(r"^(\\*)(#### .* <!-- nbllm-chat:[a-z]+ -->)$", re.MULTILINE)
_ESCAPED = re.compile(r"^\\(\\*#### .* <!-- nbllm-chat:[a-z]+ -->)$", re.MULTILINE)
MAX_TRANSCRIPT_CHARS = 50_000_000
_END = "\x00end"  # a sentinel line (compared by identity) closing the last turn


def to_markdown(messages: Sequence[Message], title: str = "Chat") -> str:
    """``messages`` (role, content, and an assistant's ``model``) as a Markdown transcript."""
    parts = [f"# {title}\n"]
    for message in messages:
        role = str(message.get("role", ""))
        if role not in _ROLES:
            raise ValueError(f"A message's role must be one of {', '.join(_ROLES)}, not {role!r}.")
        label = {"system": "System prompt", "user": "You", "tool": f"Tool {message.get('name', '')}".strip()}.get(
            role, f"Assistant ({message.get('model') or 'model'})"
        )
        content = _LOOKS_LIKE_HEADING.sub(r"\\\1\2", str(message.get("content") or ""))
        parts.append(f"\n#### {label} <!-- nbllm-chat:{role} -->\n{content}\n")
    return "".join(parts)


def from_markdown(text: str) -> list[dict[str, str]]:
    """The messages of a transcript written by ``to_markdown`` (exactly its role, content and
    an assistant's model). Text before the first turn (the title) is not a message."""
    if len(text) > MAX_TRANSCRIPT_CHARS:
        raise ValueError(f"The transcript is {len(text):,} characters; at most {MAX_TRANSCRIPT_CHARS:,} are loaded.")
    messages: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    lines: list[str] = []
    for line in [*text.split("\n"), _END]:
        match = _HEADING.match(line)
        if match is None and line is not _END:
            lines.append(line)
            continue
        if current is not None:
            # to_markdown wrote one "\n" after each content, before the next turn or the end.
            body = "\n".join(lines)
            current["content"] = _ESCAPED.sub(r"\1", body[:-1] if body.endswith("\n") else body)
            messages.append(current)
        if match is not None:
            label, role = match.groups()
            current, lines = {"role": role, "content": ""}, []
            if role == "assistant" and (model := re.fullmatch(r"Assistant \((.*)\)", label)):
                current["model"] = model.group(1)
            if role == "tool" and label.startswith("Tool "):
                current["name"] = label[5:]
    if not messages:
        raise ValueError(
            "no messages found: a transcript has turns under headings like '#### You <!-- nbllm-chat:user -->'."
        )
    return messages
