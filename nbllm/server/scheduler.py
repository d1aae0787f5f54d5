"""Who runs when, for the server: a queue per model, a bounded set of worker threads, a watch on
clients that hang up, and each request's deadline (``server.request_timeout``).

No web framework here: the server (``nbllm.server.routes``) hands over the ASGI ``receive`` callable
and gets ``Generation`` objects back, whose events it turns into HTTP responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from nbllm.core.metrics import RequestStats
from nbllm.engine import Stream
from nbllm.server.openai_format import ApiError
from nbllm.server.options import DEFAULT_MAX_WAITING

T = TypeVar("T")
Receive: TypeAlias = Callable[[], Awaitable[MutableMapping[str, Any]]]  # ASGI's receive


@dataclass(frozen=True)
class Finished:
    stats: RequestStats


@dataclass(frozen=True)
class Failed:
    error: Exception


Event: TypeAlias = "str | Finished | Failed"


class TimedOut(Exception):
    """A request's deadline passed while it waited (for a model, a worker, a token, its body)."""


@dataclass(frozen=True)
class Deadline:
    """When a request must be over (``time.monotonic()`` seconds); ``at`` None: never."""

    at: float | None = None

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(None if seconds is None else time.monotonic() + seconds)

    def remaining(self) -> float | None:
        """Seconds left (0 once passed), or None without a deadline."""
        return None if self.at is None else max(self.at - time.monotonic(), 0.0)


async def before(deadline: Deadline, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, or ``TimedOut`` (and ``awaitable`` cancelled) once ``deadline`` passes."""
    try:
        return await asyncio.wait_for(awaitable, deadline.remaining())
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        raise TimedOut from None


class Generation:
    """One engine stream, pulled to its end on a worker thread, its events handed to the loop.

    The thread never waits for the client: a slow reader costs memory (at most max_tokens
    pieces), never the model's time. The whole stream runs on that one thread, as the engine
    expects of a stream (its lock owner is the thread that iterates it).
    """

    def __init__(self, stream: Stream, loop: asyncio.AbstractEventLoop) -> None:
        self.stream = stream
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._held: Event | None = None

    def run(self) -> None:
        try:
            with self.stream:
                for piece in self.stream:
                    self._post(piece)
        except Exception as error:
            self._post(Failed(error))
            return
        assert self.stream.stats is not None, "a stream that ended has its stats"
        self._post(Finished(self.stream.stats))

    def _post(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
            self.stream.stop()

    def stop(self) -> None:
        """End the generation after the current token (from any thread)."""
        self.stream.stop()

    async def next_event(self) -> Event:
        """The next event; pieces that are already waiting come joined (a lagging client gets
        fewer, larger chunks instead of falling further behind)."""
        event = self._held if self._held is not None else await self._events.get()
        self._held = None
        if not isinstance(event, str):
            return event
        text = [event]
        while not self._events.empty():
            following = self._events.get_nowait()
            if not isinstance(following, str):
                self._held = following
                break
            text.append(following)
        return "".join(text)


class ClientWatch:
    """Notices a client that hangs up before its response starts: while its request waits for a
    model or a worker, while the model reads its prompt, or while a whole (non-streamed) answer
    is generated. Once a stream has started, Starlette's StreamingResponse watches the connection
    and cancels the stream. Also keeps the request's ``deadline``: ``first_of`` raises
    ``TimedOut`` once it has passed."""

    def __init__(self, receive: Receive, deadline: Deadline | None = None) -> None:
        self._receive = receive
        self.deadline = deadline if deadline is not None else Deadline()
        self.gone = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ClientWatch:
        self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        # The body has been read: the only message left to come is the disconnect.
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone.set()

    async def first_of(self, awaitable: Awaitable[T]) -> T | None:
        """``awaitable``'s result, or None if the client left first, or ``TimedOut`` if the
        deadline passed first (either way ``awaitable`` is cancelled)."""
        work = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait({work, gone}, timeout=self.deadline.remaining(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()  # asyncio's locks give back what a cancelled acquire was granted
        if work.done() and not work.cancelled():
            return work.result()
        if self.gone.is_set():
            return None
        raise TimedOut


class Scheduler:
    """When a request runs: at most ``workers`` generations at once, and the requests for one
    model in the order they came, ``per_model`` at a time (1: one after the other; with batched
    streams, up to the batch size, which then decode together).

    Why queue here and not only on the engine's per-model lock: a request waiting on that lock
    would hold a worker idle while requests for other models queue behind it, and a plain lock
    serves its waiters in no particular order. Here a worker is taken only by a request that can
    run now, so requests for different resident models run side by side.
    """

    def __init__(self, workers: int, max_waiting: int = DEFAULT_MAX_WAITING, per_model: int = 1) -> None:
        self.workers = workers
        self.max_waiting = max_waiting
        self.per_model = per_model
        self.waiting = 0
        self.served = 0
        self.closing = False
        # With batched streams a worker thread only relays one stream's pieces (the one batch
        # loop per model does the computing), so each worker may carry a whole batch.
        threads = workers * per_model
        self._slots = asyncio.Semaphore(threads)
        self._models: dict[str, asyncio.Semaphore] = {}  # FIFO, like a lock when per_model is 1
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="nbllm-serve")
        self._running: set[Generation] = set()
        self._running_lock = threading.Lock()  # stop_all() reads _running from other threads

    async def start(self, model_key: str, stream: Stream, client: ClientWatch) -> Generation | None:
        """Queue ``stream``, then run it on a worker; None (and nothing run) if the client left first."""
        if self.closing or self.waiting >= self.max_waiting:
            stream.close()
            raise self.busy()
        model_gate = self._models.setdefault(model_key, asyncio.Semaphore(self.per_model))
        held: list[asyncio.Semaphore] = []
        self.waiting += 1
        try:
            for gate in (model_gate, self._slots):  # the model first: a worker only when it can run
                if await client.first_of(gate.acquire()) is None:
                    break
                held.append(gate)
        except BaseException:
            for gate in held:
                gate.release()
            stream.close()
            raise
        finally:
            self.waiting -= 1
        if len(held) < 2 or self.closing:
            for gate in held:
                gate.release()
            stream.close()  # never started: nothing generated, nothing counted
            if self.closing:
                raise self.busy()
            return None
        loop = asyncio.get_running_loop()
        generation = Generation(stream, loop)
        with self._running_lock:
            self._running.add(generation)
        done = loop.run_in_executor(self._pool, generation.run)
        done.add_done_callback(lambda _: self._finished(generation, model_gate))
        return generation

    def busy(self) -> ApiError:
        if self.closing:
            message = "The server is shutting down. Send the request again once it is back."
        else:
            message = (
                f"The server has {self.waiting} requests waiting already. Retry in a few seconds, or start "
                "it with more workers (server.workers) or a longer queue (max_waiting)."
            )
        return ApiError(503, message, type="server_error", code="server_busy", headers={"Retry-After": "1"})

    def _finished(self, generation: Generation, model_gate: asyncio.Semaphore) -> None:
        # Released when the thread has really finished, whether or not anyone still listens.
        with self._running_lock:
            self._running.discard(generation)
        self.served += 1
        self._slots.release()
        model_gate.release()

    def stop_all(self) -> None:
        """Refuse new requests and end running generations within a token (safe from any thread)."""
        self.closing = True
        with self._running_lock:
            running = list(self._running)
        for generation in running:
            generation.stop()

    def shutdown(self) -> None:
        self.stop_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict[str, Any]:
        with self._running_lock:
            running = len(self._running)
        return {"workers": self.workers, "running": running, "waiting": self.waiting, "served": self.served}
