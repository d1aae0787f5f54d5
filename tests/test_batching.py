"""Many prompts at once: generate_many / chat_many and batched streams, on tiny models."""

from __future__ import annotations

import _thread
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import nbllm
from nbllm.core.config import Settings
from nbllm.core.errors import ContextLengthError, InsufficientMemoryError, ParameterError
from nbllm.engine import BatchInterrupted, Engine, ManyResult


@pytest.fixture
def batch_engine(settings: Settings) -> Engine:
    return Engine(settings.merged({"performance": {"parallel": 4, "parallel_context_size": 256}}))


PROMPTS = [f"the model {i} and the cache" for i in range(10)]


def test_results_come_back_in_input_order_with_their_stats(batch_engine: Engine) -> None:
    results = batch_engine.generate_many(PROMPTS, max_tokens=8, seed=3, progress=False)
    assert [r.index for r in results] == list(range(10))
    assert all(r.ok and r.stats is not None for r in results)
    assert all(0 < r.stats.completion_tokens <= 8 for r in results if r.stats)
    assert all(r.stats.prompt_tokens > 0 for r in results if r.stats)
    assert all(r.stats.model == "tiny-a" for r in results if r.stats)
    assert batch_engine.stats.snapshot()["requests"] == 10


def test_at_temperature_zero_the_text_is_the_same_as_one_at_a_time(batch_engine: Engine) -> None:
    batched = [r.text for r in batch_engine.generate_many(PROMPTS, max_tokens=16, temperature=0, progress=False)]
    single = [batch_engine.generate(p, max_tokens=16, temperature=0).text for p in PROMPTS]
    assert batched == single


def test_per_item_parameters_and_seeds_are_honoured(batch_engine: Engine) -> None:
    per_item = [{"seed": 100 + i, "max_tokens": 4 + i, "temperature": 1.0} for i in range(6)]
    results = batch_engine.generate_many(PROMPTS[:6], per_item=per_item, progress=False)
    for result, item in zip(results, per_item, strict=True):
        assert result.stats is not None
        assert result.stats.seed == item["seed"]
        assert result.stats.completion_tokens <= item["max_tokens"]
        one = batch_engine.generate(PROMPTS[result.index], **item)
        assert result.text == one.text, "the same sampler chain and seed as a single stream"


def test_prompt_cache_hits_never_enter_the_batch(settings: Settings) -> None:
    engine = Engine(settings.merged({"cache": {"enabled": True}, "performance": {"parallel": 4}}))
    first = engine.generate_many(PROMPTS[:5], max_tokens=6, seed=1, progress=False)
    engine.registry.unload_all()
    again = engine.generate_many(PROMPTS[:5], max_tokens=6, seed=1, progress=False)
    assert [r.text for r in again] == [r.text for r in first]
    assert all(r.stats is not None and r.stats.cached for r in again)
    assert engine.registry.resident() == [], "all hits: the model was never needed"
    mixed = engine.generate_many(PROMPTS[:7], max_tokens=6, seed=1, progress=False)
    assert [bool(r.stats and r.stats.cached) for r in mixed] == [True] * 5 + [False] * 2
    engine.close()


def test_an_empty_input_gives_an_empty_result(batch_engine: Engine) -> None:
    assert batch_engine.generate_many([], progress=False) == []
    assert batch_engine.registry.resident() == []


def test_one_item_that_cannot_run_gets_its_own_error_and_the_others_complete(batch_engine: Engine) -> None:
    prompts = [*PROMPTS[:3], " ".join(["model"] * 400), *PROMPTS[3:5]]
    results = batch_engine.generate_many(prompts, max_tokens=6, seed=1, progress=False)
    assert [r.ok for r in results] == [True, True, True, False, True, True]
    assert isinstance(results[3].error, ContextLengthError)
    assert "batched sequence holds 256" in str(results[3].error)
    assert "parallel_context_size" in str(results[3].error)


