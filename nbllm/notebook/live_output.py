"""A ``%%llm`` answer on screen: streamed into one output, then rendered in its format with a stats line.

Also what the output records about itself (``provenance``, in its metadata) and how an
interrupted answer ends its cell (``AnswerInterrupted``).
"""

from __future__ import annotations

import html
import json
import re
import sys
import time
import uuid
from typing import Any

from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell

from nbllm._version import __version__
from nbllm.core.errors import NbllmError
from nbllm.core.metrics import RequestStats
from nbllm.engine import Stream
from nbllm.notebook.answer_markdown import as_code_block, code_blocks, hard_line_breaks, open_fence, with_note
from nbllm.notebook.display import display


class AnswerInterrupted(KeyboardInterrupt):
    """Raised at the end of a ``%%llm`` cell that was interrupted, once its partial output is
    shown: the cell must still count as interrupted, so that a notebook's Run All stops there
    (a cell that returns normally lets the queued cells run). IPython shows the one line from
    ``_render_traceback_`` instead of a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The first fenced code block of ``text`` (an unclosed one runs to the end), else all of it."""
    match = _FENCE.search(text)
    code = match.group(1) if match else text
    return code.strip("\n")


def render_answer(text: str, fmt: str, truncation: str | None = None) -> tuple[dict[str, Any], str | None]:
    """The answer as a MIME bundle in ``fmt``, and a note when it could not be rendered so.

    ``truncation`` (``RequestStats.truncation_note()`` of an answer cut at ``max_tokens``) ends
    the answer in every form, so that a cut-off answer never passes for a whole one. Markdown
    gets its single newlines kept (``answer_markdown``); ``text/plain`` is the model's text.
    """
    plain = text if truncation is None else f"{text.rstrip()}\n\n{truncation}"
    if fmt in ("markdown", "code"):
        markdown = _markdown_of(text, fmt)
        if truncation is not None:
            markdown = with_note(markdown, truncation)
        return {"text/markdown": markdown, "text/plain": plain}, None
    if fmt == "html":
        mark = f"<p><em>{html.escape(truncation)}</em></p>" if truncation is not None else ""
        return {"text/html": text + mark, "text/plain": plain}, None
    if fmt == "json":
        try:
            value = json.loads(extract_code(text) if "```" in text else text)
        except ValueError as error:
            return {"text/plain": plain}, f"not valid JSON ({error}), shown as text"
        dumped = json.dumps(value, indent=2, ensure_ascii=False)
        # A JSON view has no room for a note: the stats line carries it.
        return {"application/json": value, "text/plain": dumped}, truncation
    return {"text/plain": plain}, None


def answer_code(text: str, fmt: str, truncation: str | None) -> list[str]:
    """The code blocks of an answer, for its Copy / Insert buttons; with --format code an answer
    without a fence is all code. A block the answer was cut off in ends with a comment saying so,
    so that an inserted cell never passes for complete code."""
    blocks = code_blocks(text)
    if not blocks and fmt == "code" and text.strip():
        blocks = [text.strip("\n")]
    cut_inside_code = open_fence(text) is not None or (fmt == "code" and not code_blocks(text))
    if blocks and truncation is not None and cut_inside_code:
        blocks[-1] = f"{blocks[-1]}\n# {truncation}"
    return blocks


def _markdown_of(text: str, fmt: str) -> str:
    """Markdown whose lines stay lines; with --format code, an answer without a fenced block is
    code all the same, so it is shown as one (as Markdown it would reflow into a paragraph)."""
    return hard_line_breaks(as_code_block(text) if fmt == "code" else text)


def _live_bundle(text: str, fmt: str) -> dict[str, Any]:
    # Half an HTML or JSON document renders badly; Markdown degrades gracefully while it grows.
    if fmt in ("markdown", "code"):
        return {"text/markdown": _markdown_of(text, fmt), "text/plain": text}
    return {"text/plain": text}


def _status_bundle(line: str) -> dict[str, Any]:
    return {
        "text/html": f'<div style="color: #888; font-size: 0.85em;">{html.escape(line)}</div>',
        "text/plain": line,
    }


def stats_line(stats: RequestStats | None, stopped: bool, note: str | None = None) -> str:
    """``Generated 256 tokens in 12.5s (20.5 t/s) · model X · ...``, marked when it was stopped."""
    line = "Stopped before the first token" if stats is None else stats.details()
    if stopped and stats is not None:
        line = f"[stopped] {line}"
    return f"{line} · {note}" if note else line


