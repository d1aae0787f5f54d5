#!/usr/bin/env python3
"""Structured output on the default model: what a schema costs, against llama-cpp-python's own.

Same prompts, same process, alternated round by round; medians of per-round ratios.

1. nbllm with ``schema=`` against nbllm without (decode speed, t/s). Goal >= 0.90x.
2. nbllm with ``schema=`` against llama-cpp-python's ``create_chat_completion(response_format=
   {"type": "json_object", "schema": ...})`` (its grammar at the head of the sampler chain) on
   the same model file and settings. Goal >= 2.5x.
3. ``generate_many`` of 32 prompts with a schema against the same 32 one at a time (wall time).
   Goal >= 2x.
Every structured answer is validated (pydantic); validity must be 100%.

Run: .venv/bin/python benchmarks/structured_bench.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import llama_cpp
from pydantic import BaseModel, Field

import nbllm
from nbllm.host import machine
from nbllm.host.default_model import default_model_path


class Person(BaseModel):
    name: str
    age: int
    city: str
    hobbies: list[str] = Field(max_length=4)  # bounded: a small model can list hobbies forever


PROMPTS = [
    f"Invent a fictional person who lives in {city}. Answer with their name, age, city and hobbies."
    for city in ("Paris", "Lagos", "Lima", "Oslo", "Osaka", "Cairo", "Quito", "Perth")
]
MAX_TOKENS = 200


def nbllm_rate(prompt: str, seed: int, schema: bool) -> tuple[float, int, bool]:
    options = {"schema": Person} if schema else {}
    result = nbllm.chat(prompt, max_tokens=MAX_TOKENS, seed=seed, temperature=0.7, cache=False, **options)
    valid = not schema or isinstance(result.data, Person)
    return result.stats.generation_tokens_per_second, result.stats.completion_tokens, valid


def one(prompt: str, seed: int) -> object:
    """A structured answer's data, or its error (an answer that reached max_tokens)."""
    try:
        return nbllm.chat(prompt, schema=Person, max_tokens=MAX_TOKENS, seed=seed, cache=False)
    except nbllm.IncompleteAnswerError as error:
        return error


def raw_rate(llm: llama_cpp.Llama, prompt: str, seed: int) -> tuple[float, int, bool]:
    first = None
    count = 0
    text = []
    for chunk in llm.create_chat_completion(
        [{"role": "user", "content": prompt}],
        response_format={"type": "json_object", "schema": Person.model_json_schema()},
        max_tokens=MAX_TOKENS, temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1,
        seed=seed, stream=True,
    ):  # fmt: skip
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            count += 1
            text.append(piece)
            if first is None:
                first = time.perf_counter()
    assert first is not None
    elapsed = time.perf_counter() - first
    try:
        Person.model_validate_json("".join(text))
        valid = True
    except ValueError:
        valid = False
    return (count - 1) / elapsed, count, valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    threads = machine.default_threads()
    nbllm.configure(cache={"enabled": False}, performance={"threads": threads})
    nbllm.chat("Hi", max_tokens=2)  # loaded
    raw = llama_cpp.Llama(
        str(default_model_path()), n_ctx=4096, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False
    )
    print(f"default model, {threads} threads, {len(PROMPTS)} prompts, max_tokens {MAX_TOKENS}, {args.rounds} rounds")
    free_ratio, raw_ratio, many_ratio = [], [], []
    checked = valid = 0
    raw_checked = raw_valid = 0
    for round_number in range(args.rounds):
        with_schema, without, theirs = [], [], []
        for index, prompt in enumerate(PROMPTS):
            seed = 100 * round_number + index
            rate, _n, ok = nbllm_rate(prompt, seed, schema=True)
            with_schema.append(rate)
            checked, valid = checked + 1, valid + ok
            without.append(nbllm_rate(prompt, seed, schema=False)[0])
            rate, _n, ok = raw_rate(raw, prompt, seed)
            theirs.append(rate)
            raw_checked, raw_valid = raw_checked + 1, raw_valid + ok
        ours = statistics.median(with_schema)
        free_ratio.append(ours / statistics.median(without))
        raw_ratio.append(ours / statistics.median(theirs))
        many_prompts = [PROMPTS[i % len(PROMPTS)] + f" (#{i})" for i in range(32)]
        start = time.perf_counter()
        # One seed for all, in both: a batched answer is sampled exactly as the same request alone
        # would be, so both do the same work and the ratio is what batching saves.
        seed = 7 + round_number
        singles = [one(p, seed) for p in many_prompts]
        one_at_a_time = time.perf_counter() - start
        start = time.perf_counter()
        many = nbllm.chat_many(
            many_prompts, schema=Person, max_tokens=MAX_TOKENS, seed=seed, cache=False, progress=False
        )
        together = time.perf_counter() - start
        many_ratio.append(one_at_a_time / together)
        for item in [*singles, *many]:
            checked += 1
            valid += isinstance(getattr(item, "data", None), Person)
        print(
            f"round {round_number + 1}: schema {ours:.1f} t/s | free {statistics.median(without):.1f} t/s | "
            f"llama-cpp-python json schema {statistics.median(theirs):.1f} t/s | 32 one at a time "
            f"{one_at_a_time:.1f} s, chat_many {together:.1f} s",
            flush=True,
        )
    print(
        json.dumps(
            {
                "schema_over_free": round(statistics.median(free_ratio), 3),
                "schema_over_llama_cpp_python": round(statistics.median(raw_ratio), 3),
                "chat_many_over_one_at_a_time": round(statistics.median(many_ratio), 3),
                "nbllm_valid": f"{valid}/{checked}",
                "llama_cpp_python_valid": f"{raw_valid}/{raw_checked}",
            }
        )
    )


if __name__ == "__main__":
    main()
