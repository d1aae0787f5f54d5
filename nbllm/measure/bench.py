"""llama-bench-style benchmarks: prompt processing (pp) and generation (tg) speed, as records.

Each test is timed the way llama.cpp's llama-bench times it — one warm-up run, then
repetitions from an empty KV cache, no sampling — so that the numbers are the model's speed on
this machine and comparable with llama-bench's own. Results are plain records (dicts) that
carry everything needed to compare two files from two machines: the model (name, file hash,
size, quantization), the settings, the machine (CPU, cores, RAM, GPU), the llama.cpp build, and
for generation the share of the memory-bandwidth limit reached.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import json
import math
import os
import statistics
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from nbllm._version import __version__
from nbllm.backends.base import ModelSpec
from nbllm.core import figures, identity, paths
from nbllm.core.errors import InsufficientMemoryError, NbllmError, ParameterError
from nbllm.core.fit import estimate_memory
from nbllm.core.gguf_file import read_gguf
from nbllm.core.progress import progress_bar
from nbllm.core.table import ReadableReport, Table
from nbllm.core.units import format_bytes
from nbllm.engine.pipeline import model_hash
from nbllm.host import bandwidth, machine

FORMAT = "nbllm-bench/1"

# The guide's "Interpret Results" table.
RATINGS = ((5, "slow"), (15, "okay"), (30, "good"), (60, "fast"), (math.inf, "excellent"))


def rating(tokens_per_second: float) -> str:
    """The label: < 5 slow, 5-15 okay, 15-30 good, 30-60 fast, > 60 excellent."""
    return next(label for limit, label in RATINGS if tokens_per_second < limit)


# Repetitions of one test on a quiet machine differ by a few percent (llama-bench's own runs: 1-5%);
# a standard deviation above this share of the mean says something else was running (259 ± 237
# t/s was seen), so the mean is no measure of the model.
UNRELIABLE_SPREAD_PERCENT = 15.0
UNRELIABLE_ADVICE = "close other programs and run again with more repetitions (-r 10)"


def spread_percent(record: dict[str, Any]) -> float:
    """The standard deviation as a share of the mean (the coefficient of variation), in percent."""
    mean, std = record.get("tokens_per_second") or 0.0, record.get("std") or 0.0
    return 100.0 * std / mean if mean > 0 else 0.0


def unreliable(record: dict[str, Any]) -> str | None:
    """``"unreliable: spread 91%"`` for a result whose repetitions disagree too much; else None.
    Computed from mean and std, so result files written before this check are judged too."""
    spread = spread_percent(record)
    return f"unreliable: spread {spread:.0f}%" if spread > UNRELIABLE_SPREAD_PERCENT else None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return [None]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@dataclasses.dataclass
class BenchResults(ReadableReport):
    """Records with a table view; ``save(path)`` writes the JSON file."""

    records: list[dict[str, Any]]

    def table(self) -> Table:
        rows = [
            {
                "model": r["model"]["name"],
                "test": r["test"],
                "threads": r["settings"]["threads"],
                "batch": r["settings"]["batch_size"],
                "ctx": r["settings"]["context_size"],
                "gpu": r["settings"]["gpu_layers"],
                "t/s": f"{r['tokens_per_second']:.1f} ± {r['std']:.1f}",
                "spread": f"{spread_percent(r):.0f}%" + (" UNRELIABLE" if unreliable(r) else ""),
                "rating": r["rating"],
                "of limit": f"{r['bandwidth_percent']:.0f}%" if r.get("bandwidth_percent") else "-",
            }
            for r in self.records
        ]
        headers = {"batch": "Batch size", "ctx": "Context", "gpu": "GPU layers", "of limit": "Of bandwidth limit"}
        return Table(rows, headers=headers)

    @property
    def warning(self) -> str | None:
        """One line when some result's repetitions disagree too much to trust its mean."""
        bad = [r for r in self.records if unreliable(r)]
        if not bad:
            return None
        which = ", ".join(f"{r['model']['name']} {r['test']} ({spread_percent(r):.0f}%)" for r in bad)
        return (
            f"Unreliable: the repetitions of {which} spread over {UNRELIABLE_SPREAD_PERCENT:.0f}% of the mean; "
            f"{UNRELIABLE_ADVICE}."
        )

    def __str__(self) -> str:
        warning = self.warning
        return str(self.table()) + (f"\n{warning}" if warning else "")

    def _repr_html_(self) -> str:
        warning = self.warning
        note = f"<p style='color:#b45309'>{html.escape(warning)}</p>" if warning else ""
        return self.table()._repr_html_() + note

    def save(self, path: str | Path) -> Path:
        """Write the records as JSON, whole or not at all (a temporary file moved into place)."""
        path = check_output_path(path)
        try:
            paths.write_text_atomically(path, json.dumps({"format": FORMAT, "records": self.records}, indent=1))
        except OSError as error:
            raise NbllmError(f"Cannot write the results to {path}: {error.strerror or error}.") from None
        return path

    def figure(self) -> Any:
        """A plotly figure of the records (drawn by the notebook front end; see core/figures.py)."""
        return figures.figure("bench", self.records)


