"""Semantic search: ``nbllm.Index`` (texts and their vectors, queried again and again, saved to a
file) and ``nbllm.similar`` (one query, through an index of the texts).

Vectors are unit length (``embed(normalize=True)``), so a score is a cosine similarity: a dot
product. The texts' vectors come from the embedding cache after the first time, so building an
index over the same column again costs a lookup, not a model run.

An index file is a numpy ``.npz`` read with ``allow_pickle=False`` (nothing in it can run code):
the vectors (float32), the texts and labels as JSON, and which model made the vectors, by name
and file hash. Loading checks every part, and searching with another model's file (the name now
names a different file) is an error: its vectors would not be comparable.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nbllm.core import identity
from nbllm.core.errors import ParameterError
from nbllm.engine.embedding import check_texts

if TYPE_CHECKING:
    import pandas

    from nbllm.engine.engine import Engine

FORMAT = 1
PARTS = ("vectors", "texts", "labels", "meta")
MAX_FILE_BYTES = 4 << 30  # an index of 2.5 million 384-dimension vectors; larger is not one of ours
_engine_provider: Callable[[], Engine] | None = None


def use_engine(provider: Callable[[], Engine]) -> None:
    """Where an ``Index`` made without ``engine=`` finds its engine (the facade's, nbllm.get_engine)."""
    global _engine_provider
    _engine_provider = provider


@dataclass(frozen=True)
class Hit:
    position: int  # in the index's texts
    score: float  # cosine similarity to the query


class Index:
    """Texts and their vectors, for repeated semantic search.

    ``Index(texts, model=None)``: ``texts`` a list of strings or a pandas Series (its index
    labels are kept and shown with each hit). ``index.search(query, k=5)`` gives a DataFrame of
    the ``k`` most similar texts (text, score, index); ``index.save(path)`` and
    ``Index.load(path)`` keep it in a file.
    """

    def __init__(
        self, texts: Any, model: str | None = None, *, progress: bool = True, engine: Engine | None = None
    ) -> None:
        self._engine = engine
        labels = list(texts.index) if hasattr(texts, "index") and hasattr(texts, "values") else None
        items = check_texts(texts)
        if isinstance(texts, str):
            raise ParameterError("An index needs a list of texts (or a pandas Series), not one string.")
        vectors = self.engine.embed(items, model, normalize=True, progress=progress)
        self.texts: list[str] = items
        self.labels: list[Any] = labels if labels is not None else list(range(len(items)))
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self.model = vectors.model
        self._model_id = self._current_model_id()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            if _engine_provider is None:
                raise ParameterError("Give the index an engine (engine=...), or use it through nbllm.Index.")
            self._engine = _engine_provider()
        return self._engine

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        return f"Index({len(self)} texts, model={self.model!r}, {self.vectors.shape[1]} dimensions)"

    def hits(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` texts most similar to ``query``, best first."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ParameterError(f"k = {k!r}: must be a positive integer (how many results).")
        if self._model_id != self._current_model_id():
            raise ParameterError(
                f"This index was built with another file of {self.model}: its vectors do not compare with this "
                "model's. Build it again."
            )
        vector = self.engine.embed(query, self.model, normalize=True, progress=False)
        scores = self.vectors @ np.asarray(vector, dtype=np.float32)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(int(i), float(scores[i])) for i in top]

    def search(self, query: str, k: int = 5) -> pandas.DataFrame:
        """The ``k`` most similar texts as a DataFrame: text, score, index (the text's label)."""
        import pandas

        found = self.hits(query, k)
        return pandas.DataFrame(
            {
                "text": [self.texts[h.position] for h in found],
                "score": [round(h.score, 4) for h in found],
                "index": [self.labels[h.position] for h in found],
            }
        )

    def _current_model_id(self) -> str:
        spec = self.engine.registry.resolve(self.model)
        return identity.file_sha256(spec.path) if spec.is_local else f"remote:{spec.name}"

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index to ``path`` (a ``.npz`` file; written whole, then renamed into place)."""
        target = Path(path).expanduser()
        meta = {"format": FORMAT, "model": self.model, "model_id": self._model_id}
        parts = {
            "vectors": self.vectors,
            "texts": _json_bytes(self.texts),
            "labels": _json_bytes([_plain(label) for label in self.labels]),
            "meta": _json_bytes(meta),
        }
        # A fresh name of our own (mkstemp: never an existing file or link), renamed into place.
        handle, partial_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        partial = Path(partial_name)
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **parts)  # type: ignore[arg-type]
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, model: str | None = None, engine: Engine | None = None) -> Index:
        """An index written by ``save``; a ``ParameterError`` saying what is wrong with any other file.

        The file names the model its vectors came from; only a model known by name (the
        embedded one, the config's, the models folder's, a remote one) is taken from it: a file
        must not make nbllm open a path it chose. For a model given by path, say it: ``model=``.
        """
        source = Path(path).expanduser()
        try:
            size = source.stat().st_size
        except OSError as error:
            raise ParameterError(f"Cannot read the index file {source}: {error.strerror or error}.") from None
        if not source.is_file() or size > MAX_FILE_BYTES:
            raise ParameterError(f"{source} is not an index file written by Index.save.")
        try:
            # What the archive says it holds, before numpy allocates for it: the four parts
            # written by save, no more than the file could hold uncompressed.
            # Stored, not compressed (as np.savez writes): a small file cannot unpack into gigabytes.
            with zipfile.ZipFile(source) as archive:
                members = archive.infolist()
            names = {info.filename for info in members}
            stored = all(info.compress_type == zipfile.ZIP_STORED for info in members)
            if names != {f"{name}.npy" for name in PARTS} or not stored or sum(i.file_size for i in members) > size:
                raise ValueError("its parts are not those of an index")
            with np.load(source, allow_pickle=False) as parts:
                vectors = np.array(parts["vectors"])
                texts, labels, meta = (json.loads(bytes(parts[name]).decode()) for name in ("texts", "labels", "meta"))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, MemoryError, RecursionError) as error:
            raise ParameterError(f"{source} is not an index file written by Index.save ({error}).") from None
        if not (
            isinstance(meta, dict) and meta.get("format") == FORMAT and isinstance(meta.get("model"), str)
            and isinstance(texts, list) and all(isinstance(t, str) for t in texts) and isinstance(labels, list)
            and len(labels) == len(texts) and vectors.dtype == np.float32 and vectors.ndim == 2
            and vectors.shape[0] == len(texts) and len(texts) > 0 and np.isfinite(vectors).all()
        ):  # fmt: skip
            raise ParameterError(f"{source} is damaged or not an index file written by Index.save.")
        index = cls.__new__(cls)
        index._engine = engine
        index.texts, index.labels, index.vectors = texts, labels, vectors
        index.model, index._model_id = model or meta["model"], str(meta.get("model_id"))
        if model is None:
            spec = index.engine.registry.resolve(meta["model"]) if _named(meta["model"]) else None
            if spec is None or spec.source == "path":
                raise ParameterError(
                    f"{source} was built with the model file {meta['model']!r}, named by its path: load it with "
                    "Index.load(path, model=...) naming that model yourself."
                )
        return index


def _named(model: str) -> bool:
    """A model name, not a path (which resolve would open)."""
    return bool(model) and "/" not in model and os.sep not in model and not model.endswith(".gguf") and model[0] != "~"


def _json_bytes(value: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(value, ensure_ascii=False).encode(), dtype=np.uint8)


def _plain(label: Any) -> Any:
    """A label as JSON keeps it (numbers, strings); anything else as its text."""
    if isinstance(label, np.generic):
        label = label.item()
    return label if isinstance(label, (str, int, float, bool)) or label is None else str(label)


def similar(engine: Engine, query: str, texts: Any, k: int, model: str | None) -> pandas.DataFrame:
    """``nbllm.similar``: the ``k`` texts most like ``query`` (through an index of ``texts``,
    whose vectors the embedding cache keeps)."""
    if isinstance(texts, Index):
        return texts.search(query, k)
    return Index(texts, model, progress=False, engine=engine).search(query, k)
