"""Structured output on llama.cpp: a grammar from a ``Constraint``, consulted only when needed.

llama-cpp-python puts the grammar at the head of the sampler chain, so every token pays for
checking the whole vocabulary against it: 262,144 candidates on Gemma 3, 0.31x of the
unconstrained speed (issue 14). llama.cpp's own sampler (common/sampling.cpp) samples first
and asks the grammar about the one sampled token; only when the grammar rejects it are all
candidates filtered and the token sampled again. ``GrammarSampler`` does the same, for single
streams and for each sequence of a batch (each with its own grammar state).

Which token comes out is the same as with the grammar first whenever the grammar accepts the
first choice: greedy answers are identical; sampled ones follow llama.cpp's own sampler.
"""

from __future__ import annotations

import ctypes
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from nbllm.backends.token_trie import TokenTrie
from nbllm.core.errors import GenerationError, SchemaError
from nbllm.core.schema import Constraint

MAX_GRAMMAR_BYTES = 1 << 20

_grammars: OrderedDict[str, str] = OrderedDict()  # constraint digest -> GBNF text
_grammars_lock = threading.Lock()


def grammar_text(constraint: Constraint) -> str:
    """The GBNF grammar for ``constraint`` (converted once per schema, then remembered)."""
    key = f"{constraint.kind}:{constraint.digest}"
    with _grammars_lock:
        if key in _grammars:
            _grammars.move_to_end(key)
            return _grammars[key]
    text = _convert(constraint)
    if len(text) > MAX_GRAMMAR_BYTES:
        raise SchemaError(
            f"The grammar for {constraint.name} would be {len(text):,} bytes (at most {MAX_GRAMMAR_BYTES:,}): "
            "simplify the schema (fewer or shorter enum values, smaller bounds)."
        )
    with _grammars_lock:
        _grammars[key] = text
        while len(_grammars) > 64:
            _grammars.popitem(last=False)
    return text


def _convert(constraint: Constraint) -> str:
    if constraint.kind == "choices":
        # Plain text, exactly one of the choices (a GBNF string literal is a JSON string).
        return "root ::= " + " | ".join(_literal(choice) for choice in constraint.choices)
    try:
        text = str(json_schema_to_gbnf(json.dumps(dict(constraint.schema))))
    except RecursionError as error:
        raise SchemaError(f"{constraint.name} is nested too deeply to turn into a grammar.") from error
    except Exception as error:  # the converter's own asserts and errors (a pattern it cannot read...)
        raise SchemaError(f"{constraint.name} cannot be turned into a grammar: {error}.") from error
    # The converter shipped with llama-cpp-python 0.3 lets a JSON string hold raw control
    # characters (a newline inside "..."), which JSON forbids and every parser refuses;
    # llama.cpp's current converter excludes them the same way.
    if "\nchar ::=" in f"\n{text}" and _LOOSE_CHAR not in text:
        raise SchemaError("The JSON grammar converter changed: nbllm cannot check its string rule.")
    # Its space rule allows one space between tokens; models write JSON pretty-printed, with a
    # newline and indentation, and every such token was refused and sampled again (a quarter
    # of all tokens on the default model). llama.cpp's current converter allows what follows.
    text = text.replace(_LOOSE_CHAR, _JSON_CHAR).replace(_TIGHT_SPACE, _JSON_SPACE)
    # No blank space after the value: once it is complete the answer ends (end of turn). With
    # space allowed there, a model that wants to go on ("\n\nQuestion:") wrote whitespace
    # until the rule's limit, one refused token after another.
    lines = [line.removesuffix(" space") if line.startswith("root ::= ") else line for line in text.splitlines()]
    syntax = constraint.syntax
    if syntax is None:
        return "\n".join(lines)
    # Tool calls (core/tool_syntax.py): the schema's value is one call, framed as the model
    # writes it (Hermes' <tool_call> blocks, up to ``most`` of them), or the whole answer.
    lines = [line.replace("root ::= ", "call ::= ", 1) if line.startswith("root ::= ") else line for line in lines]
    if syntax.framed:
        block = f"{_literal(syntax.opener)} call {_literal(syntax.closer)}"
        more = f" ({_literal(syntax.separator)} {block}){{0,{syntax.most - 1}}}" if syntax.most > 1 else ""
        lines.append(f"tool-calls ::= {block}{more}")
    else:
        lines.append("tool-calls ::= call")
    if constraint.kind == "tools":
        # Text or calls (tool_choice auto): text must not start as a call does, even after blank
        # space (calls are read from the answer's first non-blank character: tool_syntax.py).
        first = _class_char(syntax.opener[0])
        lines += ["root ::= tool-calls | free-text", f"free-text ::= [ \\t\\n\\r]* [^{first} \\t\\n\\r] [^\\x00]*"]
    else:
        lines.append("root ::= tool-calls")
    return "\n".join(lines)


