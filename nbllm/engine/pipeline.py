"""The one answer pipeline. Every request passes through the same steps, written here once:

    prepare   the prompt-cache key (also the answer's provenance), a cached answer, the seed
    run       the caller's: one stream on a checked-out model, or an item of a batch session
    finish    the stats, the counters behind ``nbllm.stats()``, the log lines
    record    the answer into the history log (``record``: fresh, cached, cancelled or failed)
    store     the answer into the prompt cache, if it ended normally

A single stream and a server's batched stream drive it through ``answer_stream``;
``generate_many`` calls the steps itself because it waits on many answers at once. A new kind
of request (a schema, tools, an embedding, speculation) adds its fields to ``Request`` and the
cache key here, and every front end gets it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from nbllm.backends import answer_identity
from nbllm.backends.base import ModelSpec, Usage
from nbllm.core import identity
from nbllm.core.errors import IncompleteAnswerError, ModelNotFoundError, StructuredOutputError
from nbllm.core.history import Entry
from nbllm.core.metrics import RequestStats
from nbllm.core.prompt_cache import CACHE_FORMAT
from nbllm.engine.request import Request

if TYPE_CHECKING:
    from nbllm.engine.engine import Engine
    from nbllm.engine.stream import Stream

log = logging.getLogger("nbllm")


class Answering(Protocol):
    """Whoever receives an answer as it is made: a ``Stream``, or one of ``generate_many``'s items."""

    pieces: list[str]
    usage: Usage
    stats: RequestStats | None
    started: float | None
    load_seconds: float  # part of the wait spent loading the model or waiting for it
    model_name: str | None  # the model that answered, once the run has checked it out


@dataclass(frozen=True)
class Ticket:
    """A prepared request: its cache key, the cached answer if there is one, and its seed."""

    request: Request
    key: dict[str, Any]
    cached: Mapping[str, Any] | None
    seed: int
    started: float

    @property
    def model_hash(self) -> str:
        return str(self.key["model_sha256"])


# A run starts one fresh answer for its ticket and returns its pieces, keeping ``stream.usage``
# current and naming the model that answered in ``stream.model_name``. What fails before the
# run returns (no model could be checked out, the batch has no room) is the run's to count: no
# answer was begun, so the pipeline records no request for it. What fails later (a batched
# prompt that does not fit, a broken connection) ends the answer as an error, and is counted.
Run = Callable[[Ticket, "Stream"], Iterator[str]]


def prepare(engine: Engine, request: Request, receiver: Answering) -> Ticket:
    started = receiver.started = time.perf_counter()
    key = cache_key(engine, request)
    cached = cached_answer(engine, request, key)
    seed = request.params.seed if request.params.seed is not None else secrets.randbits(32)
    return Ticket(request, key, cached, seed, started)


def answer_stream(engine: Engine, request: Request, receiver: Stream, run: Run) -> Generator[str, None, None]:
    """One answer as a stream of pieces, through every step; ``run`` produces the fresh ones."""
    ticket = prepare(engine, request, receiver)
    if ticket.cached is not None:
        yield from replay(engine, ticket, receiver)
        return
    usage = receiver.usage
    try:
        pieces = run(ticket, receiver)
    except BaseException as error:  # no answer was begun (the model did not load, say): in the history all the same
        failed(engine, ticket, receiver, error)
        raise
    failure: str | None = None  # the history keeps why an answer failed after it began
    try:
        for piece in pieces:
            receiver.pieces.append(piece)
            yield piece
    except BaseException as error:
        cancelled = isinstance(error, (GeneratorExit, KeyboardInterrupt))
        usage.finish_reason = "cancelled" if cancelled else "error"
        failure = None if cancelled else _error_text(error)
        raise
    finally:
        # The run's own end first (the model checked in, a batch item cancelled), whatever
        # ended this one: left to the garbage collector, a kept traceback could hold the model.
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
        finish(engine, ticket, receiver, error=failure)
    store(engine, ticket, receiver)


