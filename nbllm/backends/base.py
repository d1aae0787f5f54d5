"""The small interface between the engine and whatever runs the model.

Today that is llama.cpp in this process (``backends/llama_cpp.py``). The interface is kept
narrow — load, format a chat, stream text, close — so that a remote OpenAI-compatible backend
or a multi-sequence batching loop can sit beside it without touching the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nbllm.core.chat_format import FormattedPrompt
from nbllm.core.params import GenerationParams


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


@dataclass
class Usage:
    """Filled in by ``LoadedModel.generate`` as it goes; read by the engine afterwards."""

    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0
    completion_tokens: int = 0  # kept current while generating, for progress displays
    first_token_at: float | None = None  # time.perf_counter() when the first token was sampled
    finish_reason: str = "unknown"


class LoadedModel(Protocol):
    path: Path
    settings: LoadSettings

    @property
    def context_size(self) -> int: ...

    def format_chat(self, messages: Sequence[dict[str, str]]) -> FormattedPrompt: ...

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

    def clear_prefix_cache(self) -> None: ...

    def prefix_cache_stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str

    def load(self, path: Path, settings: LoadSettings) -> LoadedModel: ...

    def build_info(self) -> dict[str, Any]: ...
