#!/usr/bin/env python3
"""Tool calls on the default model: are they valid, and what does the grammar cost?

50 prompts that ask for one of four tools (weather, unit conversion, a calendar entry, a
search), ``tool_choice="required"``. For each: the call must name a real tool with arguments
that validate (goal: 100%), and its decode speed is compared with an unconstrained answer of
the same length to the same prompt (the same messages, tools described in the system message
as nbllm describes them, ``ignore_eos``, the same number of tokens), alternated.
Goal: constrained >= 0.9x.

The unconstrained answer reads the same prompt because what is measured is the grammar's cost:
the tools' descriptions make the prompt ~380 tokens longer, and a longer prompt alone makes
every generated token slower (attention over more of the KV cache: ~0.89x on the default
model). That ratio, against the user's question with no tools described, is printed as well.

``max_tokens=1024``: up to 8 calls fit in one answer (nbllm's format), and a 135M model at
temperature 0.7 sometimes writes all 8 with long made-up strings; the question here is whether
a call can be invalid, not how long the model talks. Answers longer than 400 tokens are
counted and shown.

Run: .venv/bin/python benchmarks/tools_bench.py [--prompts 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Literal

import nbllm
from nbllm.core.chat_format import with_default_system
from nbllm.core.tools import make_toolset, with_tool_instructions
from nbllm.host import default_model, machine


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
    toolset = make_toolset(TOOLS, "required")
    system = default_model.system_prompt_for(nbllm.settings().default_model, "default")
    valid, ratios, bare_ratios, names, long_answers = 0, [], [], [], []
    for index, prompt in enumerate(prompts):
        try:
            called = nbllm.chat(prompt, tools=TOOLS, tool_choice="required", max_tokens=1024, seed=index)
        except nbllm.NbllmError as error:
            print(f"#{index}: {type(error).__name__}: {error}")
            continue
        calls = called.tool_calls
        valid += bool(calls)
        names.append(calls[0].name if calls else "-")
        tokens = called.stats.completion_tokens
        if tokens > 400:
            long_answers.append(index)
        # The same messages the engine built for the call (engine.make_request), unconstrained.
        messages = with_tool_instructions(with_default_system([{"role": "user", "content": prompt}], system), toolset)
        free = nbllm.chat(messages, max_tokens=tokens, ignore_eos=True, seed=index)
        if free.stats.prompt_tokens != called.stats.prompt_tokens:
            raise SystemExit(f"#{index}: the prompts differ: {free.stats.prompt_tokens}, {called.stats.prompt_tokens}")
        bare = nbllm.chat(prompt, max_tokens=tokens, ignore_eos=True, seed=index)
        speed = called.stats.generation_tokens_per_second
        if speed and free.stats.generation_tokens_per_second and bare.stats.generation_tokens_per_second:
            ratios.append(speed / free.stats.generation_tokens_per_second)
            bare_ratios.append(speed / bare.stats.generation_tokens_per_second)
        if index < 5:
            print(f"#{index} {prompt!r} -> {json.dumps([[c.name, c.arguments] for c in calls])}", flush=True)
    print(
        json.dumps(
            {
                "valid_calls": f"{valid}/{len(prompts)}",
                "answers_over_400_tokens": long_answers,
                "tools_chosen": {name: names.count(name) for name in sorted(set(names))},
                "constrained_over_free_median": round(statistics.median(ratios), 3),
                "constrained_over_free_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)],
                "constrained_over_free_without_tools_in_prompt_median": round(statistics.median(bare_ratios), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
