"""nbllm: local GGUF language models, native in Jupyter.

    import nbllm
    print(nbllm.generate("Question: What is Docker?\\nAnswer:", max_tokens=64))
    for piece in nbllm.chat("What is Docker?", stream=True):
        print(piece, end="")
    nbllm.stats()

In a notebook: ``%load_ext nbllm`` and then ``%%llm``. One engine lives in the process and
is shared by every front end; ``nbllm.get_engine()`` returns it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

from nbllm._version import __version__ as __version__
from nbllm.core import figures as _figures
from nbllm.core import progress as _progress
from nbllm.core.config import Settings
from nbllm.core.errors import (
    CacheError,
    ChatTemplateError,
    ConfigError,
    ContextLengthError,
    DownloadError,
    GenerationError,
    IncompleteAnswerError,
    InsufficientMemoryError,
    InvalidModelFileError,
    ModelLoadError,
    ModelNotFoundError,
    NbllmError,
    ParameterError,
    SchemaError,
    StructuredOutputError,
)
from nbllm.core.table import Table

if TYPE_CHECKING:
    from pathlib import Path

    import pandas

    from nbllm.engine import Completion, Engine, ManyResult, Stream
    from nbllm.engine.embedding import Embeddings
    from nbllm.host.machine import HardwareReport
    from nbllm.hub.downloads import Download, Progress
    from nbllm.hub.manager import ModelInfo, VerifyReport
    from nbllm.hub.recommendation import Recommendation
    from nbllm.measure.bench import BenchResults
    from nbllm.measure.doctor import DoctorReport
    from nbllm.measure.tuner import TuneResult
    from nbllm.server.running import ServerHandle


__all__ = [
    "CacheError",
    "ChatPanel",
    "ChatTemplateError",
    "ConfigError",
    "ContextLengthError",
    "DownloadError",
    "GenerationError",
    "IncompleteAnswerError",
    "Index",
    "InsufficientMemoryError",
    "InvalidModelFileError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelsPanel",
    "NbllmError",
    "ParameterError",
    "SchemaError",
    "Settings",
    "StructuredOutputError",
    "ask",
    "bench",
    "catalog",
    "chat",
    "chat_many",
    "clear_cache",
    "configure",
    "doctor",
    "download",
    "embed",
    "generate",
    "generate_many",
    "get_engine",
    "hardware",
    "health",
    "history",
    "history_clear",
    "list_models",
    "load",
    "model_info",
    "models",
    "recommend",
    "remove_model",
    "serve",
    "settings",
    "similar",
    "stats",
    "tune",
    "unload",
    "verify",
]


def _tqdm_bar(
    total: int | None, description: str, unit: str, *, initial: int, in_bytes: bool, leave: bool
) -> _progress.ProgressBar:
    from nbllm.notebook.progress import tqdm_bar

    return tqdm_bar(total, description, unit, initial=initial, in_bytes=in_bytes, leave=leave)


def _bench_figure(records: Any) -> Any:
    from nbllm.notebook.plots import bench_figure

    return bench_figure(records)


def _tuning_figure(result: Any) -> Any:
    from nbllm.notebook.plots import tuning_figure

    return tuning_figure(result)


# The facade is where front ends meet the layers below: those draw nothing themselves and call
# these hooks (core/progress.py, core/figures.py). Installed at import; nothing heavy loads here.
_progress.use_bars(_tqdm_bar)
_figures.use_figure("bench", _bench_figure)
_figures.use_figure("tuning", _tuning_figure)

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from nbllm.notebook.widgets import ChatPanel
    from nbllm.notebook.widgets.models import ModelsPanel

# ``%reload_ext nbllm`` re-runs this module in place (importlib.reload): keep the engine, with its
# loaded models, caches, stats and settings, instead of orphaning it and the memory it holds.
_engine: Engine | None = globals().get("_engine")
_engine_lock: threading.Lock = globals().get("_engine_lock") or threading.Lock()


def get_engine() -> Engine:
    """The process-wide engine, created on first use (reads the config file then)."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                from nbllm.engine import Engine

                _engine = Engine()
    return _engine


