"""nbllm.embed (issue 17): vectors from tiny generated embedding models (a BERT converted by
nbllm's converter, a decoder that declares last-token pooling) and from the embedded default,
packed into few decodes, cached on disk, and clear errors for what cannot embed or be embedded."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from nbllm.core.config import Settings
from nbllm.core.errors import ContextLengthError, GenerationError, ParameterError
from nbllm.engine import Engine
from nbllm.testing import make_tiny_bert_gguf, make_tiny_model
from tests.servers import serving

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]


@pytest.fixture(scope="module")
def embedding_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("embedding-models")
    return {
        "tiny-bert": make_tiny_bert_gguf(folder / "tiny-bert.gguf", seed=3),
        "tiny-last": make_tiny_model(folder / "tiny-last.gguf", seed=5, pooling="last"),
    }


@pytest.fixture
def settings(settings: Settings, embedding_models: dict[str, Path], tmp_path: Path) -> Settings:
    return settings.merged(
        {
            "models": {name: str(path) for name, path in embedding_models.items()},
            "embedding_model": "tiny-bert",
            "cache": {"enabled": True, "directory": str(tmp_path / "cache" / "prompts")},
        }
    )


def words(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    vocabulary = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "dog",
        "ran",
        "fast",
        "slow",
        "red",
        "blue",
        "sky",
        "sea",
        "tree",
        "house",
    ]
    return [" ".join(rng.choice(vocabulary, size=int(rng.integers(2, 9)))) + f" {i}" for i in range(count)]


def test_embed_gives_unit_float32_rows_packed_into_few_decodes(engine: Engine) -> None:
    texts = words(300)
    calls = []
    original = llama_cpp.llama_decode

    def counting(ctx: object, batch: object) -> int:
        calls.append(1)
        return int(original(ctx, batch))

    llama_cpp.llama_decode = counting
    try:
        vectors = engine.embed(texts, progress=False)
    finally:
        llama_cpp.llama_decode = original
    assert vectors.dtype == np.float32
    assert vectors.shape == (300, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert len(calls) <= 30  # 300 texts of a few tokens in packs of 256 tokens: ~20 decodes, not 300
    assert vectors.model == "tiny-bert"
    assert vectors.cached == 0
    assert vectors.tokens > 300 * 3
    # Packed or alone, a text gets the same vector: sequences in a batch do not see each other.
    engine.configure(cache={"enabled": False})
    single = engine.embed(texts[123])
    assert single.shape == (32,)
    assert float(single @ vectors[123]) > 0.9999


def test_a_second_embed_of_the_same_texts_comes_from_the_cache(engine: Engine) -> None:
    texts = words(50, seed=1)
    first = engine.embed(texts, progress=False)
    again = engine.embed([*texts[:20], "a new row"], progress=False)
    assert again.cached == 20
    assert np.array_equal(again[:20], first[:20])
    raw = engine.embed(texts[:5], normalize=False, progress=False)  # another key: not the normalized rows
    assert raw.cached == 0
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    stats = engine.stats.snapshot()
    assert stats["embedded_texts"] == 50 + 21 + 5
    assert stats["embedding_cache_hits"] == 20


def test_a_damaged_or_hostile_cache_is_a_miss_never_a_crash(engine: Engine, tmp_path: Path) -> None:
    texts = words(8, seed=2)
    expected = engine.embed(texts, progress=False)
    path = engine.embedding_cache.path
    with sqlite3.connect(path) as connection:  # a vector of the wrong length, one with a NaN
        keys = [row[0] for row in connection.execute("SELECT key FROM vectors")]
        connection.execute("UPDATE vectors SET vector = ? WHERE key = ?", (b"\0" * 12, keys[0]))
        nan = np.full(32, np.nan, dtype="<f4").tobytes()
        connection.execute("UPDATE vectors SET vector = ? WHERE key = ?", (nan, keys[1]))
    again = engine.embed(texts, progress=False)
    assert again.cached == 6
    # Two recomputed in another batch: the same vectors up to float rounding (flash attention).
    assert (np.sum(again * expected, axis=1) > 0.9999).all()
    # A file that is not a database is moved aside, and the cache starts afresh.
    fresh = Engine(engine.settings)
    path.write_bytes(b"this is not sqlite" * 100)
    assert fresh.embed(texts, progress=False).cached == 0
    assert path.with_name("vectors.sqlite.damaged").exists()
    fresh.close()
    # A FIFO where the file should be would block whoever opened it: the cache turns off instead.
    path.unlink()
    os.mkfifo(path)
    blocked = Engine(engine.settings)
    done = threading.Event()
    result: list[object] = []

    def run() -> None:
        result.append(blocked.embed(texts[:2], progress=False))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(60)
    assert not blocked.embedding_cache.enabled
    assert "not a regular file" in str(blocked.embedding_cache.disabled_reason)
    blocked.close()


def test_a_decoder_that_declares_last_token_pooling_embeds(engine: Engine) -> None:
    vectors = engine.embed(["one two", "three four five"], model="tiny-last", progress=False)
    assert vectors.shape == (2, 64)
    assert np.isfinite(vectors).all()


def test_what_cannot_embed_or_be_embedded_is_a_clear_error_before_any_work(engine: Engine) -> None:
    with pytest.raises(ParameterError, match=r"tiny-a is a text-generation model .* cannot embed"):
        engine.embed("hello", model="tiny-a")
    with pytest.raises(ParameterError, match=r"tiny-bert is an embedding model .* cannot write answers"):
        engine.chat("hello", model="tiny-bert")
    with pytest.raises(ParameterError, match=r"tiny-bert is an embedding model"):
        engine.generate("hello", model="tiny-bert")
    with pytest.raises(ParameterError, match=r"Text 1 is empty"):
        engine.embed(["fine", "  "])
    with pytest.raises(ParameterError, match=r"Text 2 is int"):
        engine.embed(["fine", "also fine", 3])
    with pytest.raises(ParameterError, match=r"Text 0 is float nan.*dropna"):
        engine.embed([float("nan")])
    with pytest.raises(ParameterError, match=r"texts must be a string"):
        engine.embed({"a": "b"})
    assert engine.registry.resident() == []  # nothing was loaded for any of these


def test_a_text_longer_than_the_model_reads_is_an_error_or_cut_on_request(engine: Engine) -> None:
    long = " ".join(["cat"] * 700)  # the tiny BERT reads 128 tokens
    with pytest.raises(ContextLengthError, match=r"Text 1 is 70\d tokens long.*truncate=True"):
        engine.embed(["short", long])
    vectors = engine.embed(["short", long], truncate=True, progress=False)
    assert vectors.truncated == (1,)
    assert np.isfinite(vectors).all()
    # A cut text's vector is not cached: without truncate it is the error again.
    with pytest.raises(ContextLengthError):
        engine.embed([long])


def test_the_default_embedding_model_separates_meanings(tmp_path: Path) -> None:
    engine = Engine(Settings().merged({"cache": {"enabled": False}}))
    try:
        vectors = engine.embed(SENTENCES, progress=False)
    finally:
        engine.close()
    assert vectors.model == "all-minilm-l6-v2"
    assert vectors.shape == (3, 384)
    similar, different = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > 0.6
    assert different < 0.1


def test_repeated_texts_are_embedded_once_and_all_come_from_the_cache(engine: Engine) -> None:
    first = engine.embed(["same words", "same words", "other words"], progress=False)
    assert first.cached == 0
    assert np.array_equal(first[0], first[1])
    again = engine.embed(["same words", "same words", "other words", "same words"], progress=False)
    assert again.cached == 4
    assert again.tokens == 0


def test_a_set_cancel_event_stops_an_embedding(engine: Engine) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationError, match="stopped after 0 of 20 texts"):
        engine.embed(words(20, seed=9), progress=False, cancel=cancel)
    assert len(engine.embed(words(3, seed=9), progress=False)) == 3  # the model was given back


class EmbeddingPeer(ThreadingHTTPServer):
    """An OpenAI-compatible embeddings endpoint answering as ``mode`` says."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EmbeddingHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self.mode = "ok"
        self.bodies: list[dict[str, Any]] = []


