"""Waiting for another thread in a way that Ctrl-C can interrupt."""

from __future__ import annotations

import queue
from typing import TypeVar

T = TypeVar("T")

# How often a waiting main thread wakes up to notice a pending Ctrl-C.
SIGNAL_CHECK_SECONDS = 0.1


def next_item(source: queue.SimpleQueue[T]) -> T:
    """``source.get()``, waking up every ``SIGNAL_CHECK_SECONDS`` so that Ctrl-C is noticed.

    Python handles a signal in the main thread, and only when that thread runs Python code. The
    kernel may deliver SIGINT (Ctrl-C, Jupyter's interrupt) to any thread of the process, such
    as one of llama.cpp's OpenMP workers; a main thread blocked in an untimed ``get`` then
    sleeps through it until the next item arrives, which during a long prompt is seconds later.
    """
    while True:
        try:
            return source.get(timeout=SIGNAL_CHECK_SECONDS)
        except queue.Empty:
            continue