def finish(
    engine: Engine, ticket: Ticket, receiver: Answering, *, quiet: bool = False, error: str | None = None
) -> RequestStats:
    """The answer's stats from its usage, counted and logged (``quiet``: counted only); ``error``:
    why it failed after it began, for the history."""
    usage = receiver.usage
    stats = RequestStats(
        model=_answered_by(engine, ticket, receiver),
        prompt_tokens=usage.prompt_tokens,
        reused_prompt_tokens=usage.reused_prompt_tokens,
        completion_tokens=usage.completion_tokens,
        load_seconds=receiver.load_seconds,
        total_seconds=time.perf_counter() - ticket.started,
        finish_reason=usage.finish_reason,
        seed=ticket.seed,
        model_hash=ticket.model_hash,
        schema=_schema_name(ticket.request),
        max_tokens=ticket.request.params.max_tokens,
        drafted_tokens=usage.drafted_tokens,
        accepted_tokens=usage.accepted_tokens,
    )
    if usage.first_token_at is not None:
        stats.time_to_first_token = usage.first_token_at - ticket.started
    receiver.stats = stats
    engine.stats.record_request(stats)
    record(engine, ticket, receiver, error=error)
    if not quiet:
        if stats.reused_prompt_tokens:
            log.info("Reused %d prompt tokens", stats.reused_prompt_tokens)
        log.info("%s", stats.summary())
    return stats


def failed(engine: Engine, ticket: Ticket, receiver: Answering, error: BaseException) -> None:
    """An answer that ended before it began (its run raised, or its batch item failed): not
    counted as a request (the run counts it), but recorded in the history with its error."""
    cancelled = isinstance(error, (GeneratorExit, KeyboardInterrupt))
    receiver.usage.finish_reason = "cancelled" if cancelled else "error"
    record(engine, ticket, receiver, error=None if cancelled else _error_text(error))


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def record(engine: Engine, ticket: Ticket, receiver: Answering, *, error: str | None = None) -> None:
    """The history log's one hook: every answer that leaves the pipeline, whichever front end
    asked and however it ended (fresh, from the prompt cache, cancelled, failed), is handed to
    the log here. Only queued: the log's own thread writes it, off the answer's path."""
    history = engine.history
    if not history.active:
        return
    request, stats = ticket.request, receiver.stats
    constraint, tools = request.params.constraint, request.params.tools
    schema = None
    if constraint is not None and constraint.kind != "tools":
        schema = {**constraint.describe(), "schema": constraint.schema}
    if stats is None:  # failed before any stats were made
        usage = receiver.usage
        model = receiver.model_name or request.model or engine.settings.default_model
        stats = RequestStats(
            model=model, completion_tokens=usage.completion_tokens, finish_reason=usage.finish_reason,
            total_seconds=time.perf_counter() - ticket.started, seed=ticket.seed, model_hash=ticket.model_hash,
        )  # fmt: skip
    history.record(
        Entry(
            origin=request.origin, model=stats.model, model_sha256=stats.model_hash, kind=request.kind,
            prompt=request.prompt if request.prompt is not None else _last_user_text(request),
            messages=request.messages, params=request.params.as_dict(), seed=stats.seed,
            answer="".join(receiver.pieces), finish_reason=stats.finish_reason, cached=stats.cached,
            prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
            seconds=round(stats.total_seconds, 6), tokens_per_second=round(stats.tokens_per_second, 3),
            time_to_first_token=round(stats.time_to_first_token, 6), schema=schema,
            tools={**tools.describe(), "definitions": [t.as_openai() for t in tools.tools]} if tools else None,
            error=error,
        )
    )  # fmt: skip


def _last_user_text(request: Request) -> str | None:
    """A chat's prompt for the history's prompt column: its last user message, as text."""
    for message in reversed(request.messages or ()):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, default=str)
    return None


def _schema_name(request: Request) -> str | None:
    constraint = request.params.constraint
    return constraint.name if constraint is not None else None


def structured_data(request: Request, text: str, stats: RequestStats | None) -> Any:
    """The answer as data when the request had a schema or choices (None without one).

    An answer cut off before its value was complete is an ``IncompleteAnswerError`` that keeps
    the text; one that does not fit (possible only when a remote server ignored the schema) a
    ``StructuredOutputError``."""
    constraint = request.params.constraint
    if constraint is None:
        return None
    reason = stats.finish_reason if stats is not None else "unknown"
    tools = request.params.tools
    if constraint.kind == "tools" and tools is not None and not tools.starts_call(text):
        return []  # tool_choice auto, answered in text: text may end anywhere, like any answer
    if reason == "length":
        raise IncompleteAnswerError(
            f"The answer reached max_tokens ({request.params.max_tokens}) before {constraint.name} was complete. "
            f"Raise max_tokens (e.g. max_tokens={max(request.params.max_tokens * 2, 256)}); the partial text is in "
            "the error's .text.",
            text,
            stats,
        )
    if reason in ("cancelled", "error"):
        raise IncompleteAnswerError(f"The answer was {reason} before {constraint.name} was complete.", text, stats)
    try:
        return constraint.parse(text)
    except StructuredOutputError as error:
        error.stats = stats
        raise


