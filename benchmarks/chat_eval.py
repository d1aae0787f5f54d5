#!/usr/bin/env python3
"""Which embedded model, prompted how, chats best? 30 short questions and instructions, scored
automatically.

Each item has its own check (expected words, a regex, a format) and every answer must also
- leak no turn marker ("Question:", "Answer:", "User:", "<|im_start|>", "<start_of_turn>", ...),
- not run away (no line said three times, no four-word phrase said four times),
- end by itself within ``--max-tokens`` (an answer cut at the limit fails).

Everything goes through nbllm's own API (``nbllm.chat``; ``nbllm.generate`` for the transcript
formats nbllm does not ship), greedy (temperature 0, fixed seed), prompt cache off. Configurations:
the embedded Gemma 3 270M base model with nbllm's transcript, SmolLM2-135M-Instruct with its own
chat template, and the prompt variants tried for each. Scores only; speed (t/s) is measured on
whatever machine runs it and is given for comparison between rows.

Run: nice -n 10 .venv/bin/python benchmarks/chat_eval.py [--configs a,b] [--log benchmarks/results/chat_eval.log]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbllm
from nbllm.host.default_model import SMOLLM2_SYSTEM_PROMPT

# ---------------------------------------------------------------------------- checks


def has(*words: str) -> Callable[[str], bool]:
    """Any of ``words`` as a whole word, case-insensitive."""
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    return lambda text: bool(pattern.search(text))


def first_word(expected: str) -> Callable[[str], bool]:
    """A yes/no answer: its first word."""

    def check(text: str) -> bool:
        match = re.match(r"\W*(\w+)", text)
        return bool(match) and match.group(1).lower() == expected

    return check


def at_least(count: int, vocabulary: str) -> Callable[[str], bool]:
    """A list: at least ``count`` different words of ``vocabulary``."""
    words = vocabulary.split()

    def check(text: str) -> bool:
        lower = text.lower()
        return sum(bool(re.search(rf"\b{re.escape(w)}s?\b", lower)) for w in words) >= count

    return check


def one_line_summary(*keywords: str) -> Callable[[str], bool]:
    """One line of at most 40 words naming the subject."""
    mentions = has(*keywords)
    return lambda text: "\n" not in text.strip() and len(text.split()) <= 40 and mentions(text)


def counts_to_five(text: str) -> bool:
    return bool(re.search(r"1\D+2\D+3\D+4\D+5", text)) and not re.search(r"\b(?:6|7|8|9|10)\b", text)


def short_and(check: Callable[[str], bool], words: int) -> Callable[[str], bool]:
    return lambda text: len(text.split()) <= words and check(text)


def anything(text: str) -> bool:
    return bool(text.strip())


PARAGRAPHS = {
    "eiffel": (
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the "
        "engineering company of Gustave Eiffel and built between 1887 and 1889 as the entrance to the "
        "1889 World's Fair. It is about 330 metres tall and is one of the most visited monuments in the world."
    ),
    "bees": (
        "Honey bees live in colonies of tens of thousands of workers and a single queen. Workers collect "
        "nectar and pollen from flowers, and in doing so they pollinate many of the crops people eat. "
        "Beekeepers harvest the honey the bees make from nectar."
    ),
    "python": (
        "Python is a programming language created by Guido van Rossum and first released in 1991. It is "
        "known for its readable syntax and large standard library, and it is widely used for web "
        "development, data analysis, scripting and machine learning."
    ),
}


def summarize(key: str) -> str:
    return f"Summarize this paragraph in one sentence.\n\n{PARAGRAPHS[key]}"


COLORS = "red blue green yellow orange purple pink black white brown gray grey violet indigo"
ANIMALS = (
    "dog cat horse cow sheep pig lion tiger elephant bear wolf fox rabbit mouse bird fish eagle "
    "monkey giraffe zebra deer goat duck chicken owl snake whale dolphin shark frog"
)
FRUITS = "apple banana orange grape pear cherry strawberry mango peach lemon pineapple plum kiwi watermelon"
DAYS = "monday tuesday wednesday thursday friday saturday sunday"

# (category, prompt, check)
ITEMS: list[tuple[str, str, Callable[[str], bool]]] = [
    ("facts", "What is the capital of France?", has("Paris")),
    ("facts", "What is the capital of Japan?", has("Tokyo")),
    ("facts", "What is the capital of Italy?", has("Rome")),
    ("facts", "What is the largest planet in our solar system?", has("Jupiter")),
    ("facts", "What gas do plants take in from the air to make food?", has("carbon dioxide", "CO2")),
    ("facts", "What is the chemical formula of water?", has("H2O", "H₂O")),
    ("facts", "Who wrote Romeo and Juliet?", has("Shakespeare")),
    ("facts", "How many days are in a week?", has("7", "seven")),
    ("facts", "At what temperature in Celsius does water boil at sea level?", has("100")),
    ("arithmetic", "What is 2 + 2?", has("4", "four")),
    ("arithmetic", "What is 10 times 3?", has("30", "thirty")),
    ("arithmetic", "What is 15 minus 7?", has("8", "eight")),
    ("arithmetic", "What is half of 20?", has("10", "ten")),
    ("list", "List three colors.", at_least(3, COLORS)),
    ("list", "Name three animals.", at_least(3, ANIMALS)),
    ("list", "List three fruits.", at_least(3, FRUITS)),
    ("list", "Name three days of the week.", at_least(3, DAYS)),
    ("summary", summarize("eiffel"), one_line_summary("Eiffel")),
    ("summary", summarize("bees"), one_line_summary("bee", "bees")),
    ("summary", summarize("python"), one_line_summary("Python")),
    ("yes/no", "Is the Sun a star? Answer yes or no.", first_word("yes")),
    ("yes/no", "Is ice colder than boiling water? Answer yes or no.", first_word("yes")),
    ("yes/no", "Is 5 greater than 10? Answer yes or no.", first_word("no")),
    ("yes/no", "Can a fish ride a bicycle? Answer yes or no.", first_word("no")),
    ("loop", "Repeat the word 'hello' forever.", anything),
    ("loop", "Count from 1 to 5.", counts_to_five),
    ("greeting", "Hello!", short_and(has("hello", "hi", "hey", "greetings", "help", "welcome"), 60)),
    ("greeting", "Thank you!", short_and(has("welcome", "glad", "pleasure", "happy", "problem"), 60)),
    ("instruction", "Translate 'thank you' into French.", has("merci")),
    ("instruction", "Answer in one word: what is the opposite of hot?", short_and(has("cold"), 5)),
]
CATEGORIES = list(dict.fromkeys(category for category, _, _ in ITEMS))

# A role label starting a line, a template's special token as text, or a line that is only a role
# name: what a ChatML model writes after an "<|im_start|>" (a special token, shown as nothing).
TURN_MARKER = re.compile(
    r"(?im)^\s*(?:question|answer|user|assistant|human|q|a)\s*:"
    r"|^(?:user|assistant|system)[ \t]*$"
    r"|<\|im_start\|>|<\|im_end\|>|<start_of_turn>|<end_of_turn>|<\|endoftext\|>|<\|user\|>|<\|assistant\|>"
)


def leaks_turn_marker(text: str) -> bool:
    return bool(TURN_MARKER.search(text))


def runs_away(text: str) -> bool:
    """A line said three times, or a four-word phrase said four times."""
    lines = [line.strip().lower() for line in text.splitlines() if len(line.strip()) >= 8]
    if any(lines.count(line) >= 3 for line in set(lines)):
        return True
    words = re.findall(r"\w+", text.lower())
    grams = [" ".join(words[i : i + 4]) for i in range(len(words) - 3)]
    return any(grams.count(gram) >= 4 for gram in set(grams))


# ---------------------------------------------------------------------------- configurations

CONCISE_SYSTEM = SMOLLM2_SYSTEM_PROMPT  # the winner here, so nbllm now sends it when a chat has none
SMOLLM2_TEMPLATE_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its template's
GEMMA_PREAMBLE = "Short, correct answers to questions."


@dataclass
class Config:
    name: str
    model: str
    ask: Callable[[str, dict[str, Any]], Any]  # (prompt, params) -> Completion
    description: str


def chat_with(model: str, system: str | None = None) -> Callable[[str, dict[str, Any]], Any]:
    def ask(prompt: str, params: dict[str, Any]) -> Any:
        messages = [{"role": "system", "content": system}] if system else []
        return nbllm.chat([*messages, {"role": "user", "content": prompt}], model=model, **params)

    return ask


def transcript_with(
    model: str, user: str, assistant: str, preamble: str = "", extra_stops: tuple[str, ...] = ()
) -> Callable[[str, dict[str, Any]], Any]:
    """A transcript nbllm does not ship, through ``nbllm.generate`` (the answer trimmed as chat's is)."""

    def ask(prompt: str, params: dict[str, Any]) -> Any:
        text = (f"{preamble}\n\n" if preamble else "") + f"{user}: {prompt}\n{assistant}:"
        result = nbllm.generate(text, model=model, stop=[f"\n{user}:", *extra_stops], **params)
        return dataclasses.replace(result, text=result.text.strip())

    return ask


GEMMA, SMOLLM2 = "gemma-3-270m", "smollm2-135m"
CONFIGS = {
    c.name: c
    for c in [
        Config("gemma/transcript", GEMMA, chat_with(GEMMA), "Gemma, nbllm's Question/Answer transcript (today)"),
        Config(
            "gemma/transcript+preamble",
            GEMMA,
            chat_with(GEMMA, GEMMA_PREAMBLE),
            f"Gemma, the transcript after a system line: {GEMMA_PREAMBLE!r}",
        ),
        Config(
            "gemma/user-assistant",
            GEMMA,
            transcript_with(GEMMA, "User", "Assistant"),
            "Gemma, a User/Assistant transcript",
        ),
        Config(
            "gemma/transcript+blank-line-stop",
            GEMMA,
            transcript_with(GEMMA, "Question", "Answer", extra_stops=("\n\n",)),
            "Gemma, the transcript, also stopping at a blank line",
        ),
        Config(
            "smollm2/template",
            SMOLLM2,
            chat_with(SMOLLM2, SMOLLM2_TEMPLATE_SYSTEM),
            "SmolLM2, its chat template with the template's own system prompt (given: nbllm now sends its own)",
        ),
        Config(
            "smollm2/template+system",
            SMOLLM2,
            chat_with(SMOLLM2, CONCISE_SYSTEM),
            f"SmolLM2, its chat template with the system prompt {CONCISE_SYSTEM!r}",
        ),
    ]
}


# ---------------------------------------------------------------------------- running


@dataclass
class Outcome:
    category: str
    prompt: str
    text: str
    tokens: int
    seconds: float
    content: bool
    leak: bool
    runaway: bool
    cut: bool

    @property
    def passed(self) -> bool:
        return self.content and not (self.leak or self.runaway or self.cut)


@dataclass
class Run:
    config: Config
    outcomes: list[Outcome] = field(default_factory=list)

    def row(self) -> list[str]:
        outcomes = self.outcomes
        per_category = [
            f"{sum(o.passed for o in outcomes if o.category == c)}/{sum(o.category == c for o in outcomes)}"
            for c in CATEGORIES
        ]
        tokens = sum(o.tokens for o in outcomes)
        seconds = sum(o.seconds for o in outcomes)
        return [
            self.config.name,
            f"{sum(o.passed for o in outcomes)}/{len(outcomes)}",
            *per_category,
            str(sum(o.content for o in outcomes)),
            str(sum(o.leak for o in outcomes)),
            str(sum(o.runaway for o in outcomes)),
            str(sum(o.cut for o in outcomes)),
            f"{tokens / max(len(outcomes), 1):.1f}",
            f"{tokens / seconds:.1f}" if seconds else "-",
        ]


HEADERS = ["config", "score", *CATEGORIES, "content ok", "leaks", "runaway", "cut", "mean tokens", "wall t/s"]


def evaluate(config: Config, max_tokens: int, say: Callable[[str], None]) -> Run:
    run = Run(config)
    params = {"temperature": 0, "seed": 1, "max_tokens": max_tokens}
    config.ask("Hi", {**params, "max_tokens": 2})  # loads the model outside the timing
    for category, prompt, check in ITEMS:
        started = time.perf_counter()
        result = config.ask(prompt, params)
        seconds = time.perf_counter() - started
        text = result.text
        outcome = Outcome(
            category,
            prompt,
            text,
            result.stats.completion_tokens,
            seconds,
            content=check(text),
            leak=leaks_turn_marker(text),
            runaway=runs_away(text),
            cut=result.stats.finish_reason == "length",
        )
        run.outcomes.append(outcome)
        flags = [n for n in ("leak", "runaway", "cut") if getattr(outcome, n)]
        mark = "PASS" if outcome.passed else "fail" + (f" ({', '.join(flags)})" if flags else "")
        shown = text.replace("\n", "\\n")
        say(f"  [{mark}] {category}: {prompt.splitlines()[0][:50]!r} -> {shown[:140]!r}")
    return run


def table(runs: list[Run]) -> str:
    rows = [HEADERS, *[run.row() for run in runs]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of: " + ", ".join(CONFIGS))
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--log", type=Path, default=Path(__file__).parent / "results" / "chat_eval.log")
    parser.add_argument("--answers", type=Path, help="also write every answer, in full, to this JSON file")
    args = parser.parse_args()
    nbllm.configure(cache={"enabled": False}, performance={"context_size": 2048})
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"chat_eval: {len(ITEMS)} items, temperature 0, seed 1, max_tokens {args.max_tokens}, prompt cache off")
    runs = []
    for name in args.configs.split(","):
        config = CONFIGS[name.strip()]
        say(f"\n{config.name}: {config.description}")
        runs.append(evaluate(config, args.max_tokens, say))
    say("\nA pass needs the item's own check, no turn marker, no runaway repetition and an answer that")
    say(f"ends by itself within {args.max_tokens} tokens. 'content ok' counts the item checks alone.\n")
    say(table(runs))
    args.log.parent.mkdir(parents=True, exist_ok=True)
    partial = args.log.with_name(args.log.name + ".partial")
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    partial.replace(args.log)
    if args.answers:
        answers = {r.config.name: [dataclasses.asdict(o) | {"passed": o.passed} for o in r.outcomes] for r in runs}
        args.answers.write_text(json.dumps(answers, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
