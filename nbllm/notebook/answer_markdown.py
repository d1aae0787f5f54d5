"""A model's answer made ready for a Markdown renderer (JupyterLab's ``text/markdown``).

Answers are not CommonMark documents. In CommonMark a single newline is a soft break, so the
lines of a poem, or a numbered list that follows a sentence ("Here they are:\\n1. cat\\n2. dog",
which the renderer may read as one paragraph), run together on screen. ``hard_line_breaks``
makes every single newline outside a code block a hard break (two trailing spaces), which every
CommonMark renderer honours. Code blocks, blank lines and tables are left exactly as written.

Only the rendered Markdown changes: ``text/plain`` and ``--out`` keep the model's text.
"""

from __future__ import annotations

import re

# A fence opens with 3+ backticks or tildes, indented any amount (models indent them in lists);
# it closes with the same character, at least as many, and nothing else on the line.
_FENCE_OPEN = re.compile(r"^\s*(`{3,}|~{3,})")
_HARD_BREAK = "  "


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def open_fence(text: str) -> str | None:
    """The fence of a code block ``text`` leaves open at its end (a cut-off answer), else None."""
    fence: str | None = None
    for line in text.split("\n"):
        if fence is not None:
            if _closes(line, fence):
                fence = None
        elif match := _FENCE_OPEN.match(line):
            fence = match.group(1)
    return fence


def _keeps_its_newline(line: str, following: str | None) -> bool:
    """A line whose newline needs no hard break: a paragraph ends there anyway, it already
    breaks, or it belongs to a table (a GFM table row with trailing spaces is risky to alter)."""
    if following is None or not line.strip() or not following.strip():
        return True
    if line.endswith(("  ", "\\")):
        return True
    return "|" in line or "|" in following


def hard_line_breaks(text: str) -> str:
    """``text`` with each single newline outside code blocks turned into a Markdown hard break."""
    lines = text.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    fence: str | None = None
    for index, line in enumerate(lines):
        if fence is not None:  # inside a code block: every character as the model wrote it
            out.append(line)
            if _closes(line, fence):
                fence = None
            continue
        if match := _FENCE_OPEN.match(line):
            fence = match.group(1)
            out.append(line)
            continue
        following = lines[index + 1] if index + 1 < len(lines) else None
        out.append(line if _keeps_its_newline(line, following) else line + _HARD_BREAK)
    return "\n".join(out)


def as_code_block(text: str) -> str:
    """``text`` shown as code: already fenced, as it is; else inside a fence longer than any run
    of backticks it contains, so nothing in it can close the block early."""
    if any(_FENCE_OPEN.match(line) for line in text.split("\n")):
        return text
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text.strip(chr(10))}\n{fence}"


def with_note(markdown: str, note: str) -> str:
    """``markdown`` followed by ``note`` as its own italic paragraph, outside any code block the
    (cut-off) answer left open, so the note never reads as part of the code."""
    fence = open_fence(markdown)
    closing = f"\n{fence}" if fence is not None else ""
    return f"{markdown}{closing}\n\n*{note}*"


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of ``text``, in order, each without its fences and without the
    indentation of its opening fence (a block inside a list item); an unclosed one runs to the end."""
    blocks: list[str] = []
    fence: str | None = None
    indent = 0
    lines: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if fence is not None:
            if _closes(line, fence):
                blocks.append("\n".join(lines))
                fence = None
            else:
                lines.append(line[indent:] if line[:indent].isspace() else line.lstrip())
        elif match := _FENCE_OPEN.match(line):
            fence, indent, lines = match.group(1), len(line) - len(line.lstrip()), []
    if fence is not None:
        blocks.append("\n".join(lines))
    return [block.strip("\n") for block in blocks if block.strip()]
