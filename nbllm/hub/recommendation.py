"""Which catalog models fit this machine, how fast they will generate, and the guide's advice.

Generating a token reads (nearly) every weight once, so on a CPU the speed is bounded by
``memory bandwidth / bytes per token`` (about the file size). nbllm measures the bandwidth once
per machine (``nbllm.host.bandwidth``) and scales that bound by an efficiency: measured, when
``nbllm tune`` has timed a model file on this machine, else assumed. On a GPU the same bound
holds with the GPU's memory bandwidth. Memory needed = the file + the KV cache of a 4096-token
context + the compute buffer (``CatalogModel.memory_needed``), compared with the RAM available
minus a margin, or with the free VRAM.
"""

from __future__ import annotations

import html
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbllm.core import paths
from nbllm.core.fit import GPU_MARGIN, GPU_RESERVE_BYTES
from nbllm.core.table import Table
from nbllm.core.units import format_bytes
from nbllm.host import machine
from nbllm.hub.catalog import DEFAULT_QUANT, ESTIMATE_CONTEXT, GUIDE_QUANTS, Catalog, CatalogFile, CatalogModel

log = logging.getLogger("nbllm")

# The guide's "Interpret Results" table: upper bound (t/s), rating, what it feels like.
RATINGS = (
    (5.0, "slow", "unusable for chat"),
    (15.0, "okay", "usable but slow"),
    (30.0, "good", "comfortable chat"),
    (60.0, "fast", "real-time feel"),
    (float("inf"), "excellent", "instant response"),
)
GOOD_TPS = 15.0
OKAY_TPS = 5.0

# llama.cpp reads weights at about this share of what nbllm's bandwidth probe measures; only used
# until `nbllm tune` has measured a model here. On the 2-core development machines Gemma 3 270M
# (253 MB) generates 45-62 t/s, 11-16 GB/s of weights, while the probe reads 5-12 GB/s depending
# on load: the probe is no over-estimate, so the assumed share is high.
ASSUMED_CPU_EFFICIENCY = 0.9
ASSUMED_GPU_EFFICIENCY = 0.6
# Kernel launches and sampling cost a GPU about this much per token whatever the model's size,
# which keeps tiny models from being promised thousands of tokens per second.
GPU_SECONDS_PER_TOKEN = 0.001
# For a described machine (cores given, bandwidth not): one core streams roughly this much, and
# a desktop's memory channels saturate at a few cores.
ASSUMED_BANDWIDTH_PER_CORE = 8e9
ASSUMED_BANDWIDTH_MAX = 64e9
# RAM kept free for the system and other programs.
RAM_RESERVE_SHARE = 0.10
RAM_RESERVE_MIN = 2**30
# Measured tuning results of files above this size are used only when their SHA-256 is already
# known (recorded at download): hashing a multi-gigabyte file would make `recommend` slow.
HASH_LIMIT = 2**30

# Memory bandwidth of common NVIDIA cards (bytes/s), matched on the NVML name, most specific
# first. Unknown cards get a conservative default, and the advice says it was assumed.
GPU_BANDWIDTH = (
    ("h200", 4.8e12), ("h100 pcie", 2.0e12), ("h100", 3.35e12), ("a100", 2.0e12), ("l40", 0.864e12),
    ("a10", 0.6e12), ("l4", 0.3e12), ("t4", 0.32e12), ("v100", 0.9e12), ("4090", 1.0e12), ("4080", 0.72e12),
    ("4070", 0.5e12), ("4060", 0.27e12), ("3090", 0.936e12), ("3080", 0.76e12), ("3070", 0.45e12),
    ("3060", 0.36e12),
)  # fmt: skip
UNKNOWN_GPU_BANDWIDTH = 0.3e12


def rating(tokens_per_second: float) -> tuple[str, str]:
    """The guide's label for a generation speed: ``("good", "comfortable chat")``."""
    for limit, label, feel in RATINGS:
        if tokens_per_second < limit:
            return label, feel
    return RATINGS[-1][1], RATINGS[-1][2]


