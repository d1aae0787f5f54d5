"""Tool calls: Python functions (or OpenAI tool dicts) a model may call, and the calls it makes.

A ``ToolSet`` is the tools of one request and how they may be used (``tool_choice``). It turns
into a ``Constraint`` (core/schema.py) whose grammar lets the model answer either in text or
with calls, each naming a real tool with arguments that fit its schema: a call always parses.
The calls are written in the model's own format where its chat template has one (Qwen's
``<tool_call>`` blocks, Llama 3's JSON; the template describes the tools), else in nbllm's, a
JSON array ``[{"name": ..., "arguments": {...}}]`` that nbllm's instructions (``instructions``)
describe in a system message (core/tool_syntax.py).

Nothing the model writes is ever evaluated: a call names a function from the set it was given,
and its arguments are validated (pydantic) before the function runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import secrets
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nbllm.core.errors import SchemaError, StructuredOutputError
from nbllm.core.schema import Constraint, check, short_message
from nbllm.core.tool_syntax import NBLLM, CallSyntax

MAX_TOOLS = 64
CHOICES = ("auto", "none", "required")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any] = field(compare=False)  # JSON Schema of the arguments: an object
    function: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    validate: Callable[[Mapping[str, Any]], dict[str, Any]] | None = field(default=None, compare=False, repr=False)

    def as_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)},
        }


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: which tool, with which (validated) arguments."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(8))

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }


@dataclass(frozen=True)
class ToolSet:
    tools: tuple[Tool, ...]
    choice: str = "auto"  # auto | none | required | a tool's name
    syntax: CallSyntax = NBLLM  # how the model writes calls: set per model (Engine.make_request)

    @property
    def digest(self) -> str:
        text = json.dumps([[t.as_openai() for t in self.tools], self.choice, self.syntax.name], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        described = {"tools": [t.name for t in self.tools], "choice": self.choice, "sha256": self.digest}
        if self.syntax is not NBLLM:  # keys of answers cached before native formats stay valid
            described["syntax"] = self.syntax.name
        return described

    def written_as(self, syntax: CallSyntax) -> ToolSet:
        return dataclasses.replace(self, syntax=syntax)

    def for_template(self) -> list[dict[str, Any]] | None:
        """The tools as a chat template that renders them takes them (None: described by nbllm)."""
        if not self.syntax.native or self.choice == "none":
            return None
        return [t.as_openai() for t in self.tools]

    def starts_call(self, text: str) -> bool | None:
        """Whether an answer beginning with ``text`` is calls (None: too soon to say)."""
        return self.syntax.starts_call(text)

    def by_name(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)

    def constraint(self) -> Constraint | None:
        """The grammar's shape: text or calls (auto), calls only (required, or one named tool)."""
        if self.choice == "none":
            return None
        allowed = [t for t in self.tools if self.choice in ("auto", "required") or t.name == self.choice]
        one_call = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, self.syntax.arguments_key: dict(t.parameters)},
                "required": ["name", self.syntax.arguments_key],
            }
            for t in allowed
        ]
        items = one_call[0] if len(one_call) == 1 else {"anyOf": one_call}
        schema = self.syntax.call_schema(items)
        kind = "tools" if self.choice == "auto" else "schema"
        name = f"calls to {', '.join(t.name for t in allowed)}"
        return Constraint(kind, name, schema, digest=self.digest, _parse=self._parse_calls, syntax=self.syntax)

    def _parse_calls(self, text: str) -> list[ToolCall]:
        return self.parse(text) or []

    def parse(self, text: str) -> list[ToolCall] | None:
        """The calls in an answer, or None when the answer is text. Arguments that do not fit
        (possible only from a remote server) or an unknown tool are a ``StructuredOutputError``."""
        if not self.starts_call(text):
            if self.choice not in ("auto", "none"):
                raise StructuredOutputError(
                    f"The answer is text, but tool_choice={self.choice!r} asks for a call.", text
                )
            return None
        raw = self.syntax.entries(text)
        calls = []
        for index, entry in enumerate(raw):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise StructuredOutputError(f"Call {index} has no tool name.", text)
            tool = self.by_name(entry["name"])
            if tool is None:
                known = ", ".join(t.name for t in self.tools)
                raise StructuredOutputError(
                    f"Call {index} names {entry['name']!r}, which is not a tool ({known}).", text
                )
            arguments = self.syntax.arguments_of(entry)
            if not isinstance(arguments, dict):
                raise StructuredOutputError(f"Call {index} to {tool.name}: arguments must be an object.", text)
            if tool.validate is not None:
                try:
                    arguments = tool.validate(arguments)
                except Exception as error:  # pydantic.ValidationError
                    raise StructuredOutputError(f"Call {index} to {tool.name}: {short_message(error)}", text) from error
            calls.append(ToolCall(tool.name, arguments))
        return calls

    def instructions(self) -> str:
        """What the model is told about the tools (a system message)."""
        lines = [
            "You can call these tools:",
            *(
                f"- {t.name}: {t.description or 'no description'} Arguments (JSON Schema): "
                f"{json.dumps(t.parameters, separators=(',', ':'))}"
                for t in self.tools
            ),
            'To call tools, answer with only a JSON array of calls, e.g. [{"name": "tool_name", "arguments": {...}}]. '
            "A tool's result comes back in the next message. When you have what you need, answer in plain text.",
        ]
        if self.choice == "required":
            lines.append("Answer with a tool call now.")
        elif self.choice not in ("auto", "none"):
            lines.append(f"Call {self.choice} now.")
        return "\n".join(lines)


