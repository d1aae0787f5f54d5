"""``POST /v1/embeddings`` on ``nbllm serve`` (issue 17), driven by the official openai client:
float and base64 vectors equal nbllm.embed's, and what the endpoint cannot do is a 400."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import openai
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install 'nbllm[server]'")

from nbllm.core.config import Settings
from nbllm.engine import Engine
from nbllm.testing import make_tiny_bert_gguf

TEXTS = ["the cat sat on the mat", "a dog ran", "blue sky over the sea"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert_gguf(tmp_path_factory.mktemp("server-bert") / "tiny-bert.gguf", seed=8)


@pytest.fixture
def settings(settings: Settings, bert: Path) -> Settings:
    return settings.merged({"models": {"tiny-bert": str(bert)}, "embedding_model": "tiny-bert"})


def test_the_openai_client_gets_the_same_vectors_as_float_and_as_base64(
    client: openai.OpenAI, global_engine: Engine
) -> None:
    expected = global_engine.embed(TEXTS, progress=False)
    as_float = client.embeddings.create(model="tiny-bert", input=TEXTS)
    assert [item.index for item in as_float.data] == [0, 1, 2]
    assert np.allclose(np.array([item.embedding for item in as_float.data]), expected, atol=1e-6)
    assert as_float.model == "tiny-bert"
    assert as_float.usage.prompt_tokens > len(TEXTS)
    # Asked explicitly for base64, the client hands the text over as it came: little-endian
    # float32 bytes (without encoding_format it asks for base64 itself and decodes it).
    as_base64 = client.embeddings.create(model="tiny-bert", input=TEXTS, encoding_format="base64")
    decoded = np.array([np.frombuffer(base64.b64decode(str(item.embedding)), "<f4") for item in as_base64.data])
    assert np.allclose(decoded, expected, atol=1e-6)


def test_one_string_without_a_model_uses_the_configured_embedding_model(server: object) -> None:
    import httpx

    base = server.base_url  # type: ignore[attr-defined]
    answer = httpx.post(f"{base}/embeddings", json={"input": "a dog ran"}, timeout=60).json()
    assert answer["model"] == "tiny-bert"
    assert len(answer["data"]) == 1
    assert len(answer["data"][0]["embedding"]) == 32


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": "tiny-bert", "input": "x", "dimensions": 8}, "gives vectors of 32 dimensions"),
        ({"model": "tiny-a", "input": "x"}, "tiny-a is a text-generation model"),
        ({"model": "tiny-bert", "input": [[1, 2, 3]]}, r"input\[0\] is a token array"),
        ({"model": "tiny-bert", "input": []}, "non-empty list of strings"),
        ({"model": "tiny-bert", "input": ["ok", ""]}, "Text 1 is empty"),
        ({"model": "tiny-bert", "input": "x", "encoding_format": "int8"}, "use 'float' or 'base64'"),
        ({"model": "tiny-bert", "input": "x", "temperature": 1}, "Unknown field 'temperature'"),
    ],
)
def test_what_the_endpoint_cannot_do_is_a_400_naming_it(
    client: openai.OpenAI, body: dict[str, object], words: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=words):
        client.post("/embeddings", body=body, cast_to=object)


def test_an_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
