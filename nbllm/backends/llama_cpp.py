"""llama.cpp through llama-cpp-python, in this process.

Generation runs our own short loop over ``Llama.generate`` (token ids) rather than
``create_completion(stream=True)``: it does less work per token (no re-detokenizing of the
whole answer, no chunk dicts), counts tokens exactly, checks a cancel flag between tokens and
holds back only what might be the start of a stop sequence.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import functools
import io
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from nbllm.backends.base import BatchItem, BatchProgress, EmbeddedTexts, LoadSettings, ModelSpec, Usage
from nbllm.backends.compute_thread import ComputeThreads
from nbllm.backends.llama_cpp_batch import BatchDecoder
from nbllm.backends.llama_cpp_draft import DraftModel
from nbllm.backends.llama_cpp_embed import POOLING_CODES, EmbeddingCancelled, embed_token_lists, tokenize_all
from nbllm.backends.llama_cpp_grammar import GrammarSampler, KnownSets, grammar_pieces, grammar_text, known_sets
from nbllm.backends.llama_cpp_speculative import speculative_steps
from nbllm.backends.token_trie import TokenTrie
from nbllm.core.cancel import Cancel
from nbllm.core.chat_format import FormattedPrompt
from nbllm.core.chat_template import ChatTemplate
from nbllm.core.errors import (
    ContextLengthError,
    GenerationError,
    GpuOutOfMemoryError,
    ModelLoadError,
    NbllmError,
    ParameterError,
)
from nbllm.core.params import GenerationParams
from nbllm.core.prefix_cache import PrefixCache, Snapshot, Tokens, common_prefix
from nbllm.core.schema import Constraint
from nbllm.core.speculation import DecodeCosts, DraftPolicy
from nbllm.core.stop import TextAssembler
from nbllm.core.waiting import next_item
from nbllm.host import build_flags

log = logging.getLogger("nbllm")
llama_log = logging.getLogger("nbllm.llama_cpp")

# ggml_log_level (ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT) -> logging levels; CONT (5)
# continues the previous message. llama-cpp-python's own table predates DEBUG and is off by one.
_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_last_level = logging.DEBUG
# Restoring a snapshot costs a memory copy; below this many extra shared tokens it is not worth it.
_MIN_RESTORE_GAIN = 16
# A prompt with more new tokens than this is read with llama.cpp's abort callback set, so that a
# stop lands within one node of the compute graph instead of after the whole prompt (seconds to
# minutes on a CPU). A shorter prompt, or a generation step, is over in moments anyway.
_ABORTABLE_PROMPT_TOKENS = 64
# Prompts up to this many bytes per token of room are tokenized without further ado; longer ones
# are first compared with the longest token of the vocabulary (see _refuse_what_cannot_fit).
_ROUGH_BYTES_PER_TOKEN = 16
# Tokenizers that cover every byte of the text with tokens whose text is at least as long:
# SentencePiece (spaces become the 3-byte "▁", unknown bytes <0xNN>), GPT-2 byte-level BPE (each
# byte a 1-2 byte character), RWKV, PLaMo-2. WordPiece and Unigram normalize text first (NFKC can
# shrink a character to a third, and they drop whitespace): for those the bound gets a margin.
_LOSSLESS_VOCABS = {1, 2, 5, 6}


@functools.lru_cache(maxsize=1)
def _native_flag_reader() -> Any:
    """libc's ``strlen`` as llama.cpp's abort callback, or None where libc cannot be found.

    llama.cpp calls the callback once per graph node. Given a ``Cancel``'s two-byte flag,
    ``strlen`` returns 0 until the flag is set and 1 after: exactly "abort now?" (the bool is
    read from the low byte of the return register, as the x86-64 and AArch64 calling conventions
    have it). No Python runs, so no GIL is needed, however busy other Python threads are; a
    Python callback there waited for the GIL and slowed prompts down by a third beside a busy
    thread."""
    try:
        strlen = ctypes.CDLL(None).strlen
    except (OSError, AttributeError):
        return None
    return llama_cpp.ggml_abort_callback(ctypes.cast(strlen, ctypes.c_void_p).value)


# Recent warnings and errors from llama.cpp (level, text), whatever the logging level: a failed
# load or decode only says *that* it failed; these lines say *why* (e.g. the GPU ran out of
# memory, a tensor is missing).
_recent_problems: collections.deque[tuple[int, str]] = collections.deque(maxlen=64)
_OOM_MARKERS = ("out of memory", "cudamalloc failed", "failed to allocate", "unable to allocate", "oom")


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]  # ctypes CFUNCTYPE is untyped
def _route_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # Called from C for every line llama.cpp logs; keep the cheap exit first.
    global _last_level
    py_level = _last_level if level == 5 else _LEVELS.get(level, logging.INFO)
    _last_level = py_level
    if py_level >= logging.WARNING:
        _recent_problems.append((py_level, text.decode("utf-8", errors="replace")))
    if llama_log.isEnabledFor(py_level):
        message = text.decode("utf-8", errors="replace").rstrip("\n")
        held = _held_errors.get(threading.get_ident()) if py_level >= logging.ERROR else None
        if held is not None:
            held.append(message)
        elif message:
            llama_log.log(py_level, "%s", message)


# Error lines of the loads in progress, by thread. A failed load quotes them in its
# ModelLoadError (logged as well, they printed three lines for one error in the console); a load
# that succeeds logs them when it is done.
_held_errors: dict[int, list[str]] = {}


@contextlib.contextmanager
def _errors_held() -> Iterator[list[str]]:
    held: list[str] = []
    _held_errors[threading.get_ident()] = held
    try:
        yield held
    finally:
        del _held_errors[threading.get_ident()]


# Replaces llama-cpp-python's callback, which prints straight to stderr. The callback object is
# a module global so it is never garbage-collected while C still holds the pointer.
llama_cpp.llama_log_set(_route_llama_log, ctypes.c_void_p(0))


# Loads in progress (thread id -> the flag its interrupt sets) and the hook that was installed
# before the first of them; see _interrupts_inside_callbacks.
_loading: dict[int, threading.Event] = {}
_loading_lock = threading.Lock()
_hook_before: Callable[[Any], object] | None = None


def _record_interrupt(unraisable: Any) -> None:
    """``sys.unraisablehook`` while models load: a KeyboardInterrupt that ctypes could not pass on
    through C marks the load on this thread (the hook runs on the thread that raised it)."""
    interrupted = _loading.get(threading.get_ident())
    if interrupted is not None and isinstance(unraisable.exc_value, KeyboardInterrupt):
        interrupted.set()
    else:
        (_hook_before or sys.__unraisablehook__)(unraisable)


@contextlib.contextmanager
def _interrupts_inside_callbacks() -> Iterator[threading.Event]:
    """Catch a Ctrl-C that lands inside llama.cpp's log callback during a load.

    Python runs signal handlers at the next Python code, and during a load that is often the
    log callback, called from C; ctypes cannot pass the KeyboardInterrupt on through C, so it
    hands it to ``sys.unraisablehook``, which prints and drops it, and the load went on as if
    nothing had happened. While loads run (a bench or the tuner may load beside the registry),
    one hook records the interrupt for the load on its thread; anything else goes to the hook
    that was there before, which is put back when the last load ends. The caller raises the
    interrupt once C has returned."""
    global _hook_before
    interrupted = threading.Event()
    with _loading_lock:
        if not _loading:
            _hook_before = sys.unraisablehook
            sys.unraisablehook = _record_interrupt
        _loading[threading.get_ident()] = interrupted
    try:
        yield interrupted
    finally:
        with _loading_lock:
            del _loading[threading.get_ident()]
            if not _loading:
                sys.unraisablehook = _hook_before or sys.__unraisablehook__
                _hook_before = None


class _DebugWriter(io.TextIOBase):
    """Swallows llama-cpp-python's verbose prints during a load, keeping them at DEBUG."""

    def write(self, text: str) -> int:
        if text.strip():
            log.debug("llama-cpp-python: %s", text.rstrip())
        return len(text)


