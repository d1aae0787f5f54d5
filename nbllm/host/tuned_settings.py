"""The settings ``nbllm.tune()`` measured as fastest, per machine and model file (``tuning.json``).

Kept apart from the tuner: the engine reads them at every load and ``recommend`` and ``doctor``
report them, none of which should depend on the code that measures.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nbllm.core import paths
from nbllm.host import machine

log = logging.getLogger("nbllm")
_lock = threading.Lock()


def _store_file() -> Path:
    return paths.data_dir() / "tuning.json"


def _load_store() -> dict[str, Any]:
    try:
        data = json.loads(_store_file().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save(machine_key: str, model_sha256: str, entry: Mapping[str, Any]) -> None:
    """Remember ``entry`` for this model file on ``machine_key``; a failure to write is a warning."""
    with _lock:
        store = _load_store()
        store.setdefault(machine_key, {})[model_sha256] = dict(entry)
        target = _store_file()
        try:
            paths.write_text_atomically(target, json.dumps(store, indent=1))
        except OSError as error:
            log.warning("Could not save tuning results to %s: %s", target, error)


def saved_settings(model_sha256: str) -> dict[str, Any] | None:
    """The tuned settings for this model file on this machine, if it was ever tuned here."""
    entry = _load_store().get(machine.machine_id(), {}).get(model_sha256)
    return entry if isinstance(entry, dict) else None


def iter_saved() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(machine, model sha256, settings) for every saved result: for ``nbllm doctor``."""
    for machine_key, models in _load_store().items():
        if isinstance(models, dict):
            for sha, entry in models.items():
                if isinstance(entry, dict):
                    yield machine_key, sha, entry
