"""The models panel: the catalog and the local models, advice for this machine, downloads with a
progress bar, and loading, in a notebook.

A front end: it calls ``nbllm.hub.manager``, ``nbllm.hub.recommendation`` and ``nbllm.load`` and shows what
comes back. A download runs on a worker thread, so the kernel stays free (for the Cancel click,
or other cells) while bytes arrive; the downloader's progress callback feeds the progress bar.
In tests and scripts, ``panel.refresh()``, ``panel.recommend()``, ``panel.download(name, quant)``,
``panel.cancel()``, ``panel.load(name)`` and ``panel.wait()`` do what the buttons do.

The Load menu offers every model that loads by name (downloaded files, the config's names, remote
models, the embedded ones) with one already chosen. Once the panel is shown, the process's one watcher thread
looks at the models folder, the config and the loaded models every ``WATCH_SECONDS`` (one
directory listing, for every shown panel at once) and lists them again when they change: a model
downloaded in another cell or a terminal, or a file copied into the folder, appears without
pressing Refresh. A panel whose widget is closed (``close()``, or by the front end) is no longer
watched, and the thread ends when no panel is left to watch.
"""

from __future__ import annotations

import html
import logging
import os
import threading
import time
import weakref
from collections.abc import Hashable
from typing import Any

import ipywidgets as widgets

from nbllm.core import paths
from nbllm.core.errors import DownloadError, NbllmError
from nbllm.core.units import format_bytes
from nbllm.hub.catalog import DEFAULT_QUANT, load_catalog

__all__ = ["ModelsPanel"]

log = logging.getLogger("nbllm")

WATCH_SECONDS = 2.0

_STATUS_COLORS = {
    "ready": "var(--jp-content-font-color2,#4b5563)",
    "busy": "#1d4ed8",
    "done": "#15803d",
    "error": "#dc2626",
}


class DownloadCancelled(DownloadError):
    """The Cancel button stopped a download (its partial file is kept, so it resumes)."""


