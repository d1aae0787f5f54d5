#!/usr/bin/env python3
"""Does measuring distort what it measures? ``nbllm.bench`` against llama.cpp's own llama-bench.

Both run on the default model with the same build (llama-bench is compiled from the same sdist
with the same flags: benchmarks/llama_tools.py), the same threads, batch and micro-batch, the
same pp512 / tg128 tests, the same flash attention (on: nbllm's default on a CPU), alternated
several rounds so that machine noise hits both alike, medians of the per-round ratios.
Goals (issue 16): tg and pp each within 5% of llama-bench's (ratio 0.95-1.05).

Run: .venv/bin/python benchmarks/bench_vs_llama_bench.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

from llama_tools import ensure_tools

import nbllm
from nbllm.host import machine
from nbllm.host.default_model import default_model_path


def llama_bench(binary: str, model: str, threads: int, repetitions: int) -> dict[str, float]:
    out = subprocess.run(
        [binary, "-m", model, "-p", "512", "-n", "128", "-t", str(threads), "-b", "512", "-ub", "512",
         "-ngl", "0", "-fa", "on", "-r", str(repetitions), "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = json.loads(out)
    return {("pp" if row["n_prompt"] else "tg"): float(row["avg_ts"]) for row in rows}


def nbllm_bench(threads: int, repetitions: int) -> dict[str, float]:
    results = nbllm.bench(
        None, pp=512, tg=128, repetitions=repetitions, threads=threads, batch_size=512, context_size=4096,
        progress=False,
    )  # fmt: skip
    return {r["kind"]: r["tokens_per_second"] for r in results.records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    tools = ensure_tools()
    model = str(default_model_path())
    threads = machine.default_threads()
    nbllm.configure(cache={"enabled": False}, performance={"flash_attention": True})
    print(
        f"default model, threads {threads}, batch 512, flash attention on, pp512/tg128, "
        f"{args.rounds} rounds x {args.repetitions} reps"
    )
    ratios: dict[str, list[float]] = {"pp": [], "tg": []}
    for round_number in range(args.rounds):
        theirs = llama_bench(str(tools["llama-bench"]), model, threads, args.repetitions)
        ours = nbllm_bench(threads, args.repetitions)
        for kind in ("pp", "tg"):
            ratios[kind].append(ours[kind] / theirs[kind])
        print(
            f"round {round_number + 1}: llama-bench pp {theirs['pp']:.1f} tg {theirs['tg']:.1f} t/s | "
            f"nbllm pp {ours['pp']:.1f} tg {ours['tg']:.1f} t/s | ratio pp {ratios['pp'][-1]:.3f} "
            f"tg {ratios['tg'][-1]:.3f}"
        )
    print(
        f"median ratio nbllm / llama-bench: pp {statistics.median(ratios['pp']):.3f}x, "
        f"tg {statistics.median(ratios['tg']):.3f}x (goals: both within 5%)"
    )


if __name__ == "__main__":
    main()
