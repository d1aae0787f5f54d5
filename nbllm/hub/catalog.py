"""The model catalog: known models, where to download them, and what they need.

Data, not code: ``catalog.yaml`` ships with the package, and a user's own
``<config dir>/catalog.yaml`` (same format) adds models or replaces them by name. Both are
validated when loaded, so a typo is a ``ConfigError`` naming the file, the model, the key and
what is allowed, instead of a ``KeyError`` deep inside a download.

Models are of two kinds: ``chat`` models generate text, ``embedding`` models (``nbllm.embed``)
turn it into vectors. Iterating a ``Catalog`` yields only the chat models, because that is what
``recommend`` and every other chooser of a model to chat with iterate; ``all_models()`` and
``embedding_models()`` include the rest.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from nbllm.core import paths
from nbllm.core.config import parse_bytes
from nbllm.core.errors import ConfigError, ModelNotFoundError, did_you_mean
from nbllm.core.fit import COMPUTE_OVERHEAD, KV_BYTES_PER_ELEMENT
from nbllm.hub.downloads import hf_url

DEFAULT_QUANT = "Q4_K_M"  # the guide: "Start with Q4_K_M"
GUIDE_QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
ESTIMATE_CONTEXT = 4096  # the guide's default context_size
ESTIMATE_BATCH = 512  # the guide's default batch_size
BUILTIN = "nbllm/hub/catalog.yaml"

CHAT, EMBEDDING = "chat", "embedding"
KINDS = (CHAT, EMBEDDING)
POOLINGS = ("mean", "cls", "last")  # llama.cpp's pooling types an embedding model can be trained with
# llama.cpp architectures that are encoders, i.e. embedding models, whatever a catalog says: how a
# file that is in no catalog is told apart in listings. (Decoder-based embedding models, such as
# Qwen3-Embedding, share their architecture with chat models and cannot be told apart this way.)
ENCODER_ARCHITECTURES = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "neo-bert"})
# An embedding model's memory beyond its weights. It keeps no KV cache (nothing is generated:
# every text is one forward pass, all its tokens in one batch since attention looks both ways),
# so what it needs is that pass's compute buffer, for a text as long as its context: attention
# scores (heads x tokens x tokens float32, without flash attention) and a few float32 activation
# vectors of the hidden size (= `dimensions` for these pooled models) per token. BERT-family
# encoders from MiniLM to base size have 12 heads. A rough bound, not a measurement.
ENCODER_HEADS = 12
ENCODER_ACTIVATIONS = 8  # hidden-size vectors alive per token: Q, K, V, output, the 4x-wide FFN

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_QUANT = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PARAMS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBT]?)\s*$", re.IGNORECASE)
_PARAM_SCALE = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}

MODEL_KEYS = (
    "title", "family", "params", "license", "quality", "best_for", "description", "aliases", "kind",
    "context", "layers", "kv_heads", "head_dim", "vocab", "dimensions", "pooling", "repo", "pypi", "files",
)  # fmt: skip
DECODER_KEYS = ("layers", "kv_heads", "head_dim", "vocab")  # a KV cache's shape: chat models only
EMBEDDING_KEYS = ("dimensions", "pooling")
REQUIRED_MODEL_KEYS = ("family", "params", "license", "files")
FILE_KEYS = ("file", "size", "sha256", "url")


@dataclass(frozen=True)
class Quantization:
    """One line of the guide's quantization table."""

    name: str
    size_ratio: float  # file size relative to Q4_K_M
    quality: float  # share of the full-precision quality kept
    use: str


@dataclass(frozen=True)
class CatalogFile:
    """One downloadable file of a model: a quantization."""

    quant: str
    file: str  # path inside the repository
    size: int | None
    size_approximate: bool
    sha256: str | None
    url: str | None  # an explicit URL; else the model's Hugging Face repository

    @property
    def local_name(self) -> str:
        """The file's name in the models folder: what ``nbllm.load`` finds it by (its stem)."""
        return PurePosixPath(self.file).name


