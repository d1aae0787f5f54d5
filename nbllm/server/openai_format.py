"""OpenAI's chat and completion API, translated to nbllm requests and back.

Pure data: a JSON body in, the pieces of an engine request out (or an ``ApiError`` naming the
offending field), and answers, stream chunks and errors shaped exactly as OpenAI's clients expect.
No web framework here: ``nbllm.server.routes`` does the HTTP, this module the vocabulary, so both can
be read (and tested) on their own.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from nbllm.core.errors import (
    ContextLengthError,
    GpuOutOfMemoryError,
    InsufficientMemoryError,
    ModelLoadError,
    ModelNotFoundError,
    NbllmError,
    ParameterError,
    SchemaError,
    StructuredOutputError,
)
from nbllm.core.metrics import RequestStats
from nbllm.core.tools import ToolCall, ToolSet

Kind = Literal["chat", "completion"]

# Sampling parameters whose OpenAI name is also nbllm's (the engine validates their ranges).
SAMPLING = (
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    # llama.cpp's own, as llama.cpp's server accepts them
    "top_k",
    "min_p",
    "repeat_penalty",
)
# Accepted and ignored: bookkeeping that changes nothing about a local answer.
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options")


def _absent(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def _one(value: Any) -> bool:
    return value is None or value == 1


def _no_tool_choice(value: Any) -> bool:
    return value is None or value in ("none", "auto")


def _plain_text_format(value: Any) -> bool:
    return value is None or value == {"type": "text"}


def _text_only(value: Any) -> bool:
    return value is None or value == ["text"]


# Features a plain local generation cannot honour: refused unless given their "off" value, so
# a client never silently gets less than it asked for.
_UNSUPPORTED_CHAT: dict[str, Callable[[Any], bool]] = {
    "n": _one,
    "logprobs": _absent,
    "top_logprobs": _absent,
    "logit_bias": _absent,
    "functions": _absent,
    "function_call": _no_tool_choice,
    "modalities": _text_only,
    "audio": _absent,
    "prediction": _absent,
    "reasoning_effort": _absent,
    "web_search_options": _absent,
}
_UNSUPPORTED_COMPLETION: dict[str, Callable[[Any], bool]] = {
    "n": _one,
    "best_of": _one,
    "logprobs": _absent,
    "logit_bias": _absent,
    "echo": _absent,
    "suffix": _absent,
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Longer than any real model name (a Hugging Face "org/repo:quant" is well under 100 characters)
# and short enough that a name is never more than a line in an error message or a log.
MAX_MODEL_NAME_CHARS = 256


class ApiError(Exception):
    """An error as OpenAI reports it: an HTTP status and ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ParsedRequest:
    """An OpenAI request, checked: what the engine needs, and how to answer."""

    kind: Kind
    model: str | None
    params: dict[str, Any]
    stream: bool
    include_usage: bool = False
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None

    @property
    def input_param(self) -> str:
        """The field a too-long input is blamed on."""
        return "messages" if self.kind == "chat" else "prompt"


