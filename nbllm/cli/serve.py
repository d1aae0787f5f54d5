"""``nbllm serve``: its arguments and handler. The server (and fastapi) load only when it runs,
so building the ``nbllm`` parser stays fast and works without the server's extra installed."""

from __future__ import annotations

import argparse
from typing import Any

_DESCRIPTION = (
    "OpenAI-compatible HTTP API on this machine's models: POST /v1/chat/completions, POST /v1/completions "
    "(streaming too), GET /v1/models, GET /health, GET /admin/stats, POST /admin/clear-cache. Defaults come "
    "from the config's server section. Listens on 127.0.0.1 unless told otherwise; any other address needs "
    "an API key."
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
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
        "--no-batching",
        dest="batched",
        action="store_false",
        help="answer requests for one model one after the other instead of decoding them together "
        "(up to performance.parallel at once, the default)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no request log and no generation log lines")


def serve_arguments(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "host": args.host,
        "port": args.port,
        "api_key": args.api_key,
        "workers": args.workers,
        "max_tokens_limit": args.max_tokens_limit,
        "max_body_bytes": args.max_body_bytes,
        "batched": args.batched,
        "log_requests": not args.quiet,
    }


def cmd_serve(args: argparse.Namespace) -> int:
    from nbllm.server.app import run_server

    return run_server(**serve_arguments(args))


def add_serve_command(commands: Any) -> None:
    """Adds ``serve`` to the ``nbllm`` console script's subcommands."""
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server on these models", description=_DESCRIPTION)
    add_serve_arguments(serve)
    serve.set_defaults(handler=cmd_serve)