@dataclass(frozen=True)
class CatalogModel:
    name: str
    title: str
    family: str
    params: int
    license: str
    files: dict[str, CatalogFile]
    quality: int = 3
    best_for: str = ""
    description: str = ""
    aliases: tuple[str, ...] = ()
    context: int | None = None
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    vocab: int | None = None
    repo: str | None = None
    pypi: str | None = None
    kind: str = CHAT  # one of KINDS
    dimensions: int | None = None  # embedding models: the length of their vectors
    pooling: str | None = None  # embedding models: one of POOLINGS; None: what the GGUF file says
    origin: str = BUILTIN

    @property
    def is_embedding(self) -> bool:
        return self.kind == EMBEDDING

    def file(self, quant: str | None = None) -> CatalogFile:
        """The file of ``quant``, case-insensitively; without one, Q4_K_M or, for a model that has
        none (embedding models, some users' entries), the first file listed: the catalog's order
        says which one to start with."""
        wanted = (quant or DEFAULT_QUANT).upper()
        if quant is None and wanted not in self.files:
            return next(iter(self.files.values()))
        if wanted not in self.files:
            raise ModelNotFoundError(
                f"{self.name} has no {wanted} file in the catalog. Available: {', '.join(self.files)}."
                f"{did_you_mean(wanted, self.files)}"
            )
        return self.files[wanted]

    def url(self, quant: str | None, endpoint: str) -> str | None:
        """Where ``quant`` downloads from: its own URL, or ``{endpoint}/{repo}/resolve/main/{file}``."""
        entry = self.file(quant)
        if entry.url:
            return entry.url
        if self.repo:
            return hf_url(endpoint, self.repo, entry.file)
        return None

    def kv_cache_bytes(self, context: int = ESTIMATE_CONTEXT) -> int | None:
        """K and V in f16 for every layer, as llama.cpp allocates them (see ``nbllm.core.fit``);
        0 for an embedding model, which keeps none."""
        if self.is_embedding:
            return 0
        if not (self.layers and self.kv_heads and self.head_dim):
            return None
        tokens = min(context, self.context) if self.context else context  # the engine caps it
        return self.layers * tokens * self.kv_heads * self.head_dim * 2 * KV_BYTES_PER_ELEMENT

    def memory_needed(self, quant: str | None = None, context: int = ESTIMATE_CONTEXT) -> int | None:
        """RAM (or VRAM) to run ``quant``: the file's weights, the KV cache, the compute buffer.
        For an embedding model: the weights and one forward pass over ``context`` tokens (at most
        the model's own context), no KV cache (see ``ENCODER_HEADS``)."""
        size = self.file(quant).size
        if size is None:
            return None
        if self.is_embedding:
            return size + self.encoder_compute_bytes(context)
        # Without the architecture numbers: a rough fifth on top (KV cache and buffers).
        kv = self.kv_cache_bytes(context)
        kv = kv if kv is not None else size // 5
        compute = ESTIMATE_BATCH * 4 * (self.vocab or 32000) + COMPUTE_OVERHEAD
        return size + kv + compute

    def encoder_compute_bytes(self, context: int = ESTIMATE_CONTEXT) -> int:
        """An embedding model's compute buffer for one text of ``context`` tokens (capped at the
        model's context; ``ESTIMATE_BATCH`` when the catalog does not say it, BERT's usual 512)."""
        tokens = min(context, self.context or ESTIMATE_BATCH)
        hidden = self.dimensions or 768  # required for embedding entries; 768 = BERT-base if not
        scores = ENCODER_HEADS * tokens * tokens * 4
        activations = ENCODER_ACTIVATIONS * tokens * hidden * 4
        return scores + activations + COMPUTE_OVERHEAD


