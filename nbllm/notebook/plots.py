"""Plotly figures for notebooks: the live throughput chart, benchmark and tuning figures.

``ThroughputChart`` draws tokens/s of a reply while it streams (left) and the decoding speed of
every past reply (right). It works on any ``nbllm`` stream::

    chart = nbllm.notebook.plots.ThroughputChart()
    display(chart)
    for piece in chart.watch(nbllm.chat("What is Docker?", stream=True)):
        print(piece, end="")

or, when something else consumes the stream, ``chart.track(stream)`` follows it from a thread.

The chart must never slow generation down: the figure is updated at most ``1 / interval``
times a second, each update sends whole arrays in one batched message, and between updates
the cost per token is one clock read. A front-end module: plotly is imported here, never by
the core.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from nbllm.core.metrics import RequestStats
    from nbllm.engine import Stream

__all__ = [
    "ReplyTrace",
    "ThroughputChart",
    "bench_figure",
    "compare_figure",
    "embedding_map",
    "live_bench_chart",
    "live_throughput_figure",
    "threads_figure",
    "tuning_figure",
]

CURRENT_COLOR = "#2563eb"
PAST_COLOR = "rgba(100, 116, 139, 0.45)"
CACHED_COLOR = "#a3a3a3"
STOPPED_COLOR = "#f59e0b"
MIN_SPAN = 0.15  # seconds: the shortest span measured as a rate (the first tokens come in bursts)


@dataclass
class ReplyTrace:
    """The throughput curve of one reply and, once it ended, its overall speed."""

    label: str
    times: list[float] = field(default_factory=list)  # seconds since the request started
    rates: list[float] = field(default_factory=list)  # tokens/s over the last ``window`` seconds
    # The reply's speed once it ended, RequestStats.tokens_per_second: the number the status line
    # and the answer's footer show too (one speed, defined once, in core/metrics.py).
    tokens_per_second: float | None = None
    tokens: int = 0
    cached: bool = False
    stopped: bool = False
    model: str = ""


class ThroughputChart:
    """A live tokens/s chart (a plotly ``FigureWidget``) for nbllm streams.

    ``interval`` is the least time between two figure updates (0.1 s: 10 updates a second);
    ``window`` the span over which the live rate is measured, so that the curve shows speed
    changes without jumping at every token; ``history`` how many past replies stay on the chart.
    """

    def __init__(
        self,
        *,
        interval: float = 0.1,
        window: float = 1.0,
        history: int = 30,
        width: int | None = None,
        height: int = 230,
        title: str = "",
    ) -> None:
        self.interval = interval
        self.window = window
        self.history = history
        self.replies: list[ReplyTrace] = []
        self.updates = 0  # figure updates sent so far: the throttle's tests read this
        self._started = 0  # replies begun, for their default labels (#1, #2, ...)
        self._lock = threading.RLock()  # the panel's worker and the kernel thread both draw
        self._recent: deque[tuple[float, int]] = deque()
        self._last_update = 0.0
        self._tracking = 0  # bumped by track(): an older tracker thread sees it and ends
        self.figure: Any = _make_figure(width, height, title)

    # ----------------------------------------------------------------- following a stream

    def watch(self, stream: Stream, label: str | None = None) -> Iterator[str]:
        """Yield ``stream``'s pieces, drawing its throughput as they come."""
        self.start(label)
        next_update = 0.0
        try:
            for piece in stream:
                now = time.perf_counter()
                if now >= next_update:  # one clock read per token; drawing ~10 times a second
                    next_update = now + self.interval
                    self.sample(stream, now)
                yield piece
        finally:
            self.finish(stream)

    def track(self, stream: Stream, label: str | None = None, *, timeout: float | None = None) -> threading.Thread:
        """Follow ``stream`` from a background thread while something else consumes it.

        Returns the thread (``join()`` it to wait for the final point). It ends when the stream
        ends, when ``timeout`` seconds have passed, or when another ``track`` begins.
        """
        with self._lock:
            self._tracking += 1
            ticket = self._tracking
        self.start(label)
        thread = threading.Thread(
            target=self._follow, args=(stream, ticket, timeout), name="nbllm-chart-track", daemon=True
        )
        thread.start()
        return thread

    def _follow(self, stream: Stream, ticket: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while stream.stats is None and self._tracking == ticket:
            if deadline is not None and time.monotonic() > deadline:
                return
            time.sleep(self.interval)
            self.sample(stream, time.perf_counter())
        if self._tracking == ticket:
            self.finish(stream)

    # ----------------------------------------------------------------- the building blocks

    def start(self, label: str | None = None) -> ReplyTrace:
        """Begin a new reply: the previous one joins the faded history curve."""
        with self._lock:
            self._started += 1
            reply = ReplyTrace(label or f"#{self._started}")
            self.replies.append(reply)
            del self.replies[: -self.history]
            self._recent.clear()
            self._push(draw_bars=False)
            return reply

    @property
    def current(self) -> ReplyTrace | None:
        return self.replies[-1] if self.replies else None

    def sample(self, stream: Stream, now: float | None = None) -> None:
        """Add the stream's current rate to the curve, and draw it unless drawn within ``interval``."""
        now = time.perf_counter() if now is None else now
        first_token_at = stream.usage.first_token_at
        tokens = stream.usage.completion_tokens
        with self._lock:
            reply = self.current
            if reply is None or stream.started is None or first_token_at is None or tokens < 1:
                return  # nothing generated yet: the prompt is still being read
            rate = self._rate(first_token_at, tokens, now)
            reply.tokens = tokens
            if rate is not None:
                reply.times.append(now - stream.started)
                reply.rates.append(rate)
            if now - self._last_update >= self.interval:
                self._push(draw_bars=False)
                self._last_update = now

    def _rate(self, first_token_at: float, tokens: int, now: float) -> float | None:
        """Tokens/s over the last ``window`` seconds (since the first token, at the start)."""
        recent = self._recent
        if not recent:
            recent.append((first_token_at, 1))
        while len(recent) > 1 and recent[1][0] <= now - self.window:
            recent.popleft()
        since, counted = recent[0]
        recent.append((now, tokens))
        elapsed = now - since
        if elapsed < min(MIN_SPAN, self.window):  # too short to be a rate: a burst of the first tokens
            return None
        return (tokens - counted) / elapsed

    def finish(self, stream: Stream) -> None:
        """Close the current reply with its final numbers, and draw everything once more."""
        stats = stream.stats
        with self._lock:
            reply = self.current
            if reply is None:
                return
            if stats is None:  # it failed before generating: nothing to show
                self.replies.remove(reply)
            else:
                if not stats.cached and stream.started is not None:
                    self._last_point(reply, stream, stats)
                self._record_final(reply, stats)
            self._push(draw_bars=True)

    def _last_point(self, reply: ReplyTrace, stream: Stream, stats: RequestStats) -> None:
        assert stream.started is not None
        end = stream.started + stats.total_seconds
        self.sample(stream, now=end)
        if not reply.times and stats.tokens_per_second > 0:
            # Too short for a live rate: one point with the reply's own speed, so it still shows.
            reply.times.append(stats.total_seconds)
            reply.rates.append(stats.tokens_per_second)

    def _record_final(self, reply: ReplyTrace, stats: RequestStats) -> None:
        reply.tokens = stats.completion_tokens
        reply.model = stats.model
        reply.cached = stats.cached
        reply.stopped = stats.finish_reason == "cancelled"
        # A cached answer was not generated: its "speed" would be a replay speed.
        reply.tokens_per_second = 0.0 if stats.cached else stats.tokens_per_second

    def clear(self) -> None:
        """Forget every reply."""
        with self._lock:
            self._tracking += 1
            self._started = 0
            self.replies.clear()
            self._recent.clear()
            self._push(draw_bars=True)

    # ----------------------------------------------------------------- drawing

    def _push(self, *, draw_bars: bool) -> None:
        """One batched figure update: every array in one message, not one per property."""
        past, current = self.replies[:-1], self.current
        past_x: list[float | None] = []
        past_y: list[float | None] = []
        for reply in past[-5:]:  # more faded curves would only be noise
            past_x += [*reply.times, None]
            past_y += [*reply.rates, None]
        figure = self.figure
        with figure.batch_update():
            figure.data[0].x, figure.data[0].y = past_x, past_y
            figure.data[1].x = list(current.times) if current else []
            figure.data[1].y = list(current.rates) if current else []
            if draw_bars:
                done = [r for r in self.replies if r.tokens_per_second is not None]
                bars = figure.data[2]
                bars.x = [r.label for r in done]
                bars.y = [r.tokens_per_second for r in done]
                bars.text = [_bar_text(r) for r in done]
                bars.hovertext = [_bar_hover(r) for r in done]
                bars.marker.color = [_bar_color(r) for r in done]
        self.updates += 1

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        with self._lock:
            return self.figure._repr_mimebundle_(**kwargs)


def speed_text(tokens_per_second: float) -> str:
    """A speed as every front end writes it (RequestStats.summary's ``20.5 t/s``)."""
    return f"{tokens_per_second:.1f}"


def _bar_text(reply: ReplyTrace) -> str:
    return "cache" if reply.cached else speed_text(reply.tokens_per_second or 0.0)


def _bar_hover(reply: ReplyTrace) -> str:
    if reply.cached:
        return f"{reply.label}: from the prompt cache ({reply.tokens} tokens)"
    state = " (stopped)" if reply.stopped else ""
    return (
        f"{reply.label}: {speed_text(reply.tokens_per_second or 0.0)} t/s over the reply, {reply.tokens} tokens{state}"
        f" · {reply.model}"
    )


def _bar_color(reply: ReplyTrace) -> str:
    if reply.cached:
        return CACHED_COLOR
    return STOPPED_COLOR if reply.stopped else CURRENT_COLOR


def _make_figure(width: int | None, height: int, title: str) -> Any:
    # Built whole as a plain figure first: the widget sends its full state once, when created.
    figure = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.74, 0.26],
        horizontal_spacing=0.09,
        # The curve is the instantaneous rate (over the last ``window``), so it peaks above the
        # reply's speed; the bars are the speed the status line shows.
        subplot_titles=("instantaneous t/s", "t/s per reply"),
    )
    line = {"shape": "spline", "smoothing": 0.6}
    figure.add_scatter(
        x=[], y=[], mode="lines", name="earlier replies", line={**line, "color": PAST_COLOR, "width": 1.5},
        hoverinfo="skip", row=1, col=1,
    )  # fmt: skip
    figure.add_scatter(
        x=[], y=[], mode="lines", name="this reply", line={**line, "color": CURRENT_COLOR, "width": 2.5},
        fill="tozeroy", fillcolor="rgba(37, 99, 235, 0.08)",
        hovertemplate="%{x:.1f}s: %{y:.1f} t/s instantaneous<extra></extra>", row=1, col=1,
    )  # fmt: skip
    figure.add_bar(
        x=[], y=[], name="per reply", textposition="outside", cliponaxis=False,
        hovertemplate="%{hovertext}<extra></extra>", row=1, col=2,
    )  # fmt: skip
    figure.update_layout(
        width=width,  # None: plotly's default (the widget cannot follow its container's width)
        height=height,
        margin={"l": 44, "r": 12, "t": 34 if not title else 56, "b": 32},
        title={"text": title} if title else None,
        template="plotly_white",
        showlegend=False,
        font={"size": 11},
        bargap=0.35,
        uirevision="nbllm",  # keep the user's zoom while data flows in
    )
    figure.update_xaxes(title_text="seconds", title_standoff=4, rangemode="tozero", row=1, col=1)
    figure.update_yaxes(rangemode="tozero", row=1, col=1)
    figure.update_yaxes(rangemode="tozero", showticklabels=False, row=1, col=2)
    figure.update_xaxes(type="category", row=1, col=2)
    figure.update_annotations(font_size=12)
    try:
        return go.FigureWidget(figure)
    except ImportError as error:  # plotly >= 6 builds its FigureWidget on anywidget
        raise ImportError(
            f"The live chart needs plotly's FigureWidget, which could not be created ({error}). "
            "Install anywidget: `pip install anywidget`."
        ) from error


