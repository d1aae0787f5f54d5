#!/usr/bin/env python3
"""What the live throughput chart (and the whole chat panel) costs generation, on the default model.

One process, one engine on Gemma 3 270M, the same prompt and seed every run. Each round
consumes one stream in each of these ways, in a rotating order:

- bare:  ``for piece in stream: pass``
- chart: ``for piece in ThroughputChart().watch(stream): pass`` (figure updates ~10 a second)
- panel: a ``ChatPanel`` reply (message, status line and chart redraws ~10 a second, on its
  worker thread), compared with a bare stream of the very same chat request consumed on a
  fresh thread too ("bare chat"), and on the main thread ("bare chat, main").

The last pair shows an effect that is not the panel's: llama.cpp is built with OpenMP, and once
the main thread has generated, its idle OpenMP team slows generation on any other thread
(measured here: 10% on the default model, 30% on tiny models; gone when every generation runs
on non-main threads). A panel reply is therefore compared with a bare stream on a thread of
its own, which pays the same.

The figure is a real plotly ``FigureWidget``; with no browser attached, its messages go to a
comm that JSON-encodes them as the kernel would, so the encoding is part of the cost. Each
speed is the decode phase (tokens after the first over the time after the first, from the
engine's own stats). The result is the median over rounds of the per-round ratio to bare.

Goal: chart >= 0.97x of bare (updates cost at most 3% of generation speed).

Run: .venv/bin/python benchmarks/chart_overhead.py [--rounds 7] [--tokens 192]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
from typing import Any

import comm
from comm.base_comm import BaseComm

from nbllm.core.config import Settings
from nbllm.engine import Engine, Stream
from nbllm.host.default_model import default_model_path

PROMPT = "Question: Explain in detail how a computer boots, step by step.\nAnswer:"
QUESTION = "Explain in detail how a computer boots, step by step."
SEED = 42


class EncodingComm(BaseComm):
    """A comm with no browser behind it that still pays for encoding each message."""

    messages = 0
    encoded_bytes = 0

    def publish_msg(
        self, msg_type: str, data: Any = None, metadata: Any = None, buffers: Any = None, **keys: Any
    ) -> None:
        encoded = json.dumps(data, default=str)  # what the kernel would do with every message
        if msg_type == "comm_msg":  # updates; not the widgets' creation
            EncodingComm.messages += 1
            EncodingComm.encoded_bytes += len(encoded)


def bare(engine: Engine, tokens: int) -> float:
    stream: Stream = engine.generate(PROMPT, stream=True, max_tokens=tokens, seed=SEED)
    for _ in stream:
        pass
    return speed(stream)


def with_chart(engine: Engine, tokens: int) -> float:
    from nbllm.notebook.plots import ThroughputChart

    chart = ThroughputChart()
    stream: Stream = engine.generate(PROMPT, stream=True, max_tokens=tokens, seed=SEED)
    for _ in chart.watch(stream):
        pass
    return speed(stream)


def panel_request(engine: Engine, tokens: int) -> Stream:
    """The stream of the request the panel sends (same messages, sampling settings and seed)."""
    from nbllm.notebook.widgets import ChatPanel

    params = {**ChatPanel(engine)._params(SEED), "max_tokens": tokens}
    stream: Stream = engine.chat([{"role": "user", "content": QUESTION}], stream=True, **params)
    return stream


def bare_chat(engine: Engine, tokens: int) -> float:
    """The panel's request, consumed bare on a fresh thread as the panel does: its baseline."""
    stream = panel_request(engine, tokens)
    worker = threading.Thread(target=lambda: [None for _ in stream])
    worker.start()
    worker.join()
    return speed(stream)


def bare_chat_main(engine: Engine, tokens: int) -> float:
    stream = panel_request(engine, tokens)
    for _ in stream:
        pass
    return speed(stream)


def with_panel(engine: Engine, tokens: int) -> float:
    from nbllm.notebook.widgets import ChatPanel

    engine.configure(generation={"seed": SEED})  # the panel sends no seed: this one
    try:
        panel = ChatPanel(engine)
        panel.max_tokens.value = tokens
        panel.send(QUESTION)
        assert panel.wait(600), "the panel's reply did not end"
        assert panel.last_stream is not None
        return speed(panel.last_stream)
    finally:
        engine.configure(generation={"seed": None})


def speed(stream: Stream) -> float:
    assert stream.stats is not None
    return stream.stats.generation_tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=192)
    args = parser.parse_args()
    comm.create_comm = EncodingComm  # ipywidgets asks this for every widget's comm

    default_model_path()  # assembled before timing starts
    engine = Engine(Settings().merged({"performance": {"context_size": 2048}, "cache": {"enabled": False}}))
    ways = {
        "bare": bare,
        "chart": with_chart,
        "bare chat": bare_chat,
        "panel": with_panel,
        "bare chat, main": bare_chat_main,
    }
    for way in ways.values():  # warm-up: load the model, import plotly and ipywidgets
        way(engine, 16)
    EncodingComm.messages = EncodingComm.encoded_bytes = 0

    speeds: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for round_number in range(args.rounds):
        order = names[round_number % len(names) :] + names[: round_number % len(names)]
        for name in order:
            speeds[name].append(ways[name](engine, args.tokens))
        line = "  ".join(f"{name} {speeds[name][-1]:5.1f}" for name in names)
        print(f"round {round_number + 1}: {line} t/s")
    engine.close()

    chart_ratios = [c / b for c, b in zip(speeds["chart"], speeds["bare"], strict=True)]
    panel_ratios = [p / b for p, b in zip(speeds["panel"], speeds["bare chat"], strict=True)]
    print(f"\nmedian decode speed: bare {statistics.median(speeds['bare']):.1f} t/s, "
          f"with chart {statistics.median(speeds['chart']):.1f} t/s; "
          f"bare chat {statistics.median(speeds['bare chat']):.1f} t/s, "
          f"with panel {statistics.median(speeds['panel']):.1f} t/s, "
          f"bare chat on the main thread {statistics.median(speeds['bare chat, main']):.1f} t/s")  # fmt: skip
    print(f"widget update messages: {EncodingComm.messages} ({EncodingComm.encoded_bytes / 1e6:.2f} MB encoded)")
    chart = statistics.median(chart_ratios)
    panel = statistics.median(panel_ratios)
    print(f"chart / bare: {chart:.3f}x (per round: {', '.join(f'{r:.3f}' for r in chart_ratios)})")
    rounds = ", ".join(f"{r:.3f}" for r in panel_ratios)
    print(f"panel / bare chat (both on a fresh thread): {panel:.3f}x (per round: {rounds})")
    thread_ratios = [t / m for t, m in zip(speeds["bare chat"], speeds["bare chat, main"], strict=True)]
    print(f"bare chat on a thread / on the main thread: {statistics.median(thread_ratios):.3f}x (OpenMP, see above)")
    print(f"goal chart >= 0.97x: {'met' if chart >= 0.97 else 'NOT met'}")


if __name__ == "__main__":
    main()