@dataclass
class Catalog:
    models: dict[str, CatalogModel]
    quantizations: dict[str, Quantization]
    sources: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[CatalogModel]:
        """The chat models: what ``recommend`` (and anything choosing a model to chat with) picks
        from, so an embedding model can never be offered for chat. ``all_models()`` has every one."""
        return (model for model in self.models.values() if not model.is_embedding)

    def __len__(self) -> int:
        """How many chat models (what iterating yields); ``len(all_models())`` counts every one."""
        return sum(1 for _ in self)

    def all_models(self) -> list[CatalogModel]:
        """Every model, chat and embedding, in catalog order: what listings show."""
        return list(self.models.values())

    def embedding_models(self) -> list[CatalogModel]:
        return [model for model in self.models.values() if model.is_embedding]

    def names(self) -> list[str]:
        """Every model's name, chat and embedding (all of them can be downloaded by name)."""
        return list(self.models)

    def get(self, name: str) -> CatalogModel | None:
        """A model by name or alias, case-insensitively; None when the catalog has no such model."""
        key = name.strip().lower()
        if key in self.models:
            return self.models[key]
        for model in self.models.values():
            if key in model.aliases:
                return model
        return None

    def require(self, name: str) -> CatalogModel:
        model = self.get(name)
        if model is None:
            every = [*self.models, *(a for m in self.models.values() for a in m.aliases)]
            raise ModelNotFoundError(
                f"{name!r} is not in the model catalog.{did_you_mean(name.strip().lower(), every)} "
                "nbllm models list (nbllm.catalog() in Python) shows the known models; "
                "or download a URL or hf://repo/file directly."
            )
        return model

    def by_file_name(self, file_name: str) -> tuple[CatalogModel, CatalogFile] | None:
        """Which catalog entry a file in the models folder is (matched by its file name)."""
        for model in self.models.values():
            for entry in model.files.values():
                if entry.local_name == file_name:
                    return model, entry
        return None


def user_catalog_file() -> Path:
    return paths.config_dir() / "catalog.yaml"


# ---------------------------------------------------------------------------- loading


_lock = threading.Lock()
_user_cache: dict[tuple[str, int, int], dict[str, CatalogModel]] = {}


def load_catalog(user_file: Path | None = None) -> Catalog:
    """The built-in catalog plus the user's own file (its entries win by name)."""
    builtin_models, quantizations = _builtin()
    models = dict(builtin_models)
    sources = [BUILTIN]
    path = user_file if user_file is not None else user_catalog_file()
    if path.is_file():
        models.update(_user_models(path))
        sources.append(str(path))
    return Catalog(models, dict(quantizations), sources)


@functools.lru_cache(maxsize=1)
def _builtin() -> tuple[dict[str, CatalogModel], dict[str, Quantization]]:
    text = resources.files("nbllm.hub").joinpath("catalog.yaml").read_text(encoding="utf-8")
    data = _load_yaml(text, BUILTIN)
    return _parse_models(data, BUILTIN), _parse_quantizations(data.get("quantizations"), BUILTIN)


def _user_models(path: Path) -> dict[str, CatalogModel]:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key in _user_cache:
            return _user_cache[key]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Cannot read the catalog file {path}: {error}. Fix or remove it.") from error
    data = _load_yaml(text, str(path))
    unknown = set(data) - {"version", "models"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key {sorted(unknown)[0]!r}. A catalog file has 'version' and 'models'."
        )
    models = _parse_models(data, str(path))
    with _lock:
        _user_cache[key] = models
    return models


def _load_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{origin} is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: a catalog file is a mapping with a 'models' key, not {type(data).__name__}.")
    version = data.get("version", 1)
    if version != 1:
        raise ConfigError(f"{origin}: catalog version {version!r} is not supported (this nbllm reads version 1).")
    return data


# ---------------------------------------------------------------------------- validation


