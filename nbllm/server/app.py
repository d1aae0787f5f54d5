"""The ASGI app: ``create_app`` wires the access checks, the body limit, the error handlers and
the routes around one ``Scheduler``.

Several users: ``server.workers`` requests generate at once, each on a worker thread of this
process (not processes: each would load its own copy of every model). Requests for one model
wait for it in the order they came, without taking a worker; requests for different resident
models run side by side. With ``batched``, requests for one model decode together instead
(``Engine.stream(batched=True)``, up to ``performance.parallel``). A client that hangs up stops
its generation within a token.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import nbllm
from nbllm._version import __version__
from nbllm.server.errors import add_error_handlers
from nbllm.server.options import ServerOptions, missing_server_extra, server_options
from nbllm.server.routes import add_monitoring_routes, add_openai_routes
from nbllm.server.scheduler import Scheduler
from nbllm.server.security import AccessGuard, BodyLimit

try:
    from fastapi import FastAPI
except ImportError as missing:  # the server's libraries are an optional extra
    raise missing_server_extra(missing) from missing


def create_app(options: ServerOptions | None = None, *, scheduler: Scheduler | None = None) -> FastAPI:
    """The ASGI app. Run it with ``run_server`` / ``ServerHandle``, which bind the address that
    ``options`` checked (uvicorn's own ``--host`` would bypass the API-key rule, and its
    ``--workers`` would load a copy of every model per process)."""
    options = options if options is not None else server_options()
    scheduler = scheduler if scheduler is not None else make_scheduler(options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.shutdown()

    keyed = options.api_key is not None
    app = FastAPI(
        title="nbllm",
        version=__version__,
        summary="OpenAI-compatible API on the local GGUF models of nbllm's engine.",
        lifespan=lifespan,
        # With a key, the browser pages are off: the page fetches /openapi.json without the key
        # (a browser cannot add it), so it could only show an error. /openapi.json itself stays,
        # behind the key like everything else.
        docs_url=None if keyed else "/docs",
        redoc_url=None if keyed else "/redoc",
    )
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    app.add_middleware(AccessGuard, options=options)  # added last: runs first, before any body is read
    add_error_handlers(app)
    add_openai_routes(app, options, scheduler)
    add_monitoring_routes(app, options, scheduler)
    return app


def make_scheduler(options: ServerOptions) -> Scheduler:
    """The scheduler for ``options``: its workers, its queue, and how many requests for one model
    decode together (the engine's ``performance.parallel`` when batched, else one)."""
    per_model = nbllm.get_engine().parallel() if options.batched else 1
    return Scheduler(options.workers, options.max_waiting, per_model)
