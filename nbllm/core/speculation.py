"""Speculative decoding by prompt lookup: what to draft, and whether drafting pays.

Answers in notebooks often copy their input (a summary quotes it, an extraction lifts names,
an edit rewrites code with small changes). When the last few tokens of the text so far (prompt
and answer) occurred before, the tokens that followed them then are a good guess for what
comes next. The model checks such a guess (a "draft") in one decode of several tokens: the
answer keeps each drafted token the model itself samples there, and the first one it does not
sample is replaced by the token it did. Every token is still sampled by the model from its own
distribution, in order, by the same sampler, with the same random numbers: the answer is the
one it would have been without drafting, only the number of decodes changes. (To the letter
where llama.cpp gives a decode of several tokens the logits single tokens get; where its
kernels differ, as they do on a CPU past 256 tokens of context, the logits differ in rounding
and an exact near-tie may go the other way, as it may when a prompt is read in other batches.)

Drafting is not free: on a CPU a decode of 8 tokens costs ~4.5x one of a single token (2 cores,
a 135M model), so a draft pays only when most of it is kept. ``DraftPolicy`` decides per step,
from what it measures during the request: how often the lookup's guesses were right (also when
nothing was drafted: the next token shows whether the guess would have been kept) and what a
decode of each size costs on this machine (``DecodeCosts``, kept per model). Free writing,
where the guesses are poor, drafts nothing and costs only the lookup (microseconds a token).

Pure Python, no llama.cpp: the backend's loop (backends/llama_cpp_speculative.py) uses these.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

# The n-grams looked up: the last 2 to 4 tokens. A single token repeats too often to predict
# anything; longer matches are found through the 4-gram.
SHORTEST_NGRAM = 2
LONGEST_NGRAM = 4
MOST_DRAFTED = 16  # tokens drafted at most per step
# The draft policy's key for guesses from a draft model (n-gram keys are their lengths, 2-4).
DRAFT_MODEL = 1
# Prompts longer than this are indexed from their end only (the part an answer copies most).
INDEXED_PROMPT_TOKENS = 16_384


class NgramIndex:
    """For each n-gram of the text so far, where its most recent occurrence was followed.

    ``draft(count)`` looks up the text's last n tokens (longest first) and returns what followed
    their latest earlier occurrence, with the n that matched; adding a token is O(n)."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens: list[int] = []
        self._follower: list[dict[tuple[int, ...], int]] = [{} for _ in range(LONGEST_NGRAM + 1)]
        for token in tokens[-INDEXED_PROMPT_TOKENS:]:
            self.append(token)

    def append(self, token: int) -> None:
        tokens = self.tokens
        tokens.append(token)
        end = len(tokens) - 1  # the new token's position: it follows each n-gram ending just before
        for n in range(SHORTEST_NGRAM, LONGEST_NGRAM + 1):
            if end >= n:
                self._follower[n][tuple(tokens[end - n : end])] = end

    def draft(self, count: int) -> tuple[list[int], int]:
        """Up to ``count`` guessed next tokens, and the length of the n-gram that matched (0:
        none did, nothing to guess)."""
        tokens = self.tokens
        for n in range(LONGEST_NGRAM, SHORTEST_NGRAM - 1, -1):
            if len(tokens) < n:
                continue
            start = self._follower[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + count], n
        return [], 0


class DecodeCosts:
    """Seconds per decode by its number of tokens, measured on this machine for one model.

    A size not measured yet is estimated optimistically, so that the policy tries it and the
    estimate becomes a measurement: between two measured sizes on the straight line through
    them; past the largest at the cheapest cost per extra token seen between measured sizes
    (on a CPU small batches cost nearly a decode per token and larger ones much less, as
    llama.cpp switches from one matrix kernel to another); with only one size measured, half a
    single decode per extra token."""

    SMOOTHING = 0.2

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}

    def observe(self, size: int, seconds: float) -> None:
        old = self._seconds.get(size)
        self._seconds[size] = seconds if old is None else old + self.SMOOTHING * (seconds - old)

    def seconds(self, size: int) -> float | None:
        """The estimated cost of a decode of ``size`` tokens (None before any was measured)."""
        known = self._seconds
        if size in known:
            return known[size]
        if not known:
            return None
        sizes = sorted(known)
        below = [s for s in sizes if s < size]
        above = [s for s in sizes if s > size]
        if not below:
            return known[sizes[0]]
        low = below[-1]
        if above:
            high = above[0]
            return known[low] + (known[high] - known[low]) * (size - low) / (high - low)
        if len(sizes) == 1:
            return known[low] * (1 + 0.5 * (size - low) / low)
        steps = [(known[b] - known[a]) / (b - a) for a, b in itertools.pairwise(sizes)]
        return known[low] + max(min(steps), 0.0) * (size - low)


