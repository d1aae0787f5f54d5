"""Running the server: it binds its port first (a busy port is an error in the caller's thread),
then uvicorn serves the app on that socket.

    nbllm serve                                 # run_server: the foreground, until Ctrl-C
    python -m nbllm.server                      # the same (main)
    handle = nbllm.serve(port=8001)             # serve_in_background: a ServerHandle, in a thread

Stopping stops running generations first, so it never waits for long answers to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import threading
import time
from collections.abc import Sequence

import nbllm
from nbllm.core.errors import ConfigError, NbllmError
from nbllm.server.app import create_app, make_scheduler
from nbllm.server.options import (
    ServerOptions,
    add_serve_arguments,
    missing_server_extra,
    serve_arguments,
    server_options,
)
from nbllm.server.scheduler import Scheduler

try:
    import uvicorn
except ImportError as missing:  # the server's libraries are an optional extra
    raise missing_server_extra(missing) from missing

log = logging.getLogger("nbllm.server")

GRACEFUL_SHUTDOWN_SECONDS = 5
_DESCRIPTION = "``nbllm serve``: the guide's local server, OpenAI-compatible, on the process-wide engine."


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
        self.scheduler = make_scheduler(options)
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
    request_timeout: float | None = None,
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
        request_timeout=request_timeout,
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
    request_timeout: float | None = None,
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
        request_timeout=request_timeout,
    )
    scheduler = make_scheduler(options)
    app = create_app(options, scheduler=scheduler)
    sock = _bind(options.host, options.port)
    url = _url(options.host, sock.getsockname()[1])
    nbllm_log = logging.getLogger("nbllm")
    if log_requests and nbllm_log.getEffectiveLevel() > logging.INFO:
        nbllm_log.setLevel(logging.INFO)  # a server console is where the guide's log lines belong
    access = "API key required" if options.api_key else "no API key: this machine only"
    limit = f"requests stop after {options.request_timeout:g} s" if options.request_timeout else "no time limit"
    print(
        f"nbllm: serving at {url} (OpenAI base URL {url}/v1; default model {nbllm.settings().default_model}; "
        f"{options.workers} worker(s){', batched' if options.batched else ''}; {limit}; {access}). Ctrl-C stops.",
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
    """``python -m nbllm.server [--config FILE] [--host H] [--port P] [--api-key K] ...``"""
    parser = argparse.ArgumentParser(prog="python -m nbllm.server", description=_DESCRIPTION)
    parser.add_argument("--config", "-c", help="config file (default: $NBLLM_CONFIG, ./nbllm.yaml, user file)")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("nbllm").addHandler(handler)
    try:
        if args.config:
            nbllm.configure(args.config)
        return run_server(**serve_arguments(args))
    except NbllmError as error:
        print(f"nbllm: error: {error}", file=sys.stderr)
        return 1