def format_tps(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def format_params(n: int) -> str:
    """1.5B, 268M, 0.14M: never "0M" for the tiny models of tests and experiments."""
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2g}M"


def format_size(entry: CatalogFile) -> str:
    return ("~" if entry.size_approximate else "") + format_bytes(entry.size) if entry.size else "-"


# ---------------------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Machine:
    """What the recommendation is for: this machine as measured, or one described by numbers."""

    ram_total: int
    ram_available: int
    cores: int
    vram_free: int
    vram_total: int
    gpu_name: str | None
    bandwidth: float  # CPU memory read bandwidth, bytes/s
    bandwidth_source: str
    gpu_bandwidth: float
    gpu_bandwidth_source: str
    efficiency: float
    efficiency_source: str
    this_machine: bool

    @property
    def ram_usable(self) -> int:
        reserve = max(RAM_RESERVE_MIN, int(self.ram_total * RAM_RESERVE_SHARE))
        return max(self.ram_available - reserve, 0)

    @property
    def has_gpu(self) -> bool:
        return self.vram_free > 0

    def describe(self) -> str:
        who = "This machine" if self.this_machine else "The machine described"
        ram = format_bytes(self.ram_total)
        if self.this_machine:
            ram += f" RAM ({format_bytes(self.ram_available)} available)"
        else:
            ram += " RAM available"
        if self.has_gpu:
            gpu = f"{self.gpu_name or 'a GPU'} with {format_bytes(self.vram_free)} of VRAM free"
        else:
            gpu = "no NVIDIA GPU, so models run on the CPU"
        return (
            f"{who}: {self.cores} physical cores, {ram}, {gpu}. Memory read bandwidth "
            f"{self.bandwidth / 1e9:.1f} GB/s ({self.bandwidth_source})."
        )


def describe_this_machine(
    bandwidth: float | None = None, tuned: dict[str, tuple[int, float, int]] | None = None
) -> Machine:
    """The numbers of this machine: RAM, cores, the GPU with the most free memory, bandwidth, and
    the efficiency measured from ``tuned`` (``tuned_speeds()``) when there is any."""
    from nbllm.host.bandwidth import read_bandwidth
    from nbllm.host.gpu import list_gpus

    gpus = sorted(list_gpus(), key=lambda g: g.memory_free, reverse=True)
    best = gpus[0] if gpus else None
    measured = read_bandwidth() if bandwidth is None else bandwidth
    efficiency, efficiency_source = measured_efficiency(tuned or {}, measured)
    gpu_bandwidth, gpu_source = _gpu_bandwidth(best.name if best else None)
    return Machine(
        ram_total=machine.total_memory(),
        ram_available=machine.available_memory(),
        cores=machine.physical_cores(),
        vram_free=best.memory_free if best else 0,
        vram_total=best.memory_total if best else 0,
        gpu_name=best.name if best else None,
        bandwidth=measured,
        bandwidth_source="measured on this machine" if bandwidth is None else "given",
        gpu_bandwidth=gpu_bandwidth,
        gpu_bandwidth_source=gpu_source,
        efficiency=efficiency,
        efficiency_source=efficiency_source,
        this_machine=True,
    )


def describe_machine(
    ram: int,
    cores: int,
    vram: int = 0,
    bandwidth: float | None = None,
    efficiency: float | None = None,
    gpu_name: str | None = None,
) -> Machine:
    """A machine given by its numbers (what-if questions, tests): nothing is measured."""
    if bandwidth is None:
        assumed = min(cores * ASSUMED_BANDWIDTH_PER_CORE, ASSUMED_BANDWIDTH_MAX)
        bandwidth, source = assumed, f"assumed for {cores} cores"
    else:
        source = "given"
    gpu_bandwidth, gpu_source = _gpu_bandwidth(gpu_name)
    return Machine(
        ram_total=ram,
        ram_available=ram,
        cores=cores,
        vram_free=vram,
        vram_total=vram,
        gpu_name=gpu_name,
        bandwidth=bandwidth,
        bandwidth_source=source,
        gpu_bandwidth=gpu_bandwidth,
        gpu_bandwidth_source=gpu_source,
        efficiency=efficiency if efficiency is not None else ASSUMED_CPU_EFFICIENCY,
        efficiency_source="given" if efficiency is not None else "assumed",
        this_machine=False,
    )


