"""Structured output: what an answer must look like, checked before any model work.

A ``Constraint`` is one of three kinds:

- ``json``: any JSON object (JSON mode; ``--format json``, OpenAI's ``json_object``);
- ``schema``: a JSON Schema, given as a dict, a pydantic model class or a Python type such as
  ``list[str]`` or ``Literal["a", "b"]`` (pydantic turns the last two into a schema);
- ``choices``: exactly one of some strings, as plain text (classification).

A backend that constrains decoding (llama.cpp's grammar sampler) turns it into a grammar; a
remote backend passes it on as OpenAI's ``response_format``. Either way the answer is then
parsed here (``Constraint.parse``) into ``Completion.data``.

Only what the grammar converter honours is accepted (``SUPPORTED``): a keyword it would ignore
would let an answer through that does not fit the schema, so it is a ``SchemaError`` naming the
keyword and its path instead. Recursive schemas are refused for the same reason as huge enums:
grammars from them can grow without bound.
"""

from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nbllm.core.errors import SchemaError, StructuredOutputError
from nbllm.core.tool_syntax import CallSyntax

# Keywords llama.cpp's JSON-schema-to-grammar converter (the one llama-cpp-python ships)
# enforces, and keywords that only describe (annotations) and constrain nothing.
SUPPORTED = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
        "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern",
        "format", "minLength", "maxLength",
    }
)  # fmt: skip
ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
        "readOnly", "writeOnly", "discriminator",
    }
)  # fmt: skip
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
FORMATS = frozenset({"date", "time", "date-time", "uuid"})
MAX_ENUM_VALUES = 4096  # per enum, and for choices
MAX_SCHEMA_BYTES = 256 * 1024
MAX_DEPTH = 32
MAX_CHOICE_CHARS = 512


@dataclass(frozen=True)
class Constraint:
    """What an answer must be; ``digest`` identifies it in cache keys and provenance."""

    kind: str  # "json", "schema" or "choices"
    name: str  # for people: the class's name, "list[str]", "3 choices", "JSON object"
    schema: Mapping[str, Any] = field(compare=False)  # JSON Schema (for choices: a string enum)
    choices: tuple[str, ...] = ()
    digest: str = ""
    _parse: Callable[[str], Any] | None = field(default=None, compare=False, repr=False)
    # Tool calls: the model's call format (core/tool_syntax.py), which frames the schema's value
    # in the grammar; with kind "tools" the answer may be text instead, not starting as a call.
    syntax: CallSyntax | None = field(default=None, compare=False)

    def describe(self) -> dict[str, Any]:
        """For cache keys, stats and provenance: the kind, the name and the schema's hash."""
        return {"kind": self.kind, "name": self.name, "sha256": self.digest}

    def parse(self, text: str) -> Any:
        """The answer as data: the pydantic instance, the parsed JSON, or the choice."""
        if self.kind == "choices":
            answer = text.strip()
            if answer not in self.choices and answer.startswith('"'):
                # From a remote server, given the choices as a JSON string enum: "positive".
                try:
                    answer = str(json.loads(answer))
                except ValueError:
                    pass
            if answer not in self.choices:
                raise StructuredOutputError(f"The answer {answer[:80]!r} is not one of the choices.", text)
            return answer
        try:
            if self._parse is not None:
                return self._parse(text)
            value = json.loads(text)
        except Exception as error:  # json.JSONDecodeError, pydantic.ValidationError
            raise StructuredOutputError(f"The answer does not fit {self.name}: {short_message(error)}", text) from error
        _validate(value, self.schema, self.name, text)
        return value

    def response_format(self) -> dict[str, Any]:
        """OpenAI's ``response_format`` for this constraint (what remote backends send)."""
        if self.kind == "json":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": _safe_name(self.name), "schema": dict(self.schema)}}


def make_constraint(schema: Any = None, choices: Any = None) -> Constraint | None:
    """The ``Constraint`` for a request's ``schema=`` / ``choices=`` (None when neither is given)."""
    if schema is not None and choices is not None:
        raise SchemaError("Give schema= or choices=, not both.")
    if choices is not None:
        return _choices(choices)
    if schema is None:
        return None
    if isinstance(schema, str):
        if schema.strip().lower() == "json":
            return json_mode()
        raise SchemaError(
            f"schema={schema[:40]!r}: a string schema must be 'json' (any JSON object). Give a JSON Schema as a "
            "dict, a pydantic model class, or a Python type such as list[str]."
        )
    if isinstance(schema, Mapping):
        return from_json_schema(schema)
    return _from_python(schema)


def json_mode() -> Constraint:
    schema = {"type": "object"}
    return Constraint("json", "JSON object", schema, digest=_digest(schema))


