"""How a model writes tool calls: the formats models were trained on, and nbllm's own.

A GGUF's chat template shows which format its model learned. Where the template renders tools
itself (Qwen 2.5 and 3, Hermes, Llama 3.1-3.3), nbllm gives the tools to the template and
constrains the answer to that model's own call format; the model then sees the prompt it was
trained on. Elsewhere (templates without tools, or no template) nbllm describes the tools in a
system message and asks for its own format, a JSON array of calls.

Each format is written here once: what a call looks like (its JSON Schema, and the text around
it), how many calls one answer may hold, and how to read them back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nbllm.core.errors import StructuredOutputError


@dataclass(frozen=True)
class CallSyntax:
    name: str
    opener: str  # what an answer that calls starts with; an answer in text must not start so
    native: bool  # the chat template describes the tools and renders calls and results itself
    arguments_key: str = "arguments"
    # Around each call's JSON object (Hermes' <tool_call> tags); none: the schema is the whole call
    closer: str = ""
    separator: str = ""
    most: int = 1  # calls in one answer

    def call_schema(self, one_call: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON Schema of one framed call, or of the whole answer where nothing frames it."""
        if self is NBLLM:
            return {"type": "array", "items": dict(one_call), "minItems": 1, "maxItems": self.most}
        return dict(one_call)

    @property
    def framed(self) -> bool:
        return bool(self.closer)

    def starts_call(self, text: str) -> bool | None:
        """Whether an answer beginning with ``text`` is calls: True, False, or None (too soon to say)."""
        start, mark = text.lstrip(), self.opener.strip()
        if start.startswith(mark):
            return True
        if not start or mark.startswith(start):
            return None
        return False

    def entries(self, text: str) -> list[Any]:
        """The raw calls an answer holds (JSON values, checked by the caller); a
        ``StructuredOutputError`` when they are not readable."""
        stripped = text.strip()
        try:
            if self is NBLLM:
                raw = json.loads(stripped)
                if not isinstance(raw, list) or not raw:
                    raise StructuredOutputError("Tool calls must be a non-empty JSON array of calls.", text)
                return raw
            if self.framed:
                found = [json.loads(part) for part in self._framed_parts(stripped)]
                if not found:
                    raise StructuredOutputError(
                        f"No complete {self.opener.strip()}...{self.closer.strip()} call.", text
                    )
                return found
            return [json.loads(stripped)]
        except ValueError as error:
            raise StructuredOutputError(f"The tool calls are not valid JSON: {error}.", text) from error
        except RecursionError:  # JSON nested thousands deep
            raise StructuredOutputError("The tool calls are nested too deeply to read.", text) from None

    def _framed_parts(self, text: str) -> list[str]:
        """What stands between each opener and the closer after it, in one pass over the text (a
        regular expression would rescan to the end from every opener without a closer)."""
        opener, closer = self.opener.strip(), self.closer.strip()
        parts, at = [], 0
        while (start := text.find(opener, at)) != -1:
            end = text.find(closer, start + len(opener))
            if end == -1:
                break
            parts.append(text[start + len(opener) : end].strip())
            at = end + len(closer)
        return parts

    def arguments_of(self, entry: Mapping[str, Any]) -> Any:
        # Llama 3 writes "parameters"; a model that writes "arguments" anyway is understood.
        return entry.get(self.arguments_key, entry.get("arguments", {}))


# nbllm's own: described in a system message (core/tools.py instructions), any template.
NBLLM = CallSyntax("nbllm", opener="[", native=False, most=4)
# Hermes 2 Pro's format, taken up by Qwen 2.5 / Qwen 3 and others:
#   <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, one block per call.
HERMES = CallSyntax("hermes", opener="<tool_call>\n", native=True, closer="\n</tool_call>", separator="\n", most=4)
# Llama 3.1-3.3 (custom tools): {"name": ..., "parameters": {...}}, one call per answer (its
# template refuses to render more).
LLAMA3 = CallSyntax("llama3", opener="{", native=True, arguments_key="parameters")


def syntax_for_template(source: str | None) -> CallSyntax:
    """The call format a chat template's model was trained on (nbllm's own when it shows none).

    Recognised by what each family's template writes, not by the model's name: fine-tunes
    keep their base's template."""
    if not source or "tools" not in source:
        return NBLLM
    if "<tool_call>" in source and "</tool_call>" in source:
        return HERMES
    if "<|start_header_id|>" in source and '"parameters": ' in source and "ipython" in source:
        return LLAMA3
    return NBLLM
