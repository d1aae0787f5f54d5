"""The one generation path, on real llama.cpp with tiny generated models."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from nbllm.core.errors import ConfigError, ContextLengthError, ModelNotFoundError, ParameterError
from nbllm.engine import Completion, Engine, Stream


def test_generate_returns_text_and_stats(engine: Engine) -> None:
    result = engine.generate("the model", max_tokens=12, seed=1)
    assert isinstance(result, Completion)
    assert str(result) == result.text
    stats = result.stats
    assert stats.model == "tiny-a"
    assert 0 < stats.completion_tokens <= 12
    assert stats.prompt_tokens > 0
    assert stats.total_seconds >= stats.time_to_first_token > 0
    assert stats.finish_reason in ("stop", "length")
    assert stats.seed == 1
    assert stats.summary().startswith(f"Generated {stats.completion_tokens} tokens in ")
    assert stats.summary().endswith(" t/s)")


def test_stream_yields_pieces_that_make_up_the_text(engine: Engine) -> None:
    stream = engine.generate("the model", stream=True, max_tokens=16, seed=2)
    assert isinstance(stream, Stream)
    assert stream.stats is None, "stats exist only once the stream has ended"
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == stream.text
    assert stream.stats is not None
    assert stream.stats.completion_tokens == 16 or stream.stats.finish_reason == "stop"


def test_same_seed_same_text_and_other_seed_other_text(engine: Engine) -> None:
    first = engine.generate("the", max_tokens=24, seed=7, temperature=1.0).text
    again = engine.generate("the", max_tokens=24, seed=7, temperature=1.0).text
    other = engine.generate("the", max_tokens=24, seed=8, temperature=1.0).text
    assert first == again
    assert first != other


def test_no_seed_draws_one_and_records_it_for_reproduction(engine: Engine) -> None:
    result = engine.generate("the", max_tokens=16, temperature=1.0)
    assert result.stats.seed is not None
    replay = engine.generate("the", max_tokens=16, temperature=1.0, seed=result.stats.seed)
    assert replay.text == result.text


def test_max_tokens_bounds_the_answer(engine: Engine) -> None:
    result = engine.generate("the", max_tokens=5, seed=3)
    assert result.stats.completion_tokens <= 5
    assert result.stats.finish_reason in ("length", "stop")


def test_stop_sequence_ends_the_answer_before_it(engine: Engine) -> None:
    free = engine.generate("the", max_tokens=40, seed=11, temperature=0).text
    # Stop at a word from the middle of the greedy answer: it must not appear in the result.
    words = [w for w in free.split() if len(w) > 2]
    assert words, f"the tiny model produced no words: {free!r}"
    stop = words[len(words) // 2]
    stopped = engine.generate("the", max_tokens=40, seed=11, temperature=0, stop=[stop])
    assert stop not in stopped.text
    assert free.startswith(stopped.text)
    assert stopped.stats.finish_reason == "stop"


def test_stop_from_another_thread_ends_the_stream_within_a_token(engine: Engine) -> None:
    stream = engine.generate("the", stream=True, max_tokens=400, seed=1, stop=None)
    for received, _ in enumerate(stream, start=1):
        if received == 3:
            threading.Thread(target=stream.stop).start()
            time.sleep(0.05)
    assert stream.stats is not None
    assert stream.stats.finish_reason == "cancelled"
    assert stream.stats.completion_tokens < 400
    # The model is free and usable afterwards.
    assert engine.generate("the", max_tokens=4, seed=1).stats.completion_tokens > 0


def test_leaving_a_stream_early_frees_the_model(engine: Engine) -> None:
    stream = engine.generate("the", stream=True, max_tokens=200, seed=1)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert stream.stats is not None
    assert stream.stats.finish_reason == "cancelled"
    assert engine.generate("the", max_tokens=4, seed=1).text is not None


def test_keyboard_interrupt_mid_stream_keeps_the_model_usable(engine: Engine) -> None:
    stream = engine.generate("the", stream=True, max_tokens=200, seed=1)

    def consume_until_interrupted() -> None:
        for i, _ in enumerate(stream):
            if i == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        consume_until_interrupted()
    stream.close()
    assert stream.stats is not None
    assert stream.stats.finish_reason == "cancelled"
    assert engine.stats.snapshot()["cancelled"] == 1
    again = engine.generate("the", max_tokens=8, seed=1, temperature=0)
    fresh = engine.generate("the", max_tokens=8, seed=1, temperature=0)
    assert again.text == fresh.text


def test_an_abandoned_stream_does_not_block_the_next_request_on_the_same_thread(engine: Engine) -> None:
    abandoned = engine.generate("the", stream=True, max_tokens=200, seed=1)
    next(abandoned)  # holds the model's lock, then is forgotten
    result = engine.generate("the", max_tokens=4, seed=1)
    assert result.stats.completion_tokens > 0
    assert abandoned.stats is not None
    assert abandoned.stats.finish_reason == "cancelled"


def test_concurrent_requests_on_one_model_are_serialized_and_correct(engine: Engine) -> None:
    expected = {seed: engine.generate("the", max_tokens=20, seed=seed).text for seed in range(4)}
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            results[seed] = engine.generate("the", max_tokens=20, seed=seed).text
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert results == expected


def test_different_models_stream_in_parallel(engine: Engine) -> None:
    first = engine.generate("the", stream=True, max_tokens=50, seed=1, model="tiny-a")
    second = engine.generate("the", stream=True, max_tokens=50, seed=1, model="tiny-b")
    # Interleaving two live streams needs two separate locks: this would deadlock otherwise.
    a, b = iter(first), iter(second)
    next(a)
    next(b)
    rest = "".join(a), "".join(b)
    assert first.stats is not None
    assert second.stats is not None
    assert all(isinstance(part, str) for part in rest)


def test_chat_uses_a_transcript_for_a_model_without_template(engine: Engine) -> None:
    model = engine.registry.load("tiny-a").model
    formatted = model.format_chat([{"role": "user", "content": "hi"}])
    assert formatted.text == "Question: hi\nAnswer:"
    assert "\nQuestion:" in formatted.stop
    result = engine.chat("hi", max_tokens=10, seed=1)
    assert result.text == result.text.strip()


def test_chat_uses_the_gguf_template_when_the_file_has_one(engine: Engine) -> None:
    model = engine.registry.load("tiny-chat").model
    formatted = model.format_chat([{"role": "user", "content": "hi"}])
    assert formatted.text == "<s><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert formatted.special
    assert not formatted.add_bos, "the template already holds the BOS token"
    assert engine.chat("hi", model="tiny-chat", max_tokens=6, seed=1).stats.completion_tokens > 0


def test_repeated_prompt_reuses_the_kv_prefix(engine: Engine) -> None:
    engine.generate("the model and the cache", max_tokens=2, seed=1)
    again = engine.generate("the model and the cache and more", max_tokens=2, seed=1)
    assert again.stats.reused_prompt_tokens >= 5


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"temperature": -1}, "temperature = -1"),
        ({"top_p": 1.5}, "top_p = 1.5"),
        ({"max_tokens": 0}, "max_tokens = 0"),
        ({"top_k": -3}, "top_k = -3"),
        ({"seed": -1}, "seed = -1"),
        ({"repeat_penalty": 0}, "repeat_penalty = 0"),
        ({"max_tokens": "ten"}, "max_tokens = 'ten'"),
        ({"temperature": True}, "temperature = True"),
        ({"stop": 5}, "stop = 5"),
        ({"top_p": float("nan")}, "top_p = nan"),  # NaN passes every range comparison
        ({"temperature": float("inf")}, "temperature = inf"),
        ({"temprature": 0.5}, "Did you mean 'temperature'?"),
    ],
)
def test_out_of_range_params_are_clear_errors_before_any_work(
    engine: Engine, params: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ParameterError) as caught:
        engine.generate("the", **params)
    assert fragment in str(caught.value)
    assert engine.stats.snapshot()["requests"] == 0
    assert engine.registry.resident() == [], "nothing was loaded for an invalid request"


def test_a_prompt_longer_than_the_models_training_context_says_so(engine: Engine, tmp_path: Path) -> None:
    """Raising context_size cannot help past the length the model was trained for (nbllm caps it)."""
    from nbllm.testing import make_tiny_model

    short = make_tiny_model(tmp_path / "short.gguf", seed=5, context_length=256)
    engine.configure(performance={"context_size": 4096})
    with pytest.raises(ContextLengthError) as caught:
        engine.generate(" ".join(["model"] * 400), model=str(short), max_tokens=4)
    assert str(caught.value).endswith("short.gguf was trained for at most 256 tokens: shorten the prompt.")


def test_a_prompt_longer_than_the_context_is_a_clear_error(engine: Engine) -> None:
    long_prompt = " ".join(["model"] * 2000)
    with pytest.raises(ContextLengthError) as caught:
        engine.generate(long_prompt, max_tokens=4)
    message = str(caught.value)
    assert "context holds 512" in message
    assert "performance.context_size" in message
    assert engine.generate("the", max_tokens=3, seed=1).stats.completion_tokens > 0


def test_answer_near_the_context_end_is_cut_at_the_context(engine: Engine) -> None:
    from nbllm.core.chat_format import FormattedPrompt

    model = engine.registry.load(None).model
    words = 10
    while model.count_tokens(FormattedPrompt(" ".join(["the"] * words))) < 480:
        words += 10
    prompt = " ".join(["the"] * words)
    result = engine.generate(prompt, max_tokens=100, seed=1, temperature=1.5)
    assert result.stats.prompt_tokens + result.stats.completion_tokens <= 512


def test_unknown_model_fails_at_the_call_with_a_suggestion(engine: Engine) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        engine.generate("the", model="tiny-aa", stream=True)
    assert "Unknown model 'tiny-aa'" in str(caught.value)
    assert "Did you mean 'tiny-a'?" in str(caught.value)
    assert "Known: smollm2-135m, gemma-3-270m, all-minilm-l6-v2, tiny-a" in str(caught.value)


def test_bad_messages_are_clear_errors(engine: Engine) -> None:
    with pytest.raises(ParameterError, match="role"):
        engine.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ParameterError, match="content"):
        engine.chat([{"role": "user", "content": 3}])
    with pytest.raises(ParameterError, match="non-empty list"):
        engine.chat([])


def test_stats_count_requests_tokens_and_models(engine: Engine, tiny_models: dict[str, Path]) -> None:
    engine.generate("the", max_tokens=4, seed=1)
    engine.generate("the", max_tokens=4, seed=1, model="tiny-b")
    snapshot = engine.stats.snapshot()
    assert snapshot["requests"] == 2
    assert snapshot["completed"] == 2
    assert snapshot["model_loads"] == 2
    assert set(snapshot["per_model"]) == {"tiny-a", "tiny-b"}
    assert snapshot["completion_tokens"] == sum(m["completion_tokens"] for m in snapshot["per_model"].values())
    assert snapshot["last_request"]["model"] == "tiny-b"


def test_health_names_resident_models_and_their_settings(engine: Engine) -> None:
    engine.generate("the", max_tokens=2, seed=1)
    health = engine.health()
    assert health["status"] == "ok"
    [resident] = health["resident_models"]
    assert resident["name"] == "tiny-a"
    assert resident["context_size"] == 512
    assert resident["threads"] >= 1
    assert resident["gpu_layers"] == 0
    assert health["model_cache"] == "1/2"


def test_ctrl_c_while_llama_cpp_logs_during_a_load_stops_the_load(
    engine: Engine, tiny: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C's handler may run inside llama.cpp's log callback, where ctypes would print and
    drop the KeyboardInterrupt; the load must stop all the same, and leave nothing loaded."""
    from nbllm.backends import llama_cpp as backend

    calls = {"n": 0}

    def interrupted(level: int) -> bool:
        calls["n"] += 1
        if calls["n"] == 3:  # a few lines into the load, as a real Ctrl-C would land
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(backend.llama_log, "isEnabledFor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.registry.load(tiny)
    assert calls["n"] > 3, "llama.cpp went on logging: the interrupt surfaced only once C returned"
    assert engine.registry.resident() == []
    monkeypatch.undo()
    assert engine.generate("the", max_tokens=2, seed=1).stats.completion_tokens > 0


def test_a_default_model_that_does_not_exist_is_refused_and_the_old_one_kept(engine: Engine) -> None:
    with pytest.raises(ConfigError, match=r"default_model = 'tiny-aa': Unknown model 'tiny-aa'\. Did you mean"):
        engine.configure(default_model="tiny-aa")
    assert engine.settings.default_model == "tiny-a"
    assert engine.configure(default_model="tiny-b").default_model == "tiny-b"


def test_overlapping_loads_share_one_interrupt_hook_and_put_the_old_one_back() -> None:
    """A bench or the tuner may load beside the registry: the hook must not be left behind,
    and an interrupt marks only the load on the thread where it landed."""
    import sys
    from types import SimpleNamespace

    from nbllm.backends.llama_cpp import _interrupts_inside_callbacks

    original = sys.unraisablehook
    entered, leave = threading.Event(), threading.Event()
    other: dict[str, threading.Event] = {}

    def load_elsewhere() -> None:
        with _interrupts_inside_callbacks() as interrupted:
            other["flag"] = interrupted
            entered.set()
            leave.wait(10)

    with _interrupts_inside_callbacks() as mine:
        thread = threading.Thread(target=load_elsewhere)
        thread.start()
        assert entered.wait(10)
        sys.unraisablehook(SimpleNamespace(exc_value=KeyboardInterrupt()))  # as ctypes reports it here
    leave.set()
    thread.join(10)
    assert mine.is_set()
    assert not other["flag"].is_set()
    assert sys.unraisablehook is original


@pytest.mark.parametrize("kind", ["Cancel (read in C)", "threading.Event (asked from Python)"])
def test_a_cancel_set_while_a_long_prompt_is_read_aborts_the_decode(engine: Engine, kind: str) -> None:
    """Without llama.cpp's abort callback the whole prompt would be read and one token sampled
    before the cancel was seen; with it, the decode stops and no token comes."""
    from nbllm.backends.base import Usage
    from nbllm.core.cancel import Cancel
    from nbllm.core.chat_format import FormattedPrompt
    from nbllm.core.params import resolve_params

    model = engine.registry.load(None).model
    cancel = Cancel() if kind.startswith("Cancel") else threading.Event()
    cancel.set()
    usage = Usage()
    params = resolve_params(engine.settings.generation, {"max_tokens": 4})
    pieces = list(model.generate(FormattedPrompt(" ".join(["model"] * 60)), params, 1, usage, cancel))
    assert (pieces, usage.completion_tokens, usage.finish_reason) == ([], 0, "cancelled")
    after = engine.generate(" ".join(["model"] * 60), max_tokens=3, seed=1)
    assert after.stats.completion_tokens == 3, "the model reads the same prompt afterwards"
