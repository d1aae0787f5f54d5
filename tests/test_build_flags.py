"""The llama.cpp build is chosen from the CPU's real features: never AMX, nothing it lacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbllm.host import build_flags

AVX512_MACHINE = "fma avx f16c bmi2 avx2 avx512f avx512vbmi avx512_vnni avx512_bf16 avx_vnni amx_tile amx_int8 sse4_2"
AVX2_ONLY = "sse4_2 fma avx f16c bmi2 avx2"


def flags_of(args: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("-D").split("=") for arg in args)


def test_an_avx512_cpu_gets_avx512_and_never_amx() -> None:
    args = flags_of(build_flags.cmake_args(AVX512_MACHINE.split(), machine="x86_64"))
    assert args["GGML_NATIVE"] == "OFF"
    for option in ("GGML_AVX2", "GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX_VNNI"):
        assert args[option] == "ON", option
    for option in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"):
        assert args[option] == "OFF", "AMX crashes these virtual machines with SIGILL"


def test_a_cpu_without_avx512_gets_no_avx512() -> None:
    args = flags_of(build_flags.cmake_args(AVX2_ONLY.split(), machine="x86_64"))
    assert args["GGML_AVX2"] == "ON"
    assert args["GGML_FMA"] == "ON"
    assert all(args[k] == "OFF" for k in args if k.startswith("GGML_AVX512"))
    assert args["GGML_AVX_VNNI"] == "OFF"


def test_arm_keeps_llama_cpps_native_build() -> None:
    assert build_flags.cmake_args([], machine="aarch64") == []
    assert build_flags.cmake_args([], machine="aarch64", cuda=True) == ["-DGGML_CUDA=ON"]


def test_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {AVX2_ONLY}\n\nprocessor\t: 1\nflags\t\t: {AVX2_ONLY}\n")
    assert build_flags.read_cpu_flags(cpuinfo) == frozenset(AVX2_ONLY.split())
    assert build_flags.read_cpu_flags(tmp_path / "missing") == frozenset()


def test_the_wheel_key_changes_with_the_flags() -> None:
    a = build_flags.build_key(build_flags.cmake_args(AVX512_MACHINE.split(), machine="x86_64"))
    b = build_flags.build_key(build_flags.cmake_args(AVX2_ONLY.split(), machine="x86_64"))
    assert a != b
    assert len(a) == 16


def test_the_reinstall_command_carries_the_flags() -> None:
    command = build_flags.install_command(["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON"])
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON"' in command
    assert "--no-cache-dir" in command, "pip's wheel cache ignores CMAKE_ARGS"
    assert f"llama-cpp-python=={build_flags.LLAMA_CPP_PYTHON_VERSION}" in command


def test_the_installed_build_matches_this_cpu() -> None:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX_INT8 = 1" not in info
    present = build_flags.read_cpu_flags()
    if "avx2" in present:
        assert "AVX2 = 1" in info
    if "avx512f" in present:
        assert "AVX512 = 1" in info


def test_a_build_using_instructions_this_cpu_lacks_is_caught() -> None:
    features = ["SSE3", "AVX", "AVX2", "FMA", "AVX512", "AVX512_VNNI", "OPENMP"]
    assert build_flags.missing_cpu_features(features, AVX2_ONLY.split()) == ["AVX512", "AVX512_VNNI"]
    assert build_flags.missing_cpu_features(features, [*AVX512_MACHINE.split(), "avx512_vnni"]) == []
    assert build_flags.missing_cpu_features(features, []) == [], "an unreadable CPU is not a reason to refuse"


def test_the_backend_refuses_a_build_the_cpu_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    from nbllm.backends.llama_cpp import LlamaCppBackend
    from nbllm.core.errors import ModelLoadError
    from nbllm.host.machine import parse_system_info

    # This machine's real build, on a CPU that lacks one instruction set the build uses.
    used = [
        f
        for f in parse_system_info(llama_cpp.llama_print_system_info().decode())
        if f in build_flags.BUILD_FEATURE_CPU_FLAG
    ]
    assert used, "an x86 build uses at least AVX"
    dropped = used[-1]
    real = build_flags.read_cpu_flags()
    monkeypatch.setattr(build_flags, "read_cpu_flags", lambda *a: real - {build_flags.BUILD_FEATURE_CPU_FLAG[dropped]})
    with pytest.raises(ModelLoadError, match=rf"uses .*{dropped}.*which this CPU does not have.*CMAKE_ARGS="):
        LlamaCppBackend()
