"""Per-call generation parameters: defaults from config, validated before llama.cpp sees them."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nbllm.core.config import Generation, check_value
from nbllm.core.errors import ParameterError, SchemaError, did_you_mean
from nbllm.core.schema import Constraint, make_constraint
from nbllm.core.tools import ToolSet, make_toolset

# Per-call name -> the config field that gives its default, range and help text.
_CONFIG_FIELD = {
    "temperature": "default_temperature",
    "max_tokens": "default_max_tokens",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "speculation": "speculation",
    "draft_model": "draft_model",
}
PARAM_NAMES = (*_CONFIG_FIELD, "stop", "ignore_eos", "schema", "choices", "tools", "tool_choice")
MAX_STOPS = 16


@dataclass(frozen=True)
class GenerationParams:
    temperature: float
    max_tokens: int
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int | None
    stop: tuple[str, ...] = ()
    # Keep generating past end-of-sequence tokens, up to max_tokens: for throughput benchmarks
    # (llama.cpp's own tools decode fixed token counts), not for answers.
    ignore_eos: bool = False
    # Structured output (core/schema.py): what the answer must be, or None for free text.
    constraint: Constraint | None = None
    # Tool calls (core/tools.py): the tools the model may call; their grammar is ``constraint``.
    tools: ToolSet | None = None
    # Speculative decoding (core/speculation.py): auto | off. How fast, not what: left out
    # of cache keys and records (as_dict).
    speculation: str = "auto"
    # A smaller model of the same vocabulary that drafts (backends/llama_cpp_draft.py): a name
    # or path as given; the engine hands the backend its file's path. None: drafts come from
    # the text so far. Left out of cache keys and records too.
    draft_model: str | None = None

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools for a chat template that renders them itself (None: nbllm describes them)."""
        return self.tools.for_template() if self.tools is not None else None

    def with_tools(self, tools: ToolSet) -> GenerationParams:
        """These parameters with ``tools`` written in another call format (and its grammar)."""
        return dataclasses.replace(self, tools=tools, constraint=tools.constraint())

    def as_dict(self) -> dict[str, Any]:
        """Plain data (cache keys, provenance): a constraint by its kind, name and hash."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["stop"] = list(self.stop)
        del data["speculation"], data["draft_model"]
        if self.constraint is None:
            del data["constraint"]  # keys of answers cached before structured output stay valid
        else:
            data["constraint"] = self.constraint.describe()
        if self.tools is None:
            del data["tools"]
        else:
            data["tools"] = self.tools.describe()
        return data


def _check_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise ParameterError(f"stop = {value!r}: must be a string or a list of strings.")
    stops = tuple(s for s in items if s)
    if len(stops) > MAX_STOPS:
        raise ParameterError(f"stop has {len(stops)} sequences: at most {MAX_STOPS} are allowed.")
    return stops


def resolve_params(defaults: Generation, overrides: Mapping[str, Any]) -> GenerationParams:
    """Validated parameters: each override checked against its config declaration."""
    hints = typing.get_type_hints(Generation)
    fields = {f.name: f for f in dataclasses.fields(Generation)}
    values: dict[str, Any] = {}
    for name, config_name in _CONFIG_FIELD.items():
        if name in overrides and overrides[name] is not None:
            meta = fields[config_name].metadata
            values[name] = check_value(name, overrides[name], hints[config_name], meta, error=ParameterError)
        else:
            values[name] = getattr(defaults, config_name)
    unknown = [name for name in overrides if name not in PARAM_NAMES]
    if unknown:
        name = unknown[0]
        raise ParameterError(
            f"Unknown generation parameter {name!r}.{did_you_mean(name, PARAM_NAMES)} "
            f"Known parameters: {', '.join(PARAM_NAMES)}."
        )
    ignore_eos = overrides.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ParameterError(f"ignore_eos = {ignore_eos!r}: must be true or false.")
    constraint = make_constraint(overrides.get("schema"), overrides.get("choices"))
    tools = make_toolset(overrides.get("tools"), overrides.get("tool_choice"))
    if tools is not None:
        if constraint is not None:
            raise SchemaError("Give tools= or schema= / choices=, not both.")
        constraint = tools.constraint()
    return GenerationParams(
        stop=_check_stop(overrides.get("stop")), ignore_eos=ignore_eos, constraint=constraint, tools=tools, **values
    )
