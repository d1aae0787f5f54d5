#!/usr/bin/env python3
"""The GPU check of the hardware report, the fit estimate, offload, out-of-memory recovery and
the tuner, on a real NVIDIA card. Run on a GPU machine after installing a CUDA build of
llama-cpp-python (benchmarks/gpu_check.sh does both).

The default model cannot travel to a machine with no registry, so the check generates a model
there: llama architecture, random weights, ~2.4 GB of f32 tensors in 12 layers — big enough
for the layer arithmetic and the speed difference to be real.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import nbllm
from nbllm.core.config import Settings
from nbllm.core.gguf_file import read_gguf
from nbllm.core.units import format_bytes
from nbllm.engine import Engine
from nbllm.host.gpu import list_gpus
from nbllm.measure import tuner
from nbllm.testing import make_tiny_model

GiB = 2**30


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def section(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def gpu_used() -> int:
    gpu = list_gpus()[0]
    return gpu.memory_total - gpu.memory_free


def main() -> None:
    folder = Path(os.environ.get("GPU_CHECK_DIR", "/tmp/gpu-check"))
    folder.mkdir(parents=True, exist_ok=True)
    collect = Collect()
    for name in ("nbllm", "nbllm.llama_cpp"):
        logging.getLogger(name).addHandler(collect)
        logging.getLogger(name).setLevel(logging.INFO)

    skip_to = int(os.environ.get("GPU_CHECK_FROM", "1"))
    section("1. hardware report")
    print(nbllm.hardware())

    section("2. a 12-layer model, and the fit estimate")
    started = time.perf_counter()
    n_embd = int(os.environ.get("GPU_CHECK_EMBD", "2048"))  # smaller for a smoke test on a CPU machine
    path = folder / "check.gguf"
    path = (
        path
        if path.exists()
        else make_tiny_model(
            path,
            n_embd=n_embd,
            n_layer=12,
            n_head=16,
            n_head_kv=16,
            n_ff=n_embd * 11 // 4,
            context_length=4096,
            seed=3,
        )
    )
    info = read_gguf(path)
    print(
        f"model {format_bytes(info.file_size)}, {info.n_layers} layers, written in {time.perf_counter() - started:.1f}s"
    )
    settings = Settings().merged(
        {
            "models": {"check": str(path)},
            "default_model": "check",
            "performance": {"context_size": 4096, "batch_size": 512, "gpu_layers": -1},
            "cache": {"enabled": False},
            "logging": {"llama_cpp": "INFO"},
        }
    )
    engine = Engine(settings)
    fit = engine.gpu_fit(info, None)
    print(
        f"estimate: {fit.layers} of {info.n_layers + 1} layers, {format_bytes(fit.gpu_bytes)} of "
        f"{format_bytes(fit.free_bytes)} free; guide's rule of thumb: {fit.rule_of_thumb_layers} ({fit.rule_of_thumb})"
    )
    from nbllm.measure.doctor import diagnose

    print(diagnose(engine))

    if skip_to <= 3:
        offload_section(engine, settings, info, fit, collect)
    oom_and_tuner(settings, info, collect)


def offload_section(engine: Engine, settings: Settings, info: object, fit: object, collect: Collect) -> None:
    section("3. offload: load with gpu_layers -1, GPU memory measured against the estimate")
    before = gpu_used()
    collect.lines.clear()
    resident = engine.registry.load(None)
    after = gpu_used()
    offload = [line for line in collect.lines if "offloaded" in line or ("CUDA" in line and "buffer size" in line)]
    print("\n".join(offload[:8]))
    print(
        f"loaded with {resident.settings.gpu_layers} GPU layers in {resident.load_seconds:.2f}s; GPU memory used "
        f"grew by {format_bytes(after - before)} (estimate {format_bytes(fit.gpu_bytes)}, ratio "
        f"{fit.gpu_bytes / max(after - before, 1):.2f})"
    )
    gpu_model = resident.model
    gpu_tg = 64 / min(gpu_model.timed_decode("tg", 64, seed=i) for i in range(3))  # type: ignore[attr-defined]
    gpu_pp = 512 / min(gpu_model.timed_decode("pp", 512, seed=i) for i in range(3))  # type: ignore[attr-defined]
    answer = engine.generate("the model", max_tokens=16, seed=1)
    print(f"generated: {answer.stats.details()}")
    engine.registry.unload_all()
    cpu_engine = Engine(settings.merged({"performance": {"gpu_layers": 0}}))
    cpu_model = cpu_engine.registry.load(None).model
    cpu_tg = 16 / min(cpu_model.timed_decode("tg", 16, seed=i) for i in range(2))  # type: ignore[attr-defined]
    cpu_pp = 512 / min(cpu_model.timed_decode("pp", 512, seed=i) for i in range(2))  # type: ignore[attr-defined]
    cpu_engine.close()
    print(f"tg: GPU {gpu_tg:.1f} t/s vs CPU {cpu_tg:.1f} t/s ({gpu_tg / cpu_tg:.1f}x)")
    print(f"pp: GPU {gpu_pp:.1f} t/s vs CPU {cpu_pp:.1f} t/s ({gpu_pp / cpu_pp:.1f}x)")


def oom_and_tuner(settings: Settings, info: object, collect: Collect) -> None:
    if int(os.environ.get("GPU_CHECK_FROM", "1")) <= 4:
        oom_section(settings, info, collect)
    tuner_section(settings)


def oom_section(settings: Settings, info: object, collect: Collect) -> None:

    section("4. out of GPU memory: most of the card taken by another allocation")
    # cudaMalloc through the very CUDA runtime llama.cpp uses (torch would load a second cuBLAS).
    import ctypes

    cudart = ctypes.CDLL("libcudart.so.13")
    free = list_gpus()[0].memory_free
    hog = ctypes.c_void_p()
    rc = cudart.cudaMalloc(ctypes.byref(hog), ctypes.c_size_t(free - int(1.2 * GiB)))
    print(f"cudaMalloc rc {rc}; free now {format_bytes(list_gpus()[0].memory_free)}")
    forced = Engine(settings.merged({"performance": {"gpu_layers": info.n_layers + 1}}))
    collect.lines.clear()
    try:
        result = forced.generate("the model", max_tokens=8, seed=1)
        print("answered with", forced.registry.resident()[0].settings.gpu_layers, "GPU layers:", result.stats.details())
    except nbllm.NbllmError as error:
        print("FAILED:", type(error).__name__, error)
    print(
        "\n".join(line for line in collect.lines if "GPU memory" in line or "retrying" in line or "reloading" in line)
    )
    forced.close()
    auto = Engine(settings)
    layers = auto.registry.load(None).settings.gpu_layers
    print(f"with gpu_layers -1 the estimate now picks {layers} layers directly")
    auto.close()
    cudart.cudaFree(hog)


def tuner_section(settings: Settings) -> None:
    section("5. the tuner on the GPU")
    tuner_engine = Engine(settings)
    result = tuner.tune(tuner_engine, progress=False, save=False)
    print(result)
    tuner_engine.close()
    print("\nGPU CHECK DONE", flush=True)


if __name__ == "__main__":
    sys.exit(main())
