"""What a front end asks for (``Request``) and what it gets back when it waits (``Completion``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nbllm.core.metrics import RequestStats
from nbllm.core.params import GenerationParams


@dataclass(frozen=True)
class Request:
    model: str | None
    params: GenerationParams
    prompt: str | None = None  # a completion: text the model continues
    messages: tuple[dict[str, Any], ...] | None = None  # a chat (tool turns: see normalize_messages)
    use_cache: bool = True  # consult and fill the prompt cache
    origin: str = "api"  # the front end that asked (history.ORIGINS): recorded in the history log

    @property
    def kind(self) -> str:
        return "completion" if self.prompt is not None else "chat"


@dataclass(frozen=True)
class Completion:
    """A finished answer: ``text`` plus what it cost (``stats``). ``str(c)`` is the text.

    With ``schema=`` or ``choices=``, ``data`` is the answer as data: the pydantic instance, the
    parsed JSON value, or the chosen string."""

    text: str
    stats: RequestStats
    data: Any = None
    # With tools=: the calls this answer made (empty when it answered in text); with
    # run_tools=True also the whole exchange, each call as it ran, and the model steps taken.
    tool_calls: tuple[Any, ...] = ()
    messages: tuple[dict[str, Any], ...] = ()
    tool_runs: tuple[Any, ...] = ()
    steps: int = 1
    # nbllm.ask: the passages the answer was given, numbered as the model saw them (engine/ask.py).
    sources: tuple[Any, ...] = ()

    def __str__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        cited = "".join(f"- {source}\n" for source in self.sources)
        sources = f"**Sources**\n\n{cited}\n" if cited else ""
        return f"{self.text}\n\n{sources}*{self.stats.details()}*"
