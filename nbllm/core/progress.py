"""Progress bars for long work (benchmarks, tuning, many prompts): tqdm's, which is a widget in a
notebook and a text bar in a terminal, or nothing at all when asked for none."""

from __future__ import annotations

from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int, description: str, unit: str) -> Any:
    """A bar with ``update``, ``set_postfix_str`` and ``close`` (tqdm's interface)."""
    if not enabled or total <= 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, leave=True)