def _out_of_memory_reported() -> bool:
    """Whether llama.cpp reported running out of (GPU) memory since the buffer was last cleared
    (at the start of each load and each generation)."""
    return any(marker in line.lower() for _, line in list(_recent_problems) for marker in _OOM_MARKERS)


# llama.cpp's last words on a failed load that say nothing the error does not say already.
_GENERIC_REASONS = ("failed to load model", "failed to load model from file", "error loading model")
_FUNCTION_PREFIX = re.compile(r"^(?:[a-z_][a-z0-9_:]*|error loading model):\s+")


def _load_reasons() -> list[str]:
    """What llama.cpp logged as errors since the load began, without its function-name prefixes:
    ``llama_model_load: error loading model: check_tensor_dims: tensor 'x' not found`` ->
    ``tensor 'x' not found``."""
    reasons: list[str] = []
    for level, line in list(_recent_problems):
        if level < logging.ERROR:
            continue
        reason = line.strip()
        while (shorter := _FUNCTION_PREFIX.sub("", reason, count=1)) != reason:
            reason = shorter
        reason = reason.rstrip(". ")
        if reason and reason.lower() not in _GENERIC_REASONS and reason not in reasons:
            reasons.append(reason)
    return reasons[-3:]


def _load_failure(path: Path, error: Exception) -> str:
    """ModelLoadError's message: llama.cpp's own reason when it logged one, then the next step."""
    reasons = _load_reasons()
    if _out_of_memory_reported():
        advice = "Memory ran out: lower performance.context_size or performance.gpu_layers, or close other programs."
    elif any("architecture" in reason for reason in reasons):
        advice = "This llama.cpp build does not know the model's architecture: upgrade llama-cpp-python."
    else:
        advice = (
            "The file passed nbllm's GGUF checks, but llama.cpp found its contents wrong: the file is damaged or "
            "incomplete (download it again), or it needs a newer llama.cpp (upgrade llama-cpp-python)."
        )
    if reasons:
        return f"llama.cpp could not load {path.name}: {'; '.join(reasons)}. {advice}"
    said = str(error).replace(str(path), path.name).rstrip(". ") or type(error).__name__
    return f"llama.cpp could not load {path.name} ({said}). {advice}"


