"""Measured autotuning: threads, batch size and (on a GPU) GPU layers and flash attention.

The sweep is pruned so the default model tunes in well under a minute:
1. threads, by generation speed (tg), changed in place on one loaded model (no reloads):
   a few candidates around the physical core count, then a climb while it keeps improving;
2. batch size, by prompt speed (pp), one reload each, keeping the generation speed;
3. on a GPU build with a GPU: the estimated layer count and "all layers", each with and without
   flash attention, by generation speed.
Each trial is timed the way llama-bench times (``timed_decode``): no sampling, empty KV cache.

The best settings are saved per model file (SHA-256) and machine, and the engine uses them
whenever the config leaves the value on auto (``threads: null``, ``batch_size: null``,
``gpu_layers: -1``, ``flash_attention: null``).
"""

from __future__ import annotations

import dataclasses
import html
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nbllm.backends.base import Backend, LoadedModel, LoadSettings, ModelSpec
from nbllm.core import figures, identity
from nbllm.core.errors import GpuOutOfMemoryError, NbllmError
from nbllm.core.progress import progress_bar
from nbllm.core.table import ReadableReport
from nbllm.host import machine, tuned_settings

log = logging.getLogger("nbllm")

TG_TOKENS = 32
PP_TOKENS = 512
WARMUP_TOKENS = 4
REPEATS = 2
BATCH_CANDIDATES_CPU = (128, 256, 512)
BATCH_CANDIDATES_GPU = (256, 512, 1024, 2048)


@dataclass
class Trial:
    threads: int
    batch_size: int
    gpu_layers: int
    flash_attention: bool
    tg: float = 0.0  # generated tokens per second
    pp: float = 0.0  # prompt tokens per second
    seconds: float = 0.0  # what the trial cost, load included
    error: str | None = None
    step: str = "threads"  # which setting it tried: threads (by tg), batch (by pp), gpu (layers, flash attention)

    def settings(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "batch_size": self.batch_size,
            "gpu_layers": self.gpu_layers,
            "flash_attention": self.flash_attention,
        }


@dataclass
class TuneResult(ReadableReport):
    model: str
    model_sha256: str
    machine: str
    best: Trial
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0

    def figure(self) -> Any:
        """A plotly figure of every trial (drawn by the notebook front end; see core/figures.py)."""
        return figures.figure("tuning", self)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {**t.settings(), "tg t/s": round(t.tg, 1), "pp t/s": round(t.pp, 1), "best": t is self.best}
            for t in self.trials
        ]

    def __str__(self) -> str:
        lines = [f"Tuned {self.model} in {self.seconds:.1f}s ({len(self.trials)} trials); best:"]
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in self.best.settings().items()))
        lines.append(f"  generation {self.best.tg:.1f} t/s, prompt {self.best.pp:.1f} t/s")
        for t in self.trials:
            mark = "*" if t is self.best else " "
            pp = f"pp {t.pp:7.1f} t/s" if t.pp else "pp       -"
            what = t.error or f"tg {t.tg:6.1f} t/s  {pp}"
            lines.append(
                f" {mark} threads {t.threads:>3}  batch {t.batch_size:>5}  gpu {t.gpu_layers:>4}  "
                f"fa {'on ' if t.flash_attention else 'off'}  {what}"
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(str(self))}</pre>"


# ---------------------------------------------------------------------------- saved results


def save_result(result: TuneResult) -> None:
    entry = {**result.best.settings(), "tg": result.best.tg, "pp": result.best.pp, "model": result.model}
    tuned_settings.save(result.machine, result.model_sha256, {**entry, "tuned_at": time.time()})


# ---------------------------------------------------------------------------- the sweep


