"""JupyterLab in headless Chromium, for the browser tests (Playwright).

``running_lab(tmp_path, notebook_name, cells)`` starts JupyterLab on 127.0.0.1 (a free port, a
token, a temporary root holding one notebook of the given code cells, none of the developer's
settings) with the notebook's kernel already started, and yields the notebook's URL;
``browser_page()`` opens Debian's Chromium (``playwright install`` cannot download browsers here;
``python3 scripts/bootstrap.py --extras dev`` installs it) and photographs the page on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import sync_playwright

from tests.servers import free_port, stop_server, wait_for_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def write_notebook(path: Path, cells: Sequence[str]) -> None:
    """A notebook of code cells, unexecuted."""
    notebook = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": f"cell-{i}",
                "metadata": {},
                "outputs": [],
                "source": text,
            }
            for i, text in enumerate(cells)
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook, indent=1), encoding="utf-8")


@contextlib.contextmanager
def running_lab(
    tmp_path: Path, notebook_name: str, cells: Sequence[str] | None = None, extra_args: Sequence[str] = ()
) -> Iterator[str]:
    """JupyterLab serving ``tmp_path/root``; yields the URL of ``notebook_name`` (written from
    ``cells`` when given, else it must already be in ``tmp_path/root``), its kernel started.
    ``extra_args``: more command-line options for ``jupyter lab``."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    if cells is not None:
        write_notebook(root / notebook_name, cells)
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
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", *extra_args,
    ]  # fmt: skip
    log = (tmp_path / "jupyterlab.log").open("wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_server(f"{base}/api/status?token={token}", server, tmp_path / "jupyterlab.log")
        start_kernel(base, token, notebook_name)
        yield f"{base}/lab/tree/{notebook_name}?token={token}"
    finally:
        stop_server(server)
        log.close()


def quiet_lab(settings_dir: Path) -> None:
    """No "get notified about Jupyter news?" toast over the page (and no fetching it offline)."""
    notification = settings_dir / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True, exist_ok=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}), encoding="utf-8")


def start_kernel(base: str, token: str, notebook_name: str) -> None:
    """Start the notebook's kernel through the REST API, so the page opens on a running kernel
    (and never asks which kernel to use)."""
    body = {"path": notebook_name, "name": notebook_name, "type": "notebook", "kernel": {"name": "python3"}}
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


@contextlib.contextmanager
def browser_page(artifacts: Path, failure_name: str) -> Iterator[Any]:
    """A Chromium page (1280x1100); on any failure, a full-page screenshot ``failure_name``."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Chromium. "
            "`python3 scripts/bootstrap.py --extras dev` installs it."
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.set_default_timeout(60_000)
        try:
            yield page
        except BaseException:
            failure = artifacts / failure_name
            page.screenshot(path=str(failure), full_page=True)
            print(f"\nscreenshot of the failure: {failure}")
            raise
        finally:
            browser.close()


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


def poll(condition: Any, timeout: float = 60, interval: float = 0.1) -> bool:
    """True as soon as ``condition()`` is; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False