@overload
def generate(
    prompt: str, model: str | None = ..., stream: Literal[False] = ..., cache: bool = ..., **params: Any
) -> Completion: ...
@overload
def generate(
    prompt: str, model: str | None = ..., *, stream: Literal[True], cache: bool = ..., **params: Any
) -> Stream: ...
def generate(
    prompt: str, model: str | None = None, stream: bool = False, cache: bool = True, **params: Any
) -> Completion | Stream:
    """Continue ``prompt`` with ``model`` (default: the configured default model).

    Parameters: temperature, top_p, top_k, min_p, max_tokens, repeat_penalty, presence_penalty,
    frequency_penalty, seed, stop. ``stream=True`` returns a ``Stream`` of text pieces (its
    ``stats`` are set when it ends); otherwise a ``Completion`` with ``text`` and ``stats``.
    An identical earlier request is answered from the prompt cache; ``cache=False`` skips it.
    """
    result: Completion | Stream = get_engine().generate(prompt, model=model, stream=stream, cache=cache, **params)
    return result


@overload
def chat(
    messages: Any, model: str | None = ..., stream: Literal[False] = ..., cache: bool = ..., **params: Any
) -> Completion: ...
@overload
def chat(
    messages: Any, model: str | None = ..., *, stream: Literal[True], cache: bool = ..., **params: Any
) -> Stream: ...
def chat(
    messages: Any, model: str | None = None, stream: bool = False, cache: bool = True, **params: Any
) -> Completion | Stream:
    """Answer a conversation: a string, or ``[{'role': 'user', 'content': ...}, ...]``.

    Uses the model's own chat template when its file has one, else a plain
    ``User:/Assistant:`` transcript (what base models such as the default continue sensibly).

    Structured output: ``schema=`` (a pydantic model class, a JSON Schema dict, a type such as
    ``list[str]``, or ``"json"`` for any JSON object) or ``choices=["yes", "no"]`` constrains
    decoding with a grammar, so the answer always parses; ``result.data`` holds it as data.
    The same works for ``generate``, ``generate_many`` and ``chat_many``.
    """
    result: Completion | Stream = get_engine().chat(messages, model=model, stream=stream, cache=cache, **params)
    return result


def generate_many(
    prompts: Sequence[str],
    model: str | None = None,
    *,
    per_item: Sequence[Mapping[str, Any]] | None = None,
    cache: bool = True,
    progress: bool = True,
    on_result: Callable[[ManyResult], None] | None = None,
    **params: Any,
) -> list[ManyResult]:
    """Answer many prompts at once: up to ``performance.parallel`` sequences decode together on
    one model (continuous batching), several times the throughput of one at a time on a CPU.

    Results come back in input order (``.text``, ``.stats``, or ``.error`` for a prompt that
    could not run while the others completed; with ``schema=`` also ``.data``, and an answer cut
    off by ``max_tokens`` is that row's error). ``per_item`` gives each prompt its own
    parameters (e.g. seeds); ``on_result`` receives each result as soon as it is done. Prompt-
    cache hits never enter the batch. Ctrl-C raises ``BatchInterrupted`` holding what finished.
    """
    return get_engine().generate_many(
        prompts, model, per_item=per_item, cache=cache, progress=progress, on_result=on_result, **params
    )


def chat_many(
    conversations: Sequence[Any],
    model: str | None = None,
    *,
    per_item: Sequence[Mapping[str, Any]] | None = None,
    cache: bool = True,
    progress: bool = True,
    on_result: Callable[[ManyResult], None] | None = None,
    **params: Any,
) -> list[ManyResult]:
    """``generate_many`` for chats: each item a string or a list of messages."""
    return get_engine().chat_many(
        conversations, model, per_item=per_item, cache=cache, progress=progress, on_result=on_result, **params
    )