class DraftPolicy:
    """How many guessed tokens to draft at each step of one answer (0: none).

    With ``p`` the measured chance that a guessed token is kept (per n-gram length, starting
    at ``PRIOR``), a draft of k tokens yields 1 + p + ... + p^k tokens on average for the cost
    of a decode of k + 1; the policy picks the k with the most tokens per second, 0 included.
    """

    PRIOR = 0.5  # an unproven guess: not worth a draft on a CPU until the text shows it is
    # A draft model was chosen for agreeing with its target (same family, same vocabulary):
    # trusted more at first, then measured like the rest.
    MODEL_PRIOR = 0.7
    SMOOTHING = 0.3  # three right guesses in a row make a draft worth it on a 2-core CPU
    # Never plan on more: a run of kept guesses ends where the copied passage does, and a chance
    # of 1 would draft the most tokens every time (a 16-token draft costs 8 single decodes).
    MOST_LIKELY = 0.95

    def __init__(self, costs: DecodeCosts, most: int = MOST_DRAFTED) -> None:
        self._costs = costs
        self._most = most
        self._kept = dict.fromkeys(range(SHORTEST_NGRAM, LONGEST_NGRAM + 1), self.PRIOR)
        self._kept[DRAFT_MODEL] = self.MODEL_PRIOR
        self.drafted = 0  # tokens drafted in this answer
        self.accepted = 0  # of those, kept

    def length(self, matched: int, available: int, seconds_per_guess: float = 0.0) -> int:
        """Tokens to draft when an n-gram of ``matched`` tokens (or ``DRAFT_MODEL``) can give
        ``available`` guesses, each costing ``seconds_per_guess`` to make (a draft model's decode;
        a lookup's guesses are free)."""
        if matched == 0 or available == 0:
            return 0
        single = self._costs.seconds(1)
        if single is None:
            return 0
        p = min(self._kept[matched], self.MOST_LIKELY)
        best, best_rate = 0, 1.0 / single
        expected, chance = 1.0, 1.0
        for k in range(1, min(self._most, available) + 1):
            chance *= p
            expected += chance
            cost = self._costs.seconds(k + 1)
            if cost is None:
                continue
            rate = expected / (cost + k * seconds_per_guess)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def could_pay(self, available: int, seconds_per_guess: float) -> bool:
        """Whether a draft of up to ``available`` guesses would pay if they were as right as
        guesses ever are (``MOST_LIKELY``): if not, trying one only to measure is a waste."""
        saved = self._kept[DRAFT_MODEL]
        self._kept[DRAFT_MODEL] = self.MOST_LIKELY
        try:
            return self.length(DRAFT_MODEL, available, seconds_per_guess) > 0
        finally:
            self._kept[DRAFT_MODEL] = saved

    def observe(self, matched: int, drafted: int, accepted: int) -> None:
        """A draft of ``drafted`` guesses from an n-gram of ``matched`` tokens kept ``accepted``."""
        self.drafted += drafted
        self.accepted += accepted
        # Each kept guess is a success; the first refused one (if any) a failure.
        for kept in [True] * accepted + ([False] if accepted < drafted else []):
            self._learn(matched, kept)

    def observe_guess(self, matched: int, kept: bool) -> None:
        """A guess not drafted, checked against the token the model sampled: free evidence."""
        self._learn(matched, kept)

    def _learn(self, matched: int, kept: bool) -> None:
        old = self._kept[matched]
        self._kept[matched] = old + self.SMOOTHING * ((1.0 if kept else 0.0) - old)
