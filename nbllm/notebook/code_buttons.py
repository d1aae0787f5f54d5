"""Copy and "Insert as new cell" buttons under a ``%%llm`` answer, one row per code block.

The answer itself is JupyterLab's own Markdown rendering, which runs no script and keeps no
buttons, so the buttons are a small widget displayed below it. Copy happens in the browser (only
it holds the clipboard); Insert is sent to the kernel, which asks JupyterLab for a new cell
through ``widgets.code_actions`` — the same path as the chat panel's Insert button.
"""

from __future__ import annotations

from typing import Any

import anywidget
import traitlets

from nbllm.notebook.widgets import code_actions

__all__ = ["CodeButtons"]

_ESM = (
    code_actions.COPY_JS
    + r"""
const BUTTON = "margin-left:6px;padding:1px 8px;font-size:0.85em;cursor:pointer;" +
  "border:1px solid var(--jp-border-color1,#bdbdbd);border-radius:3px;" +
  "background:var(--jp-layout-color1,white);color:var(--jp-ui-font-color1,black)";

function button(className, text, onClick) {
  const made = document.createElement("button");
  made.type = "button";
  made.className = className;
  made.textContent = text;
  made.style.cssText = BUTTON;
  made.addEventListener("click", onClick);
  return made;
}

function render({ model, el }) {
  el.className = "nbllm-code-buttons";
  const draw = () => {
    el.replaceChildren();
    model.get("blocks").forEach((code, index) => {
      const row = document.createElement("div");
      row.className = "nbllm-code-row";
      row.style.cssText = "display:flex;align-items:center;margin:2px 0;font-size:0.85em;color:#888";
      const label = document.createElement("code");
      label.textContent = model.get("labels")[index];
      label.style.cssText = "overflow:hidden;text-overflow:ellipsis;white-space:nowrap;max-width:60%";
      const copyButton = button("nbllm-copy", "Copy", () => {
        copy(code).then((done) => flash(copyButton, done ? "Copied" : "Copy failed"));
      });
      const insertButton = button("nbllm-insert", "Insert as new cell", () => {
        model.send({ type: "insert", index });
        flash(insertButton, "Inserted");
      });
      row.append(label, copyButton, insertButton);
      el.appendChild(row);
    });
  };
  model.on("change:blocks", draw);
  draw();
}
export default { render };
"""
)


def _label(code: str) -> str:
    """The row's name for a block: its first line that says something."""
    first = next((line.strip() for line in code.splitlines() if line.strip()), "")
    return first if len(first) <= 60 else first[:59] + "…"


class CodeButtons(anywidget.AnyWidget):
    """One row per code block of an answer: its first line, Copy, Insert as new cell."""

    _esm = _ESM
    blocks = traitlets.List(traitlets.Unicode()).tag(sync=True)
    labels = traitlets.List(traitlets.Unicode()).tag(sync=True)

    def __init__(self, blocks: list[str], **kwargs: Any) -> None:
        super().__init__(blocks=blocks, labels=[_label(code) for code in blocks], **kwargs)
        code_actions.prepare()  # its front end must exist before the first Insert click
        self.on_msg(self._on_click)

    def _on_click(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if not isinstance(content, dict) or content.get("type") != "insert":
            return
        index = content.get("index")
        if isinstance(index, int) and 0 <= index < len(self.blocks):
            code_actions.insert_cell_below(self.blocks[index])
