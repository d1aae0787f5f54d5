"""How failures reach a client: always as OpenAI's ``{"error": {...}}`` JSON, never as a web
framework's own page. An ``ApiError`` becomes its response, Starlette's 404 and 405 name the
endpoints this server has, and an unexpected exception is a 500 that names only its type: its
text may hold local paths or a prompt, and belongs in the server's log (with the traceback).
"""

from __future__ import annotations

import logging

from nbllm.server.openai_format import ApiError
from nbllm.server.options import missing_server_extra

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as missing:  # the server's libraries are an optional extra
    raise missing_server_extra(missing) from missing

log = logging.getLogger("nbllm.server")
log.addHandler(logging.NullHandler())


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def internal_error(error: BaseException) -> ApiError:
    return ApiError(
        500,
        f"Internal server error ({type(error).__name__}). The server log has the details.",
        type="server_error",
    )


def add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        return error_response(error)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        if error.status_code in (404, 405):
            path = request.url.path if len(request.url.path) <= 200 else request.url.path[:200] + "..."
            message = (
                f"Invalid URL ({request.method} {path}). This server answers POST /v1/chat/completions, "
                "POST /v1/completions, GET /v1/models, GET /health, GET /admin/stats and POST /admin/clear-cache."
            )
        else:
            message = str(error.detail)
        return error_response(ApiError(error.status_code, message, code="invalid_url"))

    async def unexpected(request: Request, error: Exception) -> Response:
        log.exception("Unexpected error serving %s %s", request.method, request.url.path)
        return error_response(internal_error(error))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
