"""``Stream``: an answer as it is made, the object every front end iterates."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

from nbllm.backends.base import Usage
from nbllm.core.cancel import Cancel
from nbllm.core.metrics import RequestStats
from nbllm.engine import pipeline
from nbllm.engine.request import Completion, Request

if TYPE_CHECKING:
    from nbllm.engine.engine import Engine


class Stream:
    """Text pieces as the model produces them.

    Iterate it; afterwards ``text`` holds the whole answer and ``stats`` what it cost.
    ``stop()`` (from any thread) ends it after the current token. Leaving a ``for`` loop early
    or calling ``close()`` ends it too, and the model is free again.
    """

    def __init__(self, engine: Engine, request: Request, run: pipeline.Run) -> None:
        self.request = request
        self.cancel = Cancel()  # also readable by llama.cpp's abort callback without the GIL
        self.pieces: list[str] = []
        self.stats: RequestStats | None = None
        self.usage = Usage()  # live token count while generating
        self.started: float | None = None
        self.load_seconds = 0.0
        self.model_name: str | None = None
        self.thread_id = threading.get_ident()
        self.sources: tuple[Any, ...] = ()  # nbllm.ask: the passages the answer was given
        self._steps: Generator[str, None, None] = pipeline.answer_stream(engine, request, self, run)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._steps)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def tokens(self) -> int:
        """Tokens generated so far (all of them once the stream has ended)."""
        return self.stats.completion_tokens if self.stats is not None else self.usage.completion_tokens

    def stop(self) -> None:
        self.cancel.set()

    def close(self) -> None:
        self._steps.close()

    def result(self) -> Completion:
        """Consume the rest of the stream and return the whole answer."""
        for _ in self:
            pass
        assert self.stats is not None
        if self.request.params.tools is not None:
            return Completion(self.text, self.stats, tool_calls=tuple(self.data or ()))
        return Completion(self.text, self.stats, self.data, sources=self.sources)

    @property
    def data(self) -> Any:
        """With ``schema=`` / ``choices=``: the finished answer as data (see ``Completion.data``)."""
        if self.stats is None:
            raise RuntimeError("The stream has not finished: iterate it (or call result()) first.")
        return pipeline.structured_data(self.request, self.text, self.stats)

    # LockOwner protocol (see registry.py): lets the registry recover from abandoned streams.
    def is_suspended(self) -> bool:
        return inspect.getgeneratorstate(self._steps) == inspect.GEN_SUSPENDED

    def abandon(self) -> None:
        self._steps.close()
