"""``{name}`` in a ``%%llm`` prompt, its options and ``%llm`` lines, filled from the notebook's variables."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Mapping
from typing import Any

from nbllm.core.errors import ParameterError

_FIELD = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[[^\[\]{}]+\])*"
_PLACEHOLDER = re.compile(r"\{\{(" + _FIELD + r")\}\}|\{(" + _FIELD + r")\}")
_ACCESS = re.compile(r"\.([A-Za-z_]\w*)|\[([^\[\]{}]+)\]")


# About 5,000 tokens: more than a small model's whole context, and far more than a question
# needs about one value; NbllmMagics.max_interpolated_chars changes it.
MAX_VALUE_CHARS = 20_000
_SUMMARY_ROWS = 5
_SUMMARY_COLUMNS = 20
_CELL_WIDTH = 40


class _Unresolved(Exception):
    pass


def interpolate(
    text: str, namespace: Mapping[str, Any], *, limit: int = MAX_VALUE_CHARS, notes: list[str] | None = None
) -> str:
    """Fill ``{name}``, ``{obj.attr}`` and ``{d[key]}`` from ``namespace``; leave other braces alone.

    Prompts often carry JSON or code, so anything that is not a simple reference to an
    existing variable stays as written; ``{{name}}`` is the escape for a literal ``{name}``.
    Each value is written as ``describe`` says, cut to ``limit`` characters (0: no limit); each
    cut adds a line to ``notes``.
    """

    def replace(match: re.Match[str]) -> str:
        escaped, reference = match.groups()
        if escaped is not None:
            return "{" + escaped + "}"
        try:
            value = _resolve(reference, namespace)
        except _Unresolved:
            return match.group(0)
        return _bounded(describe(value), reference, limit, notes)

    return _PLACEHOLDER.sub(replace, text)


def _resolve(reference: str, namespace: Mapping[str, Any]) -> Any:
    name = re.match(r"[A-Za-z_]\w*", reference)
    assert name is not None  # the placeholder pattern starts with a name
    if name.group(0) not in namespace:
        raise _Unresolved
    value = namespace[name.group(0)]
    try:
        for attribute, key in _ACCESS.findall(reference[name.end() :]):
            value = getattr(value, attribute) if attribute else value[_index(key)]
    except Exception as error:  # whatever the object raises, the braces stay as written
        raise _Unresolved from error
    return value


def _index(key: str) -> Any:
    """``[0]`` and ``['a']`` are literals; a bare ``[a]`` is the string key, as in ``str.format``."""
    try:
        value = ast.literal_eval(key.strip())
    except (ValueError, SyntaxError):
        return key.strip()
    if isinstance(value, (int, str)):
        return value
    raise _Unresolved


def describe(value: Any) -> str:
    """What ``{name}`` puts into a prompt for ``value``.

    An object's own ``_llm_repr_()`` first (any class may describe itself to a model); a pandas
    DataFrame or Series as a compact summary — shape, dtypes, first rows — instead of its repr,
    which is either cut in the middle by pandas or runs to every row; anything else as ``str``.
    """
    method = getattr(type(value), "_llm_repr_", None)
    if callable(method):
        described = method(value)
        if not isinstance(described, str):
            raise ParameterError(
                f"{type(value).__name__}._llm_repr_() returned {type(described).__name__}, not a string: "
                "make it return the text to put into the prompt."
            )
        return described
    pandas = sys.modules.get("pandas")  # a DataFrame exists only if pandas was imported
    if pandas is not None and isinstance(value, pandas.DataFrame):
        return _frame_summary(value)
    if pandas is not None and isinstance(value, pandas.Series):
        return _series_summary(value)
    return str(value)


def _frame_summary(frame: Any) -> str:
    rows, columns = frame.shape
    shown = list(frame.columns[:_SUMMARY_COLUMNS])
    dtypes = ", ".join(f"{name} ({frame.dtypes.iloc[i]})" for i, name in enumerate(shown))
    more = f", and {columns - len(shown)} more columns" if columns > len(shown) else ""
    head = frame.iloc[:_SUMMARY_ROWS, : len(shown)].to_string(max_colwidth=_CELL_WIDTH)
    return (
        f"pandas DataFrame, {rows:,} rows x {columns:,} columns\n"
        f"Columns (dtype): {dtypes}{more}\n"
        f"First {min(rows, _SUMMARY_ROWS)} rows:\n{head}"
    )


def _series_summary(series: Any) -> str:
    head = series.iloc[:_SUMMARY_ROWS].to_string(max_rows=_SUMMARY_ROWS)
    head = "\n".join(line[: _CELL_WIDTH * 2] for line in head.splitlines())
    return (
        f"pandas Series {series.name!r}, {len(series):,} values, dtype {series.dtype}\n"
        f"First {min(len(series), _SUMMARY_ROWS)} values:\n{head}"
    )


def _bounded(text: str, reference: str, limit: int, notes: list[str] | None) -> str:
    """``text`` cut to ``limit`` characters, the cut said in the prompt and in ``notes``."""
    if not limit or len(text) <= limit:
        return text
    left_out = len(text) - limit
    note = (
        f"{{{reference}}} is {len(text):,} characters; only the first {limit:,} went into the prompt "
        "(NbllmMagics.max_interpolated_chars sets the limit; an object may define _llm_repr_() to describe itself)."
    )
    if notes is not None:
        notes.append(note)
    return f"{text[:limit]}\n[... {left_out:,} more characters of {{{reference}}} left out]"