def parse_request(kind: Kind, body: Any, *, max_tokens_limit: int, default_max_tokens: int) -> ParsedRequest:
    """Check an OpenAI request body; raise ``ApiError`` (400) naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise _bad(f"The request body must be a JSON object, not {type(body).__name__}.")
    unsupported = _UNSUPPORTED_CHAT if kind == "chat" else _UNSUPPORTED_COMPLETION
    required = "messages" if kind == "chat" else "prompt"
    known = {
        "model", "stream", "max_tokens", "max_completion_tokens", "response_format", required, *SAMPLING, *IGNORED,
        *unsupported, *(("tools", "tool_choice") if kind == "chat" else ()),
    }  # fmt: skip
    for name, value in body.items():
        if name not in known:
            raise _bad(f"Unrecognized request argument supplied: {name}. Remove it from the request.", name)
        if name in unsupported and not unsupported[name](value):
            raise _bad(_unsupported_message(name, value), name, "unsupported_parameter")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise _bad("model must be the name of a model; GET /v1/models lists them.", "model")
    if model is not None:
        check_model_name(model)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad(f"stream = {stream!r}: must be true or false.", "stream")
    params = {name: body[name] for name in SAMPLING if body.get(name) is not None}
    params["max_tokens"] = _max_tokens(body, max_tokens_limit, default_max_tokens)
    schema = response_format_schema(body.get("response_format"))
    if schema is not None:
        params["schema"] = schema
    if kind == "chat" and body.get("tools") not in (None, []):
        if not isinstance(body["tools"], list):
            raise _bad("tools must be a list of OpenAI tools.", "tools")
        params["tools"] = body["tools"]
        if body.get("tool_choice") is not None:
            params["tool_choice"] = body["tool_choice"]
    elif kind == "chat" and body.get("tool_choice") not in (None, "none", "auto"):
        raise _bad("tool_choice needs tools.", "tool_choice")
    include_usage = stream and _include_usage(body)
    if kind == "chat":
        return ParsedRequest(kind, model, params, stream, include_usage, messages=_messages(body.get("messages")))
    return ParsedRequest(kind, model, params, stream, include_usage, prompt=_prompt(body.get("prompt")))


def response_format_schema(value: Any) -> Any:
    """OpenAI's ``response_format`` as nbllm's ``schema=``: None for plain text, ``"json"`` for
    ``json_object``, the JSON Schema for ``json_schema`` (and for llama-cpp-python's and LM
    Studio's ``{"type": "json_object", "schema": ...}``). The schema itself is checked by the
    engine (an unsupported keyword is a 400 naming it)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _bad('response_format must be an object with a "type": "text", "json_object" or "json_schema".',
                   "response_format")  # fmt: skip
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("schema")
        if schema is None:
            return "json"
        if not isinstance(schema, dict):
            raise _bad("response_format.schema must be a JSON Schema object.", "response_format")
        return schema
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise _bad(
                'response_format of type "json_schema" needs "json_schema": {"name": ..., "schema": {...}}.',
                "response_format",
            )
        return spec["schema"]
    raise _bad(
        f'response_format type {kind[:40]!r} is not supported: use "text", "json_object" or "json_schema".',
        "response_format",
    )


def check_model_name(name: str) -> None:
    """A 400 for a name no model can have. Checked before the name goes anywhere near the
    registry: a 100,000-character name once reached the file system (a 500 that printed the
    models folder)."""
    if len(name) > MAX_MODEL_NAME_CHARS:
        raise _bad(
            f"model is {len(name):,} characters long; model names have at most {MAX_MODEL_NAME_CHARS}. "
            "GET /v1/models lists the names this server has.",
            "model",
            "model_name_too_long",
        )


def _unsupported_message(name: str, value: Any) -> str:
    if name in ("n", "best_of"):
        return (
            f"{name} = {value!r}: this server generates one answer per request. "
            "Send several requests (with different seeds) instead."
        )
    return (
        f"{name} is not supported by this server: it generates plain text with a local model. "
        f"Remove {name} from the request."
    )


def _max_tokens(body: Mapping[str, Any], limit: int, default: int) -> int:
    """``max_completion_tokens`` (OpenAI's current name) or ``max_tokens``, bounded by the server."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(f"{name} = {value!r}: must be a whole number of tokens, at least 1.", name)
        if value > limit:
            raise _bad(
                f"{name} = {value} is above this server's limit of {limit} tokens per answer. "
                f"Ask for at most {limit}, or start the server with a higher --max-tokens-limit.",
                name,
                "max_tokens_too_large",
            )
        return value
    return min(default, limit)


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _bad('stream_options must be an object such as {"include_usage": true}.', "stream_options")
    return bool(options.get("include_usage", False))


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _bad('messages must be a non-empty list such as [{"role": "user", "content": "Hello"}].', "messages")
    return [_message(index, message) for index, message in enumerate(value)]


def _message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _bad(f"{where} must be an object with 'role' and 'content'.", where)
    role = message.get("role")
    if role == "function":
        raise _bad(f"{where}: function messages (the old API) are not supported: use tool messages.", f"{where}.role")
    if role == "tool":  # a tool's result, answering an earlier call
        return {
            "role": "tool",
            "content": _content(message.get("content"), f"{where}.content"),
            "tool_call_id": str(message.get("tool_call_id") or ""),
            "name": str(message.get("name") or message.get("tool_call_id") or "the tool"),
        }
    if role not in _ROLES:
        raise _bad(
            f"{where}.role = {role!r}: must be one of system, developer, user, assistant, tool.", f"{where}.role"
        )
    if role == "assistant" and message.get("tool_calls"):
        calls = message["tool_calls"]
        if not isinstance(calls, list):
            raise _bad(f"{where}.tool_calls must be a list.", f"{where}.tool_calls")
        content = message.get("content")
        text = "" if content is None else _content(content, f"{where}.content")
        return {"role": "assistant", "content": text, "tool_calls": calls}
    return {"role": _ROLES[role], "content": _content(message.get("content"), f"{where}.content")}


def _content(content: Any, where: str) -> str:
    """A string, or OpenAI's list of parts of which only text parts can be read here."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(
                    f"{where}[{index}] is a {kind!r} part: only text parts are supported by this server.",
                    f"{where}[{index}]",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"{where} must be a string or a list of text parts, not {type(content).__name__}.", where)