def _gpu_bandwidth(name: str | None) -> tuple[float, str]:
    lowered = (name or "").lower()
    for key, value in GPU_BANDWIDTH:
        if key in lowered:
            return value, f"{key.upper()} specification"
    return UNKNOWN_GPU_BANDWIDTH, "assumed"


# ---------------------------------------------------------------------------- measurements


def _known_sha256(path: Path, catalog: Catalog | None) -> str | None:
    """A local file's SHA-256 without hashing large files: recorded at download, or the catalog's."""
    from nbllm.core import identity
    from nbllm.hub.downloads import recorded_sha256

    recorded = recorded_sha256(path)
    if recorded:
        return recorded
    size = path.stat().st_size
    match = catalog.by_file_name(path.name) if catalog else None
    if match and match[1].sha256 and match[1].size == size and not match[1].size_approximate:
        return match[1].sha256
    return identity.file_sha256(path) if size <= HASH_LIMIT else None


def tuned_speeds(catalog: Catalog | None = None) -> dict[str, tuple[int, float, int]]:
    """``{file name: (file size, measured t/s, gpu layers)}`` for models tuned on this machine."""
    from nbllm.host import tuned_settings

    here = machine.machine_id()
    saved = {sha: entry for key, sha, entry in tuned_settings.iter_saved() if key == here}
    folder = paths.models_dir()
    if not saved or not folder.is_dir():
        return {}
    speeds: dict[str, tuple[int, float, int]] = {}
    for path in sorted(folder.glob("*.gguf")):
        try:
            sha = _known_sha256(path, catalog)
        except OSError:
            continue
        entry = saved.get(sha) if sha else None
        tg = entry.get("tg") if entry else None
        if entry and isinstance(tg, (int, float)) and tg > 0:
            speeds[path.name] = (path.stat().st_size, float(tg), int(entry.get("gpu_layers") or 0))
    return speeds


def measured_efficiency(tuned: dict[str, tuple[int, float, int]], bandwidth: float) -> tuple[float, str]:
    """tg measured by ``nbllm tune`` / (bandwidth / file size): the median over tuned CPU runs."""
    ratios = {name: tg * size / bandwidth for name, (size, tg, layers) in tuned.items() if layers == 0}
    if not ratios or bandwidth <= 0:
        return ASSUMED_CPU_EFFICIENCY, "assumed: run `nbllm tune` on a model here to measure it"
    # A probe that under-reads gives ratios above 1; a broken entry must not make every model look instant.
    value = min(max(statistics.median(ratios.values()), 0.05), 4.0)
    return value, f"measured by nbllm tune on {', '.join(sorted(ratios))}"