class ModelsPanel:
    """Models in a notebook: list, recommend, download (with progress), load."""

    def __init__(self) -> None:
        self.status_kind = "ready"
        self.last_download: Any = None  # the latest finished download (nbllm.hub.downloads.Download)
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._listing = threading.RLock()  # refresh() runs from the kernel, the download and the watcher
        self._seen: Hashable = None  # what the models looked like at the last refresh
        self._rows: list[dict[str, Any]] = []  # the model table's rows at the last refresh
        self._picked: str | None = None  # the Load menu's value when the panel chose it, not the user
        self._closed = False  # the widget was closed: no more watching
        self._build()
        self.widget.observe(self._on_comm, names="comm")
        self.refresh()
        self._set_status("Ready. Pick a model, or press Recommend for advice on this machine.", "ready")

    # ----------------------------------------------------------------- display

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        self.watch()
        return self.widget._repr_mimebundle_(**kwargs)

    def watch(self) -> None:
        """List the models again whenever they change (started when the panel is shown), until
        the panel's widget is closed, from Python or from the front end."""
        if self._closed:
            return
        comm = self.widget.comm
        if comm is not None:
            panel = weakref.ref(self)  # the kernel's comm manager holds this callback: not the panel

            def closed_by_front_end(_msg: Any) -> None:
                current = panel()
                if current is not None:
                    current._closed = True

            comm.on_close(closed_by_front_end)
        _WATCHER.add(self)

    def close(self) -> None:
        """Stop watching the models folder and close the widgets."""
        self._closed = True
        self.widget.close()

    def _on_comm(self, change: dict[str, Any]) -> None:
        if change["new"] is None:  # Widget.close(): ipywidgets drops the comm
            self._closed = True

    @property
    def watched(self) -> bool:
        """Whether the watcher still lists this panel's models again when they change."""
        comm = self.widget.comm
        return not self._closed and comm is not None and not getattr(comm, "_closed", False)

    def _build(self) -> None:
        names = load_catalog().names()
        self.table = widgets.HTML()
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh", tooltip="list the models again")
        self.recommend_button = widgets.Button(description="Recommend", icon="lightbulb-o")
        self.advice = widgets.HTML()
        self.name = widgets.Combobox(
            options=names,
            value="",
            placeholder="catalog name, https URL or hf://owner/repo/file",
            ensure_option=False,
            layout=widgets.Layout(width="340px"),
        )
        self.quant = widgets.Dropdown(
            options=[DEFAULT_QUANT], value=DEFAULT_QUANT, layout=widgets.Layout(width="110px")
        )
        self.download_button = widgets.Button(description="Download", button_style="primary", icon="download")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True)
        self.progress = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, layout=widgets.Layout(width="340px"))
        self.progress_text = widgets.Label()
        self.local = widgets.Dropdown(options=[], layout=widgets.Layout(width="340px"))
        self.load_button = widgets.Button(description="Load", icon="play")
        self.status = widgets.HTML()
        for widget, name in (
            (self.table, "table"),
            (self.local, "load-menu"),
            (self.load_button, "load"),
            (self.status, "status"),
        ):
            widget.add_class(f"nbllm-models-{name}")  # for styling, and for the browser tests to find them

        self.refresh_button.on_click(lambda _: self.refresh())
        self.recommend_button.on_click(lambda _: self.recommend())
        self.download_button.on_click(lambda _: self.download())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.load_button.on_click(lambda _: self.load())
        self.name.observe(self._on_name, names="value")

        self.widget = widgets.VBox(
            [
                widgets.HTML("<b>Models</b>"),
                self.table,
                widgets.HBox([self.refresh_button, self.recommend_button]),
                self.advice,
                widgets.HBox([self.name, self.quant, self.download_button, self.cancel_button]),
                widgets.HBox([self.progress, self.progress_text]),
                widgets.HBox([self.local, self.load_button]),
                self.status,
            ]
        )

    # ----------------------------------------------------------------- what the buttons do

    @property
    def busy(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def status_text(self) -> str:
        """The status line as plain text."""
        return html.unescape(self.status.value.split(">", 1)[-1].rsplit("<", 1)[0])

    def refresh(self, only_if_changed: bool = False) -> None:
        """List the models again (downloaded, size, loaded) and what the Load menu offers."""
        import nbllm
        from nbllm.hub.manager import list_models

        with self._listing:
            engine = nbllm.get_engine()
            seen = _models_state(engine)
            if only_if_changed and seen == self._seen:
                return
            try:
                table = list_models(engine)
            except NbllmError as error:
                self._set_status(str(error), "error")
                return
            self._show_models(engine, seen, table)

    def _show_models(self, engine: Any, seen: Hashable, table: Any) -> None:
        """Show a listing (``list_models``'s table, taken when the models looked like ``seen``)."""
        with self._listing:
            self._seen = seen
            self._rows = list(table)
            self.table.value = table._repr_html_()
            # Files here first (chat models before embedding models), then what loads by name
            # without one yet (embedded, remote).
            rows = sorted(
                (row for row in table if row["load with"] != "-"),
                key=lambda row: (row["downloaded"] is not True, row["kind"] == "embedding"),
            )
            loadable = list(dict.fromkeys(row["load with"] for row in rows))
            # The user's choice stays; one the panel made is made again (a new file may be better).
            chosen = self.local.value if self.local.value != self._picked else None
            self.local.options = loadable
            # ipywidgets keeps "nothing selected" across new options: choose, or Load has nothing.
            self.local.value = _choice(chosen, rows, engine.settings.default_model) if loadable else None
            self._picked = self.local.value if self.local.value != chosen else None

    def recommend(self) -> None:
        """Advice for this machine: which models fit, how fast, which quantization."""
        from nbllm.hub.recommendation import recommend

        self._set_status("Looking at this machine…", "busy")
        try:
            advice = recommend()
        except NbllmError as error:
            self._set_status(str(error), "error")
            return
        self.advice.value = advice._repr_html_()
        pick = advice.pick
        if pick is not None and not self.name.value:
            self.name.value = pick.model.name
            self.quant.value = pick.quant
        self._set_status("Recommendation below the list." if pick else "Nothing in the catalog fits here.", "done")

    def download(self, name: str | None = None, quant: str | None = None) -> bool:
        """Start downloading ``name`` (default: the name box) on a worker thread; False if not started."""
        name = (self.name.value if name is None else name).strip()
        if not name:
            self._set_status("Type a catalog name, an https URL or hf://owner/repo/file first.", "error")
            return False
        if self.busy:
            self._set_status("A download is running: wait for it, or press Cancel.", "busy")
            return False
        quant = quant or self.quant.value or DEFAULT_QUANT
        self._cancel.clear()
        self.progress.value = 0.0
        self.progress.bar_style = ""
        self.progress_text.value = ""
        self.last_error = None
        self._show_busy(True)
        self._set_status(f"Downloading {name}…", "busy")
        self._thread = threading.Thread(target=self._download, args=(name, quant), name="nbllm-download", daemon=True)
        self._thread.start()
        return True

    def cancel(self) -> None:
        """Stop the running download; its partial file is kept, so Download resumes it."""
        if self.busy:
            self._cancel.set()
            self._set_status("Cancelling…", "busy")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the download has ended; False if it still runs after ``timeout``."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def load(self, name: str | None = None) -> bool:
        """Load a model now (``nbllm.load``), so the first answer starts at once."""
        import nbllm

        if not name:
            self.refresh(only_if_changed=True)  # a model added a moment ago counts
            name = self.local.value
        if not name:
            self._set_status("Nothing to load: download a model first.", "error")
            return False
        self._set_status(f"Loading {name}…", "busy")
        try:
            nbllm.load(name)
        except NbllmError as error:
            self._set_status(str(error), "error")
            return False
        self.refresh()
        embeds = any(row["load with"] == name and row["kind"] == "embedding" for row in self._rows)
        use = f"nbllm.embed(texts, model={name!r})" if embeds else f"%%llm -m {name}, nbllm.chat(..., model={name!r})"
        self._set_status(f"Loaded {name}: use it with {use}.", "done")
        return True

    # ----------------------------------------------------------------- the worker

    def _download(self, name: str, quant: str) -> None:
        """The worker thread: download, then report. Never raises (nobody would see it)."""
        from nbllm.hub.manager import download, load_name

        try:
            result = download(name, quant, progress=self._on_progress, show_progress=False)
        except DownloadCancelled as error:
            self._finish(str(error), "error", "warning")
        except NbllmError as error:
            self.last_error = str(error)
            self._finish(str(error), "error", "danger")
        except Exception as error:  # a bug: shown, logged, and the panel stays usable
            log.exception("Download of %s failed", name)
            self.last_error = f"{type(error).__name__}: {error}"
            self._finish(f"The download failed unexpectedly: {self.last_error}", "error", "danger")
        else:
            self.last_download = result
            self.progress.value = 1.0
            self.refresh()
            if load_name(result.path) in self.local.options:
                self.local.value = load_name(result.path)
            self._finish(f"{result} Press Load to load it.", "done", "success")

    def _on_progress(self, done: int, total: int | None) -> None:
        if self._cancel.is_set() and (total is None or done < total):  # a finished download stays finished
            raise DownloadCancelled(
                f"Download cancelled after {format_bytes(done)}. The part downloaded so far is kept: "
                "press Download again to resume it."
            )
        if total:
            self.progress.value = min(done / total, 1.0)
            self.progress_text.value = f"{format_bytes(done)} of {format_bytes(total)}"
        else:
            self.progress_text.value = format_bytes(done)

    def _finish(self, message: str, kind: str, bar_style: str) -> None:
        self.progress.bar_style = bar_style
        self._show_busy(False)
        self._set_status(message, kind)

    # ----------------------------------------------------------------- small helpers

    def _on_name(self, change: dict[str, Any]) -> None:
        """A catalog name offers its quantizations; a URL has none to choose."""
        model = load_catalog().get(str(change["new"] or ""))
        if model is None:
            self.quant.options = [DEFAULT_QUANT]
            self.quant.value = DEFAULT_QUANT
            self.quant.disabled = True
            return
        self.quant.disabled = False
        self.quant.options = list(model.files)
        self.quant.value = DEFAULT_QUANT if DEFAULT_QUANT in model.files else next(iter(model.files))

    def _show_busy(self, busy: bool) -> None:
        self.download_button.disabled = busy
        self.cancel_button.disabled = not busy

    def _set_status(self, text: str, kind: str) -> None:
        self.status_kind = kind
        color = _STATUS_COLORS.get(kind, _STATUS_COLORS["ready"])
        self.status.value = f"<span style='color:{color}'>{html.escape(text)}</span>"


class _Watcher:
    """One thread for every shown panel of the process: each tick it looks at the models once
    (one directory listing) and, when they changed, lists them once for all the panels that are
    behind. Panels are held weakly; the thread ends when no open panel is left, and starts again
    with the next one shown."""

    def __init__(self) -> None:
        self._panels: weakref.WeakSet[ModelsPanel] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, panel: ModelsPanel) -> None:
        with self._lock:
            self._panels.add(panel)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="nbllm-models-watch", daemon=True)
                self._thread.start()

    def _open_panels(self) -> list[ModelsPanel]:
        with self._lock:
            for panel in [p for p in self._panels if not p.watched]:
                self._panels.discard(panel)
            panels = list(self._panels)
            if not panels:
                self._thread = None  # add() starts a new thread from now on
            return panels

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_SECONDS)  # read each tick: tests make it shorter
            panels = self._open_panels()
            if not panels:
                return
            try:
                self._tick(panels)
            except Exception:  # a bug must not end the watching silently in a loop
                log.exception("Listing the models failed")
            del panels

    @staticmethod
    def _tick(panels: list[ModelsPanel]) -> None:
        import nbllm
        from nbllm.hub.manager import list_models

        engine = nbllm.get_engine()
        seen = _models_state(engine)
        behind = [panel for panel in panels if panel._seen != seen]
        if not behind:
            return
        try:
            table = list_models(engine)
        except NbllmError as error:
            for panel in behind:
                panel._set_status(str(error), "error")
            return
        for panel in behind:
            panel._show_models(engine, seen, table)


