"""The vocabulary's trie (backends/token_trie.py): how a constrained answer finds the few tokens
a grammar allows without asking about every token. It must never leave an allowed token out
(the answer would then differ from llama.cpp's grammar-first sampling), and it must keep the
candidates few where few are allowed (the reason it exists).

Checked against llama.cpp's own grammar on real vocabularies: each model's tokenizer, a tool
call's grammar, walked token by token through a valid answer, at every step comparing the
trie's candidates with the grammar asked about the whole vocabulary.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from nbllm.backends.llama_cpp_grammar import grammar_pieces, grammar_text, partial_characters_trusted
from nbllm.backends.token_trie import TokenTrie
from nbllm.core.tools import make_toolset


def get_weather(city: str, unit: str = "C") -> str:
    """The weather in a city."""
    return city


def add_event(title: str, hour: int) -> str:
    """Put an event in the calendar."""
    return title


ANSWERS = [
    '[{"name": "get_weather", "arguments": {"city": "Zürich — 東京", "unit": "F"}}]',
    '[\n  {\n    "name": "add_event",\n    "arguments": {"title": "Lunch \\"at 1\\"", "hour": 13}\n  }\n]',
]


class Grammar:
    """llama.cpp's grammar sampler on a vocabulary, asked about ids as the trie asks."""

    def __init__(self, vocab: object, n_vocab: int, text: str) -> None:
        self.n_vocab = n_vocab
        self.sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
        assert self.sampler
        self.data = (llama_cpp.llama_token_data * n_vocab)()
        self.columns = np.frombuffer(self.data, dtype=np.float32).reshape(n_vocab, 3)

    def allowed(self, ids: np.ndarray) -> np.ndarray:
        self.columns[: len(ids), 0] = ids.astype(np.int32).view(np.float32)
        self.columns[: len(ids), 1] = 0.0
        array = llama_cpp.llama_token_data_array(self.data, len(ids), -1, False)
        llama_cpp.llama_sampler_apply(self.sampler, ctypes.byref(array))
        return np.isfinite(self.columns[: len(ids), 1])

    def refuses(self, ids: np.ndarray) -> np.ndarray:
        return ~self.allowed(ids)

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.sampler, token)

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)


@pytest.fixture(scope="module", params=["default", "gemma", "tiny"])
def vocabulary(
    request: pytest.FixtureRequest, default_model_path: Path, gemma_model_path: Path, tiny_models: dict[str, Path]
) -> Iterator[tuple[llama_cpp.Llama, TokenTrie]]:
    path = {"default": default_model_path, "gemma": gemma_model_path, "tiny": tiny_models["a"]}[request.param]
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    vocab, n_vocab = llm._model.vocab, llm.n_vocab()
    ends = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    yield llm, TokenTrie(grammar_pieces(vocab, n_vocab), ends)
    llm.close()


