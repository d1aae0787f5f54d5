"""Where nbllm keeps its files.

One environment variable, ``NBLLM_HOME``, moves everything (config, cache, models, tuning
results) under one folder: tests and sandboxes use it. Otherwise the XDG base directories are
followed, as Linux users expect.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_text_atomically(target: Path, text: str) -> None:
    """Write ``target`` whole or not at all: a temporary file beside it (named per process and
    thread, so concurrent writers never share one), then an atomic rename. Readers never see
    half a file. A failed write (OSError, typically) removes the temporary file and raises;
    callers decide what it means for them."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else Path.home() / fallback


def home() -> Path | None:
    value = os.environ.get("NBLLM_HOME")
    return Path(value).expanduser() if value else None


def config_dir() -> Path:
    root = home()
    return root if root else _xdg("XDG_CONFIG_HOME", ".config") / "nbllm"


def cache_dir() -> Path:
    root = home()
    return root / "cache" if root else _xdg("XDG_CACHE_HOME", ".cache") / "nbllm"


def data_dir() -> Path:
    root = home()
    return root if root else _xdg("XDG_DATA_HOME", ".local/share") / "nbllm"


def models_dir() -> Path:
    return data_dir() / "models"


def user_config_file() -> Path:
    return config_dir() / "config.yaml"
