"""Speculative decoding by prompt lookup (core/speculation.py, backends/llama_cpp_speculative.py).

The promise: the same answers, sooner where they copy their input. Checked on real llama.cpp
with the default model (a copy task drafts and keeps most of its drafts; greedy and sampled
answers are the very answers without speculation; an answer stopped in the middle of a draft
leaves the KV cache as a plain answer would), and the policy's arithmetic on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from nbllm.core.config import Settings
from nbllm.core.errors import ParameterError
from nbllm.core.speculation import DecodeCosts, DraftPolicy, NgramIndex
from nbllm.engine import Engine

PASSAGE = (
    "The river rose slowly through the night, and by morning the lower fields were under water. Farmers moved "
    "their animals to the hill, where the old church stood above the flood. Nobody had seen the water so high "
    "since the winter of the great storm, forty years before."
)
COPY = f"Repeat this text exactly, word for word:\n\n{PASSAGE}"


def fresh_engine(**performance: object) -> Engine:
    """An engine of its own: a KV cache no earlier answer touched (greedy answers compared to the
    letter must read their prompts the same way), no prompt cache, no KV snapshots; flash
    attention and the batch size named, not taken from what a tuner test measured."""
    settings = {"context_size": 1024, "batch_size": 512, "flash_attention": True, **performance}
    return Engine(Settings().merged({"performance": settings, "cache": {"enabled": False, "prefix_cache_bytes": 0}}))


def pin_costs_where_drafts_pay(engine: Engine) -> None:
    """Load the model, then fix its decode costs to a GPU's shape (17 tokens for 1.2 single ones)
    and stop measuring: whether a step drafts then depends on the guesses alone, not on how busy
    this machine is. The decodes, the drafts and the answers stay real."""
    engine.chat("Hi", max_tokens=1, speculation="off")
    (resident,) = engine.registry.resident()
    costs = resident.model._decode_costs
    costs.observe(1, 0.010)
    costs.observe(17, 0.012)
    costs.observe = lambda size, seconds: None


@pytest.fixture
def engines(default_model_path: Path) -> Iterator[tuple[Engine, Engine]]:
    """Two engines on the default model, the same first request on both; the second's costs
    pinned (pin_costs_where_drafts_pay)."""
    first, second = fresh_engine(), fresh_engine()
    first.chat("Hi", max_tokens=1, speculation="off")
    pin_costs_where_drafts_pay(second)
    yield first, second
    first.close()
    second.close()


# ---------------------------------------------------------------------------- on llama.cpp


def test_a_copy_task_drafts_on_this_cpu_and_the_answer_is_the_same(default_model_path: Path) -> None:
    """With the costs this machine measures: a copied passage is drafted, most drafts are kept."""
    plain, speculating = fresh_engine(), fresh_engine()
    try:
        without = plain.chat(COPY, max_tokens=80, temperature=0, speculation="off")
        with_drafts = speculating.chat(COPY, max_tokens=80, temperature=0)  # the default: auto
    finally:
        plain.close()
        speculating.close()
    assert with_drafts.text == without.text
    assert "river rose slowly" in with_drafts.text
    assert without.stats.drafted_tokens == 0
    stats = with_drafts.stats
    assert stats.drafted_tokens > 0, "guesses that keep coming true are drafted"
    assert stats.accepted_tokens >= 0.7 * stats.drafted_tokens
    assert stats.as_dict()["accepted_tokens"] == stats.accepted_tokens
    assert f"{stats.accepted_tokens} of {stats.drafted_tokens} drafted tokens kept" in stats.summary()
    totals = speculating.stats.snapshot()
    assert (totals["drafted_tokens"], totals["accepted_tokens"]) == (stats.drafted_tokens, stats.accepted_tokens)


def test_greedy_answers_are_the_same_answers(engines: tuple[Engine, Engine]) -> None:
    plain, speculating = engines
    for prompt in (COPY, f"Summarize in one sentence:\n\n{PASSAGE}"):
        without = plain.chat(prompt, max_tokens=80, temperature=0, speculation="off")
        with_drafts = speculating.chat(prompt, max_tokens=80, temperature=0)
        assert with_drafts.stats.drafted_tokens >= 10
        assert with_drafts.text == without.text


def test_sampled_answers_are_the_same_answers_with_the_same_seed(engines: tuple[Engine, Engine]) -> None:
    """Every token is still sampled by the request's sampler, position after position: the
    random numbers fall on the same positions, so a seed gives the same text."""
    plain, speculating = engines
    drafted = 0
    for seed in (1, 2, 3):
        without = plain.chat(COPY, max_tokens=60, temperature=0.5, seed=seed, speculation="off")
        with_drafts = speculating.chat(COPY, max_tokens=60, temperature=0.5, seed=seed)
        assert with_drafts.text == without.text
        drafted += with_drafts.stats.drafted_tokens
    assert drafted > 0, "a sampled copy is drafted too"


class Copy(BaseModel):
    text: str


def test_structured_answers_are_drafted_under_their_grammar(engines: tuple[Engine, Engine]) -> None:
    plain, speculating = engines
    prompt = f'Put this text into JSON as {{"text": ...}}:\n\n{PASSAGE}'
    without = plain.chat(prompt, schema=Copy, max_tokens=120, temperature=0, speculation="off")
    with_drafts = speculating.chat(prompt, schema=Copy, max_tokens=120, temperature=0)
    assert with_drafts.stats.drafted_tokens > 0
    assert with_drafts.text == without.text
    assert isinstance(with_drafts.data, Copy)


def test_an_answer_stopped_inside_a_draft_leaves_a_kv_record_the_next_answer_can_build_on(
    engines: tuple[Engine, Engine],
) -> None:
    """A stop sequence ends an answer in the middle of a step: the record of the KV content then
    holds the rest of that draft (the KV cache holds it too). The next request continues the
    conversation, so it reuses the prompt and the answer from that record: the same answers as
    the same requests without drafts."""
    answers: dict[str, list[str]] = {}
    for engine, mode in zip(engines, ("off", "auto"), strict=True):
        stopped = engine.chat(COPY, max_tokens=80, temperature=0, stop=["church"], speculation=mode)
        assert "church" not in stopped.text
        assert stopped.stats.finish_reason == "stop"
        (resident,) = engine.registry.resident()
        llm = resident.model._llm
        assert llm.n_tokens <= llm.n_ctx()
        follow_up = [
            {"role": "user", "content": COPY},
            {"role": "assistant", "content": stopped.text},
            {"role": "user", "content": "Go on from there, word for word."},
        ]
        going_on = engine.chat(follow_up, max_tokens=40, temperature=0, speculation=mode)
        assert going_on.stats.reused_prompt_tokens > 60, "the first answer's prompt is reused"
        answers[mode] = [stopped.text, going_on.text]
    assert answers["auto"] == answers["off"]


def test_drafts_never_exceed_what_one_decode_holds(default_model_path: Path) -> None:
    """batch_size 4: llama-cpp-python's batch has 4 slots, so a step is the newest token and at
    most 3 drafted ones (more would write past the batch's arrays)."""
    plain, engine = fresh_engine(batch_size=4), fresh_engine(batch_size=4)
    try:
        plain.chat("Hi", max_tokens=1, speculation="off")
        pin_costs_where_drafts_pay(engine)
        (resident,) = engine.registry.resident()
        sizes: list[int] = []
        observe = resident.model._decode_costs.observe
        resident.model._decode_costs.observe = lambda size, seconds: (sizes.append(size), observe(size, seconds))
        answer = engine.chat(COPY, max_tokens=60, temperature=0)
        without = plain.chat(COPY, max_tokens=60, temperature=0, speculation="off")
    finally:
        plain.close()
        engine.close()
    assert answer.stats.drafted_tokens > 0
    assert answer.text == without.text
    assert max(sizes) == 4


def test_free_writing_drafts_little(default_model_path: Path) -> None:
    engine = fresh_engine()
    try:
        answer = engine.chat("Write a short poem about autumn leaves.", max_tokens=80, temperature=0.7, seed=3)
    finally:
        engine.close()
    assert answer.stats.drafted_tokens <= 16, "guesses that fail are not drafted"


def test_a_bad_speculation_value_says_what_is_allowed(engines: tuple[Engine, Engine]) -> None:
    engine, _ = engines
    with pytest.raises(ParameterError, match="auto, off"):
        engine.chat("Hi", speculation="on")


# ---------------------------------------------------------------------------- the policy's arithmetic


def test_the_lookup_proposes_what_followed_the_latest_longest_match() -> None:
    index = NgramIndex([1, 2, 3, 4, 5, 9, 2, 3, 7, 8])
    for token in (1, 2, 3):
        index.append(token)
    # The text ends 1 2 3: as a 3-gram it occurred at the start, followed by 4 5 9 ...
    assert index.draft(3) == ([4, 5, 9], 3)
    index.append(6)  # ... 1 2 3 6: no n-gram of 2-4 tokens ending in "3 6" occurred before
    assert index.draft(4) == ([], 0)
    index.append(2)
    index.append(3)  # ... 6 2 3: "6 2 3" is new, "2 3" last occurred followed by 6 (just now)
    assert index.draft(2) == ([6, 2], 2)


def test_nothing_is_drafted_where_a_batch_costs_as_much_as_its_tokens_one_by_one() -> None:
    costs = DecodeCosts()
    for size in (1, 2, 4, 8):
        costs.observe(size, 0.01 * size)
    policy = DraftPolicy(costs)
    for _ in range(20):
        policy.observe(4, drafted=4, accepted=4)
    assert policy.length(4, 16) == 0


def test_drafts_grow_with_the_guesses_kept_and_shrink_when_they_fail() -> None:
    costs = DecodeCosts()
    costs.observe(1, 0.010)
    costs.observe(9, 0.020)  # a GPU-like cost: 9 tokens for twice one
    policy = DraftPolicy(costs)
    assert policy.length(4, 16) <= 2, "unproven guesses: little or nothing"
    for _ in range(10):
        policy.observe(4, drafted=8, accepted=8)
    assert policy.length(4, 16) >= 8
    assert policy.length(4, 3) <= 3, "never more than the lookup offers"
    assert policy.length(0, 16) == 0, "no match, no draft"
    for _ in range(10):
        policy.observe(4, drafted=8, accepted=0)
    assert policy.length(4, 16) <= 1
    assert (policy.drafted, policy.accepted) == (160, 80)


def test_guesses_not_drafted_still_teach_the_policy() -> None:
    costs = DecodeCosts()
    costs.observe(1, 0.010)
    costs.observe(9, 0.020)
    policy = DraftPolicy(costs)
    for _ in range(10):
        policy.observe_guess(3, kept=True)
    assert policy.length(3, 16) >= 8
    assert policy.length(2, 16) <= 2, "each n-gram length learns on its own"


def test_a_draft_models_guesses_are_weighed_with_what_they_cost() -> None:
    from nbllm.core.speculation import DRAFT_MODEL

    gpu = DecodeCosts()
    gpu.observe(1, 0.010)
    gpu.observe(17, 0.012)
    policy = DraftPolicy(gpu)
    assert policy.length(DRAFT_MODEL, 16, seconds_per_guess=0.0005) >= 4, "cheap guesses from a model: drafted"
    assert policy.length(DRAFT_MODEL, 16, seconds_per_guess=0.010) <= policy.length(DRAFT_MODEL, 16, 0.0005)
    assert policy.could_pay(16, 0.0005)
    right = DraftPolicy(gpu)
    for _ in range(10):
        right.observe(DRAFT_MODEL, drafted=8, accepted=8)
    # At p = 0.95 a draft of 14 yields ~10.7 tokens for 0.012 s + 14 guesses of 1 ms: the best
    # rate (a draft of 4 was chosen while the rate to beat left the guesses' cost out).
    assert right.length(DRAFT_MODEL, 16, seconds_per_guess=0.001) == 14
    cpu = DecodeCosts()
    for size, seconds in ((1, 0.010), (2, 0.014), (9, 0.045), (17, 0.075)):  # 2 cores, measured shape
        cpu.observe(size, seconds)
    as_slow = DraftPolicy(cpu)
    assert as_slow.length(DRAFT_MODEL, 16, seconds_per_guess=0.010) == 0
    assert not as_slow.could_pay(16, 0.010), "a draft as slow as the model is not even tried"
    for _ in range(10):
        policy.observe(DRAFT_MODEL, drafted=8, accepted=0)
    assert policy.length(DRAFT_MODEL, 16, seconds_per_guess=0.0005) <= 1, "wrong guesses stop the drafts"
    assert policy.could_pay(16, 0.0005), "but a probe may still show they came right again"


# ---------------------------------------------------------------------------- front ends


def test_the_magic_and_the_cli_take_speculation(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from nbllm.cli.main import _generation_params, build_parser
    from tests.test_magics import usage_error_of

    ip.run_cell("%%llm --speculation off -n 3\nHello").raise_error()
    magics = ip.magics_manager.registry["NbllmMagics"]
    assert magics.last_request.params.speculation == "off"
    assert "auto, off" in usage_error_of(ip, "%%llm --speculation sometimes\nHello", capsys).replace("'", "")
    args = build_parser().parse_args(["run", "--speculation", "off", "Hello"])
    assert _generation_params(args)["speculation"] == "off"
    ip.run_cell("%%llm --draft-model tiny-a -n 3\nHello").raise_error()  # the model drafting for itself
    assert magics.last_request.params.draft_model == "tiny-a"
    args = build_parser().parse_args(["run", "--draft-model", "small", "Hello"])
    assert _generation_params(args)["draft_model"] == "small"


# ---------------------------------------------------------------------------- a draft model


def on_worker(model: Any, work: Any) -> Any:
    """``work()`` on a compute thread of the model's, as nbllm runs llama.cpp: a decode on the
    test's own thread would leave it an OpenMP team for the rest of the session, and slow the
    tests after it (backends/compute_thread.py)."""
    return model._worker.submit(work).result()


def pin_draft_costs(engine: Engine, draft: Path) -> None:
    """Load the draft model and fix what a guess costs to a twentieth of a single decode, the
    shape of a small model drafting for a large one (here the draft is the model itself: no
    smaller model of its vocabulary is at hand, and guesses of the very model are the test's
    point: they are right, so they are drafted and kept)."""
    (resident,) = engine.registry.resident()
    drafter = on_worker(resident.model, lambda: resident.model._draft_model(draft))
    drafter.seconds_per_guess = 0.0005
    drafter.observe = lambda seconds: None


def test_a_draft_model_drafts_and_the_answers_are_the_same(
    engines: tuple[Engine, Engine], default_model_path: Path
) -> None:
    plain, speculating = engines
    pin_draft_costs(speculating, default_model_path)
    prompt = "Write a short story about a lighthouse keeper."
    without = plain.chat(prompt, max_tokens=60, temperature=0, repeat_penalty=1.0, speculation="off")
    drafted = speculating.chat(
        prompt, max_tokens=60, temperature=0, repeat_penalty=1.0, draft_model=str(default_model_path)
    )
    assert drafted.text == without.text
    stats = drafted.stats
    assert stats.drafted_tokens >= 20, "free writing, drafted: the guesses come from a model, not the text"
    assert stats.accepted_tokens >= 0.9 * stats.drafted_tokens, "a model's greedy guesses are its greedy answer"
    for seed in (1, 2):  # sampled: the request's own sampler decides every token, as without drafts
        alone = plain.chat(prompt, max_tokens=40, temperature=0.7, seed=seed, speculation="off")
        helped = speculating.chat(
            prompt, max_tokens=40, temperature=0.7, seed=seed, draft_model=str(default_model_path)
        )
        assert helped.text == alone.text


def test_a_draft_model_drops_refused_guesses_and_goes_on_from_the_text_kept(default_model_path: Path) -> None:
    """Its guesses after a text that left its last guesses behind are those of a draft that
    read that text from scratch: its KV cache follows the answer, not its own guesses."""
    engine = fresh_engine()
    try:
        engine.chat("Hi", max_tokens=1, speculation="off")
        (resident,) = engine.registry.resident()
        model = resident.model
        drafter = on_worker(model, lambda: model._draft_model(default_model_path))
        text = model._llm.tokenize(b"The history of the old mill by the river begins", add_bos=False)

        def draft(tokens: list[int], count: int = 6) -> list[int]:
            return list(on_worker(model, lambda: drafter.draft(tokens, count)))

        def fresh(tokens: list[int], count: int = 6) -> list[int]:
            drafter.llm._ctx.kv_cache_clear()
            drafter.llm.n_tokens = 0
            return draft(tokens, count)

        first = draft(text)
        assert len(first) == 6
        refused = [*text, first[0], (first[1] + 1) % model._llm.n_vocab()]  # kept one, then another token
        again = draft(refused)
        assert again == fresh(refused)
        kept_all = [*text, *first]
        assert draft(kept_all, 4) == fresh(kept_all, 4)
        assert draft(text) == first, "back to a shorter text: the same guesses as before"
    finally:
        engine.close()


def test_a_draft_model_is_named_like_any_model_and_set_in_the_config(
    engines: tuple[Engine, Engine], default_model_path: Path
) -> None:
    _, speculating = engines
    speculating.configure(models={"drafter": str(default_model_path)}, generation={"draft_model": "drafter"})
    pin_costs_where_drafts_pay(speculating)  # a new configuration: the model was loaded again
    pin_draft_costs(speculating, default_model_path)
    prompt = "Write a short story about a lighthouse keeper."
    answer = speculating.chat(prompt, max_tokens=30, temperature=0, repeat_penalty=1.0)
    assert answer.stats.drafted_tokens > 0
    off = speculating.chat(prompt, max_tokens=30, temperature=0, speculation="off")
    assert off.stats.drafted_tokens == 0, "speculation off: no drafts, from a model either"


def test_a_draft_model_of_another_vocabulary_is_refused_with_what_to_do(
    engines: tuple[Engine, Engine], tiny_models: dict[str, Path]
) -> None:
    from nbllm.core.errors import ModelLoadError, ModelNotFoundError

    plain, _ = engines
    refused = r"cannot draft for this model: its (tokenizer is of another kind|vocabulary has).*draft_model"
    with pytest.raises(ModelLoadError, match=refused):
        plain.chat("Hi", max_tokens=4, draft_model=str(tiny_models["a"]))
    with pytest.raises(ModelNotFoundError):
        plain.chat("Hi", max_tokens=4, draft_model="no-such-draft-model")
    assert plain.chat("Hi", max_tokens=4, seed=1).stats.completion_tokens > 0, "the model still answers"


def test_a_draft_model_that_is_not_a_model_file_is_refused(engines: tuple[Engine, Engine], tmp_path: Path) -> None:
    from nbllm.core.errors import NbllmError

    plain, _ = engines
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(NbllmError):
        plain.chat("Hi", max_tokens=4, draft_model=str(junk))
    assert plain.chat("Hi", max_tokens=4, seed=1).stats.completion_tokens > 0
