"""llama-bench-style benchmarks: records, ratings, JSON, comparison, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbllm.core.errors import InsufficientMemoryError, NbllmError, ParameterError
from nbllm.engine import Engine
from nbllm.measure import bench as benchmark


@pytest.mark.parametrize(
    ("speed", "label"), [(1.0, "slow"), (5.0, "okay"), (14.9, "okay"), (15, "good"), (45, "fast"), (60, "excellent")]
)
def test_results_are_labelled_with_the_guides_rating(speed: float, label: str) -> None:
    assert benchmark.rating(speed) == label


def test_a_benchmark_record_carries_model_settings_machine_and_build(engine: Engine) -> None:
    results = benchmark.bench(engine, None, pp=32, tg=8, repetitions=2, progress=False)
    pp, tg = results.records
    assert (pp["test"], tg["test"]) == ("pp32", "tg8")
    for record in (pp, tg):
        assert len(record["samples"]) == 2
        assert record["tokens_per_second"] == pytest.approx(sum(record["samples"]) / 2)
        assert record["std"] >= 0
        assert record["rating"] in {"slow", "okay", "good", "fast", "excellent"}
        assert record["model"]["name"] == "tiny-a"
        assert len(record["model"]["sha256"]) == 64
        assert record["model"]["quantization"] == "F32"
        assert record["model"]["size_bytes"] > 0
        assert record["settings"]["threads"] >= 1
        assert record["machine"]["physical_cores"] >= 1
        assert record["machine"]["ram_bytes"] > 0
        assert record["machine"]["read_bandwidth_bytes_per_second"] > 0
        assert record["build"]["llama_cpp_python"] == "0.3.36"
    assert tg["bandwidth_percent"] > 0
    assert tg["bytes_per_token"] > 0
    assert "bandwidth_percent" not in pp


def test_every_combination_of_models_and_settings_is_measured(engine: Engine) -> None:
    results = benchmark.bench(engine, ["tiny-a", "tiny-b"], pp=16, tg=4, repetitions=1, threads=[1, 2], progress=False)
    combos = {(r["model"]["name"], r["settings"]["threads"], r["test"]) for r in results.records}
    assert len(combos) == 2 * 2 * 2
    assert engine.registry.resident() == [], "benchmarks load their own copies and close them"


def test_callbacks_see_every_run_and_every_result(engine: Engine) -> None:
    runs: list[float] = []
    finished: list[str] = []
    benchmark.bench(
        engine, None, pp=16, tg=4, repetitions=3, progress=False,
        on_run=lambda record, speed: runs.append(speed), on_result=lambda record: finished.append(record["test"]),
    )  # fmt: skip
    assert len(runs) == 6
    assert finished == ["pp16", "tg4"]


def test_results_round_trip_through_json_and_compare(engine: Engine, tmp_path: Path) -> None:
    first = benchmark.bench(engine, None, pp=16, tg=4, repetitions=1, progress=False)
    second = benchmark.bench(engine, None, pp=16, tg=4, repetitions=1, progress=False)
    path = first.save(tmp_path / "a.json")
    loaded = benchmark.load_results(path)
    assert loaded.records == json.loads(path.read_text())["records"]
    table = benchmark.compare(loaded, second)
    assert [row["test"] for row in table] == ["pp16", "tg4"]
    assert all(row["B / A"] > 0 for row in table)
    assert "tiny-a" in str(first)


def test_results_whose_repetitions_disagree_are_flagged_unreliable(engine: Engine, tmp_path: Path) -> None:
    """Issue 18: 259 ± 237 t/s was shown as a result like any other. A file from a busy machine
    (the same records, as a noisy run writes them) is flagged in the table, in the CLI's and the
    notebook's output and in a comparison; a steady one is not."""
    results = benchmark.bench(engine, None, pp=16, tg=4, repetitions=3, progress=False)
    for record in results.records:
        assert record["spread_percent"] == pytest.approx(100 * record["std"] / record["tokens_per_second"])
        assert record["reliable"] is (record["spread_percent"] <= benchmark.UNRELIABLE_SPREAD_PERCENT)
    steady, noisy = json.loads(json.dumps(results.records)), json.loads(json.dumps(results.records))
    for record in steady:
        record.update(samples=[100.0, 103.0, 97.0], tokens_per_second=100.0, std=3.0)
    noisy[1].update(samples=[532.0, 120.0, 125.0], tokens_per_second=259.0, std=236.5)  # as seen: 259 ± 237
    noisy[0].update(samples=[100.0, 103.0, 97.0], tokens_per_second=100.0, std=3.0)
    steady_file, noisy_file = tmp_path / "steady.json", tmp_path / "noisy.json"
    benchmark.BenchResults(steady).save(steady_file)
    benchmark.BenchResults(noisy).save(noisy_file)

    calm = benchmark.load_results(steady_file)
    assert calm.warning is None
    assert "UNRELIABLE" not in str(calm)
    loaded = benchmark.load_results(noisy_file)
    rows = loaded.table()
    assert [row["spread"] for row in rows] == ["3%", "91% UNRELIABLE"]
    assert loaded.warning == (
        "Unreliable: the repetitions of tiny-a tg4 (91%) spread over 15% of the mean; close other programs and "
        "run again with more repetitions (-r 10)."
    )
    assert str(loaded).endswith("\n" + loaded.warning)
    assert loaded.warning in loaded._repr_html_().replace("&#x27;", "'")

    compared = subprocess.run(
        [sys.executable, "-m", "nbllm.cli", "bench", "--compare", str(steady_file), str(noisy_file)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    tg_line = next(line for line in compared.stdout.splitlines() if " tg4 " in line)
    assert tg_line.rstrip().endswith("B unreliable: spread 91%")
    assert "unreliable" not in next(line for line in compared.stdout.splitlines() if " pp16 " in line)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"repetitions": 0}, "repetitions = 0"),
        ({"pp": 0, "tg": 0}, "Nothing to run"),
        ({"tg": -5}, "tg = -5"),
        ({"pp": 600}, "context_size 512 is smaller"),
        ({"threads": [1, 0]}, "threads = 0: must be an integer from 1"),
        ({"batch_size": 0}, "batch_size = 0: must be an integer from 1"),
        ({"context_size": 1 << 30}, "context_size = 1073741824: must be an integer"),
        ({"gpu_layers": 5}, "cannot offload to a GPU"),  # this machine's build is CPU-only
    ],
)
def test_bad_benchmark_options_are_clear_errors(engine: Engine, options: dict[str, int], fragment: str) -> None:
    runs: list[float] = []
    with pytest.raises(ParameterError, match=fragment):
        benchmark.bench(
            engine, None, progress=False, on_run=lambda _r, speed: runs.append(speed), **{"pp": 16, "tg": 4, **options}
        )
    assert runs == [], "nothing ran before the mistake was found"


