"""The chat panel in a real JupyterLab, driven by headless Chromium through Playwright.

The test starts JupyterLab on 127.0.0.1 (a free port, a token, a temporary folder holding a
notebook and a tiny generated model), runs the notebook, types into the panel, clicks Send,
watches the reply grow and the plotly chart draw, stops a long reply, and saves a screenshot
(to ``$NBLLM_ARTIFACTS`` or the test's temporary folder; its path is printed).

Chromium is Debian's ``/usr/bin/chromium`` (``playwright install`` cannot download browsers
here); ``python3 scripts/bootstrap.py --extras dev`` installs it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import sync_playwright

from nbllm.core.config import Settings
from nbllm.engine import Engine
from nbllm.testing import make_tiny_model
from tests.servers import free_port, stop_server, wait_for_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
QUESTION = "Hello! What can you do?"
REPLY_TOKENS = 400  # long enough to watch it stream: a second or more on the model below
KNOWN_LONG_SEED = 3  # found by long_reply_seed() on this build: tried first, so the search is one run


# --------------------------------------------------------------------- the setup


def browser_model(folder: Path) -> Path:
    """A tiny model, but big enough (75 MB) that a reply takes a visible second to stream."""
    return make_tiny_model(folder / "tiny-browser.gguf", seed=5, n_embd=512, n_layer=8, n_ff=1024, n_head=8)


def notebook_settings(model: Path, seed: int) -> dict[str, Any]:
    return {
        "models": {"tiny-browser": str(model)},
        "default_model": "tiny-browser",
        "performance": {"context_size": 2048},
        "cache": {"enabled": False},
        "generation": {"seed": seed, "default_max_tokens": REPLY_TOKENS},
    }


def long_reply_seed(model: Path) -> int:
    """The seed for which the panel's first request runs to REPLY_TOKENS tokens.

    A random-weights model ends most answers early with its end token. The notebook configures
    this seed, so the panel's request (same question, same default sampling settings) streams long.
    """
    engine = Engine(Settings().merged(notebook_settings(model, seed=0)))
    generation = engine.settings.generation
    params = {
        "temperature": generation.default_temperature,
        "top_p": generation.top_p,
        "top_k": generation.top_k,
        "repeat_penalty": generation.repeat_penalty,
        "max_tokens": REPLY_TOKENS,
    }
    messages = [{"role": "user", "content": QUESTION}]
    try:
        for seed in (KNOWN_LONG_SEED, *range(200)):
            if engine.chat(messages, seed=seed, **params).stats.finish_reason == "length":
                return seed
    finally:
        engine.close()
    pytest.fail("no seed gives the browser test's model a long answer")


def write_notebook(path: Path, settings: dict[str, Any]) -> None:
    cells = [
        f"import nbllm\n\nsettings = nbllm.configure({settings!r})",
        "panel = nbllm.ChatPanel()\npanel",
    ]
    notebook = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": f"cell-{i}",
                "metadata": {},
                "outputs": [],
                "source": s,
            }
            for i, s in enumerate(cells)
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook, indent=1), encoding="utf-8")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[str]:
    """JupyterLab serving ``tmp_path/root`` (with chat.ipynb); yields the notebook's URL."""
    root = tmp_path / "root"
    root.mkdir()
    model = browser_model(root)
    write_notebook(root / "chat.ipynb", notebook_settings(model, long_reply_seed(model)))
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "NBLLM_HOME": str(tmp_path / "nbllm-home"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),  # none of the developer's settings
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
    }
    env.pop("NBLLM_CONFIG", None)
    quiet_lab(tmp_path / "lab-settings")
    command = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        "--ServerApp.allow_root=True",  # CI runs as root
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", f"--LabApp.user_settings_dir={tmp_path / 'lab-settings'}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
    log = (tmp_path / "jupyterlab.log").open("wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_server(f"{base}/api/status?token={token}", server, tmp_path / "jupyterlab.log")
        start_kernel(base, token)
        yield f"{base}/lab/tree/chat.ipynb?token={token}"
    finally:
        stop_server(server)
        log.close()


def quiet_lab(settings_dir: Path) -> None:
    """No "get notified about Jupyter news?" toast over the panel (and no fetching it offline)."""
    notification = settings_dir / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True, exist_ok=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}), encoding="utf-8")


