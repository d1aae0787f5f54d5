"""Stop sequences over streamed text: never show part of a stop sequence, never lose text."""

from __future__ import annotations

import random

import pytest

from nbllm.stop import StopMatcher


def run(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    shown = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        shown.append(text)
        if stopped:
            return "".join(shown), True
    return "".join(shown) + matcher.flush(), False


def test_no_stops_passes_text_through() -> None:
    assert run(["a", "b"], []) == ("ab", False)


def test_a_stop_split_across_pieces_is_caught_and_never_shown() -> None:
    matcher = StopMatcher(["\nQuestion:"])
    assert matcher.feed("Paris.\nQue") == ("Paris.", False)
    assert matcher.feed("stion: next") == ("", True)


def test_a_false_start_is_released_once_it_cannot_match() -> None:
    matcher = StopMatcher(["\nQuestion:"])
    assert matcher.feed("a\nQu") == ("a", False)
    assert matcher.feed("ite") == ("\nQuite", False)


def test_the_earliest_of_several_stops_wins() -> None:
    assert run(["one END two STOP"], ["STOP", "END"]) == ("one ", True)


def test_held_back_text_is_flushed_at_the_end() -> None:
    assert run(["text\nQue"], ["\nQuestion:"]) == ("text\nQue", False)


@pytest.mark.parametrize("seed", range(20))
def test_any_split_of_the_text_gives_the_same_result(seed: int) -> None:
    rng = random.Random(seed)
    text = "alpha beta\nQuestion: gamma" if seed % 2 else "alpha beta gamma delta"
    cuts = sorted(rng.sample(range(1, len(text)), 5))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    expected = ("alpha beta", True) if seed % 2 else (text, False)
    assert run(pieces, ["\nQuestion:"]) == expected
