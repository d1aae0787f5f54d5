"""The prompt cache: identical requests answered from disk, anything else a miss, faults harmless."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import nbllm
from nbllm.engine import Engine
from nbllm.testing import make_tiny_model

REQUEST = {"max_tokens": 12, "seed": 3}


def entries(engine: Engine) -> int:
    return len(engine.prompt_cache.entries())


def test_an_identical_request_is_answered_from_the_cache(cached_engine: Engine) -> None:
    first = cached_engine.generate("the model", **REQUEST)
    cached_engine.registry.unload_all()
    second = cached_engine.generate("the model", **REQUEST)
    assert not first.stats.cached
    assert second.stats.cached
    assert second.text == first.text
    assert second.stats.completion_tokens == first.stats.completion_tokens
    assert cached_engine.registry.resident() == [], "a hit never touches the model"
    snapshot = cached_engine.stats.snapshot()
    assert (snapshot["prompt_cache_hits"], snapshot["prompt_cache_misses"]) == (1, 1)


def test_a_hit_streams_the_same_pieces(cached_engine: Engine) -> None:
    original = cached_engine.generate("the model", stream=True, **REQUEST)
    pieces = list(original)
    replay = cached_engine.generate("the model", stream=True, **REQUEST)
    assert list(replay) == pieces
    assert replay.stats is not None
    assert replay.stats.cached


def test_chat_answers_are_cached_too(cached_engine: Engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    first = cached_engine.chat(messages, **REQUEST)
    assert cached_engine.chat(messages, **REQUEST).stats.cached
    assert cached_engine.chat(messages, **REQUEST).text == first.text


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.1},
        {"top_p": 0.5},
        {"top_k": 5},
        {"min_p": 0.2},
        {"max_tokens": 11},
        {"repeat_penalty": 1.3},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"seed": 4},
        {"stop": ["xyz"]},
        {"model": "tiny-b"},
        {"prompt": "the model."},
    ],
)
def test_any_change_in_the_request_is_a_miss(cached_engine: Engine, change: dict[str, object]) -> None:
    cached_engine.generate("the model", **REQUEST)
    request = {**REQUEST, **change}
    prompt = str(request.pop("prompt", "the model"))
    assert not cached_engine.generate(prompt, **request).stats.cached  # type: ignore[arg-type]


def test_no_seed_is_its_own_key_and_repeats_hit(cached_engine: Engine) -> None:
    first = cached_engine.generate("the model", max_tokens=8)
    again = cached_engine.generate("the model", max_tokens=8)
    assert again.stats.cached
    assert again.text == first.text
    assert not cached_engine.generate("the model", max_tokens=8, seed=first.stats.seed).stats.cached


def test_completion_and_chat_with_the_same_text_do_not_collide(cached_engine: Engine) -> None:
    cached_engine.generate("hi", **REQUEST)
    assert not cached_engine.chat("hi", **REQUEST).stats.cached


def test_a_different_context_size_is_a_miss(cached_engine: Engine) -> None:
    cached_engine.generate("the model", **REQUEST)
    cached_engine.configure(performance={"context_size": 256})
    assert not cached_engine.generate("the model", **REQUEST).stats.cached


def test_a_file_replaced_under_the_same_name_never_returns_old_answers(cached_engine: Engine, tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "swap.gguf", seed=20)
    old = cached_engine.generate("the", model=str(path), temperature=0, max_tokens=12)
    os.replace(make_tiny_model(tmp_path / "new.gguf", seed=21), path)
    new = cached_engine.generate("the", model=str(path), temperature=0, max_tokens=12)
    assert not new.stats.cached
    assert new.text != old.text
    assert new.stats.model_hash != old.stats.model_hash


def test_a_copy_under_another_name_hits_and_is_reported_under_its_own_name(
    cached_engine: Engine, tmp_path: Path
) -> None:
    """Entries are keyed by content, so a copy hits; its stats (and provenance) name the copy."""
    original = make_tiny_model(tmp_path / "original.gguf", seed=22)
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(original.read_bytes())
    first = cached_engine.generate("the", model=str(original), **REQUEST)
    again = cached_engine.generate("the", model=str(copy), **REQUEST)
    assert again.stats.cached
    assert (first.stats.model, again.stats.model) == ("original", "copy")
    assert again.stats.summary() == f"{again.stats.completion_tokens} tokens from the prompt cache in " + (
        f"{again.stats.total_seconds * 1000:.1f} ms"
    )


def test_least_recently_used_entries_are_dropped_first(cached_engine: Engine) -> None:
    cached_engine.configure(cache={"prompt_cache_size": 3})
    for prompt in ("a", "b", "c"):
        cached_engine.generate(prompt, **REQUEST)
    assert cached_engine.generate("a", **REQUEST).stats.cached  # "a" is now the most recent
    cached_engine.generate("d", **REQUEST)
    assert entries(cached_engine) == 3
    assert cached_engine.generate("a", **REQUEST).stats.cached
    assert cached_engine.generate("c", **REQUEST).stats.cached
    assert cached_engine.generate("d", **REQUEST).stats.cached
    assert not cached_engine.generate("b", **REQUEST).stats.cached, "b was the least recently used"


def test_cache_false_and_the_config_switch_bypass_it(cached_engine: Engine) -> None:
    cached_engine.generate("the model", **REQUEST)
    assert not cached_engine.generate("the model", cache=False, **REQUEST).stats.cached
    cached_engine.configure(cache={"enabled": False})
    assert not cached_engine.generate("the model", **REQUEST).stats.cached
    assert entries(cached_engine) == 1, "bypassed requests are not stored either"


def test_clear_cache_empties_it(global_engine: Engine) -> None:
    nbllm.configure(cache={"enabled": True})
    nbllm.generate("the model", **REQUEST)
    assert nbllm.stats()["cache"]["entries"] == 1
    nbllm.clear_cache()
    assert nbllm.stats()["cache"]["entries"] == 0
    assert not nbllm.generate("the model", **REQUEST).stats.cached


def test_stopped_and_interrupted_answers_are_never_stored(cached_engine: Engine) -> None:
    stream = cached_engine.generate("the", stream=True, max_tokens=100, seed=1)
    for i, _ in enumerate(stream):
        if i == 2:
            stream.stop()
    assert stream.stats is not None
    assert stream.stats.finish_reason == "cancelled"
    stream = cached_engine.generate("the", stream=True, max_tokens=100, seed=1)
    next(stream)
    stream.close()
    assert entries(cached_engine) == 0
    assert not cached_engine.generate("the", max_tokens=100, seed=1).stats.cached


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_entry_is_a_logged_miss_never_a_wrong_answer(
    cached_engine: Engine, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    first = cached_engine.generate("the model", **REQUEST)
    [entry] = cached_engine.prompt_cache.entries()
    output = entry / "output.pkl"
    data = output.read_bytes()
    output.write_bytes({"garbage": b"\x80\x04not a pickle", "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="nbllm"):
        again = cached_engine.generate("the model", **REQUEST)
        cached_engine.generate("the model", max_tokens=5, seed=99)
    assert not again.stats.cached
    assert again.text == first.text
    warnings = [r for r in caplog.records if "damaged prompt-cache entry" in r.getMessage()]
    assert len(warnings) == 1
    assert cached_engine.generate("the model", **REQUEST).stats.cached, "the entry was written anew"


def test_an_unwritable_cache_folder_turns_the_cache_off_with_one_warning(
    settings: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    engine = Engine(settings.merged({"cache": {"enabled": True, "directory": str(blocker / "cache")}}))  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="nbllm"):
        first = engine.generate("the", **REQUEST)
        second = engine.generate("the", **REQUEST)
    assert first.text
    assert second.text
    assert not second.stats.cached
    warnings = [r for r in caplog.records if "Prompt cache turned off" in r.getMessage()]
    assert len(warnings) == 1
    assert engine.cache_stats()["disabled_reason"]
    engine.close()


def test_stats_report_hits_misses_entries_bytes_and_time_saved(global_engine: Engine) -> None:
    nbllm.configure(cache={"enabled": True})
    nbllm.generate("the model", max_tokens=40, seed=1)
    nbllm.generate("the model", max_tokens=40, seed=1)
    stats = nbllm.stats()
    assert stats["prompt_cache_hits"] == 1
    assert stats["prompt_cache_misses"] == 1
    assert stats["cache"]["entries"] == 1
    assert stats["cache"]["bytes_on_disk"] > 0
    assert stats["prompt_cache_seconds_saved"] > 0
    assert stats["last_request"]["cached"] is True


def test_the_log_says_prompt_cache_hit(cached_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    cached_engine.generate("the model", **REQUEST)
    with caplog.at_level(logging.INFO, logger="nbllm"):
        cached_engine.generate("the model", **REQUEST)
    assert "Prompt cache hit" in [r.getMessage() for r in caplog.records]


WRITER = textwrap.dedent(
    """
    import sys
    from nbllm.core.config import Settings
    from nbllm.engine import Engine

    model, folder, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    engine = Engine(Settings().merged({
        "performance": {"context_size": 256, "batch_size": 64},
        "cache": {"directory": folder, "prompt_cache_size": 1000},
    }))
    for i in range(start, start + 30):
        engine.generate(f"the {i}", model=model, max_tokens=6, seed=i, temperature=0.9)
    print("done")
    """
)


def test_two_processes_writing_one_cache_leave_it_consistent(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "shared-cache"
    model = str(tiny_models["a"])
    # Overlapping ranges: both processes write the same entries at the same time, too.
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, model, str(folder), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for start in (0, 15)
    ]
    for writer in writers:
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
        assert out.strip() == "done"
    from nbllm.core.config import Settings

    engine = Engine(
        Settings().merged({"performance": {"context_size": 256, "batch_size": 64}, "cache": {"directory": str(folder)}})
    )
    assert len(engine.prompt_cache.entries()) == 45
    for i in range(45):
        hit = engine.generate(f"the {i}", model=model, max_tokens=6, seed=i, temperature=0.9)
        fresh = engine.generate(f"the {i}", model=model, max_tokens=6, seed=i, temperature=0.9, cache=False)
        assert hit.stats.cached, i
        assert hit.text == fresh.text, i
    engine.close()