def check_output_path(path: str | Path) -> Path:
    """Where results will be saved, checked before a run that may take minutes, not after it."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise NbllmError(f"{path} is a folder: name a file to save the results in, e.g. {path / 'results.json'}.")
    folder = path.parent
    if not folder.is_dir():
        raise NbllmError(f"Cannot save the results to {path}: the folder {folder} does not exist.")
    if not os.access(folder, os.W_OK):
        raise NbllmError(f"Cannot save the results to {path}: the folder {folder} is not writable.")
    return path


def load_results(path: str | Path) -> BenchResults:
    """Read a results file written by ``save`` / ``nbllm bench -o``, with a clear error otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NbllmError(f"No benchmark results at {path}.") from None
    except (OSError, ValueError) as error:
        raise NbllmError(f"{path} is not a benchmark results file: {error}.") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("records"), list):
        raise NbllmError(f"{path} is not an nbllm benchmark results file (expected format {FORMAT}).")
    return BenchResults(data["records"])


def machine_record() -> dict[str, Any]:
    report = machine.hardware_report()
    return {
        "id": machine.machine_id(),
        "cpu": report.cpu_model,
        "physical_cores": report.physical_cores,
        "logical_cpus": report.logical_cpus,
        "ram_bytes": report.memory_total,
        "gpus": [{"name": g.name, "memory_bytes": g.memory_total} for g in report.gpus],
        "read_bandwidth_bytes_per_second": bandwidth.read_bandwidth(refresh=True),
    }


def bench(
    engine: Any,
    models: str | Sequence[str] | None = None,
    *,
    pp: int | None = 512,
    tg: int | None = 128,
    repetitions: int = 5,
    threads: int | Sequence[int] | None = None,
    batch_size: int | Sequence[int] | None = None,
    context_size: int | Sequence[int] | None = None,
    gpu_layers: int | Sequence[int] | None = None,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_run: Callable[[dict[str, Any], float], None] | None = None,
) -> BenchResults:
    """Run pp/tg tests over every combination of models and settings; see the module docstring.

    ``on_run(record_so_far, tokens_per_second)`` is called after every timed run (a live
    chart), ``on_result(record)`` after every finished test.
    """
    if repetitions < 1:
        raise ParameterError(f"repetitions = {repetitions}: must be at least 1.")
    tests = [("pp", n) for n in [pp] if n] + [("tg", n) for n in [tg] if n]
    if not tests:
        raise ParameterError("Nothing to run: give pp and/or tg a number of tokens.")
    for kind, n in tests:
        if n < 1 or n > 1 << 16:
            raise ParameterError(f"{kind} = {n}: must be between 1 and 65536 tokens.")
    names = _as_list(models)
    build = engine.registry.backend.build_info()
    sweep = {"threads": threads, "batch_size": batch_size, "context_size": context_size, "gpu_layers": gpu_layers}
    check_plan(engine, names, sweep)
    grid = list(itertools.product(names, *(_as_list(values) for values in sweep.values())))
    # Every local run's settings and memory, checked before the first run: a run that cannot
    # fit must not fail after the others have taken minutes (and take their results with it).
    planned = {point: _planned_settings(engine, point, tests) for point in grid}
    machine_info = machine_record()
    records: list[dict[str, Any]] = []
    bar = progress_bar(progress, len(grid) * len(tests) * (repetitions + 1), "Benchmark", "run")
    try:
        for point in grid:
            spec = engine.registry.resolve(point[0])
            if spec.remote is not None:
                # A remote model is measured through its API, with the server's own settings.
                resident = engine.registry.load(point[0])
                for kind, n in tests:
                    record = _record(kind, n, _remote_record(spec), resident.settings, machine_info, build)
                    record["build"] = {"backend": "remote", "url": spec.remote.url}
                    _finish(record, _run(resident.model, kind, n, repetitions, bar, record, on_run), None, machine_info)
                    records.append(record)
                    if on_result is not None:
                        on_result(record)
                continue
            info, settings = planned[point]
            model_info = _model_record(spec, info)
            model = engine.registry.backend_for(spec).load(spec, settings)
            try:
                for kind, n in tests:
                    record = _record(kind, n, model_info, settings, machine_info, build)
                    samples = _run(model, kind, n, repetitions, bar, record, on_run)
                    _finish(record, samples, info, machine_info)
                    records.append(record)
                    if on_result is not None:
                        on_result(record)
            finally:
                model.close()
    finally:
        bar.close()
    return BenchResults(records)


