"""Read and validate a GGUF file in Python before llama.cpp ever sees it.

llama.cpp trusts its input: a truncated download or a random file can abort the whole process
(and with it the Jupyter kernel). So every file passes this gate first: magic, version,
metadata, tensor table, and every tensor's data inside the file. Only the header is read (the
tensor data is never touched), so even a multi-gigabyte model is checked in milliseconds.

Named ``gguf_file`` rather than ``gguf`` so that it never shadows the ``gguf`` package.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbllm.core import paths
from nbllm.core.errors import InvalidModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Sanity bounds: far above any real model, far below what a corrupt count would claim.
MAX_COUNT = 1 << 24
MAX_STRING = 1 << 28
MAX_DIMS = 8
# Arrays up to this many elements keep their values (e.g. per-layer head counts); longer
# ones (vocabularies) keep only their type and length.
SMALL_ARRAY = 1024

# GGUF metadata value types -> struct format (None: variable length).
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class ArrayInfo:
    """A long metadata array, summarized: its element type and length."""

    item_type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to the start of the data section
    nbytes: int


# llama.cpp's enum llama_pooling_type (0, none, gives one vector per token: not an embedding
# nbllm can use; 4, rank, is a reranker's).
POOLING_TYPES = {1: "mean", 2: "cls", 3: "last"}
RANK_POOLING = 4
ENCODER_ARCHITECTURES = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "modern-bert", "neo-bert"})


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    file_size: int
    mtime_ns: int
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    alignment: int
    _by_name: dict[str, TensorInfo] = field(default_factory=dict, repr=False, compare=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_get(self, key: str, default: Any = None) -> Any:
        """Metadata under the architecture's prefix, e.g. ``arch_get('block_count')``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)

    @property
    def n_layers(self) -> int:
        return int(self.arch_get("block_count", 0) or 0)

    @property
    def context_length(self) -> int:
        return int(self.arch_get("context_length", 0) or 0)

    @property
    def chat_template(self) -> str | None:
        template = self.metadata.get("tokenizer.chat_template")
        return template if isinstance(template, str) and template.strip() else None

    @property
    def pooling(self) -> str | None:
        """How an embedding model pools its token vectors into one ("mean", "cls", "last"), from
        its metadata; None for a model that generates text. Encoders (BERT and kin) that do not
        say are pooled by the mean, as sentence-transformers pools most of them."""
        declared = self.arch_get("pooling_type")
        if isinstance(declared, int) and not isinstance(declared, bool):
            if declared in POOLING_TYPES:
                return POOLING_TYPES[declared]
            if declared == RANK_POOLING:  # a reranker: it scores pairs, its vectors mean nothing
                return None
        return "mean" if self.architecture in ENCODER_ARCHITECTURES else None

    @property
    def vocab_size(self) -> int:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, ArrayInfo):
            return tokens.length
        if isinstance(tokens, list):
            return len(tokens)
        return 0

    @property
    def n_params(self) -> int:
        total = 0
        for tensor in self.tensors:
            count = 1
            for dim in tensor.shape:
                count *= dim
            total += count
        return total

    @property
    def tensor_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)

    @property
    def quantization(self) -> str:
        """The file type's name, e.g. ``Q4_K_M``; derived from ``general.file_type``."""
        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int):
            try:
                from gguf import LlamaFileType

                return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
            except (ImportError, ValueError):
                return f"type {file_type}"
        return "unknown"

    def tensor(self, name: str) -> TensorInfo | None:
        if not self._by_name:
            self._by_name.update((t.name, t) for t in self.tensors)
        return self._by_name.get(name)


