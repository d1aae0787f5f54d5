"""Where nbllm keeps its files.

One environment variable, ``NBLLM_HOME``, moves everything (config, cache, models, tuning
results) under one folder: tests and sandboxes use it. Otherwise the XDG base directories are
followed, as Linux users expect.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path


def write_text_atomically(target: Path, text: str, *, mode: int | None = None) -> None:
    """Write ``target`` whole or not at all: a temporary file beside it (named per process and
    thread, so concurrent writers never share one), then an atomic rename. Readers never see
    half a file. A failed write (OSError, typically) removes the temporary file and raises;
    callers decide what it means for them. ``mode`` (0o600 for private files): the file has
    exactly these permissions from its creation on, whatever the umask."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        if mode is None:
            tmp.write_text(text, encoding="utf-8")
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
            with open(os.open(tmp, flags, mode), "w", encoding="utf-8") as file:
                os.chmod(file.fileno(), mode)  # a temporary file left by a crash had other permissions
                file.write(text)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_bytes_limited(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path``, or ``ValueError`` saying why not: not a regular
    file (a FIFO would block the reader forever, a device never ends), or over ``limit`` bytes.

    O_NONBLOCK: should a FIFO have been put where the file was, ``open()`` still returns, and
    ``fstat`` then refuses it. The read is bounded even if the file grows meanwhile."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    with open(os.open(path, flags), "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit:,} bytes")
    return data


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


def history_file() -> Path:
    """The history log (core/history.py): user data, kept with the models, not in the cache."""
    return data_dir() / "history.db"
