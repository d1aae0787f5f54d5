"""The chat panel: a conversation with a local model, streamed into a notebook.

A front end like the magics: it builds a request from its widgets, calls ``Engine.stream``
(the one generation path) and shows what comes back. The stream is consumed on a worker
thread, so the kernel stays free to receive the Stop click while tokens flow; the worker
redraws the message, the status line and the throughput chart at most ``1 / update_interval``
times a second, because every redraw is a message to the browser and the model must not wait
for the front end.

``nbllm.ChatPanel()`` displays itself. In tests and scripts, ``panel.send("...")``,
``panel.stop()``, ``panel.regenerate()``, ``panel.clear()``, ``panel.edit(i)`` and
``panel.wait()`` do what the buttons do.

The browser side (chat_front_end.py) handles keys, scrolling and the buttons inside messages
and sends the kernel ``{"type": ...}`` messages. The conversation is saved beside the notebook
after every change (chat_store.py says where and why) and comes back when the cell runs again;
``export_markdown`` / ``load_markdown`` move it in and out as a readable transcript. Before each
reply the conversation is counted (``Engine.count_chat_tokens``); one that would leave less
than max_tokens (at most half the context) for the answer is sent without its oldest turns
(core/conversation.py), and the answer says how many were left out.
"""

from __future__ import annotations

import html
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from nbllm.core.conversation import from_markdown, left_out_note, to_markdown, trim_to_fit
from nbllm.core.errors import NbllmError, StructuredOutputError
from nbllm.core.paths import read_bytes_limited, write_text_atomically
from nbllm.core.tools import make_toolset
from nbllm.engine.tool_loop import result_for_model, run_call
from nbllm.notebook.plots import ThroughputChart
from nbllm.notebook.widgets import chat_store, code_actions
from nbllm.notebook.widgets.chat_front_end import ChatInput, PanelBehaviour
from nbllm.notebook.widgets.markdown import to_html

if TYPE_CHECKING:
    from nbllm.core.metrics import RequestStats
    from nbllm.engine import Engine, Stream

__all__ = ["ChatPanel", "Message"]

log = logging.getLogger("nbllm")

USER_BUBBLE = "background:#e0ecff;color:#0f172a;border-radius:14px 14px 4px 14px"
ASSISTANT_BUBBLE = (
    "background:var(--jp-layout-color2,#f3f4f6);color:var(--jp-content-font-color1,#111827);"
    "border-radius:14px 14px 14px 4px"
)
_EDIT_STYLE = (
    "font-size:10px;padding:0 5px;margin-left:6px;cursor:pointer;border-radius:3px;"
    "border:1px solid var(--jp-border-color2,#cbd5e1);background:transparent;color:inherit"
)
_NOTE_STYLE = "font-size:11px;font-style:italic;color:#b45309;margin-top:2px"
CHART_WIDTH = 820  # px: fits JupyterLab's notebook column (plotly cannot size a widget to its container)
_STATUS_COLORS = {
    "ready": "var(--jp-content-font-color2,#4b5563)",
    "busy": "#1d4ed8",
    "done": "#15803d",
    "stopped": "#b45309",
    "error": "#dc2626",
}


_message_ids = count(1)


@dataclass
class Message:
    """One turn of the conversation and the widget that shows it."""

    role: str  # "user", "assistant" or "tool"
    content: str
    view: Any = field(repr=False)  # an ipywidgets.HTML
    model: str = ""
    stats: RequestStats | None = None
    streaming: bool = False
    # With tools: an assistant turn's calls (OpenAI's tool_calls), or a tool turn's call and run.
    extra: dict[str, Any] = field(default_factory=dict)
    id: int = field(default_factory=lambda: next(_message_ids))  # names it in the page (Edit)
    note: str = ""  # shown under an answer: earlier messages left out to fit the context


@dataclass
class _Job:
    """The reply being generated: its stream, its message, the thread consuming it."""

    stream: Stream
    message: Message
    thread: threading.Thread | None = None


