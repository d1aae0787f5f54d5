"""Insert code into the notebook as a new cell, from the kernel (the chat panel's and ``%%llm``'s
"Insert as new cell" buttons).

A widget in an output cannot reach JupyterLab's command registry from the browser (widgets get
no handle on the application), so the command is run through ipylab: a widget whose front end is
a JupyterLab extension holding the application, which executes commands the kernel sends it.
Two of JupyterLab's own commands do the work: ``notebook:insert-cell-below`` (a new code cell
below the active cell, which is the one whose output holds the clicked button, and makes it
active) and ``notebook:replace-selection`` (the text into the active cell's editor).

``prepare()`` creates ipylab's widget ahead of time: its front end must exist before a command
is sent to it, so a panel calls it when it is built, long before anyone clicks Insert.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["COPY_JS", "INSERT_BELOW", "REPLACE_SELECTION", "insert_cell_below", "prepare"]

INSERT_BELOW = "notebook:insert-cell-below"
REPLACE_SELECTION = "notebook:replace-selection"

# The browser half of Copy, shared by the anywidget front ends that show code (the chat panel's
# and the buttons under a %%llm answer): ``copy(text)`` resolves to whether it worked, and
# ``flash(button, text)`` shows that on the button for a moment.
COPY_JS = r"""
async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (error) {  // no clipboard permission (an insecure origin): the old way
    const scratch = document.createElement("textarea");
    scratch.value = text;
    document.body.appendChild(scratch);
    scratch.select();
    const done = document.execCommand("copy");
    scratch.remove();
    return done;
  }
}

function flash(button, text) {
  const before = button.dataset.label || button.textContent;
  button.dataset.label = before;
  button.textContent = text;
  setTimeout(() => { button.textContent = before; }, 1200);
}
"""

_lock = threading.Lock()
_front_end: Any = None


def prepare() -> Any:
    """ipylab's ``JupyterFrontEnd`` for this kernel (one, created on first use)."""
    global _front_end
    with _lock:
        if _front_end is None:
            from ipylab import JupyterFrontEnd

            _front_end = JupyterFrontEnd()
        return _front_end


def insert_cell_below(code: str) -> None:
    """A new code cell holding ``code``, below the active cell of the notebook in front."""
    if not isinstance(code, str):
        raise TypeError(f"insert_cell_below() takes the code as a string, not {type(code).__name__}.")
    commands = prepare().commands
    commands.execute(INSERT_BELOW)
    commands.execute(REPLACE_SELECTION, {"text": code})