class _Reader:
    """Bounds-checked little-endian reads over a buffer; any overrun is a clear error."""

    def __init__(self, buffer: Any, path: Path, size: int) -> None:
        self.buffer, self.path, self.size, self.pos = buffer, path, size, 0
        self.vocab: set[bytes] = set()  # the texts of tokenizer.ggml.tokens, for the checks below

    def fail(self, what: str) -> InvalidModelFileError:
        return InvalidModelFileError(
            f"{self.path} is truncated or corrupt: {what} (at byte {self.pos:,} of {self.size:,}). "
            "If it was downloaded, download it again; otherwise re-export it with llama.cpp's tools."
        )

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            self.pos = min(self.pos, self.size)
            raise self.fail(f"the file ends inside the {what}")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += n
        return value

    def count(self, what: str, limit: int = MAX_COUNT) -> int:
        value = int(self.scalar("<Q", what))
        if value > limit:
            raise self.fail(f"implausible {what} {value:,}")
        return value

    def string(self, what: str) -> str:
        length = self.count(f"length of {what}", MAX_STRING)
        self.need(length, what)
        raw = bytes(self.buffer[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, n: int, what: str, *, unique: bool = False) -> None:
        # The hot loop of the gate: a 262k-token vocabulary is 262k strings. Bounds are checked
        # once at the end; a read past the end raises struct.error, turned into a clear message.
        unpack, buffer, pos = _U64.unpack_from, self.buffer, self.pos
        seen: set[bytes] = set()
        try:
            for _ in range(n):
                (length,) = unpack(buffer, pos)
                if length > MAX_STRING:
                    self.pos = pos
                    raise self.fail(f"implausible string length in {what}")
                pos += 8 + length
                if unique:  # ~0.1 s once per file for 262k tokens; the header is then kept on disk
                    seen.add(buffer[pos - length : pos])  # an mmap slice is bytes: hashable
            if unique and len(seen) < n:
                raise self.fail(f"{what} lists {n - len(seen)} token(s) twice (llama.cpp would abort on it)")
            if unique:
                self.vocab = seen
        except struct.error:
            self.pos = self.size
            raise self.fail(f"the file ends inside the {what}") from None
        self.pos = pos
        self.need(0, what)

    def value(self, value_type: int, key: str) -> Any:
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type], f"value of {key}")
        if value_type == _STRING:
            return self.string(f"value of {key}")
        if value_type == _ARRAY:
            item_type = int(self.scalar("<I", f"array type of {key}"))
            length = self.count(f"array length of {key}")
            if item_type == _STRING:
                # A vocabulary that names a token twice makes llama.cpp abort the whole process
                # (GGML_ASSERT in llama_vocab::load), so its tokens are checked, not just skipped.
                unique = key == "tokenizer.ggml.tokens"
                if length <= SMALL_ARRAY and not unique:
                    return [self.string(f"array {key}") for _ in range(length)]
                start = self.pos
                self.skip_strings(length, f"array {key}", unique=unique)
                if length <= SMALL_ARRAY:
                    self.pos = start
                    return [self.string(f"array {key}") for _ in range(length)]
                return ArrayInfo(item_type, length)
            if item_type not in _SCALARS:
                raise self.fail(f"unknown array element type {item_type} in {key}")
            fmt = _SCALARS[item_type]
            width = struct.calcsize(fmt)
            self.need(width * length, f"array {key}")
            if length <= SMALL_ARRAY:
                items = list(struct.unpack_from(f"<{length}{fmt[1]}", self.buffer, self.pos))
                self.pos += width * length
                return items
            self.pos += width * length
            return ArrayInfo(item_type, length)
        raise self.fail(f"unknown metadata value type {value_type} for {key}")


# Byte-fallback tokenizers (SentencePiece, Unigram) turn any character missing from the
# vocabulary into byte tokens, looked up with std::map::at: a missing byte token is an uncaught
# C++ exception, which ends the process at the first such character.
_BYTE_FALLBACK_TOKENIZERS = ("llama", "t5")


