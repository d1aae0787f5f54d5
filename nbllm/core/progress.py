"""Progress bars for long work (benchmarks, tuning, downloads, many prompts), without drawing.

Policy code asks ``progress_bar(...)`` for an object with tqdm's three methods; what draws it is
a front end's business. The package facade installs the front end's bars (tqdm: a widget in a
notebook, a text bar in a terminal) with ``use_bars`` when ``nbllm`` is imported, so the layers
below never import tqdm. Without an installed factory, or when asked for none, nothing is drawn.
"""

from __future__ import annotations

from typing import Protocol


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> object: ...

    def set_postfix_str(self, text: str) -> object: ...

    def close(self) -> object: ...


class BarFactory(Protocol):
    def __call__(
        self, total: int | None, description: str, unit: str, *, initial: int, in_bytes: bool, leave: bool
    ) -> ProgressBar: ...


_factory: BarFactory | None = None


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def use_bars(factory: BarFactory | None) -> None:
    """Draw progress with ``factory`` from now on (None: draw nothing)."""
    global _factory
    _factory = factory


def progress_bar(
    enabled: bool,
    total: int | None,
    description: str,
    unit: str,
    *,
    initial: int = 0,
    in_bytes: bool = False,
    leave: bool = True,
) -> ProgressBar:
    """A bar with ``update``, ``set_postfix_str`` and ``close`` (tqdm's interface). ``total``
    None: not known (a download without a length); ``in_bytes``: count in KiB, MiB..."""
    if not enabled or (total is not None and total <= 0) or _factory is None:
        return _NoBar()
    return _factory(total, description, unit, initial=initial, in_bytes=in_bytes, leave=leave)