def test_a_run_that_would_not_fit_in_ram_is_refused_before_any_run(
    engine: Engine, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbllm.core.fit import estimate_memory
    from nbllm.core.gguf_file import read_gguf

    info = read_gguf(tiny_models["a"])
    small, large = (estimate_memory(info, ctx, 64).total for ctx in (512, 1 << 20))
    monkeypatch.setattr(benchmark.machine, "available_memory", lambda: (small + large) // 2)
    runs: list[float] = []
    with pytest.raises(InsufficientMemoryError, match=r"with context_size 1048576 needs about .*: lower context_size"):
        benchmark.bench(
            engine, None, progress=False, pp=16, tg=4, context_size=[512, 1 << 20], on_run=lambda _r, s: runs.append(s)
        )
    assert runs == [], "the run that fits did not go first only to be thrown away"


def test_unknown_models_and_unwritable_outputs_are_found_before_the_first_run(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    base = [sys.executable, "-m", "nbllm.cli", "bench", "-p", "16", "-n", "4", "-r", "1", "-q"]
    cases = {
        ("-m", str(tiny_models["a"]), "-m", "nothere"): "Unknown model 'nothere'",
        ("-m", str(tiny_models["a"]), "-o", str(tmp_path)): "is a folder: name a file",
        ("-m", str(tiny_models["a"]), "-o", str(tmp_path / "no" / "r.json")): "does not exist",
    }
    for args, fragment in cases.items():
        result = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr
        assert fragment in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == "", "no result was printed: nothing ran"


def test_a_file_that_is_not_results_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(NbllmError, match="not an nbllm benchmark results file"):
        benchmark.load_results(bad)
    with pytest.raises(NbllmError, match="No benchmark results"):
        benchmark.load_results(tmp_path / "missing.json")


def test_nbllm_bench_writes_the_guides_results_json(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "nbllm.cli", "bench", "-m", str(tiny_models["a"]), "-p", "16", "-n", "4", "-r", "1",
         "-t", "1,2", "-q", "-o", str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Saved 4 records" in result.stdout
    records = json.loads(out.read_text())["records"]
    assert {r["settings"]["threads"] for r in records} == {1, 2}
    compared = subprocess.run(
        [sys.executable, "-m", "nbllm.cli", "bench", "--compare", str(out), str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    assert "1.0" in compared.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "nbllm.cli", "bench", "-t", "one,two"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1
    assert "comma-separated list" in bad.stderr


def test_the_bandwidth_is_measured_once_and_keeps_its_best_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbllm.host import bandwidth

    monkeypatch.setenv("NBLLM_HOME", str(tmp_path))
    measured = bandwidth.measure_read_bandwidth(buffer_bytes=16 * 2**20)
    assert measured > 1e8, "at least 100 MB/s from any RAM"
    monkeypatch.setattr(bandwidth, "measure_read_bandwidth", lambda: 5e9)
    assert bandwidth.read_bandwidth() == 5e9
    monkeypatch.setattr(bandwidth, "measure_read_bandwidth", lambda: 1e9)  # a busy moment
    assert bandwidth.read_bandwidth() == 5e9, "cached"
    assert bandwidth.read_bandwidth(refresh=True) == 5e9, "a lower measurement never replaces a higher one"
    monkeypatch.setattr(bandwidth, "measure_read_bandwidth", lambda: 7e9)
    assert bandwidth.read_bandwidth(refresh=True) == 7e9
