"""Structured output (issue 14): answers that always fit a schema, on real llama.cpp.

Tiny random models are the hard case: their weights prefer nothing, so without the grammar
they would never write JSON; with it every answer must parse and validate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import jsonschema
import llama_cpp
import pytest
from pydantic import BaseModel, Field

from nbllm.core.config import Settings
from nbllm.core.errors import IncompleteAnswerError, SchemaError
from nbllm.engine import Engine


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int
    vaccinated: bool


class Owner(BaseModel):
    name: str = Field(max_length=6)
    score: float
    pets: list[Pet] = Field(max_length=2)
    nickname: str | None = Field(default=None, max_length=4)


SHORT = {"max_tokens": 400, "top_k": 40}


@pytest.fixture
def engine(settings: Settings) -> Engine:
    return Engine(settings.merged({"performance": {"context_size": 1024, "parallel": 4, "parallel_context_size": 512}}))


def test_nested_objects_arrays_enums_optionals_and_numbers_always_validate(engine: Engine) -> None:
    schema = Owner.model_json_schema()
    for seed in range(4):
        result = engine.generate("Describe the owner:", schema=Owner, seed=seed, temperature=1.0, **SHORT)
        assert isinstance(result.data, Owner), result.text
        jsonschema.validate(json.loads(result.text), schema)
        assert result.stats.schema == "Owner"
        assert result.stats.finish_reason == "stop"


def test_batched_sequences_each_keep_their_own_grammar_state(engine: Engine) -> None:
    prompts = [f"owner number {i}" for i in range(6)]
    results = engine.generate_many(prompts, schema=Owner, seed=3, temperature=1.0, progress=False, **SHORT)
    assert all(r.ok for r in results), [str(r.error) for r in results]
    for result in results:
        assert isinstance(result.data, Owner)
        jsonschema.validate(json.loads(result.text), Owner.model_json_schema())


def test_choices_give_exactly_one_of_them_single_and_batched(engine: Engine) -> None:
    choices = ["positive", "negative", "neutral"]
    single = engine.chat("How does this sound: great!", model="tiny-chat", choices=choices, seed=1)
    assert single.data in choices
    assert single.text == single.data
    many = engine.chat_many(["one", "two", "three", "four"], choices=choices, seed=2, progress=False)
    assert all(r.ok for r in many)
    assert all(r.data in choices and r.text == r.data for r in many)


def test_python_types_and_dict_schemas(engine: Engine) -> None:
    words = engine.generate("Words:", schema=list[Literal["a", "b"]], seed=4, **SHORT)
    assert isinstance(words.data, list)
    assert set(words.data) <= {"a", "b"}
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}, "tags": {"type": "array",
                       "items": {"enum": ["x", "y"]}, "maxItems": 3}},
        "required": ["ok", "n", "tags"],
    }  # fmt: skip
    result = engine.generate("Data:", schema=schema, seed=5, **SHORT)
    jsonschema.validate(result.data, schema)
    assert list(result.data) == ["ok", "n", "tags"], "properties come in the schema's order"


class Place(BaseModel):
    city: str = Field(max_length=12)
    unit: Literal["C", "F"]


class Call(BaseModel):
    """A tool call's shape: few tokens fit at each key and name (the trie's case, token_trie.py)."""

    name: Literal["get_weather", "get_forecast"]
    arguments: Place


@pytest.mark.parametrize(
    ("model", "schema", "prompt"),
    [
        ("tiny", Owner, "The owner"),
        ("default", Call, 'Call a tool, as JSON: {"name": "get_weather", "arguments": ...}\n'),
    ],
)
def test_greedy_answers_are_the_same_as_with_the_grammar_first(
    request: pytest.FixtureRequest, tiny_models: dict[str, Path], model: str, schema: type[BaseModel], prompt: str
) -> None:
    """Sampling first and asking the grammar only about the sampled token (what makes it fast),
    and finding small allowed sets in the vocabulary's trie, must not change greedy answers:
    compared with llama-cpp-python's grammar-at-the-head chain, on a random model and on the
    default model's real vocabulary."""
    from nbllm.backends.llama_cpp_grammar import grammar_text
    from nbllm.core.schema import make_constraint

    constraint = make_constraint(schema)
    assert constraint is not None
    if model == "tiny":
        engine, path = request.getfixturevalue("engine"), tiny_models["a"]
    else:
        engine, path = request.getfixturevalue("default_engine"), request.getfixturevalue("default_model_path")
    ours = engine.generate(
        prompt, schema=schema, temperature=0, repeat_penalty=1.0, max_tokens=300, seed=1, speculation="off"
    )
    llm = llama_cpp.Llama(str(path), n_ctx=1024, verbose=False)
    try:
        grammar = llama_cpp.LlamaGrammar.from_string(grammar_text(constraint), verbose=False)
        tokens = llm.tokenize(prompt.encode())
        out = []
        for token in llm.generate(tokens, temp=0.0, top_k=40, repeat_penalty=1.0, grammar=grammar):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(out) >= 300:
                break
            out.append(token)
        theirs = llm.detokenize(out).decode("utf-8", errors="replace")
    finally:
        llm.close()
    assert ours.text == theirs.strip()
    assert isinstance(ours.data, schema)