def _catalog() -> Catalog:
    from nbllm.hub.catalog import load_catalog

    return load_catalog()


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One model file on one machine: does it fit, where does it run, how fast."""

    model: CatalogModel
    file: CatalogFile
    needed: int | None
    fits: str  # yes | tight | no | unknown
    runs_on: str  # CPU | GPU | GPU+CPU (n% on GPU)
    tokens_per_second: float | None
    measured: bool

    @property
    def quant(self) -> str:
        return self.file.quant

    @property
    def label(self) -> str:
        return f"{self.model.name} {self.quant}"

    @property
    def rating(self) -> tuple[str, str]:
        return rating(self.tokens_per_second or 0.0)

    def speed_text(self) -> str:
        if self.tokens_per_second is None:
            return "speed unknown"
        label, feel = self.rating
        how = "measured" if self.measured else "about"
        return f"{how} {format_tps(self.tokens_per_second)} t/s ({label}: {feel})"


def evaluate(
    model: CatalogModel,
    entry: CatalogFile,
    where: Machine,
    context: int = ESTIMATE_CONTEXT,
    measured: dict[str, tuple[int, float, int]] | None = None,
) -> Option:
    needed = model.memory_needed(entry.quant, context)
    size = entry.size
    if needed is None or size is None:
        return Option(model, entry, needed, "unknown", "CPU", None, False)
    cpu_rate = where.bandwidth * where.efficiency  # bytes/s actually read
    gpu_rate = where.gpu_bandwidth * ASSUMED_GPU_EFFICIENCY
    gpu_room = max(where.vram_free * (1 - GPU_MARGIN) - GPU_RESERVE_BYTES, 0.0) if where.has_gpu else 0.0
    if gpu_room >= needed:
        share = 1.0
    elif gpu_room > 0:
        share = gpu_room / needed
    else:
        share = 0.0
    in_ram = int(needed * (1 - share))
    seconds_per_token = (1 - share) * size / cpu_rate
    if share > 0:
        seconds_per_token += share * size / gpu_rate + GPU_SECONDS_PER_TOKEN
    runs_on = "GPU" if share == 1.0 else "CPU" if share == 0.0 else f"GPU+CPU ({share:.0%} on GPU)"
    tps = 1 / seconds_per_token
    tuned = (measured or {}).get(entry.local_name)
    if tuned is not None and (tuned[2] > 0) == (share > 0):
        tps = tuned[1]
    if in_ram <= where.ram_usable:
        fits = "yes"
    elif in_ram <= where.ram_available:
        fits = "tight"
    else:
        fits = "no"
    return Option(model, entry, needed, fits, runs_on, tps, tuned is not None and tps == tuned[1])


def _options(
    catalog: Catalog, where: Machine, context: int, measured: dict[str, tuple[int, float, int]]
) -> list[Option]:
    options = [evaluate(model, entry, where, context, measured) for model in catalog for entry in model.files.values()]
    order = {q: i for i, q in enumerate(GUIDE_QUANTS)}
    return sorted(options, key=lambda o: (o.model.params, o.model.name, order.get(o.quant, len(order)), o.quant))


def _starting_file(model: CatalogModel) -> CatalogFile:
    """The guide's starting point, Q4_K_M, or the model's first file when it has none."""
    return model.files.get(DEFAULT_QUANT) or next(iter(model.files.values()))


def _room_for(model: CatalogModel, by_label: dict[str, Option]) -> list[str]:
    """Better quantizations of ``model`` that also fit comfortably."""
    start = _starting_file(model).quant
    upgrades = [q for q in GUIDE_QUANTS if q != start and q in model.files]
    return [q for q in upgrades if by_label[f"{model.name} {q}"].fits == "yes"]


def _pick(starts: list[Option]) -> tuple[Option | None, float]:
    """The best-quality model that fits and chats comfortably; failing that, usably; else the fastest."""
    fitting = [o for o in starts if o.fits == "yes"] or [o for o in starts if o.fits == "tight"]
    for floor in (GOOD_TPS, OKAY_TPS):
        fast_enough = [o for o in fitting if (o.tokens_per_second or 0) >= floor]
        if fast_enough:
            return max(fast_enough, key=lambda o: (o.model.quality, o.tokens_per_second or 0)), floor
    if fitting:
        return max(fitting, key=lambda o: o.tokens_per_second or 0), 0.0
    return None, 0.0


# ---------------------------------------------------------------------------- the result


COLUMNS = (
    "pick", "model", "params", "quant", "size", "needs", "fits", "runs on", "t/s", "rating", "room for", "best for",
)  # fmt: skip


class Recommendation(Table):
    """A table of models on this machine, plus the advice (``str()`` shows both)."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        advice: str,
        machine: Machine,
        pick: Option | None,
        options: list[Option],
    ) -> None:
        super().__init__(
            rows,
            columns=COLUMNS,
            formatters={
                "needs": format_bytes,
                "t/s": format_tps,
            },
            title="Models for this machine" if machine.this_machine else "Models for the machine described",
        )
        self.advice = advice
        self.machine = machine
        self.pick = pick
        self.options = options

    def __str__(self) -> str:
        return f"{super().__str__()}\n\n{self.advice}"

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in self.advice.split("\n\n"))
        return super()._repr_html_() + f"<div style='white-space:pre-wrap'>{paragraphs}</div>"


