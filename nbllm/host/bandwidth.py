"""This machine's memory read bandwidth: the physical limit of CPU generation speed.

Producing one token reads (nearly) every weight once, so generation on a CPU cannot beat
``bandwidth / bytes read per token``. Measured once per machine (about a second) and cached.
The measurement reads a buffer much larger than the caches with as many threads as there are
cores, the way llama.cpp's threads read the weights.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nbllm.core import paths
from nbllm.host import machine

BUFFER_BYTES = 512 * 2**20
ROUNDS = 5
_lock = threading.Lock()


def _cache_file() -> Path:
    return paths.cache_dir() / "bandwidth.json"


def _read(chunk: Any) -> float:
    # A dot product of a vector with itself: vectorized, one read per element, releases the GIL.
    # (numpy's sum and max are compute-bound on wide-SIMD CPUs and under-read by 20-40 %.)
    return float(chunk.dot(chunk))


def measure_read_bandwidth(threads: int | None = None, buffer_bytes: int = BUFFER_BYTES) -> float:
    """Bytes per second read from RAM, best of a few rounds."""
    import numpy as np

    threads = threads or machine.default_threads()
    data = np.ones(buffer_bytes // 4, dtype=np.float32)  # written once: really in RAM
    chunks = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(ROUNDS):
            start = time.perf_counter()
            list(pool.map(_read, chunks))
            best = max(best, data.nbytes / (time.perf_counter() - start))
    return best


def read_bandwidth(refresh: bool = False) -> float:
    """This machine's bandwidth: the best measurement so far (measured now if there is none,
    or again with ``refresh``). Other programs' load can only make a measurement low, so the
    highest one seen is the truest; benchmarks refresh it on every run."""
    key = machine.machine_id()
    with _lock:
        cache: dict[str, float] = {}
        try:
            loaded = json.loads(_cache_file().read_text(encoding="utf-8"))
            cache = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            pass
        known = cache.get(key)
        known = float(known) if isinstance(known, (int, float)) and not isinstance(known, bool) else None
        if not refresh and known is not None:
            return known
        value = max(measure_read_bandwidth(), known or 0.0)  # a damaged entry is measured again
        cache[key] = value
        try:
            paths.write_text_atomically(_cache_file(), json.dumps(cache))
        except OSError:
            pass  # measured again next time
        return value


def bytes_per_token(weight_bytes: int, embedding_bytes: int = 0) -> int:
    """Bytes a CPU reads to generate one token: every weight, but only one row of the input
    embedding (a lookup, not a matrix product) — unless the output layer reuses it (tied)."""
    return max(weight_bytes - embedding_bytes, 1)
