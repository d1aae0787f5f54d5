"""``Engine``: the single doorway every front end (magics, chat panel, CLI, server) goes through.

It owns the settings, the model registry, the prompt cache, the stats and the batch sessions;
``make_request`` validates a request at the call, ``stream`` answers it through the one answer
pipeline (``pipeline.py``). A front end parses, calls, displays — nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from nbllm.backends.base import Backend, BatchProgress, LoadSettings, ModelSpec
from nbllm.core import identity, paths
from nbllm.core.chat_format import FormattedPrompt, normalize_messages, with_default_system
from nbllm.core.config import Settings, load_file, load_settings
from nbllm.core.embedding_cache import EmbeddingCache
from nbllm.core.errors import (
    ConfigError,
    GenerationError,
    GpuOutOfMemoryError,
    ModelNotFoundError,
    NbllmError,
    ParameterError,
)
from nbllm.core.fit import GpuFit, fit_gpu_layers, kv_cache_bytes
from nbllm.core.gguf_file import GGUFInfo, read_gguf
from nbllm.core.history import ORIGINS, HistoryLog
from nbllm.core.metrics import StatsCollector
from nbllm.core.params import GenerationParams, resolve_params
from nbllm.core.prompt_cache import PromptCache
from nbllm.core.tool_syntax import syntax_for_template
from nbllm.core.tools import ToolCall, with_tool_instructions
from nbllm.core.units import format_bytes
from nbllm.engine import ask, embedding, pipeline, search
from nbllm.engine.batching import BatchInterrupted, BatchScheduler, ManyResult, as_nbllm_error, run_many
from nbllm.engine.embedding import Embeddings
from nbllm.engine.registry import Registry, ResidentModel
from nbllm.engine.request import Completion, Request
from nbllm.engine.stream import Stream
from nbllm.engine.tool_loop import run_tool_loop
from nbllm.host import default_model, machine, tuned_settings
from nbllm.host.gpu import GpuInfo, list_gpus

log = logging.getLogger("nbllm")
log.addHandler(logging.NullHandler())
DEFAULT_BATCH = 512  # the guide's batch_size, when neither config nor tuner says otherwise
# An embedding model reads many texts in one decode, in micro-batches of this many tokens (also
# its context: one micro-batch holds whole sequences, as non-causal attention needs), with flash
# attention. Measured on all-MiniLM-L6-v2, 1,000 short texts, 2 threads
# (benchmarks/results/embed_bench.log): a batch of 2048 without flash attention embedded 31
# texts/s (llama.cpp computes the masked attention of the whole micro-batch), 512 with it 193,
# packs of 256 tokens in a batch of 512 about 200; one text at a time, 63.
EMBEDDING_BATCH = 512


@functools.lru_cache(maxsize=1)
def _auto_threads() -> int:
    return machine.default_threads()


class Engine:
    def __init__(self, settings: Settings | None = None, backend: Backend | None = None) -> None:
        self._settings = settings if settings is not None else load_settings()
        self.stats = StatsCollector()
        self.registry = Registry(
            backend=backend,
            settings=lambda: self._settings,
            load_settings=self._load_settings,
            stats=self.stats,
            gpu_memory=self._gpu_memory,
        )
        self.prompt_cache = self._make_prompt_cache(self._settings)
        self.embedding_cache = self._make_embedding_cache(self._settings)
        self.history = self._make_history(self._settings)
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
        if (settings.cache.enabled, self._cache_location(settings)) != (
            self._settings.cache.enabled,
            self._cache_location(self._settings),
        ):
            self.embedding_cache = self._make_embedding_cache(settings)
        if settings.history != self._settings.history:
            self.history = self._make_history(settings)
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

    def _make_embedding_cache(self, settings: Settings) -> EmbeddingCache:
        # Beside the prompt cache's folder (joblib owns that one), switched by the same setting.
        return EmbeddingCache(self._cache_location(settings).parent / "embeddings", settings.cache.enabled)

    @staticmethod
    def _make_history(settings: Settings) -> HistoryLog:
        config = settings.history
        path = Path(config.file).expanduser() if config.file else paths.history_file()
        return HistoryLog(path, enabled=config.enabled, max_rows=config.max_rows, max_bytes=config.max_bytes)

    def clear_cache(self) -> None:
        """Empty the prompt cache, the embedding cache and every loaded model's KV prefix snapshots."""
        self.prompt_cache.clear()
        self.embedding_cache.clear()
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
        # An embedding model packs texts into batches of EMBEDDING_BATCH tokens (engine/embedding.py).
        context = EMBEDDING_BATCH if info.pooling is not None else self._context_size(info)
        gpu_layers = perf.gpu_layers
        if gpu_layers == -1:
            gpu_layers = self._estimated_gpu_layers(spec, info, context, perf.batch_size or DEFAULT_BATCH)
        return LoadSettings(
            context_size=context,
            batch_size=context if info.pooling is not None else min(perf.batch_size or DEFAULT_BATCH, context),
            threads=perf.threads or _auto_threads(),
            gpu_layers=gpu_layers,
            use_mmap=perf.use_mmap,
            use_mlock=perf.use_mlock,
            # Unset: on where nothing goes to a GPU (as fast as off on a CPU here, and with it a
            # batch of a few tokens gets the logits single tokens get, up to 256 tokens of context,
            # which keeps drafted answers the plain ones: core/speculation.py). With GPU layers, off unless
            # tuned: llama-cpp-python's True forces it (not llama.cpp's "auto"), and a GPU without
            # it for this model would run attention on the CPU.
            flash_attention=bool(perf.flash_attention)
            or (perf.flash_attention is None and gpu_layers == 0)
            or info.pooling is not None,
            prefix_cache_bytes=self._settings.cache.prefix_cache_bytes if info.pooling is None else 0,
            pooling=info.pooling,
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
            self._tuned_cache[key] = tuned_settings.saved_settings(sha)
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

    def forget_tuning(self) -> None:
        """After ``nbllm.tune()``: read the tuned settings afresh at the next load."""
        self._tuned_cache.clear()
        self._auto_gpu_layers.clear()

    def context_size_for(self, spec: ModelSpec) -> int:
        """The context a local model is loaded with (the config's, capped at its training length)."""
        return self._context_size(read_gguf(spec.path))

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
        origin: str = "api",
    ) -> Request:
        """Validate everything that can be checked without the model (fails fast, at the call).

        ``origin``: the front end asking (api, magic, panel, server, cli), for the history log."""
        if origin not in ORIGINS:
            raise ParameterError(f"origin = {origin!r}: must be one of {', '.join(ORIGINS)}.")
        resolved = resolve_params(self._settings.generation, params or {})
        spec = self._answering_model(model)
        if prompt is not None:
            if not isinstance(prompt, str):
                raise NbllmError(f"prompt must be a string, not {type(prompt).__name__}.")
            if resolved.tools is not None:
                raise ParameterError("tools= needs a chat (the tools are described in its messages): use chat().")
            return Request(model=model, params=resolved, prompt=prompt, use_cache=cache, origin=origin)
        tools = resolved.tools
        system = default_model.system_prompt_for(spec.name, spec.source)  # the embedded models' own
        if tools is None or tools.choice == "none":
            chat = with_default_system(normalize_messages(messages), system)
        elif spec.remote is not None:
            # The server describes the tools (sent as OpenAI's tools) and reads calls and results
            # as OpenAI's messages.
            chat = normalize_messages(messages, tool_turns=True)
        else:
            # The model's own call format where its chat template has one (the template then
            # describes the tools and renders calls and results), else nbllm's, described here.
            tools = tools.written_as(syntax_for_template(read_gguf(spec.path).chat_template))
            resolved = resolved.with_tools(tools)
            chat = with_default_system(normalize_messages(messages, tool_turns=tools.syntax.native), system)
            most = max((len(m.get("tool_calls") or ()) for m in chat), default=0)
            if tools.syntax.native and most > tools.syntax.most:
                raise ParameterError(
                    f"An assistant message holds {most} tool calls; {spec.name}'s format ({tools.syntax.name}) has at "
                    f"most {tools.syntax.most} per message. Split them into messages of their own."
                )
            if not tools.syntax.native:
                chat = with_tool_instructions(chat, tools)
        return Request(model=model, params=resolved, messages=tuple(chat), use_cache=cache, origin=origin)

    def _answering_model(self, model: str | None) -> ModelSpec:
        """The model that will answer, resolved once per request; an embedding model cannot write
        answers, which is said before any work, from its metadata."""
        spec = self.registry.resolve(model)
        if spec.is_local and (pooling := read_gguf(spec.path).pooling) is not None:
            raise ParameterError(
                f"{spec.name} is an embedding model ({pooling} pooling): it turns texts into vectors and cannot "
                f"write answers. Use it with nbllm.embed / similar / ask, and a chat model (such as "
                f"{self._settings.default_model}) for generate and chat."
            )
        return spec

    def embed(
        self,
        texts: Any,
        model: str | None = None,
        *,
        normalize: bool = True,
        truncate: bool = False,
        progress: bool = True,
        cancel: threading.Event | None = None,
    ) -> Embeddings:
        """Vectors for ``texts`` (engine/embedding.py); cached on disk per model, text and options.
        ``cancel``: set it to stop between batches (the server, past its deadline)."""
        return embedding.embed(
            self, texts, model=model, normalize=normalize, truncate=truncate, progress=progress, cancel=cancel
        )

    def ask(
        self,
        question: str,
        docs: Any,
        model: str | None = None,
        *,
        embedding_model: str | None = None,
        k: int = 4,
        stream: bool = False,
        progress: bool = True,
        **params: Any,
    ) -> Completion | Stream:
        """Answer ``question`` from ``docs`` (engine/ask.py): the ``k`` most similar passages go
        to the chat model as numbered sources; the answer carries them as ``.sources``."""
        return ask.ask(self, question, docs, model=model, embedding_model=embedding_model, k=k, stream=stream,
                       progress=progress, params=params)  # fmt: skip

    def similar(self, query: str, texts: Any, k: int = 5, model: str | None = None) -> Any:
        """The ``k`` texts most like ``query``, as a DataFrame (text, score, index)."""
        return search.similar(self, query, texts, k, model)

    def stream(self, request: Request, *, batched: bool = False) -> Stream:
        """Answer ``request`` through the one pipeline. ``batched``: decode together with other
        requests for the same model (a server's concurrent clients) instead of waiting for them."""
        self.registry.resolve(request.model)  # an unknown model fails here, not at first token
        return Stream(self, request, self.batches.run if batched else self._run_alone)

    def _run_alone(self, ticket: pipeline.Ticket, stream: Stream) -> Iterator[str]:
        """A fresh answer on the model checked out for this stream alone (the pipeline's run)."""
        stream.thread_id = threading.get_ident()
        resident, first, steps = self._start(ticket, stream)
        return self._pieces_then_checkin(resident, first, steps)

    def _pieces_then_checkin(self, resident: ResidentModel, first: str | None, steps: Iterator[str]) -> Iterator[str]:
        try:
            if first is not None:
                yield first
            yield from steps
        except Exception as error:  # any backend's exception reaches the caller as an nbllm error
            failure = as_nbllm_error(error, f"Generating with {resident.name}")
            if failure is error:
                raise
            raise failure from error
        finally:
            # The backend's own cleanup first (it waits for the model's compute thread to be idle), then
            # the lock: the next user must find the model free of this answer.
            close = getattr(steps, "close", None)
            if close is not None:
                close()
            self.registry.checkin(resident)

    def _start(self, ticket: pipeline.Ticket, stream: Stream) -> tuple[ResidentModel, str | None, Iterator[str]]:
        """Check the model out and produce the first piece; on GPU out-of-memory, retry with
        fewer GPU layers (the guide's first troubleshooting step, done for the user).

        Returns the (locked) model, the first piece (None: the answer is empty) and the rest.
        """
        request = ticket.request
        params = self._with_draft_path(request.params)
        while True:
            try:
                resident = self.registry.checkout(request.model, stream)
            except Exception as error:  # whatever a backend's load raises, the caller gets an nbllm error
                self.stats.record_error(request.model or self._settings.default_model)
                failure = as_nbllm_error(error, f"Loading {request.model or self._settings.default_model}")
                if failure is error:
                    raise
                raise failure from error
            stream.model_name = resident.name
            stream.load_seconds = time.perf_counter() - ticket.started
            try:
                prompt = self._format(resident.model, request)
                steps = resident.model.generate(prompt, params, ticket.seed, stream.usage, stream.cancel)
                first = next(steps, None)
            except GpuOutOfMemoryError:
                self.registry.checkin(resident)
                if resident.settings.gpu_layers <= 0:
                    self.stats.record_error(resident.name)
                    raise
                self.registry.reduce_gpu_layers(resident)
                continue
            except Exception as error:  # the model is free again; any backend's exception is an nbllm error
                self.registry.checkin(resident)
                self.stats.record_error(resident.name)
                failure = as_nbllm_error(error, f"Generating with {resident.name}")
                if failure is error:
                    raise
                raise failure from error
            except BaseException:  # KeyboardInterrupt, GeneratorExit: not the model's error
                self.registry.checkin(resident)
                raise
            return resident, first, steps

    def _with_draft_path(self, params: GenerationParams) -> GenerationParams:
        """The parameters with the draft model named by its file (the backend loads files), or
        without one where nothing will be drafted."""
        name = params.draft_model
        if not name or params.speculation == "off":
            return params
        spec = self.registry.resolve(name)
        if spec.remote is not None:
            raise ParameterError(
                f"draft_model {name!r} is a model on a server; a draft model must be a local GGUF file "
                "(a smaller model of the same family as the one answering)."
            )
        return dataclasses.replace(params, draft_model=str(spec.path))

    @staticmethod
    def _format(model: Any, request: Request) -> FormattedPrompt:
        if request.prompt is not None:
            return FormattedPrompt(request.prompt)
        assert request.messages is not None
        formatted: FormattedPrompt = model.format_chat(list(request.messages), request.params.template_tools())
        return formatted

    def count_chat_tokens(self, messages: Any, model: str | None = None, **params: Any) -> int:
        """How many tokens ``messages`` take as the prompt ``chat(messages, model, **params)``
        would send: the model's own chat template and tokenizer (a remote model: an estimate),
        with the tools' descriptions when ``params`` has tools. Loads the model if needed, and
        waits while it answers another request."""
        request = self.make_request(messages=messages, model=model, params=params)
        try:
            resident = self.registry.checkout(request.model, _Counting())
        except Exception as error:  # whatever a backend's load raises, the caller gets an nbllm error
            failure = as_nbllm_error(error, f"Loading {request.model or self._settings.default_model}")
            if failure is error:
                raise
            raise failure from error
        try:
            return int(resident.model.count_tokens(self._format(resident.model, request)))
        finally:
            self.registry.checkin(resident)

    def batch_progress(self, model: str | None) -> BatchProgress | None:
        """Live totals of the batch session running on ``model``, if one is (charts, bars)."""
        return self.batches.progress(model)

    def parallel(self) -> int:
        """How many sequences one model decodes at once in a batch session."""
        return self.batches.parallel_for(None)[0]

    # ----------------------------------------------------------------- conveniences

    def generate(
        self,
        prompt: str,
        model: str | None = None,
        stream: bool = False,
        cache: bool = True,
        *,
        origin: str = "api",
        **params: Any,
    ) -> Any:
        request = self.make_request(prompt=prompt, model=model, params=params, cache=cache, origin=origin)
        result = self.stream(request)
        return result if stream else result.result()

    def chat(
        self,
        messages: Any,
        model: str | None = None,
        stream: bool = False,
        cache: bool = True,
        *,
        run_tools: bool = False,
        max_steps: int = 5,
        confirm: Callable[[ToolCall], bool] | None = None,
        tool_timeout: float = 60.0,
        origin: str = "api",
        **params: Any,
    ) -> Any:
        if run_tools:
            if stream:
                raise ParameterError("run_tools=True answers after the tools ran: it cannot stream (stream=False).")
            # Each step's answer is recorded in the history with the loop's origin.
            return run_tool_loop(
                self, messages, model, {**params, "origin": origin}, cache=cache, max_steps=max_steps, confirm=confirm,
                timeout=tool_timeout,
            )  # fmt: skip
        request = self.make_request(messages=messages, model=model, params=params, cache=cache, origin=origin)
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
        origin: str = "api",
        **params: Any,
    ) -> list[ManyResult]:
        try:  # checking hundreds of requests takes a moment: Ctrl-C then stops the batch as it would later
            requests = [
                self.make_request(
                    model=model,
                    params={**params, **self._item(per_item, i)},
                    cache=cache,
                    origin=origin,
                    **{field: item},
                )
                for i, item in enumerate(items)
            ]
        except KeyboardInterrupt:
            stopped = GenerationError("Stopped by an interrupt before this prompt started.")
            raise BatchInterrupted([ManyResult(i, "", None, stopped) for i in range(len(items))]) from None
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
                    "batch": self._batch_report(r.info) if r.info else {"parallel": self.parallel()},
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


class _Counting:
    """The model's lock owner while ``count_chat_tokens`` formats and tokenizes: never suspended."""

    def __init__(self) -> None:
        self.thread_id = threading.get_ident()

    def is_suspended(self) -> bool:
        return False

    def abandon(self) -> None:  # counting is never left half-way
        pass
