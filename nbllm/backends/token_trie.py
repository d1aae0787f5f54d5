"""The vocabulary as a trie of token pieces, for finding the few tokens a grammar allows.

When a grammar allows only a handful of tokens (a key's name, a tool's name, the quote that
opens a string) and the model wants something else, the allowed tokens can lie anywhere in
the vocabulary. Asking the grammar about every token costs ~10 ms on a 49k vocabulary
(~50 ms on 262k); searching down the logits until nothing unseen could win costs as much when
the allowed tokens are unlikely ones.

A token's text is accepted by llama.cpp's grammar only if every prefix of it that ends on a
whole character is (the grammar reads a token one character at a time). A prefix that ends
inside a UTF-8 character is such evidence only where no negated class of the grammar excludes
a character outside ASCII: the grammar tests it as a partial character, which [^é] refuses for
the whole range (à included). Under such a grammar these prefixes are not asked about; their
subtrees are searched below them. So the grammar is asked about
the tokens that are themselves prefixes of many others: the single bytes first, then, under
each accepted one, its longer prefixes. Every subtree under a refused prefix is left out
without asking about its tokens. What remains is a small superset of the allowed tokens,
which the grammar then checks in one call: the exact allowed set, in about a tenth of a
millisecond per level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# The first bytes of every piece are kept as a table (children of shallow prefixes in numpy);
# deeper ones, under fewer tokens, are read from the pieces themselves.
DEPTH = 4
# At this depth (bytes) a subtree is a leaf whatever its size (runs of blank space are long).
MAX_DEPTH = 64
# A subtree this small is taken whole rather than asked about prefix by prefix, once its
# prefix was allowed; one whose prefix could not be asked about, only when smaller still.
LEAF = 24
UNASKED_LEAF = 2


class TokenTrie:
    """Token ids sorted by their pieces' first bytes, so that every prefix's tokens are one range.

    ``pieces``: each token's text as the grammar reads it (llama.cpp's token_to_piece with
    special tokens rendered). ``always``: tokens the grammar decides on without reading their
    text (end-of-generation tokens), always returned as candidates. Tokens whose text is empty
    or starts with a NUL byte are never allowed by the grammar and are left out; those whose
    text is not UTF-8 (not even an unfinished character at the end) are always candidates,
    since what the grammar makes of their bytes is not a prefix relation.
    """

    def __init__(self, pieces: Sequence[bytes], always: Sequence[int]) -> None:
        always_set = {int(t) for t in always}
        lengths = np.fromiter(map(len, pieces), dtype=np.int32, count=len(pieces))
        heads = np.frombuffer(b"".join(p[:DEPTH].ljust(DEPTH, b"\0") for p in pieces), dtype=np.uint8)
        grid = heads.reshape(len(pieces), DEPTH).astype(np.int16)
        grid[np.arange(DEPTH) >= lengths[:, None]] = -1  # past a piece's end: sorts before every byte
        usable = np.ones(len(pieces), dtype=bool)
        usable[list(always_set)] = False
        usable &= grid[:, 0] > 0  # empty, or a NUL first: llama.cpp's grammar refuses these outright
        # Each piece decoded once: whole characters, or an unfinished one at the end, or not UTF-8.
        kinds = {t: _utf8_kind(pieces[t]) for t in np.flatnonzero(usable).tolist()}
        odd = [t for t, kind in kinds.items() if kind == "odd"]
        usable[odd] = False
        # Sorted by piece: every prefix's tokens are one range, the prefix's own token first.
        ordered = sorted(np.flatnonzero(usable).tolist(), key=pieces.__getitem__)
        self.size = len(pieces)
        self._ids = np.array(ordered, dtype=np.int32)
        self._pieces = [pieces[t] for t in ordered]
        self._lengths = lengths[self._ids]
        self._grid = grid[self._ids]
        # Whether a token's text is whole characters: only those are asked about (module docstring).
        self._whole = np.array([kinds[t] == "whole" for t in ordered], dtype=bool)
        self._always = np.array(sorted(always_set | set(odd)), dtype=np.int32)
        # (lo, hi, depth) -> the node's children as arrays (lo, hi, probe token or -1)
        self._children: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    def candidates(
        self, refuses: Callable[[np.ndarray], np.ndarray], budget: int, *, partial: bool = False
    ) -> np.ndarray | None:
        """A superset of the tokens the grammar allows now, or None when it would hold more than
        ``budget`` tokens (the allowed set is large; a search by logits finds it faster).

        ``refuses(ids)`` asks the grammar about ``ids`` (one call) and says, per id, whether it
        is refused. The grammar must not be inside an unfinished UTF-8 character. ``partial``:
        its refusal of a prefix that ends inside a character can be trusted too (no negated
        class of the grammar excludes a character outside ASCII: partial_characters_trusted),
        which saves splitting the ranges under such prefixes."""
        found = [self._always]
        total = len(self._always)
        if not len(self._ids):  # a vocabulary of special, empty or broken pieces only
            return np.array(self._always)
        frontier = [(0, len(self._ids), 0)]
        while frontier:
            los, his, probes, depths = [], [], [], []
            for lo, hi, depth in frontier:
                child_lo, child_hi, child_probe, child_whole = self._children_of(lo, hi, depth)
                los.append(child_lo)
                his.append(child_hi)
                probes.append(child_probe if partial else np.where(child_whole, child_probe, -1))
                depths.append(np.full(len(child_lo), depth + 1, dtype=np.int32))
            lo_all, hi_all, probe_all = np.concatenate(los), np.concatenate(his), np.concatenate(probes)
            depth_all = np.concatenate(depths)
            keep = np.ones(len(lo_all), dtype=bool)
            asked = np.flatnonzero(probe_all >= 0)
            if len(asked):
                keep[asked] = ~refuses(probe_all[asked])
            size = hi_all - lo_all
            # First and last piece no longer than the prefix: copies of one piece, nothing below.
            copies = (self._lengths[lo_all] <= depth_all) & (self._lengths[hi_all - 1] <= depth_all)
            # A small range is taken whole once the grammar has said yes to its prefix; one it could
            # not be asked about (no token is exactly the prefix, or the prefix ends inside a
            # character) is split further, down to ranges of a few tokens, to be asked below.
            small = np.where(probe_all >= 0, size <= LEAF, size <= UNASKED_LEAF)
            leaf = keep & (small | (depth_all >= MAX_DEPTH) | copies)
            total += int(size[leaf].sum())
            if total > budget:
                return None
            found.extend(self._ids[lo:hi] for lo, hi in zip(lo_all[leaf].tolist(), hi_all[leaf].tolist(), strict=True))
            deeper = keep & ~leaf
            frontier = list(
                zip(lo_all[deeper].tolist(), hi_all[deeper].tolist(), depth_all[deeper].tolist(), strict=True)
            )
        # In id order, as llama.cpp's grammar-first pass sees them: a sampler that keeps the order
        # (no top-k, no top-p) draws the same token for a seed.
        return np.sort(np.concatenate(found))

    def _children_of(self, lo: int, hi: int, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The ranges under a prefix of ``depth`` bytes, one per next byte (the prefix's own
        token, if any, as a range of one), each with the token that is exactly its prefix (or
        -1), and whether that token's text is whole characters."""
        key = (lo, hi, depth)
        known = self._children.get(key)
        if known is not None:
            return known
        if depth < DEPTH:
            column = self._grid[lo:hi, depth]
        else:
            column = np.array([p[depth] if len(p) > depth else -1 for p in self._pieces[lo:hi]], dtype=np.int16)
        starts = np.flatnonzero(np.concatenate(([True], column[1:] != column[:-1]))) + lo
        ends = np.append(starts[1:], hi)
        # The shortest piece of a range comes first: it is the range's prefix exactly when it is
        # no longer than the depth reached.
        probes = np.where(self._lengths[starts] <= depth + 1, self._ids[starts], -1).astype(np.int32)
        known = (starts.astype(np.int64), ends.astype(np.int64), probes, self._whole[starts])
        self._children[key] = known
        return known


def _utf8_kind(piece: bytes) -> str:
    """ "whole" (UTF-8 characters), "prefix" (an unfinished character at the end) or "odd"."""
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError as error:
        unfinished = error.reason == "unexpected end of data" and error.end == len(piece)
        return "prefix" if unfinished else "odd"
    return "whole"
