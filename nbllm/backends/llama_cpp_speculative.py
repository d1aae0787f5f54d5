"""Speculative decoding on llama.cpp: drafts from the text so far, checked in one decode each.

What is drafted and when it pays is core/speculation.py's business; here is the decode loop.
Llama.generate reads the prompt (reusing the KV cache's shared prefix) and samples the first
token; from there each step decodes the newest token together with the draft, logits for every
position, and samples position by position with the request's own sampler (chain or grammar):
each drafted token the sampler picks too is kept, the first one it does not pick is replaced by
the token it did, and the rest of the draft leaves the KV cache. llama-cpp-python's record of
the KV content (``input_ids``, ``n_tokens``) follows every step, so prefix reuse and KV
snapshots work as after any answer, also when the caller stops in the middle of a step.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from typing import Any

import llama_cpp
import numpy as np

from nbllm.core.speculation import MOST_DRAFTED, DecodeCosts, DraftPolicy, NgramIndex


def speculative_steps(
    llm: Any, tokens: list[int], options: dict[str, Any], max_tokens: int, costs: DecodeCosts, policy: DraftPolicy
) -> Generator[int, None, None]:
    """The answer's tokens, as ``llm.generate(tokens, **options)`` would give them."""
    first = llm.generate(tokens, **options)
    token = next(first)
    first.close()  # the prompt is read and its first token sampled; the loop below goes on
    sampler, ctx, batch = llm._sampler, llm._ctx, llm._batch
    n_ctx, n_batch = llm.n_ctx(), int(llm.n_batch)
    index = NgramIndex(tokens)
    given = 0
    while True:
        yield token
        given += 1
        index.append(token)
        guess, matched = index.draft(MOST_DRAFTED)
        n_past = llm.n_tokens
        # KV cells left, tokens still wanted, and what one decode holds (llama-cpp-python's batch
        # has n_batch slots: a longer step would write past them).
        room = min(n_ctx - n_past - 1, max_tokens - given - 1, n_batch - 1)
        drafted = guess[: policy.length(matched, min(len(guess), room))] if room > 0 else []
        step = [token, *drafted]
        batch.set_batch(batch=step, n_past=n_past, logits_all=True)
        started = time.perf_counter()
        ctx.decode(batch)
        costs.observe(len(step), time.perf_counter() - started)
        llm.input_ids[n_past : n_past + len(step)] = step
        llm.n_tokens = n_past + len(step)
        kept = 0
        for position in range(len(step)):
            token = sampler.sample(ctx, position)
            if position < len(drafted) and token == drafted[position]:
                kept += 1
                yield token
                given += 1
                index.append(token)
                continue
            break
        if drafted:
            policy.observe(matched, len(drafted), kept)
        elif guess:
            policy.observe_guess(matched, token == guess[0])
        keep = n_past + 1 + kept  # the newest token and the kept draft; ``token`` is not in yet
        if keep < llm.n_tokens:
            ctx.kv_cache_seq_rm(-1, keep, -1)
            llm.n_tokens = keep


# Steps in which the check decodes its tokens: one at a time, then in batches of other sizes.
_CHECKED_STEPS = ([1] * 9, [9], [2, 3, 4])


def batches_are_exact(llm: Any) -> bool:
    """Whether a decode of several tokens gives each the same logits, to the bit, as decoding
    them one at a time: then drafting changes no answer, not even where two tokens nearly tie.

    Not everywhere: without flash attention llama.cpp's CPU attention multiplies a batch's
    queries with another kernel than a single query's, and quantized weights repacked for
    AVX2 (Q4_K, Q4_0) are multiplied by one kernel for a token and another for a batch.
    Checked once per loaded model on a few tokens (~10 decodes), which leaves the KV cache empty."""
    tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog, 1 2 3 4 5 6 7 8 9 10.", add_bos=True)
    prefix, checked = tokens[:4], tokens[4:13]
    if len(checked) < 9 or int(llm.n_batch) < 9:  # too few tokens to check, or too small a batch for drafts
        return False
    try:
        runs = [_logits(llm, prefix, checked, steps) for steps in _CHECKED_STEPS]
    finally:
        llm.n_tokens = 0
        llm._ctx.kv_cache_clear()
    return all(np.array_equal(runs[0], run) for run in runs[1:])


def _logits(llm: Any, prefix: list[int], tokens: list[int], steps: Sequence[int]) -> np.ndarray:
    ctx, batch, n_vocab = llm._ctx, llm._batch, llm.n_vocab()
    ctx.kv_cache_clear()
    batch.set_batch(batch=prefix, n_past=0, logits_all=False)
    ctx.decode(batch)
    rows, done = [], 0
    for size in steps:
        step = tokens[done : done + size]
        batch.set_batch(batch=step, n_past=len(prefix) + done, logits_all=True)
        ctx.decode(batch)
        for position in range(len(step)):
            pointer = llama_cpp.llama_get_logits_ith(ctx.ctx, position)
            rows.append(np.ctypeslib.as_array(pointer, shape=(n_vocab,)).copy())
        done += size
    return np.array(rows)
