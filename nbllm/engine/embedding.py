"""``nbllm.embed``: texts to vectors, on the one engine (the registry, the caches, the stats).

An embedding request is a kind of request of its own: it answers with vectors, not text, so it
does not go through the answer pipeline's steps, but through the same parts — the model checked
out from the registry (loaded in embedding mode, evicted like any model), a disk cache keyed by
the model file's content hash, the stats. What a model can do is read from its GGUF metadata
before any work: a model that declares no pooling generates text and cannot embed, and an
embedding model cannot chat (Engine.make_request).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from nbllm.backends.base import ModelSpec
from nbllm.core import identity
from nbllm.core.embedding_cache import vector_key
from nbllm.core.errors import GenerationError, ParameterError
from nbllm.core.gguf_file import read_gguf
from nbllm.core.progress import progress_bar

if TYPE_CHECKING:
    from nbllm.engine.engine import Engine

MAX_TEXTS = 1_000_000


class Embeddings(np.ndarray):
    """A float32 array of vectors (one row per text; one vector for a single text) that also
    says how it was made: ``model``, ``truncated`` (positions of texts cut to fit), ``cached``
    (texts answered from the cache) and ``tokens`` (tokens read for the others)."""

    model: str = ""
    truncated: tuple[int, ...] = ()
    cached: int = 0
    tokens: int = 0

    def __array_finalize__(self, source: Any) -> None:
        for name in ("model", "truncated", "cached", "tokens"):
            setattr(self, name, getattr(source, name, getattr(Embeddings, name)))


class _Owner:
    """Holds the model's lock for one embed call (the registry's LockOwner)."""

    def __init__(self, cancel: threading.Event | None = None) -> None:
        self.thread_id = threading.get_ident()
        self.cancel = cancel or threading.Event()

    def is_suspended(self) -> bool:
        return False

    def abandon(self) -> None:
        self.cancel.set()


def check_texts(texts: Any) -> list[str]:
    """The texts as a list, or a ``ParameterError`` naming the first that is not usable."""
    if isinstance(texts, str):
        items: list[Any] = [texts]
    elif isinstance(texts, Mapping) or not hasattr(texts, "__iter__") or isinstance(texts, bytes):
        raise ParameterError(
            f"texts must be a string, or a list (or pandas Series) of strings, not {type(texts).__name__}."
        )
    else:
        items = list(texts.values if hasattr(texts, "index") and hasattr(texts, "values") else texts)
    if not items:
        raise ParameterError("There are no texts: give at least one string to embed (or to search).")
    if len(items) > MAX_TEXTS:
        raise ParameterError(f"{len(items):,} texts: embed at most {MAX_TEXTS:,} at once (split the list).")
    for index, text in enumerate(items):
        if not isinstance(text, str):
            missing = text is None or (isinstance(text, float) and math.isnan(text))
            hint = " (missing values: drop them first, e.g. series.dropna())" if missing else ""
            raise ParameterError(f"Text {index} is {type(text).__name__} {text!r:.40}, not a string{hint}.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ParameterError(
                f"Text {index} holds a lone surrogate (not valid Unicode text): clean it first."
            ) from None
        if not text.strip():
            raise ParameterError(
                f"Text {index} is empty: an empty text has no meaning to embed. Leave it out "
                "(e.g. series[series.str.strip() != ''])."
            )
    return items


def pooling_of(spec: ModelSpec) -> str:
    """The model's pooling, or a ``ParameterError`` saying it generates text and cannot embed."""
    if not spec.is_local:
        return "remote"  # the server knows; one that cannot embed answers so (RemoteModel.embed)
    info = read_gguf(spec.path)
    if info.pooling is None:
        raise ParameterError(
            f"{spec.name} is a text-generation model ({info.architecture}, no pooling in its metadata): it cannot "
            "embed. Use an embedding model: the default (nbllm.embed(texts) without model=), or one from "
            "nbllm.catalog() such as bge-small-en-v1.5."
        )
    return info.pooling


def embedding_dimensions(spec: ModelSpec) -> int | None:
    """How many numbers a model's vectors have (from its metadata; None for a remote model).
    ``ParameterError`` for a model that cannot embed."""
    pooling_of(spec)
    return int(read_gguf(spec.path).arch_get("embedding_length", 0) or 0) or None if spec.is_local else None