def from_json_schema(
    schema: Mapping[str, Any], name: str | None = None, parse: Callable[[str], Any] | None = None
) -> Constraint:
    try:
        text = json.dumps(schema, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise SchemaError(f"The schema is not JSON: {error}.") from error
    if len(text) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"The schema is {len(text):,} bytes of JSON; at most {MAX_SCHEMA_BYTES:,} are accepted.")
    # A plain copy in the caller's order (properties are generated in it): later changes to the
    # caller's dict change nothing here. The digest is of the sorted text.
    plain = json.loads(json.dumps(schema, allow_nan=False))
    if not isinstance(plain, dict):
        raise SchemaError("A JSON Schema is an object (a dict).")
    check(plain)
    title = plain.get("title")
    label = name or (title if isinstance(title, str) and title else _schema_label(plain))
    return Constraint("schema", label, plain, digest=hashlib.sha256(text.encode()).hexdigest(), _parse=parse)


def _from_python(target: Any) -> Constraint:
    try:
        import pydantic
    except ImportError as error:  # pragma: no cover - pydantic is a dependency
        raise SchemaError("Schemas from Python classes and types need pydantic: pip install pydantic.") from error
    if isinstance(target, type) and issubclass(target, pydantic.BaseModel):
        try:
            schema = target.model_json_schema()
        except Exception as error:  # pydantic's own errors for fields it cannot describe
            raise SchemaError(
                f"{target.__name__} cannot be described as a JSON Schema: {_first_line(error)}"
            ) from error
        return from_json_schema(schema, name=target.__name__, parse=target.model_validate_json)
    if not _looks_like_a_type(target):
        raise SchemaError(
            f"schema={_shown(target)} is not a schema: give a pydantic model class, a JSON Schema dict, a Python "
            "type such as list[str] or Literal['a', 'b'], or 'json'."
        )
    try:
        adapter = pydantic.TypeAdapter(target)
        schema = adapter.json_schema()
    except Exception as error:  # a type pydantic cannot describe (a file handle, a lock...)
        raise SchemaError(
            f"schema={_shown(target)} cannot be described as a JSON Schema: {_first_line(error)}"
        ) from error
    return from_json_schema(schema, name=_shown(target), parse=adapter.validate_json)


def _choices(choices: Any) -> Constraint:
    if isinstance(choices, str):
        items: list[Any] = [c.strip() for c in choices.split(",")]
    elif isinstance(choices, (Sequence, set, frozenset)) or hasattr(choices, "__iter__"):
        items = list(choices)
    else:
        raise SchemaError(f"choices={_shown(choices)}: give a list of strings, e.g. choices=['yes', 'no'].")
    if not items:
        raise SchemaError("choices is empty: give at least one answer the model may choose.")
    if len(items) > MAX_ENUM_VALUES:
        raise SchemaError(f"{len(items):,} choices: at most {MAX_ENUM_VALUES:,} are accepted.")
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise SchemaError(f"choices: {item!r} is not a non-empty string; every choice must be one.")
        if len(item) > MAX_CHOICE_CHARS:
            raise SchemaError(f"choices: {item[:40]!r}... is {len(item):,} characters; at most {MAX_CHOICE_CHARS}.")
    unique = tuple(dict.fromkeys(item.strip() for item in items))
    schema = {"type": "string", "enum": list(unique)}
    return Constraint("choices", f"{len(unique)} choices", schema, choices=unique, digest=_digest(schema))


# ---------------------------------------------------------------------------- checks


def check(schema: dict[str, Any]) -> None:
    """Refuse what the grammar cannot enforce: unknown or unsupported keywords, references
    that are not local or that loop, huge enums, too deep nesting."""
    definitions = {**_mapping(schema.get("definitions")), **_mapping(schema.get("$defs"))}
    for path, node in _subschemas(schema, "#", 0):
        for keyword, value in node.items():
            where = f"{path}/{keyword}"
            if keyword in ANNOTATIONS:
                continue
            if keyword not in SUPPORTED:
                raise SchemaError(
                    f"The schema keyword {keyword!r} at {where} cannot be enforced while generating, so it is refused "
                    f"rather than ignored. Supported: {', '.join(sorted(SUPPORTED))}."
                )
            _check_value(keyword, value, where)
    _refuse_recursion(schema, definitions)