# ---------------------------------------------------------------------------- benchmarks and tuning

BENCH_COLORS = ("#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#64748b")


def _setting_label(record: Mapping[str, Any], varying: Sequence[str]) -> str:
    parts = [record["model"]["name"]]
    names = {"threads": "t", "batch_size": "b", "context_size": "ctx", "gpu_layers": "ngl"}
    parts += [f"{names[key]}={record['settings'][key]}" for key in varying]
    return " ".join(parts)


def _varying(records: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = ("threads", "batch_size", "context_size", "gpu_layers")
    return [k for k in keys if len({r["settings"][k] for r in records}) > 1]


def bench_figure(records: Sequence[Mapping[str, Any]], title: str = "Benchmark") -> Any:
    """Mean t/s with ± std error bars, one bar per model and setting; pp and tg side by side."""
    varying = _varying(records)
    kinds = [k for k in ("pp", "tg") if any(r["kind"] == k for r in records)]
    figure = make_subplots(
        rows=1, cols=len(kinds) or 1, subplot_titles=[f"{k} (tokens/s)" for k in kinds], horizontal_spacing=0.12
    )
    for column, kind in enumerate(kinds, start=1):
        chosen = [r for r in records if r["kind"] == kind]
        figure.add_bar(
            x=[_setting_label(r, varying) for r in chosen],
            y=[r["tokens_per_second"] for r in chosen],
            error_y={"type": "data", "array": [r["std"] for r in chosen], "visible": True},
            text=[f"{r['tokens_per_second']:.1f} · {r['rating']}" for r in chosen],
            textposition="outside",
            cliponaxis=False,
            marker_color=BENCH_COLORS[column - 1],
            hovertemplate="%{x}<br>%{y:.1f} t/s<extra>" + kind + "</extra>",
            row=1,
            col=column,
        )
    figure.update_layout(title=title, template="plotly_white", showlegend=False, height=380, bargap=0.4)
    figure.update_yaxes(rangemode="tozero")
    return figure


def threads_figure(records: Sequence[Mapping[str, Any]], title: str = "Speed against threads") -> Any:
    """t/s against the thread count, one line per model and test, with error bars."""
    figure = go.Figure()
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["model"]["name"], record["test"]), []).append(record)
    for index, ((model, test), chosen) in enumerate(sorted(groups.items())):
        chosen = sorted(chosen, key=lambda r: r["settings"]["threads"])
        figure.add_scatter(
            x=[r["settings"]["threads"] for r in chosen],
            y=[r["tokens_per_second"] for r in chosen],
            error_y={"type": "data", "array": [r["std"] for r in chosen], "visible": True},
            mode="lines+markers",
            name=f"{model} {test}",
            line={"color": BENCH_COLORS[index % len(BENCH_COLORS)]},
        )
    figure.update_layout(title=title, template="plotly_white", height=360, xaxis_title="threads")
    figure.update_yaxes(title_text="tokens/s", rangemode="tozero")
    figure.update_xaxes(dtick=1)
    return figure


