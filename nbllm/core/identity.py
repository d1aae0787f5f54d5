"""A model file's identity: its SHA-256, computed once and remembered per path, size and mtime.

The prompt cache and the provenance of every answer name a model by its content, so a
different file under the same name never returns the old file's answers. Hashing a few
hundred megabytes takes a moment, so results are kept in a small JSON index in the cache
folder and reused while the file's size and modification time are unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path
from stat import S_ISREG

from nbllm.core import paths

_lock = threading.Lock()
_memory: dict[tuple[str, int, int], str] = {}


def _index_file() -> Path:
    return paths.cache_dir() / "file-hashes.json"


def _load_index() -> dict[str, list[object]]:
    try:
        data = json.loads(_index_file().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(key: tuple[str, int, int], digest: str) -> None:
    index = _load_index()
    index[key[0]] = [key[1], key[2], digest]
    try:
        paths.write_text_atomically(_index_file(), json.dumps(index))  # readers never see half an index
    except OSError:
        pass  # a read-only cache folder only costs a re-hash next time


def _key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    if not S_ISREG(stat.st_mode):  # /dev/zero would be read forever, a FIFO would block the open
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def remember(path: Path, digest: str) -> None:
    """Record a hash known from elsewhere (e.g. a verified download) without re-reading the file."""
    key = _key(path)
    with _lock:
        _memory[key] = digest
        _save(key, digest)


def file_sha256(path: str | os.PathLike[str]) -> str:
    path = Path(path)
    key = _key(path)
    with _lock:
        if key in _memory:
            return _memory[key]
        entry = _load_index().get(key[0])
        if isinstance(entry, list) and len(entry) == 3 and entry[0] == key[1] and entry[1] == key[2]:
            _memory[key] = str(entry[2])
            return _memory[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    result = digest.hexdigest()
    with _lock:
        _memory[key] = result
        _save(key, result)
    return result