def embed(
    texts: Any, model: str | None = None, *, normalize: bool = True, truncate: bool = False, progress: bool = True
) -> Embeddings:
    """Vectors for ``texts``: a float32 array, one row per text (a single string: one vector).

    ``model``: an embedding model (default: ``embedding_model`` in the config, the embedded
    all-MiniLM-L6-v2). Texts are packed into few decodes; vectors are cached on disk per model
    file, text and options, so embedding the same rows again costs nothing. A text longer than
    the model reads is an error, or with ``truncate=True`` cut (``result.truncated`` lists them).
    ``normalize``: unit length, so a dot product is the cosine similarity.
    """
    return get_engine().embed(texts, model, normalize=normalize, truncate=truncate, progress=progress)


def similar(query: str, texts: Any, k: int = 5, model: str | None = None) -> pandas.DataFrame:
    """The ``k`` texts (a list, a pandas Series, or an ``Index``) most similar in meaning to
    ``query``: a DataFrame of text, score (cosine similarity) and index (the text's label).
    The texts' vectors are cached, so asking again about the same texts is quick."""
    return get_engine().similar(query, texts, k, model)


@overload
def ask(
    question: str, docs: Any, model: str | None = ..., *, stream: Literal[False] = ..., k: int = ..., **params: Any
) -> Completion: ...
@overload
def ask(
    question: str, docs: Any, model: str | None = ..., *, stream: Literal[True], k: int = ..., **params: Any
) -> Stream: ...
def ask(
    question: str,
    docs: Any,
    model: str | None = None,
    *,
    stream: bool = False,
    k: int = 4,
    embedding_model: str | None = None,
    progress: bool = True,
    **params: Any,
) -> Completion | Stream:
    """Answer ``question`` from your documents: ``docs`` is a text, a list of texts, a pandas
    Series, a ``{name: text}`` dict, a file or folder path (text, Markdown, Python, notebooks'
    cells...), or an ``Index``. They are chunked and embedded (cached), the ``k`` passages most
    like the question go to the chat model ``model`` as numbered sources, and the answer cites
    them; ``answer.sources`` lists each with where it came from (file and lines, cell, row).
    Other parameters as for ``chat``; ``stream=True`` streams like every answer."""
    result: Completion | Stream = get_engine().ask(
        question, docs, model, embedding_model=embedding_model, k=k, stream=stream, progress=progress, **params
    )
    return result


def load(name: str | None = None) -> Table:
    """Load a model now (by name or .gguf path) so the first answer starts at once."""
    get_engine().registry.load(name)
    return models()


def unload(name: str | None = None) -> bool:
    """Unload a model (close it, freeing its memory); ``unload()`` with no name unloads all."""
    if name is None:
        get_engine().registry.unload_all()
        return True
    return get_engine().registry.unload(name)


def models() -> Table:
    """Every model: the catalog, the models folder, the config's and remote ones; kind, size,
    downloaded, loaded (load time, last use), the name to load it by. The same table as
    ``nbllm models`` and ``%llm models`` (``nbllm.hub.manager.list_models``)."""
    from nbllm.hub.manager import list_models as listing

    return listing(get_engine())


def stats() -> dict[str, Any]:
    """Counters since the process started: requests, tokens, loads, evictions, prompt-cache hits
    and misses, prompt tokens reused, time saved, per model, the last request; and the caches."""
    engine = get_engine()
    return {**engine.stats.snapshot(), "cache": engine.cache_stats()}


def clear_cache() -> None:
    """Empty the prompt cache (on disk) and the KV prefix snapshots of loaded models."""
    get_engine().clear_cache()