class _Llama(llama_cpp.Llama):  # type: ignore[misc]  # llama_cpp is untyped here (follow_imports=skip)
    """``Llama`` without llama-cpp-python's chat templates.

    ``Llama()`` compiles every chat template in the file with jinja2 for its own chat handler,
    which nbllm does not use: a template with a syntax error then failed the load with a raw
    jinja2 exception, and compiling runs unbounded. nbllm compiles the template itself, under its
    limits (``nbllm.core.chat_template``). The constructor reads the templates from
    ``self.metadata``; this setter keeps them apart (in ``chat_templates``), so ``Llama`` finds none.
    """

    chat_templates: dict[str, str]
    _metadata: dict[str, str]

    @property
    def metadata(self) -> dict[str, str]:
        return self._metadata

    @metadata.setter
    def metadata(self, value: dict[str, str]) -> None:
        self.chat_templates = {k: v for k, v in value.items() if k.startswith("tokenizer.chat_template")}
        self._metadata = {k: v for k, v in value.items() if k not in self.chat_templates}


def _load_llama(path: Path, settings: LoadSettings) -> _Llama:
    """llama.cpp's model and context for ``path``, or the nbllm error that says why not (the
    answering model and a draft model load alike)."""
    _recent_problems.clear()
    try:
        # verbose=True avoids llama-cpp-python's stdout/stderr file-descriptor swap during the
        # load (it would swallow other threads' output in a kernel); its Python-level prints
        # are caught here instead, and llama.cpp's own log goes through _route_llama_log.
        with (
            contextlib.redirect_stderr(_DebugWriter()),
            _interrupts_inside_callbacks() as interrupted,
            _errors_held() as held,
        ):
            embedding = {"embedding": True, "pooling_type": POOLING_CODES[settings.pooling]} if settings.pooling else {}
            llm = _Llama(
                model_path=str(path),
                n_ctx=settings.context_size,
                n_batch=settings.batch_size,
                n_ubatch=settings.batch_size,
                n_threads=settings.threads,
                n_threads_batch=settings.threads,
                n_gpu_layers=settings.gpu_layers,
                use_mmap=settings.use_mmap,
                use_mlock=settings.use_mlock,
                flash_attn=settings.flash_attention,
                verbose=True,
                **embedding,
            )
    except Exception as error:  # whatever llama-cpp-python raises: ValueError, RuntimeError, OSError...
        if settings.gpu_layers > 0 and _out_of_memory_reported():
            raise GpuOutOfMemoryError(
                f"Not enough GPU memory to load {path.name} with {settings.gpu_layers} GPU layers."
            ) from error
        raise ModelLoadError(_load_failure(path, error)) from error
    for message in held:  # errors llama.cpp logged, although the model loaded
        llama_log.error("%s", message)
    if interrupted.is_set():  # Ctrl-C during the load: give the memory back, then stop
        llm.close()
        raise KeyboardInterrupt
    llm.verbose = False
    return llm


