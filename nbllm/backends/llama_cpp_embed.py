"""Embeddings on llama.cpp: many texts packed into few decode calls.

An embedding model (its GGUF declares a pooling: mean, CLS or last token) is loaded with
llama.cpp's embedding mode; each text is one sequence of a batch, and llama.cpp pools each
sequence's token vectors itself (``llama_get_embeddings_seq``). Texts go into a batch in their
order until it holds ``PACK_TOKENS`` tokens (a longer text goes alone) or ``n_seq_max``
sequences, so a thousand short texts cost a few dozen decodes, not a thousand. A sequence must
fit one micro-batch (non-causal attention sees the whole sequence at once): the model is loaded
with n_ubatch = n_batch, and a text is at most ``limit`` tokens (the model's training context,
at most n_batch).

Everything is tokenized before the first decode, so a text that is too long is an error before
any work (or, with ``truncate``, cut, keeping the end-of-text token the model appends).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import llama_cpp
import numpy as np

from nbllm.core.errors import ContextLengthError, GenerationError

# Tokens packed into one decode (a longer text goes alone, up to n_batch): attention is computed
# over the whole micro-batch, masked, so smaller packs of short texts cost less (embed_bench.py).
PACK_TOKENS = 256
POOLING_CODES = {"mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN, "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
                 "last": llama_cpp.LLAMA_POOLING_TYPE_LAST}  # fmt: skip


def tokenize_all(
    llm: Any, texts: Sequence[str], limit: int, truncate: bool, *, rough_bytes: int, longest: Callable[[], int]
) -> tuple[list[list[int]], list[int]]:
    """Each text's tokens (with the model's special tokens), cut to ``limit`` with ``truncate``.

    A text of more than ``limit`` x ``longest()`` bytes (no token covers more than the longest
    token's bytes) cannot fit: it is refused, or cut to that many bytes, before it is tokenized
    (``longest`` is asked only for texts past ``rough_bytes``)."""
    add_eos = bool(llama_cpp.llama_vocab_get_add_eos(llm._model.vocab))
    token_lists, truncated = [], []
    for index, text in enumerate(texts):
        data = text.encode("utf-8")
        if len(data) > rough_bytes and len(data) > limit * longest():
            if not truncate:
                raise _too_long(index, f"at least {-(-len(data) // longest()):,}", limit)
            # Cut at a character's boundary: the tokenizer must never see a broken UTF-8 sequence.
            data = data[: limit * longest()].decode("utf-8", "ignore").encode("utf-8")
        tokens = llm.tokenize(data, add_bos=True, special=False)
        if len(tokens) > limit:
            if not truncate:
                raise _too_long(index, f"{len(tokens):,}", limit)
            # Keep the end-of-text token ([SEP] for BERT) the model was trained to see last.
            tokens = [*tokens[: limit - 1], tokens[-1]] if add_eos else tokens[:limit]
            truncated.append(index)
        token_lists.append(tokens)
    return token_lists, truncated


class EmbeddingCancelled(GenerationError):
    """``cancel`` was set (Ctrl-C, a server request past its deadline): stopped between batches."""


def _too_long(index: int, tokens: str, limit: int) -> ContextLengthError:
    return ContextLengthError(
        f"Text {index} is {tokens} tokens long; this embedding model reads at most {limit:,}. Split it "
        "(nbllm.ask chunks documents itself), or pass truncate=True to embed its beginning."
    )


def embed_token_lists(
    llm: Any, token_lists: Sequence[list[int]], on_progress: Callable[[int], None], cancel: threading.Event
) -> np.ndarray:
    """Pooled vectors for each token list, packing as many into each decode as fit."""
    n_embd = int(llm.n_embd())
    n_batch = int(llm.n_batch)
    n_seq_max = max(1, int(llm.context_params.n_seq_max))
    vectors = np.empty((len(token_lists), n_embd), dtype=np.float32)
    batch, ctx = llm._batch, llm._ctx
    start = 0
    while start < len(token_lists):
        if cancel.is_set():
            raise EmbeddingCancelled(f"The embedding was stopped after {start} of {len(token_lists)} texts.")
        batch.reset()
        count = used = 0
        while start + count < len(token_lists) and count < n_seq_max:
            size = len(token_lists[start + count])
            if count and used + size > min(n_batch, PACK_TOKENS):
                break
            batch.add_sequence(token_lists[start + count], count, True)
            used += size
            count += 1
        ctx.kv_cache_clear()  # sequences of the last batch must not be attended to
        status = llama_cpp.llama_decode(ctx.ctx, batch.batch)
        if status != 0:
            raise GenerationError(
                f"llama.cpp could not embed a batch of {count} texts (llama_decode returned {status})."
            )
        for seq in range(count):
            pointer = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq)
            if not pointer:
                raise GenerationError("llama.cpp returned no pooled embedding: the model's pooling type is 'none'.")
            vectors[start + seq] = np.ctypeslib.as_array(pointer, shape=(n_embd,))
        start += count
        on_progress(count)
    return vectors
