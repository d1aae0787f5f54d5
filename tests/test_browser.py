"""The chat panel in a real JupyterLab, driven by headless Chromium through Playwright.

The test starts JupyterLab (tests/browser_support.py) on a notebook and a tiny generated
model, runs the notebook, types into the panel, clicks Send,
watches the reply grow and the plotly chart draw, stops a long reply, and saves a screenshot
(to ``$NBLLM_ARTIFACTS`` or the test's temporary folder; its path is printed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbllm.core.config import Settings
from nbllm.engine import Engine
from nbllm.testing import make_tiny_model
from tests.browser_support import artifacts_dir, browser_page, run_all_cells, running_lab, wait_for_idle_kernel

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


def notebook_cells(settings: dict[str, Any]) -> list[str]:
    return [f"import nbllm\n\nsettings = nbllm.configure({settings!r})", "panel = nbllm.ChatPanel()\npanel"]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[str]:
    """JupyterLab serving chat.ipynb (a tiny model, a seed for a long reply); yields its URL."""
    (tmp_path / "root").mkdir()
    model = browser_model(tmp_path / "root")
    with running_lab(tmp_path, "chat.ipynb", notebook_cells(notebook_settings(model, long_reply_seed(model)))) as url:
        yield url


# --------------------------------------------------------------------- the browser


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
    artifacts = artifacts_dir(tmp_path)
    with browser_page(artifacts, "chat-panel-failure.png") as page:
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