def compare_figure(
    first: Sequence[Mapping[str, Any]], second: Sequence[Mapping[str, Any]], labels: tuple[str, str] = ("A", "B")
) -> Any:
    """Two result files side by side: the same tests, grouped bars with error bars."""
    varying = _varying([*first, *second])

    def key(record: Mapping[str, Any]) -> str:
        return f"{_setting_label(record, varying)} {record['test']}"

    figure = go.Figure()
    for index, (label, records) in enumerate(zip(labels, (first, second), strict=True)):
        figure.add_bar(
            x=[key(r) for r in records],
            y=[r["tokens_per_second"] for r in records],
            error_y={"type": "data", "array": [r["std"] for r in records], "visible": True},
            name=f"{label}: {records[0]['machine']['cpu'] if records else ''}",
            marker_color=BENCH_COLORS[index],
        )
    figure.update_layout(
        title="Benchmark comparison", template="plotly_white", barmode="group", height=380, yaxis_title="tokens/s"
    )
    return figure


def live_bench_chart(title: str = "Benchmark runs (live)") -> tuple[Any, Callable[[Mapping[str, Any], float], None]]:
    """A FigureWidget and the ``on_run`` callback that adds each timed run to it as it finishes."""
    figure = go.FigureWidget(
        layout={
            "title": title,
            "template": "plotly_white",
            "height": 300,
            "yaxis_title": "tokens/s",
            "xaxis_title": "run",
        }
    )
    traces: dict[str, Any] = {}
    lock = threading.Lock()

    def on_run(record: Mapping[str, Any], tokens_per_second: float) -> None:
        label = f"{record['model']['name']} {record['test']} t={record['settings']['threads']}"
        with lock, figure.batch_update():
            if label not in traces:
                figure.add_scatter(x=[], y=[], mode="lines+markers", name=label)
                traces[label] = figure.data[-1]
            trace = traces[label]
            trace.x = (*trace.x, len(trace.x) + 1)
            trace.y = (*trace.y, tokens_per_second)

    return figure, on_run


