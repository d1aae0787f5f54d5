#!/usr/bin/env python3
"""Structured output on the default model: what a schema costs, against llama-cpp-python's own.

Same prompts, same process, alternated round by round; medians of per-round ratios.

1. nbllm with ``schema=`` against nbllm without (decode speed, t/s). Goal >= 0.90x.
2. nbllm with ``schema=`` against llama-cpp-python's ``create_chat_completion(response_format=
   {"type": "json_object", "schema": ...})`` (its grammar at the head of the sampler chain) on
   the same model file and settings. Goal >= 2.5x.
3. ``chat_many`` of 32 prompts with a schema against the same 32 one at a time (wall time).
   Goal >= 2x. Measured for short answers (``Person``, about 45 tokens) and longer ones
   (``Itinerary``, about 150), next to the same ratio for free text on the same prompts: what
   batching itself gives on this machine (llama.cpp's decode of 8 sequences costs several
   times one), which no constraint can beat.
Every complete structured answer is validated (pydantic); validity must be 100%. Answers cut
off by max_tokens (``IncompleteAnswerError``) are counted apart.

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


class Stop(BaseModel):
    day: int
    city: str = Field(max_length=20)
    activity: str = Field(max_length=60)


class Itinerary(BaseModel):
    title: str = Field(max_length=40)
    stops: list[Stop] = Field(min_length=3, max_length=3)


PROMPTS = [
    f"Invent a fictional person who lives in {city}. Answer with their name, age, city and hobbies."
    for city in ("Paris", "Lagos", "Lima", "Oslo", "Osaka", "Cairo", "Quito", "Perth")
]
MAX_TOKENS = 200


def nbllm_rate(prompt: str, seed: int, schema: bool) -> tuple[float, int, bool | None]:
    """Decode speed, tokens, and whether the answer validated (None: cut off by max_tokens)."""
    options = {"schema": Person} if schema else {}
    try:
        result = nbllm.chat(prompt, max_tokens=MAX_TOKENS, seed=seed, temperature=0.7, cache=False, **options)
    except nbllm.IncompleteAnswerError as error:
        stats = error.stats
        return stats.generation_tokens_per_second, stats.completion_tokens, None  # type: ignore[attr-defined]
    valid = not schema or isinstance(result.data, Person)
    return result.stats.generation_tokens_per_second, result.stats.completion_tokens, valid


def one(prompt: str, seed: int, schema: type[BaseModel] | None) -> object:
    """A structured answer (or its error: an answer that reached max_tokens), or a free one."""
    options = {"schema": schema} if schema is not None else {}
    try:
        return nbllm.chat(prompt, max_tokens=MAX_TOKENS * 2, seed=seed, cache=False, **options)
    except nbllm.IncompleteAnswerError as error:
        return error


def batching(prompts: list[str], seed: int, schema: type[BaseModel] | None) -> tuple[float, list[object]]:
    """Wall time one at a time over wall time with chat_many, and every result."""
    start = time.perf_counter()
    singles = [one(p, seed, schema) for p in prompts]
    one_at_a_time = time.perf_counter() - start
    options = {"schema": schema} if schema is not None else {}
    start = time.perf_counter()
    many = nbllm.chat_many(prompts, max_tokens=MAX_TOKENS * 2, seed=seed, cache=False, progress=False, **options)
    together = time.perf_counter() - start
    return one_at_a_time / together, [*singles, *many]


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
    free_ratio, raw_ratio, many_ratio, long_ratios, free_ratios = [], [], [], [], []
    checked = valid = incomplete = 0
    raw_checked = raw_valid = 0
    for round_number in range(args.rounds):
        with_schema, without, theirs = [], [], []
        for index, prompt in enumerate(PROMPTS):
            seed = 100 * round_number + index
            rate, _n, ok = nbllm_rate(prompt, seed, schema=True)
            with_schema.append(rate)
            if ok is None:
                incomplete += 1
            else:
                checked, valid = checked + 1, valid + ok
            without.append(nbllm_rate(prompt, seed, schema=False)[0])
            rate, _n, ok = raw_rate(raw, prompt, seed)
            theirs.append(rate)
            raw_checked, raw_valid = raw_checked + 1, raw_valid + ok
        ours = statistics.median(with_schema)
        free_ratio.append(ours / statistics.median(without))
        raw_ratio.append(ours / statistics.median(theirs))
        many_prompts = [PROMPTS[i % len(PROMPTS)] + f" (#{i})" for i in range(32)]
        trips = [f"Plan a three-day trip around {p.split(' in ')[1].split('.')[0]} (#{i})." for i, p in
                 enumerate(many_prompts)]  # fmt: skip
        # One seed for all, in both: a batched answer is sampled exactly as the same request alone
        # would be, so both do the same work and the ratio is what batching saves.
        seed = 7 + round_number
        ratio, results = batching(many_prompts, seed, Person)
        many_ratio.append(ratio)
        long_ratio, long_results = batching(trips, seed, Itinerary)
        long_ratios.append(long_ratio)
        free_ratios.append(batching(many_prompts, seed, None)[0])
        for item, kind in [*((r, Person) for r in results), *((r, Itinerary) for r in long_results)]:
            if isinstance(item, nbllm.IncompleteAnswerError) or isinstance(getattr(item, "error", None),
                                                                           nbllm.IncompleteAnswerError):  # fmt: skip
                incomplete += 1
                continue
            checked += 1
            valid += isinstance(getattr(item, "data", None), kind)
        print(
            f"round {round_number + 1}: schema {ours:.1f} t/s | free {statistics.median(without):.1f} t/s | "
            f"llama-cpp-python json schema {statistics.median(theirs):.1f} t/s | chat_many / one at a time: "
            f"Person {ratio:.2f}x, Itinerary {long_ratio:.2f}x, free text {free_ratios[-1]:.2f}x",
            flush=True,
        )
    print(
        json.dumps(
            {
                "schema_over_free": round(statistics.median(free_ratio), 3),
                "schema_over_llama_cpp_python": round(statistics.median(raw_ratio), 3),
                "chat_many_over_one_at_a_time_person": round(statistics.median(many_ratio), 3),
                "chat_many_over_one_at_a_time_itinerary": round(statistics.median(long_ratios), 3),
                "chat_many_over_one_at_a_time_free_text": round(statistics.median(free_ratios), 3),
                "nbllm_valid": f"{valid}/{checked}",
                "nbllm_cut_off_by_max_tokens": incomplete,
                "llama_cpp_python_valid": f"{raw_valid}/{raw_checked}",
            }
        )
    )


if __name__ == "__main__":
    main()