def _check_value(keyword: str, value: Any, where: str) -> None:
    if keyword == "type":
        names = value if isinstance(value, list) else [value]
        for name in names:
            if name not in TYPES:
                raise SchemaError(f"type {name!r} at {where} is not a JSON Schema type ({', '.join(sorted(TYPES))}).")
    elif keyword == "format" and value not in FORMATS:
        raise SchemaError(
            f"format {value!r} at {where} cannot be enforced while generating; supported formats: "
            f"{', '.join(sorted(FORMATS))}. Remove it, or use a pattern."
        )
    elif keyword == "enum":
        if not isinstance(value, list) or not value:
            raise SchemaError(f"enum at {where} must be a non-empty list.")
        if len(value) > MAX_ENUM_VALUES:
            raise SchemaError(f"enum at {where} has {len(value):,} values; at most {MAX_ENUM_VALUES:,} are accepted.")
    elif keyword == "$ref" and not (isinstance(value, str) and value.startswith(("#/$defs/", "#/definitions/"))):
        raise SchemaError(
            f"$ref {value!r} at {where}: only references inside the schema (#/$defs/...) are followed; nothing is "
            "fetched."
        )
    elif keyword in ("minItems", "maxItems", "minLength", "maxLength"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SchemaError(f"{keyword} at {where} must be a non-negative integer, not {value!r}.")
        if value > 10_000:
            raise SchemaError(f"{keyword} = {value:,} at {where}: at most 10,000 can be enforced.")
    elif keyword in ("anyOf", "oneOf", "allOf", "prefixItems") and (not isinstance(value, list) or not value):
        raise SchemaError(f"{keyword} at {where} must be a non-empty list of schemas.")
    elif keyword == "required" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise SchemaError(f"required at {where} must be a list of property names.")


def _subschemas(node: Any, path: str, depth: int) -> Iterator[tuple[str, dict[str, Any]]]:
    if depth > MAX_DEPTH:
        raise SchemaError(f"The schema is nested more than {MAX_DEPTH} levels deep (at {path}).")
    if not isinstance(node, dict):
        if isinstance(node, bool):  # true / false are schemas too (anything / nothing)
            return
        raise SchemaError(f"{path} is {type(node).__name__}, not a schema (an object).")
    yield path, node
    for keyword in ("properties", "$defs", "definitions"):
        for key, child in _mapping(node.get(keyword)).items():
            yield from _subschemas(child, f"{path}/{keyword}/{key}", depth + 1)
    for keyword in ("anyOf", "oneOf", "allOf", "prefixItems"):
        children = node.get(keyword)
        if isinstance(children, list):
            for index, child in enumerate(children):
                yield from _subschemas(child, f"{path}/{keyword}/{index}", depth + 1)
    items = node.get("items")
    if isinstance(items, list):
        for index, child in enumerate(items):
            yield from _subschemas(child, f"{path}/items/{index}", depth + 1)
    elif items is not None:
        yield from _subschemas(items, f"{path}/items", depth + 1)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        yield from _subschemas(extra, f"{path}/additionalProperties", depth + 1)


def _refuse_recursion(schema: dict[str, Any], definitions: Mapping[str, Any]) -> None:
    def refs(node: Any) -> Iterator[str]:
        for _path, sub in _subschemas(node, "#", 0):
            ref = sub.get("$ref")
            if isinstance(ref, str):
                yield ref.rsplit("/", 1)[-1]

    graph = {name: set(refs({k: v for k, v in _mapping(body).items() if k not in ("$defs", "definitions")}))
             for name, body in definitions.items()}  # fmt: skip
    for name in set(refs({k: v for k, v in schema.items() if k not in ("$defs", "definitions")})):
        if name not in definitions:
            raise SchemaError(f"$ref to {name!r}: there is no such definition in the schema's $defs.")
    for name, targets in graph.items():
        for target in targets:
            if target not in definitions:
                raise SchemaError(f"$ref to {target!r} in {name!r}: there is no such definition in the schema's $defs.")

    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                loop = (
                    " -> ".join([*trail[trail.index(target) :], target]) if target in trail else f"{name} -> {target}"
                )
                raise SchemaError(
                    f"The schema is recursive ({loop}): recursive schemas are not supported, since the grammar for "
                    "them has no bound. Give the nesting a fixed depth."
                )
            if state.get(target) is None:
                visit(target, [*trail, target])
        state[name] = 2

    for name in sorted(graph):
        if state.get(name) is None:
            visit(name, [name])


def _validate(value: Any, schema: Mapping[str, Any], name: str, text: str) -> None:
    """A parsed answer checked against its schema (jsonschema), for what a remote server or a
    JSON-mode answer may not have enforced."""
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - a dependency; without it the grammar is the check
        return
    try:
        jsonschema.validate(value, dict(schema))
    except jsonschema.ValidationError as error:
        raise StructuredOutputError(f"The answer does not fit {name}: {error.message}.", text) from error


# ---------------------------------------------------------------------------- helpers


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _digest(schema: Any) -> str:
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()


def _looks_like_a_type(target: Any) -> bool:
    return isinstance(target, type) or typing.get_origin(target) is not None


def _shown(target: Any) -> str:
    if isinstance(target, type):
        return target.__name__
    text = repr(target).replace("typing.", "")
    return text if len(text) <= 60 else text[:57] + "..."


def _schema_label(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    return f"a JSON Schema ({kind})" if isinstance(kind, str) else "a JSON Schema"


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in name).strip("_")
    return cleaned[:64] or "answer"


def short_message(error: BaseException) -> str:
    """An error's message on one line, at most 300 characters (pydantic's run to many lines)."""
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
