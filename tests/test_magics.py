"""``%%llm`` and ``%llm`` through a real IPython shell, on real llama.cpp with tiny models.

The tiny models write random text, so these tests assert on structure — which outputs were
published, their MIME types, metadata and stats — never on what the answer says.
"""

from __future__ import annotations

import _thread
import hashlib
import importlib.util
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import ExecutionResult, InteractiveShell
from IPython.utils.capture import CapturedIO, RichOutput, capture_output

import nbllm
from nbllm.engine import Engine
from nbllm.notebook.answer_markdown import hard_line_breaks
from nbllm.notebook.interpolation import interpolate
from nbllm.notebook.live_output import extract_code, render_answer
from nbllm.notebook.magics import NbllmMagics
from nbllm.notebook.parsers import MagicParser, parse_terminal_args

QUESTION = "Question: What is a GPU?\nAnswer:"


# ----------------------------------------------------------------- the shell


def run(ip: InteractiveShell, source: str) -> ExecutionResult:
    """Run a cell and fail the test if the cell failed (jupysql's TestingShell, as a function)."""
    result = ip.run_cell(source)
    result.raise_error()
    return result


def magics(ip: InteractiveShell) -> NbllmMagics:
    instance = ip.magics_manager.registry["NbllmMagics"]
    assert isinstance(instance, NbllmMagics)
    return instance


def ask(ip: InteractiveShell, line: str = "-n 12 --seed 1", body: str = QUESTION) -> CapturedIO:
    """Run one ``%%llm`` cell and return what it displayed."""
    with capture_output() as captured:
        run(ip, f"%%llm {line}\n{body}")
    return captured


def answer_outputs(captured: CapturedIO) -> list[RichOutput]:
    """Every publication of the answer's display (the first display of the cell), in order."""
    answer_id = captured.outputs[0].transient["display_id"]
    return [o for o in captured.outputs if o.transient.get("display_id") == answer_id]


def final_answer(captured: CapturedIO) -> RichOutput:
    final = answer_outputs(captured)[-1]
    assert "nbllm" in final.metadata, "the final answer carries the provenance metadata"
    return final


def provenance(captured: CapturedIO) -> dict[str, Any]:
    data: dict[str, Any] = final_answer(captured).metadata["nbllm"]
    return data


def status_lines(captured: CapturedIO) -> list[str]:
    answer_id = captured.outputs[0].transient["display_id"]
    return [o.data["text/plain"] for o in captured.outputs if o.transient.get("display_id") != answer_id]


def answer_text(captured: CapturedIO) -> str:
    """The model's answer: the output's text, without the note that marks a cut-off one."""
    text: str = final_answer(captured).data["text/plain"]
    if provenance(captured)["truncated"]:
        text, _, note = text.rpartition("\n\n")
        assert note.startswith("[cut off at the "), note
    return text