class ChatPanel:
    """A chat with a local model: history, input, controls, live throughput chart.

    ``engine`` defaults to nbllm's process-wide engine; ``model`` to the configured default.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        model: str | None = None,
        system_prompt: str = "",
        update_interval: float = 0.1,
        tools: Sequence[Callable[..., Any]] | None = None,
        tool_choice: str = "auto",
        max_steps: int = 5,
        name: str | None = None,
        save_to: str | os.PathLike[str] | bool | None = None,
    ) -> None:
        if engine is None:
            import nbllm

            engine = nbllm.get_engine()
        self.engine = engine
        self.update_interval = update_interval
        # Functions the model may call: each call runs, shows collapsed with its result, and the
        # reply goes on from there, up to max_steps model turns per message.
        self.tools = list(tools or [])
        self.tool_choice = tool_choice  # for a message's first reply; the replies after calls: auto
        self.max_steps = max_steps
        if self.tools:
            make_toolset(self.tools, tool_choice)  # a function that cannot be a tool is refused here, naming it
        self.messages: list[Message] = []
        self.renders = 0  # message redraws while streaming: the throttle's tests read this
        self.chart = ThroughputChart(interval=update_interval, width=CHART_WIDTH)
        self.status_kind = "ready"  # ready | busy | done | stopped | error
        self.last_stream: Stream | None = None  # the latest reply's stream: its request and stats
        self._job: _Job | None = None
        self._lock = threading.RLock()
        self._save_lock = threading.Lock()  # held while the file is written (_save)
        self._snapshots = self._written = 0  # conversations taken to be saved; the latest on disk
        self._left_out = 0  # the oldest messages not sent, since the conversation outgrew the context
        # Where the conversation is kept: the file named, or beside the running notebook (keyed by
        # name= or by the cell), or nowhere (False, or outside a notebook).
        if save_to is None or save_to is True:
            self.conversation_file = chat_store.conversation_file(name)
        else:
            self.conversation_file = Path(save_to) if save_to is not False else None
        self._build(model, system_prompt)
        restored = self._restore()
        self.system_prompt.observe(lambda _: self._save(), names="value")
        code_actions.prepare()  # its front end must exist before the first Insert click
        ready = f"Ready. {self.model.value} answers; Enter sends."
        if restored:
            ready = f"Conversation restored ({restored} messages). " + ready
        self._set_status(ready, "ready")

    # ----------------------------------------------------------------- display

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # ----------------------------------------------------------------- what the buttons do

    @property
    def busy(self) -> bool:
        return self._job is not None

    @property
    def current_stream(self) -> Stream | None:
        """The stream of the reply being generated, if any."""
        job = self._job
        return job.stream if job is not None else None

    @property
    def history(self) -> list[dict[str, str]]:
        """The conversation as chat messages (without the system prompt)."""
        return [_chat_message(m) for m in self.messages]

    @property
    def status_text(self) -> str:
        """The status line as plain text."""
        return html.unescape(_strip_tags(self.status.value))

    def send(self, text: str | None = None) -> bool:
        """Send ``text`` (default: what is in the input box); True if a reply started.

        If the reply cannot start (a model file gone, say), the status line says why and the
        message stays in the history: Regenerate answers it once the cause is fixed."""
        if text is not None and not isinstance(text, str):
            raise TypeError(f"send() takes the message as a string, not {type(text).__name__}.")
        text = (self.input.value if text is None else text).strip()
        if not text:
            return False
        if self.busy:
            self._set_status("Still answering: wait, or press Stop first.", "busy")
            return False
        self._set_input("")
        self.refresh_models()
        self._append("user", text)
        self._save()  # now, not when the answer ends: a kernel that dies meanwhile keeps the question
        return self._answer()

    def edit(self, position: int) -> str:
        """Take user message ``position`` (an index into ``messages``; -1 is the last) back into
        the input box, and drop it and everything after it; sending again answers from there.
        Returns its text."""
        if self.busy:
            self.stop()
            self.wait(10)
        with self._lock:
            message = self.messages[position]  # IndexError for a position that is not there
            if message.role != "user":
                raise ValueError(f"Message {position} is the {message.role}'s; only your own messages can be edited.")
            at = self.messages.index(message)
            del self.messages[at:]
            self._left_out = min(self._left_out, at)
            self._render_history()
        self._set_input(message.content)
        self._save()
        self._set_status("Edit the message and send it again: the answer is regenerated from there.", "ready")
        return message.content

    def refresh_models(self) -> list[str]:
        """Offer the models known now (a ``.gguf`` added to the models folder, a model configured
        since the panel was made); the chosen one stays chosen."""
        names = self.engine.registry.known_names()
        chosen = self.model.value
        options = names if chosen in names else [chosen, *names]
        if list(self.model.options) != options:
            self._refreshing = True
            try:
                self.model.options = options
                self.model.value = chosen
            finally:
                self._refreshing = False
        return options

    def export_markdown(self, path: str | os.PathLike[str] | None = None) -> str:
        """The conversation (with the system prompt) as a Markdown transcript; also written to
        ``path`` when given. ``load_markdown`` reads it back exactly."""
        system = self.system_prompt.value
        messages = [{"role": "system", "content": system}] if system else []
        messages += [
            {"role": m.role, "content": m.content, "model": m.model, "name": str(m.extra.get("name", ""))}
            for m in self.messages
            if not m.extra.get("tool_calls")  # a request to run tools is not text; its results follow
        ]
        text = to_markdown(messages, title=f"Chat with {self.model.value}")
        if path is not None:
            write_text_atomically(Path(path), text)
        return text

    def load_markdown(self, source: str | os.PathLike[str]) -> int:
        """Replace the conversation with a transcript (its text, or a file holding it) written
        by ``export_markdown``; returns the number of messages loaded."""
        if isinstance(source, os.PathLike) or ("\n" not in source and source.endswith(".md")):
            path = Path(source)
            if not path.is_file():
                raise NbllmError(f"No transcript at {path}: give the path of a .md file or the transcript's text.")
            try:
                source = read_bytes_limited(path, 4 * 50_000_000).decode("utf-8", errors="replace")
            except (OSError, ValueError) as error:
                raise NbllmError(f"Cannot read the transcript: {error}.") from None
        try:
            messages = from_markdown(str(source))
        except ValueError as error:
            raise NbllmError(f"Cannot load the transcript: {error}") from None
        if self.busy:
            self.stop()
            self.wait(10)
        system = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] in ("user", "assistant")]
        self._replace_conversation(system[0] if system else "", turns)
        self._save()
        self._set_status(f"Loaded {len(turns)} messages.", "ready")
        return len(turns)

    def stop(self) -> None:
        """End the reply being generated; what it said so far stays in the history."""
        job = self._job
        if job is not None:
            job.stream.stop()
            self._set_status("Stopping…", "busy")

    def regenerate(self) -> bool:
        """Answer the last question again, with a new random seed, replacing the last answer."""
        if self.busy:
            return False
        with self._lock:
            if self.messages and self.messages[-1].role == "assistant":
                self._remove(self.messages[-1])
            if not self.messages or self.messages[-1].role != "user":
                self._set_status("Nothing to regenerate: send a message first.", "ready")
                return False
        return self._answer(seed=secrets.randbits(32))

    def clear(self) -> None:
        """Empty the conversation (stopping a reply being generated first).

        The chart keeps its per-reply bars: they are a speed record (switch models, clear, ask
        again, compare). ``panel.chart.clear()`` empties the chart too.
        """
        if self.busy:
            self.stop()
            self.wait(10)
        with self._lock:
            self.messages.clear()
            self._left_out = 0
            self._render_history()
        self._save()
        self._set_status(f"Cleared. {self.model.value} answers the next message.", "ready")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current reply has ended; False if it is still running after ``timeout``."""
        job = self._job
        if job is None or job.thread is None:
            return True
        job.thread.join(timeout)
        return not job.thread.is_alive()

    # ----------------------------------------------------------------- generating

    def _answer(self, seed: int | None = None) -> bool:
        """Start the reply on a thread; False (with the reason in the status line) if it cannot."""
        model = str(self.model.value)
        params = self._params(seed)
        try:
            request = self.engine.make_request(
                messages=self._conversation(), model=model, params=params, origin="panel"
            )
            stream = self.engine.stream(request)  # an unknown or missing model fails here, at once
        except NbllmError as error:
            self._set_status(str(error), "error")
            return False
        self.last_stream = stream
        job = _Job(stream, self._append("assistant", "", model=model, streaming=True))
        job.thread = threading.Thread(target=self._run, args=(job, params), name="nbllm-chat-reply", daemon=True)
        self._job = job
        self._show_busy(True)
        self._set_status(f"Waiting for {model}…", "busy")
        job.thread.start()
        return True

    def _conversation(self) -> list[dict[str, str]]:
        system = self.system_prompt.value.strip()
        prefix = [{"role": "system", "content": system}] if system else []
        # Not the answer being written (it is the reply to this, when the context overflowed).
        return prefix + [_chat_message(m) for m in self.messages[self._left_out :] if not m.streaming]

    def _fit_context(self, job: _Job, params: dict[str, Any]) -> _Job:
        """Before the reply starts: leave out the oldest turns (the system prompt stays) while the
        conversation and room for the answer (max_tokens, at most half the context) do not fit the
        model's context. Counted here, on the worker: counting may load the model, or wait while
        it answers elsewhere. Without this the backend would shrink the answer to what the prompt
        leaves, and a conversation near the limit would get answers of a few tokens."""
        model = str(self.model.value)
        spec = self.engine.registry.resolve(model)
        context = spec.remote.context_size if spec.remote is not None else self.engine.context_size_for(spec)
        budget = context - min(int(params["max_tokens"]), context // 2)

        def count_tokens(messages: list[Mapping[str, Any]]) -> int:
            return self.engine.count_chat_tokens(messages, model, **params)

        trimmed = trim_to_fit(self._conversation(), count_tokens, budget)
        # The newest question alone over the budget is sent as it is: the answer is short, and
        # says the context is full; a prompt over the whole context is the backend's error.
        self._left_out += trimmed.left_out
        job.message.note = left_out_note(self._left_out) if self._left_out else ""
        if trimmed.left_out == 0 or job.stream.cancel.is_set():
            return job
        request = self.engine.make_request(messages=trimmed.messages, model=model, params=params, origin="panel")
        stream = self.engine.stream(request)
        follow = _Job(stream, job.message, job.thread)
        with self._lock:
            self._job = follow
            self.last_stream = stream
        if job.stream.cancel.is_set():  # Stop pressed while the new stream was made
            stream.stop()
        job.stream.close()  # never started: nothing to end but the generator
        return follow

    def _params(self, seed: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "temperature": float(self.temperature.value),
            "top_p": float(self.top_p.value),
            "top_k": int(self.top_k.value),
            "max_tokens": int(self.max_tokens.value),
            "repeat_penalty": float(self.repeat_penalty.value),
        }
        if seed is not None:
            params["seed"] = seed
        if self.json_mode.value:  # a grammar: every reply is one JSON object
            params["schema"] = "json"
        elif self.tools:
            params["tools"] = self.tools
            params["tool_choice"] = self.tool_choice
        return params

    def _run(self, job: _Job, params: dict[str, Any]) -> None:
        """The worker thread: consume the stream, redraw now and then, never raise. With tools,
        a reply that is calls runs them and the model goes on from their results."""
        try:
            job = self._fit_context(job, params)
            self._consume(job, last=False)
            self._finish(job)
            for _step in range(self.max_steps - 1):
                follow = self._run_calls(job)
                if follow is None:
                    break
                job = follow
                self._consume(job)
        except NbllmError as error:
            self._fail(job, str(error))
        except Exception as error:  # a bug must not leave the panel stuck in "busy"
            log.exception("The chat panel's reply failed")
            self._fail(job, f"{type(error).__name__}: {error}")
        finally:
            with self._lock:
                if self._job is job:
                    self._job = None
            self._show_busy(False)

    def _consume(self, job: _Job, *, last: bool = True) -> None:
        stream, message = job.stream, job.message
        next_update = 0.0
        for _ in self.chart.watch(stream):
            now = time.perf_counter()
            if now >= next_update:
                message.content = stream.text
                self._render(message)
                self._set_status(_live_status(stream, now), "busy")
                self.renders += 1
                # A redraw (Markdown parsing, widget messages) takes CPU from generation, and it
                # grows with the answer (markdown-it: ~4 ms for 4,000 characters): keep redraws
                # to a tenth of the time, however long the answer gets.
                next_update = now + max(self.update_interval, 10 * (time.perf_counter() - now))
        if last:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        stream, message = job.stream, job.message
        stats = stream.stats
        message.content, message.stats, message.streaming = stream.text, stats, False
        if stats is not None:
            message.model = stats.model
        self._show_or_drop(message)
        if stats is None:
            self._set_status("The reply ended without statistics.", "error")
        elif stats.finish_reason == "cancelled":
            self._set_status(f"Stopped: {_final_status(stats)}", "stopped")
        else:
            self._set_status(_final_status(stats), "done")
        self._save()

    def _run_calls(self, job: _Job) -> _Job | None:
        """Run the calls ``job``'s reply made, if it made any, and start the next reply."""
        tools = job.stream.request.params.tools
        stats = job.stream.stats
        if tools is None or stats is None or stats.finish_reason != "stop":
            return None
        try:
            calls = tools.parse(job.stream.text)
        except StructuredOutputError:
            return None
        if not calls:
            return None
        with self._lock:
            job.message.content = ""
            job.message.extra = {"tool_calls": [call.as_openai() for call in calls]}
            self._render(job.message)
        for call in calls:
            self._set_status(f"Running {call.name}…", "busy")
            run = run_call(tools, call, None, 60.0)
            self._append("tool", result_for_model(run), extra={"tool_call_id": call.id, "name": call.name, "run": run})
        if job.stream.cancel.is_set():
            return None
        model = str(self.model.value)
        params = {**self._params(None), "tool_choice": "auto"}
        request = self.engine.make_request(messages=self._conversation(), model=model, params=params, origin="panel")
        stream = self.engine.stream(request)
        self.last_stream = stream
        follow = _Job(stream, self._append("assistant", "", model=model, streaming=True), job.thread)
        with self._lock:
            self._job = follow
        return follow

    def _fail(self, job: _Job, error: str) -> None:
        message = job.message
        message.content, message.streaming = job.stream.text, False
        self._show_or_drop(message)
        self._set_status(error, "error")
        self._save()

    def _show_or_drop(self, message: Message) -> None:
        """Show the final answer; an empty one (stopped or failed at once) is no answer at all,
        so that Regenerate answers the question again."""
        with self._lock:
            if message.content:
                self._render(message)
            elif message in self.messages:
                self._remove(message)

    # ----------------------------------------------------------------- widgets

    def _build(self, model: str | None, system_prompt: str) -> None:
        generation = self.engine.settings.generation
        if model is not None:
            self.engine.registry.resolve(model)  # an unknown name fails here, with a suggestion
        default = model or self.engine.settings.default_model
        names = self.engine.registry.known_names()
        self.model = widgets.Dropdown(
            options=names if default in names else [default, *names],
            value=default,
            description="Model",
            style={"description_width": "44px"},
            layout=widgets.Layout(width="260px"),
        )
        self.model.add_class("nbllm-model")
        self._refreshing = False
        self.model.observe(self._on_model_change, names="value")
        self.system_prompt = widgets.Textarea(
            value=system_prompt,
            placeholder="System prompt (optional): sent first, before the conversation",
            rows=2,
            layout=widgets.Layout(width="100%"),
        )
        slider_style = {"description_width": "100px"}
        slider_layout = widgets.Layout(width="310px")
        self.temperature = widgets.FloatSlider(
            value=generation.default_temperature, min=0.0, max=max(2.0, generation.default_temperature),
            step=0.05, description="temperature", style=slider_style, layout=slider_layout,
        )  # fmt: skip
        self.top_p = widgets.FloatSlider(
            value=generation.top_p, min=0.0, max=1.0, step=0.01, description="top_p",
            style=slider_style, layout=slider_layout,
        )  # fmt: skip
        self.top_k = widgets.IntSlider(
            value=generation.top_k, min=0, max=max(200, generation.top_k), description="top_k",
            style=slider_style, layout=slider_layout,
        )  # fmt: skip
        self.repeat_penalty = widgets.FloatSlider(
            value=generation.repeat_penalty, min=min(0.5, generation.repeat_penalty),
            max=max(2.0, generation.repeat_penalty), step=0.01, description="repeat_penalty",
            style=slider_style, layout=slider_layout,
        )  # fmt: skip
        self.max_tokens = widgets.BoundedIntText(
            value=generation.default_max_tokens, min=1, max=1 << 20, description="max_tokens",
            style=slider_style, layout=slider_layout,
        )  # fmt: skip
        self.json_mode = widgets.Checkbox(
            value=False, description="JSON mode: every reply is one JSON object", indent=False,
            layout=widgets.Layout(width="320px"),
        )  # fmt: skip
        self.json_mode.add_class("nbllm-json-mode")

        # Its natural height, never shrunk to the box around it: a widget box scrolls itself
        # (overflow: auto), and a shrunk one would scroll on its own, out of the page's reach.
        self.history_box = widgets.VBox(layout=widgets.Layout(width="100%", padding="4px 8px", flex="0 0 auto"))
        self.history_box.add_class("nbllm-history")
        self._empty_hint = widgets.HTML(
            '<div style="color:var(--jp-content-font-color3,#9ca3af);text-align:center;padding:28px 0">'
            "Ask something below. Enter sends; replies stream in here.</div>",
            layout=widgets.Layout(width="100%"),
        )
        # The page keeps this box at its newest message while it grows (PanelBehaviour), unless
        # the reader scrolled up to read.
        scroller = widgets.Box(
            [self.history_box],
            layout=widgets.Layout(
                flex_flow="column", overflow="auto", min_height="120px", max_height="360px", width="100%",
                border="1px solid var(--jp-border-color2,#e5e7eb)",
            ),
        )  # fmt: skip
        scroller.add_class("nbllm-scroller")
        self.behaviour = PanelBehaviour()
        self.behaviour.on_msg(self._on_front_end_message)

        # Enter is handled in the browser (ChatInput), which sends the text as one message.
        self.input = ChatInput(
            placeholder="Message (Enter sends, Shift+Enter: new line)",
            layout=widgets.Layout(flex="1 1 auto", width="auto"),
        )
        self.input.add_class("nbllm-input")
        self.input.on_msg(self._on_front_end_message)
        self.send_button = _button("Send", "paper-plane", "primary", "nbllm-send", lambda _: self.send())
        self.stop_button = _button("Stop", "stop", "warning", "nbllm-stop", lambda _: self.stop())
        self.regenerate_button = _button("Regenerate", "redo", "", "nbllm-regenerate", lambda _: self.regenerate())
        self.clear_button = _button("Clear", "trash", "", "nbllm-clear", lambda _: self.clear())
        self.stop_button.disabled = True

        self.status = widgets.HTML(layout=widgets.Layout(flex="1 1 0%", min_width="0", min_height="24px"))
        self.status.add_class("nbllm-status")
        # A column box stretches the figure to the panel's width, which plotly's autosize then uses.
        chart_box = widgets.VBox([self.chart.figure], layout=widgets.Layout(width="100%", margin="6px 0 0 0"))
        chart_box.add_class("nbllm-chart")

        settings = widgets.VBox(
            [
                self.system_prompt,
                widgets.GridBox(
                    [self.temperature, self.top_p, self.top_k, self.repeat_penalty, self.max_tokens, self.json_mode],
                    layout=widgets.Layout(grid_template_columns="repeat(2, 320px)", grid_gap="2px 16px"),
                ),
            ]
        )
        settings_panel = widgets.Accordion([settings], titles=("Settings: system prompt and sampling",))
        settings_panel.selected_index = None

        title = widgets.HTML(
            '<div style="font-size:15px;font-weight:600;padding-top:4px">nbllm chat</div>',
            layout=widgets.Layout(flex="1 1 auto", width="auto"),
        )
        self.widget = widgets.VBox(
            [
                widgets.HBox([title, self.model], layout=widgets.Layout(width="100%", align_items="center")),
                scroller,
                widgets.HBox(
                    [self.input, self.send_button, self.stop_button],
                    layout=widgets.Layout(width="100%", align_items="center", margin="6px 0 0 0"),
                ),
                widgets.HBox(
                    [self.status, self.regenerate_button, self.clear_button],
                    layout=widgets.Layout(width="100%", align_items="center"),
                ),
                chart_box,
                settings_panel,
                self.behaviour,
            ],
            layout=widgets.Layout(width="100%", max_width="880px", padding="4px"),
        )
        self.widget.add_class("nbllm-chat")
        self._render_history()

    def _on_front_end_message(self, _widget: Any, content: Any, _buffers: Any) -> None:
        """What the page reports (chat_front_end.py): Enter, a button in a message, the model menu."""
        if not isinstance(content, dict):
            return
        kind = content.get("type")
        try:
            if kind == "send":
                self._on_enter(str(content.get("text", "")))
            elif kind == "insert":
                code_actions.insert_cell_below(str(content.get("code", "")))
            elif kind == "edit":
                found = [i for i, m in enumerate(self.messages) if m.id == content.get("message")]
                if found:
                    self.edit(found[0])
            elif kind == "refresh-models":
                self.refresh_models()
        except Exception as error:  # a callback's error would only reach the kernel's log
            log.exception("The chat panel could not handle %r", kind)
            self._set_status(f"{type(error).__name__}: {error}", "error")

    def _on_enter(self, text: str) -> None:
        if self.busy:
            if not self.input.value:  # the page emptied the box before it knew: the draft goes back
                self._set_input(text)
            self._set_status("Still answering: wait, or press Stop first.", "busy")
            return
        self.send(text)

    def _on_model_change(self, change: dict[str, Any]) -> None:
        if not self.busy and not self._refreshing:
            self._set_status(f"{change['new']} answers the next message.", "ready")

    # ----------------------------------------------------------------- keeping the conversation

    def _save(self) -> None:
        """Write the conversation to its file (if it has one); a failure is said, never raised.

        The kernel thread and the reply's worker both save. Snapshots are numbered as they are
        taken, and written one at a time, each only if no later one was written first: the file
        never goes back to an older conversation. (The snapshot is taken under the panel's lock,
        which a caller may hold; the write is not, so a slow disk never stalls the reply.)"""
        path = self.conversation_file
        if path is None:
            return
        with self._lock:
            messages = [
                {
                    "role": m.role,
                    "content": m.content,
                    **({"model": m.model} if m.model else {}),
                    **{k: str(m.extra[k]) for k in ("name", "tool_call_id") if k in m.extra},
                }
                for m in self.messages
                if not m.streaming and not m.extra.get("tool_calls")
            ]
            data = {"system_prompt": self.system_prompt.value, "messages": messages}
            self._snapshots += 1
            number = self._snapshots
        with self._save_lock:
            if number < self._written:
                return  # a later snapshot is on disk already
            try:
                chat_store.write_conversation(path, data)
            except OSError as error:
                log.warning("The chat panel could not save its conversation to %s: %s", path, error)
                return
            self._written = number

    def _restore(self) -> int:
        """Bring back the saved conversation, if there is one; the number of messages."""
        path = self.conversation_file
        if path is None or not path.is_file():
            return 0
        try:
            saved = chat_store.read_conversation(path)
        except (OSError, ValueError) as error:
            log.warning("The chat panel's saved conversation was not loaded: %s", error)
            return 0
        turns = [m for m in saved["messages"] if m["role"] in ("user", "assistant")]
        self._replace_conversation(saved["system_prompt"] or self.system_prompt.value, turns)
        return len(turns)

    def _replace_conversation(self, system_prompt: str, messages: Sequence[Mapping[str, str]]) -> None:
        with self._lock:
            self.messages.clear()
            self._left_out = 0
            self._render_history()
            self.system_prompt.value = system_prompt
            for m in messages:
                self._append(m["role"], m["content"], model=m.get("model", ""))

    def _set_input(self, text: str) -> None:
        self.input.value = text

    def _append(
        self, role: str, content: str, *, model: str = "", streaming: bool = False, extra: dict[str, Any] | None = None
    ) -> Message:
        view = widgets.HTML(layout=widgets.Layout(width="100%", margin="2px 0"))
        view.add_class("nbllm-message")
        view.add_class(f"nbllm-{role}")
        message = Message(role, content, view, model=model, streaming=streaming, extra=dict(extra or {}))
        with self._lock:
            self.messages.append(message)
            self._render(message)
            self._render_history()
        return message

    def _remove(self, message: Message) -> None:
        self.messages.remove(message)
        self._render_history()

    def _render_history(self) -> None:
        views = [m.view for m in self.messages]
        self.history_box.children = tuple(views) if views else (self._empty_hint,)

    def _render(self, message: Message) -> None:
        message.view.value = _bubble(message)

    def _show_busy(self, busy: bool) -> None:
        self.input.busy = busy
        self.send_button.disabled = busy
        self.regenerate_button.disabled = busy
        self.stop_button.disabled = not busy

    def _set_status(self, text: str, kind: str) -> None:
        self.status_kind = kind
        color = _STATUS_COLORS[kind]
        icon = {"error": "⚠ ", "stopped": "■ ", "done": "✓ "}.get(kind, "")
        self.status.value = (
            f'<span style="color:{color};font-size:12px;white-space:pre-wrap">{icon}{html.escape(text)}</span>'
        )


# --------------------------------------------------------------------- pure helpers


def _button(text: str, icon: str, style: str, css_class: str, on_click: Any) -> Any:
    button = widgets.Button(
        description=text, icon=icon, button_style=style, layout=widgets.Layout(width="auto", flex="0 0 auto")
    )
    button.add_class(css_class)
    button.on_click(on_click)
    return button


def _chat_message(message: Message) -> dict[str, Any]:
    extra = {k: v for k, v in message.extra.items() if k != "run"}
    return {"role": message.role, "content": message.content, **extra}


def _bubble(message: Message) -> str:
    if message.role == "tool":
        return _tool_bubble(message)
    user = message.role == "user"
    body = to_html(message.content, code_actions=not user) if message.content else ""
    if message.extra.get("tool_calls"):
        called = ", ".join(
            f"{c['function']['name']}({c['function']['arguments']})" for c in message.extra["tool_calls"]
        )
        body = f"<i>calls</i> <code>{html.escape(called)}</code>"
    if message.streaming:
        body += '<span style="opacity:0.45">▍</span>'
    name = "You" if user else html.escape(message.model or "assistant")
    footer = "" if user else _footer(message)
    if user:
        name += (
            f' <button type="button" class="nbllm-edit" data-message="{message.id}" title="Edit this message and '
            f'answer again from here" style="{_EDIT_STYLE}">Edit</button>'
        )
    return (
        f'<div style="display:flex;justify-content:{"flex-end" if user else "flex-start"}">'
        f'<div style="max-width:80%;{USER_BUBBLE if user else ASSISTANT_BUBBLE};padding:6px 12px;'
        'line-height:1.5;font-size:13px;overflow-wrap:anywhere">'
        f'<div style="font-size:11px;opacity:0.6;margin-bottom:1px">{name}</div>'
        f'<div class="nbllm-text">{body}</div>{footer}</div></div>'
    )


def _tool_bubble(message: Message) -> str:
    """A call and its result, collapsed: one line until opened."""
    run = message.extra.get("run")
    name = html.escape(str(message.extra.get("name", "tool")))
    detail = f"{run.seconds:.2f}s" if run is not None else ""
    if run is not None and run.error is not None:
        detail += " · " + html.escape(run.error)
    return (
        '<details style="margin:2px 0 2px 12px;font-size:12px;color:var(--jp-content-font-color2,#4b5563)">'
        f"<summary>tool <code>{name}</code> <span style='opacity:0.7'>{detail}</span></summary>"
        f"<pre style='white-space:pre-wrap;margin:4px 0'>{html.escape(message.content)}</pre></details>"
    )


def _footer(message: Message) -> str:
    """Under an answer: its length and speed, a mark if it was cut off, and a note if earlier
    messages were left out of what the model saw."""
    stats, lines = message.stats, []
    if message.note:
        lines.append(f'<div class="nbllm-note" style="{_NOTE_STYLE}">{html.escape(message.note)}</div>')
    if stats is not None:
        if stats.cached:
            detail = f"{stats.completion_tokens} tokens · from the prompt cache"
        else:
            detail = f"{stats.completion_tokens} tokens · {stats.tokens_per_second:.1f} t/s"
            if stats.finish_reason == "cancelled":
                detail += " · stopped"
        note = stats.truncation_note()
        if note:
            lines.append(f'<div class="nbllm-truncated" style="{_NOTE_STYLE}">{html.escape(note)}</div>')
        lines.append(f'<div class="nbllm-footer" style="font-size:11px;opacity:0.55;margin-top:2px">{detail}</div>')
    return "".join(lines)


def _live_status(stream: Stream, now: float) -> str:
    started, usage = stream.started, stream.usage
    tokens = stream.tokens
    parts = [f"Generating… {tokens} token{'' if tokens == 1 else 's'}"]
    if started is not None and now > started:
        parts.append(f"{tokens / (now - started):.1f} t/s")
    if started is not None and usage.first_token_at is not None:
        parts.append(f"first token {usage.first_token_at - started:.2f}s")
    return " · ".join(parts)


def _final_status(stats: RequestStats) -> str:
    if stats.cached:  # the summary says so
        return " · ".join([stats.summary(), stats.model])
    return " · ".join([stats.summary(), f"first token {stats.time_to_first_token:.2f}s", stats.model])


def _strip_tags(markup: str) -> str:
    return re.sub(r"<[^>]+>", "", markup)