def start_kernel(base: str, token: str) -> None:
    """Start the notebook's kernel through the REST API, so the page opens on a running kernel
    (and never asks which kernel to use)."""
    body = {"path": "chat.ipynb", "name": "chat.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
    request = urllib.request.Request(
        f"{base}/api/sessions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 201, response.read()


def artifacts_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("NBLLM_ARTIFACTS") or tmp_path / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------- the browser


def run_all_cells(page: Any) -> None:
    page.locator(".jp-Notebook").first.wait_for(timeout=120_000)
    choose_kernel = page.locator(".jp-Dialog", has_text="Select Kernel")
    try:  # the kernel started beforehand should make this dialog unnecessary; just in case
        choose_kernel.wait_for(timeout=3_000)
        choose_kernel.get_by_role("button", name="Select").click()
    except PlaywrightTimeoutError:
        pass
    wait_for_idle_kernel(page)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def wait_for_idle_kernel(page: Any, timeout: float = 120_000) -> None:
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(
        state="attached", timeout=timeout
    )


def letters(text: str) -> int:
    """How much answer is on screen, counted so that Markdown closing does not shrink it.

    A half-streamed ``**bold`` shows its asterisks until the closing pair arrives and then
    renders without them, so raw lengths may drop by a few characters; markup, the cursor and
    list numbers are never letters, so the letter count only grows."""
    return sum(character.isalpha() for character in text)


def text_lengths_while_streaming(page: Any, snapshot: Path, timeout: float = 300) -> list[int]:
    """Poll the last answer's text until the status says the reply ended; the letters seen.

    The panel is photographed to ``snapshot`` once, mid-stream."""
    answer = page.locator(".nbllm-assistant .nbllm-text").last
    status = page.locator(".nbllm-status")
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer.count():
            seen.append(letters(answer.inner_text()))
            if len(set(seen) - {0}) == 2 and not snapshot.exists():
                page.locator(".nbllm-chat").screenshot(path=str(snapshot))
        if "Generated" in status.inner_text():
            seen.append(letters(answer.inner_text()))
            return seen
        time.sleep(0.05)
    pytest.fail(f"the reply did not finish within {timeout}s; status: {status.inner_text()!r}")


def send_and_watch_it_stream(page: Any, artifacts: Path) -> None:
    """Send with the button: the answer grows in several steps, the chart draws a curve and a bar."""
    page.locator(".nbllm-input textarea").fill(QUESTION)
    page.locator(".nbllm-send").click()
    page.locator(".nbllm-user", has_text=QUESTION).wait_for()
    lengths = text_lengths_while_streaming(page, artifacts / "chat-panel-streaming.png")
    growing = sorted({n for n in lengths if n > 0})
    assert len(growing) >= 3, f"the answer did not grow while streaming: {lengths}"
    assert lengths == sorted(lengths), "the answer only ever grows"
    assert "t/s" in page.locator(".nbllm-status").inner_text()
    curve = page.locator(".nbllm-chart .scatterlayer .trace path.js-line").last
    curve.wait_for(state="attached", timeout=30_000)
    assert len(curve.get_attribute("d") or "") > 20, "the throughput curve has points"
    page.locator(".nbllm-chart .barlayer .point").first.wait_for(state="attached", timeout=30_000)


def clear_then_stop_a_long_reply(page: Any) -> None:
    """Clear, send the same question with Enter, and stop the answer while it streams."""
    page.locator(".nbllm-clear").click()
    page.locator(".nbllm-assistant").first.wait_for(state="detached", timeout=30_000)
    page.locator(".nbllm-input textarea").fill(QUESTION)
    page.locator(".nbllm-input textarea").press("Enter")
    page.locator(".nbllm-status", has_text="Generating").wait_for(timeout=120_000)
    page.locator(".nbllm-stop").click()
    page.locator(".nbllm-status", has_text="Stopped").wait_for(timeout=60_000)
    assert page.locator(".nbllm-assistant .nbllm-text").last.inner_text(), "the partial answer is kept"


def test_chat_panel_streams_draws_and_stops_in_jupyterlab(lab: str, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Chromium. "
            "`python3 scripts/bootstrap.py --extras dev` installs it."
        )
    artifacts = artifacts_dir(tmp_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.set_default_timeout(60_000)
        try:
            page.goto(lab, wait_until="domcontentloaded", timeout=120_000)
            run_all_cells(page)
            panel = page.locator(".nbllm-chat")
            panel.wait_for(timeout=180_000)
            page.locator(".nbllm-status", has_text="Ready").wait_for()

            send_and_watch_it_stream(page, artifacts)
            clear_then_stop_a_long_reply(page)

            page.locator(".nbllm-input textarea").fill("A draft with **Markdown** and <b>tags</b>")
            wait_for_idle_kernel(page)
            screenshot = artifacts / "chat-panel.png"
            panel.scroll_into_view_if_needed()
            panel.screenshot(path=str(screenshot))
            print(f"\nscreenshot: {screenshot}")
            assert screenshot.stat().st_size > 10_000
        except BaseException:
            failure = artifacts / "chat-panel-failure.png"
            page.screenshot(path=str(failure), full_page=True)
            print(f"\nscreenshot of the failure: {failure}")
            raise
        finally:
            browser.close()
