"""NVIDIA GPUs through nvidia-ml-py (NVML): names, memory, driver, utilization.

No GPU, no driver, or a driver error is a normal state, not an exception: ``list_gpus()``
returns an empty list and ``gpu_status()`` says why. Tests replace NVML at its function
boundary (``pynvml.nvmlInit`` & co) to play GPUs that are not here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("nbllm")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total: int
    memory_free: int
    utilization_percent: int | None
    driver: str


@dataclass(frozen=True)
class GpuStatus:
    gpus: tuple[GpuInfo, ...]
    problem: str | None  # why none could be read, when that is not simply "no NVIDIA GPU"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_status() -> GpuStatus:
    try:
        import pynvml
    except ImportError:
        return GpuStatus((), "nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return GpuStatus((), None)  # no NVIDIA driver: the usual CPU-only machine
    except pynvml.NVMLError as error:
        return GpuStatus((), f"the NVIDIA driver did not answer: {error}")
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization: int | None = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                utilization = None  # not supported on every GPU (e.g. some MIG slices)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_total=int(memory.total),
                    memory_free=int(memory.free),
                    utilization_percent=utilization,
                    driver=driver,
                )
            )
        return GpuStatus(tuple(gpus), None)
    except pynvml.NVMLError as error:
        return GpuStatus((), f"the NVIDIA driver reported an error: {error}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def list_gpus() -> list[GpuInfo]:
    return list(gpu_status().gpus)