def test_bad_input_is_a_clear_error_before_any_work(batch_engine: Engine) -> None:
    with pytest.raises(ParameterError, match="must be a list"):
        batch_engine.generate_many("just one string", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="top_p = 3"):
        batch_engine.generate_many(PROMPTS, top_p=3, progress=False)
    with pytest.raises(ParameterError, match="one dict of parameters per prompt"):
        batch_engine.generate_many(PROMPTS, per_item=[{}], progress=False)
    assert batch_engine.registry.resident() == []


def test_results_can_be_received_as_soon_as_each_is_done(batch_engine: Engine) -> None:
    seen: list[ManyResult] = []
    results = batch_engine.generate_many(PROMPTS, max_tokens=6, seed=2, progress=False, on_result=seen.append)
    assert sorted(r.index for r in seen) == list(range(10))
    assert {id(r) for r in seen} == {id(r) for r in results}


def test_an_interrupt_stops_the_batch_and_keeps_what_finished(batch_engine: Engine) -> None:
    def interrupt_after_two(result: ManyResult) -> None:
        done.append(result)
        if len(done) == 2:
            raise KeyboardInterrupt

    done: list[ManyResult] = []
    with pytest.raises(BatchInterrupted) as caught:
        batch_engine.generate_many(
            PROMPTS * 3, max_tokens=200, temperature=1.0, seed=1, progress=False, on_result=interrupt_after_two
        )
    results = caught.value.results
    assert len(results) == 30
    assert all(results[r.index].ok for r in done), "what finished is kept"
    assert sum(r.ok for r in results) < 30
    assert all(r.error is not None for r in results if not r.ok)
    # The model is free again, and answers.
    assert batch_engine.generate("the", max_tokens=3, seed=1).stats.completion_tokens > 0


def test_an_interrupt_while_the_prompts_are_still_being_checked_stops_the_batch_too(batch_engine: Engine) -> None:
    """Ctrl-C can land before any prompt runs (checking hundreds of them takes a moment): the
    same BatchInterrupted, every result cancelled, the model free."""

    class InterruptedAtFive(list[dict[str, object]]):
        def __getitem__(self, index: Any) -> Any:
            if index == 5:
                raise KeyboardInterrupt
            return super().__getitem__(index)

    with pytest.raises(BatchInterrupted) as caught:
        batch_engine.generate_many(PROMPTS, max_tokens=4, progress=False, per_item=InterruptedAtFive([{}] * 10))
    results = caught.value.results
    assert [r.index for r in results] == list(range(10))
    assert not any(r.ok for r in results)
    assert batch_engine.generate("the", max_tokens=3, seed=1).stats.completion_tokens > 0


def test_a_real_kernel_interrupt_stops_the_batch(batch_engine: Engine) -> None:
    main = threading.main_thread()
    assert threading.current_thread() is main

    def interrupt_soon() -> None:
        time.sleep(0.3)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_soon, daemon=True).start()
    started = time.perf_counter()
    with pytest.raises(BatchInterrupted):
        batch_engine.generate_many(PROMPTS * 20, max_tokens=400, temperature=1.0, ignore_eos=True, progress=False)
    assert time.perf_counter() - started < 20, "stopped promptly"
    assert batch_engine.generate("the", max_tokens=3, seed=1).stats.completion_tokens > 0


def test_chat_many_answers_conversations(batch_engine: Engine) -> None:
    conversations = ["hi", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]]
    results = batch_engine.chat_many(conversations, model="tiny-chat", max_tokens=6, seed=1, progress=False)
    single = batch_engine.chat(conversations[1], model="tiny-chat", max_tokens=6, seed=1)
    assert all(r.ok for r in results)
    assert results[1].text == single.text


def test_concurrent_batched_streams_decode_together_and_stay_separate(batch_engine: Engine) -> None:
    expected = {i: batch_engine.generate(PROMPTS[i], max_tokens=20, seed=i, temperature=1.0).text for i in range(6)}
    got: dict[int, str] = {}

    def client(i: int) -> None:
        request = batch_engine.make_request(prompt=PROMPTS[i], params={"max_tokens": 20, "seed": i, "temperature": 1.0})
        got[i] = "".join(batch_engine.stream(request, batched=True))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert got == expected


