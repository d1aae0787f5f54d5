"""Figures of results (benchmarks, tuning trials), without drawing.

``BenchResults.figure()`` and ``TuneResult.figure()`` belong to results that the measuring layer
returns, but drawing is a front end's job (plotly lives in ``notebook/plots.py``). The package
facade registers the makers with ``use_figure`` when ``nbllm`` is imported (plotly itself loads
only when a figure is drawn), so nothing below the front ends imports plotly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nbllm.core.errors import NbllmError

_makers: dict[str, Callable[[Any], Any]] = {}


def use_figure(kind: str, maker: Callable[[Any], Any]) -> None:
    _makers[kind] = maker


def figure(kind: str, data: Any) -> Any:
    """The figure of ``data`` drawn by the maker registered for ``kind``."""
    maker = _makers.get(kind)
    if maker is None:
        raise NbllmError(f"No front end draws {kind} figures here: import nbllm (it registers plotly's).")
    return maker(data)
