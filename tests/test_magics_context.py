"""Help with your own notebook: ``%llm explain``, ``%%llm --context N`` and ``{df}``, in a real
IPython shell on real llama.cpp with a tiny model.

What each test checks is the prompt the model was sent (``NbllmMagics.last_request``, the
engine's own ``Request``), and that an answer came back through the usual output.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import ExecutionResult, InteractiveShell
from IPython.utils.capture import capture_output

from nbllm.engine import Engine
from nbllm.notebook import cell_context
from nbllm.notebook.cell_context import context_block, explain_prompt, last_error, previous_cells
from nbllm.notebook.interpolation import MAX_VALUE_CHARS, describe, interpolate
from nbllm.notebook.magics import NbllmMagics
from tests.test_magics import provenance


@pytest.fixture
def ip(shell: InteractiveShell, global_engine: Engine) -> Iterator[InteractiveShell]:
    global_engine.configure(performance={"context_size": 2048})
    cell(shell, "%load_ext nbllm")
    forget_the_last_error()
    yield shell
    cell(shell, "%unload_ext nbllm")
    shell.config.pop("NbllmMagics", None)
    forget_the_last_error()


def forget_the_last_error() -> None:
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)


def cell(ip: InteractiveShell, source: str) -> ExecutionResult:
    """Run a cell as a notebook does: numbered, and kept in the history (``In``)."""
    return ip.run_cell(source, store_history=True)


def ok(ip: InteractiveShell, source: str) -> ExecutionResult:
    result = cell(ip, source)
    result.raise_error()
    return result


def sent(ip: InteractiveShell) -> str:
    """The last user message the magic sent to the model."""
    request = ip.magics_manager.registry["NbllmMagics"].last_request
    assert request is not None, "the magic asked the model"
    assert request.messages is not None
    content: str = request.messages[-1]["content"]
    return content


def magics(ip: InteractiveShell) -> NbllmMagics:
    instance = ip.magics_manager.registry["NbllmMagics"]
    assert isinstance(instance, NbllmMagics)
    return instance


# ----------------------------------------------------------------- %llm explain


def test_explain_sends_the_error_its_traceback_and_the_cells_that_raised_it(ip: InteractiveShell) -> None:
    defining = ok(ip, "def ratio(a, b):\n    return a / b").execution_count
    failing = cell(ip, "total = 1\nshare = ratio(total, 0)")
    assert isinstance(failing.error_in_exec, ZeroDivisionError)
    with capture_output() as captured:
        ok(ip, "%llm explain -n 8 --seed 1")
    prompt = sent(ip)
    assert "The error: ZeroDivisionError: division by zero" in prompt
    assert f"In [{defining}]:\n```python\ndef ratio(a, b):\n    return a / b  # <-- the error is raised here" in prompt
    assert f"In [{failing.execution_count}]:\n```python\ntotal = 1\nshare = ratio(total, 0)  # <-- the error" in prompt
    assert f"Cell In[{failing.execution_count}], line 2" in prompt, "the traceback names cells as IPython does"
    assert "interactiveshell.py" not in prompt, "IPython's own frames are left out, as IPython does"
    assert "ipykernel" not in prompt
    assert "<ipython-input" not in prompt
    record = provenance(captured)
    assert record["parameters"]["max_tokens"] == 8, "the options of %%llm apply"
    assert record["stats"]["completion_tokens"] >= 1, "the answer streamed into the cell"


@pytest.mark.parametrize("blank", ["\n\n", "    \n\n", "\n  \n\t\n"])
def test_explain_marks_the_failing_line_of_a_cell_that_starts_with_blank_lines(
    ip: InteractiveShell, blank: str
) -> None:
    """Review of issue 18: IPython drops a cell's leading blank (or whitespace-only) lines before it
    numbers them, and the marked line must be the one that raised, not a line above it."""
    failing = cell(ip, f"{blank}x = 1\nraise ValueError('boom')\ny = 2")
    assert isinstance(failing.error_in_exec, ValueError)
    last = last_error()
    assert last is not None
    prompt = explain_prompt(ip, last)
    marked = "raise ValueError('boom')  # <-- the error is raised here"
    code = f"In [{failing.execution_count}]:\n```python\nx = 1\n{marked}\ny = 2\n```"
    assert code in prompt, prompt
    assert prompt.count("# <-- the error is raised here") == 1


def test_explain_without_an_exception_says_so_in_one_line(ip: InteractiveShell, capsys: Any) -> None:
    capsys.readouterr()
    ok(ip, "%llm explain")
    assert capsys.readouterr().out.strip() == (
        "No exception to explain yet: %llm explain explains the last error a cell raised."
    )
    assert magics(ip).last_request is None, "nothing was asked"


def test_explain_a_syntax_error_shows_the_cell_that_did_not_compile(ip: InteractiveShell) -> None:
    failing = cell(ip, "x = [1, 2\ny = 3")
    assert isinstance(failing.error_before_exec or failing.error_in_exec, SyntaxError)
    ok(ip, "%llm explain -n 4 --seed 1")
    prompt = sent(ip)
    assert "SyntaxError" in prompt
    assert f"In [{failing.execution_count}]:\n```python\nx = [1, 2" in prompt
    assert "The traceback:\n\n```\n  Cell In[" in prompt, "the message says where, without IPython's frames"


def test_explain_bounds_a_long_cell_a_long_traceback_and_a_huge_message_and_says_so(ip: InteractiveShell) -> None:
    filler = "\n".join(f"value_{i} = {i}  # a long cell of setup code" for i in range(800))
    chain = "\n".join(f"def step_{i}(n):\n    return step_{i + 1}(n)" for i in range(60))
    failing = cell(ip, f"{filler}\n{chain}\ndef step_60(n):\n    raise ValueError('bad ' + 'x' * 50_000)\nstep_0(1)")
    assert isinstance(failing.error_in_exec, ValueError)
    last = last_error()
    assert last is not None
    prompt = explain_prompt(ip, last)
    limit = cell_context.CELL_CHARS + cell_context.TRACEBACK_CHARS + 2 * 500 + 1_000
    assert len(prompt) < limit, len(prompt)
    assert "characters of the traceback left out" in prompt
    assert "characters of the message left out" in prompt
    assert "characters before left out" in prompt, "the cell is cut around the failing line"
    assert "raise ValueError('bad ' + 'x' * 50_000)  # <-- the error is raised here" in prompt
    assert "in step_60\n" in prompt, "the innermost frames are kept"


def test_explain_rejects_options_that_make_no_sense_for_it(ip: InteractiveShell) -> None:
    cell(ip, "1 / 0")
    result = cell(ip, "%llm explain --map things")
    assert isinstance(result.error_in_exec, UsageError)
    assert str(result.error_in_exec) == "%llm explain does not go with --map; it asks about the last exception."


# ----------------------------------------------------------------- %%llm --context N


def test_context_puts_the_previous_code_cells_before_the_prompt(ip: InteractiveShell) -> None:
    first = ok(ip, "prices = [3, 5, 8]").execution_count
    ok(ip, "%%llm -n 2 --seed 1\nA question in between.")
    ok(ip, "")  # empty cells are not code either
    second = ok(ip, "total = sum(prices)").execution_count
    with capture_output():
        ok(ip, "%%llm --context 2 -n 4 --seed 1\nWhat does my code compute?")
    prompt = sent(ip)
    assert prompt == (
        "The previous cells of my Jupyter notebook, oldest first:\n\n"
        f"In [{first}]:\n```python\nprices = [3, 5, 8]\n```\n\n"
        f"In [{second}]:\n```python\ntotal = sum(prices)\n```\n\n"
        "What does my code compute?"
    )


def test_context_counts_cells_back_from_the_current_one(ip: InteractiveShell) -> None:
    ok(ip, "a = 1")
    last = ok(ip, "b = 2").execution_count
    ok(ip, "%%llm --context 1 -n 2 --seed 1\nExplain.")
    assert sent(ip).startswith(f"The previous cells of my Jupyter notebook, oldest first:\n\nIn [{last}]:\n")
    assert "a = 1" not in sent(ip)
    ok(ip, "%%llm --context 0 -n 2 --seed 1\nExplain.")
    assert sent(ip) == "Explain.", "--context 0 adds nothing"


def test_context_is_bounded_newest_cells_first(ip: InteractiveShell) -> None:
    numbers = [ok(ip, f"# cell {i}\n" + "x = 1\n" * 800).execution_count for i in range(5)]
    ok(ip, "%%llm -n 1 --seed 1\nstart")  # any cell, so the current number is past the five
    cells = previous_cells(ip, 5)
    assert [c.number for c in cells] == numbers
    block = context_block(cells)
    assert len(block) <= cell_context.CONTEXT_CHARS + 100
    assert "older cells left out to keep the prompt short]" in block
    assert f"In [{numbers[-1]}]" in block, "the newest cell is kept"
    assert f"In [{numbers[0]}]:" not in block, "the oldest goes first"


def test_a_negative_context_is_a_one_line_usage_error(ip: InteractiveShell) -> None:
    result = cell(ip, "%%llm --context -1\nhi")
    assert isinstance(result.error_in_exec, UsageError)
    assert "--context -1: give the number of previous cells" in str(result.error_in_exec)


# ----------------------------------------------------------------- {df}


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "city": [f"city number {i}" for i in range(1000)],
            "population": range(1000),
            "area": [i / 7 for i in range(1000)],
        }
    )


def test_a_dataframe_is_sent_as_shape_dtypes_and_first_rows(ip: InteractiveShell, frame: pd.DataFrame) -> None:
    ip.user_ns["sales"] = frame
    ok(ip, "%%llm -n 4 --seed 1\nDescribe {sales}")
    prompt = sent(ip)
    assert prompt.startswith("Describe pandas DataFrame, 1,000 rows x 3 columns\n")
    assert f"Columns (dtype): city ({frame.dtypes['city']}), population (int64), area (float64)" in prompt
    assert "First 5 rows:\n" in prompt
    assert "city number 4" in prompt
    assert "city number 5" not in prompt, "only the head"
    assert len(prompt) < 600


def test_a_wide_dataframe_lists_the_first_columns_and_counts_the_rest() -> None:
    wide = pd.DataFrame({f"column_{i}": [i] for i in range(50)})
    text = describe(wide)
    assert "column_19 (int64), and 30 more columns" in text
    assert "column_30" not in text


def test_a_series_is_sent_as_length_dtype_and_first_values(ip: InteractiveShell) -> None:
    ip.user_ns["ages"] = pd.Series(range(10_000), name="age")
    ok(ip, "%%llm -n 2 --seed 1\nAges: {ages}")
    assert sent(ip).startswith("Ages: pandas Series 'age', 10,000 values, dtype int64\nFirst 5 values:\n0    0\n")


class Described:
    def _llm_repr_(self) -> str:
        return "a thing that describes itself"

    def __str__(self) -> str:
        return "the str that must not be used"


def test_an_object_with_llm_repr_describes_itself(ip: InteractiveShell) -> None:
    ip.user_ns["thing"] = Described()
    ok(ip, "%%llm -n 2 --seed 1\nWhat is {thing}?")
    assert sent(ip) == "What is a thing that describes itself?"


def test_llm_repr_that_returns_no_string_is_a_one_line_error(ip: InteractiveShell) -> None:
    class Broken:
        def _llm_repr_(self) -> int:
            return 42

    ip.user_ns["broken"] = Broken()
    result = cell(ip, "%%llm -n 2\n{broken}")
    assert isinstance(result.error_in_exec, UsageError)
    assert str(result.error_in_exec) == (
        "Broken._llm_repr_() returned int, not a string: make it return the text to put into the prompt."
    )


def test_a_huge_value_is_cut_with_a_note_in_the_prompt_and_on_screen(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.user_ns["huge"] = "x" * 10_000_000
    ok(ip, "%config NbllmMagics.max_interpolated_chars = 300")
    capsys.readouterr()
    ok(ip, "%%llm -n 2 --seed 1\nSummarize {huge}")
    prompt = sent(ip)
    assert prompt == "Summarize " + "x" * 300 + "\n[... 9,999,700 more characters of {huge} left out]"
    assert "{huge} is 10,000,000 characters; only the first 300 went into the prompt" in capsys.readouterr().err


def test_the_default_bound_applies_to_every_value() -> None:
    notes: list[str] = []
    text = interpolate("{v}", {"v": list(range(1_000_000))}, notes=notes)
    assert len(text) < MAX_VALUE_CHARS + 100
    assert len(notes) == 1
    assert interpolate("{v}", {"v": "y" * 50}, limit=10) == "y" * 10 + "\n[... 40 more characters of {v} left out]"
    assert interpolate("{v}", {"v": "y" * 50}, limit=0) == "y" * 50, "0: no limit"


def test_help_names_explain_context_and_dataframes(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    ok(ip, "%llm help")
    usage = capsys.readouterr().out
    assert "explain [OPTIONS] explain the last exception" in usage
    assert "--context N" in usage
    assert "A pandas DataFrame or\n    Series becomes a summary (shape, dtypes, first 5 rows)" in usage
    assert "_llm_repr_()" in usage
    assert "max_interpolated_chars" in usage
