"""A plain numpy BERT sentence embedder: the reference llama.cpp's embeddings are checked against.

It reads the same checkpoint folder the converter reads (config.json, model.safetensors through
nbllm's own safetensors reader, vocab.txt) and computes what sentence-transformers computes for
a BERT with mean pooling: embeddings + LayerNorm, post-LayerNorm encoder layers with exact (erf)
GELU, the mean over the sequence's tokens, then L2 normalization. Everything is float64, so the
reference's own rounding is negligible next to llama.cpp's.

``BertReference.tokenize`` is transformers' BertTokenizer (basic tokenization: clean text, split
CJK characters, lowercase and strip accents, split punctuation; then greedy longest-match
WordPiece), so that the tests also check llama.cpp's WordPiece tokenizer, not only its math.
"""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from nbllm.host.bert_to_gguf import SafetensorsFile

Array = npt.NDArray[np.float64]
_erf = np.vectorize(math.erf, otypes=[np.float64])


class BertReference:
    def __init__(self, folder: Path) -> None:
        config: dict[str, Any] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        checkpoint = SafetensorsFile(folder / "model.safetensors")
        prefix = "bert." if any(name.startswith("bert.") for name in checkpoint.entries) else ""
        # Linear layers' matrices are kept transposed, (in, out), contiguous for the products.
        self.weights = {
            name[len(prefix) :]: np.ascontiguousarray(
                checkpoint.read(name).astype(np.float64).T if _is_linear(name) else checkpoint.read(name)
            ).astype(np.float64)
            for name, entry in checkpoint.entries.items()
            if entry.dtype in ("F32", "F16", "BF16", "F64")
        }
        self.vocab = {token: index for index, token in enumerate(_vocab_lines(folder / "vocab.txt"))}
        tokenizer_config = _json_or_empty(folder / "tokenizer_config.json")
        self.lowercase = bool(tokenizer_config.get("do_lower_case", True))
        strip = tokenizer_config.get("strip_accents")
        self.strip_accents = self.lowercase if strip is None else bool(strip)

    # -- the model ------------------------------------------------------------------------------

    def _layer_norm(self, x: Array, name: str) -> Array:
        mean = x.mean(axis=-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        normalized: Array = (x - mean) / np.sqrt(variance + self.eps)
        return normalized * self.weights[f"{name}.weight"] + self.weights[f"{name}.bias"]

    def _linear(self, x: Array, name: str) -> Array:
        # einsum's own loops, not BLAS: OpenBLAS's threads, on a small machine that is busy with
        # something else, made these products twenty times slower.
        product: Array = np.einsum("...i,ij->...j", x, self.weights[f"{name}.weight"])
        return product + self.weights[f"{name}.bias"]

    def embed_batch(self, sequences: list[list[int]]) -> Array:
        """The normalized, mean-pooled embeddings of several token id sequences, one row each.

        The sequences are padded into one batch, as transformers does, with an attention mask
        that hides the padding from attention and from the mean."""
        w = self.weights
        batch, n = len(sequences), max(len(ids) for ids in sequences)
        mask = np.zeros((batch, n))
        padded = np.zeros((batch, n), dtype=np.int64)
        for row, ids in enumerate(sequences):
            padded[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1.0
        x = w["embeddings.word_embeddings.weight"][padded]  # (batch, n, hidden)
        x = x + w["embeddings.position_embeddings.weight"][:n] + w["embeddings.token_type_embeddings.weight"][0]
        x = self._layer_norm(x, "embeddings.LayerNorm")
        head_dim = x.shape[-1] // self.heads
        hidden_mask = (1.0 - mask)[:, None, None, :] * -1e9  # added to the scores of padded keys

        def heads(t: Array) -> Array:
            split: Array = t.reshape(batch, n, self.heads, head_dim).transpose(0, 2, 1, 3)
            return split  # (batch, heads, n, head_dim)

        for layer in range(self.layers):
            p = f"encoder.layer.{layer}"
            q = heads(self._linear(x, f"{p}.attention.self.query"))
            k = heads(self._linear(x, f"{p}.attention.self.key"))
            v = heads(self._linear(x, f"{p}.attention.self.value"))
            scores = np.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(head_dim) + hidden_mask
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            context = np.einsum("bhqk,bhkd->bhqd", scores / scores.sum(axis=-1, keepdims=True), v)
            context = context.transpose(0, 2, 1, 3).reshape(batch, n, -1)
            attention = self._linear(context, f"{p}.attention.output.dense")
            x = self._layer_norm(x + attention, f"{p}.attention.output.LayerNorm")
            hidden = self._linear(x, f"{p}.intermediate.dense")
            hidden = 0.5 * hidden * (1.0 + _erf(hidden / math.sqrt(2.0)))
            x = self._layer_norm(x + self._linear(hidden, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        pooled = (x * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        result: Array = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return result

    def embed_ids(self, ids: list[int]) -> Array:
        row: Array = self.embed_batch([ids])[0]
        return row

    def embed(self, text: str) -> Array:
        return self.embed_ids(self.tokenize(text))

    # -- the tokenizer (transformers' BertTokenizer) --------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        ids = [self.vocab["[CLS]"]]
        for word in self._basic_tokens(text):
            ids.extend(self._word_pieces(word))
        ids.append(self.vocab["[SEP]"])
        return ids

    def _basic_tokens(self, text: str) -> list[str]:
        cleaned = []
        for char in text:
            if char in ("\x00", "\ufffd") or _is_control(char):
                continue
            cleaned.append(" " if _is_whitespace(char) else char)
        spaced = "".join(f" {char} " if _is_cjk(char) else char for char in cleaned)
        words: list[str] = []
        for word in spaced.split():
            if self.lowercase:
                word = word.lower()
            if self.strip_accents:
                word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
            current = ""
            for char in word:
                if _is_punctuation(char):
                    words.extend([current, char] if current else [char])
                    current = ""
                else:
                    current += char
            if current:
                words.append(current)
        return words

    def _word_pieces(self, word: str) -> list[int]:
        unknown = [self.vocab["[UNK]"]]
        if len(word) > 100:
            return unknown
        pieces: list[int] = []
        start = 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    start = end
                    break
            else:
                return unknown  # one unmatched piece makes the whole word unknown, as in transformers
        return pieces


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.startswith(("encoder.", "bert.encoder.")) and "LayerNorm" not in name


def _vocab_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _json_or_empty(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0x20000 <= code <= 0x2A6DF
        or 0x2A700 <= code <= 0x2B73F
        or 0x2B740 <= code <= 0x2B81F
        or 0x2B820 <= code <= 0x2CEAF
        or 0xF900 <= code <= 0xFAFF
        or 0x2F800 <= code <= 0x2FA1F
    )
