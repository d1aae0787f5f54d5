"""Per-request statistics and the process-wide counters behind ``nbllm.stats()``."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestStats:
    """What one generation cost. Times are seconds of wall-clock time."""

    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens served from the KV cache, not evaluated
    time_to_first_token: float = 0.0
    load_seconds: float = 0.0  # part of time_to_first_token spent loading the model or waiting for it
    total_seconds: float = 0.0
    finish_reason: str = "unknown"  # stop | length | cancelled | error
    cached: bool = False  # the whole answer came from the prompt cache
    seed: int | None = None
    schema: str | None = None  # what the answer had to fit (structured output), by name
    model_hash: str | None = None
    # The answer's budget as asked for; None where unknown (an answer from the prompt cache). An
    # answer that stopped short of it at "length" was cut by the context, which the prompt filled.
    max_tokens: int | None = None
    # Speculative decoding (core/speculation.py): tokens drafted and checked, and of those kept.
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def generation_seconds(self) -> float:
        """Time after the first token: the decoding phase."""
        return max(self.total_seconds - self.time_to_first_token, 0.0)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over the whole request, as in the guide's log line."""
        return self.completion_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        """Decoding speed: tokens after the first, over the time after the first."""
        gen = self.generation_seconds
        return (self.completion_tokens - 1) / gen if gen > 0 and self.completion_tokens > 1 else 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        evaluated = self.prompt_tokens - self.reused_prompt_tokens
        seconds = self.time_to_first_token - self.load_seconds
        return evaluated / seconds if seconds > 0 else 0.0

    def summary(self) -> str:
        """The guide's line: ``Generated 256 tokens in 12.5s (20.5 t/s)``; for an answer from the
        prompt cache, which was not generated now, where it came from and how fast."""
        if self.cached:
            return f"{self.completion_tokens} tokens from the prompt cache in {self.total_seconds * 1000:.1f} ms"
        speed = f"{self.total_seconds:.2f}s ({self.tokens_per_second:.1f} t/s)"
        line = f"Generated {self.completion_tokens} tokens in {speed}"
        if self.drafted_tokens:
            line += f", {self.accepted_tokens} of {self.drafted_tokens} drafted tokens kept"
        return line

    @property
    def truncated(self) -> bool:
        """The answer stopped at its token budget (``max_tokens``), probably mid-sentence."""
        return self.finish_reason == "length"

    @property
    def context_full(self) -> bool:
        """Cut off because prompt and answer filled the model's context, before ``max_tokens``:
        raising max_tokens would not help."""
        return self.truncated and self.max_tokens is not None and self.completion_tokens < self.max_tokens

    def truncation_note(self) -> str | None:
        """The one wording every front end (cell, chat panel, CLI) puts after a cut-off answer,
        so a reader never mistakes it for the model's whole answer; None when it was not cut."""
        if not self.truncated:
            return None
        if self.context_full:
            context = self.prompt_tokens + self.completion_tokens  # the backend's budget was what the prompt left
            return (
                f"[cut off: the context ({context:,} tokens) is full — start a new conversation or use a model "
                "with a longer context]"
            )
        return (
            f"[cut off at the {self.completion_tokens}-token limit: raise max_tokens "
            "(-n in %%llm and the CLI) for the rest]"
        )

    def details(self) -> str:
        parts = [self.summary(), f"model {self.model}"]
        if not self.cached:
            parts.append(f"first token {self.time_to_first_token:.2f}s")
            if self.reused_prompt_tokens:
                parts.append(f"reused {self.reused_prompt_tokens}/{self.prompt_tokens} prompt tokens")
        if self.finish_reason in ("cancelled", "error"):
            parts.append(self.finish_reason)
        return " · ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            generation_seconds=self.generation_seconds,
            tokens_per_second=self.tokens_per_second,
            generation_tokens_per_second=self.generation_tokens_per_second,
            prompt_tokens_per_second=self.prompt_tokens_per_second,
        )
        return data


@dataclass
class _ModelTotals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0
    prompt_tokens_evaluated: int = 0
    prompt_seconds: float = 0.0