def _check_what_llama_cpp_trusts(reader: _Reader, metadata: dict[str, Any], n_tensors: int) -> None:
    """Metadata llama.cpp acts on without checking, found by fuzzing: each case below made it
    abort or spin instead of failing a load (tests/test_gguf_fuzz.py)."""
    arch = metadata["general.architecture"]
    layers = metadata.get(f"{arch}.block_count")
    # Every layer has tensors of its own; a count beyond the tensors made llama.cpp loop for ever.
    if layers is not None and (not isinstance(layers, int) or not 0 <= layers <= n_tensors):
        raise reader.fail(f"{arch}.block_count {layers!r} does not match its {n_tensors} tensors")
    if metadata.get("tokenizer.ggml.model") in _BYTE_FALLBACK_TOKENIZERS and reader.vocab:
        missing = [
            byte
            for byte in range(256)
            if f"<0x{byte:02X}>".encode() not in reader.vocab and bytes([byte]) not in reader.vocab
        ]
        if missing:
            raise reader.fail(
                f"its vocabulary lacks the byte token <0x{missing[0]:02X}> ({len(missing)} of 256 missing), "
                "so llama.cpp would crash on text it cannot spell"
            )


def _type_sizes() -> dict[int, tuple[int, int]]:
    from gguf.constants import GGML_QUANT_SIZES

    return {int(kind): sizes for kind, sizes in GGML_QUANT_SIZES.items()}


