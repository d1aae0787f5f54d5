"""``%%llm --schema / --choices / --format json`` and ``--map --schema`` in a real IPython shell."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from pydantic import BaseModel, Field

from nbllm.engine import Engine
from tests.test_magics import run


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    age: int
    vaccinated: bool


class Tag(BaseModel):
    word: str = Field(max_length=5)


@pytest.fixture
def ip(shell: InteractiveShell, global_engine: Engine) -> Iterator[InteractiveShell]:
    global_engine.configure(performance={"context_size": 1024})
    run(shell, "%load_ext nbllm")
    shell.user_ns.update(Pet=Pet, Tag=Tag)
    yield shell
    run(shell, "%unload_ext nbllm")


def test_schema_answers_are_data_shown_as_json_and_kept_by_out(ip: InteractiveShell) -> None:
    with capture_output() as captured:
        run(ip, "%%llm --raw --schema Pet --out pet -n 300 --seed 1\nA pet:")
    pet = ip.user_ns["pet"]
    assert isinstance(pet, Pet)
    shown = [o.data for o in captured.outputs if "application/json" in o.data]
    assert shown, "rendered as JSON"
    assert shown[-1]["application/json"] == json.loads(pet.model_dump_json())
    metadata = [o.metadata for o in captured.outputs if o.metadata.get("nbllm")][-1]["nbllm"]
    assert metadata["parameters"]["constraint"]["name"] == "Pet", "provenance names the schema"


def test_choices_and_json_mode(ip: InteractiveShell) -> None:
    with capture_output():
        run(ip, "%%llm --raw --choices yes,no,maybe --out answer --seed 2\nIs it?")
    assert ip.user_ns["answer"] in ("yes", "no", "maybe")
    ip.user_ns["schema"] = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    with capture_output():
        run(ip, "%%llm --raw --schema schema --out value -n 100 --seed 3\nData:")
    assert isinstance(ip.user_ns["value"]["ok"], bool)


def test_map_with_a_schema_adds_one_typed_column_per_field(ip: InteractiveShell) -> None:
    import pandas as pd

    ip.user_ns["owners"] = pd.DataFrame({"owner": ["ada", "alan", "grace"], "age": [36, 41, 85]}, index=[7, 8, 9])
    with capture_output() as captured:
        run(ip, "%%llm --map owners --raw --schema Pet -n 300 --seed 4\n{row.owner}'s pet:")
    frame = ip.user_ns["owners"]
    assert list(frame.index) == [7, 8, 9]
    assert list(frame.columns) == ["owner", "age", "kind", "answer_age", "vaccinated"], "a clash gets a prefix"
    assert str(frame["answer_age"].dtype) == "Int64"
    assert str(frame["vaccinated"].dtype) == "boolean"
    assert set(frame["kind"]) <= {"cat", "dog"}
    assert "Answered 3 of 3" in captured.outputs[-1].data["text/plain"]
    ip.user_ns["names"] = ["a", "b"]
    with capture_output():
        run(ip, "%%llm --map names --raw --schema Tag -n 60 --seed 5 --out tags\nTag for {item}:")
    assert list(ip.user_ns["tags"].columns) == ["word"], "a list gives a DataFrame"


def test_a_row_cut_off_by_max_tokens_gets_the_error_and_the_others_complete(ip: InteractiveShell) -> None:
    import pandas as pd

    ip.user_ns["few"] = pd.Series(["x", "y"])
    with capture_output() as captured:
        run(ip, "%%llm --map few --raw --schema Pet -n 3 --seed 6 --out pets\n{item}")
    pets = ip.user_ns["pets"]
    assert pets["age"].isna().all()
    assert "max_tokens" in captured.outputs[-1].data["text/plain"]


def test_bad_schemas_are_one_line_errors_and_the_kernel_goes_on(ip: InteractiveShell) -> None:
    for line, words in [
        ("--schema Pett", "Did you mean 'Pet'?"),
        ("--schema Pet --choices a,b", "do not go together"),
        ("--choices ,", "non-empty string"),
        ("-n 3 --schema Pet", "Raise max_tokens"),
    ]:
        result = ip.run_cell(f"%%llm --raw {line}\nA pet:")
        assert result.error_in_exec is not None
        assert words in str(result.error_in_exec)
        assert "\n" not in str(result.error_in_exec).strip()
    with capture_output():
        run(ip, "%%llm --raw -n 2 --seed 1\nstill alive")


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_tools_and_run_tools_in_a_cell(ip: InteractiveShell) -> None:
    ip.user_ns["add"] = add
    with capture_output():
        run(ip, "%%llm --tools add -n 400 --seed 1\nAdd 2 and 3.")
    with capture_output() as captured:
        result = ip.run_cell("%%llm --tools add --run-tools -n 400 --seed 1 --out exchange\nAdd 2 and 3.")
    if result.error_in_exec is None:  # the model answered in text after its calls
        exchange = ip.user_ns["exchange"]
        assert exchange.steps >= 1
        shown = "\n".join(o.data.get("text/plain", "") for o in captured.outputs)
        assert all(run_.call.name in shown for run_ in exchange.tool_runs)
    else:  # a random tiny model may call until max_steps: one line that says so
        assert "max_steps" in str(result.error_in_exec)
    for line, words in [
        ("--run-tools", "needs --tools"),
        ("--tools ad", "Did you mean 'add'?"),
        ("--raw --tools add", "use chat"),
    ]:
        failed = ip.run_cell(f"%%llm {line}\nx")
        assert words in str(failed.error_in_exec)
