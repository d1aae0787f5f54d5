"""The live throughput chart on its own, following real streams from tiny generated models."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import nbllm.notebook.plots
from nbllm.engine import Engine, Stream
from nbllm.measure import tuner
from nbllm.notebook.plots import CACHED_COLOR, CURRENT_COLOR, STOPPED_COLOR, ThroughputChart

LONGEST = 200  # tokens: the longest stream these tests ask for
_long_seeds: dict[str, int] = {}


def long_stream(engine: Engine, tokens: int = 120) -> Stream:
    """A stream that runs to ``tokens``. The random model ends most answers early, so a seed that
    runs to LONGEST is looked up once per model; with it, any shorter stream runs to its end too."""
    assert tokens <= LONGEST
    model = engine.settings.default_model
    if model not in _long_seeds:
        finishes = (
            (seed, engine.generate("the", max_tokens=LONGEST, seed=seed).stats.finish_reason) for seed in range(300)
        )
        _long_seeds[model] = next((seed for seed, reason in finishes if reason == "length"), -1)
    assert _long_seeds[model] >= 0, "no seed gives a long answer from the tiny model"
    stream: Stream = engine.generate("the", stream=True, max_tokens=tokens, seed=_long_seeds[model])
    return stream


def finished(engine: Engine, **params: object) -> Stream:
    stream: Stream = engine.generate("the", stream=True, **{"max_tokens": 8, "seed": 1, **params})
    stream.result()
    return stream


def test_the_chart_is_a_plotly_figure_widget_with_a_live_curve_and_per_reply_bars() -> None:
    chart = nbllm.notebook.plots.ThroughputChart()
    assert type(chart.figure).__name__ == "FigureWidget"
    assert [trace.type for trace in chart.figure.data] == ["scatter", "scatter", "bar"]
    assert "application/vnd.jupyter.widget-view+json" in chart._repr_mimebundle_()


def test_watch_passes_every_piece_through_and_draws_the_reply(engine: Engine) -> None:
    chart = ThroughputChart()
    stream = long_stream(engine)
    pieces = list(chart.watch(stream))
    assert "".join(pieces) == stream.text
    assert stream.stats is not None
    reply = chart.replies[-1]
    assert reply.label == "#1"
    assert reply.tokens == stream.stats.completion_tokens == 120
    # The speed the status line shows (RequestStats.tokens_per_second): one speed, defined once.
    assert reply.tokens_per_second == pytest.approx(stream.stats.tokens_per_second)
    assert reply.model == "tiny-a"
    bars = chart.figure.data[2]
    assert list(bars.x) == ["#1"]
    assert bars.y[0] == pytest.approx(reply.tokens_per_second)
    assert list(bars.marker.color) == [CURRENT_COLOR]
    assert list(chart.figure.data[1].x) == reply.times


def test_track_follows_a_stream_consumed_elsewhere(engine: Engine) -> None:
    chart = ThroughputChart(interval=0.005)
    stream = long_stream(engine)
    tracker = chart.track(stream, label="mine")
    for _ in stream:
        time.sleep(0.004)  # a consumer doing some work per piece: half a second in all
    tracker.join(10)
    assert not tracker.is_alive()
    reply = chart.replies[-1]
    assert reply.label == "mine"
    assert reply.tokens == 120
    assert reply.tokens_per_second is not None
    assert reply.tokens_per_second > 0
    assert reply.times, "the tracker sampled the stream while it ran"
    assert list(chart.figure.data[2].x) == ["mine"]


def test_a_new_track_ends_the_previous_tracker(engine: Engine) -> None:
    chart = ThroughputChart(interval=0.005)
    never_consumed = engine.generate("the", stream=True, max_tokens=4, seed=1)
    first = chart.track(never_consumed)
    second = chart.track(finished(engine))
    first.join(5)
    second.join(5)
    assert not first.is_alive()
    assert not second.is_alive()
    never_consumed.close()


def test_track_gives_up_after_its_timeout(engine: Engine) -> None:
    chart = ThroughputChart(interval=0.005)
    stream = engine.generate("the", stream=True, max_tokens=4, seed=1)
    tracker = chart.track(stream, timeout=0.05)
    tracker.join(5)
    assert not tracker.is_alive()
    stream.close()


def test_figure_updates_are_throttled_to_the_interval(engine: Engine) -> None:
    chart = ThroughputChart(interval=0.1)
    stream = finished(engine, max_tokens=50)
    chart.start()
    before = chart.updates
    assert stream.started is not None
    start = stream.started
    stream.usage.first_token_at = start + 0.1
    for step in range(200):  # 2 s of samples, 100 a second
        chart.sample(stream, now=start + 0.5 + step * 0.01)
    assert chart.updates - before <= 21, "at most one figure update per 0.1 s"
    assert chart.updates - before >= 19
    assert len(chart.replies[-1].times) == 200, "every sample is kept; only drawing is throttled"


def test_watch_draws_far_less_often_than_tokens_arrive(engine: Engine) -> None:
    chart = ThroughputChart(interval=0.01)
    stream = long_stream(engine, tokens=200)
    started = time.perf_counter()
    for _ in chart.watch(stream):
        pass
    elapsed = time.perf_counter() - started
    assert chart.updates <= 3 + elapsed / chart.interval  # start, one per interval, the end


def test_the_live_rate_is_tokens_over_the_last_window(engine: Engine) -> None:
    chart = ThroughputChart(window=1.0)
    stream = finished(engine)
    usage = stream.usage
    assert stream.started is not None
    t0 = stream.started
    usage.first_token_at = t0 + 0.5
    chart.start()
    for step in range(1, 31):  # 50 tokens a second for 3 s
        usage.completion_tokens = 1 + 5 * step
        chart.sample(stream, now=t0 + 0.5 + step * 0.1)
    rates = chart.replies[-1].rates
    assert rates[-1] == pytest.approx(50, rel=0.01)
    assert chart.replies[-1].times[-1] == pytest.approx(3.5)
    for step in range(31, 41):  # then 10 tokens a second: the window follows within a second
        usage.completion_tokens += 1
        chart.sample(stream, now=t0 + 0.5 + step * 0.1)
    assert chart.replies[-1].rates[-1] == pytest.approx(10, rel=0.01)


def test_nothing_is_drawn_before_the_first_token(engine: Engine) -> None:
    chart = ThroughputChart()
    stream = engine.generate("the", stream=True, max_tokens=4, seed=1)
    chart.start()
    chart.sample(stream)  # not started: no clock, no tokens
    assert chart.replies[-1].times == []
    stream.close()


def test_past_replies_stay_as_a_faded_curve_and_bars(engine: Engine) -> None:
    chart = ThroughputChart()
    for _ in range(3):
        for _ in chart.watch(long_stream(engine, tokens=60)):
            pass
    assert [r.label for r in chart.replies] == ["#1", "#2", "#3"]
    assert list(chart.figure.data[2].x) == ["#1", "#2", "#3"]
    past_x = list(chart.figure.data[0].x)
    assert past_x.count(None) == 2, "the two earlier replies, each closed by a gap"
    assert list(chart.figure.data[1].x) == chart.replies[-1].times


def test_history_keeps_only_the_latest_replies(engine: Engine) -> None:
    chart = ThroughputChart(history=2)
    for _ in range(3):
        for _ in chart.watch(finished(engine)):
            pass
    assert [r.label for r in chart.replies] == ["#2", "#3"]


def test_stopped_and_cached_replies_are_marked(engine: Engine, cached_engine: Engine) -> None:
    chart = ThroughputChart()
    stream = long_stream(engine)
    for count, _ in enumerate(chart.watch(stream)):
        if count == 2:
            stream.stop()
    assert chart.replies[-1].stopped
    first = cached_engine.generate("the", stream=True, max_tokens=6, seed=5)
    for _ in chart.watch(first):
        pass
    again = cached_engine.generate("the", stream=True, max_tokens=6, seed=5)
    for _ in chart.watch(again):
        pass
    assert again.stats is not None
    assert again.stats.cached
    bars = chart.figure.data[2]
    assert next(iter(bars.marker.color)) == STOPPED_COLOR
    assert list(bars.marker.color)[-1] == CACHED_COLOR
    assert bars.text[-1] == "cache"
    assert chart.replies[-1].tokens_per_second == 0.0


def test_a_stream_that_fails_leaves_no_reply_on_the_chart(engine: Engine) -> None:
    chart = ThroughputChart()
    stream = engine.generate("the " * 2000, stream=True, max_tokens=4)  # longer than the context
    with pytest.raises(nbllm.ContextLengthError):
        for _ in chart.watch(stream):
            pass
    assert chart.replies == []


def test_clear_forgets_every_reply(engine: Engine) -> None:
    chart = ThroughputChart()
    for _ in chart.watch(finished(engine)):
        pass
    chart.clear()
    assert chart.replies == []
    assert list(chart.figure.data[2].x) == []
    assert list(chart.figure.data[1].x) == []


def test_a_reply_too_short_for_a_live_rate_still_gets_one_point(engine: Engine) -> None:
    chart = ThroughputChart()
    stream = long_stream(engine, tokens=6)
    stream.result()
    assert stream.stats is not None
    assert stream.started is not None
    # As if all six tokens came within 10 ms (a few milliseconds is usual for a tiny model).
    stream.usage.first_token_at = stream.started + stream.stats.total_seconds - 0.01
    chart.start()
    chart.finish(stream)
    reply = chart.replies[-1]
    assert reply.times == [stream.stats.total_seconds]
    assert reply.rates == [stream.stats.tokens_per_second]


# ---------------------------------------------------------------------------- benchmark and tuning figures


def _records(engine: Engine) -> list[dict[str, Any]]:
    from nbllm.measure.bench import bench

    return bench(engine, None, pp=16, tg=4, repetitions=2, threads=[1, 2], progress=False).records


def test_bench_figure_shows_each_setting_with_error_bars(engine: Engine) -> None:
    from nbllm.notebook.plots import bench_figure

    records = _records(engine)
    figure = bench_figure(records)
    pp, tg = figure.data
    assert list(pp.x) == ["tiny-a t=1", "tiny-a t=2"]
    assert list(pp.error_y.array) == [r["std"] for r in records if r["kind"] == "pp"]
    assert all("·" in text for text in tg.text), "each bar carries the guide's rating"


def test_threads_figure_draws_speed_against_threads(engine: Engine) -> None:
    from nbllm.notebook.plots import threads_figure

    figure = threads_figure(_records(engine))
    assert {trace.name for trace in figure.data} == {"tiny-a pp16", "tiny-a tg4"}
    assert all(list(trace.x) == [1, 2] for trace in figure.data)


def test_compare_figure_puts_two_files_side_by_side(engine: Engine) -> None:
    from nbllm.notebook.plots import compare_figure

    records = _records(engine)
    figure = compare_figure(records, records, labels=("laptop", "server"))
    assert [trace.name.split(":")[0] for trace in figure.data] == ["laptop", "server"]
    assert figure.layout.barmode == "group"


def test_the_live_benchmark_chart_grows_with_every_run(engine: Engine) -> None:
    from nbllm.measure.bench import bench
    from nbllm.notebook.plots import live_bench_chart

    figure, on_run = live_bench_chart()
    bench(engine, None, pp=8, tg=2, repetitions=3, progress=False, on_run=on_run)
    assert [len(trace.y) for trace in figure.data] == [3, 3]


def test_tuning_figure_marks_the_chosen_trial(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One panel per step, each value once (issue 18: b=512 showed twice, the bars were clipped
    and the label broke mid-name), the chosen value of each step in orange."""
    monkeypatch.setenv("NBLLM_HOME", str(tmp_path))
    result = tuner.tune(engine, progress=False)
    figure = result.figure()
    threads, batches = figure.data  # no GPU here: two steps
    by_step = {step: [t for t in result.trials if t.step == step] for step in ("threads", "batch")}
    assert list(threads.x) == [str(t.threads) for t in by_step["threads"]]
    assert list(batches.x) == [str(t.batch_size) for t in by_step["batch"]]
    assert list(batches.y) == [t.pp for t in by_step["batch"]], "the batch step is judged by prompt speed"
    for bars in (threads, batches):
        assert len(set(bars.x)) == len(bars.x), f"a value shows once: {bars.x}"
        assert bars.cliponaxis is False
        assert bars.textposition == "outside"
    for axis, bars in (("yaxis", threads), ("yaxis2", batches)):
        top = figure.layout[axis].range[1]
        assert top >= 1.15 * max(bars.y), "room above the tallest bar for its label"
    assert figure.layout.xaxis.type == figure.layout.xaxis2.type == "category"
    chosen = [
        x for bars in (threads, batches) for x, color in zip(bars.x, bars.marker.color, strict=True)
        if color == STOPPED_COLOR
    ]  # fmt: skip
    assert chosen == [str(result.best.threads), str(result.best.batch_size)]
    title = figure.layout.title.text
    assert title.startswith(f"Tuning {result.model}<br>"), "the model's name on a line of its own"
    assert f"chosen (orange): threads {result.best.threads}, batch {result.best.batch_size}" in title