def live_throughput_figure(title: str) -> tuple[Any, Callable[[float, float], None]]:
    """A FigureWidget line of tokens/s over time and ``update(seconds, tokens_per_second)``:
    the aggregate speed of a batch (``%%llm --map``)."""
    figure = go.FigureWidget(
        layout={
            "title": title, "template": "plotly_white", "height": 260, "xaxis_title": "seconds",
            "yaxis": {"title": "tokens/s", "rangemode": "tozero"}, "margin": {"t": 40, "b": 40},
        }
    )  # fmt: skip
    figure.add_scatter(x=[], y=[], mode="lines", line={"color": CURRENT_COLOR, "width": 2.5}, fill="tozeroy")
    lock = threading.Lock()

    def update(seconds: float, tokens_per_second: float) -> None:
        with lock, figure.batch_update():
            trace = figure.data[0]
            trace.x = (*trace.x, seconds)
            trace.y = (*trace.y, tokens_per_second)

    return figure, update


# Each step of the tuner varies one setting and is judged by one speed: a panel each, so that
# a value shows once (the batch step's b=512 is not the threads step's b=512 again) and the
# generation speed the batch step only carries over is not drawn as if it were measured.
_TUNING_STEPS = (
    ("threads", "threads → generation t/s", "tg", "threads"),
    ("batch", "batch size → prompt t/s", "pp", "batch size"),
    ("gpu", "GPU layers → generation t/s", "tg", "GPU layers (fa: flash attention)"),
)


