"""The chat panel: a conversation with a local model, streamed into a notebook.

A front end like the magics: it builds a request from its widgets, calls ``Engine.stream``
(the one generation path) and shows what comes back. The stream is consumed on a worker
thread, so the kernel stays free to receive the Stop click while tokens flow; the worker
redraws the message, the status line and the throughput chart at most ``1 / update_interval``
times a second, because every redraw is a message to the browser and the model must not wait
for the front end.

``nbllm.ChatPanel()`` displays itself. In tests and scripts, ``panel.send("...")``,
``panel.stop()``, ``panel.regenerate()``, ``panel.clear()`` and ``panel.wait()`` do what the
buttons do.
"""

from __future__ import annotations

import html
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from nbllm.core.errors import NbllmError, StructuredOutputError
from nbllm.core.tools import make_toolset
from nbllm.engine.tool_loop import result_for_model, run_call
from nbllm.notebook.plots import ThroughputChart
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
CHART_WIDTH = 820  # px: fits JupyterLab's notebook column (plotly cannot size a widget to its container)
_STATUS_COLORS = {
    "ready": "var(--jp-content-font-color2,#4b5563)",
    "busy": "#1d4ed8",
    "done": "#15803d",
    "stopped": "#b45309",
    "error": "#dc2626",
}


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
        self._build(model, system_prompt)
        self._set_status(f"Ready. {self.model.value} answers; Enter sends.", "ready")

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
        return [
            {"role": m.role, "content": m.content, **{k: v for k, v in m.extra.items() if k != "run"}}
            for m in self.messages
        ]

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
        self._append("user", text)
        return self._answer()

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
            self._render_history()
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
        try:
            request = self.engine.make_request(messages=self._conversation(), model=model, params=self._params(seed))
            stream = self.engine.stream(request)  # an unknown or missing model fails here, at once
        except NbllmError as error:
            self._set_status(str(error), "error")
            return False
        self.last_stream = stream
        job = _Job(stream, self._append("assistant", "", model=model, streaming=True))
        job.thread = threading.Thread(target=self._run, args=(job,), name="nbllm-chat-reply", daemon=True)
        self._job = job
        self._show_busy(True)
        self._set_status(f"Waiting for {model}…", "busy")
        job.thread.start()
        return True

    def _conversation(self) -> list[dict[str, str]]:
        system = self.system_prompt.value.strip()
        prefix = [{"role": "system", "content": system}] if system else []
        return prefix + self.history

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

    def _run(self, job: _Job) -> None:
        """The worker thread: consume the stream, redraw now and then, never raise. With tools,
        a reply that is calls runs them and the model goes on from their results."""
        try:
            self._consume(job)
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

    def _consume(self, job: _Job) -> None:
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
        request = self.engine.make_request(messages=self._conversation(), model=model, params=params)
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

        self.history_box = widgets.VBox(layout=widgets.Layout(width="100%", padding="4px 8px"))
        self.history_box.add_class("nbllm-history")
        self._empty_hint = widgets.HTML(
            '<div style="color:var(--jp-content-font-color3,#9ca3af);text-align:center;padding:28px 0">'
            "Ask something below. Enter sends; replies stream in here.</div>",
            layout=widgets.Layout(width="100%"),
        )
        # column-reverse keeps the view pinned to the newest message while a reply grows.
        scroller = widgets.Box(
            [self.history_box],
            layout=widgets.Layout(
                flex_flow="column-reverse", overflow="auto", min_height="120px", max_height="360px", width="100%",
                border="1px solid var(--jp-border-color2,#e5e7eb)",
            ),
        )  # fmt: skip

        self.input = widgets.Textarea(
            placeholder="Message (Enter sends)",
            rows=2,
            continuous_update=True,  # every keystroke reaches the kernel: that is how Enter is seen
            layout=widgets.Layout(flex="1 1 auto", width="auto", height="52px"),
        )
        self.input.add_class("nbllm-input")
        self.input.observe(self._on_input_change, names="value")
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
            ],
            layout=widgets.Layout(width="100%", max_width="880px", padding="4px"),
        )
        self.widget.add_class("nbllm-chat")
        self._render_history()

    def _on_input_change(self, change: dict[str, Any]) -> None:
        text = _without_typed_newline(str(change["old"]), str(change["new"]))
        if text is None:
            return  # ordinary typing (or our own reset of the box)
        if self.busy or not text.strip():
            self._set_input(text)
            if self.busy:
                self._set_status("Still answering: wait, or press Stop first.", "busy")
            return
        self.send(text)

    def _on_model_change(self, change: dict[str, Any]) -> None:
        if not self.busy:
            self._set_status(f"{change['new']} answers the next message.", "ready")

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


def _without_typed_newline(old: str, new: str) -> str | None:
    """``new`` minus the newline Enter just put into it, or None if Enter was not what happened.

    The text box sends its whole value on every keystroke; Enter shows up as exactly one new
    character, a newline. A pasted multi-line text adds more than one character and stays a
    draft, to be sent with the Send button.
    """
    if len(new) != len(old) + 1:
        return None
    at = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), len(old))
    without = new[:at] + new[at + 1 :]
    return without if new[at] == "\n" and without == old else None


def _bubble(message: Message) -> str:
    if message.role == "tool":
        return _tool_bubble(message)
    body = to_html(message.content) if message.content else ""
    if message.extra.get("tool_calls"):
        called = ", ".join(
            f"{c['function']['name']}({c['function']['arguments']})" for c in message.extra["tool_calls"]
        )
        body = f"<i>calls</i> <code>{html.escape(called)}</code>"
    if message.streaming:
        body += '<span style="opacity:0.45">▍</span>'
    user = message.role == "user"
    name = "You" if user else (message.model or "assistant")
    footer = "" if user or message.stats is None else _footer(message.stats)
    return (
        f'<div style="display:flex;justify-content:{"flex-end" if user else "flex-start"}">'
        f'<div style="max-width:80%;{USER_BUBBLE if user else ASSISTANT_BUBBLE};padding:6px 12px;'
        'line-height:1.5;font-size:13px;overflow-wrap:anywhere">'
        f'<div style="font-size:11px;opacity:0.6;margin-bottom:1px">{html.escape(name)}</div>'
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


def _footer(stats: RequestStats) -> str:
    if stats.cached:
        detail = f"{stats.completion_tokens} tokens · from the prompt cache"
    else:
        detail = f"{stats.completion_tokens} tokens · {stats.tokens_per_second:.1f} t/s"
        if stats.finish_reason == "cancelled":
            detail += " · stopped"
    return f'<div style="font-size:11px;opacity:0.55;margin-top:2px">{detail}</div>'


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