def _planned_settings(engine: Any, point: tuple[Any, ...], tests: list[tuple[str, int]]) -> tuple[Any, Any]:
    """The GGUF header and load settings of one local run, refused if its memory does not fit
    (the same estimate as the registry's, which counts everything in RAM). Remote: (None, None)."""
    name, n_threads, n_batch, n_ctx, n_gpu = point
    spec = engine.registry.resolve(name)
    if spec.remote is not None:
        return None, None
    info = read_gguf(spec.path)
    settings = _settings(engine, spec, info, n_threads, n_batch, n_ctx, n_gpu, tests)
    needed = estimate_memory(info, settings.context_size, settings.batch_size)
    available = machine.available_memory()
    if needed.total > available:
        raise InsufficientMemoryError(
            f"{spec.name} with context_size {settings.context_size} needs about {needed.describe()}, but "
            f"only {format_bytes(available)} of RAM is available: lower context_size."
        )
    return info, settings


def check_plan(engine: Any, models: str | Sequence[str] | None, sweep: dict[str, Any]) -> None:
    """What a bench would run, checked before the first run: every model known, and every value
    of the settings swept (``threads``, ``batch_size``, ``context_size``, ``gpu_layers``) valid
    by the config's own declaration of that setting (a bad value used to fail inside llama.cpp
    after the other runs, or be recorded as if it had applied)."""
    from nbllm.core.config import Performance, check_value

    for name in _as_list(models):
        engine.registry.resolve(name)
    gpu_offload = bool(engine.registry.backend.build_info().get("gpu_offload"))
    hints = typing.get_type_hints(Performance)
    fields = {f.name: f for f in dataclasses.fields(Performance)}
    for name, values in sweep.items():
        for value in _as_list(values):
            if value is not None:
                check_value(name, value, hints[name], fields[name].metadata, error=ParameterError)
    if not gpu_offload and any(layers not in (None, 0, -1) for layers in _as_list(sweep["gpu_layers"])):
        raise ParameterError(
            "gpu_layers: this llama.cpp build cannot offload to a GPU, so the runs would all be on the CPU. "
            "nbllm doctor shows how to install a GPU build."
        )


def _settings(
    engine: Any, spec: Any, info: Any, threads: Any, batch: Any, ctx: Any, gpu: Any, tests: list[tuple[str, int]]
) -> Any:
    base = engine._load_settings(spec, info)  # config + tuned values, as the model would load
    needed = sum(n for _, n in tests) + 1
    changes: dict[str, Any] = {"prefix_cache_bytes": 0}
    if threads is not None:
        changes["threads"] = int(threads)
    if batch is not None:
        changes["batch_size"] = int(batch)
    if ctx is not None:
        changes["context_size"] = int(ctx)
    if gpu is not None:
        changes["gpu_layers"] = int(gpu)
    settings = dataclasses.replace(base, **changes)
    if settings.context_size < needed:
        raise ParameterError(
            f"context_size {settings.context_size} is smaller than the test's {needed} tokens: raise context_size."
        )
    return settings


def _model_record(spec: Any, info: Any) -> dict[str, Any]:
    return {
        "name": spec.name,
        "path": str(spec.path),
        "sha256": identity.file_sha256(spec.path),
        "size_bytes": info.file_size,
        "quantization": info.quantization,
        "architecture": info.architecture,
        "parameters": info.n_params,
    }