def history(
    model: str | None = None,
    search: str | None = None,
    since: Any = None,
    limit: int | None = 50,
    origin: str | None = None,
) -> pandas.DataFrame:
    """Past answers from the history log, newest first, as a DataFrame: time (UTC), origin,
    model, prompt, answer, finish_reason, cached, tokens, seconds, t/s, seed, params, messages...

    Filters: ``model`` (its name), ``search`` (text in the prompt, messages or answer), ``since``
    (a datetime, ``"2026-12-01"``, or an age: ``"30m"``, ``"1h"``, ``"2d"``), ``origin`` (api,
    magic, panel, server, cli); ``limit=None`` for every row. The log is ``history.db`` in the
    data folder (``~/.local/share/nbllm``, or ``$NBLLM_HOME``); turn it off with
    ``nbllm.configure(history={'enabled': False})``, the config file, or ``NBLLM_HISTORY=0``."""
    from datetime import datetime

    import pandas

    from nbllm.core.history import FRAME_COLUMNS

    rows = get_engine().history.query(model=model, search=search, since=since, origin=origin, limit=limit)
    frame = pandas.DataFrame(rows, columns=list(FRAME_COLUMNS))
    # Parsed by Python, one value at a time: pandas' format="ISO8601" needs pandas 2, and
    # pyproject allows pandas 1.5.
    frame["time"] = pandas.to_datetime([datetime.fromisoformat(value) for value in frame["time"]], utc=True)
    return frame


def history_clear() -> int:
    """Delete every answer in the history log; returns how many there were."""
    return get_engine().history.clear()


def health() -> dict[str, Any]:
    """Resident models with their settings, memory, and the config in use."""
    return get_engine().health()


def hardware() -> HardwareReport:
    """CPU, cores, instruction sets, RAM, NVIDIA GPUs, and what the llama.cpp build can do."""
    from nbllm.host.machine import hardware_report

    return hardware_report(get_engine().registry.backend.build_info())


def doctor(model: str | None = None) -> DoctorReport:
    """The hardware report plus what is wrong with this set-up and what to do (``nbllm doctor``)."""
    from nbllm.measure.doctor import diagnose

    return diagnose(get_engine(), model)


def tune(model: str | None = None, *, save: bool = True, progress: bool = True) -> TuneResult:
    """Measure the fastest threads, batch size (and on a GPU, layers and flash attention) for
    ``model`` on this machine. Saved per model file and machine; used whenever the config leaves
    them on auto (``threads: null`` ...). Takes well under a minute for the default model."""
    from nbllm.measure import tuner

    return tuner.tune(get_engine(), model, save=save, progress=progress)


def bench(
    models: str | list[str] | None = None,
    *,
    pp: int | None = 512,
    tg: int | None = 128,
    repetitions: int = 5,
    threads: int | list[int] | None = None,
    batch_size: int | list[int] | None = None,
    context_size: int | list[int] | None = None,
    gpu_layers: int | list[int] | None = None,
    progress: bool = True,
    **callbacks: Any,
) -> BenchResults:
    """llama-bench-style tests: prompt processing of ``pp`` tokens and generation of ``tg``
    tokens, ``repetitions`` times after a warm-up, for every combination of the given models and
    settings (each may be a list). Returns records (mean ± std t/s, the guide's rating, the share
    of the memory-bandwidth limit) that ``.save("results.json")`` writes and ``.figure()`` plots."""
    from nbllm.measure.bench import bench as run_bench

    return run_bench(
        get_engine(),
        models,
        pp=pp,
        tg=tg,
        repetitions=repetitions,
        threads=threads,
        batch_size=batch_size,
        context_size=context_size,
        gpu_layers=gpu_layers,
        progress=progress,
        **callbacks,
    )


def catalog() -> Table:
    """Known models: family, parameters, license, quantizations, size and memory needed, source."""
    from nbllm.hub.manager import catalog as catalog_table

    return catalog_table()


list_models = models  # its earlier name (README: "In Python"), kept working


def recommend(**machine: Any) -> Recommendation:
    """Which catalog models fit this machine (or ram=/vram=/cores=/bandwidth=), how fast, what to download."""
    from nbllm.hub.recommendation import recommend as advise

    return advise(**machine)


