"""Config files written by an attacker or by mistake (issue 13, "YAML alias bomb"): loading is
bounded in time and size, and an error message quotes a bounded part of any value.

The cases that hung before the fix run in a subprocess with a timeout, so that a regression fails
instead of hanging the suite.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbllm.core.config import MAX_CONFIG_BYTES, Settings, load_file, parse_assignment, shown, validate
from nbllm.core.errors import ConfigError


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The billion-laughs shape as a flow-style YAML value: ``width`` strings, then each further
    level ``width`` aliases of the one below (9 x 9: 387 million strings once expanded)."""
    names = [chr(97 + i) for i in range(levels)]
    value = f"&{names[0]} [" + ", ".join(["lol"] * width) + "]"
    for below, name in itertools.pairwise(names):
        value = f"&{name} [" + ", ".join([value] + [f"*{below}"] * (width - 1)) + "]"
    return value


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_nbllm_config_check_refuses_an_alias_bomb_at_once(tmp_path: Path) -> None:
    bomb = write(tmp_path / "bomb.yaml", f"performance:\n  threads: {alias_bomb()}\n")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "nbllm.cli", "config", "--check", str(bomb)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert time.monotonic() - started < 30
    assert result.returncode == 1, result.stderr
    assert "aliases expanded" in result.stderr
    assert "more than 10,000 values" in result.stderr
    assert "line 2" in result.stderr, "it says where"
    assert "Traceback" not in result.stderr
    assert len(result.stderr) < 1000


def test_load_file_refuses_an_alias_bomb_anywhere_with_a_config_error(tmp_path: Path) -> None:
    places = {
        "threads": f"performance:\n  threads: {alias_bomb()}\n",
        "models": f"models:\n  big: {alias_bomb()}\n",
        "path": f"models:\n  big:\n    path: {alias_bomb()}\n",
        "top": f"default_model: {alias_bomb()}\n",
        "key": f"performance:\n  ? {alias_bomb(levels=6)}\n  : 1\n",
    }
    for name, text in places.items():
        write(tmp_path / f"{name}.yaml", text)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from nbllm.core.config import load_file\n"
        "from nbllm.core.errors import ConfigError\n"
        f"for name in {sorted(places)!r}:\n"
        "    try:\n"
        f"        load_file(Path({str(tmp_path)!r}) / (name + '.yaml'))\n"
        "    except ConfigError as error:\n"
        "        print(name, len(str(error)), 'aliases expanded' in str(error))\n"
        "    else:\n"
        "        print(name, 'loaded')\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    for line in result.stdout.splitlines():
        name, size, refused = line.split()
        assert refused == "True", line
        assert int(size) < 1000, line


def test_a_value_that_contains_itself_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="an alias refers to the value that contains it"):
        load_file(write(tmp_path / "loop.yaml", "performance:\n  threads: &a [1, *a]\n"))


def test_ordinary_aliases_and_merge_keys_still_load(tmp_path: Path) -> None:
    text = (
        "performance:\n  threads: &two 2\n  parallel: *two\n"
        "remote_models:\n"
        "  big: &box\n    url: http://gpu-box:8080/v1\n    context_size: 8192\n"
        "  small:\n    <<: *box\n    model: small\n"
    )
    settings = load_file(write(tmp_path / "aliases.yaml", text))
    assert (settings.performance.threads, settings.performance.parallel) == (2, 2)
    assert settings.remote_models["small"].url == "http://gpu-box:8080/v1"
    assert settings.remote_models["small"].context_size == 8192


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("performance:\n  threads: " + "1" * 5000 + "\n", "4300 digits"),
        ("generation:\n  seed: 2024-13-45\n", "month must be in 1..12"),
        ("performance:\n  threads: " + "[" * 5000 + "\n", "nested too deeply"),
    ],
    ids=["a-5000-digit-number", "an-impossible-date", "deep-nesting"],
)
def test_what_the_yaml_parser_raises_besides_syntax_errors_is_a_config_error(
    tmp_path: Path, text: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_file(write(tmp_path / "odd.yaml", text))
    assert fragment in str(caught.value)
    assert len(str(caught.value)) < 1000
    assert caught.value.__cause__ is None, "one line, not the parser's traceback"


def test_a_file_over_the_size_bound_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match="over 1,048,576 bytes"):
        load_file(big)


def test_huge_values_and_keys_are_cut_short_in_messages() -> None:
    cases = [
        {"performance": {"threads": "x" * 1_000_000}},
        {"performance": {"threads": list(range(1_000_000))}},
        {"performance": {"threads": 10**5000}},
        {"performance": {"k" * 1_000_000: 1}},
        {"k" * 1_000_000: {}},
        {"models": {"m" * 1_000_000: 5}},
        {"models": {"m": {"deep": [[[[[["x" * 1_000_000]]]]]]}}},
        {"default_model": ["y" * 1_000_000]},
        {"remote_models": {"r": {"url": "ftp://" + "z" * 1_000_000}}},
    ]
    for data in cases:
        with pytest.raises(ConfigError) as caught:
            validate(data, source="test.yaml")
        assert len(str(caught.value)) < 1000, str(caught.value)[:300]
    with pytest.raises(ConfigError, match=r"performance\.threads = 'xxx.*\.\.\..*xxx' in test\.yaml"):
        validate({"performance": {"threads": "x" * 1_000_000}}, source="test.yaml")
    with pytest.raises(ConfigError, match=r"an integer of about 5,001 digits"):
        validate({"performance": {"threads": 10**5000}})


def test_a_shared_structure_in_a_message_is_quoted_in_bounded_time() -> None:
    # Built in Python (nbllm.configure takes dicts): the same 9 x 9 sharing as the YAML bomb.
    code = (
        "import time\n"
        "from nbllm.core.config import validate\n"
        "from nbllm.core.errors import ConfigError\n"
        "value = ['lol'] * 9\n"
        "for _ in range(8):\n"
        "    value = [value] * 9\n"
        "started = time.monotonic()\n"
        "for data in ({'performance': {'threads': value}}, {'models': {'m': value}}, {'default_model': value}):\n"
        "    try:\n"
        "        validate(data)\n"
        "    except ConfigError as error:\n"
        "        print(len(str(error)))\n"
        "print(round(time.monotonic() - started, 3))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    *sizes, seconds = result.stdout.split()
    assert len(sizes) == 3
    assert all(int(size) < 1000 for size in sizes)
    assert float(seconds) < 5


def test_shown_values_keep_small_ones_exactly_as_repr() -> None:
    for value in (True, None, "", -5, 1.5, "abc", [1, 2], {"a": 1}, (1,), set(), 10**30):
        assert shown(value) == repr(value)
    cut = shown("x" * 10_000)
    assert len(cut) <= 120
    assert cut.startswith("'xxx")
    assert cut.endswith("xxx'")
    assert "..." in cut


def test_assignments_refuse_an_alias_bomb_too() -> None:
    with pytest.raises(ConfigError, match="aliases expanded"):
        parse_assignment(f"performance.threads={alias_bomb()}")
    assert parse_assignment("performance.threads=4") == {"performance": {"threads": 4}}


def test_the_server_section_has_a_request_timeout() -> None:
    assert Settings().server.request_timeout == 600.0
    assert validate({"server": {"request_timeout": 2.5}}).server.request_timeout == 2.5
    assert validate({"server": {"request_timeout": None}}).server.request_timeout is None
    for bad in (0, -1, 10**6, "soon"):
        with pytest.raises(ConfigError, match=r"server\.request_timeout = "):
            validate({"server": {"request_timeout": bad}})