def _remote_record(spec: ModelSpec) -> dict[str, Any]:
    assert spec.remote is not None
    return {
        "name": spec.name,
        "path": spec.remote.url,
        "sha256": model_hash(spec),
        "size_bytes": None,
        "quantization": "remote",
        "architecture": "remote",
        "parameters": None,
    }


def _record(
    kind: str, n: int, model: dict[str, Any], settings: Any, machine_info: dict[str, Any], build: dict[str, Any]
) -> dict[str, Any]:
    return {
        "test": f"{kind}{n}",
        "kind": kind,
        "n_tokens": n,
        "model": model,
        "settings": {
            "threads": settings.threads,
            "batch_size": settings.batch_size,
            "context_size": settings.context_size,
            "gpu_layers": settings.gpu_layers,
            "flash_attention": settings.flash_attention,
        },
        "machine": machine_info,
        "build": {k: build[k] for k in ("backend", "llama_cpp_python", "gpu_offload", "system_info") if k in build},
        "nbllm": __version__,
        "time": time.time(),
    }


def _run(
    model: Any,
    kind: str,
    n: int,
    repetitions: int,
    bar: Any,
    record: dict[str, Any],
    on_run: Callable[[dict[str, Any], float], None] | None,
) -> list[float]:
    bar.set_postfix_str(f"{record['model']['name']} {record['test']} warm-up")
    model.timed_decode(kind, n, seed=0)  # warm-up, as llama-bench does
    bar.update(1)
    samples = []
    for repetition in range(repetitions):
        seconds = model.timed_decode(kind, n, seed=repetition + 1)
        samples.append(n / seconds)
        bar.update(1)
        bar.set_postfix_str(f"{record['model']['name']} {record['test']} {samples[-1]:.1f} t/s")
        if on_run is not None:
            on_run(record, samples[-1])
    return samples


def _finish(record: dict[str, Any], samples: list[float], info: Any, machine_info: dict[str, Any]) -> None:
    """Mean, spread, rating; for a local generation test, the share of the bandwidth limit."""
    mean = statistics.fmean(samples)
    record["samples"] = samples
    record["tokens_per_second"] = mean
    record["std"] = statistics.stdev(samples) if len(samples) > 1 else 0.0
    record["spread_percent"] = spread_percent(record)
    record["reliable"] = unreliable(record) is None
    record["rating"] = rating(mean)
    if record["kind"] == "tg" and info is not None:
        # Every weight is read per generated token, except the input embedding (one row is
        # looked up) — unless the output layer is tied to it, as in Gemma: then it is read too.
        tied = info.tensor("output.weight") is None
        embedding = info.tensor("token_embd.weight")
        per_token = bandwidth.bytes_per_token(info.tensor_bytes, 0 if tied or not embedding else embedding.nbytes)
        limit = machine_info["read_bandwidth_bytes_per_second"] / per_token
        record["bytes_per_token"] = per_token
        record["bandwidth_limit_tokens_per_second"] = limit
        record["bandwidth_percent"] = 100 * mean / limit


def compare(a: BenchResults, b: BenchResults) -> Table:
    """Matching tests of two result files side by side: t/s in each and the ratio b / a."""

    def key(record: dict[str, Any]) -> tuple[Any, ...]:
        s = record["settings"]
        return (record["model"]["sha256"], record["test"], s["threads"], s["batch_size"], s["gpu_layers"])

    first = {key(r): r for r in a.records}
    rows = []
    for record in b.records:
        other = first.get(key(record))
        if other is None:
            continue
        rows.append(
            {
                "model": record["model"]["name"],
                "test": record["test"],
                "threads": record["settings"]["threads"],
                "A t/s": round(other["tokens_per_second"], 1),
                "B t/s": round(record["tokens_per_second"], 1),
                "B / A": round(record["tokens_per_second"] / other["tokens_per_second"], 3),
                "A machine": other["machine"]["cpu"],
                "B machine": record["machine"]["cpu"],
                "note": "; ".join(
                    f"{side} {problem}" for side, r in (("A", other), ("B", record)) if (problem := unreliable(r))
                ),
            }
        )
    columns = list(rows[0]) if rows else []
    if not any(row["note"] for row in rows):
        columns = [c for c in columns if c != "note"]
    return Table(rows, columns=columns, title="Benchmark comparison (B / A)")


def iter_records(results: Iterable[BenchResults]) -> Iterable[dict[str, Any]]:
    for result in results:
        yield from result.records
