"""Chat text -> safe HTML: a small Markdown subset, escaped first.

Messages come from users and from models, so every character is HTML-escaped before any
Markdown is applied: nothing in a message can inject markup or script into the notebook. The
subset is what chat answers use (paragraphs, line breaks, headings, lists, fenced and inline
code, bold, italic, http(s) links). An unterminated code fence counts as open to the end, so a
half-streamed code block already renders as code.
"""

from __future__ import annotations

import html
import re

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # invisible, and some break the page
_FENCE = re.compile(r"^\s*```")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+(.*)$")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__")
_ITALIC = re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?!\*)|(?<!\w)_(?=\S)([^_\n]+?)(?<=\S)_(?!\w)")
_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^\s)\"'<>]+)\)")

CODE_STYLE = (
    "background:var(--jp-layout-color2,#f3f4f6);border-radius:4px;padding:6px 8px;margin:4px 0;"
    "overflow-x:auto;font-family:var(--jp-code-font-family,monospace);font-size:0.9em;white-space:pre"
)
INLINE_CODE_STYLE = (
    "background:var(--jp-layout-color2,#f3f4f6);border-radius:3px;padding:0 3px;"
    "font-family:var(--jp-code-font-family,monospace);font-size:0.92em"
)


def clean(text: str) -> str:
    """Drop control characters (random or byte-level tokens emit them) but keep newlines and tabs."""
    return _CONTROL.sub("", text.replace("\r\n", "\n"))


def to_html(text: str) -> str:
    """Render ``text`` (Markdown subset) as HTML in which the text itself can never be markup."""
    blocks: list[str] = []
    lines = clean(text).split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        if _FENCE.match(line):
            index = _code_block(lines, index + 1, blocks)
        elif _BULLET.match(line) or _NUMBERED.match(line):
            index = _list_block(lines, index, blocks)
        elif heading := _HEADING.match(line):
            level = min(len(heading.group(1)) + 3, 6)  # chat headings stay small
            blocks.append(f'<h{level} style="margin:6px 0 2px">{_inline(heading.group(2))}</h{level}>')
            index += 1
        elif not line.strip():
            index += 1
        else:
            index = _paragraph(lines, index, blocks)
    return "".join(blocks)


def _code_block(lines: list[str], index: int, blocks: list[str]) -> int:
    body: list[str] = []
    while index < len(lines) and not _FENCE.match(lines[index]):
        body.append(lines[index])
        index += 1
    blocks.append(f'<pre style="{CODE_STYLE}">{html.escape(chr(10).join(body))}</pre>')
    return index + 1  # past the closing fence (or the end)


def _list_block(lines: list[str], index: int, blocks: list[str]) -> int:
    ordered = bool(_NUMBERED.match(lines[index]))
    pattern = _NUMBERED if ordered else _BULLET
    items: list[str] = []
    while index < len(lines) and (item := pattern.match(lines[index])):
        items.append(f"<li>{_inline(item.group(1))}</li>")
        index += 1
    tag = "ol" if ordered else "ul"
    blocks.append(f'<{tag} style="margin:2px 0;padding-left:22px">{"".join(items)}</{tag}>')
    return index


def _paragraph(lines: list[str], index: int, blocks: list[str]) -> int:
    body: list[str] = []
    while index < len(lines) and lines[index].strip() and not _starts_block(lines[index]):
        body.append(_inline(lines[index]))
        index += 1
    blocks.append(f'<p style="margin:2px 0">{"<br>".join(body)}</p>')
    return index


def _starts_block(line: str) -> bool:
    return bool(_FENCE.match(line) or _HEADING.match(line) or _BULLET.match(line) or _NUMBERED.match(line))


def _inline(text: str) -> str:
    """Escape, then apply inline Markdown. Code spans and links are set aside first, so that
    nothing inside them (an underscore in a URL, say) is taken for emphasis."""
    kept: list[str] = []

    def keep(rendered: str) -> str:
        kept.append(rendered)
        return f"\x00{len(kept) - 1}\x00"

    escaped = html.escape(text, quote=True)
    escaped = _CODE_SPAN.sub(lambda m: keep(f'<code style="{INLINE_CODE_STYLE}">{m.group(1)}</code>'), escaped)
    escaped = _LINK.sub(
        lambda m: keep(f'<a href="{m.group(2)}" target="_blank" rel="noopener noreferrer">{m.group(1)}</a>'), escaped
    )
    escaped = _BOLD.sub(lambda m: f"<strong>{m.group(1) or m.group(2)}</strong>", escaped)
    escaped = _ITALIC.sub(lambda m: f"<em>{m.group(1) or m.group(2)}</em>", escaped)
    return re.sub("\x00(\\d+)\x00", lambda m: kept[int(m.group(1))], escaped)
