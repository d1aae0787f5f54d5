"""The models panel: the catalog and the local models, advice for this machine, downloads with a
progress bar, and loading, in a notebook.

A front end: it calls ``nbllm.hub.manager``, ``nbllm.hub.recommendation`` and ``nbllm.load`` and shows what
comes back. A download runs on a worker thread, so the kernel stays free (for the Cancel click,
or other cells) while bytes arrive; the downloader's progress callback feeds the progress bar.
In tests and scripts, ``panel.refresh()``, ``panel.recommend()``, ``panel.download(name, quant)``,
``panel.cancel()``, ``panel.load(name)`` and ``panel.wait()`` do what the buttons do.
"""

from __future__ import annotations

import html
import logging
import threading
from typing import Any

import ipywidgets as widgets

from nbllm.core.errors import DownloadError, NbllmError
from nbllm.core.units import format_bytes
from nbllm.hub.catalog import DEFAULT_QUANT, load_catalog

__all__ = ["ModelsPanel"]

log = logging.getLogger("nbllm")

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
        self._build()
        self.refresh()
        self._set_status("Ready. Pick a model, or press Recommend for advice on this machine.", "ready")

    # ----------------------------------------------------------------- display

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

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

    def refresh(self) -> None:
        """List the catalog and the local models again (downloaded, size, loaded)."""
        import nbllm
        from nbllm.hub.manager import list_models

        try:
            table = list_models(nbllm.get_engine())
        except NbllmError as error:
            self._set_status(str(error), "error")
            return
        self.table.value = table._repr_html_()
        loadable = [row["load with"] for row in table if row["downloaded"] and row["load with"] != "-"]
        current = self.local.value
        self.local.options = loadable
        if current in loadable:
            self.local.value = current

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

        name = name or self.local.value
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
        self._set_status(f"Loaded {name}: use it with %%llm -m {name}, nbllm.chat(..., model={name!r}).", "done")
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
            self.local.value = load_name(result.path) if load_name(result.path) in self.local.options else None
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