def provenance(stream: Stream, fmt: str, stopped: bool) -> dict[str, Any]:
    """What produced this output, kept in its metadata: enough to reproduce or audit it."""
    stats = stream.stats
    request = stream.request
    parameters = request.params.as_dict()
    if stats is not None:
        parameters["seed"] = stats.seed  # the one actually used, drawn when none was given
    return {
        "version": __version__,
        "model": stats.model if stats is not None else request.model,
        "model_sha256": stats.model_hash if stats is not None else None,
        "mode": "completion" if request.prompt is not None else "chat",
        "parameters": parameters,
        "stats": stats.as_dict() if stats is not None else None,
        "cached": bool(stats is not None and stats.cached),
        "stopped": stopped,
        "truncated": bool(stats is not None and stats.truncated),
        "format": fmt,
    }


class LiveOutput:
    """The cell's output while an answer streams: redrawn at most ``rate`` times a second.

    Each redraw sends the whole text so far, so the rate bounds the cost of long answers.
    A plain terminal shell cannot redraw an output: there the pieces are printed as they come.
    """

    def __init__(self, shell: InteractiveShell, fmt: str, rate: float, show_stats: bool) -> None:
        self.fmt = fmt
        self.interval = 1.0 / rate if rate > 0 else None  # None: no redraws, only the final answer
        self.show_stats = show_stats
        self.redraws = type(shell.display_pub) is not DisplayPublisher
        self.answer_id = uuid.uuid4().hex
        self.status_id = uuid.uuid4().hex
        self._last = float("-inf")
        self._printed = 0

    def start(self) -> None:
        if self.redraws:
            display({"text/plain": ""}, raw=True, display_id=self.answer_id)
            self._show_status("Waiting for the first token…", update=False)

    def refresh(self, stream: Stream) -> None:
        if not self.redraws:
            self._print_new_pieces(stream)
            return
        now = time.monotonic()
        if self.interval is None or now - self._last < self.interval:
            return
        self._last = now
        display(_live_bundle(stream.text, self.fmt), raw=True, display_id=self.answer_id, update=True)
        elapsed = time.perf_counter() - (stream.started or time.perf_counter())
        tokens = stream.tokens
        self._show_status(f"Generating… {tokens} token{'' if tokens == 1 else 's'}, {elapsed:.1f}s")

    def finish(
        self, stream: Stream, bundle: dict[str, Any], metadata: dict[str, Any], status: str, note: str | None = None
    ) -> None:
        """The answer in its format, then the stats line ``status``. ``note`` (``render_answer``'s:
        the mark of a cut-off JSON answer, or why it is shown as text) is part of ``status``;
        without a stats line it is shown on its own: a cut-off answer must never pass for a whole one."""
        if not self.redraws:
            self._print_new_pieces(stream)
            print()
            truncation = stream.stats.truncation_note() if stream.stats is not None else None
            if truncation is not None:  # a terminal shows the pieces, not the bundle: the mark too
                print(truncation)
            if self.show_stats:
                print(status)
            elif note is not None and note != truncation:
                print(note)
            return
        display(bundle, raw=True, display_id=self.answer_id, update=True, metadata=metadata)
        if self.show_stats:
            self._show_status(status)
        elif note is not None:
            display(_status_bundle(note), raw=True)

    def fail(self, message: str) -> None:
        if self.redraws:
            self._show_status(message)

    def _show_status(self, line: str, update: bool = True) -> None:
        if self.show_stats:
            display(_status_bundle(line), raw=True, display_id=self.status_id, update=update)

    def _print_new_pieces(self, stream: Stream) -> None:
        new = stream.pieces[self._printed :]
        self._printed += len(new)
        sys.stdout.write("".join(new))
        sys.stdout.flush()


def consume(stream: Stream, live: LiveOutput) -> bool:
    """Show the stream as it grows; True when the user interrupted it (Ctrl-C, kernel interrupt)."""
    live.start()
    try:
        for _ in stream:
            live.refresh(stream)
    except KeyboardInterrupt:
        # The engine has stopped at the current token, freed the model and cached nothing;
        # what was produced is worth keeping on screen.
        return True
    except NbllmError as error:
        live.fail(f"Failed: {error}")
        raise
    finally:
        stream.close()
    return False
