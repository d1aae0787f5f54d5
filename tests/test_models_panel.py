"""The models panel, driven through its widgets' callbacks: a real download from a local server
(a catalog entry of the user's own catalog, through NBLLM_HF_ENDPOINT) filling the progress bar,
Cancel and resume, errors in the status line, Recommend, and Load on real llama.cpp."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbllm.core import paths
from nbllm.engine import Engine
from nbllm.notebook.widgets import models as models_panel
from nbllm.notebook.widgets.models import ModelsPanel
from tests.test_download import ModelServer

FILE_URL = "/test/tiny-chat-GGUF/resolve/main/tiny-chat.Q4_K_M.gguf"


pytestmark = pytest.mark.usefixtures("home")  # every test: its own NBLLM_HOME


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tiny_models: dict[str, Path]) -> Iterator[ModelServer]:
    """A local Hugging Face stand-in, and a user catalog entry whose files live there."""
    server = ModelServer()
    monkeypatch.setenv("NBLLM_HF_ENDPOINT", server.base)
    data = tiny_models["chat"].read_bytes()
    server.serve(FILE_URL, data, headers={"X-Linked-ETag": f'"{hashlib.sha256(data).hexdigest()}"', "ETag": '"v1"'})
    catalog = paths.config_dir() / "catalog.yaml"
    catalog.parent.mkdir(parents=True, exist_ok=True)
    catalog.write_text(
        "models:\n  tiny-chat:\n    family: Test\n    params: 1M\n    license: MIT\n    repo: test/tiny-chat-GGUF\n"
        "    files:\n"
        f"      Q4_K_M: {{file: tiny-chat.Q4_K_M.gguf, size: {len(data)}}}\n"
        "      Q8_0: {file: tiny-chat.Q8_0.gguf, size: 1MB}\n",
        encoding="utf-8",
    )
    yield server
    server.close()


@pytest.fixture
def panel() -> Iterator[ModelsPanel]:
    view = ModelsPanel()
    yield view
    view.cancel()
    assert view.wait(30), "a download was still running at the end of the test"
    view.close()


@pytest.fixture
def plain_engine() -> Iterator[Engine]:
    """The process-wide engine as a new user has it: no config file, models only in the folder."""
    import nbllm
    from nbllm.core.config import Settings

    engine = Engine(Settings().merged({"performance": {"context_size": 512}, "cache": {"enabled": False}}))
    previous, nbllm._engine = nbllm._engine, engine
    yield engine
    engine.close()
    nbllm._engine = previous


def two_downloaded_models(tiny_models: dict[str, Path]) -> list[Path]:
    folder = paths.models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    copies = [folder / "first-model.gguf", folder / "second-model.gguf"]
    for copy, source in zip(copies, (tiny_models["a"], tiny_models["b"]), strict=True):
        copy.write_bytes(source.read_bytes())
    return copies


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_the_panel_shows_the_catalog_and_displays_as_a_widget(hub: ModelServer, panel: ModelsPanel) -> None:
    assert "tiny-chat" in panel.table.value
    assert "phi-2" in panel.table.value
    assert "tiny-chat" in panel.name.options
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_choosing_a_catalog_model_offers_its_quantizations(hub: ModelServer, panel: ModelsPanel) -> None:
    panel.name.value = "tiny-chat"
    assert list(panel.quant.options) == ["Q4_K_M", "Q8_0"]
    assert panel.quant.value == "Q4_K_M"
    panel.name.value = "hf://owner/repo/file.gguf"
    assert panel.quant.disabled


def test_the_download_button_fills_the_progress_bar_and_lists_the_model(hub: ModelServer, panel: ModelsPanel) -> None:
    panel.name.value = "tiny-chat"
    panel.download_button.click()
    assert panel.wait(60)

    assert panel.status_kind == "done", panel.status_text
    assert panel.progress.value == 1.0
    assert panel.progress.bar_style == "success"
    assert " of " in panel.progress_text.value
    assert "verified (X-Linked-ETag)" in panel.status_text
    assert (paths.models_dir() / "tiny-chat.Q4_K_M.gguf").is_file()
    assert panel.local.value == "tiny-chat.Q4_K_M"
    assert "tiny-chat.Q4_K_M" in panel.table.value
    assert not panel.download_button.disabled


def test_the_load_button_loads_the_downloaded_model(
    hub: ModelServer, panel: ModelsPanel, global_engine: Engine
) -> None:
    panel.download("tiny-chat", "Q4_K_M")
    assert panel.wait(60)
    panel.load_button.click()

    assert panel.status_kind == "done", panel.status_text
    assert [r.spec.path for r in global_engine.registry.resident()] == [paths.models_dir() / "tiny-chat.Q4_K_M.gguf"]
    assert "Loaded tiny-chat.Q4_K_M" in panel.status_text


def test_cancel_keeps_the_partial_download_and_the_next_download_resumes_it(
    hub: ModelServer, panel: ModelsPanel
) -> None:
    hub.routes[FILE_URL].delay = 0.05  # 16 KiB every 50 ms: slow enough to press Cancel
    assert panel.download("tiny-chat")
    wait_until(lambda: panel.progress.value > 0.1)
    panel.cancel_button.click()
    assert panel.wait(30)

    assert "cancelled" in panel.status_text
    partial = paths.models_dir() / ".tiny-chat.Q4_K_M.gguf.partial"
    assert partial.stat().st_size > 0
    assert not (paths.models_dir() / "tiny-chat.Q4_K_M.gguf").exists()

    hub.routes[FILE_URL].delay = 0.0
    assert panel.download("tiny-chat")
    assert panel.wait(60)
    assert panel.status_kind == "done", panel.status_text
    assert panel.last_download.resumed_from > 0
    assert hub.requests_to(FILE_URL)[-1]["Range"].startswith("bytes=")


def test_a_failed_download_shows_the_error_and_the_panel_stays_usable(hub: ModelServer, panel: ModelsPanel) -> None:
    broken = hub.serve("/broken/model.gguf", b"", status=500)
    panel.name.value = broken
    panel.download_button.click()
    assert panel.wait(30)
    assert panel.status_kind == "error"
    assert "HTTP 500" in panel.status_text
    assert panel.progress.bar_style == "danger"
    assert not panel.download_button.disabled

    panel.download("no-such-model")
    assert panel.wait(30)
    assert "not in the model catalog" in panel.status_text


def test_an_empty_name_is_a_message_not_a_crash(hub: ModelServer, panel: ModelsPanel) -> None:
    assert not panel.download("")
    assert "Type a catalog name" in panel.status_text


def test_with_nothing_downloaded_load_offers_the_embedded_default(plain_engine: Engine) -> None:
    """Nothing in the models folder: the default model still loads by name (installed offline)."""
    view = ModelsPanel()
    try:
        assert view.local.value == plain_engine.settings.default_model
    finally:
        view.close()


def test_load_with_two_downloaded_models_has_one_chosen_and_loads_it(
    plain_engine: Engine, tiny_models: dict[str, Path]
) -> None:
    """Issue 18: with two models downloaded, the menu had nothing chosen and Load said "Nothing to
    load: download a model first"."""
    first, second = two_downloaded_models(tiny_models)
    view = ModelsPanel()
    try:
        assert list(view.local.options)[:2] == ["first-model", "second-model"]
        assert view.local.value == "first-model", "a file here, chosen"
        view.load_button.click()
        assert view.status_kind == "done", view.status_text
        assert view.status_text.startswith("Loaded first-model: use it with %%llm -m first-model")
        assert [r.spec.path for r in plain_engine.registry.resident()] == [first]

        view.local.value = "second-model"
        view.refresh()
        assert view.local.value == "second-model", "a refresh keeps the user's choice"
        view.load_button.click()
        assert [r.spec.path for r in plain_engine.registry.resident()][-1] == second
    finally:
        view.close()


