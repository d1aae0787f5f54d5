#!/usr/bin/env python3
"""Engine overhead on the default model, as ratios against raw llama-cpp-python in this process.

1. Streaming generation speed: nbllm.generate(stream=True) against llama-cpp-python's
   create_completion(stream=True) and against a bare loop over Llama.generate (token ids only,
   no text), with the same settings, prompt, seed and sampler, alternated run by run.
   Goal: nbllm >= 0.98x of raw llama-cpp-python streaming.
2. Switching between two resident models (checkout + release, no generation): goal < 1 ms median.
3. Cold load (GGUF gate + memory estimate + load) against a bare Llama(...): goal <= 1.1x.

Run: .venv/bin/python benchmarks/engine_bench.py [--runs 5] [--tokens 256]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import llama_cpp

from nbllm.core import gguf_file
from nbllm.core.config import Settings
from nbllm.engine import Engine
from nbllm.host.default_model import default_model_path

PROMPT = "Question: Explain in detail how a computer boots, step by step.\nAnswer:"
SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1}


class Timer:
    """Decode-phase speed of one stream: tokens after the first over the time after the first."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.count = 0

    def tick(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.count += 1

    def rate(self) -> float:
        assert self.first is not None
        return (self.count - 1) / (time.perf_counter() - self.first)


def raw_stream(llm: llama_cpp.Llama, tokens: int, seed: int) -> tuple[float, int]:
    timer = Timer()
    for _chunk in llm.create_completion(
        PROMPT,
        max_tokens=tokens,
        stream=True,
        seed=seed,
        temperature=SAMPLING["temperature"],
        top_p=SAMPLING["top_p"],
        top_k=SAMPLING["top_k"],
        min_p=SAMPLING["min_p"],
        repeat_penalty=SAMPLING["repeat_penalty"],
    ):
        timer.tick()
    return timer.rate(), timer.count


def bare_generate(llm: llama_cpp.Llama, tokens: int, seed: int) -> tuple[float, int]:
    llm.set_seed(seed)
    ids = llm.tokenize(PROMPT.encode())
    timer = Timer()
    eos = llm.token_eos()
    for token in llm.generate(
        ids,
        temp=SAMPLING["temperature"],
        top_p=SAMPLING["top_p"],
        top_k=SAMPLING["top_k"],
        min_p=SAMPLING["min_p"],
        repeat_penalty=SAMPLING["repeat_penalty"],
    ):
        if token == eos:
            break
        timer.tick()
        if timer.count >= tokens:
            break
    return timer.rate(), timer.count


def nbllm_stream(engine: Engine, tokens: int, seed: int) -> tuple[float, int]:
    timer = Timer()
    # cache=False: a rerun of this script would otherwise be answered from the prompt cache
    for _piece in engine.generate(PROMPT, stream=True, max_tokens=tokens, seed=seed, cache=False, **SAMPLING):
        timer.tick()
    return timer.rate(), timer.count


def speed(engine: Engine, llm: llama_cpp.Llama, runs: int, tokens: int) -> None:
    print(f"\n1. Streaming generation, {tokens} tokens, {runs} rounds (decode-phase t/s)")
    print("   All three drive the same Llama object on the same thread, in a rotating order, so only")
    print("   their own per-token work differs; ratios are the median of per-round ratios.")
    # nbllm decodes on the model's own thread (backends/llama_cpp.py: with OpenMP, decoding
    # from two threads slows both down); the baselines run on that same thread, so that only
    # each one's per-token work differs.
    worker = engine.registry.load(None).model._worker  # type: ignore[attr-defined]
    methods = {
        "create_completion": lambda seed: worker.submit(raw_stream, llm, tokens, seed).result(),
        "bare generate": lambda seed: worker.submit(bare_generate, llm, tokens, seed).result(),
        "nbllm": lambda seed: nbllm_stream(engine, tokens, seed),
    }
    rates: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for run in range(runs):
        seed = 1000 + run
        order = names[run % 3 :] + names[: run % 3]
        for name in order:
            rate, _count = methods[name](seed)
            rates[name].append(rate)
        print("   round", run + 1, "  ".join(f"{n}: {rates[n][-1]:5.1f}" for n in names))
    for name, values in rates.items():
        print(f"   median {name:>17}: {statistics.median(values):6.1f} t/s")
    for base in ("create_completion", "bare generate"):
        paired = [a / b for a, b in zip(rates["nbllm"], rates[base], strict=True)]
        print(f"   ratio nbllm / {base:>17}: {statistics.median(paired):.3f}x (median of per-round ratios)")


class _Owner:
    """A lock owner for direct checkout, like a stream."""

    def __init__(self) -> None:
        import threading

        self.thread_id = threading.get_ident()

    def is_suspended(self) -> bool:
        return False

    def abandon(self) -> None:
        pass


def switching(engine: Engine, second: Path) -> None:
    print("\n2. Switching between two resident models (checkout + release, 2000 alternations)")
    engine.configure(models={"second": str(second)})
    engine.registry.load(None)
    engine.registry.load("second")
    owner = _Owner()
    times = []
    for i in range(2000):
        name = "second" if i % 2 else None
        start = time.perf_counter()
        resident = engine.registry.checkout(name, owner)
        engine.registry.checkin(resident)
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"   median {statistics.median(times) * 1e3:.3f} ms, p99 {times[int(len(times) * 0.99)] * 1e3:.3f} ms")
    print(f"   loads during the loop: {engine.stats.snapshot()['model_loads'] - 2} (expected 0)")


def cold_load(engine: Engine, path: Path, runs: int) -> None:
    print(f"\n3. Cold load, alternated {runs} times (page cache warm for both; nbllm's GGUF cache cleared)")
    settings = engine.registry.load(None).settings  # what nbllm loads with: the same for the bare load
    bare, ours = [], []
    for _ in range(runs):
        start = time.perf_counter()
        llm = llama_cpp.Llama(
            str(path),
            n_ctx=settings.context_size,
            n_batch=settings.batch_size,
            n_ubatch=settings.batch_size,
            n_threads=settings.threads,
            verbose=False,
        )
        bare.append(time.perf_counter() - start)
        llm.close()
        engine.registry.unload_all()
        gguf_file._cache.clear()  # as in a new process
        start = time.perf_counter()
        engine.registry.load(None)
        ours.append(time.perf_counter() - start)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"   bare Llama(...): median {b:.3f}s   nbllm load: median {o:.3f}s   ratio {o / b:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    path = default_model_path()
    settings = Settings().merged({"performance": {"context_size": 2048}})
    engine = Engine(settings)
    resident = engine.registry.load(None)
    threads = resident.settings.threads
    print(f"model {path.name}, context 2048, batch 512, threads {threads}, llama-cpp-python {llama_cpp.__version__}")
    llm = resident.model._llm  # type: ignore[attr-defined]  # the very object nbllm drives
    speed(engine, llm, args.runs, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        second = Path(tmp) / "second-copy.gguf"
        shutil.copy(path, second)
        switching(engine, second)
        engine.registry.unload("second")
    cold_load(engine, path, args.runs)
    engine.close()


if __name__ == "__main__":
    main()