def _tuning_value(trial: Any, step: str) -> str:
    if step == "threads":
        return str(trial.threads)
    if step == "batch":
        return str(trial.batch_size)
    return f"{trial.gpu_layers}" + (" fa" if trial.flash_attention else "")


def tuning_figure(result: Any) -> Any:
    """What the tuner tried, one panel per step (threads by generation speed, batch size by prompt
    speed, GPU layers on a GPU), each value once, the chosen one in orange."""
    best = result.best
    steps = [step for step in _TUNING_STEPS if any(t.step == step[0] for t in result.trials)]
    figure = make_subplots(
        rows=1, cols=max(len(steps), 1), subplot_titles=[title for _, title, _, _ in steps], horizontal_spacing=0.1
    )
    for column, (step, _, speed, axis) in enumerate(steps, start=1):
        trials = [t for t in result.trials if t.step == step]
        values = [getattr(t, speed) or 0.0 for t in trials]
        chosen = [_tuning_value(t, step) == _tuning_value(best, step) and t.error is None for t in trials]
        figure.add_bar(
            x=[_tuning_value(t, step) for t in trials],
            y=values,
            marker_color=[STOPPED_COLOR if c else CURRENT_COLOR for c in chosen],
            text=["failed" if t.error else f"{v:.0f}" for t, v in zip(trials, values, strict=True)],
            textposition="outside",
            cliponaxis=False,  # the value above the tallest bar stays visible
            hovertext=[t.error or f"{speed} {v:.1f} t/s" for t, v in zip(trials, values, strict=True)],
            hoverinfo="x+text",
            showlegend=False,
            row=1,
            col=column,
        )
        # Headroom above the tallest bar for its label; categories, so 512 is never drawn as 5e2.
        figure.update_yaxes(range=[0, max(values, default=0.0) * 1.2 or 1.0], row=1, col=column)
        figure.update_xaxes(title_text=axis, type="category", row=1, col=column)
    figure.update_yaxes(title_text="tokens/s", row=1, col=1)
    best_text = f"threads {best.threads}, batch {best.batch_size}" + (
        f", GPU layers {best.gpu_layers}" if any(t.step == "gpu" for t in result.trials) else ""
    )
    figure.update_layout(
        # The model's name on a line of its own: a long name never breaks mid-word into the rest.
        title={
            "text": f"Tuning {result.model}<br><sup>{len(result.trials)} trials in {result.seconds:.1f}s · "
            f"chosen (orange): {best_text}</sup>"
        },
        template="plotly_white",
        height=400,
        margin={"t": 110},
        bargap=0.35,
    )
    return figure


