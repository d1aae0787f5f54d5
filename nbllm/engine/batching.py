"""Many requests on one model at once: batch sessions and ``generate_many``.

A *session* is one run of the backend's continuous-batching loop on one model. It holds the
model (its lock) while it runs and takes requests from any thread: ``generate_many`` puts a
whole list in, a server's concurrent requests join one by one while it runs. When nothing is
queued or running any more, the session ends and the model is free for single streams again.

Both go through the answer pipeline (``pipeline.py``): the prompt cache is consulted per item
first (hits never enter the batch), and stats and storing are the pipeline's.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nbllm.backends.base import BatchEvent, BatchItem, BatchProgress, ModelSpec, Usage
from nbllm.core.chat_format import FormattedPrompt
from nbllm.core.errors import GenerationError, InsufficientMemoryError, NbllmError, StructuredOutputError
from nbllm.core.fit import kv_cache_bytes
from nbllm.core.gguf_file import read_gguf
from nbllm.core.metrics import RequestStats
from nbllm.core.progress import progress_bar
from nbllm.core.units import format_bytes
from nbllm.core.waiting import next_item
from nbllm.engine import pipeline
from nbllm.engine.request import Request
from nbllm.host import machine

if TYPE_CHECKING:
    from nbllm.engine.engine import Engine
    from nbllm.engine.stream import Stream

log = logging.getLogger("nbllm")

DEFAULT_PARALLEL = 8  # llama-batched-bench on the default model: 45 t/s at 1, 108 at 4, 126 at 8


@dataclass
class ManyResult:
    """One prompt's answer from ``generate_many``: ``text`` and ``stats`` (and ``data`` with a
    schema), or ``error`` (an answer that did not fit its schema keeps its ``text``)."""

    index: int
    text: str = ""
    stats: RequestStats | None = None
    error: NbllmError | None = None
    data: Any = None

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
        # Whatever goes wrong, every queued item gets an nbllm error and the model is checked in:
        # an exception that escaped this thread left its callers waiting forever (a chat template
        # that did not compile hung generate_many and every server request for the model).
        registry = self._engine.registry
        owner = _SessionOwner()
        try:
            resident = registry.checkout(self.model, owner)
        except Exception as error:
            self._fail_queued(as_nbllm_error(error, f"Loading {self.model or 'the default model'}"))
            return
        self.resident_name = resident.name
        try:
            resident.model.run_batch(
                self._feed, self.stop, self.progress, self._idle, parallel=self.parallel, seq_context=self.seq_context
            )
        except Exception as error:
            failure = as_nbllm_error(error, f"A batch on {resident.name}")
            log.warning("A batch on %s failed: %s", resident.name, failure)
            self._fail_queued(failure)
        finally:
            with self._lock:
                self._open = False
            registry.checkin(resident)

    def _fail_queued(self, error: NbllmError) -> None:
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
    def _check_memory(spec: ModelSpec, parallel: int, seq_context: int) -> None:
        """The batch context's KV cache, refused up front when it cannot fit (not an OOM kill)."""
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

    def run(self, ticket: pipeline.Ticket, stream: Stream) -> Iterator[str]:
        """One request through its model's session, as the pipeline's run: a server's concurrent
        requests for one model decode together instead of waiting in line."""
        request = ticket.request
        events: queue.SimpleQueue[BatchEvent] = queue.SimpleQueue()
        item = BatchItem(
            "stream", _batch_prompt(request), request.params, ticket.seed, events.put, stream.cancel, stream.usage
        )
        return self._events_as_pieces(self.submit(request.model, item), events, stream)

    @staticmethod
    def _events_as_pieces(
        session: BatchSession, events: queue.SimpleQueue[BatchEvent], stream: Stream
    ) -> Iterator[str]:
        finished = False
        try:
            while True:
                event = next_item(events)
                if event.kind == "piece":
                    yield event.text
                    continue
                finished = True
                if event.kind == "error":
                    assert event.error is not None
                    raise event.error
                return
        finally:
            stream.model_name = session.resident_name
            if not finished:
                stream.cancel.set()  # the loop drops it within a step


def as_nbllm_error(error: Exception, doing: str) -> NbllmError:
    """``error`` if it is an nbllm error, else a ``GenerationError`` naming it (the cause kept)."""
    if isinstance(error, NbllmError):
        return error
    failure = GenerationError(f"{doing} failed: {type(error).__name__}: {error}.")
    failure.__cause__ = error
    return failure


