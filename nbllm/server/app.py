"""``nbllm serve``: the guide's local server, OpenAI-compatible, on the process-wide engine.

    nbllm serve                                 # http://127.0.0.1:8000, OpenAI base URL .../v1
    handle = nbllm.serve(port=8001)             # the same from a notebook, in a background thread

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``"stream": true`` gives
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health`` (resident models: ``Engine.health()``), ``GET /admin/stats`` (``nbllm.stats()``)
and ``POST /admin/clear-cache``. Requests name their model; it comes from the same registry,
prompt cache and stats as the notebook's ``%%llm``, because it is the same engine.

A front end (DESIGN.md): it parses, calls the one generation path (``Engine.stream``) and shows
the result. fastapi and uvicorn are imported here only; ``import nbllm`` never loads this module.

Safe by default:
- it listens on 127.0.0.1; any other address needs an API key (it refuses to start without one);
- with a key, every endpoint wants ``Authorization: Bearer KEY`` (401 otherwise);
- without one, admin endpoints answer loopback clients only, and requests that a web page could
  send (a foreign ``Origin``, or a ``Host`` that is not a loopback name: DNS rebinding) get a 403;
- request bodies are bounded (1 MiB: 413), answers too (``max_tokens`` above the server's limit:
  400), and so is the queue of waiting requests (503);
- models are served by name only (config names, the models folder, resident ones): a client
  cannot make the server open a file by its path.

Several users: ``server.workers`` requests generate at once, each on a worker thread of this
process (not processes: each would load its own copy of every model). Requests for one model
wait for it in the order they came, without taking a worker; requests for different resident
models run side by side. With ``batched``, requests for one model decode together instead
(``Engine.stream(batched=True)``, up to ``performance.parallel``). A client that hangs up stops
its generation within a token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import nbllm
from nbllm.server.app import openai_format
from nbllm.core.config import Settings
from nbllm.engine.engine import Engine, Stream
from nbllm.core.errors import ConfigError, NbllmError
from nbllm.server.openai_format import ApiError, Kind, ParsedRequest, Reply
from nbllm.engine.registry import ModelSpec
from nbllm.server.scheduler import DEFAULT_MAX_WAITING, ClientWatch, Event, Failed, Finished, Generation, Scheduler

try:
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as missing:  # the server's libraries are an optional extra
    raise NbllmError(
        f"nbllm serve needs fastapi and uvicorn ({missing.name} is missing): pip install 'nbllm[server]'."
    ) from missing

log = logging.getLogger("nbllm.server")
log.addHandler(logging.NullHandler())

DEFAULT_MAX_TOKENS_LIMIT = 4096  # per answer; the config's default_max_tokens (2048) fits under it
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a long prompt is a few hundred KiB
API_KEY_ENV = "NBLLM_API_KEY"  # keeps the key out of the command line (visible to `ps`)
GRACEFUL_SHUTDOWN_SECONDS = 5
LOOPBACK_NAMES = ("localhost",)


# ====================================================================================== options


@dataclass(frozen=True)
class ServerOptions:
    """Where and how to serve. ``server_options()`` builds them from the config's server section."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    api_key: str | None = None
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_waiting: int = DEFAULT_MAX_WAITING
    # Requests for one model decode together (``Engine.stream(batched=True)``, up to
    # performance.parallel of them) instead of one after the other.
    batched: bool = True


def server_options(
    settings: Settings | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
    api_key: str | None = None,
    max_tokens_limit: int | None = None,
    max_body_bytes: int | None = None,
    max_waiting: int | None = None,
    batched: bool = True,
) -> ServerOptions:
    """Arguments over the config's ``server`` section; the API key also from ``$NBLLM_API_KEY``.

    Raises ``ConfigError`` for values that cannot work, and for a non-loopback address without
    an API key: anyone who can reach the machine could otherwise use (and stop) its models.
    """
    section = (settings if settings is not None else nbllm.settings()).server
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or section.api_key
    options = ServerOptions(
        host=host or section.host,
        port=section.port if port is None else port,
        workers=section.workers if workers is None else workers,
        api_key=key,
        max_tokens_limit=DEFAULT_MAX_TOKENS_LIMIT if max_tokens_limit is None else max_tokens_limit,
        max_body_bytes=DEFAULT_MAX_BODY_BYTES if max_body_bytes is None else max_body_bytes,
        max_waiting=DEFAULT_MAX_WAITING if max_waiting is None else max_waiting,
        batched=batched,
    )
    _check_options(options)
    return options