def test_a_batched_stream_is_answered_from_the_prompt_cache_under_the_name_asked_for(
    settings: Settings, tiny_models: dict[str, Path]
) -> None:
    """The server's path (batched streams) consults the prompt cache like every other."""
    engine = Engine(settings.merged({"performance": {"parallel": 2}, "cache": {"enabled": True}}))
    try:
        request = engine.make_request(prompt="the", params={"max_tokens": 6, "seed": 4})
        first = engine.stream(request, batched=True)
        text = "".join(first)
        again = engine.stream(request, batched=True)
        assert "".join(again) == text
        assert again.stats is not None
        assert again.stats.cached
        assert again.stats.model == "tiny-a"
    finally:
        engine.close()


def test_a_batched_stream_closed_early_is_cancelled(batch_engine: Engine) -> None:
    request = batch_engine.make_request(prompt="the", params={"max_tokens": 300, "ignore_eos": True, "seed": 1})
    stream = batch_engine.stream(request, batched=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert stream.stats is not None
    assert stream.stats.finish_reason == "cancelled"
    assert batch_engine.generate("the", max_tokens=3, seed=1).stats.completion_tokens > 0


def test_batch_memory_per_sequence_is_reported_and_bounded(batch_engine: Engine, tiny_models: dict[str, Path]) -> None:
    batch_engine.generate("the", max_tokens=2, seed=1)
    [resident] = batch_engine.health()["resident_models"]
    batch = resident["batch"]
    assert batch["parallel"] == 4
    assert batch["context_per_sequence"] == 256
    assert batch["kv_bytes_per_sequence"] == 256 * 2 * 2 * (16 + 16) * 2
    assert batch["kv_bytes"] == 4 * batch["kv_bytes_per_sequence"]
    batch_engine.configure(performance={"parallel": 256, "parallel_context_size": 1 << 20})
    with pytest.raises(InsufficientMemoryError, match=r"Lower performance\.parallel"):
        batch_engine.generate_many(PROMPTS[:2], model=str(_huge_kv_model(tiny_models)), progress=False)


def _huge_kv_model(tiny_models: dict[str, Path]) -> Path:
    from nbllm.testing import make_tiny_model

    path = tiny_models["a"].parent / "wide-kv.gguf"
    if not path.exists():
        make_tiny_model(path, n_layer=16, n_head=4, n_head_kv=4, context_length=1 << 20)
    return path


def test_the_facade_exposes_generate_many(global_engine: Engine) -> None:
    results = nbllm.generate_many(PROMPTS[:3], max_tokens=4, seed=1, progress=False)
    assert [r.index for r in results] == [0, 1, 2]
    assert all(isinstance(r.text, str) for r in results)
    chats = nbllm.chat_many(["hi", "hello"], max_tokens=4, seed=1, progress=False)
    assert len(chats) == 2


# ---------------------------------------------------------------------------- shared prefixes

# Longer than the tests' batch size (64 tokens; ~100 on the tiny models), so the first sequence reads it over two steps
# while the others wait for it.
INSTRUCTION = "Read the text below about the model and the cache. " * 2


def _reading_tokens(engine: Engine, text: str) -> int:
    resident = engine.registry.load(None)
    return resident.model.count_tokens(nbllm.core.chat_format.FormattedPrompt(text))


def test_prompts_that_begin_alike_read_the_shared_part_once_and_answer_as_one_at_a_time(
    batch_engine: Engine,
) -> None:
    prompts = [f"{INSTRUCTION}Text {i}: the cache {i}." for i in range(10)]
    shared = _reading_tokens(batch_engine, INSTRUCTION) - 1  # its last token may merge with what follows
    batched = batch_engine.generate_many(prompts, max_tokens=12, temperature=0, progress=False)
    single = [batch_engine.generate(p, max_tokens=12, temperature=0).text for p in prompts]
    assert [r.text for r in batched] == single
    reused = [r.stats.reused_prompt_tokens for r in batched if r.stats]
    assert reused[0] == 0, "the first prompt has nothing to start from"
    assert all(n >= shared for n in reused[1:]), reused
    assert all(n < r.stats.prompt_tokens for n, r in zip(reused, batched, strict=True) if r.stats)
    again = batch_engine.generate_many(prompts, max_tokens=12, temperature=0, progress=False)
    assert [r.text for r in again] == single, "a second run starts from what the first left, or from nothing"


def test_sampled_answers_from_a_shared_prefix_keep_their_seeds(batch_engine: Engine) -> None:
    prompts = [f"{INSTRUCTION}Text {i}." for i in range(6)]
    per_item = [{"seed": 7 + i, "temperature": 1.0, "max_tokens": 10} for i in range(6)]
    batched = batch_engine.generate_many(prompts, per_item=per_item, progress=False)
    assert sum(r.stats.reused_prompt_tokens for r in batched if r.stats) > 0
    for result, item in zip(batched, per_item, strict=True):
        assert result.text == batch_engine.generate(prompts[result.index], **item).text


class _CancelledOnSecondLook(threading.Event):
    """Admitted (the first look, in ``_admit``), then gone before its first step (the second, in
    ``_drop_cancelled``): deterministic, as long as the loop looks at the flag just there."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= 2 or super().is_set()


def test_a_prompt_waiting_for_a_shared_prefix_reads_it_itself_when_the_reader_leaves(batch_engine: Engine) -> None:
    """Driven through the backend's batch loop with a feed filled beforehand, so that the three
    prompts are admitted together: 1 and 2 wait for 0, which leaves before reading anything."""
    import queue

    from nbllm.backends.base import BatchItem, BatchProgress
    from nbllm.core.chat_format import FormattedPrompt

    prompts = [f"{INSTRUCTION}Text {i}." for i in range(3)]
    expected = [batch_engine.generate(p, max_tokens=8, temperature=0).text for p in prompts]
    shared = _reading_tokens(batch_engine, INSTRUCTION) - 1
    texts: dict[int, list[str]] = {0: [], 1: [], 2: []}
    params = batch_engine.make_request(prompt="x", params={"max_tokens": 8, "temperature": 0}).params

    def sink(event: Any) -> None:
        if event.kind == "piece":
            texts[event.item.key].append(event.text)

    items = [BatchItem(i, FormattedPrompt(p), params, 0, sink) for i, p in enumerate(prompts)]
    items[0].cancel = _CancelledOnSecondLook()
    feed: queue.SimpleQueue[BatchItem | None] = queue.SimpleQueue()
    for item in items:
        feed.put(item)
    model = batch_engine.registry.load(None).model
    model.run_batch(feed, threading.Event(), BatchProgress(), lambda: True, parallel=4, seq_context=256)
    assert items[0].usage.finish_reason == "cancelled"
    assert {items[1].usage.finish_reason, items[2].usage.finish_reason} <= {"length", "stop"}
    assert ["".join(texts[i]) for i in (1, 2)] == expected[1:]
    assert items[1].usage.reused_prompt_tokens == 0, "its reader left: it read the prompt itself"
    assert items[2].usage.reused_prompt_tokens >= shared, "then waited for 1 instead"


def test_more_sequences_than_a_batch_holds_still_decode_together(settings: Settings) -> None:
    """Each step carries a token of every generating sequence: a batch_size below parallel used
    to write past llama.cpp's batch (and abort the process)."""
    engine = Engine(settings.merged({"performance": {"parallel": 8, "batch_size": 4, "parallel_context_size": 128}}))
    try:
        results = engine.generate_many(PROMPTS[:8], max_tokens=6, ignore_eos=True, temperature=0, progress=False)
        assert all(r.ok and r.stats is not None and r.stats.completion_tokens == 6 for r in results)
    finally:
        engine.close()