class LlamaCppModel:
    """One loaded GGUF model with its context. Not thread-safe: the registry's lock guards it."""

    def __init__(self, path: Path, settings: LoadSettings) -> None:
        self.path = path
        self.settings = settings
        self._llm = _load_llama(path, settings)
        llm = self._llm
        try:  # compiled once, here: a template that does not compile fails the load, naming the file
            self._template = self._make_template(llm, path)
        except BaseException:
            llm.close()
            raise
        # Llama.generate builds its sampler through this method: ours puts top-k first.
        llm._init_sampler = lambda **options: self._sampler(llm._seed, options)
        self._vocab = llm._model.vocab
        self._add_bos = bool(llm._model.add_bos_token())
        self._pieces: dict[int, bytes] = {}
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._longest_token: int | None = None  # bytes; see _refuse_what_cannot_fit
        self._prefixes = PrefixCache(settings.prefix_cache_bytes)
        self._worker = ComputeThreads(f"nbllm-{path.stem}")
        self._batcher: BatchDecoder | None = None
        self._grammar_sets: dict[str, KnownSets] = {}  # per schema: see llama_cpp_grammar.known_sets
        self._end_tokens: np.ndarray | None = None
        self._trie: TokenTrie | None = None  # the vocabulary as the grammar reads it: token_trie.py
        self._decode_costs = DecodeCosts()  # seconds per decode by size, for speculative decoding
        # Recurrent state (Mamba, RWKV, hybrids) cannot drop a refused draft: no speculation there.
        model = llm._model.model
        self._can_draft = not (llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))
        self._abort_callback: Any = None  # see _set_abort
        self._drafter: DraftModel | None = None  # the draft model last asked for (llama_cpp_draft.py)
        self._draft_refusals: dict[Path, NbllmError] = {}

    @property
    def context_size(self) -> int:
        return int(self._llm.n_ctx())

    @staticmethod
    def _make_template(llm: _Llama, path: Path) -> ChatTemplate | None:
        source = llm.chat_templates.get("tokenizer.chat_template")
        if not source or not source.strip():
            return None
        model = llm._model
        eos, bos = llm.token_eos(), llm.token_bos()
        return ChatTemplate(
            source,
            name=path.name,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def format_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> FormattedPrompt:
        """The chat in the model's template (rendered under nbllm's limits; a template that fails
        on it gives the plain transcript and a warning, see chat_template.py), or the transcript.
        ``tools`` go to a template that renders them (GenerationParams.template_tools)."""
        from nbllm.core.chat_format import plain_turns, transcript

        if self._template is None:
            return transcript(plain_turns(messages))
        return self._template.format(messages, tools)

    def _tokenize(
        self, prompt: FormattedPrompt, capacity: int | None = None, room: str = "the context holds"
    ) -> list[int]:
        """The prompt's tokens; with ``capacity``, a text that obviously cannot fit into that many
        tokens is refused first (``ContextLengthError``), without tokenizing it."""
        text = prompt.text
        if capacity is not None:
            self._refuse_what_cannot_fit(len(text), "characters", capacity, room)  # no more than its bytes
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ParameterError(
                f"The prompt is not valid Unicode text ({error.reason} at character {error.start:,}): remove or "
                "replace that character."
            ) from None
        if capacity is not None:
            self._refuse_what_cannot_fit(len(data), "bytes", capacity, room)
        tokens: list[int] = self._llm.tokenize(data, add_bos=prompt.add_bos and self._add_bos, special=prompt.special)
        return tokens

    def _refuse_what_cannot_fit(self, size: int, unit: str, capacity: int, room: str) -> None:
        """``_CannotFit`` (a ``ContextLengthError``) if a text of ``size`` bytes (or characters,
        fewer) certainly makes more than ``capacity`` tokens.

        Tokenizing first is no way to find out: llama.cpp tokenizes the whole text into memory
        (400 MB of text aborted the process with std::bad_alloc). Every token covers at most as
        many bytes of the text as its own text is long (see _LOSSLESS_VOCABS), so a text longer
        than ``capacity`` times the vocabulary's longest token needs more than ``capacity`` tokens:
        refusing it never refuses a prompt that fits. The longest token is looked up (one pass
        over the vocabulary, ~0.3 s for 262k tokens) only for texts of more than
        _ROUGH_BYTES_PER_TOKEN bytes per token of room, which rarely fit anyway.
        """
        if size <= capacity * _ROUGH_BYTES_PER_TOKEN:
            return
        longest = self._longest_token_bytes()
        if size > capacity * longest:
            at_least = -(-size // longest)
            why = f" ({size:,} {unit}; no token of {self.path.name} covers more than {longest} bytes)"
            raise _CannotFit(
                f"The prompt is at least {at_least:,} tokens but {room} {capacity:,}{why}. Shorten the prompt.",
                at_least,
                why,
            )

    def _longest_token_bytes(self) -> int:
        if self._longest_token is None:
            vocab = self._vocab
            longest = max(
                (len(llama_cpp.llama_vocab_get_text(vocab, token) or b"") for token in range(self._llm.n_vocab())),
                default=1,
            )
            if llama_cpp.llama_vocab_type(vocab) not in _LOSSLESS_VOCABS:
                longest *= 4
            self._longest_token = max(longest, 1)
        return self._longest_token

    def count_tokens(self, prompt: FormattedPrompt) -> int:
        return len(self._tokenize(prompt, self.context_size))

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buffer = self._piece_buffer
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
            piece = buffer.raw[: max(n, 0)]
            self._pieces[token] = piece
        return piece

    def _reusable_prefix(self, tokens: list[int]) -> int:
        """How many prompt tokens the KV cache already holds (as llama-cpp-python will reuse)."""
        llm = self._llm
        cached = llm.input_ids[: llm.n_tokens]
        limit = min(len(cached), len(tokens))
        common = 0
        while common < limit and cached[common] == tokens[common]:
            common += 1
        # At least one token must be evaluated to get fresh logits.
        return min(common, len(tokens) - 1)

    def generate(
        self,
        prompt: FormattedPrompt,
        params: GenerationParams,
        seed: int,
        usage: Usage,
        cancel: threading.Event,
    ) -> Iterator[str]:
        llm = self._llm
        n_ctx = llm.n_ctx()
        try:
            tokens = self._tokenize(prompt, n_ctx)
            count, counted, why = len(tokens), "", ""
        except _CannotFit as refused:  # refused unread: the same message, with a lower bound
            tokens, count, counted, why = [], refused.at_least, "at least ", refused.why
        if count >= n_ctx:
            trained = int(llm._model.n_ctx_train())
            if n_ctx >= trained or count >= trained:  # nbllm caps the context at the model's training length
                advice = f"{self.path.name} was trained for at most {trained:,} tokens: shorten the prompt."
            elif counted:  # only a lower bound is known: no size to recommend
                advice = (
                    f"Shorten the prompt, or raise performance.context_size (up to {trained:,}, the length "
                    f"{self.path.name} was trained for)."
                )
            else:
                wanted = min(_next_power_of_two(count + params.max_tokens), trained)
                advice = (
                    f"Shorten the prompt, or raise performance.context_size to {wanted:,} (config file, "
                    f"or nbllm.configure(performance={{'context_size': {wanted}}}) in Python)."
                )
            raise ContextLengthError(
                f"The prompt is {counted}{count:,} tokens but the context holds {n_ctx:,}{why}. {advice}"
            )
        if not tokens:
            raise ContextLengthError("The prompt is empty after tokenization; give the model some text.")
        usage.prompt_tokens = len(tokens)
        _recent_problems.clear()
        if params.constraint is not None:  # a schema the grammar cannot take fails here, before any decode
            grammar_text(params.constraint)
        max_tokens = min(params.max_tokens, n_ctx - len(tokens))
        return self._on_worker(lambda: self._stream(tokens, params, seed, max_tokens, prompt, usage, cancel), cancel)

    # ------------------------------------------------------------ the request's compute thread

    def _on_worker(self, make_steps: Callable[[], Iterator[str]], cancel: threading.Event) -> Iterator[str]:
        """Run a stream on a compute thread of its own (compute_thread.py says why) and hand its
        pieces over through a queue; the hand-over costs microseconds per token."""
        pieces: queue.SimpleQueue[object] = queue.SimpleQueue()

        def produce() -> None:
            try:
                for piece in make_steps():
                    pieces.put(piece)
                pieces.put(_DONE)
            except BaseException as error:  # delivered to the consumer, raised there
                pieces.put(_Failure(error))

        job = self._worker.submit(produce)
        finished = False
        try:
            while True:
                item = next_item(pieces)
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, _Failure):
                    finished = True
                    raise item.error
                yield str(item)
        finally:
            if not finished:
                cancel.set()  # closed early or interrupted: stop within a token
            _wait(job)

    def _run_on_worker(self, function: Callable[[], float]) -> float:
        return float(_wait(self._worker.submit(function)))

    def embed(
        self, texts: Sequence[str], *, truncate: bool, on_progress: Callable[[int], None], cancel: threading.Event
    ) -> EmbeddedTexts:
        """Pooled vectors of ``texts`` (llama_cpp_embed.py), on a compute thread of its own."""
        llm = self._llm
        if not self.settings.pooling:
            raise GenerationError(f"{self.path.name} was not loaded as an embedding model.")
        trained = int(llm._model.n_ctx_train()) or llm.n_batch
        limit = min(trained, int(llm.n_batch))
        # No token is longer than the longest piece: a text with more bytes than that many
        # pieces cannot fit, and is refused (or cut) before tokenizing megabytes for nothing.
        token_lists, truncated = tokenize_all(
            llm, texts, limit, truncate, rough_bytes=limit * _ROUGH_BYTES_PER_TOKEN, longest=self._longest_token_bytes
        )
        job = self._worker.submit(lambda: embed_token_lists(llm, token_lists, on_progress, cancel))
        try:
            vectors = job.result()
        except KeyboardInterrupt:  # Ctrl-C: stop after the batch being decoded, then give the model back
            cancel.set()
            with contextlib.suppress(EmbeddingCancelled):
                _wait(job)
            raise
        return EmbeddedTexts(vectors, sum(len(t) for t in token_lists), tuple(truncated))

    def _stream(
        self,
        tokens: list[int],
        params: GenerationParams,
        seed: int,
        max_tokens: int,
        prompt: FormattedPrompt,
        usage: Usage,
        cancel: threading.Event,
    ) -> Iterator[str]:
        llm = self._llm
        # Here, on the compute thread, no signal lands: a Ctrl-C between restoring a KV snapshot
        # and updating llama-cpp-python's record of the KV content would leave them disagreeing.
        self._prepare_kv(tokens)
        usage.reused_prompt_tokens = max(self._reusable_prefix(tokens), 0)
        llm.set_seed(seed)
        vocab, is_eog, piece_of = self._vocab, llama_cpp.llama_vocab_is_eog, self._piece
        text = TextAssembler((*params.stop, *prompt.stop), prompt.trim_whitespace)
        finish, produced, at_stop_sequence = "length", 0, False
        policy = DraftPolicy(self._decode_costs) if params.speculation == "auto" and self._can_draft else None
        drafter = self._draft_model(Path(params.draft_model)) if policy is not None and params.draft_model else None
        abortable = len(tokens) - usage.reused_prompt_tokens > _ABORTABLE_PROMPT_TOKENS
        if abortable:
            self._set_abort(cancel)
        if policy is not None:
            steps = speculative_steps(
                llm, tokens, sampling_options(params), max_tokens, self._decode_costs, policy, drafter
            )
        else:
            steps = llm.generate(tokens, **sampling_options(params))
        try:
            for token in steps:
                if produced == 0:
                    usage.first_token_at = time.perf_counter()
                    if abortable:
                        self._set_abort(None)
                        abortable = False
                if is_eog(vocab, token) and not params.ignore_eos:
                    finish = "stop"
                    break
                produced += 1
                usage.completion_tokens = produced  # live, for progress displays
                shown, stopped = text.feed(piece_of(token))
                if shown:
                    yield shown
                if stopped:
                    finish, at_stop_sequence = "stop", True
                    break
                if produced >= max_tokens:
                    break
                if cancel.is_set():
                    finish = "cancelled"
                    break
            if not at_stop_sequence:  # held-back text (a possible stop-sequence start) is real text
                tail = text.finish()
                if tail:
                    yield tail
        except (GeneratorExit, KeyboardInterrupt):
            finish = "cancelled"
            raise
        except RuntimeError as error:  # llama_decode failures surface as RuntimeError
            if cancel.is_set():  # llama.cpp stopped reading the prompt because we asked it to
                finish = "cancelled"
                return
            finish = "error"
            if self.settings.gpu_layers > 0 and _out_of_memory_reported():
                raise GpuOutOfMemoryError(
                    f"The GPU ran out of memory while generating with {self.settings.gpu_layers} GPU layers."
                ) from error
            raise GenerationError(f"llama.cpp failed while generating: {error}.") from error
        except NbllmError:
            finish = "error"
            raise
        except Exception as error:  # anything else from llama-cpp-python: an nbllm error all the same
            finish = "error"
            raise GenerationError(f"llama.cpp failed while generating: {type(error).__name__}: {error}.") from error
        finally:
            if abortable:
                self._set_abort(None)
            steps.close()
            # An interrupt can land after llama_decode returned but before llama-cpp-python
            # counted the token: the logits then belong to a token it does not know about, and
            # an identical next prompt would sample from them. Force one fresh evaluation.
            llm._requires_eval = True
            usage.completion_tokens = produced
            usage.finish_reason = finish
            if policy is not None:
                usage.drafted_tokens, usage.accepted_tokens = policy.drafted, policy.accepted

    def _draft_model(self, path: Path) -> DraftModel:
        """The draft model at ``path``, loaded on first use and kept until another is asked for
        (one at a time: a draft model is read once per guess, it must stay in memory). A file
        refused once is refused again at once, not loaded and checked on every request."""
        if self._drafter is not None and self._drafter.path == path:
            return self._drafter
        refused = self._draft_refusals.get(path)
        if refused is not None:
            raise type(refused)(str(refused))
        if self._drafter is not None:
            self._drafter.close()
            self._drafter = None
        # Same threads, batch, context and GPU layers as the answering model; no KV snapshots.
        settings = dataclasses.replace(self.settings, prefix_cache_bytes=0, pooling=None)
        try:
            llm = _load_llama(path, settings)
            try:
                self._drafter = DraftModel(path, llm, self._llm)
            except BaseException:
                llm.close()
                raise
        except NbllmError as error:
            self._draft_refusals[path] = error
            raise
        return self._drafter

    def _set_abort(self, cancel: threading.Event | None) -> None:
        """Let llama.cpp's decode stop as soon as ``cancel`` is set (None: never).

        After an abort llama.cpp removes the unfinished step's positions from the KV cache, and
        llama-cpp-python counts only the steps that finished, so the two stay in agreement."""
        data = None
        if cancel is None:
            callback = llama_cpp.ggml_abort_callback()  # a null pointer: no callback
        elif isinstance(cancel, Cancel) and _native_flag_reader() is not None:
            callback, data = _native_flag_reader(), ctypes.c_void_p(cancel.flag_address)
        else:  # a plain Event: ask it from Python
            callback = llama_cpp.ggml_abort_callback(lambda _data: cancel.is_set())
        llama_cpp.llama_set_abort_callback(self._llm._ctx.ctx, callback, data)
        # C holds only pointers: keep the callback and the flag's memory alive while installed.
        self._abort_callback = (callback, cancel)

    # ------------------------------------------------------------ raw speed, as llama-bench measures it

    def set_threads(self, threads: int) -> None:
        """Change the thread count in place (no reload): what the tuner sweeps."""
        self._llm._ctx.set_n_threads(threads, threads)
        self._llm.context_params.n_threads = threads
        self._llm.context_params.n_threads_batch = threads

    def timed_decode(self, kind: str, n_tokens: int, seed: int = 0) -> float:
        """Seconds to process ``n_tokens`` like llama-bench does, from an empty KV cache.

        ``pp``: one prompt of random tokens, in batches of ``batch_size``. ``tg``: one token at a
        time, each a decode of its own. No sampling (llama-bench samples nothing either), so the
        number is the model's speed on this machine, not nbllm's.
        """
        return self._run_on_worker(lambda: self._timed_decode(kind, n_tokens, seed))

    def _timed_decode(self, kind: str, n_tokens: int, seed: int) -> float:
        llm = self._llm
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, llm.n_vocab(), size=n_tokens, dtype=np.int32).tolist()
        llm.n_tokens = 0
        llm._ctx.kv_cache_clear()
        try:
            start = time.perf_counter()
            if kind == "pp":
                llm.eval(tokens)
            elif kind == "tg":
                for token in tokens:
                    llm.eval([token])
            else:
                raise ValueError(f"kind must be 'pp' or 'tg', not {kind!r}")
            return time.perf_counter() - start
        except RuntimeError as error:
            if self.settings.gpu_layers > 0 and _out_of_memory_reported():
                raise GpuOutOfMemoryError(f"The GPU ran out of memory during a {kind} run.") from error
            raise GenerationError(f"llama.cpp failed during a {kind} run: {error}.") from error
        finally:
            # The KV now holds random tokens: never let a later prompt "reuse" them.
            llm.n_tokens = 0
            llm._ctx.kv_cache_clear()

    # ------------------------------------------------------------ KV prefix reuse across requests

    def _prepare_kv(self, tokens: list[int]) -> None:
        """Keep the KV content a new prompt would discard; bring back a snapshot that fits better.

        llama-cpp-python reuses only the KV cache of the previous prompt. Here, before that is
        overwritten, a valuable KV state (>= min tokens that the new prompt does not share) is
        snapshotted, and a snapshot sharing a longer prefix with the new prompt is restored.
        """
        cache = self._prefixes
        if cache.max_bytes <= 0:
            return
        llm = self._llm
        target = np.asarray(tokens, dtype=np.int32)
        current = np.asarray(llm.input_ids[: llm.n_tokens], dtype=np.int32)
        kept = common_prefix(current, target)
        if len(current) - kept >= cache.min_tokens and cache.worth_saving(current):
            self._save_snapshot(current.copy())
        snapshot, shared = cache.best(target)
        if snapshot is not None and shared >= kept + _MIN_RESTORE_GAIN:
            self._restore_snapshot(snapshot)

    def _save_snapshot(self, tokens: Tokens) -> None:
        ctx = self._llm.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, 0)
        if written > 0:
            self._prefixes.add(Snapshot(tokens, buffer, int(written)))
            log.debug("Saved a KV snapshot of %d tokens (%d bytes)", len(tokens), written)

    def _restore_snapshot(self, snapshot: Snapshot) -> None:
        llm = self._llm
        read = llama_cpp.llama_state_seq_set_data(llm.ctx, snapshot.state, snapshot.state_bytes, 0)
        if read == 0:
            log.debug("A KV snapshot could not be restored; evaluating the prompt in full.")
            llm.n_tokens = 0
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            return
        n = len(snapshot.tokens)
        llm.input_ids[:n] = snapshot.tokens
        llm.n_tokens = n
        llm._requires_eval = True  # logits are stale until one token is evaluated
        self._prefixes.restored += 1

    # ------------------------------------------------------------ many prompts at once

    def run_batch(
        self,
        feed: queue.SimpleQueue[BatchItem | None],
        stop: threading.Event,
        progress: BatchProgress,
        idle: Callable[[], bool],
        *,
        parallel: int,
        seq_context: int,
    ) -> None:
        """Run the continuous-batching loop (llama_cpp_batch.py) on a compute thread until
        ``idle()``; the extra context is built once per (parallel, seq_context) and kept."""

        def loop() -> None:
            decoder = self._batch_decoder(parallel, seq_context)
            decoder.run(feed, stop, progress, idle)

        _wait(self._worker.submit(loop))

    def _batch_decoder(self, parallel: int, seq_context: int) -> BatchDecoder:
        current = self._batcher
        if current is not None and (current.parallel, current.seq_context) == (parallel, seq_context):
            return current
        if current is not None:
            current.close()
        self._batcher = BatchDecoder(
            self._llm,
            parallel=parallel,
            seq_context=seq_context,
            batch_size=self.settings.batch_size,
            threads=self.settings.threads,
            piece_of=self._piece,
            tokenize=lambda prompt, capacity: self._tokenize(prompt, capacity, "a batched sequence holds"),
            make_sampler=self._make_sampler,
            format_chat=self.format_chat,
        )
        return self._batcher

    def _make_sampler(self, params: GenerationParams, seed: int) -> Any:
        # The very chain single streams use (see sampler_chain), so a batched answer is
        # sampled exactly as a one-at-a-time answer with the same seed would be.
        return self._sampler(seed, sampling_options(params))

    def _sampler(self, seed: int, options: dict[str, Any]) -> Any:
        """nbllm's sampler chain; with a constraint (passed as ``grammar``), the chain with a
        grammar beside it (llama_cpp_grammar.py)."""
        llm = self._llm
        constraint = options.get("grammar")
        if constraint is None:
            return sampler_chain(llm._n_vocab, llm.last_n_tokens_size, seed, **options)
        # Top-k goes in front, in the grammar sampler: it remembers the k ids for a refusal.
        chain = sampler_chain(llm._n_vocab, llm.last_n_tokens_size, seed, **{**options, "top_k": 0})
        grammar = grammar_text(constraint)
        sampler = GrammarSampler(
            chain, self._vocab, llm._n_vocab, grammar, options, llm.last_n_tokens_size, self._piece
        )
        sampler.know(self._known_sets(constraint, grammar), self._token_trie())
        return sampler

    def _token_trie(self) -> TokenTrie:
        """Built once per model on its first constrained answer (~0.25 s for 49k tokens, ~0.9 s for 262k)."""
        if self._trie is None:
            self._trie = TokenTrie(grammar_pieces(self._vocab, self._llm._n_vocab), self._eog_tokens().tolist())
        return self._trie

    def _eog_tokens(self) -> np.ndarray:
        if self._end_tokens is None:
            is_eog, vocab = llama_cpp.llama_vocab_is_eog, self._vocab
            self._end_tokens = np.array([t for t in range(self._llm._n_vocab) if is_eog(vocab, t)], dtype=np.int32)
        return self._end_tokens

    def _known_sets(self, constraint: Constraint, grammar: str) -> KnownSets:
        key = f"{constraint.kind}:{constraint.digest}"
        known = self._grammar_sets.get(key)
        if known is None:
            known = known_sets(self._vocab, self._llm._n_vocab, grammar, constraint, self._eog_tokens())
            self._grammar_sets[key] = known
            while len(self._grammar_sets) > 32:
                self._grammar_sets.pop(next(iter(self._grammar_sets)))
        return known

    def clear_prefix_cache(self) -> None:
        self._prefixes.clear()

    def prefix_cache_stats(self) -> dict[str, int]:
        return self._prefixes.describe()

    def close(self) -> None:
        self._worker.wait_idle()
        if self._batcher is not None:
            self._batcher.close()
        if self._drafter is not None:
            self._drafter.close()
        self._prefixes.clear()
        self._llm.close()


