"""The history log (core/history.py): every answer recorded, from every front end, on real
llama.cpp with tiny models; queried, switched off, bounded, shared by two processes, and never
in the way of an answer when its file is damaged or cannot be written."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

import nbllm
from nbllm.core import identity
from nbllm.core.config import Settings
from nbllm.core.errors import CacheError, GenerationError, ParameterError
from nbllm.core.history import Entry, HistoryLog, write
from nbllm.engine import Engine
from tests.test_remote import TinyServer, tiny_server  # noqa: F401  (the fixture)

TOO_LONG = "word " * 3000  # past the fixtures' 512-token context, and a batch's 2048


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "history.db"


@pytest.fixture
def settings(settings: Settings, log_file: Path) -> Settings:
    """The shared tiny-model settings, the history log in this test's own file."""
    return settings.merged({"history": {"file": str(log_file)}})


def rows(engine: Engine, **filters: Any) -> list[dict[str, Any]]:
    return engine.history.query(limit=None, **filters)


# ----------------------------------------------------------------- what is written


def test_a_chat_is_recorded_with_its_model_hash_messages_parameters_seed_answer_and_stats(
    engine: Engine, tiny_models: dict[str, Path], log_file: Path
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    answer = engine.chat(messages, max_tokens=6, temperature=0.3, seed=7)
    [row] = rows(engine)
    assert row["origin"] == "api"
    assert row["model"] == "tiny-a"
    assert row["model_sha256"] == identity.file_sha256(tiny_models["a"])
    assert row["kind"] == "chat"
    assert row["messages"] == messages
    assert row["prompt"] == "Name a colour."  # a chat's prompt column: its last user message
    assert row["params"]["temperature"] == 0.3
    assert row["params"]["max_tokens"] == 6
    assert row["seed"] == 7
    assert row["answer"] == answer.text
    assert row["finish_reason"] == answer.stats.finish_reason
    assert row["completion_tokens"] == answer.stats.completion_tokens
    assert row["prompt_tokens"] == answer.stats.prompt_tokens
    assert row["seconds"] == pytest.approx(answer.stats.total_seconds, abs=1e-3)
    assert row["cached"] is False
    assert row["error"] is None
    written = datetime.fromisoformat(row["time"])
    assert written.tzinfo is not None
    assert abs(datetime.now(timezone.utc) - written) < timedelta(minutes=1)
    assert log_file.stat().st_mode & 0o077 == 0  # private: prompts and answers are the owner's


def test_a_stream_and_a_completion_are_recorded_when_they_end(engine: Engine) -> None:
    stream = engine.generate("Once upon a time", max_tokens=5, seed=3, stream=True)
    text = "".join(stream)
    [row] = rows(engine)
    assert (row["kind"], row["prompt"], row["messages"], row["answer"]) == (
        "completion",
        "Once upon a time",
        None,
        text,
    )


def test_an_answer_from_the_prompt_cache_is_recorded_as_cached(settings: Settings, log_file: Path) -> None:
    engine = Engine(settings.merged({"cache": {"enabled": True}, "history": {"file": str(log_file)}}))
    try:
        first = engine.chat("Hello", max_tokens=6, seed=1)
        again = engine.chat("Hello", max_tokens=6, seed=1)
        assert again.stats.cached
        newest, oldest = rows(engine)
        assert (oldest["cached"], newest["cached"]) == (False, True)
        assert newest["answer"] == first.text == again.text
        assert newest["model_sha256"] == oldest["model_sha256"]
    finally:
        engine.close()


def test_cancelled_and_stopped_answers_are_recorded_with_what_they_wrote(engine: Engine) -> None:
    stream = engine.generate("Count:", max_tokens=200, seed=1, stream=True, ignore_eos=True)
    first = next(stream)
    stream.close()  # a for loop left early
    stopped = engine.generate("Count again:", max_tokens=200, seed=1, stream=True, ignore_eos=True)
    begun = next(stopped)
    stopped.stop()  # the panel's Stop, Ctrl-C in the CLI
    text = begun + "".join(stopped)
    newest, oldest = rows(engine)
    assert oldest["finish_reason"] == "cancelled"
    assert oldest["answer"].startswith(first)
    assert newest["finish_reason"] == "cancelled"
    assert newest["completion_tokens"] < 200
    assert newest["answer"] == text


def test_a_failed_answer_is_recorded_with_its_error(engine: Engine) -> None:
    with pytest.raises(nbllm.ContextLengthError):
        engine.generate(TOO_LONG, max_tokens=4)
    [row] = rows(engine)
    assert row["finish_reason"] == "error"
    assert row["error"].startswith("ContextLengthError:")
    assert row["answer"] == ""
    assert row["model"] == "tiny-a"


def test_generate_many_records_every_answer_its_cache_hits_and_its_failures(settings: Settings, log_file: Path) -> None:
    engine = Engine(settings.merged({"cache": {"enabled": True}, "history": {"file": str(log_file)}}))
    try:
        engine.generate("Alpha", max_tokens=4, seed=1)  # will be a cache hit below
        results = engine.generate_many(["Alpha", "Beta", "Gamma", TOO_LONG], max_tokens=4, seed=1, progress=False)
        assert [r.ok for r in results] == [True, True, True, False]
        recorded = rows(engine)
        assert len(recorded) == 5
        by_prompt = {r["prompt"]: r for r in recorded[:4]}
        assert by_prompt["Alpha"]["cached"] is True
        assert by_prompt["Beta"]["answer"] == results[1].text
        assert by_prompt["Gamma"]["finish_reason"] == results[2].stats.finish_reason  # type: ignore[union-attr]
        assert by_prompt[TOO_LONG]["finish_reason"] == "error"
        assert by_prompt[TOO_LONG]["error"]
    finally:
        engine.close()


def test_a_schema_and_tools_are_recorded(engine: Engine) -> None:
    engine.chat("Pick one", choices=["yes", "no"], max_tokens=4, seed=1)
    tool = {"type": "function", "function": {"name": "get_time", "description": "The time", "parameters": {}}}
    "".join(engine.chat("What time is it?", tools=[tool], tool_choice="required", max_tokens=40, seed=1, stream=True))
    with_tools, with_choices = rows(engine)
    assert with_choices["schema"]["kind"] == "choices"
    assert with_choices["schema"]["schema"]["enum"] == ["yes", "no"]
    assert with_tools["tools"]["tools"] == ["get_time"]
    assert with_tools["tools"]["definitions"][0]["function"]["name"] == "get_time"


# ----------------------------------------------------------------- reading it back


def test_history_is_a_dataframe_newest_first_with_each_filter(global_engine: Engine) -> None:
    global_engine.generate("apples are red", max_tokens=3, seed=1)
    global_engine.generate("bananas are yellow", max_tokens=3, seed=1, model="tiny-b")
    global_engine.chat("cherries?", max_tokens=3, seed=1, origin="magic")
    frame = nbllm.history()
    assert list(frame["prompt"]) == ["cherries?", "bananas are yellow", "apples are red"]
    assert str(frame["time"].dt.tz) == "UTC"
    assert list(nbllm.history(model="tiny-b")["prompt"]) == ["bananas are yellow"]
    assert list(nbllm.history(search="BANANA")["prompt"]) == ["bananas are yellow"]  # any case
    assert list(nbllm.history(search="100%")["prompt"]) == []  # % is text, not a wildcard
    assert list(nbllm.history(origin="magic")["prompt"]) == ["cherries?"]
    assert len(nbllm.history(limit=2)) == 2
    assert len(nbllm.history(since="1h")) == 3
    assert len(nbllm.history(since=datetime.now() - timedelta(minutes=5))) == 3
    tomorrow = (datetime.now() + timedelta(days=1)).date()
    assert len(nbllm.history(since=tomorrow.isoformat())) == 0
    assert len(nbllm.history(since=tomorrow)) == 0
    assert nbllm.history(model="no-such-model").empty
    assert list(nbllm.history(model="tiny-a", search="apples", since="2d", origin="api")["prompt"]) == [
        "apples are red"
    ]


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"since": "yesterday"}, "since = 'yesterday': give a date such as '2026-12-01'"),
        ({"since": 5}, "since must be a datetime, a date, or a string"),
        ({"origin": "magics"}, "Did you mean 'magic'?"),
        ({"limit": 0}, "limit = 0: must be a positive integer"),
        ({"model": ""}, "model = '': must be a model name"),
        ({"search": ""}, "search = '': must be a non-empty string"),
    ],
)
def test_bad_filters_are_one_clear_error(global_engine: Engine, filters: dict[str, Any], message: str) -> None:
    with pytest.raises(ParameterError, match=re.escape(message)):
        nbllm.history(**filters)