def make_toolset(tools: Any, choice: Any = None) -> ToolSet | None:
    """The ``ToolSet`` for a request's ``tools=`` / ``tool_choice=`` (None without tools)."""
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise SchemaError(f"tool_choice={choice!r} needs tools=[...].")
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        tools = [tools]
    if not tools:
        raise SchemaError("tools is empty: give at least one function (or OpenAI tool dict).")
    if len(tools) > MAX_TOOLS:
        raise SchemaError(f"{len(tools)} tools: at most {MAX_TOOLS} are accepted.")
    made = tuple(make_tool(item) for item in tools)
    names = [t.name for t in made]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SchemaError(f"Two tools are named {duplicates[0]!r}: tool names must be unique.")
    choice = _choice(choice, names)
    return ToolSet(made, choice)


def _choice(choice: Any, names: Sequence[str]) -> str:
    if choice is None:
        return "auto"
    if isinstance(choice, Mapping):  # OpenAI's {"type": "function", "function": {"name": ...}}
        function = choice.get("function")
        choice = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(choice, str) or (choice not in CHOICES and choice not in names):
        raise SchemaError(
            f"tool_choice={choice!r}: use 'auto', 'none', 'required' or a tool's name ({', '.join(names)})."
        )
    return choice


def make_tool(item: Any) -> Tool:
    if isinstance(item, Tool):
        return item
    if isinstance(item, Mapping):
        return _from_openai(item)
    if callable(item):
        return _from_function(item)
    raise SchemaError(f"{item!r} is not a tool: give a Python function or an OpenAI tool dict.")


def _from_openai(item: Mapping[str, Any]) -> Tool:
    spec = item.get("function", item) if item.get("type", "function") == "function" else None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise SchemaError('An OpenAI tool is {"type": "function", "function": {"name": ..., "parameters": {...}}}.')
    name = _check_name(spec["name"])
    parameters = spec.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, Mapping):
        raise SchemaError(f"Tool {name}: parameters must be a JSON Schema object.")
    parameters = json.loads(json.dumps(parameters))
    _check_parameters(name, parameters)
    description = spec.get("description") or ""
    return Tool(name, str(description), parameters)


def _from_function(function: Callable[..., Any]) -> Tool:
    import pydantic

    name = _check_name(getattr(function, "__name__", ""))
    try:
        signature = inspect.signature(function)
        hints = typing.get_type_hints(function)
    except (TypeError, ValueError, NameError) as error:
        raise SchemaError(f"Tool {name}: its signature cannot be read ({error}).") from error
    fields: dict[str, Any] = {}
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise SchemaError(
                f"Tool {name}: parameter {parameter.name!r} (*args/**kwargs) cannot be described as JSON."
            )
        annotation = hints.get(parameter.name, Any)
        try:
            pydantic.TypeAdapter(annotation).json_schema()
        except Exception as error:
            raise SchemaError(
                f"Tool {name}: parameter {parameter.name!r} ({_type_name(annotation)}) cannot be described as JSON, so "
                "a model cannot pass it. Give it a JSON-friendly type (str, int, float, bool, list, dict, a pydantic "
                "model) or leave it out of the tool."
            ) from error
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (annotation, default)
    model = pydantic.create_model(f"{name}_arguments", **fields)
    parameters = model.model_json_schema()
    parameters.pop("title", None)
    _check_parameters(name, parameters)

    def validate(arguments: Mapping[str, Any]) -> dict[str, Any]:
        return dict(model.model_validate(dict(arguments)))

    doc = inspect.getdoc(function) or ""
    description = doc.split("\n\n")[0].replace("\n", " ").strip()
    return Tool(name, description, parameters, function, validate)


def _check_parameters(name: str, parameters: dict[str, Any]) -> None:
    if parameters.get("type") != "object":
        raise SchemaError(f"Tool {name}: parameters must be a JSON Schema of type object.")
    try:
        check(parameters)
    except SchemaError as error:
        raise SchemaError(f"Tool {name}: {error}") from None


def _check_name(name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        raise SchemaError(f"Tool name {name!r}: use 1-64 letters, digits, '_' or '-' (OpenAI's rule).")
    return name


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else repr(annotation).replace("typing.", "")


def with_tool_instructions(messages: list[dict[str, str]], tools: ToolSet) -> list[dict[str, str]]:
    """The conversation with the tools described in its system message (added if it has none)."""
    note = tools.instructions()
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{note}"}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]
