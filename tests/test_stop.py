"""Stop sequences over streamed text: never show part of a stop sequence, never lose text."""

from __future__ import annotations

import random

import pytest

from nbllm.core.stop import StopMatcher


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


def test_text_held_back_as_a_possible_stop_is_shown_when_the_stream_ends() -> None:
    from nbllm.core.stop import TextAssembler

    text = TextAssembler(["\nQuestion:"], trim=False)
    assert text.feed(b"Paris.\nQue") == ("Paris.", False)
    assert text.finish() == "\nQue"


def test_chat_text_is_trimmed_at_both_ends_and_utf8_is_joined_across_tokens() -> None:
    from nbllm.core.stop import TextAssembler

    text = TextAssembler([], trim=True)
    shown = [text.feed(piece)[0] for piece in (b"  ", b"caf", b"\xc3", b"\xa9", b" ", b"ok", b"\n\n")]
    assert "".join(shown) + text.finish() == "café ok"


def test_blank_space_before_a_stop_sequence_is_not_shown_in_a_trimmed_answer() -> None:
    from nbllm.core.stop import TextAssembler

    # Gemma, through the transcript format, ends an answer with "\n\n" then "Question:".
    text = TextAssembler(["\nQuestion:"], trim=True)
    shown = [text.feed(piece) for piece in (b"\n", b"Docker", b" runs", b".", b"\n\n", b"Question", b":")]
    assert "".join(part for part, _ in shown) == "Docker runs."
    assert shown[-1][1] is True
    ended = TextAssembler(["\nQuestion:"], trim=True)
    pieces = [ended.feed(piece)[0] for piece in (b"Yes", b" \n", b"\n")]
    assert "".join(pieces) + ended.finish() == "Yes"