def download(
    name: str, quant: str = "Q4_K_M", *, sha256: str | None = None, progress: Progress | None = None, **options: Any
) -> Download:
    """Download a catalog model, an https URL or hf://owner/repo/file: resumable, checksum-verified,
    GGUF-checked, and moved into the models folder only when complete."""
    from nbllm.hub.manager import download as fetch_model

    return fetch_model(name, quant, sha256=sha256, progress=progress, **options)


def verify(name: str | None = None, quant: str | None = None) -> VerifyReport:
    """The GGUF check and the SHA-256 of one downloaded model, or of all of them."""
    from nbllm.hub.manager import verify as check

    return check(name, quant, engine=get_engine())


def model_info(name: str, quant: str | None = None) -> ModelInfo:
    """Architecture, parameters, context length, quantization, chat template, size, path."""
    from nbllm.hub.manager import model_info as info

    return info(name, quant, get_engine())


def remove_model(name: str, quant: str | None = None) -> Path:
    """Delete a downloaded model from the models folder (unloading it first)."""
    from nbllm.hub.manager import remove_model as remove

    return remove(name, quant, get_engine())


def serve(
    host: str | None = None,
    port: int | None = None,
    *,
    api_key: str | None = None,
    workers: int | None = None,
    batched: bool = True,
    max_tokens_limit: int | None = None,
    log_requests: bool = False,
) -> ServerHandle:
    """The OpenAI-compatible server (``nbllm serve``) from this process, in a background thread;
    returns at once. Its clients share this kernel's engine: loaded models, prompt cache, stats.
    ``handle.url``, ``handle.base_url`` (for OpenAI clients), ``handle.stop()``; ``port=0`` picks a
    free port. Concurrent requests for one model decode together unless ``batched=False``.
    Needs ``pip install 'nbllm[server]'``."""
    from nbllm.server.running import serve_in_background

    return serve_in_background(
        host,
        port,
        api_key=api_key,
        workers=workers,
        batched=batched,
        max_tokens_limit=max_tokens_limit,
        log_requests=log_requests,
    )


def settings() -> Settings:
    """The settings in effect."""
    return get_engine().settings


def configure(source: str | os.PathLike[str] | Mapping[str, Any] | None = None, **sections: Any) -> Settings:
    """Apply a YAML file, or a dict of overrides, at run time.

    ``nbllm.configure(cache={'model_cache_size': 3})`` or ``nbllm.configure('nbllm.yaml')``.
    Invalid values raise ``ConfigError`` naming the key, the value and what is allowed.
    """
    global _engine
    if isinstance(source, (str, os.PathLike)) and _engine is None:
        # Start from the named file directly: a broken file found by the default search
        # (./nbllm.yaml, say) must not stop the user from naming a good one.
        with _engine_lock:
            if _engine is None:
                from pathlib import Path

                from nbllm.core.config import load_file
                from nbllm.engine import Engine

                _engine = Engine(load_file(Path(source).expanduser()))
                return _engine.configure(**sections)
    return get_engine().configure(source, **sections)


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """``%load_ext nbllm``: registers ``%%llm`` and ``%llm``. IPython is imported only here."""
    from nbllm.notebook.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    from nbllm.notebook.magics import unload_ipython_extension as unload

    unload(ipython)


def __getattr__(name: str) -> Any:
    # Front-end classes load lazily, so ``import nbllm`` never imports ipywidgets or plotly.
    if name == "ChatPanel":
        from nbllm.notebook.widgets import ChatPanel

        return ChatPanel
    if name == "plots":  # ``nbllm.notebook.plots.ThroughputChart`` without importing plotly at ``import nbllm``
        import importlib

        return importlib.import_module("nbllm.notebook.plots")
    if name == "Index":  # loads the engine's modules: only when asked for
        from nbllm.engine import search

        search.use_engine(get_engine)
        return search.Index
    if name == "ModelsPanel":
        from nbllm.notebook.widgets.models import ModelsPanel

        return ModelsPanel
    raise AttributeError(f"module 'nbllm' has no attribute {name!r}")
