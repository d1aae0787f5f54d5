"""The models panel in a real JupyterLab and Chromium (Playwright): Load with two models.

Issue 18: with two models downloaded, the panel's Load menu showed nothing chosen and Load said
"Nothing to load: download a model first". Here two tiny models lie in the models folder of a
fresh NBLLM_HOME (no config file); the shown panel must offer them with one chosen, load it, and
list a third file copied in while it is open.
"""

from __future__ import annotations

from pathlib import Path

from nbllm.testing import make_tiny_model
from tests.browser_support import artifacts_dir, browser_page, poll, run_all_cells, running_lab

CELLS = ["import nbllm\n\npanel = nbllm.ModelsPanel()\npanel"]


def test_load_with_two_models(tmp_path: Path) -> None:
    models = tmp_path / "nbllm-home" / "models"  # running_lab's NBLLM_HOME
    models.mkdir(parents=True)
    make_tiny_model(models / "first-model.gguf", seed=1)
    make_tiny_model(models / "second-model.gguf", seed=2)
    with (
        running_lab(tmp_path, "models.ipynb", CELLS) as url,
        browser_page(artifacts_dir(tmp_path), "models-panel-failure.png") as page,
    ):
        page.goto(url, wait_until="domcontentloaded", timeout=120_000)
        run_all_cells(page)
        menu = page.locator(".nbllm-models-load-menu select")
        menu.wait_for(timeout=180_000)
        options = menu.locator("option").all_inner_texts()
        assert options[:2] == ["first-model", "second-model"], options
        assert menu.evaluate("select => select.value") == "first-model", "one model chosen, not nothing"

        page.locator(".nbllm-models-load").click()
        status = page.locator(".nbllm-models-status")
        assert poll(lambda: "Loaded first-model" in status.inner_text(), 60), status.inner_text()
        assert "Nothing to load" not in status.inner_text()
        table = page.locator(".nbllm-models-table")
        row = table.locator("tr", has_text="first-model")
        assert poll(lambda: " yes " in f" {' '.join(row.locator('td').all_inner_texts())} ", 20)

        make_tiny_model(models / "third-model.gguf", seed=3)  # copied in while the panel is open
        assert poll(lambda: "third-model" in menu.locator("option").all_inner_texts(), 30), menu.locator(
            "option"
        ).all_inner_texts()
        menu.select_option("second-model")
        page.locator(".nbllm-models-load").click()
        assert poll(lambda: "Loaded second-model" in status.inner_text(), 60), status.inner_text()
        page.locator(".nbllm-models-load").screenshot(path=str(artifacts_dir(tmp_path) / "models-panel.png"))
