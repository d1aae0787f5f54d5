"""Chat text -> safe HTML, with markdown-it-py (CommonMark; the parser behind MyST and Jupyter Book).

Why a library rather than the regexes this module had: answers use real Markdown (nested
lists, code fences inside list items, tables, emphasis beside underscores and asterisks in
code), and a hand-written subset needs one more rule, and one more interaction between rules,
for each. markdown-it-py follows the CommonMark spec and is tested against it, and is pure
Python. It is slower than the regexes were (a few milliseconds for a 4,000-character answer,
against under one); the panel redraws a streaming answer at most ten times a second, so that
stays a small share of one core. The parser is built once, on first use.

Messages come from users and from models, so the parser is set up so that no text can become
markup: raw HTML is off (``<script>`` shows as text), links are clickable only for http(s) and
mailto URLs (markdown-it already refuses ``javascript:``; this also refuses ``data:`` and
relative links, which in JupyterLab would point into the server), and images are off, since an
image URL in a model's answer is fetched on display without a click (a known way to leak a
conversation).

Answers are not CommonMark documents: a single newline is a line break (``breaks``), so the
lines of a poem, or of a list CommonMark would not take for one ("2." right after a sentence),
stay on their own lines. An unterminated code fence runs to the end, so a half-streamed code
block already renders as code. The panel's HTML widget has no stylesheet, so styles are inline.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from markdown_it.renderer import RendererHTML
from markdown_it.rules_core import StateCore
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # invisible, and some break the page
_SAFE_LINK = re.compile(r"^(https?:|mailto:)", re.IGNORECASE)

CODE_STYLE = (
    "background:var(--jp-layout-color2,#f3f4f6);border-radius:4px;padding:6px 8px;margin:4px 0;"
    "overflow-x:auto;font-family:var(--jp-code-font-family,monospace);font-size:0.9em;white-space:pre"
)
INLINE_CODE_STYLE = (
    "background:var(--jp-layout-color2,#f3f4f6);border-radius:3px;padding:0 3px;"
    "font-family:var(--jp-code-font-family,monospace);font-size:0.92em"
)
_BUTTON_STYLE = (
    "font-size:11px;padding:0 6px;margin-right:4px;cursor:pointer;border-radius:3px;"
    "border:1px solid var(--jp-border-color2,#d1d5db);background:var(--jp-layout-color1,white);"
    "color:var(--jp-content-font-color2,#4b5563)"
)
_ACTIONS_STYLE = "margin:-2px 0 4px 0"
_CODE_BUTTONS = (
    f'<button type="button" class="nbllm-copy" style="{_BUTTON_STYLE}">Copy</button>'
    f'<button type="button" class="nbllm-insert" style="{_BUTTON_STYLE}">Insert as new cell</button>'
)
_CELL_STYLE = "border:1px solid var(--jp-border-color2,#d1d5db);padding:2px 6px"
_STYLES = {  # opening token type -> inline style
    "paragraph_open": "margin:2px 0",
    "heading_open": "margin:6px 0 2px",
    "bullet_list_open": "margin:2px 0;padding-left:22px",
    "ordered_list_open": "margin:2px 0;padding-left:22px",
    "blockquote_open": "margin:4px 0;padding-left:8px;border-left:3px solid var(--jp-border-color2,#d1d5db)",
    "table_open": "border-collapse:collapse;margin:4px 0",
    "th_open": _CELL_STYLE,
    "td_open": _CELL_STYLE,
    "code_inline": INLINE_CODE_STYLE,
}


def clean(text: str) -> str:
    """Drop control characters (random or byte-level tokens emit them) but keep newlines and tabs."""
    return _CONTROL.sub("", text.replace("\r\n", "\n"))


def to_html(text: str, *, code_actions: bool = False) -> str:
    """Render ``text`` (Markdown) as HTML in which the text itself can never be markup.

    ``code_actions``: each code block gets Copy and "Insert as new cell" buttons (classes
    ``nbllm-copy`` and ``nbllm-insert`` in a ``.nbllm-code`` wrapper), which do something only
    where a page script handles their clicks (the chat panel's, chat_front_end.py)."""
    env = {"code_actions": code_actions}
    rendered: str = _parser().render(clean(text), env)  # typed Any: renderers may return other types
    return rendered


class _ChatMarkdown(MarkdownIt):
    def validateLink(self, url: str) -> bool:  # markdown-it's name for the hook
        """Links stay links only for web and mail addresses; others are left as their text."""
        return bool(_SAFE_LINK.match(url))


@functools.cache
def _parser() -> MarkdownIt:
    """The one parser, built on first use (importing this module stays cheap) and then shared."""
    md = _ChatMarkdown("commonmark", {"html": False, "breaks": True}).enable("table").disable("image")
    md.core.ruler.push("nbllm_chat_style", _style)
    md.add_render_rule("fence", _code_block)
    md.add_render_rule("code_block", _code_block)
    return md


def _style(state: StateCore) -> None:
    for token in state.tokens:
        _style_token(token)
        for child in token.children or ():
            _style_token(child)


def _style_token(token: Token) -> None:
    if token.type in ("heading_open", "heading_close"):
        token.tag = f"h{min(int(token.tag[1]) + 3, 6)}"  # chat headings stay small
    if token.type == "link_open":
        token.attrSet("target", "_blank")  # never navigate JupyterLab itself away
        token.attrSet("rel", "noopener noreferrer")
    elif style := _STYLES.get(token.type):
        token.attrSet("style", style)


def _code_block(self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
    block = f'<pre style="{CODE_STYLE}"><code>{escapeHtml(tokens[idx].content)}</code></pre>'
    if not env.get("code_actions"):
        return block + "\n"
    return f'<div class="nbllm-code">{block}<div style="{_ACTIONS_STYLE}">{_CODE_BUTTONS}</div></div>\n'
