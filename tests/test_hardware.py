"""Hardware report, GPU fit estimate, doctor, GPU out-of-memory recovery.

There is no GPU here: NVML is replaced at nvidia-ml-py's function boundary (``pynvml.nvml*``)
to play GPUs of several sizes, none, or a failing driver; GPU loads go through a backend that
wraps the real llama.cpp one and plays a card that runs out of memory above some layer count.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from nbllm.backends.base import LoadSettings, ModelSpec
from nbllm.backends.llama_cpp import LlamaCppBackend
from nbllm.core.config import Settings
from nbllm.core.errors import GpuOutOfMemoryError
from nbllm.core.fit import (
    GPU_MARGIN,
    GPU_RESERVE_BYTES,
    fit_gpu_layers,
    gpu_bytes_for,
    kv_cache_bytes,
    layer_weight_bytes,
    output_weight_bytes,
    rule_of_thumb,
)
from nbllm.core.gguf_file import read_gguf
from nbllm.engine import Engine
from nbllm.host import build_flags, machine
from nbllm.host.gpu import gpu_status
from nbllm.measure.doctor import diagnose

GiB = 2**30


@dataclass
class FakeCard:
    name: str
    total: int
    free: int
    utilization: int = 7


def fake_nvml(monkeypatch: pytest.MonkeyPatch, cards: list[FakeCard], init_error: Exception | None = None) -> None:
    """NVML as nvidia-ml-py exposes it, playing ``cards``."""

    def init() -> None:
        if init_error is not None:
            raise init_error

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "580.159.04")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: len(cards))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: cards[i])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda card: card.name)
    monkeypatch.setattr(
        pynvml,
        "nvmlDeviceGetMemoryInfo",
        lambda card: SimpleNamespace(total=card.total, free=card.free, used=card.total - card.free),
    )
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda card: SimpleNamespace(gpu=card.utilization))
    machine.machine_id.cache_clear()


H100 = FakeCard("NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB)
RTX3060 = FakeCard("NVIDIA GeForce RTX 3060", 12 * GiB, 11 * GiB)
SMALL = FakeCard("NVIDIA T400", 2 * GiB, 600 * 2**20)


# ---------------------------------------------------------------------------- NVML


@pytest.mark.parametrize("cards", [[H100], [RTX3060, SMALL]])
def test_gpus_are_reported_with_memory_driver_and_utilization(
    monkeypatch: pytest.MonkeyPatch, cards: list[FakeCard]
) -> None:
    fake_nvml(monkeypatch, cards)
    status = gpu_status()
    assert status.problem is None
    assert [g.name for g in status.gpus] == [c.name for c in cards]
    assert status.gpus[0].memory_total == cards[0].total
    assert status.gpus[0].memory_free == cards[0].free
    assert status.gpus[0].utilization_percent == 7
    assert status.gpus[0].driver == "580.159.04"
    report = machine.hardware_report()
    assert cards[0].name in str(report)
    assert "driver 580.159.04" in str(report)


def test_no_driver_means_no_gpu_and_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml(monkeypatch, [], init_error=pynvml.NVMLError_LibraryNotFound(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    status = gpu_status()
    assert status.gpus == ()
    assert status.problem is None
    assert "GPU               none" in str(machine.hardware_report())


def test_a_failing_driver_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml(monkeypatch, [], init_error=pynvml.NVMLError_DriverNotLoaded(pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    status = gpu_status()
    assert status.gpus == ()
    assert status.problem is not None
    assert "did not answer" in status.problem


def test_this_machine_really_has_no_nvidia_driver() -> None:
    # The real NVML, unpatched: nvidia-ml-py is installed, the driver is not.
    status = gpu_status()
    assert status.gpus == ()


def test_the_report_lists_cpu_cores_instruction_sets_memory_and_build() -> None:
    report = machine.hardware_report(LlamaCppBackend().build_info())
    assert report.physical_cores >= 1
    assert report.logical_cpus >= report.physical_cores
    assert report.memory_available <= report.memory_total
    assert "avx2" in report.instruction_sets or machine.platform.machine() != "x86_64"
    assert "AVX2" in report.build_features or machine.platform.machine() != "x86_64"
    assert report.build["gpu_offload"] is False
    assert "llama-cpp-python 0.3.36" in str(report)
    assert "<table>" in report._repr_html_()


# ---------------------------------------------------------------------------- the estimate, by hand


def test_layer_bytes_match_a_hand_count_of_the_tiny_models_tensors(tiny_models: dict[str, Path]) -> None:
    info = read_gguf(tiny_models["a"])  # n_embd 64, 2 layers, 4 heads, 2 KV heads, n_ff 128, F32
    n_embd, kv_dim, n_ff, f32 = 64, 2 * 16, 128, 4
    per_layer = f32 * (
        n_embd  # attn_norm
        + n_embd * n_embd  # q
        + 2 * kv_dim * n_embd  # k, v
        + n_embd * n_embd  # output
        + n_embd  # ffn_norm
        + 3 * n_ff * n_embd  # gate, up, down
    )
    assert layer_weight_bytes(info) == [per_layer, per_layer]
    assert output_weight_bytes(info) == f32 * (info.vocab_size * n_embd + n_embd)
    # KV: context x layers x KV heads x (key + value head size) x f16
    assert kv_cache_bytes(info, 512) == 512 * 2 * 2 * (16 + 16) * 2


def test_gemmas_kv_cache_matches_llama_cpps_own_allocation(gemma_model_path: Path) -> None:
    info = read_gguf(gemma_model_path)
    # llama.cpp logs 12.00 MiB + 60.00 MiB of KV cache for Gemma 3 270M at 4,096 tokens:
    # 18 layers x 4096 x 1 KV head x (256 + 256) x 2 bytes.
    assert kv_cache_bytes(info, 4096) == 18 * 4096 * 1 * 512 * 2 == 72 * 2**20
    # Gemma ties its output to the token embedding: layers + that + the output norm are every tensor.
    assert sum(layer_weight_bytes(info)) + output_weight_bytes(info) == info.tensor_bytes


def test_gpu_bytes_add_up_layers_kv_compute_and_reserve(tiny_models: dict[str, Path]) -> None:
    info = read_gguf(tiny_models["a"])
    layers = layer_weight_bytes(info)
    one = gpu_bytes_for(info, 1, 512, 64)
    everything = gpu_bytes_for(info, 3, 512, 64)
    kv_per_layer = kv_cache_bytes(info, 512) // 2
    assert gpu_bytes_for(info, 0, 512, 64) == 0
    assert one - GPU_RESERVE_BYTES > layers[1] + kv_per_layer, "the last layer is the first offloaded"
    # The output layer adds its weights and the logits of one batch (vocab x batch x f32).
    two = gpu_bytes_for(info, 2, 512, 64)
    assert everything - two == output_weight_bytes(info) + 64 * 4 * info.vocab_size


def hand_count_gpu_bytes(layer_sizes: list[int], k: int, output_bytes: int) -> int:
    """Gemma 3 270M on the GPU, counted by hand from its metadata, context 4096, batch 512:
    n_embd 640, n_ff 2048, 4 heads, 1 KV head of 256 (K) + 256 (V), vocabulary 262,144."""
    mib = 2**20
    kv_per_layer = 4096 * 1 * (256 + 256) * 2  # 4 MiB, f16
    activations = 512 * 4 * (4 * 640 + 2048)  # one micro-batch of hidden states, f32
    scores = 512 * 4096 * 4 * 4  # attention scores of one micro-batch, f32
    logits = 512 * 4 * 262_144 if k > 18 else 0  # only when the output layer is on the GPU
    weights = sum(layer_sizes[18 - min(k, 18) :]) + (output_bytes if k > 18 else 0)
    return weights + min(k, 18) * kv_per_layer + activations + scores + logits + 16 * mib + 384 * mib


@pytest.mark.parametrize("free_mib", [420, 470, 500, 540, 600, 700, 1300, 80 * 1024])
def test_gemmas_layer_estimate_matches_a_hand_count(gemma_model_path: Path, free_mib: int) -> None:
    info = read_gguf(gemma_model_path)
    layer_sizes = layer_weight_bytes(info)
    output_bytes = output_weight_bytes(info)
    free = free_mib * 2**20
    budget = free * (1 - GPU_MARGIN)
    expected = max((k for k in range(20) if hand_count_gpu_bytes(layer_sizes, k, output_bytes) <= budget), default=0)
    fit = fit_gpu_layers(info, free, free, 4096, 512)
    assert fit.layers == expected
    if expected:
        assert fit.gpu_bytes == hand_count_gpu_bytes(layer_sizes, expected, output_bytes)


def test_the_estimate_spans_nothing_some_and_everything(gemma_model_path: Path) -> None:
    info = read_gguf(gemma_model_path)
    layers = [fit_gpu_layers(info, m * 2**20, m * 2**20, 4096, 512).layers for m in (420, 500, 700, 80 * 1024)]
    assert layers[0] == 0
    assert 0 < layers[1] < 18
    assert layers[2] == 18, "every repeating layer, but not the 682 MiB output layer"
    assert layers[3] == 19, "everything, the output layer included"


def test_the_rule_of_thumb_is_shown_beside_the_estimate(gemma_model_path: Path) -> None:
    info = read_gguf(gemma_model_path)
    assert rule_of_thumb(info, 80 * GiB) == (19, "model < half the VRAM: all layers")
    assert rule_of_thumb(info, 400 * 2**20) == (9, "model < VRAM: half the layers")
    assert rule_of_thumb(info, 200 * 2**20) == (0, "model > VRAM: CPU only")
    fit = fit_gpu_layers(info, 380 * 2**20, 400 * 2**20, 4096, 512)
    assert (fit.layers, fit.rule_of_thumb_layers) == (0, 9), "where the rule of thumb would run out of memory"


# ---------------------------------------------------------------------------- a GPU that is not here


class FakeGpuBackend(LlamaCppBackend):
    """The real llama.cpp backend, on the CPU, playing a GPU build whose card holds ``max_layers``.

    Loads above ``max_layers`` fail as llama.cpp fails when cudaMalloc does; the first
    generation can be made to run out of memory too. Everything else is real.
    """

    def __init__(self, max_layers: int, generation_max_layers: int | None = None) -> None:
        super().__init__()
        self._build_info = {**self._build_info, "gpu_offload": True}
        self.max_layers = max_layers
        self.generation_max_layers = generation_max_layers
        self.loads: list[int] = []

    def load(self, spec: ModelSpec, settings: LoadSettings) -> Any:
        self.loads.append(settings.gpu_layers)
        if settings.gpu_layers > self.max_layers:
            raise GpuOutOfMemoryError(f"cudaMalloc failed: out of memory ({settings.gpu_layers} layers)")
        model = super().load(spec, replace(settings, gpu_layers=0))
        model.settings = settings  # what was asked for: the layers "on the GPU"
        limit = self.generation_max_layers
        if limit is not None and settings.gpu_layers > limit:
            real_generate = model.generate

            def generate(*args: Any, **kwargs: Any) -> Any:
                raise GpuOutOfMemoryError("The GPU ran out of memory while generating.")

            model.generate = generate  # type: ignore[method-assign]
            model._real_generate = real_generate  # type: ignore[attr-defined]
        return model


def gpu_engine(settings: Settings, backend: FakeGpuBackend) -> Engine:
    return Engine(settings.merged({"performance": {"gpu_layers": -1}}), backend=backend)


def test_auto_gpu_layers_use_the_estimate_for_the_card(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, tiny_models: dict[str, Path]
) -> None:
    fake_nvml(monkeypatch, [RTX3060])
    backend = FakeGpuBackend(max_layers=99)
    engine = gpu_engine(settings, backend)
    engine.generate("the", max_tokens=2, seed=1)
    assert backend.loads == [3], "a tiny model fits entirely: n_layers + 1"
    engine.close()


def test_a_load_that_runs_out_of_gpu_memory_is_retried_with_fewer_layers(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvml(monkeypatch, [RTX3060])
    backend = FakeGpuBackend(max_layers=1)
    engine = gpu_engine(settings, backend)
    with caplog.at_level(logging.WARNING, logger="nbllm"):
        result = engine.generate("the", max_tokens=3, seed=1)
    assert result.stats.completion_tokens > 0
    assert backend.loads == [3, 1]
    assert "Not enough GPU memory for 3 layers of tiny-a: retrying with 1." in caplog.messages
    [resident] = engine.registry.resident()
    assert resident.settings.gpu_layers == 1
    engine.generate("the", max_tokens=3, seed=2)
    assert backend.loads == [3, 1], "the reduced count is remembered: no reload, no new failure"
    engine.close()


def test_layers_that_do_not_fit_in_free_vram_are_reduced_before_loading(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # llama.cpp may abort the process on a CUDA out-of-memory during the first decode (seen on an
    # H200): the estimate is checked against free VRAM before loading, so that never happens.
    from nbllm.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "wide.gguf", n_embd=512, n_head=8, n_head_kv=8, n_ff=1024, n_layer=8)
    info = read_gguf(path)
    free = gpu_bytes_for(info, 4, 512, 64) + 2**20  # room for 4 layers, not 9
    fake_nvml(monkeypatch, [FakeCard("NVIDIA L4", 2 * GiB, int(free / (1 - GPU_MARGIN)))])
    backend = FakeGpuBackend(max_layers=99)
    engine = Engine(settings.merged({"performance": {"gpu_layers": 9}}), backend=backend)
    with caplog.at_level(logging.WARNING, logger="nbllm"):
        result = engine.generate("the", model=str(path), max_tokens=3, seed=1)
    assert result.stats.completion_tokens > 0
    assert backend.loads == [4], "reduced before llama.cpp ever saw 9"
    assert any(
        "Not enough free GPU memory for 9 layers of wide" in m and "loading 4 layers" in m for m in caplog.messages
    )
    engine.generate("the", model=str(path), max_tokens=3, seed=2)
    assert backend.loads == [4], "remembered: no reload"
    engine.close()


def test_a_first_generation_out_of_gpu_memory_reloads_with_fewer_layers(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvml(monkeypatch, [RTX3060])
    backend = FakeGpuBackend(max_layers=99, generation_max_layers=1)
    engine = gpu_engine(settings, backend)
    with caplog.at_level(logging.WARNING, logger="nbllm"):
        result = engine.generate("the", max_tokens=3, seed=1)
    assert result.stats.completion_tokens > 0
    assert backend.loads == [3, 1]
    assert any("ran out of memory with 3 layers of tiny-a: reloading with 1" in m for m in caplog.messages)
    engine.close()


def test_with_no_layer_left_the_out_of_memory_error_reaches_the_user(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    fake_nvml(monkeypatch, [RTX3060])
    backend = FakeGpuBackend(max_layers=-1)  # even 0 GPU layers "fail"
    engine = gpu_engine(settings, backend)
    with pytest.raises(GpuOutOfMemoryError):
        engine.generate("the", max_tokens=3, seed=1)
    assert backend.loads == [3, 1, 0]
    engine.close()


# ---------------------------------------------------------------------------- doctor


def test_doctor_gives_the_exact_reinstall_command_for_a_gpu_with_a_cpu_build(
    monkeypatch: pytest.MonkeyPatch, engine: Engine
) -> None:
    fake_nvml(monkeypatch, [H100])
    report = diagnose(engine)
    problems = [f for f in report.findings if f.severity == "problem"]
    assert problems, str(report)
    assert "CPU-only build" in problems[0].message
    assert build_flags.install_command(build_flags.cmake_args(cuda=True)) in problems[0].fix
    assert "-DGGML_CUDA=ON" in problems[0].fix
    assert not report.ok
    assert "rule of thumb" in str(report)


def test_doctor_warns_about_more_threads_than_cores(engine: Engine) -> None:
    engine.configure(performance={"threads": machine.usable_cpus() + 6})
    report = diagnose(engine)
    assert any("performance.threads" in f.message for f in report.findings if f.severity == "warning")


def test_doctor_says_when_the_model_does_not_fit_in_ram(tmp_path: Path) -> None:
    context = 1 << 24
    layers = int(machine.total_memory() * 1.5 / (context * 256)) + 1
    from nbllm.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "big.gguf", n_layer=layers, n_head_kv=4, context_length=context)
    engine = Engine(Settings().merged({"performance": {"context_size": context}}))
    report = diagnose(engine, str(path))
    [problem] = [f for f in report.findings if f.severity == "problem"]
    assert "of RAM is available" in problem.message
    assert "context_size" in problem.fix
    assert "Troubleshooting" in str(report)


def test_doctor_on_this_machine_finds_nothing_wrong(engine: Engine) -> None:
    report = diagnose(engine)
    assert report.ok, str(report)
    assert "fits in RAM" in str(report)


def test_the_report_refreshes_in_another_thread_without_error() -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            machine.hardware_report()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
