"""Who may use the server, and how much they may send.

Safe by default:
- it listens on 127.0.0.1; any other address needs an API key (``options``: it refuses to start
  without one);
- with a key, every request wants ``Authorization: Bearer KEY`` (401 otherwise), whatever its
  path: the endpoints, ``/openapi.json``, and URLs that do not exist (``AccessGuard``, which
  wraps the whole app, so that no route can be added without it). The browser pages ``/docs``
  and ``/redoc`` are off then: a browser cannot send the key with the schema request they make;
- without one, admin endpoints answer loopback clients only, and requests that a web page could
  send (a foreign ``Origin``, or a ``Host`` that is not a loopback name: DNS rebinding) get a 403;
- request bodies are bounded (1 MiB: 413, ``BodyLimit``), answers too (``max_tokens`` above the
  server's limit: 400, ``openai_format``), and so is the queue of waiting requests (503,
  ``scheduler``);
- models are served by name only (config names, the models folder, resident ones): a client
  cannot make the server open a file by its path (``routes``).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from urllib.parse import urlsplit

from nbllm.server.addresses import is_literal_loopback
from nbllm.server.errors import error_response
from nbllm.server.openai_format import ApiError
from nbllm.server.options import ServerOptions, missing_server_extra

try:
    from fastapi import Request
    from starlette.requests import HTTPConnection
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as missing:  # the server's libraries are an optional extra
    raise missing_server_extra(missing) from missing


def _presented_key(request: HTTPConnection) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _check_key(request: HTTPConnection, key: str) -> None:
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


def _check_local_caller(request: HTTPConnection, options: ServerOptions) -> None:
    """Without a key the server is for this machine's programs; web pages must not reach it.

    A browser sends an ``Origin`` header with requests a page makes to another site, and a page
    that rebinds its own DNS name to 127.0.0.1 still sends its own name as ``Host``.
    """
    host = urlsplit("//" + request.headers.get("host", "")).hostname
    if request.headers.get("host") is not None and not (is_literal_loopback(host) or host == options.host):
        raise ApiError(
            403,
            f"Host {host!r} is not a loopback name. Without an API key this server answers requests to "
            "localhost / 127.0.0.1 only; start it with --api-key to serve other names.",
            type="permission_error",
            code="host_not_allowed",
        )
    origin = request.headers.get("origin")
    if origin is not None and not is_literal_loopback(urlsplit(origin).hostname):
        raise ApiError(
            403,
            f"Requests from web pages ({origin}) are refused without an API key. Start the server with --api-key "
            "and send the key from your page.",
            type="permission_error",
            code="origin_not_allowed",
        )


class AccessGuard:
    """The check every HTTP request passes before anything else runs: the API key if there is
    one, else a local caller. ASGI middleware rather than a FastAPI dependency: dependencies
    apply only to the routes declared with them, and FastAPI's own ``/docs`` and ``/openapi.json``
    (or an unknown URL's 404) were answered without the key."""

    def __init__(self, app: ASGIApp, options: ServerOptions) -> None:
        self.app = app
        self.options = options

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):  # not "lifespan": the server's own start and stop
            caller = HTTPConnection(scope)
            try:
                if self.options.api_key is not None:
                    _check_key(caller, self.options.api_key)
                else:
                    _check_local_caller(caller, self.options)
            except ApiError as refused:
                if scope["type"] == "websocket":  # none today; refused before any could accept
                    await send({"type": "websocket.close", "code": 1008})
                else:
                    await _send_error(scope, receive, send, refused)
                return
        await self.app(scope, receive, send)


def admin_guard(options: ServerOptions) -> Callable[[Request], None]:
    """The admin endpoints' extra check: without an API key, loopback clients only."""

    def guard(request: Request) -> None:
        # With a key, the app-wide guard has checked it already. Without one, admin endpoints
        # are for this machine only, even if the app is mounted behind something else.
        client = request.client.host if request.client else None
        if options.api_key is None and not is_literal_loopback(client):
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
    await error_response(error)(scope, receive, send)
