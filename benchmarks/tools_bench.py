#!/usr/bin/env python3
"""Tool calls on the default model: are they valid, and what does the grammar cost?

50 prompts that ask for one of four tools (weather, unit conversion, a calendar entry, a
search), ``tool_choice="required"``. For each: the call must name a real tool with arguments
that validate (goal: 100%), and its decode speed is compared with an unconstrained answer of
the same length to the same prompt (``ignore_eos``, the same number of tokens), alternated.
Goal: constrained >= 0.9x.

Run: .venv/bin/python benchmarks/tools_bench.py [--prompts 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Literal

import nbllm
from nbllm.host import machine


def get_weather(city: str, unit: Literal["C", "F"] = "C") -> dict[str, object]:
    """The current weather in a city."""
    return {"city": city, "temperature": 21, "unit": unit}


def convert_units(value: float, from_unit: str, to_unit: str) -> float:
    """Convert a value between units of length, mass or temperature."""
    return value


def add_event(title: str, day: Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"], hour: int) -> str:
    """Put an event in the calendar."""
    return "ok"


def search(query: str, limit: int = 5) -> list[str]:
    """Search the web."""
    return []


TOOLS = [get_weather, convert_units, add_event, search]
ASKS = [
    "What is the weather in {}?", "Convert 12 {} to metres.", "Add lunch with {} on friday at 13.",
    "Search the web for {}.", "Is it raining in {}?",
]  # fmt: skip
WORDS = ["Lima", "Paris", "feet", "Ana", "llamas", "Oslo", "miles", "Tom", "GGUF files", "Cairo"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=50)
    args = parser.parse_args()
    nbllm.configure(cache={"enabled": False}, performance={"threads": machine.default_threads()})
    nbllm.chat("Hi", max_tokens=2)
    prompts = [ASKS[i % len(ASKS)].format(WORDS[(i // len(ASKS) + i) % len(WORDS)]) for i in range(args.prompts)]
    valid, ratios, names = 0, [], []
    for index, prompt in enumerate(prompts):
        try:
            called = nbllm.chat(prompt, tools=TOOLS, tool_choice="required", max_tokens=400, seed=index)
        except nbllm.NbllmError as error:
            print(f"#{index}: {type(error).__name__}: {error}")
            continue
        calls = called.tool_calls
        valid += bool(calls)
        names.append(calls[0].name if calls else "-")
        tokens = called.stats.completion_tokens
        free = nbllm.chat(prompt, max_tokens=tokens, ignore_eos=True, seed=index)
        if called.stats.generation_tokens_per_second and free.stats.generation_tokens_per_second:
            ratios.append(called.stats.generation_tokens_per_second / free.stats.generation_tokens_per_second)
        if index < 5:
            print(f"#{index} {prompt!r} -> {json.dumps([[c.name, c.arguments] for c in calls])}", flush=True)
    print(
        json.dumps(
            {
                "valid_calls": f"{valid}/{len(prompts)}",
                "tools_chosen": {name: names.count(name) for name in sorted(set(names))},
                "constrained_over_free_median": round(statistics.median(ratios), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