def test_an_answer_cut_off_by_max_tokens_keeps_its_text_and_says_what_to_do(engine: Engine) -> None:
    with pytest.raises(IncompleteAnswerError, match="max_tokens") as caught:
        engine.generate("Owner:", schema=Owner, max_tokens=3, seed=1)
    assert caught.value.text.startswith("{")
    many = engine.generate_many(["a", "b", "c"], schema=Owner, per_item=[{"max_tokens": 3}, {}, {}], seed=2,
                                progress=False, max_tokens=400)  # fmt: skip
    assert isinstance(many[0].error, IncompleteAnswerError)
    assert many[0].text.startswith("{")
    assert many[1].ok
    assert many[2].ok


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "object", "patternProperties": {"^x": {}}}, ["'patternProperties'", "#/patternProperties"]),
        ({"properties": {"mail": {"type": "string", "format": "email"}}}, ["email", "#/properties/mail"]),
        ({"properties": {"n": {"type": "integer", "minimum": 0}}}, ["'minimum'", "#/properties/n/minimum"]),
        ({"$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}},
          "$ref": "#/$defs/Node"}, ["recursive", "Node -> Node"]),
        ({"enum": list(range(5000))}, ["5,000 values"]),
        ({"$ref": "https://example.com/schema.json"}, ["nothing is fetched"]),
        ({"type": "strnig"}, ["'strnig'"]),
    ],
)  # fmt: skip
def test_schemas_the_grammar_cannot_honour_are_refused_before_any_model_work(
    engine: Engine, schema: dict[str, object], words: list[str]
) -> None:
    with pytest.raises(SchemaError) as caught:
        engine.generate("x", schema=schema)
    for word in words:
        assert word in str(caught.value)
    assert engine.registry.resident() == [], "refused before the model was even loaded"


class NotASchema:
    pass


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"choices": []}, "choices is empty"),
        ({"choices": ["yes", ""]}, "non-empty string"),
        ({"choices": ["a"], "schema": "json"}, "not both"),
        ({"schema": NotASchema()}, "is not a schema"),
        ({"schema": 42}, "is not a schema"),
        ({"schema": "a schema please"}, "must be 'json'"),
    ],
)
def test_bad_choices_and_things_that_are_not_schemas_are_clear_errors(
    engine: Engine, options: dict[str, object], words: str
) -> None:
    with pytest.raises(SchemaError, match=words):
        engine.generate("x", **options)


def test_the_prompt_cache_keys_on_the_schema(cached_engine: Engine) -> None:
    first = cached_engine.generate("Owner:", schema=Owner, seed=1, **SHORT)
    again = cached_engine.generate("Owner:", schema=Owner, seed=1, **SHORT)
    other = cached_engine.generate("Owner:", schema=Pet, seed=1, **SHORT)
    assert again.stats.cached
    assert again.data == first.data
    assert again.stats.schema == "Owner"
    assert not other.stats.cached
    assert isinstance(other.data, Pet)


@pytest.mark.default_model
def test_the_default_model_fills_a_schema_and_classifies(default_engine: Engine) -> None:
    result = default_engine.chat("Invent a pet owner with one cat.", schema=Owner, max_tokens=200, seed=3)
    assert isinstance(result.data, Owner)
    label = default_engine.chat("Is 'I love this film' positive or negative?", choices=["positive", "negative"], seed=1)
    assert label.data in ("positive", "negative")
    many = default_engine.chat_many(["Invent an owner.", "Invent another owner."], schema=Owner, max_tokens=200,
                                    seed=4, progress=False)  # fmt: skip
    assert all(isinstance(r.data, Owner) for r in many), [str(r.error) for r in many]
    free_json = default_engine.chat("Describe a cat as a JSON object.", schema="json", max_tokens=300, seed=2)
    assert isinstance(free_json.data, dict)
    assert free_json.text.lstrip().startswith("{")


def test_choices_with_quotes_backslashes_control_characters_and_unicode(engine: Engine) -> None:
    choices = ['say "hi"', "back\\slash", "two\nlines", "ünïcode ✓", "bell\x07"]
    for seed in range(3):
        result = engine.generate("Pick:", choices=choices, seed=seed, temperature=1.0)
        assert result.data in choices