def _class_char(character: str) -> str:
    """``character`` inside a GBNF character class."""
    return "\\" + character if character in "[]^-\\" else character


def _literal(text: str) -> str:
    """``text`` as a GBNF string literal: quotes and backslashes escaped, control characters as
    \\xHH (GBNF knows no \\b or \\f, which json.dumps would write)."""
    escaped = "".join(
        "\\" + c if c in '"\\' else f"\\x{ord(c):02X}" if ord(c) < 0x20 or c == "\x7f" else c for c in text
    )
    return f'"{escaped}"'


_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_TIGHT_SPACE = 'space ::= " "?'
_JSON_SPACE = 'space ::= | " " | "\\n"{1,2} [ \\t]{0,20}'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


class GrammarSampler:
    """A sampler chain with a grammar beside it (not in front of it); duck-types the chain's
    ``sample(ctx, idx)`` as llama-cpp-python's ``Llama.generate`` and nbllm's batch loop call it.

    The usual token costs what an unconstrained one does: the candidates are filled from the
    logits (numpy, ids and logits only: every sampler that reads ``p`` computes it first), the
    chain picks a token, the grammar checks that one token. When it refuses, llama.cpp would
    check all 262,144 candidates against the grammar (about 50 ms on Gemma 3). Here the grammar
    sees the most likely candidates first, 256, then 8x more each round, and stops as soon as
    no candidate left unseen could be chosen:

    - it has allowed ``top_k`` candidates (the chain's first step keeps no more), or
    - every unseen candidate's logit lies more than ``margin`` below the best allowed one's,
      where ``margin`` is what the chain itself would cut: ln(1/min_p) (min_p keeps only tokens
      within that distance of the best), plus the most the penalties can lower the best token
      (they only ever lower logits). For greedy decoding the min_p part is 0: the same token
      comes out as with the grammar first. Where no such bound holds (min_p off, penalties that
      raise logits), ``FAR`` nats: a factor of 5e8 in probability.

    When the first look does not settle it, the allowed set is usually small (a key, a tool's
    name, a quote) and its members unlikely ones, so a search down the logits would go deep.
    The vocabulary's trie (token_trie.py) finds such a set whole from a few hundred candidates:
    exactly the grammar-first answer, in ~0.5 ms instead of 4-10 ms on a 49k vocabulary.
    """

    FAR = 20.0
    FIRST_LOOK = 256
    SORTED_LOOK = 2048
    DEEP_LOOK = 16384
    # The most candidates a search down the trie (token_trie.py) may end with; more means the
    # allowed set is large, and the search by logits finds its best members sooner.
    TRIE_BUDGET = 4096

    def __init__(
        self,
        chain: Any,
        vocab: Any,
        n_vocab: int,
        grammar: str,
        options: dict[str, Any],
        last_n: int,
        piece_of: Callable[[int], bytes],
    ) -> None:
        self._chain = chain  # a llama_cpp._internals.LlamaSampler
        self._piece_of = piece_of
        self._pending = b""  # an unfinished UTF-8 sequence at the end of the text so far
        self._grammar = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not self._grammar:
            raise SchemaError("llama.cpp could not parse the grammar made from the schema.")
        self._n_vocab = n_vocab
        top_k = int(options["top_k"])
        self._keep = top_k if 0 < top_k < n_vocab else n_vocab
        # The chain comes without its top-k (LlamaCppModel._sampler): applied here, first.
        self._top_k = llama_cpp.llama_sampler_init_top_k(top_k) if self._keep < n_vocab else None
        self._top_ids: np.ndarray | None = None
        self._margin_base, self._margin_per_logit = _margins(options, last_n)
        self._data = (llama_cpp.llama_token_data * n_vocab)()
        # The candidates as three float32 columns (id, logit, p), filled by numpy, not a loop.
        self._columns = np.frombuffer(self._data, dtype=np.float32).reshape(n_vocab, 3)
        self._columns[:, 2] = 0.0
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._array = llama_cpp.llama_token_data_array(self._data, n_vocab, -1, False)
        # Set again before each use, in case a sampler pointed it elsewhere (cast once: ~10 us).
        self._data_pointer = ctypes.cast(self._data, ctypes.POINTER(llama_cpp.llama_token_data))
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(self._one, 1, -1, False)
        self.rejections = 0  # sampled tokens the grammar refused (then sampled again)
        self._known: KnownSets | None = None
        self._trie: TokenTrie | None = None
        self._partial_trusted = partial_characters_trusted(grammar)  # see token_trie.py
        self._text = b""  # the answer so far, for knowing when a JSON object or array is complete
        self._steps = 0
        self._path: list[int] | None = []  # the tokens so far, while few: the key of known sets

    def know(self, known: KnownSets, trie: TokenTrie | None = None) -> None:
        """Where the allowed tokens are known without a search (at the start, and at the end),
        and the model's vocabulary as a trie, for finding small allowed sets (token_trie.py)."""
        self._known = known
        self._trie = trie

    def sample(self, ctx: Any, idx: int = -1) -> int:
        pointer = llama_cpp.llama_get_logits_ith(ctx.ctx, idx)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        chain = self._chain.sampler
        self._fill(self._ids, logits)
        self._apply_chain(chain, remember=True)
        token = self._selected()
        tail = self._utf8_tail(token)
        if tail is None or not self._allowed(token):
            self.rejections += 1
            refused: list[int] = []
            while True:
                if tail is None:  # a byte token that breaks UTF-8 (the grammar lets those through)
                    refused.append(token)
                self._fill_allowed(logits, refused)
                self._apply_chain(chain, remember=False)
                token = self._selected()
                tail = self._utf8_tail(token)
                if tail is not None:
                    break
        self._pending = tail
        self._steps += 1
        if self._path is not None:
            self._path.append(token)
            if len(self._path) > KnownSets.PATH_DEPTH:
                self._path = None
        if self._known is not None and self._known.closes:
            self._text += self._piece_of(token)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(chain, token)
        return token

    def _utf8_tail(self, token: int) -> bytes | None:
        """The unfinished UTF-8 sequence the text ends with after ``token``, or None when the
        token would make the text invalid UTF-8: llama.cpp's grammar treats such a token as
        empty and lets it through, and the answer would hold U+FFFD where the schema counted
        nothing (a random model's byte tokens do this; a string's maxLength then fails)."""
        data = self._pending + self._piece_of(token)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as error:
            if error.reason == "unexpected end of data" and error.end == len(data):
                return data[error.start :]
            return None
        return b""

    def _fill(self, ids: np.ndarray, logits: np.ndarray) -> None:
        count = len(ids)
        self._columns[:count, 0] = ids.view(np.float32)
        self._columns[:count, 1] = logits
        array = self._array
        array.data = self._data_pointer
        array.size, array.selected, array.sorted = count, -1, False

    def _fill_allowed(self, logits: np.ndarray, refused: list[int]) -> None:
        """The candidates the grammar allows among the most likely ones (see the class)."""
        exact = self._exact_candidates()
        if exact is not None and self._fill_from(exact, logits, refused):  # known: nothing to search
            return
        n_vocab, look = self._n_vocab, 0
        # First look: the k most likely candidates, which top-k just picked for this token (kept
        # by _apply_chain), so the usual refusal costs no pass over the vocabulary.
        first = self._top_ids
        if first is None:
            look = self.FIRST_LOOK
        ranked: np.ndarray | None = None  # the SORTED_LOOK most likely, best first: one pass for two looks
        searched_trie = False
        while True:
            if look == 0 and first is not None:
                ids = first
                rest_below = float(logits[ids].min())
            elif look <= self.SORTED_LOOK:
                if ranked is None:
                    size = min(self.SORTED_LOOK, n_vocab)
                    top = np.argpartition(logits, n_vocab - size)[n_vocab - size :]
                    ranked = top[np.argsort(-logits[top], kind="stable")].astype(np.int32)
                ids = ranked[:look]
                rest_below = float(logits[ids[-1]])  # every candidate not looked at is at most this
            elif look < n_vocab:
                ids = np.argpartition(logits, n_vocab - look)[n_vocab - look :].astype(np.int32)
                rest_below = float(logits[ids].min())
            else:
                ids, rest_below = self._ids, -np.inf
            self._fill(ids, logits[ids])
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._array))
            kept = self._columns[: self._array.size, 1]
            if look >= n_vocab:
                self._remember(ids[np.isfinite(kept)])
            if refused:
                kept[np.isin(ids, refused)] = -np.inf
            allowed = np.isfinite(kept)
            count = int(allowed.sum())
            if count:
                best = float(kept[allowed].max())
                margin = self._margin_base + abs(best) * self._margin_per_logit
                if count >= self._keep or rest_below < best - margin:
                    return
            if not searched_trie and self._trie is not None and not self._pending:
                searched_trie = True
                # The most likely candidates did not settle it: the allowed set is small, or
                # its best members are unlikely ones. The trie finds a small set whole.
                superset = self._trie.candidates(self._refuses, self.TRIE_BUDGET, partial=self._partial_trusted)
                if superset is not None:
                    if self._fill_from(superset, logits, refused, remember=True):
                        return
                    raise GenerationError("No token fits the schema's grammar here; the answer cannot be completed.")
            if look >= n_vocab:
                if count:
                    return
                raise GenerationError("No token fits the schema's grammar here; the answer cannot be completed.")
            look = min(max(look * 8, self.FIRST_LOOK), n_vocab)
            if look > self.DEEP_LOOK and self._path is not None and self._known is not None:
                # A search this deep early in the answer: once in full, then known (_remember).
                # Only this deep: a full pass costs ~50 ms on a 262k vocabulary, a look of
                # DEEP_LOOK a few, and early positions that differ between answers (argument
                # values) would pay the full pass without ever being met again.
                look = n_vocab

    def _fill_from(self, ids: np.ndarray, logits: np.ndarray, refused: list[int], *, remember: bool = False) -> bool:
        """The candidates: those of ``ids`` (a superset of the allowed set) that the grammar
        allows, less ``refused``; False when none is left."""
        self._fill(ids, logits[ids])
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._array))
        kept = self._columns[: self._array.size, 1]
        if remember:
            self._remember(ids[np.isfinite(kept)])
        if refused:
            kept[np.isin(ids, refused)] = -np.inf
        return bool(np.isfinite(kept).any())

    def _refuses(self, ids: np.ndarray) -> np.ndarray:
        """Per id, whether the grammar refuses it here (one call; for the trie's search)."""
        self._fill(ids, np.zeros(len(ids), dtype=np.float32))
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._array))
        return ~np.isfinite(self._columns[: self._array.size, 1])

    def _remember(self, allowed: np.ndarray) -> None:
        """Keep the whole allowed set found at this point of the answer, for the next answer to
        the same schema that comes this way (tool names, keys: early positions repeat)."""
        known = self._known
        if known is None or self._path is None or len(allowed) > KnownSets.MAX_SET:
            return
        if len(known.paths) >= KnownSets.MAX_PATHS:
            known.paths.clear()
        known.paths[tuple(self._path)] = allowed.astype(np.int32)

    def _exact_candidates(self) -> np.ndarray | None:
        """All the tokens the grammar can allow now, when that is known without asking it about
        every token: at the first token (computed once per schema and model), and once a JSON
        object or array at the root has closed (only end-of-generation tokens: the root rule has
        nothing after its value)."""
        known = self._known
        if known is None:
            return None
        if self._steps == 0:
            return known.first
        if self._path is not None:
            found = known.paths.get(tuple(self._path))
            if found is not None:
                return found
        if known.closes and self._text.rstrip().endswith((b"}", b"]")):
            try:
                json.loads(self._text)
            except ValueError:
                return None
            return known.end
        return None

    def _apply_chain(self, chain: Any, *, remember: bool) -> None:
        """Top-k, then the rest of nbllm's chain (built without its top-k for this sampler): the
        same chain, with the k most likely ids remembered for a refusal's first look."""
        if self._top_k is not None:
            llama_cpp.llama_sampler_apply(self._top_k, ctypes.byref(self._array))
            if remember:
                self._top_ids = self._columns[: self._array.size, 0].view(np.int32).copy()
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(self._array))

    def _selected(self) -> int:
        index = self._array.selected
        if not 0 <= index < self._array.size:
            raise GenerationError("llama.cpp's sampler selected no token.")
        return int(self._data[index].id)

    def _allowed(self, token: int) -> bool:
        one = self._one[0]
        one.id, one.logit, one.p = token, 1.0, 0.0
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._one_array))
        return bool(np.isfinite(self._one[0].logit))

    def close(self) -> None:
        grammar = getattr(self, "_grammar", None)  # None too when __init__ failed
        if grammar:
            llama_cpp.llama_sampler_free(grammar)
            self._grammar = None
        top_k = getattr(self, "_top_k", None)
        if top_k:
            llama_cpp.llama_sampler_free(top_k)
            self._top_k = None

    def __del__(self) -> None:
        self.close()


