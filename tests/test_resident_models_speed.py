"""Resident models must not slow each other down (issue 16, part 1).

llama.cpp's OpenMP build keeps a thread team per thread that has decoded, for as long as that
thread lives; idle teams make every other team's barriers sleep instead of spin once they
outnumber the CPUs (nbllm/backends/compute_thread.py). Two checks: the mechanism itself (no
thread outlives its request, counted by the kernel, so no timing noise), and what users see
(a model's speed after two other models were used, as a ratio to its speed alone, with a
margin wide enough for a shared machine: the regression it guards against was 0.6x-0.85x on
the default model and far worse on tiny ones).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbllm.core.config import Settings
from nbllm.engine import Engine
from nbllm.measure.bench import bench

TASKS = Path("/proc/self/task")


@pytest.fixture
def three_resident(settings: Settings) -> Iterator[Engine]:
    engine = Engine(
        settings.merged({"cache": {"model_cache_size": 3}, "performance": {"threads": 2, "context_size": 512}})
    )
    yield engine
    engine.close()


def os_threads() -> int:
    return len(os.listdir(TASKS))


def settle(expected: int, seconds: float = 5.0) -> int:
    """The process's OS thread count once it stops dropping to ``expected`` (threads end a
    moment after their job's result is delivered)."""
    deadline = time.monotonic() + seconds
    count = os_threads()
    while count > expected and time.monotonic() < deadline:
        time.sleep(0.02)
        count = os_threads()
    return count


@pytest.mark.skipif(not TASKS.is_dir(), reason="counts OS threads through /proc (Linux)")
def test_no_thread_or_thread_team_outlives_its_request(three_resident: Engine) -> None:
    three_resident.generate("warm", model="tiny-a", max_tokens=2)  # the process's own pools, if any
    before = settle(0, seconds=0.5)
    for name in ("tiny-a", "tiny-b", "tiny-c"):
        three_resident.generate("Once upon a time", model=name, max_tokens=8, temperature=0)
        three_resident.generate("Once upon a time", model=name, max_tokens=8, temperature=0, stream=True).result()
    three_resident.generate_many(["one", "two", "three"], model="tiny-b", max_tokens=4, progress=False)
    bench(three_resident, "tiny-c", pp=16, tg=8, repetitions=1, progress=False)  # timed decodes
    assert len(three_resident.registry.resident()) == 3
    # Each model decoded with 2 threads: a long-lived thread per model would leave 3 x 2 here.
    assert settle(before) == before


def decode_rate(engine: Engine, model: str) -> float:
    result = engine.generate("Once upon a time", model=model, max_tokens=300, temperature=0, ignore_eos=True)
    return float(result.stats.generation_tokens_per_second)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two thread teams contend only on two or more CPUs")
def test_a_model_keeps_its_speed_after_others_were_used(three_resident: Engine) -> None:
    ratios = []
    for _round in range(5):  # alternated, so that machine noise hits both alike; a median of 5 outlasts a hiccup
        three_resident.registry.unload_all()
        decode_rate(three_resident, "tiny-c")  # warm
        alone = decode_rate(three_resident, "tiny-c")
        for other in ("tiny-a", "tiny-b"):
            three_resident.generate("Hi", model=other, max_tokens=4)
        assert len(three_resident.registry.resident()) == 3
        ratios.append(decode_rate(three_resident, "tiny-c") / alone)
    assert statistics.median(ratios) >= 0.8, ratios
