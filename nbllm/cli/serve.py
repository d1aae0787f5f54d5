"""``nbllm serve``: the subcommand. Its arguments are the server's own (``nbllm.server.options``,
which loads no web framework); the server itself (and fastapi) loads only when it runs, so
building the ``nbllm`` parser stays fast and works without the server's extra installed."""

from __future__ import annotations

import argparse
from typing import Any

from nbllm.server.options import add_serve_arguments, serve_arguments

_DESCRIPTION = (
    "OpenAI-compatible HTTP API on this machine's models: POST /v1/chat/completions, POST /v1/completions "
    "(streaming too), GET /v1/models, GET /health, GET /admin/stats, POST /admin/clear-cache. Defaults come "
    "from the config's server section. Listens on 127.0.0.1 unless told otherwise; any other address needs "
    "an API key. Every request is bounded by tokens (--max-tokens-limit) and by time (--request-timeout)."
)


def cmd_serve(args: argparse.Namespace) -> int:
    from nbllm.server.running import run_server

    return run_server(**serve_arguments(args))


def add_serve_command(commands: Any) -> None:
    """Adds ``serve`` to the ``nbllm`` console script's subcommands."""
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server on these models", description=_DESCRIPTION)
    add_serve_arguments(serve)
    serve.set_defaults(handler=cmd_serve)