def partial_characters_trusted(grammar: str) -> bool:
    """Whether ``grammar``'s refusal of a partial UTF-8 character means every character it could
    begin is refused: true unless a negated class excludes something outside ASCII (a non-ASCII
    character, or an escape that can name one). nbllm's own JSON and tool grammars exclude only
    quotes, backslashes and control characters."""
    for match in _NEGATED_CLASS.finditer(grammar):
        body = match.group(1)
        if any(ord(c) > 0x7F for c in body) or re.search(r"\\(x[89a-fA-F]|u|U)", body):
            return False
    return True


_NEGATED_CLASS = re.compile(r"\[\^((?:\\.|[^\]\\])*)\]")


def grammar_pieces(vocab: Any, n_vocab: int) -> list[bytes]:
    """Every token's text as llama.cpp's grammar reads it: special tokens rendered (the piece
    cache in llama-vocab.cpp), for the vocabulary's trie (token_trie.py)."""
    buffer = ctypes.create_string_buffer(256)
    pieces = []
    for token in range(n_vocab):
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
        if n < 0:  # longer than the buffer: -n bytes
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
        pieces.append(buffer.raw[: max(n, 0)])
    return pieces


def _margins(options: dict[str, Any], last_n: int) -> tuple[float, float]:
    """(base, per unit of the best logit): how far below the best allowed candidate's logit a
    candidate can lie and still be chosen by nbllm's chain (see ``GrammarSampler``)."""
    repeat, frequency, presence = (
        float(options[k]) for k in ("repeat_penalty", "frequency_penalty", "presence_penalty")
    )
    if repeat < 1.0 or frequency < 0.0 or presence < 0.0:  # penalties that raise logits: no bound
        return GrammarSampler.FAR, 0.0
    # How much the penalties can lower the best token: a logit L becomes L / repeat or
    # L * repeat (at most |L| * (repeat - 1) lower), minus frequency * count + presence.
    lowered = frequency * last_n + presence
    temp, min_p = float(options["temp"]), float(options["min_p"])
    if temp == 0:
        return lowered, repeat - 1.0  # greedy: nothing below the best (penalized) logit can win
    if temp > 0 and 0.0 < min_p <= 1.0:
        return math.log(1.0 / min_p) + lowered, repeat - 1.0
    return GrammarSampler.FAR + lowered, repeat - 1.0