# ---------------------------------------------------------------------------- embeddings


def project_2d(vectors: Any) -> tuple[Any, tuple[float, float]]:
    """The rows of ``vectors`` on their two principal axes (PCA by SVD, numpy only), and the
    share of the variance each axis shows."""
    import numpy as np

    data = np.asarray(vectors, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] < 1 or data.shape[1] < 1:
        raise ValueError(f"vectors must be a 2-D array with one row per text, not of shape {data.shape}.")
    if not np.isfinite(data).all():
        raise ValueError("vectors hold NaN or infinite values.")
    centered = data - data.mean(axis=0)
    _, singular, axes = np.linalg.svd(centered, full_matrices=False)
    coordinates = centered @ axes[:2].T
    if coordinates.shape[1] < 2:  # one row, or one dimension: the second axis is flat
        coordinates = np.hstack([coordinates, np.zeros((len(data), 2 - coordinates.shape[1]))])
    variance = singular**2
    total = float(variance.sum()) or 1.0
    shares = [float(v) / total for v in variance[:2]] + [0.0, 0.0]
    return coordinates, (shares[0], shares[1])


def embedding_map(
    vectors: Any, labels: Sequence[Any] | None = None, hover: Sequence[str] | None = None, title: str = "Embedding map"
) -> Any:
    """A 2-D map of embedding vectors (``nbllm.embed``'s rows, or an ``nbllm.Index``) as a plotly
    scatter: texts close in meaning lie close together. ``labels`` colour the points (one trace
    per label, with a legend); ``hover`` shows each point's text (an Index's texts by default)."""
    if hasattr(vectors, "vectors") and hasattr(vectors, "texts"):  # an nbllm.Index
        hover = list(vectors.texts) if hover is None else hover
        vectors = vectors.vectors
    coordinates, (first, second) = project_2d(vectors)
    count = len(coordinates)
    # By position (a pandas Series would be indexed by its labels), as text: a missing value
    # (NaN, None) is a group of its own, "missing", and any label can be a legend entry.
    labels = [_label(value) for value in labels] if labels is not None else None
    hover = list(hover) if hover is not None else None
    for name, values in (("labels", labels), ("hover", hover)):
        if values is not None and len(values) != count:
            raise ValueError(f"{name} has {len(values)} items for {count} vectors: give one per vector.")
    texts = [_short(str(t)) for t in hover] if hover is not None else [f"#{i}" for i in range(count)]
    figure = go.Figure()
    members: dict[str | None, list[int]] = {}
    for i in range(count):
        members.setdefault(labels[i] if labels is not None else None, []).append(i)
    for group, rows in members.items():
        figure.add_scatter(
            x=coordinates[rows, 0], y=coordinates[rows, 1], mode="markers", name="" if group is None else str(group),
            text=[texts[i] for i in rows], hovertemplate="%{text}<extra></extra>", marker={"size": 8, "opacity": 0.8},
        )  # fmt: skip
    figure.update_layout(
        title={"text": title}, template="plotly_white", showlegend=labels is not None, height=480,
        xaxis_title=f"first axis ({first:.0%} of the variance)", yaxis_title=f"second axis ({second:.0%})",
    )  # fmt: skip
    return figure


def _label(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "missing"
    return str(value)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