def recommend(
    *,
    ram: int | None = None,
    vram: int | None = None,
    cores: int | None = None,
    bandwidth: float | None = None,
    efficiency: float | None = None,
    gpu_name: str | None = None,
    context: int = ESTIMATE_CONTEXT,
    all_quants: bool = False,
    catalog: Catalog | None = None,
) -> Recommendation:
    """Which catalog models fit, how fast they will be, and what to download first.

    With no arguments: this machine, measured (RAM available, physical cores, the GPU with the
    most free memory, memory bandwidth, and any ``nbllm tune`` results). Give ``ram`` (bytes
    available), ``cores``, ``vram`` (bytes free) and optionally ``bandwidth`` (bytes/s) to ask
    about another machine. ``all_quants`` lists every quantization, not only Q4_K_M.
    """
    catalog = catalog or _catalog()
    if ram is None and cores is None and vram is None:
        measured = _safe_tuned_speeds(catalog)
        where = describe_this_machine(bandwidth, measured)
    else:
        where = describe_machine(
            ram if ram is not None else machine.available_memory(),
            cores if cores is not None else machine.physical_cores(),
            vram or 0,
            bandwidth,
            efficiency,
            gpu_name,
        )
        measured = {}
    options = _options(catalog, where, context, measured)
    by_label = {o.label: o for o in options}
    starts = [by_label[f"{m.name} {_starting_file(m).quant}"] for m in catalog]
    pick, floor = _pick(starts)
    shown = options if all_quants else sorted(starts, key=options.index)
    rows = [_row(o, o is pick, _room_for(o.model, by_label)) for o in shown]
    advice = _advice(where, pick, floor, options, by_label, context, catalog)
    return Recommendation(rows, advice, where, pick, options)


def _safe_tuned_speeds(catalog: Catalog) -> dict[str, tuple[int, float, int]]:
    try:
        return tuned_speeds(catalog)
    except Exception as error:  # a refinement only
        log.debug("Ignoring tuning results: %s", error)
        return {}


def _row(option: Option, picked: bool, room: list[str]) -> dict[str, Any]:
    label, _ = option.rating
    return {
        "pick": "*" if picked else "",
        "model": option.model.name,
        "params": format_params(option.model.params),
        "quant": option.quant,
        "size": format_size(option.file),
        "needs": option.needed,
        "fits": option.fits,
        "runs on": option.runs_on,
        "t/s": option.tokens_per_second,
        "rating": f"{label} (measured)" if option.measured else label,
        "room for": " ".join(room) or "-",
        "best for": option.model.best_for,
        # Plain values for code and tests:
        "name": option.model.name,
        "tokens_per_second": option.tokens_per_second,
        "needed_bytes": option.needed,
    }


def _advice(
    where: Machine,
    pick: Option | None,
    floor: float,
    options: list[Option],
    by_label: dict[str, Option],
    context: int,
    catalog: Catalog,
) -> str:
    lines = [where.describe()]
    if pick is None:
        lines.append(
            "None of the catalog's models fits in the memory available here. Close other programs, lower "
            "performance.context_size, or add a smaller model to your catalog file."
        )
    else:
        lines.append(_pick_text(pick, floor))
        better = _better_but_slower(pick, options)
        if better is not None:
            lines.append(f"Higher quality, slower: {better.label}, {better.speed_text()}.")
        upgrade = _upgrade(pick, floor, by_label)
        lines.append(_quant_text(pick, upgrade))
        lines.append(
            f"Download it: nbllm models download {pick.model.name} --quant {pick.quant}"
            f"   (in Python: nbllm.download({pick.model.name!r}, quant={pick.quant!r}))"
        )
    largest = max((o for o in options if o.fits == "yes"), key=lambda o: o.needed or 0, default=None)
    if largest is not None and pick is not None and largest is not pick and (largest.tokens_per_second or 0) < OKAY_TPS:
        lines.append(
            f"The largest that fits in memory is {largest.label} ({format_bytes(largest.needed)}), but at "
            f"{largest.speed_text()} it is not worth it here."
        )
    lines.append(_how_estimated(where, context))
    lines.append(_quant_table(catalog))
    return "\n\n".join(lines)