def model_identity(spec: ModelSpec) -> str:
    """What the cache keys a model's vectors by: its file's content, or a remote model's server
    and name (not its api_key or timeouts, which change no vector)."""
    if spec.is_local:
        return identity.file_sha256(spec.path)
    return f"remote:{getattr(spec.remote, 'url', '')}:{getattr(spec.remote, 'model', None) or spec.name}"


def embed(
    engine: Engine,
    texts: Any,
    *,
    model: str | None,
    normalize: bool,
    truncate: bool,
    progress: bool,
    cancel: threading.Event | None = None,
) -> Embeddings:
    started = time.perf_counter()
    single = isinstance(texts, str)
    items = check_texts(texts)
    name = model or engine.settings.embedding_model
    spec = engine.registry.resolve(name)
    pooling = pooling_of(spec)
    model_id = model_identity(spec)
    keys = [vector_key(model_id, pooling, normalize, text) for text in items]
    dimensions = embedding_dimensions(spec)
    found = engine.embedding_cache.get_many(keys, dimensions)
    # Each text not in the cache is embedded once, however often it appears.
    first_of: dict[bytes, int] = {}
    for index in range(len(items)):
        if index not in found:
            first_of.setdefault(keys[index], index)
    missing = list(first_of.values())
    tokens, truncated = 0, tuple[int, ...]()
    vectors: np.ndarray | None = None
    if missing:
        computed = _compute(engine, name, [items[i] for i in missing], truncate=truncate, progress=progress,
                            cancel=cancel)  # fmt: skip
        tokens = computed.tokens
        fresh = np.asarray(computed.vectors, dtype=np.float32)
        if found and fresh.shape[1] != len(next(iter(found.values()))):
            raise GenerationError(
                f"{spec.name} now gives vectors of {fresh.shape[1]} numbers, and the cache holds some of another "
                "length for it (its server changed models?). Empty the cache (nbllm.clear_cache()) and embed again."
            )
        if normalize:
            fresh = _normalized(fresh)
        bad = np.flatnonzero(~np.isfinite(fresh).all(axis=1))
        if bad.size:
            raise GenerationError(
                f"The model gave a vector with NaN or infinite values for text {missing[int(bad[0])]} "
                f"({bad.size} of {len(missing)}): the model file is likely damaged. Nothing was cached."
            )
        cut = set(computed.truncated)  # a cut text's vector is kept only for this call
        engine.embedding_cache.put_many([(keys[i], fresh[j]) for j, i in enumerate(missing) if j not in cut])
        row_of = {keys[i]: j for j, i in enumerate(missing)}
        rows = [index for index in range(len(items)) if index not in found]
        vectors = np.empty((len(items), fresh.shape[1]), dtype=np.float32)
        vectors[rows] = fresh[[row_of[keys[index]] for index in rows]]
        truncated = tuple(index for index in rows if row_of[keys[index]] in cut)
    for index, vector in found.items():
        if vectors is None:
            vectors = np.empty((len(items), vector.shape[0]), dtype=np.float32)
        vectors[index] = vector
    assert vectors is not None  # items is not empty (check_texts), so one of the two filled it
    result = (vectors[0] if single else vectors).view(Embeddings)
    # The name as given (a path stays a path): what an Index resolves again to embed its queries.
    result.model, result.truncated, result.cached, result.tokens = name, truncated, len(found), tokens
    engine.stats.record_embeddings(len(items), len(found), tokens, time.perf_counter() - started)
    return result


def _compute(
    engine: Engine, name: str, texts: Sequence[str], *, truncate: bool, progress: bool, cancel: threading.Event | None
) -> Any:
    owner = _Owner(cancel)
    bar = progress_bar(progress and len(texts) >= 64, len(texts), "Embedding", "text")

    def advance(count: int) -> None:
        bar.update(count)

    try:
        resident = engine.registry.checkout(name, owner)
        try:
            return resident.model.embed(texts, truncate=truncate, on_progress=advance, cancel=owner.cancel)
        finally:
            engine.registry.checkin(resident)
    finally:
        bar.close()


def _normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)