def usage_error_of(ip: InteractiveShell, source: str, capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failing cell shows; asserts that it is a UsageError without a traceback."""
    capsys.readouterr()
    result = ip.run_cell(source)
    shown = capsys.readouterr()
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    assert "Traceback" not in shown.out + shown.err
    assert shown.err.startswith("UsageError: ")
    return shown.err.removeprefix("UsageError: ").strip()


# ----------------------------------------------------------------- the extension


def test_load_ext_registers_llm_as_a_line_and_a_cell_magic(ip: InteractiveShell) -> None:
    assert "llm" in ip.magics_manager.magics["line"]
    assert "llm" in ip.magics_manager.magics["cell"]
    assert magics(ip) in ip.configurables


def test_unload_ext_removes_the_magics_and_their_settings(ip: InteractiveShell) -> None:
    instance = magics(ip)
    run(ip, "%unload_ext nbllm")
    assert "llm" not in ip.magics_manager.magics["line"]
    assert "llm" not in ip.magics_manager.magics["cell"]
    assert instance not in ip.configurables
    run(ip, "%load_ext nbllm")  # the fixture unloads it again


def test_reload_ext_keeps_the_engine_its_models_and_the_default_model(ip: InteractiveShell, tiny: str) -> None:
    """%reload_ext re-runs nbllm/__init__.py; a new engine would orphan the loaded models' memory."""
    engine = nbllm.get_engine()
    run(ip, f"%llm use {tiny}")
    run(ip, f"%llm load {tiny}")
    run(ip, "%reload_ext nbllm")
    assert nbllm.get_engine() is engine
    assert [model.name for model in engine.registry.resident()] == ["tiny-a"]
    assert engine.settings.default_model == tiny
    assert "llm" in ip.magics_manager.magics["cell"]


# ----------------------------------------------------------------- streaming and the stats line


def test_a_cell_streams_its_answer_into_one_output_then_shows_the_stats_line(ip: InteractiveShell) -> None:
    captured = ask(ip, "-n 24 --seed 2")
    outputs = answer_outputs(captured)
    assert outputs[0].transient["display_id"], "an updatable output is created first"
    assert not outputs[0].update
    assert all(o.update for o in outputs[1:]), "then only that output is redrawn"
    text = answer_text(captured)
    assert text
    partial = [o.data["text/plain"] for o in outputs[1:-1]]
    assert partial, "the answer was shown before it was complete"
    assert all(text.startswith(p) for p in partial), "each redraw shows the answer so far"
    assert final_answer(captured).data["text/markdown"].startswith(hard_line_breaks(text))
    stats = provenance(captured)["stats"]
    assert status_lines(captured)[-1].startswith(f"Generated {stats['completion_tokens']} tokens in ")
    assert " · model tiny-a" in status_lines(captured)[-1]
    last_status = captured.outputs[-1].data
    assert "color" in last_status["text/html"], "the stats line is small and grey"


def test_redraws_are_throttled_to_the_configured_rate(ip: InteractiveShell) -> None:
    run(ip, "%config NbllmMagics.stream_updates_per_second = 2")
    captured = ask(ip, "--raw -n 400 -t 0 --repeat-penalty 1", "once upon a time")
    stats = provenance(captured)["stats"]
    redraws = len(answer_outputs(captured)) - 2  # minus the empty start and the final answer
    assert stats["completion_tokens"] > 50
    assert 1 <= redraws <= 2 + stats["total_seconds"] * 2, (redraws, stats["total_seconds"])


def test_zero_redraws_per_second_shows_the_answer_only_once_complete(ip: InteractiveShell) -> None:
    run(ip, "%config NbllmMagics.stream_updates_per_second = 0")
    captured = ask(ip, "-n 24 --seed 2")
    outputs = answer_outputs(captured)
    assert len(outputs) == 2
    assert outputs[0].data == {"text/plain": ""}
    assert outputs[1].data["text/plain"].startswith(answer_text(captured))
    assert "nbllm" in outputs[1].metadata, "the one redraw is the final answer"


def test_show_stats_off_shows_the_answer_alone(ip: InteractiveShell) -> None:
    run(ip, "%config NbllmMagics.show_stats = False")
    captured = ask(ip)
    assert status_lines(captured) == []
    assert answer_text(captured)


def test_in_a_terminal_shell_the_answer_is_printed_as_it_streams(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    run(ip, f"%%llm -n 12 --seed 1 --out answer\n{QUESTION}")
    printed = capsys.readouterr().out
    assert printed.startswith(ip.user_ns["answer"])
    assert "Generated " in printed.splitlines()[-1]


# ----------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("markdown", "text/markdown"), ("text", "text/plain"), ("html", "text/html"), ("code", "text/markdown")],
)
def test_each_format_renders_the_answer_as_its_mime_type(ip: InteractiveShell, fmt: str, mime: str) -> None:
    captured = ask(ip, f"-n 12 --seed 1 --format {fmt}")
    final = final_answer(captured)
    assert set(final.data) == {mime, "text/plain"}
    text = answer_text(captured)
    assert final.data["text/plain"].startswith(text)
    if fmt == "html":
        assert final.data[mime].startswith(text)
    if fmt == "markdown":
        assert final.data[mime].startswith(hard_line_breaks(text))
    assert provenance(captured)["format"] == fmt


def test_default_format_applies_when_a_cell_names_none(ip: InteractiveShell) -> None:
    run(ip, '%config NbllmMagics.default_format = "html"')
    assert "text/html" in final_answer(ask(ip)).data
    assert "text/markdown" in final_answer(ask(ip, "-n 12 --seed 1 -f markdown")).data


def test_json_format_is_json_mode_and_a_cut_off_object_stays_shown_with_a_one_line_error(
    ip: InteractiveShell,
) -> None:
    """--format json constrains the answer to one JSON object (a grammar). A random tiny model
    closes it at once with seed 1; with seed 2 it runs past 12 tokens, which is the cell's
    one-line error while the text so far stays shown."""
    captured = ask(ip, "-n 12 --seed 1 -f json")
    assert final_answer(captured).data["application/json"] == {}
    assert provenance(captured)["parameters"]["constraint"]["kind"] == "json"
    with capture_output() as captured:
        result = ip.run_cell(f"%%llm -n 12 --seed 2 -f json\n{QUESTION}")
    assert result.error_in_exec is not None
    assert "Raise max_tokens" in str(result.error_in_exec)
    assert final_answer(captured).data["text/plain"].startswith("{")


def test_json_format_renders_json_even_inside_a_code_fence() -> None:
    bundle, note = render_answer('Here:\n```json\n{"a": [1, 2]}\n```', "json")
    assert note is None
    assert bundle["application/json"] == {"a": [1, 2]}
    assert json.loads(bundle["text/plain"]) == {"a": [1, 2]}


def test_code_format_puts_the_code_into_a_new_cell_below(ip: InteractiveShell) -> None:
    captured = ask(ip, "-n 16 --seed 1 -f code")
    assert ip.rl_next_input.startswith(extract_code(answer_text(captured)))
    assert ip.rl_next_input


def test_extract_code_takes_the_first_fenced_block_else_the_whole_text() -> None:
    answer = "Use this:\n```python\ndef f():\n    return 1\n```\nand this:\n```\nsecond()\n```"
    assert extract_code(answer) == "def f():\n    return 1"
    assert extract_code("print('hi')\n") == "print('hi')"
    assert extract_code("Stopped early:\n```python\nx = 1\ny =") == "x = 1\ny ="


# ----------------------------------------------------------------- options


def test_options_reach_the_engine_and_the_metadata_records_them(ip: InteractiveShell) -> None:
    captured = ask(
        ip,
        "-m tiny-b -t 0.3 --top-p 0.9 --top-k 20 --min-p 0.1 -n 7 --repeat-penalty 1.2 "
        "--presence-penalty 0.1 --frequency-penalty -0.2 --seed 42 --stop xyz --stop 'two words'",
    )
    record = provenance(captured)
    assert record["model"] == "tiny-b"
    assert record["parameters"] == {
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.1,
        "max_tokens": 7,
        "repeat_penalty": 1.2,
        "presence_penalty": 0.1,
        "frequency_penalty": -0.2,
        "seed": 42,
        "stop": ["xyz", "two words"],
        "ignore_eos": False,
    }
    assert record["stats"]["completion_tokens"] <= 7


def test_out_stores_the_answer_text_in_the_named_variable(ip: InteractiveShell) -> None:
    captured = ask(ip, "-n 12 --seed 1 --out reply")
    assert ip.user_ns["reply"] == answer_text(captured)


def test_raw_continues_the_text_instead_of_chatting(ip: InteractiveShell) -> None:
    chat = provenance(ask(ip, "-n 4 --seed 1"))
    raw = provenance(ask(ip, "-n 4 --seed 1 --raw"))
    assert (chat["mode"], raw["mode"]) == ("chat", "completion")
    assert raw["stats"]["prompt_tokens"] < chat["stats"]["prompt_tokens"], "no chat transcript around the text"


def test_a_system_prompt_is_sent_before_the_question(ip: InteractiveShell) -> None:
    plain = provenance(ask(ip, "-n 4 --seed 1"))
    system = provenance(ask(ip, "-n 4 --seed 1 -s 'You answer in one short and precise sentence.'"))
    assert system["stats"]["prompt_tokens"] > plain["stats"]["prompt_tokens"]


def test_chat_mode_keeps_the_conversation_across_cells_until_reset(ip: InteractiveShell) -> None:
    first = provenance(ask(ip, "--chat -n 8 --seed 1"))
    assert [m["role"] for m in magics(ip).history] == ["user", "assistant"]
    second = provenance(ask(ip, "--chat -n 8 --seed 1", "And a CPU?"))
    assert len(magics(ip).history) == 4
    assert second["stats"]["prompt_tokens"] > first["stats"]["prompt_tokens"], "the history was sent"
    run(ip, "%llm reset")
    assert magics(ip).history == []
    again = provenance(ask(ip, "--chat -n 8 --seed 1"))
    assert again["stats"]["prompt_tokens"] == first["stats"]["prompt_tokens"]


def test_cells_without_chat_are_independent_questions(ip: InteractiveShell) -> None:
    first = provenance(ask(ip, "-n 8 --seed 1"))
    second = provenance(ask(ip, "-n 8 --seed 1"))
    assert second["stats"]["prompt_tokens"] == first["stats"]["prompt_tokens"]
    assert magics(ip).history == []


def test_a_repeated_cell_is_answered_from_the_prompt_cache_and_says_so(ip: InteractiveShell) -> None:
    nbllm.configure(cache={"enabled": True})
    first = ask(ip)
    again = ask(ip)
    assert not provenance(first)["cached"]
    assert provenance(again)["cached"]
    assert answer_text(again) == answer_text(first)
    assert "from the prompt cache" in status_lines(again)[-1]


def test_no_cache_neither_uses_nor_fills_the_prompt_cache(ip: InteractiveShell, global_engine: Engine) -> None:
    nbllm.configure(cache={"enabled": True})
    ask(ip)
    assert global_engine.cache_stats()["entries"] == 1
    bypassed = ask(ip, "-n 12 --seed 1 --no-cache")
    other = ask(ip, "-n 12 --seed 2 --no-cache")
    assert not provenance(bypassed)["cached"]
    assert not provenance(other)["cached"]
    assert global_engine.cache_stats()["entries"] == 1


# ----------------------------------------------------------------- {name} in prompts


def test_interpolate_fills_names_attributes_and_indexes() -> None:
    namespace = {"topic": "GPUs", "doc": SimpleNamespace(title="RAID"), "rows": [{"name": "x"}], "d": {"k": 3}}
    assert interpolate("About {topic}: {doc.title}", namespace) == "About GPUs: RAID"
    assert interpolate("{rows[0][name]} {rows[0]['name']} {d[k]} {rows[-1][name]}", namespace) == "x x 3 x"


def test_interpolate_leaves_json_code_and_unknown_names_alone() -> None:
    namespace = {"topic": "GPUs", "rows": []}
    for text in ('{"a": 1}', "{missing}", "{rows[3]}", "{topic.nope}", "def f(): return {1, 2}", "{ topic }"):
        assert interpolate(text, namespace) == text


def test_double_braces_are_a_literal_placeholder() -> None:
    assert interpolate("{{topic}} is {topic}", {"topic": "GPUs"}) == "{topic} is GPUs"


def test_a_prompt_is_filled_from_the_notebook_variables(ip: InteractiveShell) -> None:
    ip.user_ns["context"] = "the quick brown fox jumps over the lazy dog " * 4
    filled = provenance(ask(ip, "--raw -n 2 --seed 1", "{context}"))
    as_written = provenance(ask(ip, "--raw -n 2 --seed 1 --no-interpolate", "{context}"))
    assert filled["stats"]["prompt_tokens"] > as_written["stats"]["prompt_tokens"] + 20
    run(ip, "%config NbllmMagics.interpolate = False")
    switched_off = provenance(ask(ip, "--raw -n 2 --seed 1", "{context}"))
    assert switched_off["stats"]["prompt_tokens"] == as_written["stats"]["prompt_tokens"]


def test_options_are_filled_from_the_notebook_variables_too(ip: InteractiveShell) -> None:
    ip.user_ns.update(chosen="tiny-c", budget=3, end="zz")
    record = provenance(ask(ip, "-n {budget} --seed 1 -m {chosen} --stop {end}"))
    assert record["model"] == "tiny-c"
    assert record["parameters"]["max_tokens"] == 3, "numbers too: they are filled before they are parsed"
    assert record["parameters"]["stop"] == ["zz"]
    as_written = provenance(ask(ip, "-n 4 --seed 1 --stop {end} --no-interpolate"))
    assert as_written["parameters"]["stop"] == ["{end}"]


# ----------------------------------------------------------------- mistakes: one line, no traceback


def test_an_unknown_option_is_a_usage_error_with_a_suggestion(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    message = usage_error_of(ip, f"%%llm --temprature 0.2\n{QUESTION}", capsys)
    assert message.startswith("unrecognized arguments: --temprature 0.2.")
    assert "Did you mean '--temperature'?" in message


def test_words_on_the_magic_line_point_to_the_cell_body(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    message = usage_error_of(ip, "%%llm What is a GPU?\nAnd a CPU?", capsys)
    assert "The prompt goes in the cell body" in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("-t 9", "temperature = 9.0: must be a number from 0.0 to 5.0"),
        ("-n lots", "argument --max-tokens/-n: invalid int value: 'lots'"),
        ("-f yaml", "invalid choice: 'yaml'"),
        ("-m tiny-x", "Unknown model 'tiny-x'. Did you mean 'tiny-"),
        ("--raw --chat", "use one or the other"),
        ("--raw -s 'Be brief.'", "--system applies to a chat"),
        ("--out 2x", "'2x' is not a valid variable name"),
        ("-s 'unbalanced", "Cannot read the options"),
    ],
)
def test_bad_options_are_one_line_usage_errors_that_say_what_is_wrong(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str], line: str, expected: str
) -> None:
    assert expected in usage_error_of(ip, f"%%llm {line}\n{QUESTION}", capsys)


