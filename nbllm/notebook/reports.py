"""What ``%llm stats``, ``%llm health`` and ``%llm config`` show: tables, as text in a terminal, HTML in a notebook."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from nbllm.core.config import Settings, describe_settings
from nbllm.core.metrics import RequestStats
from nbllm.core.table import Table
from nbllm.core.units import format_bytes


class Report:
    """A few tables shown together: text in a terminal, HTML in a notebook; ``data`` is the raw dict."""

    def __init__(self, tables: Sequence[Table], data: Mapping[str, Any]) -> None:
        self.tables = list(tables)
        self.data = dict(data)

    def __repr__(self) -> str:
        return "\n\n".join(str(table) for table in self.tables if table)

    def _repr_html_(self) -> str:
        return "".join(table._repr_html_() for table in self.tables if table)


def _rows(pairs: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [{"what": what, "value": value} for what, value in pairs]


def _seconds(value: float) -> str:
    return f"{value:.2f}s"


def stats_report(data: Mapping[str, Any]) -> Report:
    """``nbllm.stats()`` as three short tables and the last request's line."""
    cache = data["cache"]
    cache_state = "on" if cache["enabled"] else f"off ({cache['disabled_reason'] or 'cache.enabled is false'})"
    overview = Table(
        _rows(
            [
                (
                    "requests",
                    f"{data['requests']} ({data['completed']} completed, {data['cancelled']} stopped, "
                    f"{data['errors']} failed)",
                ),
                (
                    "tokens",
                    f"{data['prompt_tokens']} prompt ({data['reused_prompt_tokens']} reused), "
                    f"{data['completion_tokens']} generated",
                ),
                (
                    "model loads",
                    f"{data['model_loads']} in {_seconds(data['model_load_seconds'])}, {data['evictions']} evictions",
                ),
                (
                    "prompt cache",
                    f"{cache_state}: {data['prompt_cache_hits']} hits, {data['prompt_cache_misses']} misses, "
                    f"{cache['entries']}/{cache['max_entries']} entries, {format_bytes(cache['bytes_on_disk'])}",
                ),
                (
                    "KV prefix snapshots",
                    f"{cache['prefix_snapshots']}, {format_bytes(cache['prefix_snapshot_bytes'])}",
                ),
                (
                    "time saved",
                    f"{_seconds(data['time_saved_seconds'])} (prompt cache "
                    f"{_seconds(data['prompt_cache_seconds_saved'])}, prefix reuse "
                    f"{_seconds(data['prefix_seconds_saved'])})",
                ),
                ("uptime", _seconds(data["uptime_seconds"])),
            ]
        ),
        title="nbllm stats",
    )
    per_model = Table(
        [{"model": name, **totals} for name, totals in data["per_model"].items()],
        columns=["model", "requests", "prompt_tokens", "completion_tokens", "tokens_per_second"],
        headers={"completion_tokens": "Generated tokens", "tokens_per_second": "t/s"},
        title="Per model",
    )
    last = data["last_request"]
    last_table = Table(_rows([("last request", _last_request_line(last))]) if last else [], title="Last request")
    return Report([overview, per_model, last_table], data)


def _last_request_line(last: Mapping[str, Any]) -> str:
    names = {f.name for f in fields(RequestStats)}
    return RequestStats(**{k: v for k, v in last.items() if k in names}).details()


def health_report(data: Mapping[str, Any]) -> Report:
    """``nbllm.health()`` as an overview and a table of the loaded models."""
    overview = Table(
        _rows(
            [
                ("status", data["status"]),
                ("default model", data["default_model"]),
                ("models loaded", data["model_cache"]),
                (
                    "memory available",
                    f"{format_bytes(data['memory_available_bytes'])} of {format_bytes(data['memory_total_bytes'])}",
                ),
                ("config", data["config_source"]),
            ]
        ),
        title="nbllm health",
    )
    models = Table(
        data["resident_models"],
        columns=[
            "name",
            "architecture",
            "quantization",
            "context_size",
            "threads",
            "gpu_layers",
            "memory_bytes",
            "busy",
        ],
        formatters={"memory_bytes": format_bytes},
        headers={"context_size": "Context", "gpu_layers": "GPU layers", "memory_bytes": "Memory"},
        title="Loaded models",
    )
    return Report([overview, models], data)


def settings_table(settings: Settings) -> Table:
    rows = [{"key": key, "value": value, "help": help_text} for key, value, help_text in describe_settings(settings)]
    return Table(rows, columns=["key", "value", "help"], title=f"Settings from {settings.source}")


def sources_bundle(sources: Sequence[Any]) -> dict[str, str]:
    """The passages an ``ask`` answer was given (``--docs``): number, where from, similarity,
    and the passage itself, collapsed."""
    lines = [f"[{s.number}] {s.cite} ({s.score:.2f})" for s in sources]
    blocks = [
        f"<details><summary>[{s.number}] <code>{html.escape(s.cite)}</code> "
        f"<span style='color:#6b7280'>similarity {s.score:.2f}</span></summary>"
        f"<pre style='white-space:pre-wrap'>{html.escape(s.text)}</pre></details>"
        for s in sources
    ]
    return {"text/plain": "Sources:\n" + "\n".join(lines), "text/html": "<b>Sources</b>" + "".join(blocks)}


def tool_runs_bundle(runs: Sequence[Any]) -> dict[str, str]:
    """The calls a --run-tools answer made, each collapsed: arguments, then result or error."""
    if not runs:
        return {"text/plain": "(no tool was called)", "text/html": "<i style='color:#6b7280'>no tool was called</i>"}
    lines, blocks = [], []
    for run in runs:
        arguments = ", ".join(f"{key}={value!r}" for key, value in run.call.arguments.items())
        outcome = f"error: {run.error}" if run.error is not None else repr(run.result)
        head = f"{run.call.name}({arguments}) -> {outcome[:80]} ({run.seconds:.2f}s)"
        lines.append(head)
        blocks.append(
            f"<details><summary><code>{html.escape(run.call.name)}({html.escape(arguments)})</code> "
            f"<span style='color:#6b7280'>{run.seconds:.2f}s{' · ' + html.escape(run.error) if run.error else ''}"
            f"</span></summary><pre>{html.escape(outcome)}</pre></details>"
        )
    return {"text/plain": "\n".join(lines), "text/html": "".join(blocks)}
