"""Where nbllm keeps its files.

One environment variable, ``NBLLM_HOME``, moves everything (config, cache, models, tuning
results) under one folder: tests and sandboxes use it. Otherwise the XDG base directories are
followed, as Linux users expect.
"""

from __future__ import annotations

import os
from pathlib import Path


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