class _Checker:
    """Builds the error messages: which file, which key, what value, what is allowed."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, where: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"{self.origin}: {where} = {value!r}: must be {allowed}.")

    def mapping(self, where: str, value: Any) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, value, "a mapping of keys to values")
        return value

    def keys(self, where: str, value: Mapping[str, Any], allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
        for key in value:
            if key not in allowed:
                raise ConfigError(
                    f"{self.origin}: unknown key {where}.{key}.{did_you_mean(str(key), allowed)} "
                    f"Keys allowed there: {', '.join(allowed)}."
                )
        for key in required:
            if key not in value:
                raise ConfigError(f"{self.origin}: {where} has no {key!r}; it is required.")

    def choice(self, where: str, value: Any, allowed: tuple[str, ...]) -> str:
        text = value.strip().lower() if isinstance(value, str) else None
        if text not in allowed:
            hint = did_you_mean(text, allowed) if text else ""
            raise ConfigError(f"{self.origin}: {where} = {value!r}: must be one of {', '.join(allowed)}.{hint}")
        return text

    def text(self, where: str, value: Any) -> str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool) or not str(value).strip():
            raise self.fail(where, value, "a non-empty text")
        return str(value).strip()

    def positive(self, where: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise self.fail(where, value, "a positive integer")
        return value

    def optional_positive(self, where: str, value: Any) -> int | None:
        return None if value is None else self.positive(where, value)

    def params(self, where: str, value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        match = _PARAMS.match(str(value)) if isinstance(value, (str, float)) else None
        if not match:
            raise self.fail(where, value, "a parameter count such as 268M, 1.5B or 7000000000")
        return int(float(match.group(1)) * _PARAM_SCALE[match.group(2).upper()])

    def size(self, where: str, value: Any) -> tuple[int | None, bool]:
        if value is None:
            return None, False
        approximate = isinstance(value, str) and value.strip().startswith("~")
        parsed = parse_bytes(value.strip().lstrip("~") if isinstance(value, str) else value)
        if parsed is None or isinstance(value, bool) or parsed <= 0:
            raise self.fail(where, value, "a size such as 1.79GB, 808MB or a number of bytes ('~' = approximate)")
        return parsed, approximate

    def sha256(self, where: str, value: Any) -> str | None:
        if value is None:
            return None
        text = str(value).strip().lower()
        if not _SHA256.match(text):
            raise self.fail(where, value, "64 hexadecimal characters (a SHA-256), or absent when unknown")
        return text

    def url(self, where: str, value: Any) -> str | None:
        if value is None:
            return None
        text = str(value).strip()
        if not text.startswith(("https://", "http://", "hf://")):
            raise self.fail(where, value, "an https:// URL or hf://owner/repo/file")
        return text


def _parse_quantizations(raw: Any, origin: str) -> dict[str, Quantization]:
    check = _Checker(origin)
    table = check.mapping("quantizations", raw or {})
    result: dict[str, Quantization] = {}
    for name, entry in table.items():
        where = f"quantizations.{name}"
        entry = check.mapping(where, entry)
        check.keys(where, entry, ("size", "quality", "use"), ("size", "quality", "use"))
        result[str(name)] = Quantization(str(name), float(entry["size"]), float(entry["quality"]), str(entry["use"]))
    return result


def _parse_models(data: Mapping[str, Any], origin: str) -> dict[str, CatalogModel]:
    check = _Checker(origin)
    models = check.mapping("models", data.get("models") or {})
    result: dict[str, CatalogModel] = {}
    for raw_name, raw in models.items():
        name = str(raw_name)
        if not _NAME.match(name):
            raise check.fail(
                "a model name", name, "lower-case letters, digits, '.', '_' and '-' (e.g. llama-2-7b-chat)"
            )
        result[name] = _parse_model(check, name, check.mapping(f"models.{name}", raw))
    return result


def _parse_model(check: _Checker, name: str, raw: Mapping[str, Any]) -> CatalogModel:
    where = f"models.{name}"
    check.keys(where, raw, MODEL_KEYS, REQUIRED_MODEL_KEYS)
    files = _parse_files(check, where, raw["files"])
    repo = raw.get("repo")
    if repo is not None and not _REPO.match(str(repo)):
        raise check.fail(f"{where}.repo", repo, "a Hugging Face repository such as TheBloke/phi-2-GGUF")
    if repo is None and raw.get("pypi") is None and any(f.url is None for f in files.values()):
        raise ConfigError(
            f"{check.origin}: {where} says nowhere to download from: give 'repo' (a Hugging Face "
            "repository) or a 'url' for every file."
        )
    quality = raw.get("quality", 3)
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 5:
        raise check.fail(f"{where}.quality", quality, "a whole number of stars from 1 to 5")
    aliases = raw.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and _NAME.match(a) for a in aliases):
        raise check.fail(f"{where}.aliases", aliases, "a list of lower-case names")
    kind, dimensions, pooling = _parse_kind(check, where, raw)
    return CatalogModel(
        name=name,
        title=check.text(f"{where}.title", raw.get("title", name)),
        family=check.text(f"{where}.family", raw["family"]),
        params=check.params(f"{where}.params", raw["params"]),
        license=check.text(f"{where}.license", raw["license"]),
        files=files,
        quality=quality,
        best_for=str(raw.get("best_for") or ""),
        description=str(raw.get("description") or ""),
        aliases=tuple(aliases),
        context=check.optional_positive(f"{where}.context", raw.get("context")),
        layers=check.optional_positive(f"{where}.layers", raw.get("layers")),
        kv_heads=check.optional_positive(f"{where}.kv_heads", raw.get("kv_heads")),
        head_dim=check.optional_positive(f"{where}.head_dim", raw.get("head_dim")),
        vocab=check.optional_positive(f"{where}.vocab", raw.get("vocab")),
        repo=str(repo) if repo is not None else None,
        pypi=str(raw["pypi"]) if raw.get("pypi") is not None else None,
        kind=kind,
        dimensions=dimensions,
        pooling=pooling,
        origin=check.origin,
    )


def _parse_kind(check: _Checker, where: str, raw: Mapping[str, Any]) -> tuple[str, int | None, str | None]:
    """``kind`` and the keys that only one kind has. A key of the other kind is an error, not
    ignored: an embedding entry with ``layers`` would look like it had a KV cache estimate."""
    kind = check.choice(f"{where}.kind", raw.get("kind", CHAT), KINDS)
    wrong = EMBEDDING_KEYS if kind == CHAT else DECODER_KEYS
    for key in wrong:
        if key in raw:
            other = "embedding" if kind == CHAT else "chat"
            raise ConfigError(
                f"{check.origin}: {where}.{key} is only for {other} models, and this one is kind: {kind}. "
                f"Remove it{', or add kind: embedding' if kind == CHAT else ''}."
            )
    if kind == CHAT:
        return kind, None, None
    if raw.get("dimensions") is None:
        raise ConfigError(
            f"{check.origin}: {where} has no 'dimensions'; it is required for kind: embedding "
            "(the length of the model's vectors, e.g. 384 or 768)."
        )
    dimensions = check.positive(f"{where}.dimensions", raw["dimensions"])
    pooling = None if raw.get("pooling") is None else check.choice(f"{where}.pooling", raw["pooling"], POOLINGS)
    return kind, dimensions, pooling


def _parse_files(check: _Checker, where: str, raw: Any) -> dict[str, CatalogFile]:
    table = check.mapping(f"{where}.files", raw)
    if not table:
        raise ConfigError(f"{check.origin}: {where}.files is empty; list at least one quantization.")
    files: dict[str, CatalogFile] = {}
    for raw_quant, entry in table.items():
        quant = str(raw_quant)
        here = f"{where}.files.{quant}"
        if not _QUANT.match(quant):
            raise check.fail(f"{where}.files", quant, "quantization names in capitals, e.g. Q4_K_M")
        entry = check.mapping(here, entry)
        check.keys(here, entry, FILE_KEYS, ("file",))
        file = check.text(f"{here}.file", entry["file"])
        local = PurePosixPath(file).name
        if not local.endswith(".gguf") or ".." in PurePosixPath(file).parts or file.startswith("/"):
            raise check.fail(f"{here}.file", file, "a .gguf file name inside the repository")
        size, approximate = check.size(f"{here}.size", entry.get("size"))
        files[quant] = CatalogFile(
            quant=quant,
            file=file,
            size=size,
            size_approximate=approximate,
            sha256=check.sha256(f"{here}.sha256", entry.get("sha256")),
            url=check.url(f"{here}.url", entry.get("url")),
        )
    return files
