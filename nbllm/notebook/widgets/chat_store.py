"""Where a chat panel keeps its conversation between sessions: a JSON file beside the notebook.

The conversation is also in the notebook itself, as widget state: JupyterLab writes the panel's
widgets into the notebook's metadata when it saves, with "Save Widget State Automatically" on
(``scripts/bootstrap.py`` turns it on for nbllm's environment), and shows them again when the
notebook is reopened, before any cell runs. But restored widget state is a picture of the panel
that no kernel answers to; re-running the cell makes a new panel that would not see it. The file
is what the kernel reads: it is there whatever the settings and whichever front end opened the
notebook, and the kernel writes it when a message is sent and when its answer ends. It holds
your prompts, so it is readable by its owner alone (0600, in a 0700 folder).

The notebook is found through ``JPY_SESSION_NAME`` (Jupyter Server sets it to the notebook's path
for the notebook's kernel; ipykernel also shows it as ``__session__``). The file is
``<notebook folder>/.nbllm/<notebook name>.chat-<key>.json``, ``key`` being the panel's ``name=``
when given, else the id of the cell that made it (JupyterLab sends it with each execution), so
that two panels in one notebook do not share a file and a re-run cell finds its own; a second
panel made by the same run of one cell gets ``-2``, and so on. Outside a notebook (a script, a
test) nothing is saved unless a file is named.

Files are written to a temporary name and renamed (never half-written), and read with a size
limit and checked field by field: a damaged file is reported and ignored, never executed.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from nbllm.core.paths import read_bytes_limited, write_text_atomically

__all__ = ["MAX_FILE_BYTES", "conversation_file", "read_conversation", "write_conversation"]

MAX_FILE_BYTES = 32 * 1024 * 1024
_FIELDS = ("role", "content", "model", "name", "tool_call_id")
_made_by_run: Counter[tuple[str, int]] = Counter()  # panels made by one run of one cell


def conversation_file(name: str | None) -> Path | None:
    """The file for a panel called ``name`` (None: keyed by its cell) in the running notebook;
    None outside a notebook."""
    notebook = os.environ.get("JPY_SESSION_NAME", "")
    if not notebook.endswith(".ipynb"):
        return None
    path = Path(notebook)
    key = name if name is not None else _cell_key()
    if key is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80] or "panel"
    return path.parent / ".nbllm" / f"{path.name}.chat-{safe}.json"


def _cell_key() -> str | None:
    """The id of the cell being run (``-2``, ``-3`` for more panels from the same run)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    if shell is None or kernel is None:
        return None
    try:
        parent = kernel.get_parent()
    except Exception:  # another kernel's API: no key, no file
        return None
    cell = (parent or {}).get("metadata", {}).get("cellId")
    if not isinstance(cell, str) or not cell:
        return None
    run = (cell, int(getattr(shell, "execution_count", 0)))
    _made_by_run[run] += 1
    count = _made_by_run[run]
    return cell if count == 1 else f"{cell}-{count}"


def write_conversation(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path``, atomically, readable by its owner alone (a chat is as
    private as the prompt history, history.db, which is 0600 too)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(data, ensure_ascii=False, indent=1), mode=0o600)


def read_conversation(path: Path) -> dict[str, Any]:
    """The saved conversation: ``{"system_prompt": str, "messages": [{"role", "content", ...}]}``.

    Raises ``ValueError`` (saying what is wrong) for a file that is too big or not one of ours."""
    try:
        data = json.loads(read_bytes_limited(path, MAX_FILE_BYTES).decode("utf-8"))
    except RecursionError:  # "[[[[..." nested past the parser's depth
        raise ValueError(f"{path} is not a saved chat (nested too deeply).") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a saved chat ({error}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ValueError(f"{path} is not a saved chat (no list of messages).")
    messages = []
    for message in data["messages"]:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ("user", "assistant", "tool")
            or not isinstance(message.get("content"), str)  # required: every turn is text
            or not all(isinstance(message.get(key, ""), str) for key in _FIELDS)
        ):
            raise ValueError(f"{path} holds a message that is not role and text: {str(message)[:80]!r}.")
        messages.append({key: message[key] for key in _FIELDS if key in message})
    system = data.get("system_prompt", "")
    return {"system_prompt": system if isinstance(system, str) else "", "messages": messages}
