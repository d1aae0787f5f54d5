"""Helpers for tests that start real servers (JupyterLab, llama-cpp-python's, nbllm's) as processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import HTTPServer
from pathlib import Path
from typing import TypeVar

import pytest


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def wait_for_server(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200; fail with the end of the server's log if it exits or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the server did not answer within {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM lets the server shut its kernels down; whatever is left of its group is killed.

    The server must have been started with ``start_new_session=True``."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    server.wait(10)


_Server = TypeVar("_Server", bound=HTTPServer)


@contextlib.contextmanager
def serving(server: _Server) -> Iterator[_Server]:
    """``server`` answering from a thread of this process until the block ends."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
