"""Snapshots of evaluated token prefixes (KV cache state), bounded in bytes, least recently used out.

llama.cpp reuses the KV cache only for the prompt it evaluated last. The common notebook case —
many questions over one long context, with other prompts in between — loses it on the first
unrelated prompt. So, just before a model's KV content would be thrown away, the backend saves
it here; a later prompt that shares a long prefix with a snapshot restores it and evaluates
only the rest.

The state itself is opaque (the backend's bytes); this module owns the policy: longest-prefix
lookup, size accounting (everything held: the state buffer and the token array), LRU eviction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Tokens = npt.NDArray[np.int32]


@dataclass(eq=False)
class Snapshot:
    tokens: Tokens
    state: Any  # backend bytes-like object, len(state) bytes
    state_bytes: int

    @property
    def nbytes(self) -> int:
        return self.state_bytes + int(self.tokens.nbytes)


def common_prefix(a: Tokens, b: Tokens) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    mismatch = np.flatnonzero(a[:n] != b[:n])
    return int(mismatch[0]) if len(mismatch) else n


class PrefixCache:
    def __init__(self, max_bytes: int, min_tokens: int = 64) -> None:
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._snapshots: OrderedDict[int, Snapshot] = OrderedDict()
        self._lock = threading.Lock()
        self.saved = 0
        self.restored = 0
        self.evicted = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._snapshots.values())

    def __len__(self) -> int:
        return len(self._snapshots)

    def best(self, tokens: Tokens) -> tuple[Snapshot | None, int]:
        """The snapshot sharing the longest prefix with ``tokens``, and that length."""
        best: Snapshot | None = None
        best_len = 0
        with self._lock:
            for snapshot in self._snapshots.values():
                length = common_prefix(snapshot.tokens, tokens)
                if length > best_len:
                    best, best_len = snapshot, length
            if best is not None:
                self._snapshots.move_to_end(id(best))
        return best, best_len

    def covers(self, tokens: Tokens) -> bool:
        """Whether a stored snapshot already holds all of ``tokens`` (saving again adds nothing)."""
        with self._lock:
            return any(
                len(s.tokens) >= len(tokens) and common_prefix(s.tokens, tokens) == len(tokens)
                for s in self._snapshots.values()
            )

    def worth_saving(self, tokens: Tokens) -> bool:
        return self.max_bytes > 0 and len(tokens) >= self.min_tokens and not self.covers(tokens)

    def add(self, snapshot: Snapshot) -> None:
        if snapshot.nbytes > self.max_bytes:
            return
        with self._lock:
            # A new snapshot that extends an older one makes the older one redundant.
            for key, old in list(self._snapshots.items()):
                if len(old.tokens) <= len(snapshot.tokens) and common_prefix(old.tokens, snapshot.tokens) == len(
                    old.tokens
                ):
                    del self._snapshots[key]
            self._snapshots[id(snapshot)] = snapshot
            self.saved += 1
            total = sum(s.nbytes for s in self._snapshots.values())
            while total > self.max_bytes and len(self._snapshots) > 1:
                _, dropped = self._snapshots.popitem(last=False)
                total -= dropped.nbytes
                self.evicted += 1

    def clear(self) -> None:
        with self._lock:
            self._snapshots.clear()

    def describe(self) -> dict[str, int]:
        with self._lock:
            return {
                "snapshots": len(self._snapshots),
                "bytes": sum(s.nbytes for s in self._snapshots.values()),
                "tokens": sum(len(s.tokens) for s in self._snapshots.values()),
                "saved": self.saved,
                "restored": self.restored,
                "evicted": self.evicted,
            }
