"""The measured autotuner: what it tries, what it picks, what it remembers and when it is used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbllm.core import identity, paths
from nbllm.core.config import Settings
from nbllm.engine import Engine
from nbllm.host import machine, tuned_settings
from nbllm.measure import tuner
from tests.test_hardware import RTX3060, FakeGpuBackend, fake_nvml


@pytest.fixture
def tuning_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NBLLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_thread_candidates_stay_within_the_usable_cpus() -> None:
    assert tuner.thread_candidates(2, 2) == [1, 2]
    assert tuner.thread_candidates(16, 32) == [1, 8, 16, 32]
    assert tuner.thread_candidates(16, 4) == [1, 4]


def test_tuning_tries_threads_then_batch_sizes_and_keeps_the_fastest(engine: Engine, tuning_home: Path) -> None:
    result = tuner.tune(engine, progress=False)
    thread_trials = [t for t in result.trials if t.pp == 0]
    batch_trials = [t for t in result.trials if t.pp > 0]
    assert [t.threads for t in thread_trials][:2] == tuner.thread_candidates(
        machine.physical_cores(), machine.usable_cpus()
    )[:2]
    assert {t.batch_size for t in batch_trials} == {b for b in tuner.BATCH_CANDIDATES_CPU if b <= 512}
    fastest_threads = max(thread_trials, key=lambda t: t.tg)
    assert result.best.threads == fastest_threads.threads
    assert result.best.batch_size == max(batch_trials, key=lambda t: t.pp).batch_size
    assert result.best in result.trials
    assert all(t.seconds > 0 for t in result.trials)
    assert "best" in str(result)
    assert result.rows()[0].keys() >= {"threads", "batch_size", "tg t/s", "pp t/s"}


def test_the_result_is_saved_per_model_file_and_machine(engine: Engine, tuning_home: Path) -> None:
    result = tuner.tune(engine, progress=False)
    store = json.loads((paths.data_dir() / "tuning.json").read_text())
    sha = identity.file_sha256(engine.registry.resolve(None).path)
    saved = store[machine.machine_id()][sha]
    assert saved["threads"] == result.best.threads
    assert saved["batch_size"] == result.best.batch_size
    assert tuned_settings.saved_settings(sha) == saved


def test_tuned_settings_are_used_when_the_config_says_auto(settings: Settings, tuning_home: Path) -> None:
    sha = identity.file_sha256(Path(settings.models["tiny-a"]))
    fake = tuner.TuneResult(
        model="tiny-a",
        model_sha256=sha,
        machine=machine.machine_id(),
        best=tuner.Trial(threads=1, batch_size=128, gpu_layers=0, flash_attention=False, tg=1.0),
    )
    tuner.save_result(fake)
    settings = settings.merged({"performance": {"threads": None, "batch_size": None}})
    auto = Engine(settings)
    auto.generate("the", max_tokens=2, seed=1)
    [resident] = auto.registry.resident()
    assert (resident.settings.threads, resident.settings.batch_size) == (1, 128)
    pinned = Engine(settings.merged({"performance": {"threads": 2, "batch_size": 64}}))
    pinned.generate("the", max_tokens=2, seed=1)
    [resident] = pinned.registry.resident()
    assert (resident.settings.threads, resident.settings.batch_size) == (2, 64), "explicit config wins"
    other = Engine(settings)
    other.generate("the", model="tiny-b", max_tokens=2, seed=1)
    assert other.registry.resident()[0].settings.batch_size == 512, "another file is not tuned: the default"


def test_a_new_tune_applies_at_the_next_load(engine: Engine, tuning_home: Path) -> None:
    engine.configure(performance={"batch_size": None})
    engine.generate("the", max_tokens=2, seed=1)
    result = tuner.tune(engine, progress=False)
    engine.generate("the", max_tokens=2, seed=1)
    [resident] = engine.registry.resident()
    assert resident.settings.threads == result.best.threads
    assert resident.settings.batch_size == result.best.batch_size


def test_a_dry_run_saves_nothing(engine: Engine, tuning_home: Path) -> None:
    tuner.tune(engine, progress=False, save=False)
    assert not (paths.data_dir() / "tuning.json").exists()


def test_on_a_gpu_it_also_tries_layers_and_flash_attention(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, tuning_home: Path
) -> None:
    fake_nvml(monkeypatch, [RTX3060])
    backend = FakeGpuBackend(max_layers=99)
    engine = Engine(settings.merged({"performance": {"gpu_layers": -1}}), backend=backend)
    result = tuner.tune(engine, progress=False)
    gpu_trials = [(t.gpu_layers, t.flash_attention) for t in result.trials if t.pp and t.gpu_layers]
    assert (3, False) in gpu_trials
    assert (3, True) in gpu_trials
    assert {b for b in tuner.BATCH_CANDIDATES_GPU if b <= 512} <= {t.batch_size for t in result.trials}
    engine.close()


def test_gpu_trials_that_run_out_of_memory_are_recorded_not_fatal(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, tuning_home: Path
) -> None:
    fake_nvml(monkeypatch, [RTX3060])
    backend = FakeGpuBackend(max_layers=2)
    engine = Engine(settings.merged({"performance": {"gpu_layers": 2}}), backend=backend)
    result = tuner.tune(engine, progress=False, gpu=True)
    failed = [t for t in result.trials if t.error]
    assert failed
    assert all("out of GPU memory" in str(t.error) for t in failed)
    assert result.best.error is None
    engine.close()


def test_nbllm_tune_and_doctor_in_a_terminal(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "NBLLM_HOME": str(tmp_path)}
    tune = subprocess.run(
        [sys.executable, "-m", "nbllm.cli", "tune", "--model", str(tiny_models["a"]), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert tune.returncode == 0, tune.stderr
    assert "Tuned tiny-a" in tune.stdout
    assert "Saved" in tune.stdout
    doctor = subprocess.run(
        [sys.executable, "-m", "nbllm.cli", "doctor", "--model", str(tiny_models["a"])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "instruction sets" in doctor.stdout
    assert "Troubleshooting" in doctor.stdout
    assert "guide" not in doctor.stdout.lower()


def test_doctor_names_no_guide_the_user_cannot_look_up(monkeypatch: pytest.MonkeyPatch, engine: Engine) -> None:
    """Issue 18: "the guide's rule of thumb" and "Troubleshooting (from the guide)" named a
    document no user has; the advice stands on its own."""
    from nbllm.measure.doctor import diagnose

    fake_nvml(monkeypatch, [RTX3060])
    report = str(diagnose(engine))
    assert "GPU layers: estimate" in report
    assert "rule of thumb: " in report
    assert "\nTroubleshooting\n" in report
    assert "guide" not in report.lower()
