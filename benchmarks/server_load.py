#!/usr/bin/env python3
"""Load on ``nbllm serve``: concurrent OpenAI clients on loopback, two models, a bounded time.

Each client loops until the time is up: it picks a model, a prompt, chat or completion, streamed
or not, and a seed (temperature 0.9, so a mixed-up answer would show), and records the latency
(and the time to first token of streams). Then every answer is checked against what the engine
produces for the same request *sequentially* in this process: nothing lost (every request got a
complete answer and the engine counted it) and nothing mixed up (the same text, token for token).

The replay starts from freshly loaded models and goes in the order the answers were finished, so
that each prompt finds the same KV cache as on the server: on a quantized model, reusing a prompt
prefix from the KV cache evaluates the rest in another split, which changes the logits slightly
and can change an answer even at temperature 0 (llama.cpp's numerics, seen with raw
llama-cpp-python too). The tiny models (F32) do not care; Gemma 3 270M does.

Reports requests/s, completion tokens/s, p50/p95 latency, and the same work replayed sequentially
through the engine as the baseline (a ratio measured in this run, not an absolute speed).

    .venv/bin/python benchmarks/server_load.py                    # tiny generated models, 20 s, 4 clients
    .venv/bin/python benchmarks/server_load.py --default-model    # Gemma 3 270M + a tiny model
    .venv/bin/python benchmarks/server_load.py --clients 8 --seconds 60 --workers 2 --max-tokens 64
    .venv/bin/python benchmarks/server_load.py --no-batching --clients 8   # one request per model at a time
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionStreamOptionsParam

import nbllm
from nbllm.server.running import ServerHandle, serve_in_background
from nbllm.testing import make_tiny_model

PROMPTS = (
    "What is Docker?",
    "Explain a Python notebook in one sentence.",
    "Why does a cache make repeated questions fast?",
    "What does a GPU do?",
    "Name three uses of a container.",
    "What is a language model?",
)
TEMPERATURE = 0.9


@dataclass
class Call:
    """One request as a client saw it."""

    model: str
    kind: str  # chat | completion
    prompt: str
    seed: int
    stream: bool
    latency: float = 0.0
    first_token: float | None = None
    completion_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    finished_at: float = 0.0  # when the answer was complete: the model's order, one request at a time


def _messages(prompt: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": prompt}]


def ask(client: openai.OpenAI, call: Call, max_tokens: int) -> Call:
    common: dict[str, Any] = {"model": call.model, "max_tokens": max_tokens, "seed": call.seed}
    common["temperature"] = TEMPERATURE
    started = time.perf_counter()
    try:
        if call.stream:
            _ask_streamed(client, call, common, started)
        elif call.kind == "chat":
            answer = client.chat.completions.create(messages=_messages(call.prompt), **common)
            call.text = answer.choices[0].message.content or ""
            call.finish_reason = answer.choices[0].finish_reason
            call.completion_tokens = answer.usage.completion_tokens if answer.usage else 0
        else:
            completion = client.completions.create(prompt=call.prompt, **common)
            call.text = completion.choices[0].text
            call.finish_reason = completion.choices[0].finish_reason
            call.completion_tokens = completion.usage.completion_tokens if completion.usage else 0
    except openai.OpenAIError as error:
        call.error = f"{type(error).__name__}: {error}"
    call.finished_at = time.perf_counter()
    call.latency = call.finished_at - started
    return call


def _ask_streamed(client: openai.OpenAI, call: Call, common: dict[str, Any], started: float) -> None:
    options: ChatCompletionStreamOptionsParam = {"include_usage": True}
    pieces: list[str] = []
    if call.kind == "chat":
        for chunk in client.chat.completions.create(
            messages=_messages(call.prompt), stream=True, stream_options=options, **common
        ):
            if chunk.usage:
                call.completion_tokens = chunk.usage.completion_tokens
            if chunk.choices:
                _piece(call, pieces, chunk.choices[0].delta.content, chunk.choices[0].finish_reason, started)
    else:
        for part in client.completions.create(prompt=call.prompt, stream=True, stream_options=options, **common):
            if part.usage:
                call.completion_tokens = part.usage.completion_tokens
            if part.choices:
                _piece(call, pieces, part.choices[0].text, part.choices[0].finish_reason, started)
    call.text = "".join(pieces)


def _piece(call: Call, pieces: list[str], text: str | None, finish: str | None, started: float) -> None:
    if text:
        if call.first_token is None:
            call.first_token = time.perf_counter() - started
        pieces.append(text)
    if finish:
        call.finish_reason = finish


def client_loop(
    handle: ServerHandle, models: list[str], deadline: float, max_tokens: int, rng: random.Random
) -> list[Call]:
    client = openai.OpenAI(base_url=handle.base_url, api_key="unused", max_retries=0, timeout=120)
    calls = []
    while time.perf_counter() < deadline:
        call = Call(
            model=rng.choice(models),
            kind=rng.choice(("chat", "completion")),
            prompt=rng.choice(PROMPTS),
            seed=rng.randrange(2**31),
            stream=rng.random() < 0.5,
        )
        calls.append(ask(client, call, max_tokens))
    return calls


def replay(call: Call, max_tokens: int) -> tuple[str, int, float]:
    """The same request, sequentially, straight through the engine: (text, tokens, seconds)."""
    params: dict[str, Any] = {"max_tokens": max_tokens, "seed": call.seed, "temperature": TEMPERATURE}
    started = time.perf_counter()
    if call.kind == "chat":
        result = nbllm.chat(_messages(call.prompt), model=call.model, cache=False, **params)
    else:
        result = nbllm.generate(call.prompt, model=call.model, cache=False, **params)
    return result.text, result.stats.completion_tokens, time.perf_counter() - started


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(share * len(ordered)), len(ordered) - 1)] if ordered else 0.0


def set_up_models(folder: Path, use_default: bool) -> list[str]:
    tiny = {
        "tiny-a": make_tiny_model(folder / "tiny-a.gguf", seed=1),
        "tiny-b": make_tiny_model(folder / "tiny-b.gguf", seed=2, n_embd=96, n_head=4, n_head_kv=4),
    }
    if use_default:
        del tiny["tiny-a"]
    nbllm.configure(
        models={name: str(path) for name, path in tiny.items()},
        # One thread per model: two models generating side by side share the cores instead of
        # fighting over them; the prompt cache off, so that every request really generates.
        performance={"threads": 1, "context_size": 1024},
        cache={"enabled": False},
    )
    return (["gemma-3-270m"] if use_default else []) + list(tiny)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="how long clients send requests")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--workers", type=int, default=2, help="server.workers: generations at once")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--default-model", action="store_true", help="Gemma 3 270M and one tiny model")
    parser.add_argument(
        "--no-batching", dest="batched", action="store_false", help="one request per model at a time (no batching)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' choices")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        models = set_up_models(Path(folder), args.default_model)
        for model in models:
            nbllm.load(model)  # loading is not what this measures
        engine = nbllm.get_engine()
        handle = serve_in_background(port=0, workers=args.workers, batched=args.batched)
        print(
            f"Serving {', '.join(models)} at {handle.base_url}: {args.clients} clients, {args.workers} workers"
            f"{' (batched)' if args.batched else ''}, "
            f"{args.seconds:.0f} s, max_tokens {args.max_tokens}"
        )
        before = engine.stats.snapshot()["requests"]
        started = time.perf_counter()
        deadline = started + args.seconds
        with ThreadPoolExecutor(args.clients) as pool:
            jobs = [
                pool.submit(client_loop, handle, models, deadline, args.max_tokens, random.Random(args.seed * 1000 + i))
                for i in range(args.clients)
            ]
            calls = [call for job in jobs for call in job.result()]
        elapsed = time.perf_counter() - started
        counted = engine.stats.snapshot()["requests"] - before
        handle.stop()
        # Tiny models are F32: exact batched or not. A quantized model is exact one at a time only.
        exact = {m for m in models if m != "gemma-3-270m" or not args.batched}
        return report(calls, elapsed, counted, args.max_tokens, models, exact)


def report(calls: list[Call], elapsed: float, counted: int, max_tokens: int, models: list[str], exact: set[str]) -> int:
    """``exact``: the models whose answers must equal the sequential replay token for token.

    A quantized model decoded in a batch gets logits that differ in the last bits from one
    decoded alone (llama.cpp's kernels depend on how many tokens share a micro-batch; even a
    single stream with another n_batch changes some greedy answers), so its batched answers are
    compared with the replay as "same" or "numerically different", not as mixed up. Mix-ups are
    caught on the F32 tiny model, which decodes identically either way, in the same run.
    """
    failed = [c for c in calls if c.error or c.finish_reason not in ("stop", "length")]
    done = [c for c in calls if c not in failed]
    tokens = sum(c.completion_tokens for c in done)
    latencies = [c.latency for c in done]
    first_tokens = [c.first_token for c in done if c.first_token is not None]
    print(f"\nRequests: {len(calls)} sent, {len(done)} answered, {len(failed)} failed, {counted} counted by the engine")
    print(f"Per model: {dict(Counter(c.model for c in calls))}; streamed: {sum(c.stream for c in calls)}")
    print(f"Throughput: {len(done) / elapsed:.1f} requests/s, {tokens / elapsed:.1f} completion tokens/s")
    print(
        f"Latency: p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p95 {percentile(latencies, 0.95) * 1000:.0f} ms, "
        f"max {max(latencies, default=0) * 1000:.0f} ms"
    )
    if first_tokens:
        print(
            f"Streams, first token: p50 {percentile(first_tokens, 0.5) * 1000:.0f} ms, "
            f"p95 {percentile(first_tokens, 0.95) * 1000:.0f} ms"
        )
    for call in failed[:5]:
        print(f"  failed: {call.model} {call.kind} seed {call.seed}: {call.error or call.finish_reason}")

    print("\nReplaying every request sequentially through the engine, in the order they finished...")
    nbllm.unload()  # fresh models: the same KV cache history as the server's
    for model in models:
        nbllm.load(model)
    mismatched, numeric, replay_seconds, replay_tokens = [], [], 0.0, 0
    for call in sorted(done, key=lambda c: c.finished_at):
        text, replayed_tokens, seconds = replay(call, max_tokens)
        replay_seconds += seconds
        replay_tokens += replayed_tokens
        if text != call.text or replayed_tokens != call.completion_tokens:
            (mismatched if call.model in exact else numeric).append((call, text))
    strict = [c for c in done if c.model in exact]
    print(f"Mixed up or different (exact models {sorted(exact)}): {len(mismatched)} of {len(strict)}")
    for call, _ in mismatched[:5]:
        print(f"  {call.model} {call.kind} seed {call.seed} stream={call.stream}: {call.text[:60]!r}")
    if numeric:
        others = len(done) - len(strict)
        prefix = sorted(len(_common_prefix(call.text, text)) for call, text in numeric)
        print(
            f"Batched on a quantized model: {others - len(numeric)} of {others} identical to the sequential replay; "
            f"the others agree on their first {prefix[0]}-{prefix[-1]} characters (median {prefix[len(prefix) // 2]})"
        )
    if replay_seconds:
        rate = replay_tokens / replay_seconds
        print(
            f"Sequential engine baseline: {rate:.1f} tokens/s; server under load: {tokens / elapsed / rate:.2f}x of it"
        )
    lost = len(failed) + max(len(calls) - counted, 0)
    ok = not mismatched and lost == 0
    print("OK: nothing lost, nothing mixed up." if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