def _parse(path: Path, buffer: Any, size: int, mtime_ns: int) -> GGUFInfo:
    reader = _Reader(buffer, path, size)
    magic = bytes(buffer[:4])
    if magic != GGUF_MAGIC:
        legacy = magic in (b"lmgg", b"fmgg", b"tjgg", b"ggml", b"ggjt", b"ggla")
        hint = (
            "It is an old GGML-format model; convert it to GGUF with llama.cpp's conversion scripts "
            "or download the .gguf version."
            if legacy
            else "Whatever its name, its content is not a GGUF model: download it again, or pick another file."
        )
        raise InvalidModelFileError(f"{path} is not a GGUF file (it starts with {magic!r}). {hint}")
    reader.pos = 4
    version = int(reader.scalar("<I", "version"))
    if version not in SUPPORTED_VERSIONS:
        raise InvalidModelFileError(
            f"{path} is GGUF version {version}; this nbllm reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}. Download a current .gguf of this model."
        )
    n_tensors = reader.count("tensor count")
    n_kv = reader.count("metadata count")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = reader.string("metadata key")
        value_type = int(reader.scalar("<I", f"type of {key}"))
        metadata[key] = reader.value(value_type, key)
    if "general.architecture" not in metadata:
        raise InvalidModelFileError(
            f"{path} has no general.architecture in its metadata, so llama.cpp cannot load it. "
            "Re-export the model with a current llama.cpp conversion script."
        )
    if n_tensors == 0:
        raise InvalidModelFileError(f"{path} contains no tensors: it is not a usable model file.")
    _check_what_llama_cpp_trusts(reader, metadata, n_tensors)

    sizes = _type_sizes()
    raw_tensors = []
    for _ in range(n_tensors):
        name = reader.string("tensor name")
        n_dims = int(reader.scalar("<I", f"dimension count of {name}"))
        if not 1 <= n_dims <= MAX_DIMS:
            raise reader.fail(f"tensor {name!r} claims {n_dims} dimensions")
        shape = tuple(int(reader.scalar("<Q", f"shape of {name}")) for _ in range(n_dims))
        ggml_type = int(reader.scalar("<I", f"type of {name}"))
        offset = int(reader.scalar("<Q", f"offset of {name}"))
        if ggml_type not in sizes:
            raise InvalidModelFileError(
                f"{path}: tensor {name!r} has type {ggml_type}, which this installation does not know. "
                "The file is corrupt, or newer than the installed gguf/llama.cpp: upgrade nbllm."
            )
        block, type_size = sizes[ggml_type]
        elements = 1
        for dim in shape:
            elements *= dim
        if shape and shape[0] % block:
            raise reader.fail(f"tensor {name!r} row length {shape[0]} is not a multiple of its block size {block}")
        raw_tensors.append(TensorInfo(name, shape, ggml_type, offset, elements // block * type_size))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise reader.fail(f"invalid general.alignment {alignment!r}")
    data_offset = (reader.pos + alignment - 1) // alignment * alignment
    data_size = size - data_offset
    for tensor in raw_tensors:
        if tensor.offset % alignment:
            raise reader.fail(f"tensor {tensor.name!r} offset {tensor.offset} is not aligned to {alignment}")
        end = tensor.offset + tensor.nbytes
        if end > data_size:
            raise InvalidModelFileError(
                f"{path} is truncated: tensor {tensor.name!r} needs bytes up to {data_offset + end:,} "
                f"but the file has only {size:,}. The download was probably cut off: download it again."
            )
    return GGUFInfo(path, size, mtime_ns, version, metadata, tuple(raw_tensors), data_offset, alignment)


_cache: dict[tuple[str, int, int], GGUFInfo] = {}
_cache_lock = threading.Lock()
# Headers that take longer than this to read (large vocabularies: ~55 ms for 262k tokens) are
# also remembered on disk, so a new process loads a model as fast as a bare llama.cpp does.
DISK_CACHE_SECONDS = 0.01
_HEADER_FORMAT = 1


def _header_cache_file(key: tuple[str, int, int]) -> Path:
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:32]
    return paths.cache_dir() / "gguf-headers" / f"{digest}.json"


def _encode(value: Any) -> Any:
    return {"__array__": [value.item_type, value.length]} if isinstance(value, ArrayInfo) else value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__array__" in value:
        return ArrayInfo(*value["__array__"])
    return value


def _save_header(key: tuple[str, int, int], info: GGUFInfo) -> None:
    data = {
        "format": _HEADER_FORMAT,
        "key": list(key),
        "version": info.version,
        "metadata": {k: _encode(v) for k, v in info.metadata.items()},
        "tensors": [[t.name, list(t.shape), t.ggml_type, t.offset, t.nbytes] for t in info.tensors],
        "data_offset": info.data_offset,
        "alignment": info.alignment,
    }
    try:
        paths.write_text_atomically(_header_cache_file(key), json.dumps(data))
    except OSError:
        pass  # an unwritable cache only costs a re-read next time


def _load_header(key: tuple[str, int, int], path: Path) -> GGUFInfo | None:
    try:
        data = json.loads(_header_cache_file(key).read_text(encoding="utf-8"))
        if data["format"] != _HEADER_FORMAT or tuple(data["key"]) != key:
            return None
        tensors = tuple(TensorInfo(n, tuple(shape), t, o, b) for n, shape, t, o, b in data["tensors"])
        metadata = {k: _decode(v) for k, v in data["metadata"].items()}
        return GGUFInfo(
            path, key[1], key[2], data["version"], metadata, tensors, data["data_offset"], data["alignment"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: read the file itself


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Validate ``path`` as a GGUF model and return what its header says.

    Raises ``InvalidModelFileError`` (an ``NbllmError``) for anything llama.cpp should not be
    handed. Results are remembered per (path, size, mtime), so asking again is free; slow-to-read
    headers are remembered on disk too, so a new process does not pay for them again.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.gguf"))[:5]
        hint = f" It contains: {', '.join(inside)}; pass one of those." if inside else ""
        raise InvalidModelFileError(f"{path} is a directory, not a .gguf model file.{hint}")
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise InvalidModelFileError(f"{path} does not exist. Check the path, or see nbllm.models().") from None
    except OSError as error:
        raise InvalidModelFileError(f"Cannot read {path}: {error.strerror}.") from error
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    if stat.st_size == 0:
        raise InvalidModelFileError(f"{path} is empty (0 bytes). If it was downloaded, download it again.")
    if stat.st_size < 24:
        raise InvalidModelFileError(
            f"{path} is only {stat.st_size} bytes: too small to be a GGUF model. Download it again."
        )
    info = _load_header(key, path)
    if info is None:
        started = time.perf_counter()
        try:
            with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                info = _parse(path, view, stat.st_size, stat.st_mtime_ns)
        except OSError as error:
            raise InvalidModelFileError(f"Cannot read {path}: {error.strerror or error}.") from error
        if time.perf_counter() - started > DISK_CACHE_SECONDS:
            _save_header(key, info)
    with _cache_lock:
        _cache[key] = info
    return info
