"""Which llama.cpp build this machine needs, decided from the CPU it actually has.

This module is standard-library only on purpose: ``scripts/bootstrap.py`` loads it by file
path *before* anything is installed, and ``nbllm doctor`` uses it afterwards to print the
exact reinstall command. Both must agree, so the decision lives here once.

Why not a default build: llama.cpp's default is ``GGML_NATIVE=ON`` (``-march=native``), which
on some virtual machines enables AMX because the CPU advertises it, and then dies with SIGILL
in ``tilezero`` on the first generation (the hypervisor never enabled the AMX tile state).
So we build with ``GGML_NATIVE=OFF`` and switch on, one by one, the instruction sets that
``/proc/cpuinfo`` lists, never AMX. A CPU without AVX-512 simply gets those flags OFF.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# ggml CMake option -> the /proc/cpuinfo flag that must be present for it. Order is kept
# stable because the wheel cache key is derived from the resulting argument string.
X86_FEATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f",)),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
)

# x86-64-v3 (Haswell, 2013, and every cloud CPU since): for a build made on one machine and run
# on another, such as a Binder image. AVX-512 is left out: many of those CPUs lack it. A CPU
# without AVX2 gets a clear error from the backend's check instead of a crash.
PORTABLE_X86_FLAGS = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"})

# Never enabled, whatever the CPU says: see the module docstring.
ALWAYS_OFF: tuple[str, ...] = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags of the first processor, or an empty set if unknown."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i686", "i386")


def cmake_args(
    flags: Iterable[str] | None = None,
    *,
    machine: str | None = None,
    cuda: bool = False,
) -> list[str]:
    """The ``CMAKE_ARGS`` for building llama-cpp-python on a CPU with these flags."""
    args: list[str] = []
    if is_x86(machine):
        present = read_cpu_flags() if flags is None else frozenset(flags)
        args.append("-DGGML_NATIVE=OFF")
        for option, needed in X86_FEATURES:
            on = all(flag in present for flag in needed)
            args.append(f"-D{option}={'ON' if on else 'OFF'}")
        args.extend(f"-D{option}=OFF" for option in ALWAYS_OFF)
    # Non-x86 (e.g. aarch64): llama.cpp's native build is the right one; nothing to add.
    if cuda:
        args.append("-DGGML_CUDA=ON")
    return args


def cuda_available() -> bool:
    """A GPU build makes sense only with both an NVIDIA driver and a CUDA compiler here."""
    if shutil.which("nvcc") is None or shutil.which("nvidia-smi") is None:
        return False
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def build_key(args: Iterable[str], version: str = LLAMA_CPP_PYTHON_VERSION) -> str:
    """A short name for one build: pip's own wheel cache ignores CMAKE_ARGS, ours must not."""
    text = f"llama-cpp-python=={version}\n" + " ".join(args)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def install_command(args: Iterable[str], version: str = LLAMA_CPP_PYTHON_VERSION) -> str:
    """The shell command that (re)installs llama-cpp-python with these build flags."""
    joined = " ".join(args)
    return (
        f'CMAKE_ARGS="{joined}" python -m pip install --force-reinstall --no-cache-dir '
        f'--no-deps "llama-cpp-python=={version}"'
    )


# llama.cpp's system-info feature names -> the /proc/cpuinfo flag each one executes.
BUILD_FEATURE_CPU_FLAG = {
    "AVX": "avx",
    "AVX2": "avx2",
    "FMA": "fma",
    "F16C": "f16c",
    "BMI2": "bmi2",
    "AVX_VNNI": "avx_vnni",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
}


def missing_cpu_features(build_features: Iterable[str], cpu_flags: Iterable[str]) -> list[str]:
    """Instruction sets the build uses but this CPU lacks: running it would die with SIGILL.

    An unknown CPU (no flags readable) or a non-x86 machine reports nothing missing.
    """
    flags = frozenset(cpu_flags)
    if not flags or not is_x86():
        return []
    return [f for f in build_features if f in BUILD_FEATURE_CPU_FLAG and BUILD_FEATURE_CPU_FLAG[f] not in flags]