def _prompt(value: Any) -> str:
    # OpenAI also takes a list of prompts (several answers) or token ids; one text per request here.
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if not isinstance(value, str):
        raise _bad("prompt must be a string (one prompt per request; token ids are not supported).", "prompt")
    return value


# ---------------------------------------------------------------------------------- errors


_PARAM = re.compile(r"^([a-z_]+)\b")
# A local path in a message: absolute, home-relative or Windows-style, starting where a path can
# start (not inside a URL such as http://host:8080/v1, nor a word such as t/s), up to a blank or
# a quote. Kept: its last part, the file's name.
_LOCAL_PATH = re.compile(r"(?<![\w:/.~-])(?:~|\.{1,2})?/[^\s'\"`<>|]+|(?<![\w])[A-Za-z]:\\[^\s'\"`<>|]+")


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str | None
    texts: list[str]
    base64: bool  # encoding_format "base64": little-endian float32 bytes, as OpenAI sends them
    dimensions: int | None


def parse_embeddings(body: Any) -> EmbeddingsRequest:
    """OpenAI's ``POST /v1/embeddings`` body, checked: ``input`` a string or a list of strings
    (token arrays are refused: nbllm tokenizes), ``encoding_format`` float or base64."""
    if not isinstance(body, Mapping):
        raise _bad('The request body must be a JSON object such as {"model": ..., "input": ["text"]}.')
    unknown = sorted(set(body) - {"model", "input", "encoding_format", "dimensions", "user"})
    if unknown:
        raise _bad(f"Unknown field {unknown[0]!r}: embeddings take model, input, encoding_format, dimensions.",
                   unknown[0])  # fmt: skip
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model must be a string.", "model")
    if isinstance(model, str):
        check_model_name(model)
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise _bad("input must be a string or a non-empty list of strings.", "input")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise _bad(f"input has {len(texts):,} items; at most {MAX_EMBEDDING_INPUTS} per request.", "input")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            kind = "a token array" if isinstance(text, (list, int)) else type(text).__name__
            raise _bad(f"input[{index}] is {kind}: send text (nbllm tokenizes it with the model's tokenizer).",
                       "input")  # fmt: skip
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _bad(f"encoding_format={encoding!r}: use 'float' or 'base64'.", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1):
        raise _bad("dimensions must be a positive integer.", "dimensions")
    return EmbeddingsRequest(model, texts, encoding == "base64", dimensions)


def embeddings_answer(vectors: Any, model: str, as_base64: bool) -> dict[str, Any]:
    """OpenAI's embeddings response for ``vectors`` (rows in input order)."""
    import base64

    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode() if as_base64 else row.tolist(),
        }
        for index, row in enumerate(vectors)
    ]
    tokens = int(getattr(vectors, "tokens", 0))
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def redact_paths(text: str) -> str:
    """``text`` with every local path cut to its file name (``.../tiny.gguf``): an answer to a
    client must not tell it where the server keeps its models, config or home folder. The
    server's own log keeps the whole message."""

    def name_only(match: re.Match[str]) -> str:
        path = match.group(0)
        tail = path[len(path.rstrip(".,;:)")) :]  # the sentence's punctuation, not the path's
        path = path[: len(path) - len(tail)]
        name = re.split(r"[/\\]", path.rstrip("/\\"))[-1]
        return f".../{name}{tail}" if name not in ("", "~", ".", "..") else f"...{tail}"

    return _LOCAL_PATH.sub(name_only, text)


