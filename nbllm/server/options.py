"""Where and how to serve: ``ServerOptions`` from the config's ``server`` section and the command
line, checked before anything listens, and the command-line arguments that set them.

No web framework here (and no engine): the ``nbllm`` parser imports this module to build
``nbllm serve``, so it must stay fast and work without the server's extra installed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import nbllm
from nbllm.core.config import Settings
from nbllm.core.errors import ConfigError, NbllmError
from nbllm.server.addresses import is_loopback

DEFAULT_MAX_TOKENS_LIMIT = 4096  # per answer; the config's default_max_tokens (2048) fits under it
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a long prompt is a few hundred KiB
DEFAULT_MAX_WAITING = 64  # queued requests beyond this get a 503 at once instead of a long wait
MAX_REQUEST_TIMEOUT = 86400.0  # a day: the config's own bound
API_KEY_ENV = "NBLLM_API_KEY"  # keeps the key out of the command line (visible to `ps`)


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
    # Seconds one request may take in all: waiting for its model, reading its prompt, answering.
    # Then it is stopped (504, or an error event in a stream that has begun). None: no limit.
    request_timeout: float | None = 600.0
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
    request_timeout: float | None = None,
) -> ServerOptions:
    """Arguments over the config's ``server`` section; the API key also from ``$NBLLM_API_KEY``.
    ``request_timeout``: None takes the config's ``server.request_timeout``, 0 means no limit.

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
        request_timeout=section.request_timeout if request_timeout is None else (request_timeout or None),
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
    timeout = options.request_timeout
    if timeout is not None and not (0 < timeout <= MAX_REQUEST_TIMEOUT):  # NaN fails this too
        raise ConfigError(
            f"request_timeout = {timeout:g}: must be seconds above 0 and at most {MAX_REQUEST_TIMEOUT:g} "
            "(0 on the command line: no limit)."
        )
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


def missing_server_extra(missing: ImportError) -> NbllmError:
    """The error for an import of fastapi, starlette or uvicorn that failed: an optional extra."""
    return NbllmError(
        f"nbllm serve needs fastapi and uvicorn ({missing.name} is missing): pip install 'nbllm[server]'."
    )


# ====================================================================================== arguments


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's options on a parser: ``nbllm serve`` and ``python -m nbllm.server``."""
    parser.add_argument("--host", help="address to listen on (default: server.host, 127.0.0.1)")
    parser.add_argument("--port", "-p", type=int, help="TCP port (default: server.port, 8000; 0 = any free port)")
    parser.add_argument(
        "--api-key",
        help="key clients must send as 'Authorization: Bearer KEY' (default: $NBLLM_API_KEY, then server.api_key); "
        "required for any address but loopback",
    )
    parser.add_argument(
        "--workers", "-w", type=int, help="models generating at once, each on its own thread (default: server.workers)"
    )
    parser.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask for (default: 4096)")
    parser.add_argument("--max-body-bytes", type=int, help="largest request body accepted (default: 1 MiB)")
    parser.add_argument(
        "--request-timeout",
        type=float,
        metavar="SECONDS",
        help="longest a request may take in all (waiting, reading the prompt, answering); then it is stopped "
        "with a 504 (default: server.request_timeout, 600; 0 = no limit)",
    )
    parser.add_argument(
        "--no-batching",
        dest="batched",
        action="store_false",
        help="answer requests for one model one after the other instead of decoding them together "
        "(up to performance.parallel at once, the default)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no request log and no generation log lines")


def serve_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed arguments of ``add_serve_arguments`` as ``run_server``'s keyword arguments."""
    return {
        "host": args.host,
        "port": args.port,
        "api_key": args.api_key,
        "workers": args.workers,
        "max_tokens_limit": args.max_tokens_limit,
        "max_body_bytes": args.max_body_bytes,
        "batched": args.batched,
        "log_requests": not args.quiet,
        # Only when given: None takes the config's value either way.
        **({"request_timeout": args.request_timeout} if args.request_timeout is not None else {}),
    }
