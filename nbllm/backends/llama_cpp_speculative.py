"""Speculative decoding on llama.cpp: drafts from the text so far (or from a draft model,
llama_cpp_draft.py), checked in one decode each.

What is drafted and when it pays is core/speculation.py's business; here is the decode loop.
Llama.generate reads the prompt (reusing the KV cache's shared prefix) and samples the first
token; from there each step decodes the newest token together with the draft, logits for every
position, and samples position by position with the request's own sampler (chain or grammar):
each drafted token the sampler picks too is kept, the first one it does not pick is replaced by
the token it did, and the rest of the draft leaves the KV cache. llama-cpp-python's record of
the KV content (``input_ids``, ``n_tokens``) follows every step, so prefix reuse and KV
snapshots work as after any answer; when the caller stops in the middle of a step, the record
holds the rest of that step's draft, which the KV cache holds too.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import llama_cpp

from nbllm.backends.llama_cpp_draft import DraftModel
from nbllm.core.errors import GenerationError
from nbllm.core.speculation import DRAFT_MODEL, MOST_DRAFTED, DecodeCosts, DraftPolicy, NgramIndex

# With a draft model, a step the policy drafts nothing still tries one guess this often: a
# draft model's guesses are evidence only when made (a lookup's come free with every token).
# Only where drafts could pay if the guesses were right: a probe costs the draft model the
# tokens it has not read yet (the whole prompt, the first time), and a draft model as slow as
# the model (per guess, on this machine) can never pay.
PROBE_EVERY = 16


def speculative_steps(
    llm: Any,
    tokens: list[int],
    options: dict[str, Any],
    max_tokens: int,
    costs: DecodeCosts,
    policy: DraftPolicy,
    drafter: DraftModel | None = None,
) -> Generator[int, None, None]:
    """The answer's tokens, as ``llm.generate(tokens, **options)`` would give them; drafted
    from the text so far, or by ``drafter`` when one is given."""
    first = llm.generate(tokens, **options)
    token = next(first)
    first.close()  # the prompt is read and its first token sampled; the loop below goes on
    sampler, ctx, batch = llm._sampler, llm._ctx, llm._batch
    n_ctx, n_batch = llm.n_ctx(), int(llm.n_batch)
    index = NgramIndex(tokens) if drafter is None else None
    text = list(tokens)  # prompt and answer: what a draft model continues
    given = since_guess = 0
    while True:
        yield token
        given += 1
        text.append(token)
        n_past = llm.n_tokens
        # KV cells left, tokens still wanted, and what one decode holds (llama-cpp-python's batch
        # has n_batch slots: a longer step would write past them).
        room = min(n_ctx - n_past - 1, max_tokens - given - 1, n_batch - 1)
        if index is not None:
            index.append(token)
            guess, matched = index.draft(MOST_DRAFTED)
            drafted = guess[: policy.length(matched, min(len(guess), room))] if room > 0 else []
        else:
            assert drafter is not None
            matched = DRAFT_MODEL
            wanted = policy.length(matched, min(MOST_DRAFTED, room), drafter.seconds_per_guess) if room > 0 else 0
            since_guess = 0 if wanted else since_guess + 1
            if since_guess >= PROBE_EVERY and room > 0:
                since_guess = 0
                if policy.could_pay(min(MOST_DRAFTED, room), drafter.seconds_per_guess):
                    wanted = 1
            guess = drafted = drafter.draft(text, wanted) if wanted else []
        step = [token, *drafted]
        batch.set_batch(batch=step, n_past=n_past, logits_all=True)
        started = time.perf_counter()
        ctx.decode(batch)
        llama_cpp.llama_synchronize(ctx.ctx)  # a GPU returns before the work is done: time all of it
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
                text.append(token)
                if index is not None:
                    index.append(token)
                continue
            break
        if drafted:
            policy.observe(matched, len(drafted), kept)
        elif guess:
            policy.observe_guess(matched, token == guess[0])
        keep = n_past + 1 + kept  # the newest token and the kept draft; ``token`` is not in yet
        if keep < llm.n_tokens:
            if not ctx.kv_cache_seq_rm(-1, keep, -1):  # recurrent state: never drafted (LlamaCppModel)
                raise GenerationError("llama.cpp could not remove a refused draft from the model's memory.")
            llm.n_tokens = keep