def _batch_prompt(request: Request) -> FormattedPrompt | list[dict[str, Any]]:
    # A chat stays messages: the loop has the model format it (its template or the transcript).
    return FormattedPrompt(request.prompt) if request.prompt is not None else [dict(m) for m in request.messages or ()]


# ---------------------------------------------------------------------------- generate_many


@dataclass
class _Answer:
    """One of ``generate_many``'s prompts on its way through the pipeline."""

    index: int
    pieces: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    stats: RequestStats | None = None
    started: float | None = None
    load_seconds: float = 0.0
    model_name: str | None = None


def run_many(
    engine: Engine,
    requests: Sequence[Request],
    *,
    on_result: Callable[[ManyResult], None] | None = None,
    progress: bool = True,
) -> list[ManyResult]:
    """Answer every request, batched; results in input order. See ``Engine.generate_many``."""
    results: list[ManyResult | None] = [None] * len(requests)
    answers = [_Answer(index) for index in range(len(requests))]
    tickets: list[pipeline.Ticket] = []
    events: queue.SimpleQueue[BatchEvent] = queue.SimpleQueue()
    items: dict[int, BatchItem] = {}
    sessions: dict[int, BatchSession] = {}
    bar = progress_bar(progress, len(requests), "Prompts", "prompt")

    def deliver(result: ManyResult) -> None:
        results[result.index] = result
        bar.update(1)
        if on_result is not None:
            on_result(result)

    # An interrupt anywhere from here (reading the cache, submitting hundreds of prompts, waiting)
    # stops the batch the same way: what finished is kept, the rest is cancelled.
    try:
        tickets += [
            pipeline.prepare(engine, request, answer) for request, answer in zip(requests, answers, strict=True)
        ]
        for index, (answer, ticket) in enumerate(zip(answers, tickets, strict=True)):
            if ticket.cached is not None:
                # Timed from here, not from before every prompt was looked up (as at submission below).
                tickets[index] = ticket = dataclasses.replace(ticket, started=time.perf_counter())
                for _ in pipeline.replay(engine, ticket, answer, quiet=True):
                    pass
                assert answer.stats is not None
                deliver(_finished(ticket.request, answer.index, "".join(answer.pieces), answer.stats))
        for answer, ticket in zip(answers, tickets, strict=True):
            if ticket.cached is not None:
                continue
            request, index = ticket.request, answer.index
            items[index] = BatchItem(
                index, _batch_prompt(request), request.params, ticket.seed, events.put, usage=answer.usage
            )
            tickets[index] = dataclasses.replace(ticket, started=time.perf_counter())  # timed from submission
            sessions[index] = engine.batches.submit(request.model, items[index])
        remaining = len(items)
        while remaining:
            event = next_item(events)
            answer = answers[event.item.key]
            if event.kind == "piece":
                answer.pieces.append(event.text)
                continue
            remaining -= 1
            ticket = tickets[answer.index]
            answer.model_name = sessions[answer.index].resident_name
            if event.kind == "error":
                engine.stats.record_error(answer.model_name or engine.registry.resolve(ticket.request.model).name)
                assert event.error is not None
                pipeline.failed(engine, ticket, answer, event.error)
                deliver(ManyResult(answer.index, "", None, event.error))
                continue
            stats = pipeline.finish(engine, ticket, answer, quiet=True)
            pipeline.store(engine, ticket, answer)
            deliver(_finished(ticket.request, answer.index, "".join(answer.pieces), stats))
    except KeyboardInterrupt:
        for index, item in items.items():
            item.cancel.set()  # ours only: other users may share the session
            if results[index] is None:  # in the history as cancelled, with what it had written
                pipeline.failed(engine, tickets[index], answers[index], KeyboardInterrupt())
        raise BatchInterrupted(_interrupted(results, answers)) from None
    finally:
        bar.close()
    return [r if r is not None else ManyResult(i) for i, r in enumerate(results)]


def _finished(request: Request, index: int, text: str, stats: RequestStats) -> ManyResult:
    """A finished answer's result; one that does not fit its schema is this row's error."""
    try:
        return ManyResult(index, text, stats, data=pipeline.structured_data(request, text, stats))
    except StructuredOutputError as error:
        return ManyResult(index, text, stats, error)


def _interrupted(results: list[ManyResult | None], answers: Sequence[_Answer]) -> list[ManyResult]:
    cancelled = GenerationError("Stopped by an interrupt before this prompt finished.")
    return [
        r if r is not None else ManyResult(i, "".join(answers[i].pieces), None, cancelled)
        for i, r in enumerate(results)
    ]
