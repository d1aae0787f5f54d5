"""The notebook itself as part of a prompt: ``%llm explain`` (the last exception with the code of
the cells that raised it) and ``%%llm --context N`` (the previous cells' source).

Both read IPython's own records: the input history (``In``), the compiler's map from a cell's
file name to its execution number (the names in a traceback's frames), and the last exception
shown (``sys.last_type`` / ``last_value`` / ``last_traceback``, which ``showtraceback`` sets).
Every part is bounded in characters, and what was cut says so in the prompt, so a long cell or
a deep recursion never fills the model's context by surprise.
"""

from __future__ import annotations

import linecache
import re
import sys
import traceback
from dataclasses import dataclass
from types import TracebackType

from IPython.core.inputtransformer2 import leading_empty_lines
from IPython.core.interactiveshell import InteractiveShell

# About 1,000 tokens of code per cell and 2,500 for a whole context: room for the question and
# the answer in a 4,096-token window, which the smallest default models have.
CELL_CHARS = 4_000
CONTEXT_CHARS = 10_000
TRACEBACK_CHARS = 3_000
_LLM_MAGIC = re.compile(r"^\s*%%?llm\b")


@dataclass(frozen=True)
class Cell:
    number: int  # execution count, as in In[number]
    source: str


def current_number(shell: InteractiveShell) -> int:
    """The execution number of the cell running now (IPython counts it before running it)."""
    return int(shell.execution_count) - 1


def cell_source(shell: InteractiveShell, number: int) -> str | None:
    """The source of In[number] as the user typed it, if the history has it."""
    raw: list[str] = shell.history_manager.input_hist_raw if shell.history_manager else []
    if 0 < number < len(raw):
        return raw[number]
    return None


def previous_cells(shell: InteractiveShell, count: int) -> list[Cell]:
    """The ``count`` code cells run before this one, oldest first.

    Skipped: empty cells and the ``%%llm`` / ``%llm`` cells themselves — they are questions to the
    model, not the notebook's code, and their answers are already in the conversation if --chat
    is used. ``count`` counts the cells kept.
    """
    cells: list[Cell] = []
    number = current_number(shell) - 1
    while number > 0 and len(cells) < count:
        source = cell_source(shell, number)
        if source and source.strip() and not _LLM_MAGIC.match(source):
            cells.append(Cell(number, source.strip("\n")))
        number -= 1
    return cells[::-1]


def _cut(text: str, limit: int, what: str) -> str:
    """``text`` kept to ``limit`` characters: its start and its end, with a note of what was left out."""
    if len(text) <= limit:
        return text
    head = limit // 3
    tail = limit - head
    left_out = len(text) - head - tail
    return f"{text[:head]}\n[... {left_out:,} characters of {what} left out ...]\n{text[-tail:]}"


def context_block(cells: list[Cell], limit: int = CONTEXT_CHARS) -> str:
    """The cells as the prompt shows them; past ``limit`` the oldest are dropped, and said so."""
    parts: list[str] = []
    used = 0
    for cell in reversed(cells):  # the newest matter most: they are kept first
        part = f"In [{cell.number}]:\n```python\n{_cut(cell.source, CELL_CHARS, 'this cell')}\n```"
        if parts and used + len(part) > limit:
            dropped = cells.index(cell) + 1
            parts.append(f"[{dropped} older cell{'s' if dropped > 1 else ''} left out to keep the prompt short]")
            break
        parts.append(part)
        used += len(part)
    return "\n\n".join(reversed(parts))


def with_context(prompt: str, cells: list[Cell]) -> str:
    """``prompt`` after the notebook's previous cells."""
    if not cells:
        return prompt
    return f"The previous cells of my Jupyter notebook, oldest first:\n\n{context_block(cells)}\n\n{prompt}"


# ----------------------------------------------------------------- %llm explain


@dataclass(frozen=True)
class LastError:
    kind: type[BaseException]
    error: BaseException
    trace: TracebackType | None


def last_error() -> LastError | None:
    """The last exception IPython showed, if any."""
    kind = getattr(sys, "last_type", None)
    error = getattr(sys, "last_value", None)
    if kind is None or error is None:
        return None
    return LastError(kind, error, getattr(sys, "last_traceback", None))


def _cell_number(shell: InteractiveShell, filename: str) -> int | None:
    """The execution number of the cell compiled under ``filename`` (None: not a notebook cell)."""
    names: dict[str, int] = getattr(shell.compile, "_filename_map", {})
    return names.get(filename)


