"""KV prefix reuse across requests: a long shared context is evaluated once, even with other prompts between."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nbllm.core.config import Settings
from nbllm.core.prefix_cache import PrefixCache, Snapshot, common_prefix
from nbllm.engine import Engine

CONTEXT = " ".join(f"the model {i} and the cache" for i in range(60))  # a few hundred tokens


@pytest.fixture
def long_engine(settings: Settings) -> Engine:
    return Engine(settings.merged({"performance": {"context_size": 2048, "batch_size": 256}}))


def ask(engine: Engine, question: str) -> object:
    return engine.generate(f"{CONTEXT}\n{question}", max_tokens=8, temperature=0)


def test_a_shared_context_is_reused_after_an_unrelated_prompt(long_engine: Engine) -> None:
    first = ask(long_engine, "question one")
    long_engine.generate("something else entirely", max_tokens=4, temperature=0)
    second = ask(long_engine, "question two")
    third = ask(long_engine, "question three")
    context_tokens = first.stats.prompt_tokens - 5  # type: ignore[attr-defined]
    assert first.stats.reused_prompt_tokens < 10  # type: ignore[attr-defined]
    assert second.stats.reused_prompt_tokens >= context_tokens  # type: ignore[attr-defined]
    assert third.stats.reused_prompt_tokens >= context_tokens  # type: ignore[attr-defined]
    assert long_engine.stats.snapshot()["reused_prompt_tokens"] >= 2 * context_tokens


def test_restored_prefixes_give_exactly_the_answers_of_a_fresh_model(long_engine: Engine, settings: Settings) -> None:
    ask(long_engine, "question one")
    long_engine.generate("something else entirely", max_tokens=4, temperature=0)
    reused = [ask(long_engine, q).text for q in ("question two", "question three")]  # type: ignore[attr-defined]
    fresh_engine = Engine(
        settings.merged({"performance": {"context_size": 2048, "batch_size": 256}, "cache": {"prefix_cache_bytes": 0}})
    )
    fresh = []
    for question in ("question two", "question three"):
        fresh_engine.registry.unload_all()  # no KV state at all
        fresh.append(ask(fresh_engine, question).text)  # type: ignore[attr-defined]
    assert reused == fresh
    fresh_engine.close()


def test_without_snapshots_an_unrelated_prompt_loses_the_context(settings: Settings) -> None:
    engine = Engine(
        settings.merged({"performance": {"context_size": 2048, "batch_size": 256}, "cache": {"prefix_cache_bytes": 0}})
    )
    ask(engine, "question one")
    engine.generate("something else entirely", max_tokens=4, temperature=0)
    assert ask(engine, "question two").stats.reused_prompt_tokens < 10  # type: ignore[attr-defined]
    engine.close()


def test_snapshots_stay_within_their_byte_budget(long_engine: Engine) -> None:
    ask(long_engine, "question one")
    long_engine.generate("something else entirely", max_tokens=4, temperature=0)
    one_snapshot = long_engine.cache_stats()["prefix_snapshot_bytes"]
    assert one_snapshot > 0
    budget = int(one_snapshot * 1.5)
    long_engine.configure(cache={"prefix_cache_bytes": budget})
    for i in range(4):
        long_engine.generate(f"variant {i} {CONTEXT}", max_tokens=2, temperature=0)
        long_engine.generate("unrelated", max_tokens=2, temperature=0)
        assert long_engine.cache_stats()["prefix_snapshot_bytes"] <= budget


def test_clear_cache_drops_the_snapshots(long_engine: Engine) -> None:
    ask(long_engine, "question one")
    long_engine.generate("something else entirely", max_tokens=4, temperature=0)
    assert long_engine.cache_stats()["prefix_snapshots"] == 1
    long_engine.clear_cache()
    assert long_engine.cache_stats()["prefix_snapshots"] == 0
    assert ask(long_engine, "question two").stats.reused_prompt_tokens < 10  # type: ignore[attr-defined]


def test_time_saved_by_reuse_is_estimated_from_measured_prompt_speed(long_engine: Engine) -> None:
    ask(long_engine, "question one")
    long_engine.generate("something else entirely", max_tokens=4, temperature=0)
    ask(long_engine, "question two")
    assert long_engine.stats.snapshot()["prefix_seconds_saved"] > 0


def tokens(*values: int) -> np.ndarray:  # type: ignore[type-arg]
    return np.asarray(values, dtype=np.int32)


def test_common_prefix_lengths() -> None:
    assert common_prefix(tokens(1, 2, 3), tokens(1, 2, 4)) == 2
    assert common_prefix(tokens(1, 2), tokens(1, 2, 3)) == 2
    assert common_prefix(tokens(), tokens(1)) == 0
    assert common_prefix(tokens(5), tokens(1)) == 0


def snap(*values: int, size: int = 100) -> Snapshot:
    return Snapshot(tokens(*values), bytearray(size), size)


def test_the_longest_shared_prefix_wins() -> None:
    cache = PrefixCache(max_bytes=10_000, min_tokens=1)
    cache.add(snap(1, 2, 3))
    cache.add(snap(1, 2, 9, 9))
    best, length = cache.best(tokens(1, 2, 9, 7))
    assert best is not None
    assert length == 3
    assert list(best.tokens) == [1, 2, 9, 9]


def test_size_counts_the_state_and_the_tokens() -> None:
    s = snap(1, 2, 3, size=1000)
    assert s.nbytes == 1000 + 3 * 4


def test_least_recently_used_snapshots_go_first() -> None:
    cache = PrefixCache(max_bytes=2 * (100 + 8) + 10, min_tokens=1)
    cache.add(snap(1, 1))
    cache.add(snap(2, 2))
    cache.best(tokens(1, 1, 5))  # touches the first
    cache.add(snap(3, 3))
    kept = sorted(int(s.tokens[0]) for s in cache._snapshots.values())
    assert kept == [1, 3]
    assert cache.evicted == 1


def test_an_extending_snapshot_replaces_its_prefix_and_covered_ones_are_not_saved() -> None:
    cache = PrefixCache(max_bytes=10_000, min_tokens=2)
    cache.add(snap(1, 2))
    cache.add(snap(1, 2, 3, 4))
    assert len(cache) == 1
    assert not cache.worth_saving(tokens(1, 2, 3))
    assert not cache.worth_saving(tokens(7)), "below min_tokens"
    assert cache.worth_saving(tokens(1, 2, 5))


def test_a_snapshot_larger_than_the_budget_is_not_kept() -> None:
    cache = PrefixCache(max_bytes=50, min_tokens=1)
    cache.add(snap(1, size=100))
    assert len(cache) == 0


def test_files_are_not_touched(tmp_path: Path) -> None:
    # Snapshots live in memory only: nothing is written next to the model or the cache.
    assert list(tmp_path.iterdir()) == []
