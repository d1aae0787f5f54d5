"""``nbllm doctor``: the hardware report, what is wrong with this set-up, and what to do about it."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from nbllm.core.errors import NbllmError
from nbllm.core.fit import GpuFit, estimate_memory
from nbllm.core.gguf_file import read_gguf
from nbllm.core.table import ReadableReport
from nbllm.core.units import format_bytes
from nbllm.host import build_flags
from nbllm.host.machine import HardwareReport, hardware_report

# The guide's troubleshooting list, kept as advice next to the findings.
TROUBLESHOOTING = (
    (
        "Out of memory (process killed, 'CUDA out of memory', slow swapping)",
        "lower performance.gpu_layers (nbllm already retries with fewer on a GPU out-of-memory); lower "
        "performance.batch_size to 256 or 128; use a smaller model or quantization; keep use_mmap: true",
    ),
    (
        "Slow generation",
        "check that GPU layers are > 0 where there is a GPU (nbllm.health()); check the thread count "
        "(nbllm.tune() measures the best); laptops throttle on battery; close other programs; use a smaller "
        "model or Q4_K_M",
    ),
    ("Slow model loading", "use_mmap: true (maps the file instead of reading it); use_mlock: false"),
)


@dataclass(frozen=True)
class Finding:
    severity: str  # ok | warning | problem
    message: str
    fix: str = ""


@dataclass
class DoctorReport(ReadableReport):
    hardware: HardwareReport
    findings: list[Finding] = field(default_factory=list)
    model: str | None = None
    gpu_fit: GpuFit | None = None
    memory: str | None = None

    @property
    def ok(self) -> bool:
        return not any(f.severity == "problem" for f in self.findings)

    def __str__(self) -> str:
        lines = ["Hardware", _indent(str(self.hardware)), ""]
        if self.model:
            lines.append(f"Model {self.model}")
            if self.memory:
                lines.append(f"  needs about {self.memory}")
            if self.gpu_fit is not None:
                fit = self.gpu_fit
                lines.append(
                    f"  GPU layers: estimate {fit.layers} of {fit.n_layers + 1} "
                    f"({format_bytes(fit.gpu_bytes)} of {format_bytes(fit.free_bytes)} free); "
                    f"rule of thumb: {fit.rule_of_thumb_layers} ({fit.rule_of_thumb})"
                )
            lines.append("")
        lines.append("Findings")
        marks = {"ok": "ok     ", "warning": "warning", "problem": "PROBLEM"}
        for finding in self.findings:
            lines.append(f"  {marks[finding.severity]}  {finding.message}")
            if finding.fix:
                lines.append(f"           -> {finding.fix}")
        lines += ["", "Troubleshooting"]
        lines += [f"  {symptom}: {advice}." for symptom, advice in TROUBLESHOOTING]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(str(self))}</pre>"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def diagnose(engine: Any, model: str | None = None) -> DoctorReport:
    build = engine.registry.backend.build_info()
    report = DoctorReport(hardware_report(build))
    hw = report.hardware
    findings = report.findings
    cuda_args = build_flags.cmake_args(cuda=True)

    if hw.gpus and not build.get("gpu_offload"):
        findings.append(
            Finding(
                "problem",
                f"{hw.gpus[0].name} is present, but the installed llama.cpp is a CPU-only build",
                "reinstall with CUDA: "
                + build_flags.install_command(cuda_args)
                + "  (or: NBLLM_CUDA=1 python3 scripts/bootstrap.py after deleting .venv)",
            )
        )
    elif hw.gpus:
        findings.append(Finding("ok", f"GPU offload available on {hw.gpus[0].name}"))
    elif hw.gpu_problem:
        findings.append(Finding("warning", f"GPU not usable: {hw.gpu_problem}", "check the NVIDIA driver (nvidia-smi)"))

    features = set(hw.build_features)
    cpu_to_build = {"avx2": "AVX2", "avx512f": "AVX512", "fma": "FMA", "f16c": "F16C"}
    missing = [name for flag, name in cpu_to_build.items() if flag in hw.instruction_sets and name not in features]
    if features and missing:
        findings.append(
            Finding(
                "warning",
                f"the CPU has {', '.join(missing)} but the llama.cpp build does not use them (slower than it could be)",
                "rebuild for this CPU: " + build_flags.install_command(build_flags.cmake_args()),
            )
        )
    if any(name.startswith("AMX") for name in features):
        findings.append(
            Finding(
                "warning",
                "the llama.cpp build uses AMX, which crashes some virtual machines (SIGILL)",
                "rebuild without it: " + build_flags.install_command(build_flags.cmake_args()),
            )
        )

    threads = engine.settings.performance.threads
    if threads is not None and threads > hw.usable_cpus:
        findings.append(
            Finding(
                "warning",
                f"performance.threads is {threads} but only {hw.usable_cpus} CPUs are usable (oversubscription slows "
                "generation down)",
                f"set performance.threads to {hw.physical_cores} or null (auto)",
            )
        )
    if engine.settings.performance.gpu_layers > 0 and not (hw.gpus and build.get("gpu_offload")):
        findings.append(
            Finding("warning", "performance.gpu_layers > 0 but no GPU can be used: running on the CPU", "set it to -1")
        )

    _check_model(engine, model, report)
    if not any(f.severity != "ok" for f in findings):
        findings.append(Finding("ok", "nothing wrong found"))
    return report


def _check_model(engine: Any, model: str | None, report: DoctorReport) -> None:
    try:
        spec = engine.registry.resolve(model)
        if spec.remote is not None:
            report.model = f"{spec.name} (remote, {spec.remote.url})"
            report.findings.append(Finding("ok", f"{spec.name} runs on {spec.remote.url}: nothing to check here"))
            return
        info = read_gguf(spec.path)
    except NbllmError as error:
        report.findings.append(Finding("problem", f"model: {error}"))
        return
    settings = engine.base_load_settings(spec, info)
    estimate = estimate_memory(info, settings.context_size, settings.batch_size)
    report.model = f"{spec.name} ({info.architecture}, {info.quantization}, {format_bytes(info.file_size)})"
    report.memory = estimate.describe()
    report.gpu_fit = engine.gpu_fit(info, settings) if report.hardware.gpus else None
    available = report.hardware.memory_available
    if estimate.total > available:
        report.findings.append(
            Finding(
                "problem",
                f"{spec.name} needs about {format_bytes(estimate.total)} but only {format_bytes(available)} of RAM is "
                "available",
                "lower performance.context_size, use a smaller quantization, or close other programs",
            )
        )
    elif estimate.total > 0.8 * available:
        report.findings.append(
            Finding("warning", f"{spec.name} needs {format_bytes(estimate.total)}: most of the available RAM")
        )
    else:
        report.findings.append(Finding("ok", f"{spec.name} fits in RAM ({format_bytes(estimate.total)} needed)"))
