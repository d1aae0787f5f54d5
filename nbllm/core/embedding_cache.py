"""Embedding vectors kept on disk, so re-running a cell over 10,000 rows embeds only new rows.

One SQLite file (``vectors.sqlite`` in nbllm's cache folder, beside the prompt cache): a row per
(model file hash, pooling, normalize, text), keyed by the SHA-256 of the four, holding the
vector's float32 bytes. Not joblib, as the prompt cache is: a folder per entry costs
milliseconds, and a column of 10,000 rows would make 10,000 folders. Lookups go by the
thousand in one query.

What is read is never trusted, and nothing read can run code: a value is raw float32 bytes
(``numpy.frombuffer``, no pickle), used only when it has exactly the length the model's vectors
have and holds only finite numbers; anything else is a miss, and the row is dropped. The folder
is 0700 and the file 0600, so other users cannot write entries; a path that is not a regular
file (a link, a pipe: opening a FIFO would block) turns the cache off with a warning, and so
does a file SQLite cannot read (it is moved aside and started afresh once). Faults are misses,
never errors: the vectors are then computed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger("nbllm")

MAX_ENTRIES = 2_000_000  # ~3 GB of 384-dimension vectors; the oldest go first past this
_QUERY_CHUNK = 500  # keys per SELECT (SQLite's limit on bound parameters is 32,766 or 999)
_SCHEMA = "CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vector BLOB NOT NULL)"


def vector_key(model_sha256: str, pooling: str, normalize: bool, text: str) -> bytes:
    """The entry's key: a hash of everything the vector depends on (the model by content)."""
    digest = hashlib.sha256()
    for part in (model_sha256, pooling, "normalized" if normalize else "raw"):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.digest()


class EmbeddingCache:
    def __init__(self, folder: Path, enabled: bool = True) -> None:
        self.path = folder / "vectors.sqlite"
        self.enabled = enabled
        self.disabled_reason: str | None = None if enabled else "cache.enabled is false"
        self._lock = threading.Lock()
        self._ready = False

    def get_many(self, keys: Sequence[bytes], dimensions: int | None) -> dict[int, np.ndarray]:
        """The cached vectors among ``keys``, by position (``dimensions`` None: not known, as for
        a remote model; then any length, the same for all)."""
        found: dict[int, np.ndarray] = {}
        if not keys:
            return found
        positions: dict[bytes, list[int]] = {}
        for index, key in enumerate(keys):
            positions.setdefault(key, []).append(index)  # the same text twice: both from one row
        bad: list[bytes] = []
        with self._connection() as connection:
            if connection is None:
                return found
            unique = list(positions)
            for start in range(0, len(unique), _QUERY_CHUNK):
                part = unique[start : start + _QUERY_CHUNK]
                marks = ",".join("?" * len(part))
                rows = connection.execute(f"SELECT key, vector FROM vectors WHERE key IN ({marks})", part)
                for key, blob in rows:
                    vector = _vector(blob, dimensions)
                    if vector is None:
                        bad.append(key)
                    elif key in positions:
                        for index in positions[key]:
                            found[index] = vector
                        dimensions = len(vector)
            if bad:
                log.warning("Dropped %d damaged entries from the embedding cache %s.", len(bad), self.path)
                connection.executemany("DELETE FROM vectors WHERE key = ?", [(key,) for key in bad])
        return found

    def put_many(self, items: Sequence[tuple[bytes, np.ndarray]]) -> None:
        if not items:
            return
        rows = [(key, np.ascontiguousarray(vector, dtype="<f4").tobytes()) for key, vector in items]
        with self._connection() as connection:
            if connection is None:
                return
            connection.executemany("INSERT OR REPLACE INTO vectors (key, vector) VALUES (?, ?)", rows)
            (count,) = connection.execute("SELECT COUNT(*) FROM vectors").fetchone()
            if count > MAX_ENTRIES:
                connection.execute(
                    "DELETE FROM vectors WHERE rowid IN (SELECT rowid FROM vectors ORDER BY rowid LIMIT ?)",
                    (count - MAX_ENTRIES,),
                )

    def count(self) -> int:
        with self._connection() as connection:
            if connection is None:
                return 0
            (count,) = connection.execute("SELECT COUNT(*) FROM vectors").fetchone()
            return int(count)

    def clear(self) -> None:
        with self._connection() as connection:
            if connection is not None:
                connection.execute("DELETE FROM vectors")

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection | None]:
        """A connection in a transaction, or None while the cache is off (see the module)."""
        if not self.enabled:
            yield None
            return
        with self._lock:
            connection = self._open()
            if connection is None:
                yield None
                return
            try:
                with connection:  # commits, or rolls back on an error
                    yield connection
            except sqlite3.OperationalError as error:  # locked by another kernel past the timeout...
                log.warning("The embedding cache %s was not used this time: %s.", self.path, error)
            except sqlite3.DatabaseError as error:
                self._turn_off(f"SQLite could not use it ({error})")
            finally:
                connection.close()

    def _open(self) -> sqlite3.Connection | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(self.path.parent, 0o700)
            if not _regular_or_absent(self.path):
                self._turn_off("it is not a regular file")
                return None
            created = not self.path.exists()
            connection = sqlite3.connect(self.path, timeout=30)
            if created:
                os.chmod(self.path, 0o600)
            if not self._ready:
                try:
                    connection.execute(_SCHEMA)
                except sqlite3.OperationalError:  # locked by another process: not damaged, just busy
                    connection.close()
                    raise
                except sqlite3.DatabaseError:  # not a database (damaged, or something else): start afresh once
                    connection.close()
                    aside = self.path.with_name(f"{self.path.name}.damaged")
                    os.replace(self.path, aside)
                    log.warning("The embedding cache %s could not be read; moved it to %s.", self.path, aside)
                    connection = sqlite3.connect(self.path, timeout=30)
                    os.chmod(self.path, 0o600)
                    connection.execute(_SCHEMA)
                self._ready = True
            return connection
        except sqlite3.OperationalError as error:
            log.warning("The embedding cache %s was not used this time: %s.", self.path, error)
            return None
        except (OSError, sqlite3.Error) as error:
            self._turn_off(str(error))
            return None

    def _turn_off(self, reason: str) -> None:
        self.enabled = False
        self.disabled_reason = f"{self.path}: {reason}"
        log.warning("The embedding cache is off: %s. Vectors are computed each time.", self.disabled_reason)


def _regular_or_absent(path: Path) -> bool:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return True
    return stat.S_ISREG(mode)


def _vector(blob: object, dimensions: int | None) -> np.ndarray | None:
    if not isinstance(blob, bytes) or not blob or len(blob) % 4:
        return None
    if dimensions is not None and len(blob) != 4 * dimensions:
        return None
    vector = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return vector if np.isfinite(vector).all() else None
