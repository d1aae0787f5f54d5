#!/usr/bin/env python3
"""Speculative decoding by prompt lookup (core/speculation.py) on the default chat model.

Eight prompts of three kinds: copy-heavy (repeat a passage, rewrite it with small edits, fill a
template from it, add type hints to a function), summaries and extraction from a given text,
and free writing. Each is answered greedily, alternated in rounds, by:

- nbllm with speculation off, and with its default (auto);
- llama-cpp-python's ``LlamaPromptLookupDecoding(num_pred_tokens=10)``, the anchor of issue 16,
  and llama-cpp-python without a draft, on the same messages through the same chat template;
- llama.cpp's llama-bench tg128 (same build and flags: benchmarks/llama_tools.py) once per
  round, for scale.

Speeds are generation speeds (tokens after the first, over the time after the first), which
leave the prompt's reading out, and end-to-end speeds (tokens over the request's whole time),
which count it: llama-cpp-python's lookup needs every position's logits, so it reads prompts
more slowly. Reported per kind: nbllm auto / off, auto / llama-cpp-python's lookup, the share
of drafted tokens kept; and whether every nbllm answer with speculation is exactly the answer
without it (the goal: always).

With ``--draft-model NAME`` (a model name or GGUF path), nbllm also answers with that model
drafting (``draft_model=``): its speed over ``off``, the share of its guesses kept, and whether
its answers are the answers without drafts. ``--draft-model`` naming the default model itself
shows the policy with a draft as costly as the model (no smaller model of its vocabulary exists).

Run: .venv/bin/python benchmarks/speculative_bench.py [--rounds 3] [--max-tokens 200] [--draft-model M]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

import llama_cpp
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
from llama_tools import ensure_tools, llama_bench_tg

import nbllm
from nbllm.host import default_model, machine

PASSAGE = (
    "The river rose slowly through the night, and by morning the lower fields were under water. Farmers moved "
    "their animals to the hill, where the old church stood above the flood. Nobody had seen the water so high "
    "since the winter of the great storm, forty years before. At noon the mayor, Anna Berg, walked to the bridge "
    "with the engineer Tomas Lind. They agreed to open the gates of the mill dam on Friday at six in the evening, "
    "and to send two boats to the farms on the eastern bank."
)
CODE = """def total_price(items, tax_rate, discount=None):
    subtotal = 0
    for item in items:
        subtotal += item["price"] * item["quantity"]
    if discount is not None:
        subtotal = subtotal - discount
    return round(subtotal * (1 + tax_rate), 2)
