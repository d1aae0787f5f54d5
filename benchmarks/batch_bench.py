#!/usr/bin/env python3
"""Many prompts at once, on the default model, in one run:

1. 32 prompts through ``generate_many`` at 1, 4 and 8 parallel sequences against one-at-a-time
   ``nbllm.generate``: aggregate generated tokens per second, end to end (prompts included).
   Goal: at least 2.2x at 8 sequences.
2. Against llama.cpp's own ``llama-batched-bench`` (same sdist, same flags: llama_tools.py) at the
   same batch sizes: 128-token prompts, 128 generated tokens each (EOS ignored, as that tool
   ignores it), generation speed S_TG = generated tokens / generation time.
   Goal: at least 0.85x of llama-batched-bench's aggregate at the same batch size.

Run: .venv/bin/python benchmarks/batch_bench.py [--prompts 32] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

from llama_tools import ensure_tools

from nbllm.core.chat_format import FormattedPrompt
from nbllm.core.config import Settings
from nbllm.engine import Engine
from nbllm.host import machine
from nbllm.host.default_model import default_model_path

TOPICS = ("containers", "databases", "compilers", "networks", "GPUs", "caches", "kernels", "notebooks")


def engine_for(parallel: int) -> Engine:
    return Engine(
        Settings().merged(
            {
                "performance": {"context_size": 2048, "parallel": parallel, "parallel_context_size": 512},
                "cache": {"enabled": False},
            }
        )
    )


def prompts(n: int) -> list[str]:
    return [
        f"Question: Explain {TOPICS[i % len(TOPICS)]} to a beginner, in detail (part {i}).\nAnswer:" for i in range(n)
    ]


def end_to_end(n_prompts: int, tokens: int) -> None:
    print(f"1. {n_prompts} prompts, up to {tokens} tokens each (seeded sampling), end to end")
    items = prompts(n_prompts)
    params = {"max_tokens": tokens, "temperature": 0.7, "repeat_penalty": 1.1}
    engine = engine_for(1)
    engine.registry.load(None)
    start = time.perf_counter()
    generated = sum(
        engine.generate(p, seed=i, **params).stats.completion_tokens
        for i, p in enumerate(items)  # type: ignore[union-attr]
    )
    baseline = generated / (time.perf_counter() - start)
    print(f"   one at a time (nbllm.generate): {baseline:6.1f} t/s ({generated} tokens)")
    engine.close()
    for parallel in (1, 4, 8):
        engine = engine_for(parallel)
        engine.registry.load(None)
        start = time.perf_counter()
        results = engine.generate_many(
            items, per_item=[{"seed": i} for i in range(n_prompts)], progress=False, **params
        )
        seconds = time.perf_counter() - start
        generated = sum(r.stats.completion_tokens for r in results if r.stats)
        assert all(r.ok for r in results)
        rate = generated / seconds
        print(f"   generate_many, parallel {parallel}: {rate:6.1f} t/s ({generated} tokens) = {rate / baseline:.2f}x")
        engine.close()


def generation_speed(parallel: int, n_prompt: int, n_gen: int) -> float:
    """S_TG as llama-batched-bench computes it: parallel x n_gen tokens over the generation time."""
    engine = engine_for(parallel)
    resident = engine.registry.load(None)
    base = "The history of computing is long. " * 40
    texts = []
    for i in range(parallel):  # exactly n_prompt tokens each, different per sequence
        text = f"{i} {base}"
        while resident.model.count_tokens(FormattedPrompt(text)) > n_prompt:
            text = text[:-4]
        texts.append(text)
    start = time.perf_counter()
    results = engine.generate_many(texts, max_tokens=n_gen, ignore_eos=True, temperature=0, progress=False)
    end = time.perf_counter()
    first_tokens_done = max(start + r.stats.time_to_first_token for r in results if r.stats)
    generated = sum(r.stats.completion_tokens for r in results if r.stats)
    engine.close()
    return (generated - parallel) / (end - first_tokens_done)  # the first tokens came with the prompts


def against_llama_batched_bench(n_prompt: int = 128, n_gen: int = 128) -> None:
    tool = ensure_tools()["llama-batched-bench"]
    threads = machine.default_threads()
    print(f"\n2. Against llama-batched-bench: npp {n_prompt}, ntg {n_gen}, threads {threads}")
    out = subprocess.run(
        [str(tool), "-m", str(default_model_path()), "-c", str(8 * (n_prompt + n_gen) + 64), "-b", "512", "-ub", "512",
         "-npp", str(n_prompt), "-ntg", str(n_gen), "-npl", "1,4,8", "-t", str(threads), "--output-format", "jsonl"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    theirs = {int(row["pl"]): float(row["speed_tg"]) for row in map(json.loads, out.strip().splitlines())}
    for parallel in (1, 4, 8):
        ours = generation_speed(parallel, n_prompt, n_gen)
        print(
            f"   {parallel} sequences: llama-batched-bench S_TG {theirs[parallel]:6.1f} t/s, nbllm {ours:6.1f} t/s "
            f"= {ours / theirs[parallel]:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    end_to_end(args.prompts, args.tokens)
    against_llama_batched_bench()


if __name__ == "__main__":
    main()