def _pick_text(pick: Option, floor: float) -> str:
    reason = {GOOD_TPS: "the best quality that still chats comfortably", OKAY_TPS: "the best quality that is usable"}
    why = reason.get(floor, "the fastest that fits: nothing reaches 5 t/s here")
    memory = "VRAM" if pick.runs_on == "GPU" else "RAM" if pick.runs_on == "CPU" else "GPU and CPU memory"
    return f"Recommended: {pick.label} ({why}): {pick.speed_text()}, needs {format_bytes(pick.needed)} of {memory}."


def _better_but_slower(pick: Option, options: list[Option]) -> Option | None:
    candidates = [
        o
        for o in options
        if o.quant == _starting_file(o.model).quant
        and o.fits == "yes"
        and o.model.quality > pick.model.quality
        and (o.tokens_per_second or 0) >= OKAY_TPS
    ]
    return max(candidates, key=lambda o: (o.model.quality, o.tokens_per_second or 0), default=None)


def _upgrade(pick: Option, floor: float, by_label: dict[str, Option]) -> Option | None:
    """The highest quantization of the pick that fits and stays as fast as the pick's rating band."""
    better = [
        by_label[f"{pick.model.name} {q}"]
        for q in GUIDE_QUANTS
        if q != pick.quant and q in pick.model.files and GUIDE_QUANTS.index(q) > GUIDE_QUANTS.index(DEFAULT_QUANT)
    ]
    fine = [o for o in better if o.fits == "yes" and (o.tokens_per_second or 0) >= floor]
    return fine[-1] if fine else None


def _quant_text(pick: Option, upgrade: Option | None) -> str:
    text = (
        "Quantization: start with Q4_K_M (the usual default, best balance of size and quality); upgrade to "
        "Q5_K_M (better quality), Q6_K (near-lossless) or Q8_0 (maximum quality) when you have room: bigger "
        "files are slower to generate."
    )
    if upgrade is not None:
        text += f" Here {upgrade.label} fits too, at {upgrade.speed_text()}."
    elif pick.quant == DEFAULT_QUANT:
        text += f" Here, stay with {pick.label}: larger quantizations would not fit or would fall below its speed."
    return text


def _how_estimated(where: Machine, context: int) -> str:
    if where.has_gpu:
        gpu = (
            f" On the GPU, {where.gpu_bandwidth / 1e9:.0f} GB/s ({where.gpu_bandwidth_source}) x "
            f"{ASSUMED_GPU_EFFICIENCY} (assumed); a GPU needs a CUDA build of llama.cpp (nbllm doctor checks)."
        )
    else:
        gpu = ""
    return (
        f"How the numbers are estimated: memory = file + KV cache for a {context}-token context + compute buffer, "
        f"compared with the RAM available minus a margin ('tight' leaves little for other programs). Speed on "
        f"the CPU = bandwidth / bytes per token (about the file size) x {where.efficiency:.2f} efficiency "
        f"({where.efficiency_source}).{gpu} Measured speeds (nbllm tune) replace estimates where they exist."
    )


def _quant_table(catalog: Catalog) -> str:
    lines = ["Quantizations (size relative to Q4_K_M, quality kept):"]
    for q in catalog.quantizations.values():
        lines.append(f"  {q.name:<7} {q.size_ratio:>4.0%} size  {q.quality:>4.0%} quality  {q.use}")
    return "\n".join(lines)
