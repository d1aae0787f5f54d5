#!/usr/bin/env python3
"""Many prompts at once on the default model, against llama.cpp's own ``llama-batched-bench``
(same sdist, same flags: llama_tools.py), alternated in rounds; medians of per-round ratios.

Every round runs, in this order:

1. llama-batched-bench at 8 sequences, 128-token prompts, 128 generated tokens each: its
   generation speed S_TG (generated tokens / generation time, prompts excluded), and its end to
   end speed on the shape of workload 3 (``-npp`` its prompt length, ``-ntg 64``).
2. nbllm's S_TG the same way: 8 prompts of 128 tokens through ``generate_many``, 128 tokens
   each (EOS ignored, as that tool ignores it), timed from the last first token to the end.
3. End to end (prompts read and answers sampled: what a user waits for), ``generate_many`` at 8
   sequences over 32 different short questions, 64 tokens each (EOS ignored, the shape of
   llama-batched-bench's run in 1), seeded sampling; and again with answers as long as the model
   makes them (fewer sequences decode together as answers end and the queue empties).
   Issue 16's goal: generated tokens per second >= 0.9x llama-batched-bench's S_TG.
4. The same over 32 chat requests that share their start (the model's system prompt and one
   instruction, ~110 tokens) and differ in a short input: the way ``generate_many`` is used over
   a list of texts. Once as nbllm runs it (the shared start read once, llama_cpp_batch.py), once
   with every prompt read whole (the loop as it was before), to show what sharing saves
   (``chat_many``).

Run: .venv/bin/python benchmarks/batch_bench.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llama_tools import ensure_tools

from nbllm.backends import llama_cpp_batch
from nbllm.core.chat_format import FormattedPrompt
from nbllm.core.config import Settings
from nbllm.engine import Engine
from nbllm.host import machine
from nbllm.host.default_model import default_model_path

PARALLEL = 8
TOPICS = ("containers", "databases", "compilers", "networks", "GPUs", "caches", "kernels", "notebooks")
INSTRUCTION = (
    "You label customer messages for a support team. Read the message below and answer with one "
    "line: the product area it is about (billing, shipping, accounts, or other), then a dash, then "
    "a short reason in plain words. Do not greet the customer, do not repeat the message, and do not "
    "add anything after the reason. If the message is about more than one area, choose the one the "
    "customer is most upset about.\n\nMessage: "
)
MESSAGES = (
    "I was charged twice for my order last week.",
    "My parcel has been stuck in transit for ten days.",
    "I cannot log in since I changed my email address.",
    "Do you sell gift cards in other currencies?",
)


def engine() -> Engine:
    return Engine(
        Settings().merged(
            {
                "performance": {
                    "context_size": 2048,
                    "parallel": PARALLEL,
                    "parallel_context_size": 512,
                    "flash_attention": True,
                },
                "cache": {"enabled": False},
            }
        )
    )


def questions(n: int) -> list[str]:
    return [
        f"Question: Explain {TOPICS[i % len(TOPICS)]} to a beginner, in detail (part {i}).\nAnswer:" for i in range(n)
    ]


def chats(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{INSTRUCTION}{MESSAGES[i % len(MESSAGES)]} (ticket {i})"}] for i in range(n)]


def batched_bench(tool: str, n_prompt: int, n_gen: int) -> dict[str, float]:
    out = subprocess.run(
        [tool, "-m", str(default_model_path()), "-c", str(PARALLEL * (n_prompt + n_gen) + 64), "-b", "512",
         "-ub", "512", "-npp", str(n_prompt), "-ntg", str(n_gen), "-npl", str(PARALLEL),
         "-t", str(machine.default_threads()), "-fa", "on", "--output-format", "jsonl"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    row = json.loads(out.strip().splitlines()[-1])
    return {"s_tg": float(row["speed_tg"]), "end_to_end": PARALLEL * n_gen / float(row["t"])}


def nbllm_s_tg(eng: Engine, n_prompt: int = 128, n_gen: int = 128) -> float:
    """S_TG as llama-batched-bench computes it: generated tokens over the generation time."""
    resident = eng.registry.load(None)
    base = "The history of computing is long. " * 40
    texts = []
    for i in range(PARALLEL):  # exactly n_prompt tokens each, different from the first token on
        text = f"{i} {base}"
        while resident.model.count_tokens(FormattedPrompt(text)) > n_prompt:
            text = text[:-4]
        texts.append(text)
    start = time.perf_counter()
    results = eng.generate_many(texts, max_tokens=n_gen, ignore_eos=True, temperature=0, progress=False)
    end = time.perf_counter()
    first_tokens_done = max(start + r.stats.time_to_first_token for r in results if r.stats)
    generated = sum(r.stats.completion_tokens for r in results if r.stats)
    return (generated - PARALLEL) / (end - first_tokens_done)  # the first tokens came with the prompts


def end_to_end(eng: Engine, items: list[Any], tokens: int, *, ignore_eos: bool = False) -> tuple[float, int, int]:
    """Generated tokens per second, wall clock; prompt tokens read, and taken from the cache."""
    params = {"max_tokens": tokens, "temperature": 0.7, "repeat_penalty": 1.1, "ignore_eos": ignore_eos}
    many = eng.chat_many if isinstance(items[0], list) else eng.generate_many
    start = time.perf_counter()
    results = many(items, per_item=[{"seed": i} for i in range(len(items))], progress=False, **params)
    seconds = time.perf_counter() - start
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    stats = [r.stats for r in results if r.stats]
    generated = sum(s.completion_tokens for s in stats)
    return generated / seconds, sum(s.prompt_tokens for s in stats), sum(s.reused_prompt_tokens for s in stats)


@contextmanager
def every_prompt_read_whole() -> Iterator[None]:
    """The loop before shared prefixes: each sequence starts from an empty cache."""
    place = llama_cpp_batch.BatchDecoder._place

    def read_whole(self: Any, slot: Any, slots: Any) -> None:
        self._take_prefix(slot, slot.seq_id, 0)

    llama_cpp_batch.BatchDecoder._place = read_whole  # type: ignore[method-assign]
    try:
        yield
    finally:
        llama_cpp_batch.BatchDecoder._place = place  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    tool = str(ensure_tools()["llama-batched-bench"])
    eng = engine()
    resident = eng.registry.load(None)
    question_tokens = round(
        statistics.fmean(resident.model.count_tokens(FormattedPrompt(q)) for q in questions(args.prompts))
    )
    print(
        f"default model, {PARALLEL} sequences, threads {machine.default_threads()}, flash attention on, "
        f"{args.rounds} rounds; workload 3: {args.prompts} questions of ~{question_tokens} tokens, "
        f"{args.tokens} generated each"
    )
    ratios: dict[str, list[float]] = {
        k: [] for k in ("s_tg", "questions", "questions_e2e", "questions_free", "shared", "unshared")
    }
    for round_number in range(1, args.rounds + 1):
        theirs = batched_bench(tool, 128, 128)
        theirs_short = batched_bench(tool, question_tokens, args.tokens)
        ours_s_tg = nbllm_s_tg(eng)
        ours_questions, _, _ = end_to_end(eng, questions(args.prompts), args.tokens, ignore_eos=True)
        ours_free, _, _ = end_to_end(eng, questions(args.prompts), args.tokens)
        ours_shared, read, reused = end_to_end(eng, chats(args.prompts), args.tokens)
        with every_prompt_read_whole():
            ours_unshared, _, _ = end_to_end(eng, chats(args.prompts), args.tokens)
        ratios["s_tg"].append(ours_s_tg / theirs["s_tg"])
        ratios["questions"].append(ours_questions / theirs["s_tg"])
        ratios["questions_e2e"].append(ours_questions / theirs_short["end_to_end"])
        ratios["questions_free"].append(ours_free / theirs["s_tg"])
        ratios["shared"].append(ours_shared / theirs["s_tg"])
        ratios["unshared"].append(ours_unshared / theirs["s_tg"])
        print(
            f"round {round_number}: llama-batched-bench S_TG {theirs['s_tg']:.1f} t/s, end to end (npp "
            f"{question_tokens}, ntg {args.tokens}) {theirs_short['end_to_end']:.1f} | nbllm S_TG {ours_s_tg:.1f}, "
            f"questions {ours_questions:.1f} (as long as the model likes: {ours_free:.1f}), "
            f"shared-start chats {ours_shared:.1f} ({reused}/{read} prompt tokens "
            f"from the cache), the same read whole {ours_unshared:.1f} t/s",
            flush=True,
        )
    median = {k: statistics.median(v) for k, v in ratios.items()}
    print(
        f"medians: nbllm S_TG / llama-batched-bench S_TG {median['s_tg']:.3f}x\n"
        f"         questions end to end / llama-batched-bench S_TG {median['questions']:.3f}x (goal >= 0.9x)\n"
        f"         questions end to end / llama-batched-bench end to end, same shape {median['questions_e2e']:.3f}x\n"
        f"         questions, answers as long as the model likes / llama-batched-bench S_TG "
        f"{median['questions_free']:.3f}x\n"
        f"         shared-start chats end to end / llama-batched-bench S_TG {median['shared']:.3f}x "
        f"(read whole: {median['unshared']:.3f}x)"
    )
    eng.close()


if __name__ == "__main__":
    main()
