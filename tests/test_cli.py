"""The console script, run as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from nbllm.cli.main import _split_lab_arguments
from tests.servers import free_port, stop_server, wait_for_server


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
    result = nbllm_cli("run", "the", "--model", str(tiny_models["a"]), "-n", "8", "--seed", "1", "--raw", "--no-cache")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Generated ")
    assert " t/s)" in last
    assert "model tiny-a" in last


def test_an_answer_cut_at_max_tokens_is_marked_before_the_stats_line(tiny_models: dict[str, Path]) -> None:
    """Issue 18: an answer that hit its token budget ended mid-sentence with no sign of it."""
    result = nbllm_cli("run", "the", "--model", str(tiny_models["a"]), "-n", "5", "--seed", "1", "--raw", "--no-cache")
    assert result.returncode == 0, result.stderr
    note, stats = result.stderr.strip().splitlines()[-2:]
    assert note == "[cut off at the 5-token limit: raise max_tokens (-n in %%llm and the CLI) for the rest]"
    assert stats.startswith("Generated 5 tokens")
    assert "cut off" not in result.stdout, "the answer itself stays clean for `> answer.txt`"


def test_run_takes_the_prompt_from_stdin(tiny_models: dict[str, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nbllm.cli", "run", "--model", str(tiny_models["a"]), "-n", "4", "--no-cache"],
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
    assert "from the prompt cache" not in second.stderr


def test_a_repeated_run_comes_from_the_prompt_cache(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    env = {"NBLLM_HOME": str(tmp_path)}
    args = ("run", "the", "--model", str(tiny_models["a"]), "-n", "10", "--seed", "5")
    first, second = nbllm_cli(*args, env=env), nbllm_cli(*args, env=env)
    assert first.stdout == second.stdout
    assert "from the prompt cache" not in first.stderr
    assert "from the prompt cache" in second.stderr


def test_an_unknown_model_is_one_clear_line_and_exit_1() -> None:
    result = nbllm_cli("run", "hi", "--model", "gemma-3-207m")
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith(
        "nbllm: error: Unknown model 'gemma-3-207m'. Did you mean 'gemma-3-270m'? Known: smollm2-135m, gemma-3-270m"
    )
    assert line.endswith("; or give the path of a .gguf file.")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--temperature", "9"), "temperature = 9.0"),
        (("--max-tokens", "0"), "max_tokens = 0"),
        (("--top-p", "nan"), "top_p = nan"),
        (("--raw", "--system", "be brief"), "--system applies to a chat"),
    ],
)
def test_out_of_range_options_are_clear_errors(
    tiny_models: dict[str, Path], args: tuple[str, ...], fragment: str
) -> None:
    result = nbllm_cli("run", "hi", "--model", str(tiny_models["a"]), *args)
    assert result.returncode == 1
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def console_script(*args: str, stdin: str | None = "") -> subprocess.CompletedProcess[str]:
    """The installed ``nbllm`` console script itself (what a user types), beside this Python."""
    script = Path(sys.executable).parent / "nbllm"
    return subprocess.run([str(script), *args], input=stdin, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("run", "--temprature", "0.3", "hi"),
            "nbllm run: error: unrecognized arguments: --temprature. Did you mean '--temperature'? "
            "nbllm run --help lists the options.",
        ),
        (
            ("run", "--temprature=0.3", "hi"),
            "nbllm run: error: unrecognized arguments: --temprature=0.3. Did you mean '--temperature'? "
            "nbllm run --help lists the options.",
        ),
        (
            ("rnu", "hi"),
            "nbllm: error: unknown command 'rnu'. Did you mean 'run'? Commands: run, models, serve, … "
            "doctor, tune. nbllm --help lists the commands.",
        ),
        (
            ("models", "lsit"),
            "nbllm models: error: unknown subcommand 'lsit'. Did you mean 'list'? Subcommands: list, recommend, "
            "download, verify, info, rm. nbllm models --help lists the commands.",
        ),
        (
            ("bench", "--repetitons", "3"),
            "nbllm bench: error: unrecognized arguments: --repetitons 3. Did you mean '--repetitions'? "
            "nbllm bench --help lists the options.",
        ),
        (
            ("serve", "--prot", "8001"),
            "nbllm serve: error: unrecognized arguments: --prot 8001. Did you mean '--port'? "
            "nbllm serve --help lists the options.",
        ),
        (
            ("run", "--max-tokens", "many", "hi"),
            "nbllm run: error: argument --max-tokens/-n: invalid int value: 'many'. "
            "nbllm run --help lists the options.",
        ),
        (
            ("models", "recommend", "--ram", "lots"),
            "nbllm models recommend: error: argument --ram: 'lots' is not a size such as 16GB or 512MiB. "
            "nbllm models recommend --help lists the options.",
        ),
        (
            ("models", "download"),
            "nbllm models download: error: the following arguments are required: name. "
            "nbllm models download --help lists the options.",
        ),
        (
            ("run", "hi", "--model"),
            "nbllm run: error: argument --model/-m: expected one argument. nbllm run --help lists the options.",
        ),
        (
            ("doctor", "extra"),
            "nbllm doctor: error: unrecognized arguments: extra. nbllm doctor --help lists the options.",
        ),
        (
            ("tune", "--dryrun"),
            "nbllm tune: error: unrecognized arguments: --dryrun. Did you mean '--dry-run'? "
            "nbllm tune --help lists the options.",
        ),
    ],
)
def test_every_usage_mistake_is_one_line_with_a_suggestion_and_exit_1(args: tuple[str, ...], line: str) -> None:
    """As the magic words them (issue 18: argparse printed the top-level usage and exited 2).
    An ellipsis in ``line`` stands for any text (the list of commands grows)."""
    result = console_script(*args)
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    pattern = ".*".join(re.escape(part) for part in line.split("…"))
    assert re.fullmatch(pattern + "\n", result.stderr), result.stderr


def read_terminal(leader: int, quiet_for: float | None = None) -> bytes:
    """All a pseudo-terminal's program wrote, until it closed the terminal (or, with
    ``quiet_for``, went that many seconds without writing); closes ``leader``."""
    output = b""
    while quiet_for is None or select.select([leader], [], [], quiet_for)[0]:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process has ended
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    return output


def test_run_without_a_prompt_in_a_terminal_says_so_instead_of_waiting() -> None:
    import pty

    leader, follower = pty.openpty()
    script = Path(sys.executable).parent / "nbllm"
    process = subprocess.Popen([str(script), "run"], stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    output = read_terminal(leader, quiet_for=60)  # nothing for a minute: it waits for the terminal
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"nbllm run waited for a prompt on the terminal; it printed {output!r}")
    assert code == 1
    assert output.decode().strip() == (
        'nbllm: error: No prompt: give it as an argument (nbllm run "What is Docker?") or pipe it in.'
    )


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
    assert "smollm2-135m" in result.stdout
    assert "gemma-3-270m" in result.stdout


def test_no_command_prints_help_and_exits_1() -> None:
    result = nbllm_cli()
    assert result.returncode == 1
    assert "run" in result.stdout


def test_lab_opens_the_quickstart_and_passes_jupyterlab_options_through(tmp_path: Path) -> None:
    """``nbllm lab --no-browser --port P ...``: options nbllm does not know go to JupyterLab as
    given (argparse alone refused an option in first place), and the quickstart is served."""
    pytest.importorskip("jupyterlab", reason="the lab extra is not installed")
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),  # none of the developer's settings
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
    }
    command = [
        sys.executable, "-m", "nbllm.cli", "lab", "--no-browser", "--port", str(port), "--ServerApp.port_retries=0",
        "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
        f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
    log_path = tmp_path / "lab.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for_server(f"{base}/api/status?token={token}", server, log_path)
            url = f"{base}/api/contents/01_quickstart.ipynb?content=0&token={token}"
            with urllib.request.urlopen(url, timeout=30) as response:
                assert json.load(response)["type"] == "notebook"
        finally:
            stop_server(server)
    assert "Starting JupyterLab at" in log_path.read_text(errors="replace")


@pytest.mark.parametrize(
    ("argv", "own", "passed_on"),
    [
        (["lab", "--port", "8889"], ["lab"], ["--port", "8889"]),
        (["-c", "my.yaml", "-v", "lab", "--no-browser"], ["-c", "my.yaml", "-v", "lab"], ["--no-browser"]),
        (["lab", "--help"], ["lab", "--help"], []),  # nbllm's own help for its lab command
        (["run", "lab", "--port", "1"], ["run", "lab", "--port", "1"], []),  # "lab" as a prompt word
    ],
)
def test_only_what_follows_the_lab_command_goes_to_jupyterlab(
    argv: list[str], own: list[str], passed_on: list[str]
) -> None:
    assert _split_lab_arguments(argv) == (own, passed_on)


def test_a_reader_that_goes_away_ends_the_run_without_a_traceback(tiny_models: dict[str, Path]) -> None:
    """``nbllm run ... | head -c 5``: the pipe closes while the answer streams."""
    process = subprocess.Popen(
        [sys.executable, "-m", "nbllm.cli", "run", "the", "--model", str(tiny_models["a"]), "-n", "400", "--raw"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()  # as head does once it has its bytes; here before the first one
    errors = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141, errors
    assert "Traceback" not in errors


def test_verbose_log_lines_start_on_their_own_line_in_a_terminal(tiny_models: dict[str, Path]) -> None:
    """With -v the log says "Generated ..." when the answer ends, before the answer's newline."""
    import pty

    leader, follower = pty.openpty()
    command = [sys.executable, "-m", "nbllm.cli", "-v", "run", "the", "--model", str(tiny_models["a"])]
    process = subprocess.Popen(
        [*command, "-n", "6", "--seed", "1", "--raw", "--no-cache"], stdout=follower, stderr=follower
    )
    os.close(follower)
    output = read_terminal(leader)
    assert process.wait(timeout=120) == 0
    lines = output.decode(errors="replace").replace("\r\n", "\n").split("\n")
    logged = [i for i, line in enumerate(lines) if line.startswith("Generated ") and line.endswith("t/s)")]
    assert logged, f"the log line is on a line of its own: {lines}"
    following = lines[logged[0] + 1 :]
    if "cut off at the 6-token limit" in following[0]:  # the truncation mark comes before the stats line
        following = following[1:]
    assert "model tiny-a" in following[0], f"the stats line follows it, with no blank line: {lines}"


def test_config_check_warns_about_a_default_model_that_is_not_here(tmp_path: Path) -> None:
    config = tmp_path / "nbllm.yaml"
    config.write_text("default_model: gemma-3-207m\n")
    result = nbllm_cli("config", "--check", str(config))
    assert result.returncode == 0, "the file itself is valid"
    assert "warning: default_model: Unknown model 'gemma-3-207m'. Did you mean 'gemma-3-270m'?" in result.stderr
