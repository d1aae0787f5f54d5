"""The console script, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def nbllm_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbllm.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_run_streams_an_answer_and_ends_with_the_stats_line(tiny_models: dict[str, Path]) -> None:
    result = nbllm_cli("run", "the", "--model", str(tiny_models["a"]), "-n", "8", "--seed", "1", "--raw")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Generated ")
    assert " t/s)" in last
    assert "model tiny-a" in last


def test_run_takes_the_prompt_from_stdin(tiny_models: dict[str, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nbllm.cli", "run", "--model", str(tiny_models["a"]), "-n", "4"],
        input="hello there",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Generated" in result.stderr


def test_run_with_a_seed_is_reproducible(tiny_models: dict[str, Path]) -> None:
    args = ("run", "the", "--model", str(tiny_models["a"]), "-n", "10", "--seed", "4", "-t", "1.0", "--no-cache")
    first, second = nbllm_cli(*args), nbllm_cli(*args)
    assert first.stdout == second.stdout
    assert "from prompt cache" not in second.stderr


def test_a_repeated_run_comes_from_the_prompt_cache(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    env = {"NBLLM_HOME": str(tmp_path)}
    args = ("run", "the", "--model", str(tiny_models["a"]), "-n", "10", "--seed", "5")
    first, second = nbllm_cli(*args, env=env), nbllm_cli(*args, env=env)
    assert first.stdout == second.stdout
    assert "from prompt cache" not in first.stderr
    assert "from prompt cache" in second.stderr


def test_an_unknown_model_is_one_clear_line_and_exit_1() -> None:
    result = nbllm_cli("run", "hi", "--model", "gemma-3-207m")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "nbllm: error: Unknown model 'gemma-3-207m'. Did you mean 'gemma-3-270m'? See nbllm.models()."
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--temperature", "9"), "temperature = 9.0"),
        (("--max-tokens", "0"), "max_tokens = 0"),
    ],
)
def test_out_of_range_options_are_clear_errors(
    tiny_models: dict[str, Path], args: tuple[str, ...], fragment: str
) -> None:
    result = nbllm_cli("run", "hi", "--model", str(tiny_models["a"]), *args)
    assert result.returncode == 1
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_a_malformed_option_is_a_usage_error() -> None:
    result = nbllm_cli("run", "hi", "--max-tokens", "many")
    assert result.returncode == 2
    assert "invalid int value" in result.stderr


def test_a_bad_config_file_is_reported_with_its_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache:\n  model_cache_sise: 2\n")
    result = nbllm_cli("config", "--check", str(bad))
    assert result.returncode == 1
    assert "Did you mean 'model_cache_size'?" in result.stderr
    result = nbllm_cli("--config", str(bad), "models")
    assert result.returncode == 1


def test_config_shows_the_settings_in_effect(tmp_path: Path) -> None:
    good = tmp_path / "nbllm.yaml"
    good.write_text("performance:\n  context_size: 1024\n")
    result = nbllm_cli("config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"# source: {good}" in result.stdout
    assert "performance.context_size = 1024" in result.stdout
    assert "generation.top_k = 40" in result.stdout


def test_models_lists_the_default_model() -> None:
    result = nbllm_cli("models")
    assert result.returncode == 0, result.stderr
    assert "gemma-3-270m" in result.stdout


def test_no_command_prints_help_and_exits_2() -> None:
    result = nbllm_cli()
    assert result.returncode == 2
    assert "run" in result.stdout