def _check_options(options: ServerOptions) -> None:
    if not 0 <= options.port <= 65535:
        raise ConfigError(f"port = {options.port}: must be from 0 to 65535 (0 = any free port).")
    for name, low, high in (("workers", 1, 256), ("max_tokens_limit", 1, 1 << 20), ("max_waiting", 0, 1 << 16)):
        value = getattr(options, name)
        if not low <= value <= high:
            raise ConfigError(f"{name} = {value}: must be from {low} to {high}.")
    if options.max_body_bytes < 1024:
        raise ConfigError(f"max_body_bytes = {options.max_body_bytes}: must be at least 1024.")
    if options.api_key is not None and not options.api_key.strip():
        raise ConfigError(
            "The API key is empty. Pass a real key (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')."
        )
    if options.api_key is None and not is_loopback(options.host):
        raise ConfigError(
            f"Refusing to listen on {options.host} without an API key: anyone who can reach this machine could "
            f"use its models. Pass --api-key KEY (or set ${API_KEY_ENV}, or server.api_key in the config), "
            "or listen on 127.0.0.1."
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is only reachable from this machine."""
    name = host.strip().strip("[]")
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def _literal_loopback(host: str | None) -> bool:
    """Loopback without asking DNS (a Host or Origin header: DNS is what an attacker controls)."""
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ====================================================================================== access


def _presented_key(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _check_key(request: Request, key: str) -> None:
    presented = _presented_key(request)
    if presented is None:
        raise ApiError(
            401,
            "Missing API key: this server wants 'Authorization: Bearer <key>' (the OpenAI client's api_key).",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(presented.encode(), key.encode()):
        raise ApiError(
            401,
            "Incorrect API key provided. Use the key the server was started with (--api-key or $NBLLM_API_KEY).",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _check_local_caller(request: Request, options: ServerOptions) -> None:
    """Without a key the server is for this machine's programs; web pages must not reach it.

    A browser sends an ``Origin`` header with requests a page makes to another site, and a page
    that rebinds its own DNS name to 127.0.0.1 still sends its own name as ``Host``.
    """
    host = urlsplit("//" + request.headers.get("host", "")).hostname
    if request.headers.get("host") is not None and not (_literal_loopback(host) or host == options.host):
        raise ApiError(
            403,
            f"Host {host!r} is not a loopback name. Without an API key this server answers requests to "
            "localhost / 127.0.0.1 only; start it with --api-key to serve other names.",
            type="permission_error",
            code="host_not_allowed",
        )
    origin = request.headers.get("origin")
    if origin is not None and not _literal_loopback(urlsplit(origin).hostname):
        raise ApiError(
            403,
            f"Requests from web pages ({origin}) are refused without an API key. Start the server with --api-key "
            "and send the key from your page.",
            type="permission_error",
            code="origin_not_allowed",
        )


def _access_guard(options: ServerOptions) -> Callable[[Request], None]:
    def guard(request: Request) -> None:
        if options.api_key is not None:
            _check_key(request, options.api_key)
        else:
            _check_local_caller(request, options)

    return guard


def _admin_guard(options: ServerOptions) -> Callable[[Request], None]:
    def guard(request: Request) -> None:
        # With a key, the app-wide guard has checked it already. Without one, admin endpoints
        # are for this machine only, even if the app is mounted behind something else.
        client = request.client.host if request.client else None
        if options.api_key is None and not _literal_loopback(client):
            raise ApiError(
                403,
                "Admin endpoints answer loopback clients only when the server has no API key. "
                "Start it with --api-key to use them remotely.",
                type="permission_error",
                code="admin_loopback_only",
            )

    return guard


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with a 413, before they are read into memory:
    by their declared length at once, or as soon as a chunked body grows past it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _error(self, size: int | None) -> ApiError:
        told = f" is {size:,} bytes" if size is not None else " is too large"
        return ApiError(
            413,
            f"The request body{told}; this server accepts at most {self.limit:,} bytes. Send a shorter "
            "prompt or conversation (or start the server with a higher --max-body-bytes).",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await _send_error(scope, receive, send, self._error(declared))
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(scope, receive, send, self._error(None))


class _BodyTooLarge(Exception):
    pass


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
    await _error_response(error)(scope, receive, send)


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# ====================================================================================== the app


def create_app(options: ServerOptions | None = None, *, scheduler: Scheduler | None = None) -> FastAPI:
    """The ASGI app. Run it with ``run_server`` / ``ServerHandle``, which bind the address that
    ``options`` checked (uvicorn's own ``--host`` would bypass the API-key rule, and its
    ``--workers`` would load a copy of every model per process)."""
    options = options if options is not None else server_options()
    scheduler = scheduler if scheduler is not None else _scheduler(options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.shutdown()

    app = FastAPI(
        title="nbllm",
        version=nbllm.__version__,
        summary="OpenAI-compatible API on the local GGUF models of nbllm's engine.",
        lifespan=lifespan,
        dependencies=[Depends(_access_guard(options))],
    )
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    _add_error_handlers(app)
    _add_openai_routes(app, options, scheduler)
    _add_monitoring_routes(app, options, scheduler)
    return app


def _scheduler(options: ServerOptions) -> Scheduler:
    per_model = nbllm.get_engine().batches.parallel_for(None)[0] if options.batched else 1
    return Scheduler(options.workers, options.max_waiting, per_model)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        return _error_response(error)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        if error.status_code in (404, 405):
            message = (
                f"Invalid URL ({request.method} {request.url.path}). This server answers POST /v1/chat/completions, "
                "POST /v1/completions, GET /v1/models, GET /health, GET /admin/stats and POST /admin/clear-cache."
            )
        else:
            message = str(error.detail)
        return _error_response(ApiError(error.status_code, message, code="invalid_url"))

    async def unexpected(request: Request, error: Exception) -> Response:
        log.exception("Unexpected error serving %s %s", request.method, request.url.path)
        return _error_response(_internal_error(error))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _internal_error(error: BaseException) -> ApiError:
    return ApiError(
        500,
        f"Internal server error ({type(error).__name__}: {error}). The server log has the details.",
        type="server_error",
    )


def _add_openai_routes(app: FastAPI, options: ServerOptions, scheduler: Scheduler) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """Answer a conversation (OpenAI's chat completions)."""
        return await _answer(request, "chat", options, scheduler)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """Continue a text (OpenAI's legacy completions)."""
        return await _answer(request, "completion", options, scheduler)

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        """Every model a request can name: configured, in the models folder, or resident."""
        rows = nbllm.get_engine().registry.rows()
        return {"object": "list", "data": [_model_card(row.name, row.path, row.resident) for row in rows]}

    @app.get("/v1/models/{model_id}")
    def get_model(model_id: str) -> dict[str, Any]:
        engine = nbllm.get_engine()
        spec = _resolve_model(engine, model_id)
        resident = any(r.spec.key == spec.key for r in engine.registry.resident())
        return _model_card(spec.name, str(spec.path), resident)


def _add_monitoring_routes(app: FastAPI, options: ServerOptions, scheduler: Scheduler) -> None:
    admin = [Depends(_admin_guard(options))]

    @app.get("/")
    def index() -> dict[str, Any]:
        return {
            "name": "nbllm",
            "version": nbllm.__version__,
            "openai_base_url": "/v1",
            "endpoints": ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/admin/stats"],
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


def _model_card(name: str, path: str, resident: bool) -> dict[str, Any]:
    try:
        created = int(os.stat(path).st_mtime)
    except OSError:
        created = 0  # the default model before its first use: not assembled yet
    return {"id": name, "object": "model", "created": created, "owned_by": "nbllm", "resident": resident}


# ------------------------------------------------------------------------------ answering


async def _answer(request: Request, kind: Kind, options: ServerOptions, scheduler: Scheduler) -> Response:
    engine = nbllm.get_engine()
    parsed = openai_format.parse_request(
        kind,
        await _json_body(request),
        max_tokens_limit=options.max_tokens_limit,
        default_max_tokens=engine.settings.generation.default_max_tokens,
    )
    spec = _resolve_model(engine, parsed.model)
    stream = _open_stream(engine, parsed, batched=options.batched)
    reply = Reply(kind, spec.name, include_usage=parsed.include_usage)
    async with ClientWatch(request.receive) as client:
        generation = await scheduler.start(spec.key, stream, client)
        if generation is None:
            return _client_gone()
        # The first event decides the status code: a prompt too long for the context (or any
        # failure before the first token) must be a 4xx, not an error inside a 200 stream.
        first = await client.first_of(generation.next_event())
        if first is None:
            generation.stop()
            return _client_gone()
        if isinstance(first, Failed):
            raise _failure(first.error, parsed)
        if not parsed.stream:
            return await _whole_answer(reply, generation, first, client, parsed)
    return StreamingResponse(
        _sse(reply, generation, first, parsed),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _json_body(request: Request) -> Any:
    raw = await request.body()
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
    """The model a request names, by name only: a client must not open files by their path."""
    if name is not None and name not in engine.settings.models and _looks_like_path(name):
        raise _path_refused(name)
    try:
        spec = engine.registry.resolve(name)
    except NbllmError as error:
        raise openai_format.api_error(error) from None
    if spec.source == "path" and name not in {r.name for r in engine.registry.resident()}:
        raise _path_refused(name or "")
    return spec


def _looks_like_path(name: str) -> bool:
    return "/" in name or os.sep in name or "$" in name or name.startswith("~") or name.endswith(".gguf")


def _path_refused(name: str) -> ApiError:
    return ApiError(
        404,
        f"Model {name!r}: this server serves models by name, not by file path. Name the file in the config's "
        "models section or put it in the models folder, then ask for that name (GET /v1/models lists them).",
        param="model",
        code="model_not_found",
    )


def _open_stream(engine: Engine, parsed: ParsedRequest, *, batched: bool) -> Stream:
    try:
        request = engine.make_request(
            prompt=parsed.prompt, messages=parsed.messages, model=parsed.model, params=parsed.params
        )
        return engine.stream(request, batched=True) if batched else engine.stream(request)
    except NbllmError as error:
        raise openai_format.api_error(error, input_param=parsed.input_param) from None


def _failure(error: Exception, parsed: ParsedRequest) -> ApiError:
    if isinstance(error, NbllmError):
        return openai_format.api_error(error, input_param=parsed.input_param)
    log.error("Generation failed", exc_info=error)
    return _internal_error(error)


def _cut_short() -> ApiError:
    return ApiError(
        503,
        "The server stopped before the answer was complete. Send the request again.",
        type="server_error",
        code="server_shutting_down",
    )


def _client_gone() -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


async def _whole_answer(
    reply: Reply, generation: Generation, first: Event, client: ClientWatch, parsed: ParsedRequest
) -> Response:
    pieces: list[str] = []
    event: Event | None = first
    while isinstance(event, str):
        pieces.append(event)
        event = await client.first_of(generation.next_event())
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


async def _sse(reply: Reply, generation: Generation, first: Event, parsed: ParsedRequest) -> AsyncIterator[str]:
    """OpenAI's server-sent events. On a disconnect Starlette cancels this generator; ``finally``
    then stops the generation, so the model is free again within a token."""
    try:
        opening = reply.opening()
        if opening is not None:
            yield _sse_data(opening)
        event = first
        while isinstance(event, str):
            yield _sse_data(reply.piece(event))
            event = await generation.next_event()
        if isinstance(event, Failed):
            yield _sse_data(_failure(event.error, parsed).body())  # the OpenAI client raises on it
        elif event.stats.finish_reason == "cancelled":
            yield _sse_data(_cut_short().body())
        else:
            yield _sse_data(reply.closing(event.stats))
            if reply.include_usage:
                yield _sse_data(reply.usage_chunk(event.stats))
        yield "data: [DONE]\n\n"
    finally:
        generation.stop()


# ====================================================================================== running


class _Server(uvicorn.Server):
    """uvicorn, plus: running generations are stopped first when it shuts down, so stopping the
    server never waits for long answers to finish."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler) -> None:
        super().__init__(config)
        self.scheduler = scheduler

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.scheduler.stop_all()
        await super().shutdown(sockets)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a busy port is an error here, in the caller's thread."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as error:
        raise ConfigError(
            f"Cannot listen on {host!r}: {error}. Use an address of this machine, e.g. 127.0.0.1."
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        hint = (
            " A server started with nbllm.serve() in this process is using it: call its .stop()."
            if any(h.port == port for h in _running_servers())
            else ""
        )
        raise ConfigError(
            f"Cannot listen on {host}:{port}: {error.strerror or error}.{hint} Pick another port (--port, or port=)."
        ) from None
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


_RUNNING: dict[int, ServerHandle] = {}
_RUNNING_LOCK = threading.Lock()


def _running_servers() -> list[ServerHandle]:
    with _RUNNING_LOCK:
        return list(_RUNNING.values())


class ServerHandle:
    """A server running in a background thread of this process (``nbllm.serve()``).

    ``url`` is where it listens, ``base_url`` what an OpenAI client takes; ``stop()`` ends it
    (running generations stop within a token). Also a context manager.
    """

    def __init__(self, options: ServerOptions, *, log_requests: bool = False) -> None:
        self.options = options
        self.scheduler = _scheduler(options)
        self.app = create_app(options, scheduler=self.scheduler)
        self._socket = _bind(options.host, options.port)
        self.port: int = self._socket.getsockname()[1]
        # log_config=None: a kernel's logging is its owner's business; uvicorn would configure it.
        config = uvicorn.Config(
            self.app, log_config=None, access_log=log_requests, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS
        )
        self._server = _Server(config, self.scheduler)
        self._thread = threading.Thread(target=self._serve, name=f"nbllm-serve-{self.port}", daemon=True)
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        return _url(self.options.host, self.port)

    @property
    def base_url(self) -> str:
        """The OpenAI base URL: ``openai.OpenAI(base_url=handle.base_url, api_key=...)``."""
        return f"{self.url}/v1"

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self._server.started and not self._server.should_exit

    def start(self, timeout: float = 30.0) -> ServerHandle:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise NbllmError(f"The server at {self.url} did not start: {self._failure or 'timed out'}.")
            time.sleep(0.01)
        with _RUNNING_LOCK:
            _RUNNING[self.port] = self
        log.info("Serving at %s", self.base_url)
        return self

    def _serve(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._socket]))
        except BaseException as error:  # reported by start() or stop(); a thread has nowhere to raise
            self._failure = error
            log.error("The server at %s failed", self.url, exc_info=error)

    def stop(self, timeout: float = GRACEFUL_SHUTDOWN_SECONDS + 5) -> None:
        """Stop serving: running generations end within a token, the port is free on return."""
        self.scheduler.stop_all()
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._socket.close()
        with _RUNNING_LOCK:
            if _RUNNING.get(self.port) is self:
                del _RUNNING[self.port]

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        key = "API key required" if self.options.api_key else "loopback only, no key"
        return f"<nbllm server {self.base_url} ({state}, {self.options.workers} worker(s), {key})>"


def serve_in_background(
    host: str | None = None,
    port: int | None = None,
    *,
    api_key: str | None = None,
    workers: int | None = None,
    max_tokens_limit: int | None = None,
    max_body_bytes: int | None = None,
    max_waiting: int | None = None,
    batched: bool = True,
    log_requests: bool = False,
) -> ServerHandle:
    """Serve from this process in a background thread and return at once (``nbllm.serve()``).

    The kernel stays free: the notebook and the server's clients share the engine, its loaded
    models, its prompt cache and its stats. ``port=0`` picks a free port (see ``handle.url``).
    """
    options = server_options(
        host=host,
        port=port,
        workers=workers,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes,
        max_waiting=max_waiting,
        batched=batched,
    )
    return ServerHandle(options, log_requests=log_requests).start()


def stop_all() -> None:
    """Stop every server that ``nbllm.serve()`` started in this process (a lost handle, say)."""
    for handle in _running_servers():
        handle.stop()


def run_server(
    host: str | None = None,
    port: int | None = None,
    *,
    api_key: str | None = None,
    workers: int | None = None,
    max_tokens_limit: int | None = None,
    max_body_bytes: int | None = None,
    batched: bool = True,
    log_requests: bool = True,
) -> int:
    """Serve in the foreground until Ctrl-C or SIGTERM (``nbllm serve``); returns the exit code."""
    options = server_options(
        host=host,
        port=port,
        workers=workers,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes,
        batched=batched,
    )
    scheduler = _scheduler(options)
    app = create_app(options, scheduler=scheduler)
    sock = _bind(options.host, options.port)
    url = _url(options.host, sock.getsockname()[1])
    nbllm_log = logging.getLogger("nbllm")
    if log_requests and nbllm_log.getEffectiveLevel() > logging.INFO:
        nbllm_log.setLevel(logging.INFO)  # a server console is where the guide's log lines belong
    access = "API key required" if options.api_key else "no API key: this machine only"
    print(
        f"nbllm: serving at {url} (OpenAI base URL {url}/v1; default model {nbllm.settings().default_model}; "
        f"{options.workers} worker(s){', batched' if options.batched else ''}; {access}). Ctrl-C stops.",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app,
        access_log=log_requests,
        log_level="info" if log_requests else "warning",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = _Server(config, scheduler)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: a normal stop
        pass
    finally:
        sock.close()
    print("nbllm: server stopped", file=sys.stderr, flush=True)
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nbllm.server.app [--config FILE] [--host H] [--port P] [--api-key K] ...``"""
    from nbllm.cli.serve import add_serve_arguments, serve_arguments

    parser = argparse.ArgumentParser(prog="python -m nbllm.server.app", description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", help="config file (default: $NBLLM_CONFIG, ./nbllm.yaml, user file)")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("nbllm").addHandler(handler)
    try:
        if args.config:
            nbllm.configure(args.config)
        # run_server of this very module: ``-m`` loads it as __main__, a second import would be a copy
        return run_server(**serve_arguments(args))
    except NbllmError as error:
        print(f"nbllm: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
