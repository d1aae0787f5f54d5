"""The prompt cache trusts nothing it reads (issue 13, item 3).

Entries used to be pickles: whoever could write one file in the cache folder ran code in every
kernel that asked the matching question, and an entry of the right shape with the wrong types
raised a raw TypeError on every identical request. Now an entry is JSON signed with a per-user
key, checked field by field; anything else is a miss, logged once, and removed. Real files, real
processes, real llama.cpp on tiny models.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import pickle
import secrets
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbllm.core import prompt_cache
from nbllm.core.config import Settings
from nbllm.core.metrics import RequestStats
from nbllm.core.prompt_cache import CACHE_FORMAT, PromptCache, key_file
from nbllm.engine import Engine

REQUEST = {"max_tokens": 12, "seed": 3}
FUNC_ID = "nbllm/core/prompt_cache/_signed_answer"
MAGIC = f"nbllm-prompt-cache {CACHE_FORMAT} ".encode()

# A fresh process asks one question of a cache folder and says whether it came from the cache.
RUNNER = textwrap.dedent(
    """
    import json, logging, os, sys
    os.umask(0o022)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
    from nbllm.core.config import Settings
    from nbllm.engine import Engine

    model, folder, prompt = sys.argv[1:4]
    engine = Engine(Settings().merged({
        "performance": {"context_size": 256, "batch_size": 64},
        "cache": {"enabled": True, "directory": folder},
    }))
    answer = engine.generate(prompt, model=model, max_tokens=8, seed=5)
    print(json.dumps({"cached": answer.stats.cached, "text": answer.text}))
    engine.close()
    """
)


def ask(model: Path, folder: Path, prompt: str = "the model", env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(model), str(folder), prompt],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["log"] = done.stderr
    return result


def only_entry(folder: Path) -> Path:
    [entry] = PromptCache(folder, 100).entries()
    return entry / "output.pkl"


def sign(payload: bytes, args_id: str, key: bytes | None = None) -> bytes:
    """What a writer holding the key writes: the format, spelled out independently of the module."""
    if key is None:
        key = bytes.fromhex(key_file().read_text().strip())
    mac = hmac.new(key, MAGIC, hashlib.sha256)
    mac.update(f"{FUNC_ID}\0{args_id}".encode() + b"\n")
    mac.update(payload)
    return MAGIC + mac.hexdigest().encode() + b"\n" + payload


def stored_answer(output: Path) -> dict[str, Any]:
    header, _, payload = output.read_bytes().partition(b"\n")
    assert header.startswith(MAGIC)
    answer: dict[str, Any] = json.loads(payload)
    return answer


class RunsCode:
    """A pickle that creates ``marker`` when loaded: what a hostile entry would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.fixture