def test_history_clear_empties_the_log(global_engine: Engine) -> None:
    global_engine.generate("to forget", max_tokens=2, seed=1)
    assert nbllm.history_clear() == 1
    assert nbllm.history().empty


# ----------------------------------------------------------------- switched off, bounded


def test_switched_off_in_the_config_no_file_is_made(settings: Settings, log_file: Path) -> None:
    engine = Engine(settings.merged({"history": {"file": str(log_file), "enabled": False}}))
    try:
        engine.generate("secret", max_tokens=3, seed=1)
        assert engine.history.flush()
        assert not log_file.exists()
    finally:
        engine.close()


def test_switched_off_by_the_environment_no_rows_are_added(
    engine: Engine, log_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.generate("kept", max_tokens=3, seed=1)
    monkeypatch.setenv("NBLLM_HISTORY", "0")
    engine.generate("secret", max_tokens=3, seed=1)
    assert [r["prompt"] for r in rows(engine)] == ["kept"]
    monkeypatch.setenv("NBLLM_HISTORY", "1")
    engine.generate("kept again", max_tokens=3, seed=1)
    assert [r["prompt"] for r in rows(engine)] == ["kept again", "kept"]


def test_configure_can_turn_it_off_and_on_at_run_time(engine: Engine) -> None:
    engine.configure(history={"enabled": False})
    engine.generate("off", max_tokens=2, seed=1)
    engine.configure(history={"enabled": True})
    engine.generate("on", max_tokens=2, seed=1)
    assert [r["prompt"] for r in rows(engine)] == ["on"]


def test_the_oldest_rows_go_past_max_rows(settings: Settings, log_file: Path) -> None:
    engine = Engine(settings.merged({"history": {"file": str(log_file), "max_rows": 3}}))
    try:
        for index in range(7):
            engine.generate(f"prompt {index}", max_tokens=2, seed=1)
            engine.history.flush()  # one write each, as in a session of single answers
        assert [r["prompt"] for r in rows(engine)] == ["prompt 6", "prompt 5", "prompt 4"]
    finally:
        engine.close()


def entry(index: int, answer: str = "an answer") -> Entry:
    return Entry(origin="api", model="m", model_sha256=None, kind="completion", prompt=f"prompt {index}",
                 messages=None, params={}, seed=1, answer=answer, finish_reason="stop")  # fmt: skip


def test_the_oldest_rows_go_past_max_bytes(log_file: Path) -> None:
    history = HistoryLog(log_file, max_rows=1_000_000, max_bytes=200_000)
    for index in range(100):
        write(history, [entry(index, answer="x" * 10_000)])  # 1 MB written in all
    connection = sqlite3.connect(log_file)
    (pages,), (free,), (size,) = (
        connection.execute(f"PRAGMA {p}").fetchone() for p in ("page_count", "freelist_count", "page_size")
    )
    connection.close()  # fmt: skip
    assert (pages - free) * size <= 200_000
    assert pages * size < 400_000  # freed pages are reused: the file stops growing
    kept = [r["prompt"] for r in history.query(limit=None)]
    assert 5 < len(kept) < 20
    assert kept[0] == "prompt 99"
    assert kept == [f"prompt {i}" for i in range(99, 99 - len(kept), -1)]
    assert history.problem is None


def test_a_huge_prompt_is_cut_so_it_cannot_push_out_every_other_row(log_file: Path) -> None:
    history = HistoryLog(log_file)
    write(history, [Entry(origin="api", model="m", model_sha256=None, kind="completion", prompt="p" * 3_000_000,
                          messages=None, params={}, seed=1, answer="a", finish_reason="stop")])  # fmt: skip
    [row] = history.query()
    assert len(row["prompt"]) < 1_100_000
    assert row["prompt"].endswith("2,000,000 more characters not kept in the history]")


# ----------------------------------------------------------------- two kernels at once

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from nbllm.core.config import Settings
    from nbllm.core.history import Entry, write
    from nbllm.engine import Engine

    model, log_file, go, name = sys.argv[1:]
    engine = Engine(Settings().merged({
        "models": {"tiny": model}, "default_model": "tiny", "cache": {"enabled": False},
        "performance": {"context_size": 256, "batch_size": 64}, "history": {"file": log_file},
    }))
    engine.registry.load("tiny")
    while not Path(go).exists():
        time.sleep(0.001)
    for index in range(300):  # as fast as writes go: the lock is contended all the time
        write(engine.history, [Entry(origin="api", model=name, model_sha256=None, kind="completion",
              prompt=f"{name} direct {index}", messages=None, params={}, seed=1, answer="", finish_reason="stop")])
        if index % 15 == 0:  # and real answers, through the pipeline's writer thread
            engine.generate(f"{name} answer {index}", max_tokens=2, seed=1)
    assert engine.history.flush(60)
    assert engine.history.problem is None, engine.history.problem
    print("done")
    """
)


def test_two_processes_writing_at_once_both_succeed(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    log_file, go = tmp_path / "shared" / "history.db", tmp_path / "go"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tiny_models["a"]), str(log_file), str(go), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("kernel-1", "kernel-2")
    ]
    time.sleep(0.5)
    go.touch()
    for writer in writers:
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
        assert out.strip() == "done", err
        assert "cannot be written" not in err
    connection = sqlite3.connect(log_file)
    counts = dict(connection.execute("SELECT model, COUNT(*) FROM answers GROUP BY model").fetchall())
    answers = connection.execute("SELECT COUNT(*) FROM answers WHERE prompt LIKE '%answer%'").fetchone()[0]
    (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
    connection.close()
    assert counts == {"kernel-1": 300, "kernel-2": 300, "tiny": 40}
    assert answers == 40
    assert mode == "wal"


# ----------------------------------------------------------------- a file that cannot be used


def warnings_about_history(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "history log" in r.getMessage() and r.levelno >= logging.WARNING]


def test_a_damaged_file_warns_once_and_answers_go_on(
    engine: Engine, log_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log_file.parent.mkdir(parents=True)
    garbage = os.urandom(8192)
    log_file.write_bytes(garbage)
    caplog.set_level(logging.WARNING, logger="nbllm")
    for index in range(3):
        assert engine.generate(f"still answering {index}", max_tokens=3, seed=1).stats.finish_reason in (
            "stop",
            "length",
        )
        assert engine.history.flush()
    [warning] = warnings_about_history(caplog)
    assert str(log_file) in warning
    assert "NBLLM_HISTORY=0" in warning
    assert log_file.read_bytes() == garbage  # the user's file, untouched
    with pytest.raises(CacheError, match=r"Cannot read the history log .*Move that file away"):
        engine.history.query()


def test_a_folder_in_its_place_warns_once_and_answers_go_on(
    engine: Engine, log_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log_file.mkdir(parents=True)
    caplog.set_level(logging.WARNING, logger="nbllm")
    for _ in range(2):
        engine.generate("still answering", max_tokens=3, seed=1)
        assert engine.history.flush()
    [warning] = warnings_about_history(caplog)
    assert "not a regular file" in warning
    with pytest.raises(CacheError, match="is not a file"):
        engine.history.query()


def test_a_locked_database_does_not_hold_up_the_answer(engine: Engine, log_file: Path) -> None:
    engine.generate("first", max_tokens=2, seed=1)
    assert engine.history.flush()
    locker = sqlite3.connect(log_file, timeout=0)
    locker.execute("BEGIN EXCLUSIVE")  # another kernel in a long write
    try:
        started = time.perf_counter()
        engine.generate("while locked", max_tokens=2, seed=1)
        assert time.perf_counter() - started < 2.0  # the write waits on its own thread, not the answer
        assert not engine.history.flush(0.5)  # ... still waiting for the lock
    finally:
        locker.rollback()
        locker.close()
    assert engine.history.flush()
    assert [r["prompt"] for r in rows(engine)] == ["while locked", "first"]


READ_ONLY = textwrap.dedent(
    """
    import logging, sys
    from nbllm.core.config import Settings
    from nbllm.engine import Engine

    logging.basicConfig(level=logging.WARNING)
    model, folder = sys.argv[1:]
    engine = Engine(Settings().merged({
        "models": {"tiny": model}, "default_model": "tiny", "cache": {"enabled": False},
        "performance": {"context_size": 256, "batch_size": 64}, "history": {"file": folder + "/history.db"},
    }))
    for index in range(3):
        print(engine.generate(f"question {index}", max_tokens=3, seed=1).stats.finish_reason)
        assert engine.history.flush()
    """
)


def test_a_read_only_folder_warns_once_and_answers_go_on(tiny_models: dict[str, Path]) -> None:
    """Run as an ordinary user (root writes anywhere): nobody, when the tests run as root."""
    shared = Path(f"/tmp/nbllm-history-ro-{os.getpid()}")
    shared.mkdir(mode=0o755)
    try:
        model = shared / "tiny.gguf"
        shutil.copy(tiny_models["a"], model)
        folder = shared / "read-only"
        folder.mkdir()
        os.chmod(model, 0o644)
        os.chmod(folder, 0o555)
        user = {"user": "nobody"} if os.geteuid() == 0 else {}
        env = {**os.environ, "NBLLM_HOME": str(shared / "home")}
        if os.geteuid() == 0:
            os.chmod(shared, 0o777)  # nobody's home for nbllm's other folders
        result = subprocess.run(
            [sys.executable, "-c", READ_ONLY, str(model), str(folder)],
            capture_output=True, text=True, timeout=300, env=env, cwd=shared, **user,  # type: ignore[call-overload]
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()
        assert all(r in ("stop", "length") for r in result.stdout.split())
        assert len(result.stdout.split()) == 3
        assert result.stderr.count("cannot be written") == 1, result.stderr
        assert not (folder / "history.db").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# ----------------------------------------------------------------- origins


def test_a_server_request_is_recorded_with_origin_server(global_engine: Engine) -> None:
    from nbllm.server.running import serve_in_background

    handle = serve_in_background(port=0, workers=1)
    try:
        body = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi from a client"}], "max_tokens": 3}
        response = httpx.post(f"{handle.base_url}/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
    finally:
        handle.stop()
    [row] = rows(global_engine)
    assert row["origin"] == "server"
    assert row["prompt"] == "hi from a client"
    assert row["answer"] == response.json()["choices"][0]["message"]["content"]


def test_an_unknown_origin_is_refused(engine: Engine) -> None:
    with pytest.raises(ParameterError, match="origin = 'notebook': must be one of api, magic, panel, server, cli"):
        engine.make_request(prompt="x", origin="notebook")


def test_the_cli_records_with_origin_cli_and_lists_the_history(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "nbllm.yaml"
    config.write_text(f"models: {{tiny: {tiny_models['a']}}}\ndefault_model: tiny\ncache: {{enabled: false}}\n")
    env = {**os.environ, "NBLLM_HOME": str(tmp_path / "home"), "NBLLM_CONFIG": str(config)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "nbllm.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)

    assert cli("run", "-n", "3", "--seed", "1", "a terminal question").returncode == 0
    listed = cli("history", "--origin", "cli")
    assert listed.returncode == 0, listed.stderr
    assert "a terminal question" in listed.stdout
    assert "tiny" in listed.stdout
    assert "a terminal question" not in cli("history", "--origin", "api").stdout
    assert (tmp_path / "home" / "history.db").is_file()  # the data folder: $NBLLM_HOME
    cleared = cli("history", "--clear")
    assert cleared.returncode == 0
    assert "Deleted 1 answers" in cleared.stdout
    bad = cli("history", "--since", "someday")
    assert bad.returncode == 1
    assert "since = 'someday'" in bad.stderr


# ----------------------------------------------------------------- the notebook front ends


def test_magic_answers_are_recorded_with_origin_magic_and_shown_by_llm_history(ip: Any, global_engine: Engine) -> None:
    from IPython.core.error import UsageError
    from IPython.utils.capture import capture_output

    ip.user_ns["fruits"] = ["apple", "pear"]
    with capture_output():
        ip.run_cell("%%llm -n 3 --seed 1\nWhat colour is the sky?").raise_error()
        ip.run_cell("%%llm --raw -n 3 --seed 1\nRoses are").raise_error()
        ip.run_cell("%%llm --map fruits --raw -n 3 --seed 1 --out said\nA {item} is").raise_error()
    recorded = rows(global_engine)
    assert [r["origin"] for r in recorded] == ["magic"] * 4
    assert {r["prompt"] for r in recorded} == {"What colour is the sky?", "Roses are", "A apple is", "A pear is"}
    shown = ip.run_cell("%llm history --search sky -n 5")
    shown.raise_error()
    table = shown.result
    assert [row["prompt"] for row in table] == ["What colour is the sky?"]
    assert table[0]["origin"] == "magic"
    assert "<table>" in table._repr_html_()
    assert len(ip.run_cell("%llm history -n 2").result) == 2
    assert len(ip.run_cell("%llm history --origin magic --since 1h").result) == 4
    bad = ip.run_cell("%llm history --since someday")
    assert isinstance(bad.error_in_exec, UsageError)
    assert "since = 'someday'" in str(bad.error_in_exec)
    with capture_output() as captured:
        ip.run_cell("%llm history --clear").raise_error()
    assert "Deleted 4 answers" in captured.stdout
    assert rows(global_engine) == []


def test_chat_panel_answers_are_recorded_with_origin_panel(engine: Engine) -> None:
    from nbllm.notebook.widgets import ChatPanel

    panel = ChatPanel(engine)
    try:
        panel.max_tokens.value = 4
        panel.input.value = "Hello panel"
        panel.send_button.click()
        assert panel.wait(60)
    finally:
        panel.stop()
    [row] = rows(engine)
    assert row["origin"] == "panel"
    assert row["prompt"] == "Hello panel"
    assert row["messages"][-1] == {"role": "user", "content": "Hello panel"}


def test_an_answer_that_fails_mid_stream_is_recorded_with_its_error_and_what_it_wrote(
    settings: Settings,
    tiny_server: TinyServer,  # noqa: F811  (the fixture)
) -> None:
    """Review of issue 18: an answer that broke off after its first pieces was recorded as an
    error without the error's text. Here a real connection breaks off mid-answer."""
    engine = Engine(settings.merged({"remote_models": {"tiny": {"url": tiny_server.url}}}))
    try:
        tiny_server.mode = "drop"  # two pieces, then the body breaks off
        with pytest.raises(GenerationError, match="broke off") as raised:
            engine.generate("a", model="tiny", cache=False)
        [row] = rows(engine)
    finally:
        engine.close()
    assert row["finish_reason"] == "error"
    assert row["answer"] == "Hello there", "what it wrote before it failed"
    assert row["error"] == f"GenerationError: {raised.value}"
