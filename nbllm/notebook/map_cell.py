"""``%%llm --map NAME``: the cell's prompt once per element of a list, Series or DataFrame, answered
together (``generate_many`` / ``chat_many``), with a live chart of the aggregate tokens/s."""

from __future__ import annotations

import html
import threading
import time
from argparse import Namespace
from collections.abc import Sequence
from typing import Any

from IPython.core.error import UsageError

import nbllm
from nbllm.core.params import resolve_params
from nbllm.engine import BatchInterrupted
from nbllm.notebook.display import display, display_widget
from nbllm.notebook.interpolation import interpolate
from nbllm.notebook.live_output import AnswerInterrupted
from nbllm.notebook.parsers import generation_params, structure_params


def run_map_cell(
    args: Namespace, cell: str, namespace: dict[str, Any], *, interpolate_names: bool, default_model: str | None
) -> None:
    """Answer every element of ``namespace[args.map]`` and store the answers in the notebook.

    ``interpolate_names``: fill the notebook's ``{name}`` too; the element's own (``{item}``,
    ``{row.column}``, ``{index}``) are what --map is for, so they are always filled.
    """
    from nbllm.core.mapping import answers_into, prompts_for

    if args.chat:
        raise UsageError("--map and --chat do not go together: each element is its own conversation.")
    if args.map not in namespace:
        raise UsageError(f"--map {args.map}: no variable {args.map!r} in this notebook.")
    data = namespace[args.map]
    names = namespace if interpolate_names else {}
    prompts = prompts_for(data, cell.strip(), names, interpolate_text=interpolate)
    engine = nbllm.get_engine()
    model = args.model or default_model
    fmt = args.format or ("json" if args.schema else "")
    structure = structure_params(args, namespace, fmt)
    params = {**generation_params(args), **structure}
    engine.registry.resolve(model)  # mistakes are one line, before the chart appears
    constraint = resolve_params(engine.settings.generation, params).constraint
    chart = AggregateChart(engine, model) if prompts else None
    try:
        if args.raw:
            results = engine.generate_many(prompts, model, cache=not args.no_cache, origin="magic", **params)
        else:
            system = [{"role": "system", "content": args.system}] if args.system else []
            chats = [[*system, {"role": "user", "content": p}] for p in prompts]
            results = engine.chat_many(chats, model, cache=not args.no_cache, origin="magic", **params)
        stopped = False
    except BatchInterrupted as interrupted:
        results, stopped = interrupted.results, True
    finally:
        if chart is not None:
            chart.close()
    target = args.out or (args.map if _is_dataframe(data) else "answers")
    if constraint is not None:
        fields = list(constraint.schema.get("properties") or {}) if constraint.kind == "schema" else []
        namespace[target] = structured_into(data, results, args.column, fields)
    else:
        namespace[target] = answers_into(data, results, args.column)
    display(map_summary(results, target, stopped), raw=True)
    if stopped:
        raise AnswerInterrupted(f"Interrupted: the answers that finished are in {target!r}; the others are None.")


def structured_into(data: Any, results: Sequence[Any], column: str, fields: Sequence[str] = ()) -> Any:
    """Structured answers as typed columns: one per field of the schema (a single ``column``
    for answers that are not objects, such as --choices), with pandas' nullable dtypes, so an
    integer field stays integers where a row failed (<NA>). A DataFrame gets the columns added
    (a field named like an existing column becomes ``{column}_{field}``); a Series or a list
    gives a new DataFrame (on the Series' index). ``fields``: the schema's, so that each has its
    column even when every row failed."""
    import pandas as pd

    values = [_record(r.data) if r.ok else None for r in results]
    if all(v is None or isinstance(v, dict) for v in values):
        frame = pd.DataFrame([v or {} for v in values])
        frame = frame.reindex(columns=[*fields, *(c for c in frame.columns if c not in fields)])
    else:
        frame = pd.DataFrame({column: [v if not isinstance(v, dict) else str(v) for v in values]})
    frame = frame.convert_dtypes()
    if _is_dataframe(data):
        frame.index = data.index
        out = data.copy()
        for name in frame.columns:
            out[f"{column}_{name}" if name in data.columns else name] = frame[name]
        return out
    if hasattr(data, "index") and hasattr(data, "to_list"):  # a Series
        frame.index = data.index
    return frame


def _record(data: Any) -> Any:
    dump = getattr(data, "model_dump", None)  # a pydantic instance
    return dump() if callable(dump) else data


def _is_dataframe(data: Any) -> bool:
    return hasattr(data, "iterrows") and hasattr(data, "columns")


class AggregateChart:
    """Aggregate tokens/s of a --map run, drawn live (polled: the batch loop stays untouched)."""

    def __init__(self, engine: Any, model: str | None) -> None:
        from nbllm.notebook.plots import live_throughput_figure

        self._engine, self._model = engine, model
        self.figure, self._update = live_throughput_figure("tokens/s, all prompts together")
        self._done = threading.Event()
        display_widget(self.figure, "live tokens/s chart")
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        started = time.perf_counter()
        last_tokens, last_time = 0, started
        while not self._done.wait(0.25):
            progress = self._engine.batch_progress(self._model)
            if progress is None:
                continue
            now = time.perf_counter()
            rate = (progress.tokens - last_tokens) / (now - last_time) if progress.tokens >= last_tokens else 0.0
            last_tokens, last_time = progress.tokens, now
            self._update(now - started, rate)

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=2)


def map_summary(results: Sequence[Any], target: str, stopped: bool) -> dict[str, str]:
    """The line under a --map cell: how many answered, how fast, what failed (the first five)."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    cached = sum(1 for r in ok if r.stats and r.stats.cached)
    # Speed counts what was generated now: answers from the prompt cache took no decoding.
    generated = [r.stats for r in ok if r.stats and not r.stats.cached]
    tokens = sum(s.completion_tokens for s in generated)
    seconds = max((s.total_seconds for s in generated), default=0.0)
    speed = f"{tokens} tokens in {seconds:.2f}s ({tokens / seconds if seconds else 0:.1f} t/s together)"
    how = ", ".join(([speed] if generated else []) + ([f"{cached} from the prompt cache"] if cached else []))
    lines = [
        f"{'[stopped] ' if stopped else ''}Answered {len(ok)} of {len(results)} prompts into {target!r}"
        + (f": {how}" if how else "")
    ]
    for result in failed[:5]:
        lines.append(f"  #{result.index}: {result.error}")
    if len(failed) > 5:
        lines.append(f"  ... and {len(failed) - 5} more failed")
    text = "\n".join(lines)
    return {"text/plain": text, "text/html": f"<pre style='color:#6b7280'>{html.escape(text)}</pre>"}
