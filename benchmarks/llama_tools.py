#!/usr/bin/env python3
"""llama.cpp's own benchmark tools (llama-bench, llama-batched-bench, and llama-embedding for
``nbllm.embed``), built from the very llama-cpp-python sdist nbllm uses, with the very flags its
wheel was built with — so that a comparison measures nbllm, not two different builds.

    .venv/bin/python benchmarks/llama_tools.py            # build (once; a few minutes) and print paths

The tools land in the nbllm wheelhouse next to the wheel: ~/.cache/nbllm/wheels/<key>/bin/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bootstrap  # noqa: E402  (scripts/bootstrap.py: the same flags and wheelhouse)

TOOLS = ("llama-bench", "llama-batched-bench", "llama-embedding")


def tools_dir() -> Path:
    bf = bootstrap.load_build_flags()
    args = bf.cmake_args(cuda=False)
    return bootstrap.wheelhouse_root() / bf.build_key(args) / "bin"


def ensure_tools() -> dict[str, Path]:
    target = tools_dir()
    found = {name: target / name for name in TOOLS}
    if all(path.exists() for path in found.values()):
        return found
    bf = bootstrap.load_build_flags()
    args = bf.cmake_args(cuda=False)
    python = Path(sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[llama-tools] downloading the llama-cpp-python {bf.LLAMA_CPP_PYTHON_VERSION} sdist", flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", tmp,
             f"llama-cpp-python=={bf.LLAMA_CPP_PYTHON_VERSION}"],
            check=True,
        )  # fmt: skip
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = Path(tmp) / "build"
        print(f"[llama-tools] building {', '.join(TOOLS)} with: {' '.join(args)}", flush=True)
        subprocess.run(
            ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TOOLS=ON",
             "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF", *args],
            check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        subprocess.run(
            ["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(os.cpu_count() or 2)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        target.mkdir(parents=True, exist_ok=True)
        for name in TOOLS:
            shutil.copy2(build / "bin" / name, target / name)
    return found


def llama_bench_tg(binary: str | Path, model: str, threads: int, tokens: int = 128, repetitions: int = 2) -> float:
    """llama-bench's generation speed (tg``tokens``, t/s) on the CPU with flash attention, nbllm's default."""
    out = subprocess.run(
        [str(binary), "-m", model, "-p", "0", "-n", str(tokens), "-t", str(threads), "-ngl", "0", "-fa", "on",
         "-r", str(repetitions), "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return float(json.loads(out)[0]["avg_ts"])


if __name__ == "__main__":
    for name, path in ensure_tools().items():
        print(f"{name}: {path}")