def sampling_options(params: GenerationParams) -> dict[str, Any]:
    """nbllm's parameters under llama-cpp-python's names (Llama.generate and sampler_chain)."""
    return {
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "temp": params.temperature,
        "repeat_penalty": params.repeat_penalty,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        "grammar": params.constraint,  # Llama.generate hands it to _init_sampler (LlamaCppModel._sampler)
    }


def sampler_chain(
    n_vocab: int,
    last_n: int,
    seed: int,
    *,
    top_k: int,
    top_p: float,
    min_p: float,
    temp: float,
    repeat_penalty: float,
    frequency_penalty: float,
    presence_penalty: float,
    typical_p: float = 1.0,
    **_unused: Any,
) -> Any:
    """llama-cpp-python's sampler chain with top-k moved before the repetition penalties.

    Its chain applies the penalties first, to the whole vocabulary: 2.7 ms per token on Gemma's
    262,144 tokens against 0.8 ms with top-k first (measured), i.e. 8 % of a 270M model's
    generation time, and more in a batch. Penalties only lower logits, so the only difference is
    at the edge: a penalized token among the k most likely stays a candidate with its lowered
    logit instead of possibly giving its place to the (k+1)-th. Mirostat, which nbllm does not
    offer, is not built; a grammar goes beside the chain, not into it (llama_cpp_grammar.py).
    """
    chain = internals.LlamaSampler()
    if top_k > 0:
        chain.add_top_k(top_k)
    chain.add_penalties(
        n_vocab=n_vocab,
        penalty_last_n=last_n,
        penalty_repeat=repeat_penalty,
        penalty_freq=frequency_penalty,
        penalty_present=presence_penalty,
    )
    if temp < 0:
        chain.add_dist(seed)
    elif temp == 0:
        chain.add_greedy()
    else:
        chain.add_typical(typical_p, 1)
        chain.add_top_p(top_p, 1)
        chain.add_min_p(min_p, 1)
        chain.add_temp(temp)
        chain.add_dist(seed)
    return chain