class KnownSets:
    """Allowed-token sets of one grammar on one model that need no search (GrammarSampler):
    the first token's, the end's, and those found in full early in earlier answers, by the
    tokens before them (the grammar's state is a function of those tokens alone)."""

    PATH_DEPTH = 24  # tokens into an answer that its sets are kept for
    # Small sets are the costly ones to find (few tokens fit; a larger set is usually found
    # among the first candidates). At most 256 x 1,024 ids x 4 bytes = 1 MiB per schema.
    MAX_SET = 1024
    MAX_PATHS = 256

    def __init__(self, first: np.ndarray, end: np.ndarray, closes: bool) -> None:
        self.paths: dict[tuple[int, ...], np.ndarray] = {}
        self.first = first  # allowed as the first token
        self.end = end  # the end-of-generation tokens
        self.closes = closes  # the root is a JSON object or array: complete when it parses


def known_sets(vocab: Any, n_vocab: int, grammar: str, constraint: Constraint, end: np.ndarray) -> KnownSets:
    """The grammar asked once about every token at its start (tens of milliseconds, once per
    schema and model: the caller keeps the result)."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise SchemaError("llama.cpp could not parse the grammar made from the schema.")
    try:
        data = (llama_cpp.llama_token_data * n_vocab)()
        columns = np.frombuffer(data, dtype=np.float32).reshape(n_vocab, 3)
        columns[:, 0] = np.arange(n_vocab, dtype=np.int32).view(np.float32)
        columns[:, 1] = 0.0
        array = llama_cpp.llama_token_data_array(data, n_vocab, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
        kept = columns[: array.size]
        first = kept[np.isfinite(kept[:, 1]), 0].view(np.int32).copy()
    finally:
        llama_cpp.llama_sampler_free(sampler)
    root = constraint.schema
    framed = constraint.syntax is not None and constraint.syntax.framed  # the answer is more than the value
    closes = constraint.kind == "json" or (
        constraint.kind == "schema" and root.get("type") in ("object", "array") and "$ref" not in root
        and not any(k in root for k in ("anyOf", "oneOf", "allOf")) and not framed
    )  # fmt: skip
    return KnownSets(first, end, closes)
