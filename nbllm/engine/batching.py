"""Many requests on one model at once: batch sessions and ``generate_many``.

A *session* is one run of the backend's continuous-batching loop on one model. It holds the
model (its lock) while it runs and takes requests from any thread: ``generate_many`` puts a
whole list in, a server's concurrent requests join one by one while it runs. When nothing is
queued or running any more, the session ends and the model is free for single streams again.

The prompt cache is consulted per item first: hits never enter the batch.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbllm.core.errors import NbllmError
from nbllm.core.metrics import RequestStats
from nbllm.core.progress import progress_bar
from nbllm.core.waiting import next_item

if TYPE_CHECKING:
    from nbllm.backends.llama_cpp_batch import BatchEvent, BatchItem, BatchProgress
    from nbllm.engine.engine import Engine, Request

log = logging.getLogger("nbllm")

DEFAULT_PARALLEL = 8  # llama-batched-bench on the default model: 45 t/s at 1, 108 at 4, 126 at 8


@dataclass
class ManyResult:
    """One prompt's answer from ``generate_many``: ``text`` and ``stats``, or ``error``."""

    index: int
    text: str = ""
    stats: RequestStats | None = None
    error: NbllmError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __str__(self) -> str:
        return self.text


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``generate_many``: ``results`` holds what finished (the rest cancelled)."""

    def __init__(self, results: list[ManyResult]) -> None:
        done = sum(1 for r in results if r.ok)
        super().__init__(f"Interrupted: {done} of {len(results)} prompts finished.")
        self.results = results


class _SessionOwner:
    """A session holds its model's lock the way a stream does (see registry.LockOwner)."""

    def __init__(self) -> None:
        self.thread_id = threading.get_ident()

    def is_suspended(self) -> bool:
        return False  # a session is never abandoned half-way: it ends when its work does

    def abandon(self) -> None:  # pragma: no cover - never called: is_suspended() is False
        pass