def _answered_by(engine: Engine, ticket: Ticket, receiver: Answering) -> str:
    return receiver.model_name or engine.registry.resolve(ticket.request.model).name


def store(engine: Engine, ticket: Ticket, receiver: Answering) -> None:
    """Keep a finished answer in the prompt cache; only one that ended normally is worth
    keeping, never a cancelled or failed one."""
    stats = receiver.stats
    if stats is not None and stats.finish_reason in ("stop", "length") and cache_wanted(engine, ticket.request):
        engine.prompt_cache.put(ticket.key, {**stats.as_dict(), "pieces": list(receiver.pieces)})


# ---------------------------------------------------------------------------- the prompt cache


def replay(engine: Engine, ticket: Ticket, receiver: Answering, *, quiet: bool = False) -> Generator[str, None, None]:
    """A cached answer, streamed like a fresh one so that front ends need no special case
    (``quiet``: counted, not logged)."""
    answer = ticket.cached
    assert answer is not None
    stats = cached_stats(answer, ticket.key, engine.registry.resolve(ticket.request.model).name)
    receiver.usage.completion_tokens = stats.completion_tokens
    try:
        for index, piece in enumerate(answer["pieces"]):
            if index == 0:
                stats.time_to_first_token = time.perf_counter() - ticket.started
            receiver.pieces.append(piece)
            yield piece
    finally:
        stats.total_seconds = time.perf_counter() - ticket.started
        receiver.stats = stats
        saved = max(float(answer["total_seconds"]) - stats.total_seconds, 0.0)
        engine.stats.record_request(stats, time_saved=saved)
        record(engine, ticket, receiver)
        if not quiet:
            log.info("Prompt cache hit")
            log.info("%s", stats.summary())


def cached_answer(engine: Engine, request: Request, key: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The prompt cache's answer to ``request`` (under its ``key``), or None; a miss is counted."""
    if not cache_wanted(engine, request):
        return None
    answer = engine.prompt_cache.get(key)
    if answer is None:
        engine.stats.record_cache_miss()
    return answer


def cache_wanted(engine: Engine, request: Request) -> bool:
    cache = engine.settings.cache
    return request.use_cache and cache.enabled and cache.prompt_cache_size > 0 and engine.prompt_cache.enabled


def cache_key(engine: Engine, request: Request) -> dict[str, Any]:
    """Everything that decides an answer; a change in any of it is a different entry.

    Computed for every request, cached or not: it is also the answer's provenance (the model
    file's SHA-256 is hashed once per file and remembered).
    """
    spec = engine.registry.resolve(request.model)
    # The GGUF header first: a file that is no model fails there at once, before it is hashed.
    context = spec.remote.context_size if spec.remote is not None else engine.context_size_for(spec)
    return {
        "format": CACHE_FORMAT,
        "model_sha256": model_hash(spec),
        "backend": answer_identity(spec),
        "context_size": context,
        "kind": request.kind,
        "prompt": request.prompt,
        "messages": [dict(m) for m in request.messages] if request.messages else None,
        "params": request.params.as_dict(),
    }


def model_hash(spec: ModelSpec) -> str:
    """The model's identity: its file's SHA-256, or for a remote model its server and name."""
    if spec.remote is not None:
        identity_text = f"remote|{spec.remote.url}|{spec.remote.model or spec.name}"
        return hashlib.sha256(identity_text.encode()).hexdigest()
    try:
        return identity.file_sha256(spec.path)
    except OSError as error:
        raise ModelNotFoundError(f"Cannot read model file {spec.path}: {error.strerror or error}.") from error


def cached_stats(answer: Mapping[str, Any], key: Mapping[str, Any], model: str) -> RequestStats:
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
        model_hash=key["model_sha256"],
        schema=answer["schema"],
        max_tokens=answer["max_tokens"],
    )
