"""The chat panel's browser side (anywidget): the message box, and the panel's behaviour in the page.

Why in the browser: the kernel sees the page only through synced values, and what happens
between two syncs is lost to it. Enter used to be found by comparing successive values of the
text box, so two keystrokes in one sync (fast typing) were missed; here the key itself is
handled where it happens (Enter sends, Shift+Enter is a newline) and the text is sent to the
kernel as one message. Following the newest message is a property of the page's layout (only
the browser knows whether the reader is at the bottom), and Copy needs the browser's clipboard.

``ChatInput`` is the text box; ``PanelBehaviour`` is an invisible widget placed inside the panel
that looks after the rest of it: it keeps the message list at the bottom while it grows (unless
the reader scrolled up), and turns clicks on the Copy / Insert / Edit buttons in the messages and
a pointer over the model menu into messages to the kernel. Both talk to the kernel only through
``{"type": ...}`` messages, handled in chat.py.
"""

from __future__ import annotations

import anywidget
import traitlets

from nbllm.notebook.widgets.code_actions import COPY_JS

__all__ = ["ChatInput", "PanelBehaviour"]

_INPUT_ESM = r"""
function render({ model, el }) {
  const box = document.createElement("textarea");
  box.rows = 2;
  box.placeholder = model.get("placeholder");
  box.value = model.get("value");
  box.className = "widget-textarea";
  box.style.cssText = "width:100%;height:52px;box-sizing:border-box;resize:vertical;font:inherit;" +
    "padding:4px 8px;border:1px solid var(--jp-border-color1,#bdbdbd);border-radius:2px;" +
    "background:var(--jp-layout-color1,white);color:var(--jp-ui-font-color0,black)";
  el.appendChild(box);
  const sync = () => { model.set("value", box.value); model.save_changes(); };
  box.addEventListener("input", sync);
  box.addEventListener("keydown", (event) => {
    // Keys typed here are the box's, not JupyterLab's: Shift+Enter would otherwise run the cell.
    event.stopPropagation();
    if (event.key !== "Enter" || event.shiftKey || event.isComposing) return;
    event.preventDefault();
    const text = box.value;
    if (text.trim() && !model.get("busy")) {
      box.value = "";  // at once: the next message may be typed before the kernel answers
      sync();
    }
    model.send({ type: "send", text });  // refused while busy: the kernel says so, the draft stays
  });
  const onValue = () => { const value = model.get("value"); if (box.value !== value) box.value = value; };
  model.on("change:value", onValue);
  return () => model.off("change:value", onValue);
}
export default { render };
"""

_BEHAVIOUR_ESM = (
    COPY_JS
    + r"""
const NEAR_BOTTOM = 48;  // px: a reader this close to the end is following the conversation

function follow(scroller) {
  let stick = true;
  const onScroll = () => {
    stick = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight <= NEAR_BOTTOM;
  };
  const toBottom = () => { if (stick) scroller.scrollTop = scroller.scrollHeight; };
  scroller.addEventListener("scroll", onScroll);
  const mutations = new MutationObserver(toBottom);
  mutations.observe(scroller, { childList: true, subtree: true, characterData: true });
  const sizes = new ResizeObserver(toBottom);
  sizes.observe(scroller);
  if (scroller.firstElementChild) sizes.observe(scroller.firstElementChild);
  toBottom();
  return () => { scroller.removeEventListener("scroll", onScroll); mutations.disconnect(); sizes.disconnect(); };
}

function render({ model, el }) {
  el.style.display = "none";
  let undo = [];
  let timer = null;
  let lastRefresh = 0;
  const attach = () => {
    const root = el.closest(".nbllm-chat");
    const scroller = root && root.querySelector(".nbllm-scroller");
    if (!scroller) { timer = setTimeout(attach, 50); return; }  // not in the page yet
    undo.push(follow(scroller));
    const onClick = (event) => {
      const button = event.target.closest && event.target.closest("button");
      if (!button || !root.contains(button)) return;
      const code = () => button.closest(".nbllm-code").querySelector("code").textContent.replace(/\n$/, "");
      if (button.classList.contains("nbllm-copy")) {
        copy(code()).then((done) => flash(button, done ? "Copied" : "Copy failed"));
      } else if (button.classList.contains("nbllm-insert")) {
        model.send({ type: "insert", code: code() });
        flash(button, "Inserted");
      } else if (button.classList.contains("nbllm-edit")) {
        model.send({ type: "edit", message: Number(button.dataset.message) });
      }
    };
    // Before the model menu opens: the kernel refreshes its list (a model file added meanwhile).
    const onNear = (event) => {
      if (!event.target.closest || !event.target.closest(".nbllm-model")) return;
      const now = Date.now();
      if (now - lastRefresh < 1000) return;
      lastRefresh = now;
      model.send({ type: "refresh-models" });
    };
    root.addEventListener("click", onClick);
    root.addEventListener("pointerover", onNear);
    root.addEventListener("focusin", onNear);
    undo.push(() => {
      root.removeEventListener("click", onClick);
      root.removeEventListener("pointerover", onNear);
      root.removeEventListener("focusin", onNear);
    });
  };
  attach();
  return () => { clearTimeout(timer); undo.forEach((f) => f()); undo = []; };
}
export default { render };
"""
)


class ChatInput(anywidget.AnyWidget):
    """The message box. ``value`` is the draft (synced as it is typed); Enter sends
    ``{"type": "send", "text": ...}`` and, unless ``busy``, empties the box in the browser at once."""

    _esm = _INPUT_ESM
    value = traitlets.Unicode("").tag(sync=True)
    placeholder = traitlets.Unicode("").tag(sync=True)
    busy = traitlets.Bool(False).tag(sync=True)


class PanelBehaviour(anywidget.AnyWidget):
    """Invisible; inside a ``.nbllm-chat`` panel it follows the newest message and reports
    clicks on ``.nbllm-copy`` / ``.nbllm-insert`` / ``.nbllm-edit`` buttons and a pointer over
    ``.nbllm-model`` as messages."""

    _esm = _BEHAVIOUR_ESM
