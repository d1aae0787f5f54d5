"""Tiny, real GGUF models for tests and examples.

``make_tiny_model(path)`` writes a llama-architecture model with random weights and a small
SentencePiece-style vocabulary: a few hundred kilobytes, loaded by llama.cpp in milliseconds,
producing (meaningless) text through exactly the same code paths as a real model. Different
``seed``/``n_embd``/``n_layer`` give different files, e.g. to exercise LRU eviction.

``make_tiny_bert(folder)`` writes a tiny random BERT checkpoint (config.json, model.safetensors,
vocab.txt, a sentence-transformers pooling configuration), the input of nbllm's BERT converter,
and ``make_tiny_bert_gguf(path)`` converts one into a GGUF embedding model.

Needs the ``gguf`` and ``numpy`` packages (both installed with nbllm).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# Words give the random model something readable to emit; byte tokens make any text encodable.
_WORDS = tuple(
    """
    the a of and to in is it that was for on are with as be at by this have from or one had
    not but what all were when we there can an your which their said if do will each about
    how up out them then she many some so these would other into has more her two like him
    see time could no make than first been its who now people my made over did down only way
    find use may water long little very after words called just where most know model token
    answer question docker container python notebook cache
    """.split()  # noqa: SIM905 - a paragraph of words reads better than 150 quoted strings
)

GEMMA_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]  # UNKNOWN, CONTROL, CONTROL (gguf.TokenType values)
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [6] * 256  # BYTE
    tokens += ["\u2581" + word for word in _WORDS] + list(_WORDS)
    tokens += ["\u2581", ".", ",", "?", ":", "\n", "User", "Assistant", "\u2581User", "\u2581Assistant"]
    types += [1] * (len(tokens) - len(types))  # NORMAL
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


def make_tiny_model(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    context_length: int = 2048,
    chat_template: str | None = None,
    name: str | None = None,
    omit_tensors: Collection[str] = (),
    pooling: str | None = None,
) -> Path:
    """Write a tiny random llama-architecture GGUF model to ``path`` and return the path.

    ``pooling`` ("mean", "cls", "last") makes it an embedding model. ``omit_tensors`` (names such as
    ``"blk.1.ffn_down.weight"``) makes a damaged file: its header
    is valid, and llama.cpp refuses to load it for want of those tensors."""
    import gguf
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocabulary()
    n_vocab = len(tokens)
    head_dim = n_embd // n_head

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name or f"tiny-{seed}")
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if pooling is not None:  # a decoder that embeds ("last", as Qwen3-Embedding declares)
        writer.add_pooling_type(gguf.PoolingType[pooling.upper()])

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    def add(name: str, tensor: np.ndarray) -> None:
        if name not in omit_tensors:
            writer.add_tensor(name, tensor)

    add("token_embd.weight", weight(n_vocab, n_embd))
    for layer in range(n_layer):
        prefix = f"blk.{layer}"
        add(f"{prefix}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add(f"{prefix}.attn_q.weight", weight(n_embd, n_embd))
        add(f"{prefix}.attn_k.weight", weight(n_head_kv * head_dim, n_embd))
        add(f"{prefix}.attn_v.weight", weight(n_head_kv * head_dim, n_embd))
        add(f"{prefix}.attn_output.weight", weight(n_embd, n_embd))
        add(f"{prefix}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add(f"{prefix}.ffn_gate.weight", weight(n_ff, n_embd))
        add(f"{prefix}.ffn_up.weight", weight(n_ff, n_embd))
        add(f"{prefix}.ffn_down.weight", weight(n_embd, n_ff))
    add("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    add("output.weight", weight(n_vocab, n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# A WordPiece vocabulary that spells any lowercase ASCII word (single letters, then "##" letters)
# and has whole words and suffixes for the sentences tests use, so that tokenizing exercises
# longest-match WordPiece rather than letter-by-letter fallbacks.
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BERT_WORDS = """
    the a an of and to in is it on was for with as at by this that man woman girl boy baby
    eating eat food bread piece carrying carry cat dog sat mat play walk run hello world cafe
    naive model token answer question docker container python notebook cache new old big small
    """.split()  # noqa: SIM905 - a paragraph of words reads better than quoted strings
_BERT_PIECES = ["##s", "##ing", "##ed", "##er", "##ly", "##es", "##ion"]


def default_bert_vocabulary() -> list[str]:
    """The tiny BERT's vocabulary: special tokens first (ids 0-4), then punctuation, digits,
    letters, words and ``##`` continuation pieces."""
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    punctuation = list(".,!?'-:;()")
    digits = [str(digit) for digit in range(10)]
    continuations = ["##" + piece for piece in letters + digits]
    return _BERT_SPECIALS + punctuation + digits + letters + _BERT_WORDS + _BERT_PIECES + continuations


