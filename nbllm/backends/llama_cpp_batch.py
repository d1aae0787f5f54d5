"""Many prompts at once on one model: llama.cpp's multi-sequence decoding, continuous batching.

On a CPU, producing one token costs reading the whole model from memory, however many
sequences ask for it: one ``llama_batch`` carrying a token of each of several sequences costs
little more than one carrying a single token. This module runs that loop:

- up to ``parallel`` sequences share one extra llama.cpp context built on the loaded model's
  weights (no second copy of the model), each with ``seq_context`` tokens of KV cache;
- each sequence has its own sampler chain — the very chain llama-cpp-python builds for a single
  stream, seeded with the item's seed — and its own stop sequences;
- every step decodes one token of each generating sequence together with chunks of the prompts
  of sequences that are still reading theirs (continuous batching: when a sequence finishes,
  the next prompt takes its place at once);
- items arrive through a queue while the loop runs (a server's concurrent requests join it),
  and each has its own cancel flag (a client that hung up) besides the loop's own stop;
- a prompt that begins like one already in the cache (a shared instruction, a system prompt, a
  chat template's preamble: what ``generate_many`` over a list of inputs usually is) is not read
  again: its sequence keeps what it held of it, or copies the cache of a sequence that holds more,
  or waits a step for a sequence still reading that prefix (``_place``). A finished sequence's
  cache stays until its slot is reused, so the next prompt can start from it too.

Like ``llama_cpp.py`` it imports ``llama_cpp``, which only modules under ``nbllm/backends/`` may
(an import-linter contract in pyproject.toml). Its item, event and progress types are the
backend-neutral ones of ``base.py``: the remote backend speaks them too.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from nbllm.backends.base import BatchEvent, BatchItem, BatchProgress
from nbllm.core.chat_format import FormattedPrompt
from nbllm.core.errors import ContextLengthError, GenerationError, NbllmError
from nbllm.core.params import GenerationParams
from nbllm.core.prefix_cache import common_prefix
from nbllm.core.stop import TextAssembler

# Copying another sequence's cache copies its whole KV stream (llama.cpp keeps one per sequence
# and copies between them only whole), not just the shared tokens: for a 135M model's 512-token
# stream that is ~12 MB, about a millisecond, against ~6 ms per prompt token read on 2 CPU cores;
# for an 8B model's 4096-token stream ~0.5 GB against ~0.15 s a token. A few tokens always pay
# for it; below this many, reading them is as cheap and keeps the step simple. A sequence's own
# cache is reused from one token on: that costs nothing.
MIN_SHARED_TOKENS = 8


@dataclass(eq=False)
class _Slot:
    seq_id: int
    item: BatchItem
    sampler: Any
    text: TextAssembler
    prompt: list[int]
    pending: list[int]  # prompt tokens not evaluated yet
    max_tokens: int
    n_past: int = 0
    last_token: int = -1
    produced: int = 0
    started: float = field(default_factory=time.perf_counter)
    # Waiting for another sequence to finish reading the prefix both prompts share (that slot,
    # and how many tokens); nothing of this prompt is read meanwhile.
    wait: tuple[_Slot, int] | None = None

    @property
    def generating(self) -> bool:
        return not self.pending

    @property
    def reading(self) -> bool:
        return bool(self.pending) and self.wait is None


class BatchDecoder:
    """An extra llama.cpp context on a loaded model, for ``parallel`` sequences at once."""

    def __init__(
        self,
        llm: Any,
        *,
        parallel: int,
        seq_context: int,
        batch_size: int,
        threads: int,
        piece_of: Callable[[int], bytes],
        # The prompt's tokens; refuses (ContextLengthError) a text that obviously cannot fit into
        # the given number of tokens, before tokenizing it.
        tokenize: Callable[[FormattedPrompt, int], list[int]],
        make_sampler: Callable[[GenerationParams, int], Any],
        format_chat: Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], FormattedPrompt],
    ) -> None:
        self.parallel = parallel
        self.seq_context = seq_context
        # Every generating sequence adds a token to each step: the batch must hold them all,
        # whatever performance.batch_size says (llama.cpp aborts on a batch over n_batch).
        self.batch_size = batch_size = max(batch_size, parallel)
        self._llm = llm
        self._piece_of = piece_of
        self._tokenize = tokenize
        self._make_sampler = make_sampler
        self._format = format_chat
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = parallel * seq_context  # split evenly: each sequence gets seq_context
        params.n_batch = batch_size
        params.n_ubatch = batch_size
        params.n_seq_max = parallel
        params.n_threads = threads
        params.n_threads_batch = threads
        params.flash_attn_type = llm.context_params.flash_attn_type
        params.no_perf = True
        self._ctx = internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self._batch = internals.LlamaBatch(n_tokens=batch_size, embd=0, n_seq_max=1, verbose=False)
        self._vocab = llm._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        # The tokens each sequence's KV cache holds, position by position (what it read and
        # generated): the prefixes a new prompt may take over instead of reading them.
        self._held: list[list[int]] = [[] for _ in range(parallel)]
        # Recurrent state (Mamba, RWKV, hybrids) is one state per sequence, not one entry per
        # position: it cannot be cut back to a prefix, so there every prompt is read whole.
        model = llm._model.model
        self._can_share = not (llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))
        # Sliding-window attention (Gemma 2/3...) keeps only the last n_swa positions of a
        # sequence in its windowed layers: a prefix is usable only while the window before its
        # end is still there (_usable).
        self._n_swa = int(llama_cpp.llama_model_n_swa(model))
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)

    def close(self) -> None:
        self._batch.close()
        self._ctx.close()

    # ------------------------------------------------------------------ the loop

    def run(
        self,
        feed: queue.SimpleQueue[BatchItem | None],
        stop: threading.Event,
        progress: BatchProgress,
        idle: Callable[[], bool],
    ) -> None:
        """Decode until ``idle()`` says no more work will come (it is asked only when nothing is
        queued or running) or ``stop`` is set. ``None`` in the feed wakes the loop up."""
        waiting: deque[BatchItem] = deque()
        slots: list[_Slot | None] = [None] * self.parallel
        failure: NbllmError | None = None
        try:
            while not stop.is_set():
                self._take_new(feed, waiting, block=not waiting and not any(slots))
                if not waiting and not any(slots):
                    if idle():
                        return
                    continue
                self._admit(waiting, slots)
                self._drop_cancelled(slots, progress)
                progress.active = sum(1 for s in slots if s is not None)
                if not any(slots):
                    continue
                self._step(slots, progress)
        except Exception as error:
            # Whatever failed, every item the loop holds gets it as an nbllm error (before, they
            # were "cancelled", an answer cut short without saying why); the caller fails the rest.
            failure = error if isinstance(error, NbllmError) else _as_generation_error(error)
            if failure is error:
                raise
            raise failure from error
        finally:
            for slot in slots:
                if slot is not None:
                    if failure is None:
                        self._finish(slot, "cancelled", progress)
                    else:
                        self._fail(slot, failure, progress)
            for item in waiting:
                item.usage.finish_reason = "cancelled" if failure is None else "error"
                item.sink(BatchEvent(item, "done") if failure is None else BatchEvent(item, "error", error=failure))
            self._ctx.kv_cache_clear()
            self._held = [[] for _ in range(self.parallel)]

    def _take_new(
        self,
        feed: queue.SimpleQueue[BatchItem | None],
        waiting: deque[BatchItem],
        *,
        block: bool,
    ) -> None:
        while True:
            try:
                item = feed.get(timeout=0.05) if block else feed.get_nowait()
            except queue.Empty:
                return
            block = False
            if item is not None:
                waiting.append(item)

    def _drop_cancelled(self, slots: list[_Slot | None], progress: BatchProgress) -> None:
        """A sequence whose caller left (a client hung up, a request timed out, Stop) ends now,
        also while its prompt is still being read: a step reads at most ``batch_size`` prompt
        tokens, so the model is free of it within one step instead of after the whole prompt."""
        for seq_id, slot in enumerate(slots):
            if slot is not None and slot.item.cancel.is_set():
                slots[seq_id] = None
                self._finish(slot, "cancelled", progress)

    def _admit(self, waiting: deque[BatchItem], slots: list[_Slot | None]) -> None:
        for seq_id, slot in enumerate(slots):
            while slot is None and waiting:
                item = waiting.popleft()
                if item.cancel.is_set():
                    item.usage.finish_reason = "cancelled"
                    item.sink(BatchEvent(item, "done"))
                    continue
                try:
                    slot = self._start(seq_id, item)
                except Exception as error:  # this item's prompt (template, length, tokenizer): only it fails
                    item.usage.finish_reason = "error"
                    failure = error if isinstance(error, NbllmError) else _as_generation_error(error)
                    item.sink(BatchEvent(item, "error", error=failure))
                    continue
                slots[seq_id] = slot
                self._place(slot, slots)

    # ------------------------------------------------------------------ shared prefixes

    def _place(self, slot: _Slot, slots: list[_Slot | None]) -> None:
        """Start ``slot`` from the longest prefix of its prompt that some sequence's cache holds,
        or have it wait for a sequence still reading a longer one."""
        prompt, seq_id = slot.prompt, slot.seq_id
        if not self._can_share:
            self._take_prefix(slot, seq_id, 0)
            return
        limit = len(prompt) - 1  # the last prompt token is always read: its logits start the answer
        own = self._usable(seq_id, min(_shared(self._held[seq_id], prompt), limit))
        best, source = own, seq_id
        for other in range(self.parallel):
            if other != seq_id:
                shared = self._usable(other, min(_shared(self._held[other], prompt), limit))
                if shared > best and shared >= MIN_SHARED_TOKENS:
                    best, source = shared, other
        later: tuple[_Slot, int] | None = None
        for other_slot in slots:
            if other_slot is None or other_slot is slot or not other_slot.reading:
                continue
            shared = min(_shared(other_slot.prompt, prompt), limit)
            if len(self._held[other_slot.seq_id]) >= shared:
                continue  # already read: its cache was weighed above
            if shared >= best + MIN_SHARED_TOKENS and (later is None or shared > later[1]):
                later = (other_slot, shared)
        if later is not None:
            slot.wait = later
            return
        self._take_prefix(slot, source, best)

    def _usable(self, seq_id: int, shared: int) -> int:
        """``shared``, or 0 where the sequence's sliding-window layers no longer hold the window
        before that position (they drop what falls out of it as a sequence goes on): llama-server's
        test, ``pos_min <= shared - n_swa``."""
        if shared <= 0 or self._n_swa <= 0:
            return shared
        first = llama_cpp.llama_memory_seq_pos_min(self._memory, seq_id)
        return shared if 0 <= first <= max(0, shared - self._n_swa) else 0  # -1: the sequence is empty

    def _take_prefix(self, slot: _Slot, source: int, shared: int) -> None:
        seq_id = slot.seq_id
        if source != seq_id:
            # Across sequences llama.cpp copies whole streams (a partial copy aborts the process),
            # applied before the next decode; what lies past the shared prefix is dropped after.
            self._ctx.kv_cache_seq_cp(source, seq_id, -1, -1)
        if not self._ctx.kv_cache_seq_rm(seq_id, shared, -1):
            # A memory that cannot cut a sequence back (llama.h: "removing a whole sequence never
            # fails") reads this prompt whole instead.
            self._ctx.kv_cache_seq_rm(seq_id, -1, -1)
            source, shared = seq_id, 0
        self._held[seq_id] = self._held[source][:shared]
        slot.n_past = shared
        slot.pending = slot.prompt[shared:]
        slot.item.usage.reused_prompt_tokens = shared

    def _resolve_waits(self, slots: list[_Slot | None]) -> None:
        """A waiting sequence takes the shared prefix once its source has read it; if the source
        left first (cancelled, failed), it looks for another start."""
        for slot in slots:
            if slot is None or slot.wait is None:
                continue
            source, shared = slot.wait
            held = self._held[source.seq_id]
            if len(held) >= shared:  # read (or read past: a window may have moved on)
                slot.wait = None
                if held[:shared] == slot.prompt[:shared] and self._usable(source.seq_id, shared) == shared:
                    self._take_prefix(slot, source.seq_id, shared)
                else:
                    self._place(slot, slots)
            elif slots[source.seq_id] is not source or not source.reading:
                slot.wait = None
                self._place(slot, slots)

    def _start(self, seq_id: int, item: BatchItem) -> _Slot:
        # A chat is formatted here, by the model (its template or the transcript): stop
        # sequences and trimming come with it.
        formatted = (
            item.prompt
            if isinstance(item.prompt, FormattedPrompt)
            else self._format(item.prompt, item.params.template_tools())
        )
        stops, trim = formatted.stop, formatted.trim_whitespace
        tokens = self._tokenize(formatted, self.seq_context)
        if not tokens:
            raise ContextLengthError("The prompt is empty after tokenization; give the model some text.")
        if len(tokens) >= self.seq_context:
            raise ContextLengthError(
                f"The prompt is {len(tokens):,} tokens but a batched sequence holds {self.seq_context:,}. Shorten "
                "it, or raise performance.parallel_context_size."
            )
        item.usage.prompt_tokens = len(tokens)
        return _Slot(
            seq_id=seq_id,
            item=item,
            sampler=self._make_sampler(item.params, item.seed),
            text=TextAssembler((*item.params.stop, *stops), trim),
            prompt=tokens,
            pending=tokens,
            max_tokens=min(item.params.max_tokens, self.seq_context - len(tokens)),
        )

    def _step(self, slots: list[_Slot | None], progress: BatchProgress) -> None:
        self._resolve_waits(slots)
        batch = self._batch.batch
        n = 0
        sample_at: list[tuple[_Slot, int]] = []
        # First the generating sequences: one token each (their latency matters most) ...
        for slot in slots:
            if slot is not None and slot.generating:
                n = self._add(batch, n, slot.last_token, slot.n_past, slot.seq_id, True)
                self._held[slot.seq_id].append(slot.last_token)
                slot.n_past += 1
                sample_at.append((slot, n - 1))
        # ... then prompt chunks with the room left.
        for slot in slots:
            room = self.batch_size - n
            if room <= 0:
                break
            if slot is None or not slot.reading:
                continue
            chunk, slot.pending = slot.pending[:room], slot.pending[room:]
            for index, token in enumerate(chunk):
                last = not slot.pending and index == len(chunk) - 1
                n = self._add(batch, n, token, slot.n_past + index, slot.seq_id, last)
            self._held[slot.seq_id] += chunk
            slot.n_past += len(chunk)
            if not slot.pending:
                sample_at.append((slot, n - 1))
        if n == 0:  # cannot happen: after _resolve_waits every waiting slot's source is reading
            raise GenerationError("The batch loop had nothing to decode while prompts were waiting (an nbllm bug).")
        batch.n_tokens = n
        result = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if result != 0:
            raise GenerationError(f"llama.cpp could not decode a batch of {n} tokens (llama_decode returned {result}).")
        for slot, index in sample_at:
            self._sample(slot, index, slots, progress)
        # Now, before the next admission can take over (and trim) the cache of a sequence that
        # has just read a prefix and ended at once, as an answer of one token does.
        self._resolve_waits(slots)

    @staticmethod
    def _add(batch: Any, n: int, token: int, pos: int, seq_id: int, logits: bool) -> int:
        batch.token[n] = token
        batch.pos[n] = pos
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq_id
        batch.logits[n] = logits
        return n + 1

    def _sample(self, slot: _Slot, index: int, slots: list[_Slot | None], progress: BatchProgress) -> None:
        item = slot.item
        token = slot.sampler.sample(self._ctx, index)
        if slot.produced == 0:
            item.usage.first_token_at = time.perf_counter()
        if self._is_eog(self._vocab, token) and not item.params.ignore_eos:
            slots[slot.seq_id] = None
            self._finish(slot, "stop", progress)
            return
        slot.produced += 1
        progress.tokens += 1
        item.usage.completion_tokens = slot.produced
        shown, stopped = slot.text.feed(self._piece_of(token))
        if shown:
            item.sink(BatchEvent(item, "piece", shown))
        reason = "stop" if stopped else "length" if slot.produced >= slot.max_tokens else None
        if reason is None and item.cancel.is_set():
            reason = "cancelled"
        if reason is not None:
            slots[slot.seq_id] = None
            self._finish(slot, reason, progress, at_stop_sequence=stopped)
            return
        slot.last_token = token

    def _fail(self, slot: _Slot, error: NbllmError, progress: BatchProgress) -> None:
        slot.item.usage.finish_reason = "error"
        slot.item.usage.completion_tokens = slot.produced
        try:
            self._held[slot.seq_id] = []
            self._ctx.kv_cache_seq_rm(slot.seq_id, -1, -1)
        finally:
            slot.sampler.close()
            progress.finished += 1
            slot.item.sink(BatchEvent(slot.item, "error", error=error))

    def _finish(self, slot: _Slot, reason: str, progress: BatchProgress, *, at_stop_sequence: bool = False) -> None:
        item = slot.item
        if not at_stop_sequence:  # text held back (a possible stop-sequence start) is real text after all
            tail = slot.text.finish()
            if tail:
                item.sink(BatchEvent(item, "piece", tail))
        item.usage.finish_reason = reason
        item.usage.completion_tokens = slot.produced
        # The sequence's cache stays (``_held``) until its slot is taken: the next prompts may
        # start with what this one read.
        slot.sampler.close()
        progress.finished += 1
        item.sink(BatchEvent(item, "done"))


def _shared(held: list[int], prompt: list[int]) -> int:
    """How many leading tokens two token lists share."""
    n = min(len(held), len(prompt))
    if n == 0 or held[0] != prompt[0]:
        return 0
    return common_prefix(np.asarray(held[:n], dtype=np.int32), np.asarray(prompt[:n], dtype=np.int32))


def _as_generation_error(error: Exception) -> GenerationError:
    """Any other exception from llama.cpp's side, as the nbllm error the caller expects."""
    message = GenerationError(f"llama.cpp failed in a batch: {type(error).__name__}: {error}.")
    message.__cause__ = error
    return message
