"""What runs a model: the contract (``base.py``) and its implementations.

``backend_for`` below is the only place in nbllm that names a concrete backend, and this
package is the only one that imports ``llama_cpp`` (import-linter enforces both; see
pyproject.toml). Backends are created on first use: ``import nbllm`` never loads llama.cpp.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version

from nbllm.backends.base import Backend, ModelSpec


def backend_for(spec: ModelSpec | None = None) -> Backend:
    """The backend that runs ``spec`` (None: the in-process one, for tuning and build facts)."""
    return _backend("remote" if spec is not None and not spec.is_local else "llama.cpp")


@functools.cache
def _backend(kind: str) -> Backend:
    # One instance per kind for the life of the process: the local one asks llama.cpp for its
    # build once and checks this CPU can run it.
    if kind == "remote":
        from nbllm.backends.remote import RemoteBackend

        return RemoteBackend()
    from nbllm.backends.llama_cpp import LlamaCppBackend

    return LlamaCppBackend()


def answer_identity(spec: ModelSpec) -> str:
    """What, besides the model, decides an answer to a prompt: part of the prompt-cache key.

    Read from package metadata, not from the backend: a cache hit must not load llama.cpp."""
    if not spec.is_local:
        return "remote"
    return _llama_cpp_python_version()


@functools.cache
def _llama_cpp_python_version() -> str:
    try:
        return f"llama-cpp-python {version('llama-cpp-python')}"
    except PackageNotFoundError:
        return "unknown"
