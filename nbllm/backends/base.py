"""The whole contract between the engine and whatever runs a model, and the neutral types both
sides speak.

A backend turns a ``ModelSpec`` into a ``LoadedModel``; a loaded model formats chats, streams text
(``generate``), runs the continuous-batching loop (``run_batch``), times raw decoding for the
tuner and benchmarks (``timed_decode``) and closes. Two backends implement it today: llama.cpp in
this process (``llama_cpp.py``) and any OpenAI-compatible server (``remote.py``). Nothing here
imports either: ``backend_for`` in ``__init__.py`` is the only place that names them, so the
engine never depends on llama_cpp.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nbllm.core.chat_format import FormattedPrompt
from nbllm.core.config import RemoteModel as RemoteConfig
from nbllm.core.errors import NbllmError
from nbllm.core.params import GenerationParams


@dataclass(frozen=True)
class ModelSpec:
    """A model by name: its file here, or a model on a remote server (``remote``)."""

    name: str
    path: Path
    source: str  # default | config | models-dir | path | remote
    remote: RemoteConfig | None = None  # a model on an OpenAI-compatible server

    @property
    def key(self) -> str:
        if self.remote is not None:
            return f"remote:{self.remote.url}|{self.remote.model or self.name}"
        return str(self.path.resolve())

    @property
    def is_local(self) -> bool:
        """A GGUF file on this machine (memory, GPU layers and tuning apply to it)."""
        return self.remote is None


@dataclass(frozen=True)
class LoadSettings:
    """Everything that shapes a loaded model; a change means a reload."""

    context_size: int
    batch_size: int
    threads: int
    gpu_layers: int
    use_mmap: bool
    use_mlock: bool
    flash_attention: bool
    prefix_cache_bytes: int = 0  # KV snapshots kept for prefix reuse across requests
    # An embedding model's pooling ("mean", "cls", "last"; GGUFInfo.pooling): loaded in llama.cpp's
    # embedding mode, with context_size = batch_size, to embed (LoadedModel.embed), not to generate.
    pooling: str | None = None


@dataclass
class Usage:
    """Filled in by ``LoadedModel.generate`` as it goes; read by the engine afterwards."""

    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0
    completion_tokens: int = 0  # kept current while generating, for progress displays
    first_token_at: float | None = None  # time.perf_counter() when the first token was sampled
    finish_reason: str = "unknown"
    drafted_tokens: int = 0  # speculative decoding: tokens guessed and checked by the model
    accepted_tokens: int = 0  # of those, the ones the model sampled too (kept)


# ---------------------------------------------------------------------------- batches


@dataclass
class EmbeddedTexts:
    """Pooled vectors (not normalized), one row per text, and what it took."""

    vectors: Any  # numpy float32 array, (texts, dimensions)
    tokens: int  # tokens read, all texts together
    truncated: tuple[int, ...] = ()  # positions of the texts that were cut to fit


@dataclass(eq=False)
class BatchItem:
    """One prompt for a batch loop, with where its results go."""

    key: Any  # the caller's name for it (an index, a ticket)
    prompt: FormattedPrompt | list[dict[str, Any]]  # text, or chat messages the model formats
    params: GenerationParams
    seed: int
    sink: Callable[[BatchEvent], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class BatchEvent:
    """``piece`` (text to show), ``done`` (finished: usage says why) or ``error``."""

    item: BatchItem
    kind: str
    text: str = ""
    error: NbllmError | None = None


@dataclass
class BatchProgress:
    """Live totals for progress bars and throughput charts (written by the loop only)."""

    tokens: int = 0
    finished: int = 0
    active: int = 0
    started: float = field(default_factory=time.perf_counter)


# ---------------------------------------------------------------------------- the contract


class LoadedModel(Protocol):
    path: Path
    settings: LoadSettings

    @property
    def context_size(self) -> int: ...

    def format_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> FormattedPrompt: ...

    def count_tokens(self, prompt: FormattedPrompt) -> int: ...

    def generate(
        self,
        prompt: FormattedPrompt,
        params: GenerationParams,
        seed: int,
        usage: Usage,
        cancel: threading.Event,
    ) -> Iterator[str]:
        """Stream text pieces. Stops at EOS, a stop sequence, max_tokens or ``cancel``.

        Raises ``ContextLengthError`` before any work if the prompt does not fit.
        """
        ...

    def run_batch(
        self,
        feed: queue.SimpleQueue[BatchItem | None],
        stop: threading.Event,
        progress: BatchProgress,
        idle: Callable[[], bool],
        *,
        parallel: int,
        seq_context: int,
    ) -> None:
        """Answer the items arriving in ``feed`` together, ``parallel`` at a time, each through its
        ``sink``, until ``idle()`` says no more will come (asked only when nothing is queued or
        running) or ``stop`` is set. ``None`` in the feed only wakes the loop up."""
        ...

    def timed_decode(self, kind: str, n_tokens: int, seed: int = 0) -> float:
        """Seconds to read a prompt of ``n_tokens`` (``kind="pp"``) or to generate ``n_tokens``
        (``"tg"``): llama-bench's two measurements, for the tuner and ``nbllm.bench``."""
        ...

    def embed(
        self, texts: Sequence[str], *, truncate: bool, on_progress: Callable[[int], None], cancel: threading.Event
    ) -> EmbeddedTexts:
        """Pooled, unnormalized vectors of ``texts`` (an embedding model's); ``on_progress(n)``
        after each n texts. ``ContextLengthError`` before any work for a text that is too long,
        unless ``truncate``."""
        ...

    def set_threads(self, threads: int) -> None: ...

    def clear_prefix_cache(self) -> None: ...

    def prefix_cache_stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str

    def load(self, spec: ModelSpec, settings: LoadSettings) -> LoadedModel: ...

    def build_info(self) -> dict[str, Any]: ...