@pytest.mark.parametrize("answer", ANSWERS)
def test_the_candidates_hold_every_allowed_token_and_few_others(
    vocabulary: tuple[llama_cpp.Llama, TokenTrie], answer: str
) -> None:
    llm, trie = vocabulary
    n_vocab = llm.n_vocab()
    constraint = make_toolset([get_weather, add_event], "required").constraint()
    assert constraint is not None
    text = grammar_text(constraint)
    assert partial_characters_trusted(text), "nbllm's JSON grammars exclude only ASCII characters"
    grammar = Grammar(llm._model.vocab, n_vocab, text)
    everything = np.arange(n_vocab, dtype=np.int32)
    pieces = grammar_pieces(llm._model.vocab, n_vocab)
    rest, text, small_sets, checked, steps = answer.encode(), b"", 0, 0, 0
    try:
        while rest:
            allowed_ids = everything[grammar.allowed(everything)]
            try:
                text.decode("utf-8")
            except UnicodeDecodeError:
                pass  # inside a character: the sampler does not use the trie here
            else:
                candidates = trie.candidates(grammar.refuses, budget=n_vocab, partial=True)
                assert candidates is not None
                missing = set(allowed_ids.tolist()) - set(candidates.tolist())
                assert not missing, f"after {text!r} the trie left out allowed tokens {sorted(missing)[:10]}"
                checked += 1
                if len(allowed_ids) <= 8:
                    small_sets += 1
                    few = max(256, n_vocab // 100)  # measured: ~330-360 of 49k, up to ~680 of 262k
                    assert len(candidates) <= few, f"after {text!r}: {len(candidates)} for {len(allowed_ids)} allowed"
            # The answer, written with the longest allowed token at each step (any vocabulary).
            fitting = [t for t in allowed_ids.tolist() if pieces[t] and rest.startswith(pieces[t])]
            assert fitting, f"no token writes {rest[:10]!r} after {text!r}"
            token = max(fitting, key=lambda t: len(pieces[t]))
            grammar.accept(token)
            text, rest, steps = text + pieces[token], rest[len(pieces[token]) :], steps + 1
    finally:
        grammar.close()
    assert checked >= steps // 2
    assert small_sets >= 5, "a tool call has many positions where few tokens fit (keys, names)"


def test_a_budget_too_small_for_the_allowed_set_gives_up_rather_than_search_on(
    vocabulary: tuple[llama_cpp.Llama, TokenTrie],
) -> None:
    llm, trie = vocabulary
    # A free string: almost every token fits; the search by logits is the faster one there.
    grammar = Grammar(llm._model.vocab, llm.n_vocab(), 'root ::= [^"]*')
    try:
        assert trie.candidates(grammar.refuses, budget=256) is None
    finally:
        grammar.close()


def test_tokens_the_grammar_reads_specially_are_always_or_never_candidates() -> None:
    """End tokens are always candidates (the grammar decides on them without their text); empty
    pieces and a NUL first never (llama.cpp refuses them); bytes that are not UTF-8 always."""
    pieces = [b"", b"\x00x", b"a", b"ab", b"abc", b"abd", b"b", b"\xff\xfe", b"\xe4", b"\xe4\xb8\x9c", b"</s>", b"ab"]
    trie = TokenTrie(pieces, always=[10])
    assert trie.size == len(pieces)

    def refuse_all_but_a(ids: np.ndarray) -> np.ndarray:
        return np.array([not pieces[t].startswith(b"a") for t in ids.tolist()])

    found = trie.candidates(refuse_all_but_a, budget=100)
    assert found is not None
    # a's subtree (with the duplicate 'ab'), the odd bytes, </s>, and \xe4's subtree: a prefix that
    # ends inside a character is never asked about, so it prunes nothing.
    assert set(found.tolist()) == {2, 3, 4, 5, 11, 7, 10, 8, 9}
    assert list(found) == sorted(found), "in id order, as the grammar-first pass sees them"
    assert TokenTrie([b"", b"\x00"], always=[]).candidates(refuse_all_but_a, budget=10).tolist() == []


def test_a_negated_class_refusing_a_partial_character_prunes_nothing(
    vocabulary: tuple[llama_cpp.Llama, TokenTrie],
) -> None:
    """[^é] refuses the partial character \xc3 (its range holds é) though à is allowed: the trie
    must not drop \xc3's subtree on that refusal."""
    llm, trie = vocabulary
    n_vocab = llm.n_vocab()
    assert not partial_characters_trusted('root ::= [^é"] "x"')
    assert not partial_characters_trusted("root ::= [^\\xe9]")
    grammar = Grammar(llm._model.vocab, n_vocab, 'root ::= [^é"] "x"')
    try:
        everything = np.arange(n_vocab, dtype=np.int32)
        allowed = set(everything[grammar.allowed(everything)].tolist())
        candidates = trie.candidates(grammar.refuses, budget=n_vocab)
    finally:
        grammar.close()
    assert candidates is not None
    assert allowed <= set(candidates.tolist())
    # Where the vocabulary has "à" or "àx" as a token, the grammar allows it (so the case above
    # was met, and the trie kept it).
    pieces = grammar_pieces(llm._model.vocab, n_vocab)
    grave = {t for t, piece in enumerate(pieces) if piece in ("à".encode(), "àx".encode())}
    assert grave <= allowed