def api_error(error: NbllmError, *, input_param: str | None = None) -> ApiError:
    """An engine error as the HTTP status and OpenAI error a client should see.

    What the client can fix is a 4xx (wrong model, parameter, prompt too long); what only the
    server's owner can fix (a broken model file, no memory) is a 5xx, still with nbllm's message
    (its local paths cut to file names: ``redact_paths``).
    """
    message = redact_paths(str(error))
    if isinstance(error, ModelNotFoundError):
        return ApiError(404, message, param="model", code="model_not_found")
    if isinstance(error, ContextLengthError):
        return ApiError(400, message, param=input_param, code="context_length_exceeded")
    if isinstance(error, SchemaError):  # only response_format carries a schema here
        return ApiError(400, message, param="response_format", code="invalid_schema")
    if isinstance(error, ParameterError):
        match = _PARAM.match(message)
        param = match.group(1) if match else None
        return ApiError(400, message, param=param, code="invalid_value")
    if isinstance(error, (InsufficientMemoryError, GpuOutOfMemoryError)):
        return ApiError(503, message, type="server_error", code="insufficient_memory")
    if isinstance(error, ModelLoadError):
        return ApiError(500, message, type="server_error", code="model_load_failed")
    if type(error) is NbllmError:  # the base class: a request the engine refused as such
        return ApiError(400, message)
    return ApiError(500, message, type="server_error", code=type(error).__name__)


# ---------------------------------------------------------------------------------- answers


def usage(stats: RequestStats) -> dict[str, int]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
    }


def finish_reason(stats: RequestStats) -> str:
    # "cancelled" only happens when the client is gone or the server stops: nobody reads it.
    return stats.finish_reason if stats.finish_reason in ("stop", "length") else "stop"


def provenance(stats: RequestStats) -> dict[str, Any]:
    """nbllm's own extras (OpenAI clients keep unknown fields): how to reproduce and what it cost."""
    return {
        "seed": stats.seed,
        "cached": stats.cached,
        "reused_prompt_tokens": stats.reused_prompt_tokens,
        "time_to_first_token": round(stats.time_to_first_token, 4),
        "total_seconds": round(stats.total_seconds, 4),
        "tokens_per_second": round(stats.tokens_per_second, 2),
        "model_sha256": stats.model_hash,
    }


def _fingerprint() -> str:
    from nbllm._version import __version__

    return f"nbllm-{__version__}"


@dataclass(frozen=True)
class Reply:
    """The shapes of one answer: whole (``answer``) or as stream chunks, with one id throughout."""

    kind: Kind
    model: str
    include_usage: bool = False
    tools: ToolSet | None = None  # the request's tools: an answer may be calls
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
            object.__setattr__(self, "id", f"{prefix}-{secrets.token_hex(12)}")

    def _head(self, object_type: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_type,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": _fingerprint(),
        }

    def calls(self, text: str) -> list[ToolCall] | None:
        """The tool calls an answer made, or None when it is text (or an unfinished call, which
        goes out as the text it is, with finish_reason "length")."""
        if self.tools is None or not self.tools.starts_call(text):
            return None
        try:
            return self.tools.parse(text)
        except StructuredOutputError:
            return None

    def answer(self, text: str, stats: RequestStats) -> dict[str, Any]:
        calls = self.calls(text) if self.kind == "chat" else None
        if calls:
            message = {
                "role": "assistant", "content": None, "refusal": None, "tool_calls": [c.as_openai() for c in calls]
            }  # fmt: skip
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
            head = self._head("chat.completion")
            return {**head, "choices": [choice], "usage": usage(stats), "nbllm": provenance(stats)}
        if self.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(stats),
            }
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(stats)}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage(stats), "nbllm": provenance(stats)}

    def _chunk(self, text: str | None, *, role: bool = False, finish: str | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            chunk = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            chunk = {**self._head("text_completion"), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI does: null on every chunk but the last
        return chunk

    def opening(self) -> dict[str, Any] | None:
        """Chat streams start with the assistant's role and empty content; completions have no opening."""
        return self._chunk("", role=True) if self.kind == "chat" else None

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk(text)

    def closing(self, stats: RequestStats, *, called: bool = False) -> dict[str, Any]:
        chunk = self._chunk(None, finish="tool_calls" if called else finish_reason(stats))
        chunk["nbllm"] = provenance(stats)
        return chunk

    def call_chunks(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        """Streamed tool calls, as OpenAI sends them: each call's id and name, then its arguments."""
        chunks = []
        for index, call in enumerate(calls):
            for delta in (
                {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}},
                {"index": index, "function": {"arguments": json.dumps(call.arguments)}},
            ):
                chunk = self._chunk(None)
                chunk["choices"][0]["delta"] = {"tool_calls": [delta]}
                chunks.append(chunk)
        return chunks

    def usage_chunk(self, stats: RequestStats) -> dict[str, Any]:
        """Sent last when the client asked for ``stream_options: {"include_usage": true}``."""
        head = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        return {**head, "choices": [], "usage": usage(stats)}
