"""A list of rows that shows itself as a table: text in a terminal, HTML in a notebook.

Rows keep their keys for programs (``row["load with"]``, ``pandas.DataFrame(table)``); what a
reader sees is a header ("Size", "Context"), never a raw ``snake_case`` key.

Plain Python (``_repr_html_`` is a protocol, not an IPython import), so the core can return
tables without depending on any front-end library.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

Formatter = Callable[[Any], str]


class ReadableReport:
    """Mixin: IPython's text form (what a terminal shell prints for a result) is ``str(self)``,
    the readable report, while ``repr`` stays the dataclass's, for debugging."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # IPython's printer walks the class hierarchy and stops at the first class whose own
        # __dict__ has _repr_pretty_ or __repr__: a dataclass's generated __repr__ would win over
        # a method inherited from here, so each subclass gets it in its own __dict__.
        cls._repr_pretty_ = ReadableReport._repr_pretty_  # type: ignore[method-assign]


def header(column: str) -> str:
    """A row key as a reader sees it: ``context_size`` -> ``Context size``. Short first words
    (``t/s``, ``pp t/s``, ``of limit``) are units or fragments and keep their case."""
    words = column.replace("_", " ")
    first = words.split(" ", 1)[0]
    return words[:1].upper() + words[1:] if len(first) >= 3 and first.isalpha() else words


class Table(list[dict[str, Any]]):
    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        columns: Sequence[str] | None = None,
        formatters: dict[str, Formatter] | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(rows)
        self.columns = list(columns) if columns else (list(rows[0]) if rows else [])
        self.formatters = formatters or {}
        self.title = title
        self.headers = dict(headers or {})  # column -> what the reader sees; header(column) otherwise

    def heading(self, column: str) -> str:
        return self.headers.get(column) or header(column)

    def _cell(self, row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        if column in self.formatters:
            return self.formatters[column](value)
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    def __str__(self) -> str:
        cells = [[self._cell(row, c) for c in self.columns] for row in self]
        heads = [self.heading(c) for c in self.columns]
        widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(heads)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
        if self.title:
            lines.insert(0, self.title)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self) if self else "(no rows)"

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(self.heading(c))}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(self._cell(row, c))}</td>" for c in self.columns) + "</tr>"
            for row in self
        )
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_value_text(rows: Sequence[tuple[str, str]]) -> str:
    """``key  value`` lines, keys aligned: a report in a terminal."""
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def key_value_html(rows: Sequence[tuple[str, str]]) -> str:
    """The same report as an HTML table, for a notebook."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"