def test_the_load_menu_lists_a_model_added_after_the_panel_was_shown(
    plain_engine: Engine, tiny_models: dict[str, Path]
) -> None:
    """A file copied into the models folder (or downloaded in another cell or a terminal) shows
    up in the shown panel's menu and table, without pressing Refresh."""
    view = ModelsPanel()
    try:
        view._repr_mimebundle_()  # shown: the panel watches the models from now on
        assert "late-arrival" not in view.local.options
        folder = paths.models_dir()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "late-arrival.gguf").write_bytes(tiny_models["c"].read_bytes())
        wait_until(lambda: "late-arrival" in view.local.options, timeout=20)
        assert "late-arrival" in view.table.value
        assert view.local.value == "late-arrival", "the only file here: chosen"
    finally:
        view.close()


def test_loading_an_unknown_model_shows_the_error(hub: ModelServer, panel: ModelsPanel, global_engine: Engine) -> None:
    assert not panel.load("no-such-model")
    assert panel.status_kind == "error"
    assert "Unknown model 'no-such-model'" in panel.status_text


def test_recommend_shows_advice_and_suggests_the_pick(panel: ModelsPanel) -> None:
    panel.recommend_button.click()
    assert panel.status_kind == "done", panel.status_text
    assert "Recommended: " in panel.advice.value
    assert panel.name.value  # the pick, ready to download


def watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "nbllm-models-watch" and t.is_alive()]


def test_many_shown_panels_share_one_watcher_and_a_closed_panel_is_left_alone(
    plain_engine: Engine, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18 review: each shown panel started its own 2-second poller that ran for the
    kernel's life (re-running the cell added one more), and closing the widget did not stop it."""
    monkeypatch.setattr(models_panel, "WATCH_SECONDS", 0.05)
    views = [ModelsPanel() for _ in range(5)]
    try:
        for view in views:
            view._repr_mimebundle_()  # shown: watched from now on
        assert len(watcher_threads()) <= 1
        closed, from_the_front_end, open_ = views[0], views[1], views[2:]
        closed.widget.close()  # Widget.close(), as ipywidgets' close_all() does
        assert from_the_front_end.widget.comm is not None
        from_the_front_end.widget.comm.handle_close({"content": {"data": {}}})  # the comm closed by the front end

        folder = paths.models_dir()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "late-arrival.gguf").write_bytes(tiny_models["c"].read_bytes())
        for view in open_:
            wait_until(lambda view=view: "late-arrival" in view.local.options, timeout=20)  # type: ignore[misc]
        time.sleep(0.3)  # several more ticks: a closed panel would have been listed again by now
        assert "late-arrival" not in closed.local.options
        assert "late-arrival" not in from_the_front_end.local.options
    finally:
        for view in views:
            view.close()
    wait_until(lambda: not watcher_threads(), timeout=5)  # nothing left to watch: the thread ends
