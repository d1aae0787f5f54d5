#!/usr/bin/env python3
"""The autotuner against an exhaustive sweep of threads x batch size, on the default model.

1. Sweep every thread count this process may use x batch sizes 64..2048: generation (tg) and
   prompt (pp) speed of each, timed like llama-bench (no sampling, empty KV cache).
2. Run the tuner (without saving), timing it.
3. Measure the tuner's choice and the sweep's best generation setting again, alternated
   several times, so that the comparison does not hang on one noisy measurement.
Goal: the tuner's choice within 5% of the sweep's best generation speed, in far less time.

Run: .venv/bin/python benchmarks/tuner_bench.py
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from nbllm.core.config import Settings
from nbllm.core.gguf_file import read_gguf
from nbllm.engine import Engine
from nbllm.host import machine
from nbllm.measure import tuner
from nbllm.measure.tuner import PP_TOKENS, TG_TOKENS, _Measure

BATCHES = (64, 128, 256, 512, 1024, 2048)


def main() -> None:
    engine = Engine(Settings().merged({"performance": {"context_size": 4096}, "cache": {"enabled": False}}))
    spec = engine.registry.resolve(None)
    info = read_gguf(spec.path)
    base = engine.base_load_settings(spec, info)
    measure = _Measure(engine.registry.backend, spec)
    threads_options = list(range(1, machine.usable_cpus() + 1))

    print(f"1. Exhaustive sweep on {spec.name}: threads {threads_options} x batch {list(BATCHES)}")
    sweep_started = time.perf_counter()
    sweep = []
    for batch in BATCHES:
        loaded = measure.load(dataclasses.replace(base, batch_size=batch))
        try:
            for threads in threads_options:
                loaded.set_threads(threads)
                tg = measure.rate(loaded, "tg", TG_TOKENS)
                pp = measure.rate(loaded, "pp", PP_TOKENS)
                sweep.append((threads, batch, tg, pp))
                print(f"   threads {threads}  batch {batch:>5}  tg {tg:6.1f} t/s  pp {pp:7.1f} t/s")
        finally:
            loaded.close()
    sweep_seconds = time.perf_counter() - sweep_started
    best_tg = max(sweep, key=lambda row: row[2])
    best_pp = max(sweep, key=lambda row: row[3])
    print(f"   sweep took {sweep_seconds:.1f}s; best tg: threads {best_tg[0]} batch {best_tg[1]}; "
          f"best pp: threads {best_pp[0]} batch {best_pp[1]}")  # fmt: skip

    print("\n2. The tuner")
    result = tuner.tune(engine, save=False, progress=False)
    print("   " + str(result).replace("\n", "\n   "))

    print("\n3. Tuner's choice vs the sweep's best generation setting, alternated 5 times")
    choice = dataclasses.replace(base, threads=result.best.threads, batch_size=result.best.batch_size)
    best = dataclasses.replace(base, threads=best_tg[0], batch_size=best_tg[1])
    rates: dict[str, list[float]] = {"tuner": [], "sweep best": []}
    models = {"tuner": measure.load(choice), "sweep best": measure.load(best)}
    try:
        for _ in range(5):
            for name, loaded in models.items():
                rates[name].append(measure.rate(loaded, "tg", TG_TOKENS * 2))
    finally:
        for loaded in models.values():
            loaded.close()
    tuner_tg, sweep_tg = statistics.median(rates["tuner"]), statistics.median(rates["sweep best"])
    print(f"   tuner's choice (threads {choice.threads}, batch {choice.batch_size}): {tuner_tg:.1f} t/s")
    print(f"   sweep's best   (threads {best.threads}, batch {best.batch_size}): {sweep_tg:.1f} t/s")
    print(f"   ratio {tuner_tg / sweep_tg:.3f}x; tuner took {result.seconds:.1f}s vs sweep {sweep_seconds:.1f}s "
          f"({sweep_seconds / result.seconds:.1f}x less time)")  # fmt: skip
    engine.close()


if __name__ == "__main__":
    main()