def record_keys(cached_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The cache keys the pipeline stores answers under, in order."""
    keys: list[dict[str, Any]] = []
    put = cached_engine.prompt_cache.put

    def recording_put(key: dict[str, Any], answer: dict[str, Any]) -> None:
        keys.append(key)
        put(key, answer)

    monkeypatch.setattr(cached_engine.prompt_cache, "put", recording_put)
    return keys


def damaged_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "damaged prompt-cache entry" in r.getMessage()]


# ------------------------------------------------------------------------------ no code runs


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed-with-the-users-own-key"])
def test_a_pickle_payload_in_an_entry_never_runs_and_is_a_logged_miss(
    tiny_models: dict[str, Path], tmp_path: Path, signed: bool
) -> None:
    folder, model = tmp_path / "cache", tiny_models["a"]
    first = ask(model, folder)
    assert not first["cached"]
    assert ask(model, folder)["cached"]
    output = only_entry(folder)
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(RunsCode(marker))
    # The payload is live: loading it as the old cache did runs its code.
    probe = tmp_path / "probe-ran"
    unpickle = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
    subprocess.run([sys.executable, "-c", unpickle], input=pickle.dumps(RunsCode(probe)), check=True, timeout=60)
    assert probe.exists()

    output.write_bytes(sign(payload, output.parent.name) if signed else payload)
    again = ask(model, folder)
    assert not marker.exists(), "a cached entry ran code"
    assert not again["cached"]
    assert again["text"] == first["text"]
    assert "damaged prompt-cache entry" in again["log"]
    assert ask(model, folder)["cached"], "the bad entry was removed and written anew"
    assert not marker.exists()


def test_format_1_pickle_entries_are_deleted_unread_when_the_cache_opens(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    folder, marker = tmp_path / "cache", tmp_path / "code-ran"
    old = folder / "joblib" / "nbllm" / "core" / "prompt_cache" / "_cached_answer"
    (old / ("a" * 32)).mkdir(parents=True)
    (old / ("a" * 32) / "output.pkl").write_bytes(pickle.dumps(RunsCode(marker)))
    (old / "func_code.py").write_text("# first line: 1\ndef _cached_answer(key, _answer=None): ...\n")
    answer = ask(tiny_models["a"], folder)
    assert answer["text"]
    assert not old.exists()
    assert not marker.exists()


# -------------------------------------------------------------------- wrong shapes and types


def _drop(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda answer: {k: v for k, v in answer.items() if k != name}


FORGERIES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "pieces are numbers": lambda a: {**a, "pieces": [1, 2, 3]},
    "pieces are one string": lambda a: {**a, "pieces": "".join(a["pieces"])},
    "a piece is null": lambda a: {**a, "pieces": [*a["pieces"], None]},
    "a count is a string": lambda a: {**a, "completion_tokens": str(a["completion_tokens"])},
    "a count is a float": lambda a: {**a, "prompt_tokens": 2.5},
    "a count is negative": lambda a: {**a, "completion_tokens": -1},
    "a count is a boolean": lambda a: {**a, "prompt_tokens": True},
    "a time is not a number": lambda a: {**a, "total_seconds": "1.5"},
    "a time is NaN": lambda a: {**a, "total_seconds": math.nan},
    "a cancelled answer": lambda a: {**a, "finish_reason": "cancelled"},
    "a seed is a string": lambda a: {**a, "seed": "3"},
    "an extra field": lambda a: {**a, "shell": "rm -rf ~"},
    "a missing field": _drop("total_seconds"),
    "no pieces at all": _drop("pieces"),
    "a list, not an object": lambda a: a["pieces"],
    "null": lambda a: None,
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_signed_answer_of_the_wrong_shape_is_a_logged_miss_and_removed(
    cached_engine: Engine, record_keys: list[dict[str, Any]], caplog: pytest.LogCaptureFixture, forgery: str
) -> None:
    """Signed with the real key (as an older or newer nbllm would write it): the shape check
    alone must refuse it, where the pickle cache raised a raw TypeError/KeyError each time."""
    first = cached_engine.generate("the model", **REQUEST)
    [entry] = cached_engine.prompt_cache.entries()
    output = entry / "output.pkl"
    forged = FORGERIES[forgery](stored_answer(output))
    output.write_bytes(sign(json.dumps(forged).encode(), entry.name))
    with caplog.at_level(logging.WARNING, logger="nbllm"):
        assert cached_engine.prompt_cache.get(record_keys[0]) is None
        assert not entry.exists(), "the entry is removed"
        again = cached_engine.generate("the model", **REQUEST)
        cached_engine.generate("the model", max_tokens=5, seed=99)
    assert not again.stats.cached
    assert again.text == first.text
    assert len(damaged_warnings(caplog)) == 1
    hit = cached_engine.generate("the model", **REQUEST)
    assert hit.stats.cached, "the next identical request is answered from a good entry again"
    assert hit.text == first.text


def test_the_schema_is_exactly_what_the_pipeline_stores() -> None:
    stored = {**RequestStats(model="m").as_dict(), "pieces": []}
    assert set(prompt_cache._ANSWER_FIELDS) == set(stored), "update _ANSWER_FIELDS with RequestStats"


def test_an_answer_the_cache_would_refuse_is_never_written(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = PromptCache(tmp_path / "cache", 10)
    with caplog.at_level(logging.WARNING, logger="nbllm"):
        cache.put({"prompt": "x"}, {"pieces": ["a"], "unknown": 1})
    assert cache.entries() == []
    assert any("not stored in the prompt cache" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ tampered or foreign entries


def _change_a_piece(output: Path, other: Path) -> None:
    header, _, payload = output.read_bytes().partition(b"\n")
    answer = json.loads(payload)
    answer["pieces"][0] = "FORGED"
    output.write_bytes(header + b"\n" + json.dumps(answer, separators=(",", ":")).encode())


def _plain_json(output: Path, other: Path) -> None:
    answer = stored_answer(output)
    answer["pieces"] = ["FORGED"]
    output.write_bytes(json.dumps(answer).encode())


def _another_key(output: Path, other: Path) -> None:
    answer = stored_answer(output)
    answer["pieces"] = ["FORGED"]
    output.write_bytes(sign(json.dumps(answer).encode(), output.parent.name, key=secrets.token_bytes(32)))


def _moved_from_another_request(output: Path, other: Path) -> None:
    output.write_bytes(other.read_bytes())


@pytest.mark.parametrize(
    "tamper", [_change_a_piece, _plain_json, _another_key, _moved_from_another_request], ids=lambda f: f.__name__[1:]
)
def test_an_entry_changed_since_it_was_signed_or_signed_by_someone_else_is_refused(
    cached_engine: Engine, caplog: pytest.LogCaptureFixture, tamper: Callable[[Path, Path], None]
) -> None:
    other = cached_engine.generate("a different question", **REQUEST)
    first = cached_engine.generate("the model", **REQUEST)
    assert other.text != first.text
    by_age = sorted(cached_engine.prompt_cache.entries(), key=lambda e: (e / "output.pkl").stat().st_mtime_ns)
    other_output, output = (entry / "output.pkl" for entry in by_age)
    tamper(output, other_output)
    with caplog.at_level(logging.WARNING, logger="nbllm"):
        again = cached_engine.generate("the model", **REQUEST)
    assert not again.stats.cached
    assert again.text == first.text
    assert "FORGED" not in again.text
    [warning] = damaged_warnings(caplog)
    assert "signature" in warning or f"format-{CACHE_FORMAT}" in warning
    assert cached_engine.generate("the model", **REQUEST).stats.cached


@pytest.mark.parametrize("kind", ["fifo", "symlink", "folder"])
def test_an_entry_that_is_not_a_plain_file_is_a_miss_and_never_hangs(
    tiny_models: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    folder, model = tmp_path / "cache", tiny_models["a"]
    first = ask(model, folder)
    output = only_entry(folder)
    elsewhere = tmp_path / "elsewhere.pkl"
    elsewhere.write_bytes(output.read_bytes())
    output.unlink()
    if kind == "fifo":
        os.mkfifo(output)
    elif kind == "symlink":
        output.symlink_to(elsewhere)
    else:
        output.mkdir()
    again = ask(model, folder)  # a timeout here is the hang this test exists for
    assert not again["cached"]
    assert again["text"] == first["text"]
    assert "damaged prompt-cache entry" in again["log"]
    assert ask(model, folder)["cached"]
    assert elsewhere.exists(), "a link is removed, never what it points to"


# -------------------------------------------------------------------------- private, no prompts


def test_folders_are_created_0700_and_files_0600_under_a_umask_of_022(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    folder = tmp_path / "new" / "deeper" / "prompts"
    env = {**os.environ, "NBLLM_HOME": str(home)}
    ask(tiny_models["a"], folder, env=env)
    assert ask(tiny_models["a"], folder, env=env)["cached"]
    key = home / "cache" / "prompt-cache.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    folders = [tmp_path / "new", tmp_path / "new" / "deeper"]
    files = []
    for root, dirs, names in os.walk(folder):
        folders += [Path(root) / name for name in dirs]
        files += [Path(root) / name for name in names]
    assert folder.stat().st_mode & 0o777 == 0o700
    assert any(f.name == "output.pkl" for f in files)
    assert {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in folders} == {str(f): "0o700" for f in folders}
    assert {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {str(f): "0o600" for f in files}


def test_the_cache_folder_holds_answers_never_prompts(cached_engine: Engine) -> None:
    secret, chat_secret = "Quintessa-4471 asked about her diagnosis", "Vorpal-9932 password hint"
    cached_engine.generate(f"{secret}. the model", **REQUEST)
    cached_engine.chat([{"role": "user", "content": chat_secret}], **REQUEST)
    assert cached_engine.generate(f"{secret}. the model", **REQUEST).stats.cached
    folder = cached_engine.prompt_cache.directory
    everything = b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())
    for text in (secret, chat_secret):
        for needle in (text, json.dumps(text)[1:-1], "Quintessa", "Vorpal"):
            assert needle.encode() not in everything
    assert not list(folder.rglob("metadata.json")), "joblib's metadata (the call's arguments) is not written"


def test_a_damaged_key_file_turns_the_cache_off_with_one_warning(
    home: Path, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    key = home / "cache" / "prompt-cache.key"
    key.parent.mkdir(parents=True)
    key.write_text("not a key\n")
    engine = Engine(settings.merged({"cache": {"enabled": True}}))
    with caplog.at_level(logging.WARNING, logger="nbllm"):
        first = engine.generate("the", **REQUEST)
        second = engine.generate("the", **REQUEST)
    assert first.text == second.text
    assert not second.stats.cached
    [warning] = [r.getMessage() for r in caplog.records if "Prompt cache turned off" in r.getMessage()]
    assert "prompt-cache.key" in warning
    engine.close()


def test_a_key_made_by_two_processes_at_once_is_one_key(tmp_path: Path) -> None:
    script = "from nbllm.core.prompt_cache import _signing_key, key_file; print(_signing_key(key_file()).hex())"
    env = {**os.environ, "NBLLM_HOME": str(tmp_path / "home")}
    runs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env) for _ in range(4)
    ]
    keys = {run.communicate(timeout=120)[0].strip() for run in runs}
    assert len(keys) == 1
    assert keys == {(tmp_path / "home" / "cache" / "prompt-cache.key").read_text().strip()}
