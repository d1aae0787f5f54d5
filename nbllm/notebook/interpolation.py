"""``{name}`` in a ``%%llm`` prompt, its options and ``%llm`` lines, filled from the notebook's variables."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

_FIELD = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[[^\[\]{}]+\])*"
_PLACEHOLDER = re.compile(r"\{\{(" + _FIELD + r")\}\}|\{(" + _FIELD + r")\}")
_ACCESS = re.compile(r"\.([A-Za-z_]\w*)|\[([^\[\]{}]+)\]")


class _Unresolved(Exception):
    pass


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    """Fill ``{name}``, ``{obj.attr}`` and ``{d[key]}`` from ``namespace``; leave other braces alone.

    Prompts often carry JSON or code, so anything that is not a simple reference to an
    existing variable stays as written; ``{{name}}`` is the escape for a literal ``{name}``.
    """

    def replace(match: re.Match[str]) -> str:
        escaped, reference = match.groups()
        if escaped is not None:
            return "{" + escaped + "}"
        try:
            return str(_resolve(reference, namespace))
        except _Unresolved:
            return match.group(0)

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
