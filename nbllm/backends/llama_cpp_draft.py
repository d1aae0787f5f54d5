"""A draft model for speculative decoding: a smaller model of the target's vocabulary guesses
the next tokens greedily, and the target checks them in one decode (llama_cpp_speculative.py).

The draft keeps its own KV cache of the text so far (prompt and answer), reusing its longest
shared prefix from the previous step or request: each step it first catches up with the tokens
the target kept (dropping its refused guesses), then decodes one token per guess. Which guesses
are worth making is core/speculation.py's ``DraftPolicy``, which is told what a guess costs here.

Only a model whose tokens mean what the target's mean can draft for it: the same vocabulary
type and special tokens, sizes within ``VOCAB_SIZE_SLACK``, and the same text for every id both
have (llama.cpp's own ``common_speculative_are_compatible`` checks a subset of this; nbllm
checks every token, once per load, ~50 ms for 50k tokens). Recurrent models cannot draft: their
memory cannot drop a refused guess.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from nbllm.core.errors import ModelLoadError
from nbllm.core.prefix_cache import common_prefix

# Models of one family may pad their vocabularies to different sizes (Qwen2.5-0.5B: 151,936
# tokens, Qwen2.5-7B: 152,064): llama.cpp's own check allows this much difference; the ids both
# have must mean the same text, and a draft never guesses an id the model does not have.
VOCAB_SIZE_SLACK = 128


class DraftModel:
    """A loaded draft model (``llm``, loaded by llama_cpp.py like any model) for one target
    (``target``: the answering model's ``llama_cpp.Llama``)."""

    SMOOTHING = 0.2  # seconds per guess: a moving average, as DecodeCosts keeps the target's

    def __init__(self, path: Path, llm: Any, target: Any) -> None:
        self.path = path
        self.llm = llm
        model = llm._model.model
        if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
            raise ModelLoadError(
                f"{path.name} cannot draft: its memory (recurrent: Mamba, RWKV...) cannot drop refused "
                "guesses. Set generation.draft_model to a transformer of the model's family, or to null."
            )
        _check_compatible(target, llm, path)
        self._target_vocab = int(target.n_vocab())
        # What a guess costs (a single-token decode of the draft), measured once now, so that the
        # first answer's policy weighs real guesses, not free ones; then kept current.
        self.seconds_per_guess = 0.0
        self.seconds_per_guess = self._timed_single_decode()

    def _timed_single_decode(self) -> float:
        llm = self.llm
        token = max(int(llm.token_bos()), 0)
        llm.eval([token])  # warm-up: the first decode allocates
        started = time.perf_counter()
        llm.eval([token])
        seconds = time.perf_counter() - started
        llm._ctx.kv_cache_clear()
        llm.n_tokens = 0
        return seconds

    def draft(self, text: list[int], count: int) -> list[int]:
        """Up to ``count`` greedy guesses of what follows ``text`` (prompt and answer so far)."""
        llm = self.llm
        room = llm.n_ctx() - len(text) - 1
        count = min(count, room)
        if count <= 0 or not text:
            return []
        held = np.asarray(llm.input_ids[: llm.n_tokens], dtype=np.int32)
        # Keep what the draft already read of ``text``; the last token is read again when all of
        # it was kept: its logits (the next guess) are not kept between steps.
        keep = min(common_prefix(held, np.asarray(text, dtype=np.int32)), len(text) - 1)
        llm.n_tokens = keep  # Llama.eval drops the KV cache from n_tokens on (recurrent drafts are refused)
        caught_up = time.perf_counter()
        llm.eval(text[keep:])
        if len(text) - keep == 1:  # a single decode, as a guess is: measured too (probes make one guess)
            self.observe(time.perf_counter() - caught_up)
        guesses: list[int] = []
        started = time.perf_counter()
        n_vocab = llm.n_vocab()
        while True:
            # llama-cpp-python keeps no logits without logits_all: read the last position's.
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
            guess = int(np.argmax(logits))
            if guess >= self._target_vocab:  # a padding id of a larger draft vocabulary: no guess
                break
            guesses.append(guess)
            if len(guesses) == count or llama_cpp.llama_vocab_is_eog(llm._model.vocab, guess):
                break
            llm.eval([guess])
        if len(guesses) > 1:  # each guess after the first took a decode; the first came with catching up
            self.observe((time.perf_counter() - started) / (len(guesses) - 1))
        return guesses

    def observe(self, seconds: float) -> None:
        """What one guess took (a decode of the draft model), averaged."""
        old = self.seconds_per_guess
        self.seconds_per_guess = seconds if old == 0.0 else old + self.SMOOTHING * (seconds - old)

    def close(self) -> None:
        self.llm.close()


def _check_compatible(target: Any, draft: Any, path: Path) -> None:
    """Refuse a draft model whose token ids mean other text than the target's."""
    t_vocab, d_vocab = target._model.vocab, draft._model.vocab
    why = None
    if llama_cpp.llama_vocab_type(t_vocab) != llama_cpp.llama_vocab_type(d_vocab):
        why = "its tokenizer is of another kind"
    elif abs(target.n_vocab() - draft.n_vocab()) > VOCAB_SIZE_SLACK:
        why = f"its vocabulary has {draft.n_vocab():,} tokens, the model's {target.n_vocab():,}"
    elif (target.token_bos(), target.token_eos()) != (draft.token_bos(), draft.token_eos()):
        why = "its start and end tokens differ"
    else:
        text = llama_cpp.llama_vocab_get_text
        for token in range(min(target.n_vocab(), draft.n_vocab())):
            ours, theirs = text(t_vocab, token), text(d_vocab, token)
            if ours != theirs:
                why = f"token {token} is {theirs!r} there but {ours!r} here"
                break
    if why is not None:
        raise ModelLoadError(
            f"{path.name} cannot draft for this model: {why}. A draft model must share the model's "
            "vocabulary (a smaller model of the same family, e.g. SmolLM2-135M for SmolLM2-1.7B); "
            "set generation.draft_model to such a model, or to null."
        )
