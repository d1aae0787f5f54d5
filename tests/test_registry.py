"""Model residency: names, LRU eviction by count and bytes, explicit close, thread safety."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from nbllm.core import paths
from nbllm.core.config import Settings
from nbllm.core.errors import InsufficientMemoryError, ModelNotFoundError
from nbllm.core.fit import estimate_memory
from nbllm.core.gguf_file import read_gguf
from nbllm.engine import Engine
from nbllm.host import machine
from nbllm.testing import make_tiny_model


def resident_names(engine: Engine) -> list[str]:
    return [r.name for r in engine.registry.resident()]


def test_least_recently_used_model_is_evicted_and_closed(engine: Engine) -> None:
    engine.generate("the", model="tiny-a", max_tokens=2, seed=1)
    first = engine.registry.resident()[0]
    engine.generate("the", model="tiny-b", max_tokens=2, seed=1)
    engine.generate("the", model="tiny-a", max_tokens=2, seed=1)  # a is now the most recent
    engine.generate("the", model="tiny-c", max_tokens=2, seed=1)
    assert resident_names(engine) == ["tiny-a", "tiny-c"]
    assert engine.stats.snapshot()["evictions"] == 1
    assert first.name == "tiny-a"
    assert not first.closed


def test_evicted_model_is_closed_explicitly(engine: Engine) -> None:
    engine.generate("the", model="tiny-a", max_tokens=2, seed=1)
    victim = engine.registry.resident()[0]
    llama = victim.model._llm  # type: ignore[attr-defined]
    engine.generate("the", model="tiny-b", max_tokens=2, seed=1)
    engine.generate("the", model="tiny-c", max_tokens=2, seed=1)
    assert victim.closed
    # Llama.close() freed the llama.cpp model and context: the C pointers are gone.
    assert llama._model.model is None
    assert llama._ctx.ctx is None


def test_asking_for_a_resident_model_does_not_reload_it(engine: Engine) -> None:
    engine.generate("the", max_tokens=2, seed=1)
    for _ in range(5):
        engine.generate("the", max_tokens=2, seed=1)
    assert engine.stats.snapshot()["model_loads"] == 1


def test_a_lower_cache_size_applies_at_once(engine: Engine) -> None:
    engine.generate("the", model="tiny-a", max_tokens=2, seed=1)
    engine.generate("the", model="tiny-b", max_tokens=2, seed=1)
    engine.configure(cache={"model_cache_size": 1})
    assert resident_names(engine) == ["tiny-b"]
    engine.configure(cache={"model_cache_size": 3})
    for name in ("tiny-a", "tiny-b", "tiny-c"):
        engine.generate("the", model=name, max_tokens=2, seed=1)
    assert len(engine.registry.resident()) == 3


def test_byte_budget_evicts_until_the_new_model_fits(engine: Engine, tiny_models: dict[str, Path]) -> None:
    engine.registry.load("tiny-a")
    engine.registry.load("tiny-b")
    sizes = {r.name: r.memory.total for r in engine.registry.resident()}
    needed_c = estimate_memory(read_gguf(tiny_models["c"]), 512, 64).total
    # Room for tiny-c plus tiny-b, not for all three.
    budget = sizes["tiny-b"] + needed_c
    assert budget < sizes["tiny-a"] + sizes["tiny-b"] + needed_c
    engine.configure(cache={"model_cache_size": 5, "model_cache_bytes": budget})
    engine.registry.load("tiny-c")
    assert resident_names(engine) == ["tiny-b", "tiny-c"]


def test_a_model_bigger_than_the_byte_budget_is_refused_with_advice(engine: Engine) -> None:
    engine.configure(cache={"model_cache_bytes": "1MB"})
    with pytest.raises(InsufficientMemoryError) as caught:
        engine.registry.load("tiny-a")
    message = str(caught.value)
    assert "cache.model_cache_bytes" in message
    assert "performance.context_size" in message


def test_a_model_that_cannot_fit_in_ram_is_refused_before_loading(tmp_path: Path) -> None:
    # A real tiny model whose KV cache at a long context needs more than this machine's RAM.
    per_token_per_layer = 2 * 2 * 64  # (K + V) x f16 x 64 dims
    context = 1 << 24
    layers = int(machine.total_memory() * 1.5 / (context * per_token_per_layer)) + 1
    path = make_tiny_model(
        tmp_path / "long.gguf", n_layer=layers, n_embd=64, n_head=4, n_head_kv=4, context_length=context
    )
    engine = Engine(Settings().merged({"performance": {"context_size": context}}))
    with pytest.raises(InsufficientMemoryError) as caught:
        engine.generate("the", model=str(path), max_tokens=2)
    message = str(caught.value)
    assert "KV cache" in message
    assert "RAM is available" in message
    assert "Lower performance.context_size" in message
    assert engine.registry.resident() == []


def test_names_resolve_from_config_models_dir_and_paths(engine: Engine, tiny_models: dict[str, Path]) -> None:
    assert engine.registry.resolve("tiny-b").path == tiny_models["b"]
    assert engine.registry.resolve(str(tiny_models["c"])).source == "path"
    paths.models_dir().mkdir(parents=True, exist_ok=True)
    local = paths.models_dir() / "local-one.gguf"
    shutil.copy(tiny_models["a"], local)
    try:
        spec = engine.registry.resolve("local-one")
        assert spec.path == local
        assert spec.source == "models-dir"
        assert "local-one" in engine.registry.known_names()
    finally:
        local.unlink()


def test_unknown_name_suggests_the_closest_known_one(engine: Engine) -> None:
    with pytest.raises(ModelNotFoundError, match=r"Did you mean 'gemma-3-270m'\? Known: smollm2-135m, gemma-3-270m, "):
        engine.registry.resolve("gemma-3-207m")


def test_missing_file_is_a_clear_error(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        engine.generate("the", model=str(tmp_path / "nope.gguf"))
    broken = engine.configure(models={"gone": str(tmp_path / "gone.gguf")})
    assert "gone" in broken.models
    with pytest.raises(ModelNotFoundError, match=r"Fix models.gone"):
        engine.generate("the", model="gone")


def test_a_file_replaced_under_the_same_name_is_reloaded(engine: Engine, tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "swap.gguf", seed=10)
    before = engine.generate("the", model=str(path), max_tokens=12, seed=1, temperature=0).text
    replacement = make_tiny_model(tmp_path / "other.gguf", seed=11)
    os.replace(replacement, path)
    after = engine.generate("the", model=str(path), max_tokens=12, seed=1, temperature=0).text
    assert engine.stats.snapshot()["model_loads"] == 2
    assert before != after


def test_changed_load_settings_reload_the_model_on_next_use(engine: Engine) -> None:
    engine.generate("the", max_tokens=2, seed=1)
    engine.configure(performance={"context_size": 256})
    engine.generate("the", max_tokens=2, seed=1)
    [resident] = engine.registry.resident()
    assert resident.settings.context_size == 256
    assert engine.stats.snapshot()["model_loads"] == 2


def test_unload_closes_and_forgets(engine: Engine) -> None:
    engine.registry.load("tiny-a")
    assert engine.registry.unload("tiny-a") is True
    assert engine.registry.resident() == []
    assert engine.registry.unload("tiny-a") is False


def test_listing_shows_resident_state_size_and_use(engine: Engine) -> None:
    engine.generate("the", model="tiny-b", max_tokens=2, seed=1)
    rows = {row.name: row for row in engine.registry.rows()}
    assert rows["tiny-b"].resident
    assert (rows["tiny-b"].size_bytes or 0) > 0
    assert rows["tiny-b"].load_seconds is not None
    assert rows["tiny-b"].last_used is not None
    assert not rows["tiny-a"].resident
    assert rows["smollm2-135m"].source == rows["gemma-3-270m"].source == "default"


def test_many_threads_over_more_models_than_fit_never_crash(engine: Engine) -> None:
    engine.configure(cache={"model_cache_size": 1})
    expected = {name: engine.generate("the", model=name, max_tokens=8, seed=5).text for name in ("tiny-a", "tiny-b")}
    failures: list[str] = []

    def work(name: str) -> None:
        for _ in range(4):
            text = engine.generate("the", model=name, max_tokens=8, seed=5).text
            if text != expected[name]:
                failures.append(f"{name}: {text!r} != {expected[name]!r}")

    threads = [threading.Thread(target=work, args=(name,)) for name in ("tiny-a", "tiny-b") * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures
    assert len(engine.registry.resident()) == 1