class EmbeddingHandler(BaseHTTPRequestHandler):
    server: EmbeddingPeer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "peer", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        mode = self.server.mode
        if mode == "missing":
            self._send(404, {"error": {"message": "no such endpoint"}})
            return
        data = []
        for index, text in enumerate(body["input"]):
            vector: Any = [float(len(text)), 1.0, float(index % 3)]
            if mode == "base64":
                vector = base64.b64encode(np.array(vector, dtype="<f4").tobytes()).decode()
            elif mode == "ragged" and index == 1:
                vector = [1.0, 2.0]
            elif mode == "garbage":
                vector = "not base64!"
            data.append({"object": "embedding", "index": index, "embedding": vector})
        self._send(200, {"object": "list", "data": data, "usage": {"prompt_tokens": 7, "total_tokens": 7}})

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_a_remote_model_forwards_embeddings_and_its_bad_answers_are_clear(settings: Settings) -> None:
    with serving(EmbeddingPeer()) as peer:
        engine = Engine(settings.merged({"remote_models": {"peer": {"url": peer.url}}, "cache": {"enabled": False}}))
        try:
            vectors = engine.embed(["ab", "abcd", "x" * 600_000], model="peer", normalize=False, progress=False)
            assert vectors.tolist()[:2] == [[2.0, 1.0, 0.0], [4.0, 1.0, 1.0]]
            assert [len(body["input"]) for body in peer.bodies] == [2, 1]  # sliced by size, not only by count
            peer.mode = "base64"
            assert engine.embed("abc", model="peer", normalize=False).tolist() == [3.0, 1.0, 0.0]
            for mode, words_ in [("ragged", "different lengths"), ("garbage", "not numbers"),
                                 ("missing", "no embeddings endpoint")]:  # fmt: skip
                peer.mode = mode
                with pytest.raises(GenerationError, match=words_):
                    engine.embed(["one", "two"], model="peer", progress=False)
        finally:
            engine.close()
