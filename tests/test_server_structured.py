"""``response_format`` on ``nbllm serve`` (issue 14), driven by real clients: the official
``openai`` client's ``parse`` (pydantic in, pydantic out), JSON mode, streaming, and instructor;
and the remote backend passing schemas on to servers that take them."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install 'nbllm[server]'")

from nbllm.core.config import Settings
from nbllm.engine import Engine
from nbllm.server.running import ServerHandle

TIMEOUT = 60.0


class City(BaseModel):
    name: str = Field(max_length=8)
    country: Literal["FR", "JP", "PE"]
    population: int
    rivers: list[Literal["Seine", "Rimac", "Sumida"]] = Field(max_length=2)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.merged({"performance": {"context_size": 1024}})


MESSAGES = [{"role": "user", "content": "Name a city."}]


def test_the_openai_clients_parse_returns_a_pydantic_object(client: openai.OpenAI) -> None:
    for seed in range(3):
        completion = client.chat.completions.parse(
            model="tiny-chat",
            messages=MESSAGES,
            response_format=City,
            max_tokens=300,
            seed=seed,  # type: ignore[arg-type]
        )
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, City), completion.choices[0].message.content
        assert completion.choices[0].finish_reason == "stop"


def test_json_schema_streams_and_json_object_mode_on_completions(client: openai.OpenAI, server: ServerHandle) -> None:
    stream = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=300, seed=4, stream=True,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "City", "schema": City.model_json_schema()}},
    )  # fmt: skip
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 3, "streamed piece by piece"
    City.model_validate_json("".join(pieces))
    # llama-cpp-python's and LM Studio's form: json_object with a schema, on /v1/completions.
    answer = httpx.post(
        server.base_url + "/completions",
        json={"model": "tiny-a", "prompt": "City:", "max_tokens": 300, "seed": 5,
              "response_format": {"type": "json_object", "schema": City.model_json_schema()}},
        timeout=TIMEOUT,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    City.model_validate_json(answer.json()["choices"][0]["text"])


def test_a_cut_off_answer_says_length_as_openai_does(client: openai.OpenAI) -> None:
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(
            model="tiny-chat",
            messages=MESSAGES,
            response_format=City,
            max_tokens=4,
            seed=1,  # type: ignore[arg-type]
        )


def test_instructor_gets_a_typed_result(server: ServerHandle) -> None:
    instructor = pytest.importorskip("instructor")
    client = instructor.from_openai(
        openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=TIMEOUT),
        mode=instructor.Mode.JSON_SCHEMA,
    )
    city = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, response_model=City, max_tokens=300, seed=2, max_retries=0
    )
    assert isinstance(city, City)


def test_the_remote_backend_passes_schemas_on(settings: Settings, server: ServerHandle) -> None:
    """nbllm as a client of a server that takes OpenAI's json_schema (here nbllm serve itself)."""
    engine = Engine(settings.merged({"remote_models": {"far": {"url": server.base_url, "model": "tiny-chat"}}}))
    try:
        result = engine.chat("Name a city.", model="far", schema=City, max_tokens=300, seed=3)
        assert isinstance(result.data, City)
        label = engine.chat("Pick.", model="far", choices=["red", "green"], seed=3)
        assert label.data in ("red", "green")
    finally:
        engine.close()


@pytest.mark.default_model
def test_json_mode_answers_are_json_objects(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Describe a cat as JSON."}], max_tokens=300,
        seed=2, response_format={"type": "json_object"},
    )  # fmt: skip
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)
