"""``%%llm --map``'s data side: one prompt per element of a list, pandas Series or DataFrame, and
the answers put back in the same shape. Plain Python: pandas is never imported, only used
through the objects the user hands in."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nbllm.core.errors import ParameterError


class _Row:
    """A DataFrame row for ``{row.column}``: attribute access by column name."""

    def __init__(self, index: Any, values: Mapping[str, Any]) -> None:
        self._values = dict(values)
        self.index = index

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __str__(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in self._values.items())


def _elements(data: Any) -> list[dict[str, Any]]:
    """The per-prompt names: ``item`` (and ``index``) for lists and Series, ``row`` for DataFrames."""
    if hasattr(data, "iterrows") and hasattr(data, "columns"):  # a pandas DataFrame
        return [{"row": _Row(index, dict(row)), "index": index} for index, row in data.iterrows()]
    if hasattr(data, "items") and hasattr(data, "index") and hasattr(data, "to_list"):  # a pandas Series
        return [{"item": value, "index": index} for index, value in data.items()]
    # A string or a dict would "iterate" into characters or keys: surely not what was meant.
    if isinstance(data, (str, bytes, Mapping)) or not hasattr(data, "__iter__"):
        raise ParameterError(f"--map needs a list, tuple, pandas Series or DataFrame, not {type(data).__name__}.")
    return [{"item": value, "index": i} for i, value in enumerate(data)]


def prompts_for(
    data: Any, template: str, namespace: Mapping[str, Any], *, interpolate_text: Callable[[str, Mapping[str, Any]], str]
) -> list[str]:
    """The template filled once per element (``{item}``, ``{row.column}``, ``{index}``, notebook names)."""
    if not template.strip():
        raise ParameterError("The cell is empty: write the prompt, with {item} (or {row.column}) where each goes.")
    elements = _elements(data)
    if elements:
        _check_placeholders(template, elements[0], interpolate_text)
    return [interpolate_text(template, {**namespace, **names}) for names in elements]


# {item}, {row.column}, {row[column]}, {index}, not the escaped {{item}}.
_ELEMENT_PLACEHOLDER = re.compile(r"(?<!\{)\{((?:item|row|index)\b[^{}]*)\}(?!\})")


def _check_placeholders(
    template: str, first: Mapping[str, Any], interpolate_text: Callable[[str, Mapping[str, Any]], str]
) -> None:
    """A misspelt column or ``{item}`` over a DataFrame would send the same literal text for
    every element: refuse it, naming what each element offers. No placeholder at all is
    allowed (the same question sampled N times) but probably a slip, so it warns."""
    offers = (
        f"{{row.COLUMN}} (columns: {', '.join(map(str, first['row']._values))}) and {{index}}"
        if "row" in first
        else "{item} and {index}"
    )
    used = _ELEMENT_PLACEHOLDER.findall(template)
    if not used:
        warnings.warn(f"The --map prompt names no element, so every prompt is the same; use {offers}.", stacklevel=3)
    for reference in used:
        placeholder = "{" + reference + "}"
        if interpolate_text(placeholder, first) == placeholder:
            raise ParameterError(f"{placeholder} names nothing in the elements of --map: each offers {offers}.")


def answers_into(data: Any, results: Sequence[Any], column: str) -> Any:
    """The answers in the input's shape: a list, a Series with the same index, or a copy of the
    DataFrame with a new column. A prompt that failed or did not finish gets None."""
    answers = [r.text if r.ok else None for r in results]
    if hasattr(data, "iterrows") and hasattr(data, "columns"):
        out = data.copy()
        out[column] = answers
        return out
    if hasattr(data, "items") and hasattr(data, "index") and hasattr(data, "to_list"):
        return type(data)(answers, index=data.index, name=column)
    return answers