_DONE = object()


class _CannotFit(ContextLengthError):
    """A prompt refused before tokenizing: ``at_least`` tokens, ``why`` says how that is known."""

    def __init__(self, message: str, at_least: int, why: str) -> None:
        super().__init__(message)
        self.at_least = at_least
        self.why = why


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _wait(job: Future[Any]) -> Any:
    """The job's result, waiting through a second Ctrl-C: the model must be idle before its lock
    is released (a decode takes milliseconds); that interrupt is raised once the job is done."""
    interrupted = False
    while True:
        try:
            result = job.result()
            break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt
    return result


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


class LlamaCppBackend:
    name = "llama.cpp"

    def __init__(self) -> None:
        # Fixed for the life of the process: ask llama.cpp once.
        self._build_info = {
            "backend": "llama.cpp",
            "llama_cpp_python": llama_cpp.__version__,
            "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
            "system_info": llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip(),
        }
        self._check_cpu()

    def _check_cpu(self) -> None:
        """Refuse a build this CPU cannot run, before it kills the kernel with SIGILL.

        A wheel built elsewhere (another machine, a Binder image, a copied environment) may use
        instruction sets this CPU lacks; llama.cpp would die on the first matrix product.
        """
        from nbllm.host.machine import parse_system_info

        missing = build_flags.missing_cpu_features(
            parse_system_info(str(self._build_info["system_info"])), build_flags.read_cpu_flags()
        )
        if missing:
            raise ModelLoadError(
                f"The installed llama.cpp uses {', '.join(missing)}, which this CPU does not have: running it "
                "would crash. Rebuild it for this CPU: " + build_flags.install_command(build_flags.cmake_args())
            )

    def load(self, spec: ModelSpec, settings: LoadSettings) -> LlamaCppModel:
        return LlamaCppModel(spec.path, settings)

    def build_info(self) -> dict[str, Any]:
        return dict(self._build_info)