@dataclass
class StatsCollector:
    """Thread-safe running totals; ``snapshot()`` is what ``nbllm.stats()`` returns."""

    started: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused_prompt_tokens: int = 0
    model_loads: int = 0
    model_load_seconds: float = 0.0
    evictions: int = 0
    prompt_cache_hits: int = 0
    prompt_cache_misses: int = 0
    prompt_cache_seconds_saved: float = 0.0
    prefix_seconds_saved: float = 0.0
    tool_calls: int = 0  # calls run by run_tools=True loops, their model steps and their time
    tool_errors: int = 0
    tool_steps: int = 0
    tool_seconds: float = 0.0
    embedded_texts: int = 0  # texts nbllm.embed was given; of them, answered from the cache
    embedding_cache_hits: int = 0
    embedding_tokens: int = 0
    embedding_seconds: float = 0.0
    drafted_tokens: int = 0  # speculative decoding: tokens drafted, and of those kept
    accepted_tokens: int = 0
    per_model: dict[str, _ModelTotals] = field(default_factory=dict)
    last: RequestStats | None = None

    def record_request(self, stats: RequestStats, time_saved: float = 0.0) -> None:
        """Count one finished request; ``time_saved`` is what a prompt-cache hit spared."""
        with self._lock:
            self.requests += 1
            if stats.cached:
                self.prompt_cache_hits += 1
                self.prompt_cache_seconds_saved += time_saved
            totals = self.per_model.setdefault(stats.model, _ModelTotals())
            evaluated = stats.prompt_tokens - stats.reused_prompt_tokens
            prompt_seconds = stats.time_to_first_token - stats.load_seconds
            if not stats.cached and evaluated >= 16 and prompt_seconds > 0:
                totals.prompt_seconds += prompt_seconds
                totals.prompt_tokens_evaluated += evaluated
            if stats.reused_prompt_tokens and totals.prompt_tokens_evaluated:
                # Reused tokens were not evaluated: at this model's measured prompt speed,
                # that is the time they would have taken.
                per_token = totals.prompt_seconds / totals.prompt_tokens_evaluated
                self.prefix_seconds_saved += stats.reused_prompt_tokens * per_token
            if stats.finish_reason == "cancelled":
                self.cancelled += 1
            elif stats.finish_reason == "error":
                self.errors += 1
            else:
                self.completed += 1
            self.prompt_tokens += stats.prompt_tokens
            self.completion_tokens += stats.completion_tokens
            self.reused_prompt_tokens += stats.reused_prompt_tokens
            if not stats.cached:  # a cached answer's counts are of the run that made it
                self.drafted_tokens += stats.drafted_tokens
                self.accepted_tokens += stats.accepted_tokens
            totals.requests += 1
            totals.prompt_tokens += stats.prompt_tokens
            totals.completion_tokens += stats.completion_tokens
            totals.generation_seconds += stats.total_seconds
            self.last = stats

    def record_tools(self, calls: int, errors: int, steps: int, seconds: float) -> None:
        """Count one tool loop: the calls it ran (``errors`` of them failed or were refused),
        the model steps it took and the time its tools ran."""
        with self._lock:
            self.tool_calls += calls
            self.tool_errors += errors
            self.tool_steps += steps
            self.tool_seconds += seconds

    def record_embeddings(self, texts: int, cached: int, tokens: int, seconds: float) -> None:
        """Count one embed call: its texts, how many came from the cache, the tokens read for
        the others and the time it took."""
        with self._lock:
            self.embedded_texts += texts
            self.embedding_cache_hits += cached
            self.embedding_tokens += tokens
            self.embedding_seconds += seconds

    def record_error(self, model: str) -> None:
        with self._lock:
            self.requests += 1
            self.errors += 1
            self.per_model.setdefault(model, _ModelTotals()).requests += 1

    def record_cache_miss(self) -> None:
        with self._lock:
            self.prompt_cache_misses += 1

    def record_load(self, seconds: float) -> None:
        with self._lock:
            self.model_loads += 1
            self.model_load_seconds += seconds

    def record_eviction(self) -> None:
        with self._lock:
            self.evictions += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            per_model = {
                name: {
                    **asdict(totals),
                    "tokens_per_second": (
                        totals.completion_tokens / totals.generation_seconds if totals.generation_seconds else 0.0
                    ),
                }
                for name, totals in self.per_model.items()
            }
            return {
                "uptime_seconds": time.time() - self.started,
                "requests": self.requests,
                "completed": self.completed,
                "cancelled": self.cancelled,
                "errors": self.errors,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "reused_prompt_tokens": self.reused_prompt_tokens,
                "model_loads": self.model_loads,
                "model_load_seconds": self.model_load_seconds,
                "evictions": self.evictions,
                "prompt_cache_hits": self.prompt_cache_hits,
                "prompt_cache_misses": self.prompt_cache_misses,
                "prompt_cache_seconds_saved": self.prompt_cache_seconds_saved,
                "prefix_seconds_saved": self.prefix_seconds_saved,
                "time_saved_seconds": self.prompt_cache_seconds_saved + self.prefix_seconds_saved,
                "tool_calls": self.tool_calls,
                "tool_errors": self.tool_errors,
                "tool_steps": self.tool_steps,
                "tool_seconds": self.tool_seconds,
                "embedded_texts": self.embedded_texts,
                "embedding_cache_hits": self.embedding_cache_hits,
                "embedding_tokens": self.embedding_tokens,
                "embedding_seconds": self.embedding_seconds,
                "drafted_tokens": self.drafted_tokens,
                "accepted_tokens": self.accepted_tokens,
                "per_model": per_model,
                "last_request": self.last.as_dict() if self.last else None,
            }