def thread_candidates(physical: int, usable: int) -> list[int]:
    """A handful of thread counts worth trying first: the climb extends from the best."""
    raw = {1, max(1, physical // 2), physical, usable}
    return sorted(t for t in raw if 1 <= t <= usable)


class _Measure:
    def __init__(self, backend: Backend, spec: ModelSpec) -> None:
        self.backend, self.spec = backend, spec

    def load(self, settings: LoadSettings) -> LoadedModel:
        return self.backend.load(self.spec, settings)

    @staticmethod
    def rate(model: LoadedModel, kind: str, n_tokens: int) -> float:
        model.timed_decode(kind, WARMUP_TOKENS if kind == "tg" else min(n_tokens, 32))
        seconds = [model.timed_decode(kind, n_tokens, seed=i) for i in range(REPEATS)]
        return float(n_tokens / statistics.median(seconds))


def tune(
    engine: Any,
    model: str | None = None,
    *,
    gpu: bool | None = None,
    save: bool = True,
    progress: bool = True,
) -> TuneResult:
    """Measure what runs fastest here and remember it for this model file and machine."""
    started = time.perf_counter()
    spec = engine.registry.resolve(model)
    if spec.remote is not None:
        raise NbllmError(
            f"{spec.name} runs on {spec.remote.url}: tuning measures local llama.cpp settings. Tune on that server."
        )
    from nbllm.core.gguf_file import read_gguf

    info = read_gguf(spec.path)
    base: LoadSettings = engine.base_load_settings(spec, info)
    backend = engine.registry.backend
    use_gpu = bool(backend.build_info()["gpu_offload"]) and (gpu if gpu is not None else bool(engine.gpus()))
    measure = _Measure(backend, spec)
    trials: list[Trial] = []
    bar = progress_bar(progress, _planned_trials(use_gpu), f"Tuning {spec.name}", "trial")

    def record(trial: Trial) -> Trial:
        trials.append(trial)
        bar.update(1)
        speed = f"pp {trial.pp:.0f} t/s" if trial.pp else f"tg {trial.tg:.1f} t/s"
        bar.set_postfix_str(f"threads {trial.threads} batch {trial.batch_size} {speed}")
        return trial

    try:
        best = _tune_threads(measure, base, record)
        best = _tune_batch(measure, dataclasses.replace(base, threads=best.threads), best, use_gpu, record)
        if use_gpu:
            best = _tune_gpu(measure, engine, spec, info, base, best, record)
    finally:
        bar.close()
    result = TuneResult(
        model=spec.name,
        model_sha256=identity.file_sha256(spec.path),
        machine=machine.machine_id(),
        best=best,
        trials=trials,
        seconds=time.perf_counter() - started,
    )
    if save:
        save_result(result)
        engine.forget_tuning()  # the next load uses what was just measured
    log.info("Tuned %s in %.1fs: %s", spec.name, result.seconds, result.best.settings())
    return result


def _planned_trials(use_gpu: bool) -> int:
    threads = len(thread_candidates(machine.physical_cores(), machine.usable_cpus()))
    batches = len(BATCH_CANDIDATES_GPU if use_gpu else BATCH_CANDIDATES_CPU)
    return threads + batches + (4 if use_gpu else 0)


def _tune_threads(measure: _Measure, base: LoadSettings, record: Callable[[Trial], Trial]) -> Trial:
    load_started = time.perf_counter()
    loaded = measure.load(base)
    load_seconds = time.perf_counter() - load_started
    try:
        usable = machine.usable_cpus()
        tried: dict[int, Trial] = {}

        def run(threads: int) -> Trial:
            t0 = time.perf_counter()
            loaded.set_threads(threads)
            trial = Trial(threads, base.batch_size, base.gpu_layers, base.flash_attention, step="threads")
            trial.tg = measure.rate(loaded, "tg", TG_TOKENS)
            # The one load is charged to the first trial.
            trial.seconds = time.perf_counter() - t0 + (0.0 if tried else load_seconds)
            tried[threads] = trial
            return record(trial)

        for threads in thread_candidates(machine.physical_cores(), usable):
            run(threads)
        # Climb past the best while it keeps improving (by more than noise).
        best = max(tried.values(), key=lambda t: t.tg)
        step = max(1, best.threads // 4)
        following = best.threads + step
        while following <= usable and following not in tried:
            trial = run(following)
            if trial.tg <= best.tg * 1.02:
                break
            best, following = trial, following + step
        return max(tried.values(), key=lambda t: t.tg)
    finally:
        loaded.close()


def _tune_batch(
    measure: _Measure, base: LoadSettings, best: Trial, use_gpu: bool, record: Callable[[Trial], Trial]
) -> Trial:
    """Batch size decides prompt speed only (generation decodes one token at a time), so it is
    chosen by prompt speed; the generation speed measured for the threads carries over."""
    candidates = [b for b in (BATCH_CANDIDATES_GPU if use_gpu else BATCH_CANDIDATES_CPU) if b <= base.context_size]
    pp_tokens = min(PP_TOKENS, base.context_size - 1)
    results: list[Trial] = []
    for batch in candidates:
        t0 = time.perf_counter()
        settings = dataclasses.replace(base, batch_size=batch, gpu_layers=best.gpu_layers)
        trial = Trial(best.threads, batch, best.gpu_layers, best.flash_attention, tg=best.tg, step="batch")
        try:
            loaded = measure.load(settings)
            try:
                trial.pp = measure.rate(loaded, "pp", pp_tokens)
            finally:
                loaded.close()
        except NbllmError as error:
            trial.error = str(error)
        trial.seconds = time.perf_counter() - t0
        results.append(record(trial))
    good = [t for t in results if t.error is None]
    return max(good, key=lambda t: t.pp) if good else best


def _tune_gpu(
    measure: _Measure,
    engine: Any,
    spec: Any,
    info: Any,
    base: LoadSettings,
    best: Trial,
    record: Callable[[Trial], Trial],
) -> Trial:
    estimate = engine.gpu_fit(info, base).layers
    layer_options = sorted({estimate, info.n_layers + 1} - {0}) or [0]
    results: list[Trial] = []
    for layers in layer_options:
        for flash in (False, True):
            t0 = time.perf_counter()
            trial = Trial(best.threads, best.batch_size, layers, flash, step="gpu")
            settings = dataclasses.replace(
                base, threads=best.threads, batch_size=best.batch_size, gpu_layers=layers, flash_attention=flash
            )
            if engine.registry.guard_gpu(spec, info, settings, probe=True).gpu_layers < layers:
                # Trying it could abort the process (llama.cpp cannot recover from every CUDA OOM).
                trial.error = "out of GPU memory: does not fit in free VRAM by the estimate, not tried"
                results.append(record(trial))
                continue
            try:
                loaded = measure.load(settings)
                try:
                    trial.tg = measure.rate(loaded, "tg", TG_TOKENS * 2)
                    trial.pp = measure.rate(loaded, "pp", min(PP_TOKENS, base.context_size - 1))
                finally:
                    loaded.close()
            except GpuOutOfMemoryError as error:
                trial.error = f"out of GPU memory: {error}"
            except NbllmError as error:
                trial.error = str(error)
            trial.seconds = time.perf_counter() - t0
            results.append(record(trial))
    good = [t for t in results if t.error is None]
    return max(good, key=lambda t: t.tg) if good else best