class BatchSession:
    """One run of the batching loop on one model, fed from any thread."""

    def __init__(self, engine: Engine, model: str | None, parallel: int, seq_context: int) -> None:
        from nbllm.backends.llama_cpp_batch import BatchProgress

        self.model = model
        self.parallel = parallel
        self.seq_context = seq_context
        self.progress: BatchProgress = BatchProgress()
        self.stop = threading.Event()
        self.resident_name: str | None = None
        self._engine = engine
        self._feed: queue.SimpleQueue[BatchItem | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._open = True
        self._thread = threading.Thread(target=self._drive, name=f"nbllm-batch-{model}", daemon=True)
        self._thread.start()

    def submit(self, item: BatchItem) -> bool:
        """Queue ``item``; False when the session has already ended (start a new one)."""
        with self._lock:
            if not self._open:
                return False
            self._feed.put(item)
            return True

    def _idle(self) -> bool:
        # Asked by the loop when nothing is queued or running: close atomically with submit(),
        # so that no item is ever put into a session that will not run it.
        with self._lock:
            if self._feed.empty():
                self._open = False
                return True
            return False

    def _drive(self) -> None:
        registry = self._engine.registry
        owner = _SessionOwner()
        try:
            resident = registry.checkout(self.model, owner)
        except NbllmError as error:
            self._fail_queued(error)
            return
        self.resident_name = resident.name
        try:
            resident.model.run_batch(  # type: ignore[attr-defined]
                self._feed, self.stop, self.progress, self._idle, parallel=self.parallel, seq_context=self.seq_context
            )
        except NbllmError as error:
            log.warning("A batch on %s failed: %s", resident.name, error)
            self._fail_queued(error)
        finally:
            with self._lock:
                self._open = False
            registry.checkin(resident)

    def _fail_queued(self, error: NbllmError) -> None:
        from nbllm.backends.llama_cpp_batch import BatchEvent

        with self._lock:
            self._open = False
        while True:
            try:
                item = self._feed.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.usage.finish_reason = "error"
                item.sink(BatchEvent(item, "error", error=error))


class BatchScheduler:
    """The engine's sessions, one per model at most: requests for a busy model join its session."""

    @staticmethod
    def _check_memory(spec: Any, parallel: int, seq_context: int) -> None:
        """The batch context's KV cache, refused up front when it cannot fit (not an OOM kill)."""
        from nbllm.host import machine
        from nbllm.core.errors import InsufficientMemoryError
        from nbllm.core.fit import kv_cache_bytes
        from nbllm.core.gguf_file import read_gguf
        from nbllm.core.units import format_bytes

        needed = kv_cache_bytes(read_gguf(spec.path), seq_context) * parallel
        available = machine.available_memory()
        if needed > available * 0.8:
            raise InsufficientMemoryError(
                f"Batched generation on {spec.name!r} needs {format_bytes(needed)} of KV cache ({parallel} sequences x "
                f"{seq_context} tokens) but {format_bytes(available)} of RAM is available. Lower performance.parallel "
                "or performance.parallel_context_size."
            )

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sessions: dict[str, BatchSession] = {}
        self._lock = threading.Lock()

    def progress(self, model: str | None) -> BatchProgress | None:
        """The live totals of the session running on ``model``, if one is."""
        with self._lock:
            session = self._sessions.get(self._engine.registry.resolve(model).key)
        return session.progress if session is not None else None

    def parallel_for(self, model: str | None) -> tuple[int, int]:
        perf = self._engine.settings.performance
        return perf.parallel or DEFAULT_PARALLEL, perf.parallel_context_size

    def submit(self, model: str | None, item: BatchItem) -> BatchSession:
        spec = self._engine.registry.resolve(model)
        parallel, seq_context = self.parallel_for(model)
        with self._lock:
            session = self._sessions.get(spec.key)
            if session is None or not session.submit(item):
                if spec.remote is None:  # a remote server holds its own KV cache
                    self._check_memory(spec, parallel, seq_context)
                session = BatchSession(self._engine, model, parallel, seq_context)
                self._sessions[spec.key] = session
                session.submit(item)
            return session


# ---------------------------------------------------------------------------- the engine's side


def _item_stats(item: BatchItem, model: str, submitted: float, model_hash: str | None) -> RequestStats:
    usage = item.usage
    now = time.perf_counter()
    return RequestStats(
        model=model,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        time_to_first_token=(usage.first_token_at - submitted) if usage.first_token_at else 0.0,
        total_seconds=now - submitted,
        finish_reason=usage.finish_reason,
        seed=item.seed,
        model_hash=model_hash,
    )


def _cached_result(engine: Engine, index: int, request: Request, key: Mapping[str, Any]) -> ManyResult | None:
    answer = engine.cached_answer(request, key)
    if answer is None:
        return None
    from nbllm.engine.engine import cached_stats

    started = time.perf_counter()
    stats = cached_stats(answer, key, engine.registry.resolve(request.model).name)
    stats.total_seconds = stats.time_to_first_token = time.perf_counter() - started
    engine.stats.record_request(stats, time_saved=max(float(answer["total_seconds"]) - stats.total_seconds, 0.0))
    return ManyResult(index, "".join(answer["pieces"]), stats)


def run_many(
    engine: Engine,
    requests: Sequence[Request],
    *,
    on_result: Callable[[ManyResult], None] | None = None,
    progress: bool = True,
) -> list[ManyResult]:
    """Answer every request, batched; results in input order. See ``Engine.generate_many``."""
    from nbllm.backends.llama_cpp_batch import BatchItem

    results: list[ManyResult | None] = [None] * len(requests)
    keys = [engine.cache_key(request) for request in requests]
    bar = progress_bar(progress, len(requests), "Prompts", "prompt")

    def deliver(result: ManyResult) -> None:
        results[result.index] = result
        bar.update(1)
        if on_result is not None:
            on_result(result)

    for index, request in enumerate(requests):
        hit = _cached_result(engine, index, request, keys[index])
        if hit is not None:
            deliver(hit)
    events: queue.SimpleQueue[BatchEvent] = queue.SimpleQueue()
    items: dict[int, BatchItem] = {}
    sessions: dict[int, BatchSession] = {}
    submitted: dict[int, float] = {}
    pieces: dict[int, list[str]] = {}
    for index, request in enumerate(requests):
        if results[index] is not None:
            continue
        prompt: Any = request.prompt if request.prompt is not None else [dict(m) for m in request.messages or ()]
        if isinstance(prompt, str):
            from nbllm.core.chat_format import FormattedPrompt

            prompt = FormattedPrompt(prompt)
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(32)
        items[index] = BatchItem(index, prompt, request.params, seed, events.put)
        pieces[index] = []
        submitted[index] = time.perf_counter()
        sessions[index] = engine.batches.submit(request.model, items[index])
    try:
        remaining = len(items)
        while remaining:
            event = next_item(events)
            index = event.item.key
            if event.kind == "piece":
                pieces[index].append(event.text)
                continue
            remaining -= 1
            name = sessions[index].resident_name or engine.registry.resolve(requests[index].model).name
            stats = _item_stats(event.item, name, submitted[index], keys[index]["model_sha256"])
            if event.kind == "error":
                engine.stats.record_error(name)
                deliver(ManyResult(index, "", None, event.error))
                continue
            engine.stats.record_request(stats)
            text = "".join(pieces[index])
            engine.keep_answer(requests[index], keys[index], stats, pieces[index])
            deliver(ManyResult(index, text, stats))
    except KeyboardInterrupt:
        for item in items.values():
            item.cancel.set()  # ours only: other users may share the session
        raise BatchInterrupted(_interrupted(results, pieces)) from None
    finally:
        bar.close()
    return [r if r is not None else ManyResult(i) for i, r in enumerate(results)]


def _interrupted(results: list[ManyResult | None], pieces: Mapping[int, list[str]]) -> list[ManyResult]:
    from nbllm.core.errors import GenerationError

    cancelled = GenerationError("Stopped by an interrupt before this prompt finished.")
    return [
        r if r is not None else ManyResult(i, "".join(pieces.get(i, [])), None, cancelled)
        for i, r in enumerate(results)
    ]


def stream_batched(engine: Engine, request: Request, owner: Any) -> Iterator[str]:
    """One request through the model's batch session, as a stream: a server's concurrent
    requests for one model decode together instead of waiting in line."""
    from nbllm.backends.llama_cpp_batch import BatchItem
    from nbllm.core.chat_format import FormattedPrompt

    started = owner.started = time.perf_counter()
    key = engine.cache_key(request)
    answer = engine.cached_answer(request, key)
    if answer is not None:
        yield from engine._replay(answer, key, request, owner, started)
        return
    events: queue.SimpleQueue[BatchEvent] = queue.SimpleQueue()
    prompt: Any = (
        FormattedPrompt(request.prompt) if request.prompt is not None else [dict(m) for m in request.messages or ()]
    )
    seed = request.params.seed if request.params.seed is not None else secrets.randbits(32)
    item = BatchItem("stream", prompt, request.params, seed, events.put, cancel=owner.cancel, usage=owner.usage)
    session = engine.batches.submit(request.model, item)
    finished = False
    try:
        while True:
            event = next_item(events)
            if event.kind == "piece":
                owner.pieces.append(event.text)
                yield event.text
                continue
            finished = True
            if event.kind == "error":
                assert event.error is not None
                raise event.error
            break
    finally:
        if not finished:
            owner.cancel.set()  # the loop drops it within a step
        name = session.resident_name or engine.registry.resolve(request.model).name
        stats = _item_stats(item, name, started, key["model_sha256"])
        if not finished:
            stats.finish_reason = "cancelled"
        owner.stats = stats
        engine.stats.record_request(stats)
        log.info("%s", stats.summary())
    engine.keep_answer(request, key, stats, owner.pieces)