def _to_bf16(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """float32 → bfloat16 bits (uint16), rounding to nearest even as PyTorch does."""
    import numpy as np

    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, npt.NDArray[Any]],
    *,
    float_dtype: str = "F32",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` as a safetensors file (the format nbllm's converter reads; no
    ``safetensors`` package needed). Floating-point arrays are stored as ``float_dtype``
    ("F32", "F16" or "BF16"); integer arrays as I64."""
    import numpy as np

    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    blobs: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        if np.issubdtype(array.dtype, np.floating):
            dtype = float_dtype
            if dtype == "F32":
                blob = np.ascontiguousarray(array, dtype="<f4").tobytes()
            elif dtype == "F16":
                blob = np.ascontiguousarray(array, dtype="<f2").tobytes()
            elif dtype == "BF16":
                blob = _to_bf16(array).astype("<u2").tobytes()
            else:
                raise ValueError(f"float_dtype must be F32, F16 or BF16, not {float_dtype!r}")
        else:
            dtype, blob = "I64", np.ascontiguousarray(array, dtype="<i8").tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the reference writer pads it
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for blob in blobs:
            file.write(blob)
    return path


def make_tiny_bert(
    directory: str | os.PathLike[str],
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    vocab: list[str] | None = None,
    intermediate: int | None = None,
    max_positions: int = 128,
    pooling: str = "mean",
    float_dtype: str = "F32",
    lowercase: bool = True,
) -> Path:
    """Write a tiny random BERT checkpoint folder (Hugging Face / sentence-transformers layout)
    into ``directory`` and return it: config.json, model.safetensors (with the position_ids
    buffer and pooler head real checkpoints carry), vocab.txt, tokenizer_config.json, and
    modules.json with 1_Pooling/config.json (``pooling``: "mean" or "cls")."""
    import numpy as np

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = list(vocab) if vocab is not None else default_bert_vocabulary()
    ff = intermediate or 4 * hidden
    rng = np.random.default_rng(seed)

    def weight(*shape: int, scale: float = 0.3) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(prefix: str) -> dict[str, npt.NDArray[np.float32]]:
        # Not the identity, so that a swapped weight and bias would show in the outputs.
        return {f"{prefix}.weight": 1 + weight(hidden, scale=0.1), f"{prefix}.bias": weight(hidden, scale=0.1)}

    tensors: dict[str, npt.NDArray[Any]] = {
        "embeddings.position_ids": np.arange(max_positions, dtype=np.int64)[None, :],
        "embeddings.word_embeddings.weight": weight(len(tokens), hidden, scale=1.0),
        "embeddings.position_embeddings.weight": weight(max_positions, hidden, scale=0.5),
        "embeddings.token_type_embeddings.weight": weight(2, hidden, scale=0.5),
        **norm("embeddings.LayerNorm"),
    }
    for layer in range(layers):
        prefix = f"encoder.layer.{layer}"
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            tensors[f"{prefix}.{part}.weight"] = weight(hidden, hidden)
            tensors[f"{prefix}.{part}.bias"] = weight(hidden, scale=0.1)
        tensors.update(norm(f"{prefix}.attention.output.LayerNorm"))
        tensors[f"{prefix}.intermediate.dense.weight"] = weight(ff, hidden)
        tensors[f"{prefix}.intermediate.dense.bias"] = weight(ff, scale=0.1)
        tensors[f"{prefix}.output.dense.weight"] = weight(hidden, ff, scale=0.15)
        tensors[f"{prefix}.output.dense.bias"] = weight(hidden, scale=0.1)
        tensors.update(norm(f"{prefix}.output.LayerNorm"))
    tensors["pooler.dense.weight"] = weight(hidden, hidden)  # dropped by the converter, as by llama.cpp's
    tensors["pooler.dense.bias"] = weight(hidden)
    write_safetensors(directory / "model.safetensors", tensors, float_dtype=float_dtype)

    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": "gelu",
        "hidden_size": hidden,
        "intermediate_size": ff,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "max_position_embeddings": max_positions,
        "type_vocab_size": 2,
        "vocab_size": len(tokens),
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (directory / "vocab.txt").write_text("".join(token + "\n" for token in tokens), encoding="utf-8")
    tokenizer_config = {"do_lower_case": lowercase, "strip_accents": None, "tokenizer_class": "BertTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (directory / "1_Pooling").mkdir(exist_ok=True)
    pooling_config = {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config), encoding="utf-8")
    return directory


def make_tiny_bert_gguf(path: str | os.PathLike[str], *, weight_type: str = "f32", **options: Any) -> Path:
    """Write a tiny random BERT embedding model to ``path`` (GGUF, converted by nbllm's converter
    from ``make_tiny_bert(**options)``) and return the path."""
    from nbllm.host.bert_to_gguf import convert

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tiny-bert-") as folder:
        return convert(make_tiny_bert(folder, **options), path, weight_type=weight_type, name=path.stem)
