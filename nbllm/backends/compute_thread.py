"""Where llama.cpp's CPU work runs: each request on a thread of its own that ends with it.

Why not one long-lived thread per model (nbllm until 0.5): llama.cpp is built with OpenMP, and
libgomp keeps a team of worker threads for every thread that has started a parallel region,
for as long as that thread lives. A team is idle between requests, but it still counts: once
libgomp manages more threads than there are CPUs, it spins at most 100 times (instead of
300,000) at each barrier before sleeping in the kernel, and a token goes through hundreds of
barriers. With two resident models, each with its own long-lived thread, the default model
decoded at 0.62-0.85x of its speed alone although the other model did nothing
(benchmarks/resident_models_bench.py). When a thread ends, libgomp frees its team, so a thread
per request leaves no team behind; starting one costs tens of microseconds per request.

One thread for the whole request, not one per call: a request's decodes then share one team
(switching teams mid-request would pay for a new team each token), and the model's state is
touched by one thread at a time, which llama.cpp requires.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


class ComputeThreads:
    """Starts each job on a new thread; remembers the last job so ``close`` can wait for it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._last: Future[object] | None = None
        self._lock = threading.Lock()

    def submit(self, function: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()

        def body() -> None:
            try:
                future.set_result(function())
            except BaseException as error:  # delivered to whoever waits on the future
                future.set_exception(error)

        # The model's lock already keeps requests apart; waiting here as well means two threads
        # can never drive one llama.cpp context at once, whatever a caller does.
        self.wait_idle()
        with self._lock:
            self._last = future  # type: ignore[assignment]  # Future is invariant; only result() is used
        threading.Thread(target=body, name=self._name, daemon=True).start()
        return future

    def wait_idle(self) -> None:
        """Block until the last job has finished (its outcome is its submitter's business)."""
        with self._lock:
            last = self._last
        if last is not None:
            try:
                last.result()
            except BaseException:  # already delivered to the submitter
                pass
