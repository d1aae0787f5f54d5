"""The endpoints, and how an answer goes out: whole, or as server-sent events.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (``"stream": true`` gives server-sent
events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``
(resident models: ``Engine.health()``), ``GET /admin/stats`` (``nbllm.stats()``) and
``POST /admin/clear-cache``. Requests name their model; it comes from the same registry, prompt
cache and stats as the notebook's ``%%llm``, because it is the same engine.

A front end: it parses (``openai_format``), calls the one generation path
(``Engine.stream``, run by the ``scheduler``) and shows the result.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import nbllm
from nbllm._version import __version__
from nbllm.backends.base import ModelSpec
from nbllm.core.errors import NbllmError, did_you_mean
from nbllm.engine import Engine, Stream
from nbllm.engine.embedding import embedding_dimensions
from nbllm.server import openai_format
from nbllm.server.errors import internal_error
from nbllm.server.openai_format import ApiError, Kind, ParsedRequest, Reply
from nbllm.server.options import ServerOptions, missing_server_extra
from nbllm.server.scheduler import (
    ClientWatch,
    Deadline,
    Event,
    Failed,
    Finished,
    Generation,
    Scheduler,
    TimedOut,
    before,
)
from nbllm.server.security import admin_guard

try:
    from fastapi import Depends, FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, Response, StreamingResponse
except ImportError as missing:  # the server's libraries are an optional extra
    raise missing_server_extra(missing) from missing

log = logging.getLogger("nbllm.server")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/admin/stats")


def add_openai_routes(app: FastAPI, options: ServerOptions, scheduler: Scheduler) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """Answer a conversation (OpenAI's chat completions)."""
        return await _answer(request, "chat", options, scheduler)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """Continue a text (OpenAI's legacy completions)."""
        return await _answer(request, "completion", options, scheduler)

    embedding_requests = [0]  # in flight: past options.max_waiting, a 503 at once

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        """Vectors for texts (OpenAI's embeddings), from an embedding model: ``nbllm.embed``."""
        deadline = Deadline.after(options.request_timeout)
        engine = nbllm.get_engine()
        parsed = openai_format.parse_embeddings(await _json_body(request, deadline))
        if embedding_requests[0] >= max(1, options.max_waiting):
            raise scheduler.busy()
        cancel = threading.Event()
        embedding_requests[0] += 1
        try:
            # All of it on a worker thread: resolving the default model may convert it (seconds),
            # and the embedding blocks on the model's lock and its decodes.
            vectors, name = await before(deadline, run_in_threadpool(_embed, engine, parsed, cancel))
        except TimedOut:
            cancel.set()  # the worker stops after its current batch and gives the model back
            raise _timed_out(options) from None
        finally:
            embedding_requests[0] -= 1
        return JSONResponse(openai_format.embeddings_answer(vectors, name, parsed.base64))

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        """Every model a request can name: configured, in the models folder, or resident."""
        rows = nbllm.get_engine().registry.rows()
        return {"object": "list", "data": [_model_card(row.name, row.path, row.resident) for row in rows]}

    @app.get("/v1/models/{model_id}")
    def get_model(model_id: str) -> dict[str, Any]:
        openai_format.check_model_name(model_id)
        engine = nbllm.get_engine()
        spec = _resolve_model(engine, model_id)
        resident = any(r.spec.key == spec.key for r in engine.registry.resident())
        return _model_card(spec.name, str(spec.path), resident)


def add_monitoring_routes(app: FastAPI, options: ServerOptions, scheduler: Scheduler) -> None:
    admin = [Depends(admin_guard(options))]

    @app.get("/")
    def index() -> dict[str, Any]:
        return {
            "name": "nbllm",
            "version": __version__,
            "openai_base_url": "/v1",
            "endpoints": list(ENDPOINTS),
        }

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Resident models with their settings and memory (``nbllm.health()``), and the queue."""
        return {**nbllm.health(), "server": scheduler.snapshot()}

    @app.get("/admin/stats", dependencies=admin)
    def stats() -> dict[str, Any]:
        """Requests, tokens, loads, evictions, cache hits, per model (``nbllm.stats()``)."""
        return {**nbllm.stats(), "server": scheduler.snapshot()}

    @app.post("/admin/clear-cache", dependencies=admin)
    def clear_cache() -> dict[str, Any]:
        """Empty the prompt cache and the KV prefix snapshots (``nbllm.clear_cache()``)."""
        nbllm.clear_cache()
        return {"status": "ok", "cache": nbllm.get_engine().cache_stats()}


def _embed(engine: Engine, parsed: openai_format.EmbeddingsRequest, cancel: threading.Event) -> tuple[Any, str]:
    """The vectors and the answering model's name; what the client can fix is an ApiError."""
    try:
        if parsed.model is None:  # the config's embedding model (a path there is the owner's choice)
            spec = engine.registry.resolve(engine.settings.embedding_model)
        else:
            spec = _resolve_model(engine, parsed.model)  # only listed names: no client-given paths
        dimensions = embedding_dimensions(spec)
        if parsed.dimensions is not None and dimensions is not None and parsed.dimensions != dimensions:
            raise openai_format.ApiError(
                400,
                f"dimensions={parsed.dimensions}: {spec.name} gives vectors of {dimensions} dimensions, and nbllm "
                "does not shorten them. Leave dimensions out.",
                param="dimensions",
                code="unsupported_value",
            )
        model = parsed.model or engine.settings.embedding_model
        return engine.embed(parsed.texts, model, progress=False, cancel=cancel), spec.name
    except NbllmError as error:
        raise openai_format.api_error(error, input_param="input") from None


def _model_card(name: str, path: str, resident: bool) -> dict[str, Any]:
    try:
        created = int(os.stat(path).st_mtime)
    except OSError:
        created = 0  # the default model before its first use: not assembled yet
    return {"id": name, "object": "model", "created": created, "owned_by": "nbllm", "resident": resident}


# ------------------------------------------------------------------------------ answering


async def _answer(request: Request, kind: Kind, options: ServerOptions, scheduler: Scheduler) -> Response:
    # One deadline for the whole request, from its arrival: reading the body, waiting for the
    # model, reading the prompt, generating (server.request_timeout).
    deadline = Deadline.after(options.request_timeout)
    engine = nbllm.get_engine()
    parsed = openai_format.parse_request(
        kind,
        await _json_body(request, deadline),
        max_tokens_limit=options.max_tokens_limit,
        default_max_tokens=engine.settings.generation.default_max_tokens,
    )
    spec = _resolve_model(engine, parsed.model)
    stream = _open_stream(engine, parsed, batched=options.batched)
    reply = Reply(kind, spec.name, include_usage=parsed.include_usage, tools=stream.request.params.tools)
    async with ClientWatch(request.receive, deadline) as client:
        try:
            generation = await scheduler.start(spec.key, stream, client)
        except TimedOut:  # it waited for the model all this time: nothing was started
            raise _timed_out(options) from None
        if generation is None:
            return _client_gone()
        # The first event decides the status code: a prompt too long for the context (or any
        # failure before the first token) must be a 4xx, not an error inside a 200 stream.
        # Until then the generation may be reading a long prompt: a client that leaves, or the
        # deadline, stops that too (llama.cpp's abort callback, within a graph node).
        try:
            first = await client.first_of(generation.next_event())
        except TimedOut:
            generation.stop()
            raise _timed_out(options) from None
        if first is None:
            generation.stop()
            return _client_gone()
        if isinstance(first, Failed):
            raise _failure(first.error, parsed)
        if not parsed.stream:
            return await _whole_answer(reply, generation, first, client, parsed, options)
    return StreamingResponse(
        _sse(reply, generation, first, parsed, deadline, options),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _json_body(request: Request, deadline: Deadline) -> Any:
    try:
        raw = await before(deadline, request.body())
    except TimedOut:
        raise ApiError(
            408,
            "The request body did not arrive in time (server.request_timeout). Send it again.",
            code="request_timeout",
        ) from None
    if not raw.strip():
        raise ApiError(400, 'The request body is empty: send a JSON object such as {"model": ..., "messages": [...]}.')
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise ApiError(
            400,
            f"The request body is not valid JSON ({error}). Send a JSON object with Content-Type: application/json.",
        ) from None


def _resolve_model(engine: Engine, name: str | None) -> ModelSpec:
    """The model a request names, by name only: a client must not open files by their path.

    A name is served if ``GET /v1/models`` lists it (configured, remote, in the models folder,
    resident); every other name gets the same 404, whatever is on disk under that name:
    ``config.yaml``, ``..`` or ``/etc/passwd`` must not answer differently from a name that
    exists nowhere (that would tell a client which files exist). Only the listed names reach the
    registry, so a client's text never becomes a path that is looked up."""
    if name is None:  # the default model: the config's choice, not the client's
        try:
            return engine.registry.resolve(None)
        except NbllmError as error:
            raise openai_format.api_error(error) from None
    known = engine.registry.known_names()
    if name.strip() not in known:
        raise _unknown_model(name, known)
    try:
        spec = engine.registry.resolve(name)
    except NbllmError as error:
        raise openai_format.api_error(error) from None
    if spec.source == "path":  # a models-folder file removed since the listing: resolve fell back to the disk
        raise _unknown_model(name, known)
    return spec


def _unknown_model(name: str, known: list[str]) -> ApiError:
    return ApiError(
        404,
        f"Unknown model {name!r}.{did_you_mean(name, known)} This server serves models by name, not by file path: "
        "GET /v1/models lists them. To serve another model, name its file in the config's models section or put it "
        "in the models folder.",
        param="model",
        code="model_not_found",
    )


def _open_stream(engine: Engine, parsed: ParsedRequest, *, batched: bool) -> Stream:
    try:
        request = engine.make_request(
            prompt=parsed.prompt, messages=parsed.messages, model=parsed.model, params=parsed.params, origin="server"
        )
        return engine.stream(request, batched=True) if batched else engine.stream(request)
    except NbllmError as error:
        raise openai_format.api_error(error, input_param=parsed.input_param) from None


def _failure(error: Exception, parsed: ParsedRequest) -> ApiError:
    if isinstance(error, NbllmError):
        answer = openai_format.api_error(error, input_param=parsed.input_param)
        if answer.status >= 500:  # the owner's to fix: the whole message (paths too) in the log
            log.warning("Request failed: %s", error)
        return answer
    log.error("Generation failed", exc_info=error)
    return internal_error(error)


def _cut_short() -> ApiError:
    return ApiError(
        503,
        "The server stopped before the answer was complete. Send the request again.",
        type="server_error",
        code="server_shutting_down",
    )


def _timed_out(options: ServerOptions) -> ApiError:
    """The answer to a request that ran out of time: a 504, as a gateway whose upstream (here, the
    model) did not answer in time. 408 would blame the client's sending, which was done. Not
    worth retrying as it is: ``x-should-retry: false`` tells the OpenAI clients so."""
    return ApiError(
        504,
        f"The request took longer than this server allows ({options.request_timeout:g} s, server.request_timeout) "
        "and was stopped. Ask for fewer tokens (max_tokens) or send a shorter prompt; the server's owner can raise "
        "--request-timeout.",
        type="server_error",
        code="request_timeout",
        headers={"x-should-retry": "false"},
    )


def _client_gone() -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


async def _whole_answer(
    reply: Reply,
    generation: Generation,
    first: Event,
    client: ClientWatch,
    parsed: ParsedRequest,
    options: ServerOptions,
) -> Response:
    pieces: list[str] = []
    event: Event | None = first
    while isinstance(event, str):
        pieces.append(event)
        try:
            event = await client.first_of(generation.next_event())
        except TimedOut:
            generation.stop()
            raise _timed_out(options) from None
        if event is None:
            generation.stop()
            return _client_gone()
    if isinstance(event, Failed):
        raise _failure(event.error, parsed)
    assert isinstance(event, Finished)
    if event.stats.finish_reason == "cancelled":
        raise _cut_short()
    return JSONResponse(reply.answer("".join(pieces), event.stats))


def _sse_data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse(
    reply: Reply,
    generation: Generation,
    first: Event,
    parsed: ParsedRequest,
    deadline: Deadline,
    options: ServerOptions,
) -> AsyncIterator[str]:
    """OpenAI's server-sent events. On a disconnect Starlette cancels this generator; ``finally``
    then stops the generation, so the model is free again within a token. Past the deadline the
    stream ends with a ``request_timeout`` error event (the status line has been sent)."""
    try:
        opening = reply.opening()
        if opening is not None:
            yield _sse_data(opening)
        event = first
        # With tools, an answer that starts as a call ("[", "<tool_call>"...: the model's call
        # format) is held back and sent as tool_calls deltas once complete. Its start is held
        # until it is known to be a call or text.
        tools = reply.tools if reply.kind == "chat" else None
        held: list[str] | None = [] if tools is not None else None
        calling = False
        while isinstance(event, str):
            if held is not None and not calling:
                held.append(event)
                assert tools is not None
                starts = tools.starts_call("".join(held))
                if starts is not None:
                    calling = starts
                    if not calling:
                        yield _sse_data(reply.piece("".join(held)))
                        held = None
            elif calling:
                assert held is not None
                held.append(event)
            else:
                yield _sse_data(reply.piece(event))
            try:
                event = await before(deadline, generation.next_event())
            except TimedOut:
                yield _sse_data(_timed_out(options).body())  # the OpenAI client raises on it
                yield "data: [DONE]\n\n"
                return
        if held and not calling and not isinstance(event, Failed):
            yield _sse_data(reply.piece("".join(held)))  # ended before it could be told from a call: text
        calls = reply.calls("".join(held)) if calling and held is not None else None
        if calling and held is not None and not calls and not isinstance(event, Failed):
            yield _sse_data(reply.piece("".join(held)))  # an unfinished call: the text it is
        if isinstance(event, Failed):
            yield _sse_data(_failure(event.error, parsed).body())  # the OpenAI client raises on it
        elif event.stats.finish_reason == "cancelled":
            yield _sse_data(_cut_short().body())
        else:
            for chunk in reply.call_chunks(calls or []):
                yield _sse_data(chunk)
            yield _sse_data(reply.closing(event.stats, called=bool(calls)))
            if reply.include_usage:
                yield _sse_data(reply.usage_chunk(event.stats))
        yield "data: [DONE]\n\n"
    finally:
        generation.stop()
