#!/usr/bin/env python3
"""One answer streamed by nbllm against llama.cpp's llama-bench tg128, alternated in one run.

Both on the default model, same build and flags (benchmarks/llama_tools.py), same threads,
flash attention on (nbllm's default). nbllm answers a short prompt greedily with
``ignore_eos`` for 128 tokens (speculation off: this measures the plain token loop); its
generation speed (after the first token) is set against llama-bench's tg128 of the same round.
llama-cpp-python's own ``Llama.generate`` loop, on a thread of its own as nbllm's is, is
measured beside them. Goal (issue 16): nbllm / llama-bench >= 0.97x, median of the rounds.

Run: .venv/bin/python benchmarks/stream_bench.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import llama_cpp
from llama_tools import ensure_tools, llama_bench_tg

import nbllm
from nbllm.host import default_model, machine

PROMPT = "Write a long story about a lighthouse keeper."
TOKENS = 128


def raw_generate(llm: llama_cpp.Llama, tokens: list[int]) -> float:
    """llama-cpp-python's generate loop, greedy, on a new thread; tokens/s after the first."""
    result: list[float] = []

    def run() -> None:
        llm.reset()
        first = None
        for count, _token in enumerate(llm.generate(tokens, temp=0.0, top_k=1, reset=True), start=1):
            if first is None:
                first = time.perf_counter()
            if count == TOKENS:
                break
        assert first is not None
        result.append((TOKENS - 1) / (time.perf_counter() - first))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    threads = machine.default_threads()
    nbllm.configure(cache={"enabled": False}, performance={"threads": threads})
    model = str(default_model.default_model_path())
    bench = str(ensure_tools()["llama-bench"])
    llm = llama_cpp.Llama(model, n_ctx=4096, n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)
    tokens = llm.tokenize(PROMPT.encode())
    nbllm.generate(PROMPT, max_tokens=4)
    print(f"{nbllm.settings().default_model}, {threads} threads, tg{TOKENS}, {args.rounds} rounds")
    ours, theirs, raw = [], [], []
    for round_number in range(args.rounds):
        theirs.append(llama_bench_tg(bench, model, threads, TOKENS, repetitions=3))
        answer = nbllm.generate(PROMPT, max_tokens=TOKENS, temperature=0, ignore_eos=True, speculation="off")
        ours.append(answer.stats.generation_tokens_per_second)
        raw.append(raw_generate(llm, tokens))
        print(
            f"round {round_number + 1}: llama-bench {theirs[-1]:.1f} | nbllm {ours[-1]:.1f} | "
            f"llama-cpp-python generate {raw[-1]:.1f} t/s | nbllm / llama-bench {ours[-1] / theirs[-1]:.3f}",
            flush=True,
        )
    print(
        json.dumps(
            {
                "nbllm_over_llama_bench": round(statistics.median(o / t for o, t in zip(ours, theirs, strict=True)), 3),
                "llama_cpp_python_over_llama_bench": round(
                    statistics.median(r / t for r, t in zip(raw, theirs, strict=True)), 3
                ),
                "llama_bench_t_s": round(statistics.median(theirs), 1),
                "nbllm_t_s": round(statistics.median(ours), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
