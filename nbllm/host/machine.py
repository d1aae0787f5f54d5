"""What this machine has: CPU, cores, instruction sets, memory, NVIDIA GPUs.

``hardware_report()`` gathers it for ``nbllm.hardware()`` and ``nbllm doctor``; the small
functions are what the engine asks on its hot paths (threads, free memory).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import psutil

from nbllm.core.table import ReadableReport, key_value_html, key_value_text
from nbllm.core.units import format_bytes
from nbllm.host.build_flags import read_cpu_flags
from nbllm.host.gpu import GpuInfo, gpu_status

# The instruction sets that matter to llama.cpp, in the order people know them.
INTERESTING_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16",
    "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve",
)  # fmt: skip


def usable_cpus() -> int:
    """Logical CPUs this process may run on (affinity-aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def logical_cpus() -> int:
    return psutil.cpu_count() or 1


def default_threads() -> int:
    """Generation is memory-bound: one thread per physical core, never more than we may use.

    The guide's "cores - 1" halves the speed of a 2-core machine; hyper-threads add nothing.
    """
    return max(1, min(physical_cores(), usable_cpus()))


def available_memory() -> int:
    return int(psutil.virtual_memory().available)


def total_memory() -> int:
    return int(psutil.virtual_memory().total)


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def instruction_sets() -> list[str]:
    flags = read_cpu_flags()
    return [flag for flag in INTERESTING_FLAGS if flag in flags]


@functools.lru_cache(maxsize=1)
def machine_id() -> str:
    """What tuning results are keyed by: the same model tunes differently on another machine."""
    gpus = ",".join(g.name for g in gpu_status().gpus)
    return f"{cpu_model()}|{physical_cores()}c/{logical_cpus()}t|{total_memory() // 2**30}GiB|{gpus or 'no-gpu'}"


def parse_system_info(text: str) -> list[str]:
    """llama.cpp's ``CPU : AVX = 1 | AVX2 = 1 | ...`` -> the features switched on."""
    features = []
    for part in text.replace("\n", "|").split("|"):
        name, _, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if name and value.strip() == "1":
            features.append(name)
    return features


@dataclass(frozen=True)
class HardwareReport(ReadableReport):
    cpu_model: str
    physical_cores: int
    logical_cpus: int
    usable_cpus: int
    instruction_sets: list[str]
    memory_total: int
    memory_available: int
    gpus: list[GpuInfo]
    gpu_problem: str | None
    build: dict[str, Any] = field(default_factory=dict)

    @property
    def build_features(self) -> list[str]:
        return parse_system_info(str(self.build.get("system_info", "")))

    def rows(self) -> list[tuple[str, str]]:
        rows = [
            ("CPU", self.cpu_model),
            ("cores", f"{self.physical_cores} physical, {self.logical_cpus} logical, {self.usable_cpus} usable"),
            ("instruction sets", " ".join(self.instruction_sets) or "-"),
            ("RAM", f"{format_bytes(self.memory_total)} total, {format_bytes(self.memory_available)} available"),
        ]
        if self.gpus:
            for gpu in self.gpus:
                util = f", {gpu.utilization_percent}% busy" if gpu.utilization_percent is not None else ""
                rows.append(
                    (
                        f"GPU {gpu.index}",
                        f"{gpu.name}: {format_bytes(gpu.memory_total)} total, "
                        f"{format_bytes(gpu.memory_free)} free{util} (driver {gpu.driver})",
                    )
                )
        else:
            rows.append(("GPU", self.gpu_problem or "none (no NVIDIA driver found)"))
        if self.build:
            rows.append(
                (
                    "llama.cpp build",
                    f"llama-cpp-python {self.build.get('llama_cpp_python')}, GPU offload "
                    f"{'yes' if self.build.get('gpu_offload') else 'no'}",
                )
            )
            rows.append(("build features", " ".join(self.build_features) or "-"))
        return rows

    def __str__(self) -> str:
        return key_value_text(self.rows())

    def _repr_html_(self) -> str:
        return key_value_html(self.rows())


def hardware_report(build: dict[str, Any] | None = None) -> HardwareReport:
    status = gpu_status()
    memory = psutil.virtual_memory()
    return HardwareReport(
        cpu_model=cpu_model(),
        physical_cores=physical_cores(),
        logical_cpus=logical_cpus(),
        usable_cpus=usable_cpus(),
        instruction_sets=instruction_sets(),
        memory_total=int(memory.total),
        memory_available=int(memory.available),
        gpus=list(status.gpus),
        gpu_problem=status.problem,
        build=dict(build or {}),
    )