_WATCHER = _Watcher()


def _models_state(engine: Any) -> Hashable:
    """What the model list depends on, cheaply: the models folder's files (one directory
    listing), the config's names and the loaded models."""
    try:
        with os.scandir(paths.models_dir()) as entries:
            files = sorted(
                (e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.name.endswith(".gguf")
            )
    except OSError:  # no folder yet
        files = []
    settings = engine.settings
    resident = sorted(r.spec.key for r in engine.registry.resident())
    return (tuple(files), tuple(settings.models.items()), tuple(settings.remote_models), tuple(resident))


def _choice(current: str | None, rows: list[dict[str, Any]], default_model: str) -> str:
    """What the Load menu shows chosen: the user's choice while it is there, else the model used
    last, else the configured default if its file is here, else the first file here (what the
    user downloaded), else the default (installed on first use), else the first name."""
    names = [str(row["load with"]) for row in rows]
    if current is not None and current in names:
        return current
    loaded = [row for row in rows if row["loaded"]]
    if loaded:
        return str(max(loaded, key=lambda row: row["last used"] or 0.0)["load with"])
    here = [row for row in rows if row["downloaded"] is True]
    default = [row for row in rows if default_model in (row["name"], row["load with"])]
    for candidates in ([row for row in default if row in here], here, default, rows):
        if candidates:
            return str(candidates[0]["load with"])
    raise ValueError("no model to choose from")  # the caller asks only when there are some