def _cells_in(shell: InteractiveShell, last: LastError) -> list[tuple[int, int | None]]:
    """(cell number, failing line) for each notebook cell in the traceback, outermost first."""
    found: dict[int, int | None] = {}
    for frame, line in traceback.walk_tb(last.trace):
        number = _cell_number(shell, frame.f_code.co_filename)
        if number is not None:
            found[number] = line
    if isinstance(last.error, SyntaxError) and last.error.filename:  # raised compiling a cell: no frame of it
        number = _cell_number(shell, last.error.filename)
        if number is not None:
            found[number] = last.error.lineno
    return list(found.items())


def _from_first_cell(shell: InteractiveShell, trace: TracebackType | None) -> TracebackType | None:
    """The traceback from the first notebook cell on: IPython's own frames above it (``run_code``)
    are noise to the reader and to the model, and IPython hides them too."""
    start = trace
    while start is not None and _cell_number(shell, start.tb_frame.f_code.co_filename) is None:
        start = start.tb_next
    return start or trace


def _readable_traceback(shell: InteractiveShell, last: LastError) -> str:
    """The traceback as Python prints it, a cell's file name shown as ``Cell In[5]``."""
    trace = _from_first_cell(shell, last.trace)
    if isinstance(last.error, SyntaxError) and trace is last.trace:
        trace = None  # raised compiling the cell: the frames are IPython's, the message says where
    report = traceback.TracebackException(last.kind, last.error, trace)
    text = "".join(report.format())
    message = "".join(report.format_exception_only())
    if text.endswith(message):  # the message bounded on its own: a huge one must not push the frames out
        text = _cut(text[: -len(message)], TRACEBACK_CHARS, "the traceback") + _cut(message, 500, "the message")
    else:
        text = _cut(text, TRACEBACK_CHARS, "the traceback")

    def name(match: re.Match[str]) -> str:
        number = _cell_number(shell, match.group(1))
        return f"Cell In[{number}]" if number is not None else match.group(0)

    return re.sub(r'File "([^"]+)"', name, text)


def _as_numbered(source: str) -> str:
    """The cell as IPython numbered its lines: it drops leading blank and whitespace-only lines
    before compiling, so a traceback's line 1 is the first line with code on it."""
    lines: list[str] = leading_empty_lines(source.splitlines(keepends=True))  # type: ignore[no-untyped-call]
    return "".join(lines).rstrip("\n")


def _marked_source(source: str, line: int | None) -> str:
    """The cell with its failing line marked; a long cell is cut around that line."""
    lines = source.split("\n")
    if line is not None and 0 < line <= len(lines):
        lines[line - 1] += "  # <-- the error is raised here"
    text = "\n".join(lines)
    if len(text) <= CELL_CHARS or line is None:
        return _cut(text, CELL_CHARS, "this cell")
    # Keep the lines around the failing one: that is where the cause usually is.
    before = "\n".join(lines[: line - 1])
    after = "\n".join(lines[line - 1 :])
    keep_before = before[-(CELL_CHARS // 2) :]
    keep_after = after[: CELL_CHARS - len(keep_before)]
    return (
        f"[... {len(before) - len(keep_before):,} characters before left out ...]\n{keep_before}\n"
        f"{keep_after}\n[... {len(after) - len(keep_after):,} characters after left out ...]"
    )


def explain_prompt(shell: InteractiveShell, last: LastError) -> str:
    """The question ``%llm explain`` asks: the cells that raised the error, and its traceback."""
    cells = _cells_in(shell, last)
    if not cells:  # raised outside any cell's code (a magic, a widget): the last cell that failed
        result = shell.last_execution_result
        if result is not None and result.info.raw_cell and not result.success:
            cells = [(int(result.execution_count or 0), None)]
    shown: list[str] = []
    for number, line in cells[-3:]:  # the innermost three: deep tracebacks repeat one cell
        source = cell_source(shell, number) or "".join(linecache.getlines(_filename_of(shell, number)))
        if source.strip():
            shown.append(f"In [{number}]:\n```python\n{_marked_source(_as_numbered(source), line)}\n```")
    code = "\n\n".join(shown) if shown else "(the cell's code is not in this kernel's history)"
    message = f"{last.kind.__name__}: {last.error}".strip()
    return (
        "A cell of my Jupyter notebook raised an exception. Explain briefly what went wrong and how to "
        f"fix it, with the corrected code.\n\nThe code:\n\n{code}\n\nThe traceback:\n\n```\n"
        f"{_readable_traceback(shell, last)}```\n\nThe error: {_cut(message, 500, 'the message')}"
    )


def _filename_of(shell: InteractiveShell, number: int) -> str:
    names: dict[str, int] = getattr(shell.compile, "_filename_map", {})
    return next((name for name, n in names.items() if n == number), "")