"""
PROMPTS = {
    "copy": [
        f"Repeat this text exactly, word for word:\n\n{PASSAGE}",
        f"Rewrite this text with 'river' replaced by 'stream' and 'farmers' by 'villagers'; change nothing else:"
        f"\n\n{PASSAGE}",
        f"From the text below, fill in this form:\nMayor:\nEngineer:\nDay:\nTime:\nBoats:\n\nText:\n{PASSAGE}",
        f"Add Python type hints to this function and return the whole function:\n\n{CODE}",
    ],
    "summary": [
        f"Summarize this text in three sentences:\n\n{PASSAGE}",
        f"List every person and place named in this text, one per line, with what the text says about each:"
        f"\n\n{PASSAGE}",
    ],
    "free": [
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Explain how a refrigerator works, for a ten-year-old.",
    ],
}


def llama_cpp_python_speed(
    llm: llama_cpp.Llama, messages: list[dict[str, str]], max_tokens: int
) -> tuple[str, float, float]:
    """Text, generation speed and end-to-end speed of a greedy streamed chat completion, on a
    thread that ends with it, as nbllm's requests run: llama.cpp's OpenMP keeps a team of
    threads for every thread that computed, and a team left on the main thread would slow
    every other model in the process (compute_thread.py)."""
    result: list[tuple[str, float, float]] = []
    thread = threading.Thread(target=lambda: result.append(_completion(llm, messages, max_tokens)))
    thread.start()
    thread.join()
    return result[0]


def _completion(llm: llama_cpp.Llama, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, float, float]:
    first = None
    pieces = []
    start = time.perf_counter()
    for chunk in llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0, top_k=1, stream=True):
        delta = chunk["choices"][0]["delta"].get("content")
        if delta:
            if first is None:
                first = time.perf_counter()
            pieces.append(delta)
    end = time.perf_counter()
    text = "".join(pieces)
    tokens = len(llm.tokenize(text.encode(), add_bos=False, special=False))
    return text, (tokens - 1) / (end - (first or start)), tokens / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--draft-model", help="also answer with this model drafting")
    args = parser.parse_args()
    configs = ("off", "auto", "draft") if args.draft_model else ("off", "auto")
    threads = machine.default_threads()
    # No prompt cache, and no KV snapshots: each answer reads its prompt the same way.
    nbllm.configure(cache={"enabled": False, "prefix_cache_bytes": 0}, performance={"threads": threads})
    name = nbllm.settings().default_model
    model = str(default_model.default_model_path())
    system = default_model.system_prompt_for(name, "default")
    bench = ensure_tools()["llama-bench"]
    raw = {
        "lcp": llama_cpp.Llama(model, n_ctx=4096, n_threads=threads, n_threads_batch=threads, flash_attn=True,
                               verbose=False),
        "lcp_lookup": llama_cpp.Llama(model, n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                                      flash_attn=True, verbose=False,
                                      draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10)),
    }  # fmt: skip
    nbllm.chat("Hi", max_tokens=4)
    print(f"default model {name}, {threads} threads, greedy, max_tokens {args.max_tokens}, {args.rounds} rounds")
    speeds: dict[tuple[str, str], list[float]] = {}  # generation: tokens after the first / time after it
    ends: dict[tuple[str, str], list[float]] = {}  # end to end: tokens / the request's whole time
    drafted: dict[str, list[int]] = {}
    identical, answers = [], 0
    identical_with_draft: list[bool] = []
    bench_tg = []
    for round_number in range(args.rounds):
        bench_tg.append(llama_bench_tg(str(bench), model, threads))
        for kind, prompts in PROMPTS.items():
            for prompt in prompts:
                messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
                texts = {}
                for config in configs:
                    # The same KV cache before each (the system message's): the prompt's tokens are
                    # then read in the same batches, and greedy answers can be compared to the bit.
                    nbllm.chat([messages[0], {"role": "user", "content": "ok"}], max_tokens=1, speculation="off")
                    how = {"draft_model": args.draft_model} if config == "draft" else {"speculation": config}
                    answer = nbllm.chat(messages, max_tokens=args.max_tokens, temperature=0, **how)
                    texts[config] = answer.text
                    speeds.setdefault((kind, config), []).append(answer.stats.generation_tokens_per_second)
                    ends.setdefault((kind, config), []).append(answer.stats.tokens_per_second)
                    if config != "off":
                        counts = drafted.setdefault(kind if config == "auto" else f"{kind}-draft", [0, 0])
                        counts[0] += answer.stats.drafted_tokens
                        counts[1] += answer.stats.accepted_tokens
                for config, llm in raw.items():
                    _, speed, end_to_end = llama_cpp_python_speed(llm, messages, args.max_tokens)
                    speeds.setdefault((kind, config), []).append(speed)
                    ends.setdefault((kind, config), []).append(end_to_end)
                identical.append(texts["off"] == texts["auto"])
                answers += 1
                if args.draft_model:
                    identical_with_draft.append(texts["off"] == texts["draft"])
        line = " | ".join(
            f"{kind}: auto {statistics.mean(speeds[(kind, 'auto')][-len(p) :]):.1f} off "
            f"{statistics.mean(speeds[(kind, 'off')][-len(p) :]):.1f} lookup "
            f"{statistics.mean(speeds[(kind, 'lcp_lookup')][-len(p) :]):.1f} t/s"
            for kind, p in PROMPTS.items()
        )
        print(f"round {round_number + 1}: llama-bench tg128 {bench_tg[-1]:.1f} t/s | {line}", flush=True)
    summary: dict[str, Any] = {"llama_bench_tg128": round(statistics.median(bench_tg), 1)}
    for kind in PROMPTS:
        auto, off = speeds[(kind, "auto")], speeds[(kind, "off")]
        lookup, plain = speeds[(kind, "lcp_lookup")], speeds[(kind, "lcp")]
        end_auto, end_off, end_lookup = (ends[(kind, c)] for c in ("auto", "off", "lcp_lookup"))
        summary[kind] = {
            "auto_over_off": round(statistics.median(a / o for a, o in zip(auto, off, strict=True)), 3),
            "end_to_end_auto_over_off": round(
                statistics.median(a / o for a, o in zip(end_auto, end_off, strict=True)), 3
            ),
            "end_to_end_auto_over_llama_cpp_python_lookup": round(
                statistics.median(a / b for a, b in zip(end_auto, end_lookup, strict=True)), 3
            ),
            "auto_over_llama_cpp_python_lookup": round(
                statistics.median(a / b for a, b in zip(auto, lookup, strict=True)), 3
            ),
            "auto_over_llama_bench_tg": round(statistics.median(auto) / statistics.median(bench_tg), 3),
            "llama_cpp_python_lookup_over_plain": round(
                statistics.median(a / b for a, b in zip(lookup, plain, strict=True)), 3
            ),
            "auto_t_s": round(statistics.median(auto), 1),
            "off_t_s": round(statistics.median(off), 1),
            "kept_share": round(drafted[kind][1] / drafted[kind][0], 3) if drafted[kind][0] else None,
            "drafted": drafted[kind][0],
        }
        if args.draft_model:
            with_draft, kept = speeds[(kind, "draft")], drafted[f"{kind}-draft"]
            summary[kind]["draft_model_over_off"] = round(
                statistics.median(d / o for d, o in zip(with_draft, off, strict=True)), 3
            )
            summary[kind]["draft_model_kept_share"] = round(kept[1] / kept[0], 3) if kept[0] else None
            summary[kind]["draft_model_drafted"] = kept[0]
    summary["identical_answers"] = f"{sum(identical)}/{answers}"
    if args.draft_model:
        summary["identical_answers_with_the_draft_model"] = f"{sum(identical_with_draft)}/{answers}"
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
