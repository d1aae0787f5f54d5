"""nbllm's errors: one base class, a few kinds, and a message that always says what to do next.

Core code raises these and nothing else for problems a user can fix. Front ends translate them
at the edge only: a short ``UsageError`` in the magics, an exit code in the CLI, a 4xx in the
server. Each class derives from ``Exception`` (never ``BaseException``), so a ``KeyboardInterrupt``
is never swallowed by ``except NbllmError``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NbllmError(Exception):
    """Base class of every error nbllm raises on purpose."""


class ConfigError(NbllmError):
    """A configuration file or override is invalid."""


class ModelNotFoundError(NbllmError):
    """A model name or path does not resolve to a model file."""


class InvalidModelFileError(NbllmError):
    """A file is not a valid GGUF model (empty, truncated, corrupt, a directory...)."""


class ModelLoadError(NbllmError):
    """llama.cpp could not load a model that passed the GGUF checks."""


class InsufficientMemoryError(ModelLoadError):
    """Loading would need more memory than this machine has available."""


class GpuOutOfMemoryError(ModelLoadError):
    """The GPU ran out of memory (loading or generating); fewer GPU layers may fit."""


class ChatTemplateError(ModelLoadError):
    """A model file's chat template cannot be used: it does not compile (raised at load), or a
    chat made it break nbllm's limits on templates (time, size; raised at that request)."""


class ParameterError(NbllmError, ValueError):
    """A generation parameter is out of range or of the wrong type."""


class ContextLengthError(ParameterError):
    """A prompt does not fit into the model's context window."""


class GenerationError(NbllmError):
    """llama.cpp failed while generating."""


class SchemaError(ParameterError):
    """A schema (or ``choices``) that structured output cannot honour: the message names the
    keyword and where it is. Raised before any model work."""


class StructuredOutputError(GenerationError):
    """An answer that should fit a schema does not (a remote server that ignored it, a stop
    sequence inside the value). ``text`` keeps what was generated; ``stats`` what it cost."""

    def __init__(self, message: str, text: str = "", stats: object = None) -> None:
        super().__init__(message)
        self.text = text
        self.stats = stats


class IncompleteAnswerError(StructuredOutputError):
    """A structured answer stopped before its value was complete (``max_tokens``, a cancel)."""


class CacheError(NbllmError):
    """The prompt cache cannot be used."""


class DownloadError(NbllmError):
    """A model download failed."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` (with the leading space) for the closest choice, or ``""``."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {matches[0]!r}?" if matches else ""