def test_a_bad_option_is_a_usage_error_raised_by_the_parser_itself_not_a_system_exit(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = NbllmMagics.option_parser()
    assert isinstance(parser, MagicParser), "argparse's error() is overridden: it raises, it never exits"
    # pytest.raises(UsageError) lets a SystemExit through, which would fail the test.
    with pytest.raises(UsageError) as raised:
        parser.parse_line("-n lots", None)
    assert str(raised.value) == "argument --max-tokens/-n: invalid int value: 'lots'"
    with pytest.raises(UsageError) as raised:
        parser.parse_line("--temprature 0.2", None)
    assert str(raised.value) == (
        "unrecognized arguments: --temprature 0.2. Did you mean '--temperature'? %llm? lists the options."
    )
    # What the user sees in the cell is the parser's message, word for word.
    assert usage_error_of(ip, f"%%llm -n lots\n{QUESTION}", capsys) == (
        "argument --max-tokens/-n: invalid int value: 'lots'"
    )
    assert usage_error_of(ip, f"%%llm --top_k=3\n{QUESTION}", capsys) == (
        "unrecognized arguments: --top_k=3. Did you mean '--top-k'? %llm? lists the options."
    )


def test_the_terminals_parser_raises_usage_errors_in_a_magic_and_still_exits_in_a_terminal(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    from nbllm.cli.main import build_parser

    with pytest.raises(UsageError) as raised:
        parse_terminal_args(["bench", "-t", "many"])
    assert str(raised.value) == (
        "nbllm bench: error: argument --threads/-t: expected a number or a comma-separated list such as 1,2,4, "
        "got 'many'"
    )
    with pytest.raises(SystemExit):  # the terminal's own parser still exits
        build_parser().parse_args(["bench", "-t", "many"])
    assert usage_error_of(ip, "%llm bench --bogus", capsys) == "nbllm: error: unrecognized arguments: --bogus"
    assert usage_error_of(ip, "%llm bench -r", capsys) == (
        "nbllm bench: error: argument --repetitions/-r: expected one argument"
    )


def test_an_empty_cell_is_a_usage_error(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    assert "The cell is empty" in usage_error_of(ip, "%%llm -n 4\n  \n", capsys)


def test_help_option_in_a_cell_prints_the_usage(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    run(ip, "%%llm --help\nignored")
    assert capsys.readouterr().out.strip() == NbllmMagics.usage().strip()


# ----------------------------------------------------------------- interrupting the kernel


def test_interrupting_the_kernel_keeps_the_partial_answer_and_caches_nothing(
    ip: InteractiveShell, global_engine: Engine
) -> None:
    # Greedy decoding of this prompt runs for well over a thousand tokens on tiny-a, so the
    # interrupt lands mid-answer; the same cell run to its end afterwards is the reference: the
    # partial answer must be its beginning (an interrupt right after llama_decode once left
    # stale logits behind; the backend now forces a fresh evaluation after every stream).
    nbllm.configure(cache={"enabled": True}, performance={"context_size": 2048})
    cell = "%%llm --raw -n 1900 -t 0 --repeat-penalty 1 --seed 1\nonce upon a time"
    sent = threading.Event()

    with capture_output() as captured:
        publisher = ip.display_pub

        def interrupt_after_the_first_pieces() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if any(o["update"] and o["data"].get("text/plain") for o in list(publisher.outputs)):
                    sent.set()
                    _thread.interrupt_main()
                    return
                time.sleep(0.001)

        interrupter = threading.Thread(target=interrupt_after_the_first_pieces, daemon=True)
        interrupter.start()
        try:
            result = ip.run_cell(cell)
            interrupter.join()
        except KeyboardInterrupt:
            pytest.fail("the interrupt arrived after the answer had ended: make the test's answer longer")
    assert sent.is_set()
    # The cell still ends as interrupted (so that Run All stops there), with one line, no traceback.
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert "Interrupted: the answer so far stays above; nothing was cached." in captured.stdout
    assert "Traceback" not in captured.stdout + captured.stderr

    record = provenance(captured)
    partial = answer_text(captured)
    assert record["stopped"]
    assert record["stats"]["finish_reason"] == "cancelled"
    assert partial, "what was produced stays visible"
    assert status_lines(captured)[-1].startswith("[stopped] Generated ")
    assert global_engine.cache_stats()["entries"] == 0, "a stopped answer is never cached"

    full = ask(ip, cell.partition("\n")[0].removeprefix("%%llm "), "once upon a time")
    assert provenance(full)["stats"]["finish_reason"] in ("stop", "length"), "the model is still usable"
    assert record["stats"]["completion_tokens"] < provenance(full)["stats"]["completion_tokens"]
    assert answer_text(full).startswith(partial)
    assert global_engine.cache_stats()["entries"] == 1


# ----------------------------------------------------------------- provenance


def test_the_output_metadata_records_model_hash_parameters_and_stats(
    ip: InteractiveShell, tiny_models: dict[str, Path]
) -> None:
    captured = ask(ip, "-n 8")
    record = provenance(captured)
    assert record["model"] == "tiny-a"
    assert record["model_sha256"] == hashlib.sha256(tiny_models["a"].read_bytes()).hexdigest()
    assert isinstance(record["parameters"]["seed"], int), "the seed drawn for this answer, to reproduce it"
    assert record["parameters"]["seed"] == record["stats"]["seed"]
    assert record["parameters"]["max_tokens"] == 8
    assert record["stats"]["completion_tokens"] > 0
    assert record["cached"] is False
    assert record["version"] == nbllm.__version__
    assert json.loads(json.dumps(record)) == record, "a notebook can store it"
    replay = provenance(ask(ip, f"-n 8 --seed {record['parameters']['seed']}"))
    assert replay["stats"]["completion_tokens"] == record["stats"]["completion_tokens"]


# ----------------------------------------------------------------- %llm subcommands


def test_help_and_the_question_mark_show_the_same_full_usage(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    paged: list[Any] = []
    ip.hooks["show_in_pager"] = lambda data, start=0, screen_lines=0: paged.append(data)  # as a kernel pages
    try:
        run(ip, "%llm?")
    finally:
        del ip.hooks["show_in_pager"]
    capsys.readouterr()
    run(ip, "%llm help")
    printed = capsys.readouterr().out
    usage = NbllmMagics.usage()
    assert printed.strip() == usage.strip()
    assert usage.strip() in paged[0]["text/plain"]
    for subcommand in ("models", "load", "unload", "use", "stats", "clear-cache", "health", "config", "reset"):
        assert f"\n  {subcommand}" in usage
    for option in ("--model", "--temperature", "--top-p", "--top-k", "--max-tokens", "--stop", "--no-cache"):
        assert option in usage
    for option in ("--repeat-penalty", "--seed", "--system", "--format", "--out", "--chat", "--raw"):
        assert option in usage
    run(ip, "%llm")
    assert capsys.readouterr().out.strip() == usage.strip()


def test_models_lists_the_known_models(ip: InteractiveShell) -> None:
    table = ip.run_line_magic("llm", "models")
    assert {"tiny-a", "tiny-b", "tiny-c", "tiny-chat"} <= {row["name"] for row in table}
    assert "<table>" in table._repr_html_()


def test_load_and_unload_change_which_models_are_resident(
    ip: InteractiveShell, global_engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    table = ip.run_line_magic("llm", "load tiny-b")
    assert next(row for row in table if row["name"] == "tiny-b")["resident"]
    assert [r.name for r in global_engine.registry.resident()] == ["tiny-b"]
    run(ip, "%llm unload tiny-b")
    assert global_engine.registry.resident() == []
    run(ip, "%llm unload tiny-b")
    assert "tiny-b was not loaded." in capsys.readouterr().out
    ip.run_line_magic("llm", "load tiny-a")
    ip.run_line_magic("llm", "load tiny-c")
    run(ip, "%llm unload")
    assert global_engine.registry.resident() == []


def test_use_makes_a_model_the_default_of_cells_and_of_nbllm(ip: InteractiveShell) -> None:
    run(ip, "%llm use tiny-b")
    assert magics(ip).default_model == "tiny-b"
    assert nbllm.settings().default_model == "tiny-b"
    assert provenance(ask(ip))["model"] == "tiny-b"
    assert nbllm.chat("hi", max_tokens=2).stats.model == "tiny-b"


def test_use_with_an_unknown_name_suggests_the_closest_model(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    message = usage_error_of(ip, "%llm use tiny-bb", capsys)
    assert message.startswith("Unknown model 'tiny-bb'. Did you mean 'tiny-b'?")
    assert magics(ip).default_model is None
    assert nbllm.settings().default_model == "tiny-a"


def test_stats_shows_requests_tokens_caches_and_the_last_request(ip: InteractiveShell) -> None:
    record = provenance(ask(ip))
    report = ip.run_line_magic("llm", "stats")
    assert report.data["requests"] == 1
    text = repr(report)
    assert "1 (1 completed, 0 stopped, 0 failed)" in text
    assert f"{record['stats']['completion_tokens']} generated" in text
    assert "tiny-a" in text
    assert "Generated " in text.splitlines()[-1]
    assert "<table>" in report._repr_html_()


def test_clear_cache_empties_the_prompt_cache(ip: InteractiveShell, global_engine: Engine) -> None:
    nbllm.configure(cache={"enabled": True})
    ask(ip)
    assert global_engine.cache_stats()["entries"] == 1
    run(ip, "%llm clear-cache")
    assert global_engine.cache_stats()["entries"] == 0


def test_health_shows_the_loaded_models_and_memory(ip: InteractiveShell) -> None:
    ip.run_line_magic("llm", "load tiny-a")
    report = ip.run_line_magic("llm", "health")
    text = repr(report)
    assert "default model     tiny-a" in text
    assert "memory available" in text
    assert any(row["name"] == "tiny-a" for row in report.tables[1])


def test_config_shows_every_setting_with_its_help(ip: InteractiveShell) -> None:
    table = ip.run_line_magic("llm", "config")
    rows = {row["key"]: row for row in table}
    assert rows["cache.model_cache_size"]["value"] == 2
    assert rows["generation.top_k"]["help"]
    assert rows["models.tiny-a"]["value"].endswith("tiny-a.gguf")


def test_config_key_value_changes_a_setting(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    run(ip, "%llm config generation.top_k=7")
    assert nbllm.settings().generation.top_k == 7
    assert "generation.top_k = 7" in capsys.readouterr().out
    assert provenance(ask(ip))["parameters"]["top_k"] == 7
    run(ip, "%llm config default_model=tiny-c")
    assert magics(ip).default_model == "tiny-c", "one default model for cells and nbllm"


def test_config_with_a_bad_key_or_value_is_a_usage_error_that_says_what_is_allowed(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "must be an integer from 0 to" in usage_error_of(ip, "%llm config generation.top_k=-1", capsys)
    assert "Did you mean 'top_k'?" in usage_error_of(ip, "%llm config generation.topk=3", capsys)
    assert "Expected KEY=VALUE" in usage_error_of(ip, "%llm config top_k", capsys)


def test_an_unknown_subcommand_suggests_the_closest_one(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    message = usage_error_of(ip, "%llm modles", capsys)
    assert message.startswith("Unknown subcommand 'modles'. Did you mean 'models'?")
    assert "%%llm cell" in message


def test_subcommands_reject_arguments_they_do_not_take(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "takes no arguments" in usage_error_of(ip, "%llm stats now", capsys)
    assert "takes one model name" in usage_error_of(ip, "%llm load tiny-a tiny-b", capsys)
    assert "%llm use NAME" in usage_error_of(ip, "%llm use", capsys)


def test_line_arguments_are_filled_from_the_notebook_variables(ip: InteractiveShell) -> None:
    ip.user_ns["favourite"] = "tiny-c"
    run(ip, "%llm use {favourite}")
    assert magics(ip).default_model == "tiny-c"


# ----------------------------------------------------------------- settings through %config


def test_config_magic_sets_the_default_model_of_cells(ip: InteractiveShell) -> None:
    run(ip, '%config NbllmMagics.default_model = "tiny-c"')
    assert provenance(ask(ip))["model"] == "tiny-c"
    assert provenance(ask(ip, "-n 4 -m tiny-b"))["model"] == "tiny-b", "--model wins over the setting"
    assert nbllm.settings().default_model == "tiny-a", "only %%llm cells use this setting"


def test_config_magic_rejects_a_format_that_does_not_exist(
    ip: InteractiveShell, caplog: pytest.LogCaptureFixture
) -> None:
    ip.run_cell('%config NbllmMagics.default_format = "yaml"')  # %config logs the error, as for any setting
    assert "expected any of ['markdown', 'text', 'code', 'json', 'html']" in caplog.text
    assert magics(ip).default_format == "markdown"


def test_config_magic_lists_the_settings_with_their_help(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    run(ip, "%config NbllmMagics")
    listed = capsys.readouterr().out
    for name in ("default_model", "default_format", "stream_updates_per_second", "show_stats", "interpolate"):
        assert f"NbllmMagics.{name}" in listed


def test_ipython_config_applies_when_the_extension_loads(ip: InteractiveShell) -> None:
    run(ip, "%unload_ext nbllm")
    ip.config.NbllmMagics.default_model = "tiny-b"
    ip.config.NbllmMagics.show_stats = False
    try:
        run(ip, "%load_ext nbllm")
        assert magics(ip).default_model == "tiny-b"
        captured = ask(ip)
        assert provenance(captured)["model"] == "tiny-b"
        assert status_lines(captured) == []
    finally:
        del ip.config["NbllmMagics"]


# ----------------------------------------------------------------- the chat panel

if importlib.util.find_spec("nbllm.notebook.widgets") is not None:

    def test_chat_subcommand_displays_a_chat_panel_on_the_default_model(ip: InteractiveShell) -> None:
        run(ip, "%llm use tiny-b")
        with capture_output() as captured:
            run(ip, "%llm chat")
        panel = magics(ip).chat_panel
        assert isinstance(panel, nbllm.ChatPanel)
        assert panel.model.value == "tiny-b"
        assert "application/vnd.jupyter.widget-view+json" in captured.outputs[-1].data
        run(ip, "%llm chat tiny-c")
        assert magics(ip).chat_panel.model.value == "tiny-c"


# ----------------------------------------------------------------- bench, doctor, tune, models


def test_bench_runs_the_terminals_options_and_shows_live_and_final_figures(
    ip: InteractiveShell, tmp_path: Path
) -> None:
    out = tmp_path / "results.json"
    with capture_output() as captured:
        results = ip.run_line_magic("llm", f"bench -p 16 -n 4 -r 2 -t 1,2 -q -o {out}")
    assert len(results.records) == 4
    assert json.loads(out.read_text())["records"][0]["test"] == "pp16"
    figures = [
        o
        for o in captured.outputs
        if "application/vnd.plotly.v1+json" in o.data or "application/vnd.jupyter.widget-view+json" in o.data
    ]
    assert len(figures) >= 3, "the live chart, the results with error bars, t/s against threads"
    assert f"Saved 4 records to {out}" in captured.stdout


def test_bench_compares_two_files(ip: InteractiveShell, tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    with capture_output():
        ip.run_line_magic("llm", f"bench -p 8 -n 2 -r 1 -q -o {path}")
    table = ip.run_line_magic("llm", f"bench --compare {path} {path}")
    assert [row["B / A"] for row in table] == [1.0, 1.0]


def test_bench_option_mistakes_are_one_line(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    assert "comma-separated list" in usage_error_of(ip, "%llm bench -t many", capsys)
    assert "repetitions = 0" in usage_error_of(ip, "%llm bench -r 0 -q", capsys)


def test_doctor_reports_the_hardware_and_findings(ip: InteractiveShell) -> None:
    report = ip.run_line_magic("llm", "doctor")
    assert "instruction sets" in str(report)
    assert "Troubleshooting" in str(report)
    # What a terminal IPython prints for the result: the report, not the dataclass's repr.
    assert ip.display_formatter.format(report)[0]["text/plain"] == str(report)
    assert repr(report).startswith("DoctorReport(")


def test_tune_measures_keeps_and_plots(ip: InteractiveShell, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBLLM_HOME", str(tmp_path))
    with capture_output() as captured:
        result = ip.run_line_magic("llm", "tune tiny-b")
    assert result.model == "tiny-b"
    assert result.best in result.trials
    assert any("application/vnd.plotly.v1+json" in o.data for o in captured.outputs)


def test_models_subcommands_reach_the_model_manager(ip: InteractiveShell) -> None:
    recommendation = ip.run_line_magic("llm", "models recommend")
    assert recommendation.advice
    info = ip.run_line_magic("llm", "models info tiny-a")
    assert "llama" in str(info)


# ----------------------------------------------------------------- %%llm --map


def test_map_over_a_list_answers_every_item_in_order(ip: InteractiveShell, global_engine: Engine) -> None:
    ip.user_ns["topics"] = ["docker", "python", "notebook"]
    with capture_output() as captured:
        run(ip, "%%llm --map topics --raw -n 6 --seed 1 --out explained\nthe {item} model")
    answers = ip.user_ns["explained"]
    assert isinstance(answers, list)
    assert len(answers) == 3
    one_by_one = [
        global_engine.generate(f"the {t} model", max_tokens=6, seed=1).text for t in ["docker", "python", "notebook"]
    ]
    assert answers == one_by_one
    summary = captured.outputs[-1].data["text/plain"]
    assert summary.startswith("Answered 3 of 3 prompts into 'explained'")
    assert any("application/vnd.jupyter.widget-view+json" in o.data for o in captured.outputs), "the live chart"


def test_map_over_a_dataframe_adds_a_column_from_row_fields(ip: InteractiveShell, global_engine: Engine) -> None:
    import pandas as pd

    frame = pd.DataFrame({"name": ["ada", "alan"], "field": ["maths", "computing"]}, index=[10, 20])
    ip.user_ns["people"] = frame
    with capture_output():
        run(ip, "%%llm --map people --raw -n 5 --seed 2 --column summary\n{row.name} worked on {row.field}")
    result = ip.user_ns["people"]
    assert list(result.columns) == ["name", "field", "summary"]
    assert list(result.index) == [10, 20]
    assert result.loc[20, "summary"] == global_engine.generate("alan worked on computing", max_tokens=5, seed=2).text
    assert "summary" not in frame.columns, "the original DataFrame is left as it was"


def test_map_over_a_series_keeps_its_index(ip: InteractiveShell) -> None:
    import pandas as pd

    ip.user_ns["words"] = pd.Series(["cache", "token"], index=["a", "b"])
    with capture_output():
        run(ip, "%%llm --map words -n 4 --seed 3 --out said\nSay {item}.")
    said = ip.user_ns["said"]
    assert list(said.index) == ["a", "b"]
    assert all(isinstance(text, str) for text in said)


def test_map_reports_items_that_failed_and_keeps_the_others(ip: InteractiveShell, global_engine: Engine) -> None:
    global_engine.configure(performance={"parallel_context_size": 64})
    ip.user_ns["texts"] = ["short", " ".join(["model"] * 200), "also short"]
    with capture_output() as captured:
        run(ip, "%%llm --map texts --raw -n 4 --seed 1\n{item}")
    assert ip.user_ns["answers"][1] is None
    assert all(isinstance(a, str) for a in (ip.user_ns["answers"][0], ip.user_ns["answers"][2]))
    summary = captured.outputs[-1].data["text/plain"]
    assert "Answered 2 of 3 prompts" in summary
    assert "#1: The prompt is" in summary


def test_map_fills_options_and_respects_no_interpolate(ip: InteractiveShell, global_engine: Engine) -> None:
    ip.user_ns.update(things=["a", "b"], x="XVAL", budget=3)
    with capture_output():
        run(ip, "%%llm --map things --raw -n {budget} --seed 1 --out filled\n{item} {x}")
        run(ip, "%%llm --map things --raw -n 3 --seed 1 --no-interpolate --out as_written\n{item} {x}")
    assert ip.user_ns["filled"][1] == global_engine.generate("b XVAL", max_tokens=3, seed=1).text
    assert ip.user_ns["as_written"][1] == global_engine.generate("b {x}", max_tokens=3, seed=1).text


def test_map_refuses_a_placeholder_that_names_nothing_in_the_elements(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    import pandas as pd

    ip.user_ns["people"] = pd.DataFrame({"name": ["ada"], "field": ["maths"]})
    message = usage_error_of(ip, "%%llm --map people\n{row.nmae} worked on {row.field}", capsys)
    assert message == (
        "{row.nmae} names nothing in the elements of --map: "
        "each offers {row.COLUMN} (columns: name, field) and {index}."
    )
    assert "{item} names nothing" in usage_error_of(ip, "%%llm --map people\nSay {item}", capsys)
    ip.user_ns["words"] = ["a"]
    with pytest.warns(UserWarning, match="names no element"), capture_output():
        run(ip, "%%llm --map words -n 2 --seed 1\nSay hello.")


def test_an_interrupted_map_keeps_what_finished_and_stops_the_cell(ip: InteractiveShell, global_engine: Engine) -> None:
    ip.user_ns["many"] = [f"the model {i}" for i in range(64)]  # far more work than the interrupt needs

    def interrupt_soon() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # once the batch has produced something
            progress = global_engine.batches.progress(None)
            if progress is not None and progress.tokens > 0:
                break
            time.sleep(0.01)
        _thread.interrupt_main()

    interrupter = threading.Thread(target=interrupt_soon, daemon=True)
    interrupter.start()
    with capture_output() as captured:
        try:
            result = ip.run_cell("%%llm --map many --raw -n 400 --seed 1 --out some\n{item}")
            interrupter.join()
        except KeyboardInterrupt:
            pytest.fail("the interrupt arrived after the batch had ended: give it more work")
    assert isinstance(result.error_in_exec, KeyboardInterrupt), "Run All stops at this cell"
    assert "Interrupted: the answers that finished are in 'some'; the others are None." in captured.stdout
    assert "Traceback" not in captured.stdout + captured.stderr
    answers = ip.user_ns["some"]
    assert len(answers) == 64
    assert None in answers, "the interrupt landed while the batch ran"


def test_an_interrupt_before_the_answer_starts_is_one_line(
    ip: InteractiveShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # as if Ctrl-C landed while the model loaded

    monkeypatch.setattr(NbllmMagics, "_start", interrupted)
    with capture_output() as captured:
        result = ip.run_cell(f"%%llm -n 4\n{QUESTION}")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert captured.stdout.strip() == "Interrupted before any answer was shown; nothing was cached."


def test_map_option_mistakes_are_found_before_the_chart_is_drawn(ip: InteractiveShell) -> None:
    ip.user_ns["things"] = ["a", "b"]
    for line in ("--map things -n -4", "--map things -m nomodel"):
        with capture_output() as captured:
            result = ip.run_cell(f"%%llm {line}\n{{item}}")
        assert isinstance(result.error_in_exec, UsageError)
        assert captured.outputs == [], "no empty chart is left behind"


def test_live_charts_have_a_one_line_text_form_for_terminals(ip: InteractiveShell) -> None:
    ip.user_ns["things"] = ["a"]
    with capture_output() as captured:
        run(ip, "%%llm --map things --raw -n 2 --seed 1\n{item}")
    chart = next(o for o in captured.outputs if "application/vnd.jupyter.widget-view+json" in o.data)
    assert chart.data["text/plain"] == "<live tokens/s chart>"


def test_map_mistakes_are_one_line(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    assert "no variable 'missing'" in usage_error_of(ip, "%%llm --map missing\n{item}", capsys)
    ip.user_ns["text"] = "not a list"
    assert "needs a list" in usage_error_of(ip, "%%llm --map text\n{item}", capsys)
    ip.user_ns["items"] = [1]
    assert "do not go together" in usage_error_of(ip, "%%llm --map items --chat\n{item}", capsys)
