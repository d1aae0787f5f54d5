"""The one generation path. Every front end (magics, chat panel, CLI, server) calls ``Engine.stream``.

Model residency, locking, parameter validation, stats and the log lines happen here once, so
every front end behaves the same. A front end parses, calls, displays — nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import itertools
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbllm.core import identity, paths
from nbllm.host import machine
from nbllm.measure import tuner
from nbllm.backends.base import Backend, LoadSettings, Usage
from nbllm.engine.batching import BatchScheduler, ManyResult, run_many
from nbllm.core.prompt_cache import CACHE_FORMAT, PromptCache
from nbllm.core.cancel import Cancel
from nbllm.core.chat_format import FormattedPrompt, normalize_messages
from nbllm.core.config import Settings, load_file, load_settings
from nbllm.core.errors import ConfigError, GpuOutOfMemoryError, ModelNotFoundError, NbllmError, ParameterError
from nbllm.core.fit import GpuFit, fit_gpu_layers, kv_cache_bytes
from nbllm.core.gguf_file import GGUFInfo, read_gguf
from nbllm.host.gpu import GpuInfo, list_gpus
from nbllm.core.metrics import RequestStats, StatsCollector
from nbllm.core.params import GenerationParams, resolve_params
from nbllm.engine.registry import ModelSpec, Registry, ResidentModel
from nbllm.core.units import format_bytes

log = logging.getLogger("nbllm")
log.addHandler(logging.NullHandler())
DEFAULT_BATCH = 512  # the guide's batch_size, when neither config nor tuner says otherwise


@dataclass(frozen=True)
class Request:
    model: str | None
    params: GenerationParams
    prompt: str | None = None  # a completion: text the model continues
    messages: tuple[dict[str, str], ...] | None = None  # a chat
    use_cache: bool = True  # consult and fill the prompt cache


@dataclass(frozen=True)
class Completion:
    """A finished answer: ``text`` plus what it cost (``stats``). ``str(c)`` is the text."""

    text: str
    stats: RequestStats

    def __str__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        return f"{self.text}\n\n*{self.stats.details()}*"


class Stream:
    """Text pieces as the model produces them.

    Iterate it; afterwards ``text`` holds the whole answer and ``stats`` what it cost.
    ``stop()`` (from any thread) ends it after the current token. Leaving a ``for`` loop early
    or calling ``close()`` ends it too, and the model is free again.
    """

    def __init__(self, engine: Engine, request: Request, *, batched: bool = False) -> None:
        self.request = request
        self.cancel = Cancel()  # also readable by llama.cpp's abort callback without the GIL
        self.pieces: list[str] = []
        self.stats: RequestStats | None = None
        self.usage = Usage()  # live token count while generating
        self.started: float | None = None
        self.load_seconds = 0.0
        self.thread_id = threading.get_ident()
        if batched:
            from nbllm.engine.batching import stream_batched

            self._steps: Generator[str, None, None] = stream_batched(engine, request, self)  # type: ignore[assignment]
        else:
            self._steps = engine._run(request, self)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._steps)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def tokens(self) -> int:
        """Tokens generated so far (all of them once the stream has ended)."""
        return self.stats.completion_tokens if self.stats is not None else self.usage.completion_tokens

    def stop(self) -> None:
        self.cancel.set()

    def close(self) -> None:
        self._steps.close()

    def result(self) -> Completion:
        """Consume the rest of the stream and return the whole answer."""
        for _ in self:
            pass
        assert self.stats is not None
        return Completion(self.text, self.stats)

    # LockOwner protocol (see registry.py): lets the registry recover from abandoned streams.
    def is_suspended(self) -> bool:
        return inspect.getgeneratorstate(self._steps) == inspect.GEN_SUSPENDED

    def abandon(self) -> None:
        self._steps.close()


@functools.lru_cache(maxsize=1)
def _auto_threads() -> int:
    return machine.default_threads()


class Engine:
    def __init__(self, settings: Settings | None = None, backend: Backend | None = None) -> None:
        self._settings = settings if settings is not None else load_settings()
        self.stats = StatsCollector()
        self.registry = Registry(
            backend_factory=(lambda: backend) if backend is not None else _default_backend,
            settings=lambda: self._settings,
            load_settings=self._load_settings,
            stats=self.stats,
            gpu_memory=self._gpu_memory,
        )
        self.prompt_cache = self._make_prompt_cache(self._settings)
        self.batches = BatchScheduler(self)
        self._tuned_cache: dict[str, dict[str, Any] | None] = {}
        self._auto_gpu_layers: dict[tuple[str, int, int], int] = {}
        self._gpus: list[GpuInfo] | None = None
        self._apply_logging()

    # ----------------------------------------------------------------- settings

    @property
    def settings(self) -> Settings:
        return self._settings

    def configure(self, source: str | os.PathLike[str] | Mapping[str, Any] | None = None, **sections: Any) -> Settings:
        """Apply a YAML file (replacing the current settings) and/or overrides (merged on top)."""
        settings = self._settings
        if isinstance(source, (str, os.PathLike)):
            settings = load_file(Path(source).expanduser())
        elif isinstance(source, Mapping):
            settings = settings.merged(source)
        elif source is not None:
            raise ConfigError(f"configure() takes a YAML path or a dict of overrides, not {type(source).__name__}.")
        if sections:
            settings = settings.merged(sections)
        if settings.default_model != self._settings.default_model:
            self._check_default_model(settings)
        if self._cache_location(settings) != self._cache_location(self._settings):
            self.prompt_cache = self._make_prompt_cache(settings)
        self.prompt_cache.max_entries = settings.cache.prompt_cache_size
        self._settings = settings
        self._apply_logging()
        # Lower limits apply now; changed load settings reload a model when it is next used.
        self.registry.enforce_limits()
        return settings

    def _check_default_model(self, settings: Settings) -> None:
        """A new default model must exist now: otherwise every later call would fail instead."""
        try:
            self.registry.resolve(None, settings)
        except ModelNotFoundError as error:
            raise ConfigError(f"default_model = {settings.default_model!r}: {error}") from None

    @staticmethod
    def _cache_location(settings: Settings) -> Path:
        configured = settings.cache.directory
        return Path(configured).expanduser() if configured else paths.cache_dir() / "prompts"

    def _make_prompt_cache(self, settings: Settings) -> PromptCache:
        return PromptCache(self._cache_location(settings), settings.cache.prompt_cache_size)

    def clear_cache(self) -> None:
        """Empty the prompt cache and every loaded model's KV prefix snapshots."""
        self.prompt_cache.clear()
        for resident in self.registry.resident():
            resident.model.clear_prefix_cache()

    def cache_stats(self) -> dict[str, Any]:
        cache = self.prompt_cache
        prefix = [r.model.prefix_cache_stats() for r in self.registry.resident()]
        return {
            "enabled": self._settings.cache.enabled and cache.enabled,
            "disabled_reason": cache.disabled_reason,
            "directory": str(cache.directory),
            "entries": len(cache.entries()),
            "max_entries": cache.max_entries,
            "bytes_on_disk": cache.disk_bytes(),
            "prefix_snapshots": sum(p["snapshots"] for p in prefix),
            "prefix_snapshot_bytes": sum(p["bytes"] for p in prefix),
        }

    def _apply_logging(self) -> None:
        logging.getLogger("nbllm.llama_cpp").setLevel(self._settings.logging.llama_cpp)

    def base_load_settings(self, spec: ModelSpec, info: GGUFInfo) -> LoadSettings:
        """The config's load settings with every "auto" given its untuned default."""
        perf = self._settings.performance
        context = self._context_size(info)
        gpu_layers = perf.gpu_layers
        if gpu_layers == -1:
            gpu_layers = self._estimated_gpu_layers(spec, info, context, perf.batch_size or DEFAULT_BATCH)
        return LoadSettings(
            context_size=context,
            batch_size=min(perf.batch_size or DEFAULT_BATCH, context),
            threads=perf.threads or _auto_threads(),
            gpu_layers=gpu_layers,
            use_mmap=perf.use_mmap,
            use_mlock=perf.use_mlock,
            flash_attention=bool(perf.flash_attention),
            prefix_cache_bytes=self._settings.cache.prefix_cache_bytes,
        )

    def _load_settings(self, spec: ModelSpec, info: GGUFInfo) -> LoadSettings:
        """What a model is loaded with: the config, with "auto" values from the tuner where it
        measured this model file on this machine, else from the defaults and the GPU estimate."""
        settings = self.base_load_settings(spec, info)
        perf = self._settings.performance
        auto = perf.threads is None or perf.batch_size is None or perf.gpu_layers == -1 or perf.flash_attention is None
        tuned = self._tuned(spec) if auto else None
        if not tuned:
            return settings
        changes: dict[str, Any] = {}
        if perf.threads is None:
            changes["threads"] = int(tuned["threads"])
        if perf.batch_size is None:
            changes["batch_size"] = min(int(tuned["batch_size"]), settings.context_size)
        if perf.gpu_layers == -1 and self._gpu_offload():
            changes["gpu_layers"] = int(tuned["gpu_layers"])
        if perf.flash_attention is None:
            changes["flash_attention"] = bool(tuned["flash_attention"])
        return dataclasses.replace(settings, **changes)

    def _tuned(self, spec: ModelSpec) -> dict[str, Any] | None:
        key = spec.key
        if key not in self._tuned_cache:
            try:
                sha = identity.file_sha256(spec.path)
            except OSError:
                return None
            self._tuned_cache[key] = tuner.saved_settings(sha)
        return self._tuned_cache[key]

    def _estimated_gpu_layers(self, spec: ModelSpec, info: GGUFInfo, context: int, batch: int) -> int:
        """``gpu_layers: -1``: as many layers as the estimate fits in free VRAM (decided once per
        model and settings: free VRAM shrinks once the model is loaded)."""
        if not self._gpu_offload():
            return 0
        key = (spec.key, context, batch)
        if key not in self._auto_gpu_layers:
            gpus = self.gpus()
            if not gpus:
                self._auto_gpu_layers[key] = 0
            else:
                fit = self.gpu_fit(info, None, context=context, batch=batch)
                self._auto_gpu_layers[key] = fit.layers
                log.info(
                    "GPU estimate for %s: %d of %d layers fit in %s free (rule of thumb: %s)",
                    spec.name,
                    fit.layers,
                    info.n_layers + 1,
                    format_bytes(fit.free_bytes),
                    fit.rule_of_thumb,
                )
        return self._auto_gpu_layers[key]

    def _gpu_memory(self) -> tuple[int, int] | None:
        """Free and total bytes of the GPU that models load onto, read now (it changes)."""
        if not self._gpu_offload():
            return None
        gpus = list_gpus()
        return (gpus[0].memory_free, gpus[0].memory_total) if gpus else None

    def gpus(self) -> list[GpuInfo]:
        """NVIDIA GPUs, read once per engine (``hardware()`` reads them afresh)."""
        if self._gpus is None:
            self._gpus = list_gpus()
        return self._gpus

    def gpu_fit(
        self, info: GGUFInfo, settings: LoadSettings | None, *, context: int | None = None, batch: int | None = None
    ) -> GpuFit:
        gpus = self.gpus()
        context = context or (settings.context_size if settings else self._context_size(info))
        batch = batch or (settings.batch_size if settings else DEFAULT_BATCH)
        free = gpus[0].memory_free if gpus else 0
        total = gpus[0].memory_total if gpus else 0
        return fit_gpu_layers(info, free, total, context, batch)

    def tune(self, model: str | None = None, **options: Any) -> tuner.TuneResult:
        """Measure the fastest settings for ``model`` here; they apply from the next load."""
        result = tuner.tune(self, model, **options)
        self._tuned_cache.clear()
        self._auto_gpu_layers.clear()
        return result

    def _context_size(self, info: GGUFInfo) -> int:
        context = self._settings.performance.context_size
        if info.context_length and context > info.context_length:
            context = info.context_length  # beyond its training length a model only degrades
        return context

    def _gpu_offload(self) -> bool:
        return bool(self.registry.backend.build_info()["gpu_offload"])

    # ----------------------------------------------------------------- requests

    def make_request(
        self,
        *,
        prompt: str | None = None,
        messages: Any = None,
        model: str | None = None,
        params: Mapping[str, Any] | None = None,
        cache: bool = True,
    ) -> Request:
        """Validate everything that can be checked without the model (fails fast, at the call)."""
        resolved = resolve_params(self._settings.generation, params or {})
        if prompt is not None:
            if not isinstance(prompt, str):
                raise NbllmError(f"prompt must be a string, not {type(prompt).__name__}.")
            return Request(model=model, params=resolved, prompt=prompt, use_cache=cache)
        return Request(model=model, params=resolved, messages=tuple(normalize_messages(messages)), use_cache=cache)

    def stream(self, request: Request, *, batched: bool = False) -> Stream:
        """The one generation path. ``batched``: decode together with other requests for the
        same model (a server's concurrent clients) instead of waiting for them."""
        self.registry.resolve(request.model)  # an unknown model fails here, not at first token
        return Stream(self, request, batched=batched)

    def _run(self, request: Request, owner: Stream) -> Generator[str, None, None]:
        started = owner.started = time.perf_counter()
        owner.thread_id = threading.get_ident()
        cache_key = self.cache_key(request)
        answer = self.cached_answer(request, cache_key)
        if answer is not None:
            yield from self._replay(answer, cache_key, request, owner, started)
            return
        params = request.params
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        usage = owner.usage
        resident, steps = self._start(request, owner, seed)
        stats = RequestStats(model=resident.name, seed=seed, load_seconds=owner.load_seconds)
        stats.model_hash = cache_key["model_sha256"]
        try:
            for piece in steps:
                owner.pieces.append(piece)
                yield piece
        except BaseException as error:
            usage.finish_reason = "cancelled" if isinstance(error, (GeneratorExit, KeyboardInterrupt)) else "error"
            raise
        finally:
            self.registry.checkin(resident)
            stats.total_seconds = time.perf_counter() - started
            if usage.first_token_at is not None:
                stats.time_to_first_token = usage.first_token_at - started
            stats.prompt_tokens = usage.prompt_tokens
            stats.reused_prompt_tokens = usage.reused_prompt_tokens
            stats.completion_tokens = usage.completion_tokens
            stats.finish_reason = usage.finish_reason
            owner.stats = stats
            self.stats.record_request(stats)
            if stats.reused_prompt_tokens:
                log.info("Reused %d prompt tokens", stats.reused_prompt_tokens)
            log.info("%s", stats.summary())
        self.keep_answer(request, cache_key, stats, owner.pieces)

    def _start(self, request: Request, owner: Stream, seed: int) -> tuple[ResidentModel, Iterator[str]]:
        """Check the model out and produce the first piece; on GPU out-of-memory, retry with
        fewer GPU layers (the guide's first troubleshooting step, done for the user).

        Returns the (locked) model and the pieces, first one included.
        """
        while True:
            try:
                resident = self.registry.checkout(request.model, owner)
            except NbllmError:
                self.stats.record_error(request.model or self._settings.default_model)
                raise
            owner.load_seconds = time.perf_counter() - (owner.started or 0.0)
            try:
                prompt = self._format(resident.model, request)
                steps = resident.model.generate(prompt, request.params, seed, owner.usage, owner.cancel)
                first = next(steps, None)
            except GpuOutOfMemoryError:
                self.registry.checkin(resident)
                if resident.settings.gpu_layers <= 0:
                    self.stats.record_error(resident.name)
                    raise
                self.registry.reduce_gpu_layers(resident)
                continue
            except BaseException:
                self.registry.checkin(resident)
                if not isinstance(sys.exc_info()[1], (KeyboardInterrupt, GeneratorExit)):
                    self.stats.record_error(resident.name)
                raise
            pieces = steps if first is None else itertools.chain((first,), steps)
            return resident, pieces

    def cached_answer(self, request: Request, cache_key: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The prompt cache's answer to ``request`` (under its ``cache_key``), or None; a miss is
        counted. Every path that generates asks this first."""
        if not self.cache_wanted(request):
            return None
        answer = self.prompt_cache.get(cache_key)
        if answer is None:
            self.stats.record_cache_miss()
        return answer

    def keep_answer(
        self, request: Request, cache_key: Mapping[str, Any], stats: RequestStats, pieces: Sequence[str]
    ) -> None:
        """Store a finished answer in the prompt cache; only one that ended normally is worth
        keeping, never a cancelled or failed one."""
        if stats.finish_reason in ("stop", "length") and self.cache_wanted(request):
            self.prompt_cache.put(cache_key, {**stats.as_dict(), "pieces": list(pieces)})

    def _replay(
        self, answer: Mapping[str, Any], cache_key: Mapping[str, Any], request: Request, owner: Stream, started: float
    ) -> Generator[str, None, None]:
        """A cached answer, streamed like a fresh one so that front ends need no special case."""
        stats = cached_stats(answer, cache_key, self.registry.resolve(request.model).name)
        owner.usage.completion_tokens = stats.completion_tokens
        try:
            for index, piece in enumerate(answer["pieces"]):
                if index == 0:
                    stats.time_to_first_token = time.perf_counter() - started
                owner.pieces.append(piece)
                yield piece
        finally:
            stats.total_seconds = time.perf_counter() - started
            owner.stats = stats
            saved = max(float(answer["total_seconds"]) - stats.total_seconds, 0.0)
            self.stats.record_request(stats, time_saved=saved)
            log.info("Prompt cache hit")
            log.info("%s", stats.summary())

    def cache_wanted(self, request: Request) -> bool:
        cache = self._settings.cache
        return request.use_cache and cache.enabled and cache.prompt_cache_size > 0 and self.prompt_cache.enabled

    def cache_key(self, request: Request) -> dict[str, Any]:
        """Everything that decides an answer; a change in any of it is a different entry.

        Computed for every request, cached or not: it is also the answer's provenance (the
        model file's SHA-256 is hashed once per file and remembered).
        """
        spec = self.registry.resolve(request.model)
        if spec.remote is not None:
            # No file to hash: the server and the model's name there are its identity.
            identity_text = f"remote|{spec.remote.url}|{spec.remote.model or spec.name}"
            model_sha256 = hashlib.sha256(identity_text.encode()).hexdigest()
            context, backend = spec.remote.context_size, "remote"
        else:
            info = read_gguf(spec.path)
            try:
                model_sha256 = identity.file_sha256(spec.path)
            except OSError as error:
                raise ModelNotFoundError(f"Cannot read model file {spec.path}: {error.strerror or error}.") from error
            context, backend = self._context_size(info), _backend_version()
        return {
            "format": CACHE_FORMAT,
            "model_sha256": model_sha256,
            "backend": backend,
            "context_size": context,
            "kind": "completion" if request.prompt is not None else "chat",
            "prompt": request.prompt,
            "messages": [dict(m) for m in request.messages] if request.messages else None,
            "params": request.params.as_dict(),
        }

    @staticmethod
    def _format(model: Any, request: Request) -> FormattedPrompt:
        if request.prompt is not None:
            return FormattedPrompt(request.prompt)
        assert request.messages is not None
        formatted: FormattedPrompt = model.format_chat(list(request.messages))
        return formatted

    # ----------------------------------------------------------------- conveniences

    def generate(
        self, prompt: str, model: str | None = None, stream: bool = False, cache: bool = True, **params: Any
    ) -> Any:
        request = self.make_request(prompt=prompt, model=model, params=params, cache=cache)
        result = self.stream(request)
        return result if stream else result.result()

    def chat(
        self, messages: Any, model: str | None = None, stream: bool = False, cache: bool = True, **params: Any
    ) -> Any:
        request = self.make_request(messages=messages, model=model, params=params, cache=cache)
        result = self.stream(request)
        return result if stream else result.result()

    def generate_many(self, prompts: Sequence[str], model: str | None = None, **options: Any) -> list[ManyResult]:
        """Answer many prompts at once (see ``nbllm.generate_many``)."""
        return self._many("prompt", self._sequence(prompts, "prompts"), model, **options)

    def chat_many(self, conversations: Sequence[Any], model: str | None = None, **options: Any) -> list[ManyResult]:
        """``generate_many`` for chats: each item a string or a list of messages."""
        return self._many("messages", self._sequence(conversations, "conversations"), model, **options)

    def _many(
        self,
        field: str,
        items: list[Any],
        model: str | None,
        *,
        per_item: Sequence[Mapping[str, Any]] | None = None,
        cache: bool = True,
        progress: bool = True,
        on_result: Callable[[ManyResult], None] | None = None,
        **params: Any,
    ) -> list[ManyResult]:
        requests = [
            self.make_request(model=model, params={**params, **self._item(per_item, i)}, cache=cache, **{field: item})
            for i, item in enumerate(items)
        ]
        return run_many(self, requests, on_result=on_result, progress=progress)

    @staticmethod
    def _sequence(items: Any, what: str) -> list[Any]:
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise ParameterError(f"{what} must be a list (or other sequence) of prompts, not {type(items).__name__}.")
        return list(items)

    @staticmethod
    def _item(per_item: Sequence[Mapping[str, Any]] | None, index: int) -> Mapping[str, Any]:
        if per_item is None:
            return {}
        if index >= len(per_item) or not isinstance(per_item[index], Mapping):
            raise ParameterError(f"per_item must hold one dict of parameters per prompt; item {index} has none.")
        return per_item[index]

    def _batch_report(self, info: GGUFInfo) -> dict[str, int]:
        """What batched generation on this model takes: sequences, context and KV memory each."""
        parallel, seq_context = self.batches.parallel_for(None)
        per_sequence = kv_cache_bytes(info, seq_context)
        return {
            "parallel": parallel,
            "context_per_sequence": seq_context,
            "kv_bytes_per_sequence": per_sequence,
            "kv_bytes": per_sequence * parallel,
        }

    def health(self) -> dict[str, Any]:
        residents = self.registry.resident()
        return {
            "status": "ok",
            "default_model": self._settings.default_model,
            "resident_models": [
                {
                    "name": r.name,
                    "path": str(r.spec.path),
                    "architecture": r.info.architecture if r.info else "remote",
                    "quantization": r.info.quantization if r.info else "-",
                    "context_size": r.settings.context_size,
                    "threads": r.settings.threads,
                    "gpu_layers": r.settings.gpu_layers,
                    "memory_bytes": r.memory.total,
                    "busy": r.lock.locked(),
                    "batch": self._batch_report(r.info) if r.info else {"parallel": self.batches.parallel_for(None)[0]},
                }
                for r in residents
            ],
            "model_cache": f"{len(residents)}/{self._settings.cache.model_cache_size}",
            "memory_available_bytes": machine.available_memory(),
            "memory_total_bytes": machine.total_memory(),
            "config_source": self._settings.source,
        }

    def close(self) -> None:
        self.registry.unload_all()


@functools.lru_cache(maxsize=1)
def _backend_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"llama-cpp-python {version('llama-cpp-python')}"
    except PackageNotFoundError:
        return "unknown"


def cached_stats(answer: Mapping[str, Any], cache_key: Mapping[str, Any], model: str) -> RequestStats:
    """The stats of an answer served from the prompt cache (its timings are filled by the caller).

    ``model`` is the name asked for now: the entry is keyed by the file's content, so the same
    file under another name (a copy, a renamed download) is a hit, and its stats and provenance
    must not name the file it was first generated with."""
    return RequestStats(
        model=model,
        prompt_tokens=int(answer["prompt_tokens"]),
        completion_tokens=int(answer["completion_tokens"]),
        finish_reason=str(answer["finish_reason"]),
        seed=answer["seed"],
        cached=True,
        model_hash=cache_key["model_sha256"],
    )


def _default_backend() -> Backend:
    from nbllm.backends.llama_cpp import LlamaCppBackend

    return LlamaCppBackend()
