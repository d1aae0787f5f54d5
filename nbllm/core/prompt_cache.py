"""The prompt cache: finished answers memoized on disk with ``joblib.Memory``.

An identical request — same model *file* (by content hash), same prompt or messages, same
parameters including the seed, same context size, same backend version, same cache format —
returns the stored answer without touching the model. Only answers that ended normally are
stored: interrupted, stopped or failed generations never are.

Storage is joblib's: one folder per entry, written to a temporary name and renamed into place,
so two kernels sharing the folder never see half an entry. joblib drops least recently
*accessed* entries first when the cache is trimmed; most Linux filesystems update access times
lazily (relatime), so a hit touches its entry explicitly to keep the order truly LRU.

Faults turn into misses, never crashes: a damaged entry is logged once and removed; a folder
that cannot be written turns the cache off with one warning.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("nbllm")

CACHE_FORMAT = 1
_FUNC_NAME = "_cached_answer"


class _Miss(Exception):
    """Raised instead of computing: the cache is only ever filled by ``PromptCache.put``."""


def _cached_answer(key: Mapping[str, Any], _answer: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    # joblib memoizes this function on ``key`` alone (``_answer`` is ignored for hashing).
    if _answer is None:
        raise _Miss
    return _answer


class _QuietDamagedEntries(logging.Filter):
    """joblib logs a traceback per damaged entry; we log one line of our own instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _FUNC_NAME not in record.getMessage()


logging.getLogger("joblib").addFilter(_QuietDamagedEntries())


class PromptCache:
    def __init__(self, directory: Path, max_entries: int) -> None:
        self.directory = directory
        self.max_entries = max_entries
        self.disabled_reason: str | None = None
        self._func: Any = None
        self._memory: Any = None
        self._lock = threading.Lock()
        self._damaged_logged = False

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.disabled_reason is None

    def _disable(self, why: str) -> None:
        if self.disabled_reason is None:
            self.disabled_reason = why
            log.warning("Prompt cache turned off: %s. Generation works as before, without it.", why)

    def _open(self) -> Any:
        if self._func is not None:
            return self._func
        with self._lock:
            if self._func is None:
                import joblib

                try:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    probe = self.directory / f".write-test-{os.getpid()}-{threading.get_ident()}"
                    probe.write_bytes(b"ok")
                    probe.unlink()
                except OSError as error:
                    self._disable(f"cannot write to {self.directory} ({error.strerror or error})")
                    return None
                self._memory = joblib.Memory(location=str(self.directory), verbose=0)
                self._func = self._memory.cache(_cached_answer, ignore=["_answer"])
        return self._func

    def get(self, key: Mapping[str, Any]) -> Mapping[str, Any] | None:
        if not self.enabled:
            return None
        func = self._open()
        if func is None:
            return None
        try:
            # A reference to the stored entry, loaded only by .get(); absent -> _Miss.
            ref = func.call_and_shelve(key)
        except _Miss:
            return None
        except Exception as error:  # a damaged store must never break generation
            self._log_damaged(error)
            return None
        try:
            answer = ref.get()
            if not isinstance(answer, Mapping) or "pieces" not in answer:
                raise ValueError("unexpected content")
        except Exception as error:
            # Damaged, half-written by a crashed writer, or trimmed by another process.
            self._log_damaged(error)
            ref.clear()
            return None
        self._touch(Path(ref.store_backend.location) / ref.func_id / ref.args_id / "output.pkl")
        return answer

    def put(self, key: Mapping[str, Any], answer: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        func = self._open()
        if func is None:
            return
        try:
            func.call(key, _answer=dict(answer))
            self._memory.reduce_size(items_limit=self.max_entries)
        except OSError as error:
            self._disable(f"cannot write to {self.directory} ({error.strerror or error})")

    def clear(self) -> None:
        func = self._open()
        if func is not None:
            try:
                func.clear(warn=False)
            except OSError as error:
                log.warning("Could not clear the prompt cache in %s: %s", self.directory, error)

    def _entries_root(self) -> Path | None:
        func = self._open()
        if func is None:
            return None
        return Path(func.store_backend.location) / Path(*func.func_id.split("/"))

    def entries(self) -> list[Path]:
        root = self._entries_root()
        if root is None or not root.is_dir():
            return []
        return [p for p in root.iterdir() if p.is_dir() and (p / "output.pkl").exists()]

    def disk_bytes(self) -> int:
        root = self._entries_root()
        if root is None or not root.is_dir():
            return 0
        total = 0
        for folder, _dirs, files in os.walk(root):
            for name in files:
                try:
                    total += os.path.getsize(os.path.join(folder, name))
                except OSError:
                    pass
        return total

    @staticmethod
    def _touch(output: Path) -> None:
        try:
            os.utime(output, (time.time(), output.stat().st_mtime))
        except OSError:
            pass

    def _log_damaged(self, error: BaseException) -> None:
        if not self._damaged_logged:
            self._damaged_logged = True
            log.warning("A damaged prompt-cache entry in %s was treated as a miss (%s).", self.directory, error)
