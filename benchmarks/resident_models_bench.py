#!/usr/bin/env python3
"""Do resident models slow each other down? Generation speed with 1, 2 and 3 models loaded.

The registry keeps ``cache.model_cache_size`` models loaded (2 by default). On a CPU build of
llama.cpp with OpenMP, every thread that has decoded keeps a team of OpenMP threads for as long
as it lives; once more OpenMP threads exist than CPUs, libgomp stops spinning at its barriers
and sleeps instead, and a token (hundreds of barriers) gets much slower, even though the other
team is idle. This script measures what users see:

1. ``in turn``: the default model alone, then with a second and a third resident model that
   have been used in between (copies of the default model, loaded as separate models), each
   model's decode speed over its speed alone. Goal: >= 0.97x for 2 and 3 resident models.
2. ``raw``: the same situation with bare llama-cpp-python, each ``Llama`` decoding on a thread
   of its own that outlives the request (nbllm's design until 0.5), then on a thread per
   request: shows the mechanism and that the per-request thread removes it.
3. ``at once``: two models generating at the same time (``server.workers: 2``, or a cell and
   the chat panel on different models): their combined speed over one model alone. The README
   quotes this as the cost of running two models at once on a CPU.

Alternated round by round, medians of per-round ratios.

Run: .venv/bin/python benchmarks/resident_models_bench.py [--rounds 5] [--tokens 96]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp

from nbllm.engine import Engine
from nbllm.host import machine
from nbllm.host.default_model import default_model_path

PROMPT = "Write a long story about a lighthouse keeper and the sea."
NAMES = ("a", "b", "c")


def nbllm_rate(engine: Engine, name: str, tokens: int) -> float:
    result = engine.generate(PROMPT, model=name, cache=False, max_tokens=tokens, temperature=0, ignore_eos=True)
    return float(result.stats.generation_tokens_per_second)


def in_turn(engine: Engine, tokens: int, resident: int) -> list[float]:
    """Every resident model used, then each measured in turn: its speeds (model a first)."""
    engine.registry.unload_all()
    names = NAMES[:resident]
    for name in names:  # load and use each (a short answer leaves its thread's team behind, if any)
        engine.generate("Hi", model=name, cache=False, max_tokens=4, temperature=0)
    return [nbllm_rate(engine, name, tokens) for name in names]


def at_once(engine: Engine, tokens: int) -> float:
    """Two models generating at the same time: their combined decode speed."""
    engine.registry.unload_all()
    for name in NAMES[:2]:
        engine.generate("Hi", model=name, cache=False, max_tokens=4, temperature=0)
    rates: list[float] = []
    barrier = threading.Barrier(2)

    def one(name: str) -> None:
        barrier.wait()
        rates.append(nbllm_rate(engine, name, tokens))

    threads = [threading.Thread(target=one, args=(name,)) for name in NAMES[:2]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(rates)


def raw_rate(llm: Any, tokens: int) -> float:
    llm.reset()
    prompt = llm.tokenize(PROMPT.encode())
    count, first = 0, 0.0
    for _token in llm.generate(prompt, temp=0.0, top_k=1):
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count > tokens:
            break
    return (count - 1) / (time.perf_counter() - first)


def on_thread(function: Callable[[], float], keep: dict[str, Any] | None, key: str) -> float:
    """Run ``function`` on a new thread (``keep is None``) or on ``keep[key]``'s long-lived one."""
    if keep is None:
        box: list[float] = []
        thread = threading.Thread(target=lambda: box.append(function()))
        thread.start()
        thread.join()
        return box[0]
    return float(keep[key].submit(function).result())


def raw(paths: list[Path], threads: int, tokens: int) -> tuple[float, float]:
    """Bare llama-cpp-python, two models: ratio of model a's speed after b was used, against a
    alone, with long-lived per-model threads and with a thread per request."""
    from concurrent.futures import ThreadPoolExecutor

    results = []
    for long_lived in (True, False):
        llms = {
            name: llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
            for name, path in zip(NAMES, paths, strict=False)
        }
        keep = {name: ThreadPoolExecutor(1) for name in llms} if long_lived else None
        a, b = llms["a"], llms["b"]
        alone = on_thread(lambda: raw_rate(a, tokens), keep, "a")  # noqa: B023  (run before the loop moves on)
        on_thread(lambda: raw_rate(b, 4), keep, "b")  # noqa: B023
        after = on_thread(lambda: raw_rate(a, tokens), keep, "a")  # noqa: B023
        results.append(after / alone)
        if keep is not None:
            for pool in keep.values():
                pool.shutdown()
        for llm in llms.values():
            llm.close()
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    threads = machine.default_threads()
    source = default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [source]
        for name in NAMES[1:]:  # separate files, so the registry loads separate models
            copy = Path(tmp) / f"{name}-{source.name}"
            shutil.copyfile(source, copy)
            paths.append(copy)
        engine = Engine()
        engine.configure(
            models={name: str(path) for name, path in zip(NAMES, paths, strict=True)},
            cache={"enabled": False, "model_cache_size": 3},
            performance={"threads": threads},
        )
        print(f"default model, {threads} threads, {args.tokens} tokens greedy, {args.rounds} rounds")
        ratios: dict[str, list[float]] = {"2 resident": [], "3 resident": [], "at once": []}
        raw_ratios: dict[str, list[float]] = {"long-lived threads": [], "thread per request": []}
        for round_number in range(args.rounds):
            alone = in_turn(engine, args.tokens, 1)[0]
            two = in_turn(engine, args.tokens, 2)
            three = in_turn(engine, args.tokens, 3)
            combined = at_once(engine, args.tokens)
            ratios["2 resident"].append(min(two) / alone)
            ratios["3 resident"].append(min(three) / alone)
            ratios["at once"].append(combined / alone)
            long_lived, per_request = raw(paths, threads, args.tokens)
            raw_ratios["long-lived threads"].append(long_lived)
            raw_ratios["thread per request"].append(per_request)
            print(
                f"round {round_number + 1}: alone {alone:.1f} t/s | 2 resident "
                f"{' '.join(f'{r:.1f}' for r in two)} | 3 resident {' '.join(f'{r:.1f}' for r in three)} | "
                f"2 at once, combined {combined:.1f} | raw a-after-b: long-lived {long_lived:.2f}x, "
                f"per request {per_request:.2f}x",
                flush=True,
            )
        engine.close()
    print("median ratios (slowest model over the same model alone; goal >= 0.97x):")
    for label, values in ratios.items():
        print(f"  nbllm {label}: {statistics.median(values):.3f}x")
    for label, values in raw_ratios.items():
        print(f"  raw llama-cpp-python, {label}: {statistics.median(values):.3f}x")


if __name__ == "__main__":
    main()
