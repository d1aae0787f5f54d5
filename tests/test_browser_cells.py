"""``%%llm`` output in a real JupyterLab, in headless Chromium (Playwright).

A random tiny model cannot be asked for a numbered list, so the notebook gives the answer a
known text the way a user's second run of a cell does: through the prompt cache. The first
``%%llm`` cell runs the model (filling the cache); the notebook then replaces that cache entry's
text, and the same ``%%llm`` cell again is answered from the cache — streamed, rendered and
marked by the magic's own output code, exactly as a fresh answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbllm.testing import make_tiny_model
from tests.browser_support import artifacts_dir, browser_page, run_all_cells, running_lab, wait_for_idle_kernel

CODE = "print('inserted from the answer')"
ANIMALS = f"Some animals:\n3. rabbit\n4. horse\n5. sheep\n6. goat\n```python\n{CODE}\n```"
CELL = "%%llm -n 8 --seed 1\nName some animals."


# The top of each word as laid out on the page (a Range around its text).
TOPS_OF_WORDS = """(element, words) => words.map((word) => {
  const walker = document.createTreeWalker(element, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const at = node.data.indexOf(word);
    if (at >= 0) {
      const range = document.createRange();
      range.setStart(node, at);
      range.setEnd(node, at + word.length);
      return range.getBoundingClientRect().top;
    }
  }
  return null;
})"""


def notebook_cells(model: Path, cache: Path) -> list[str]:
    settings = {
        "models": {"tiny": str(model)},
        "default_model": "tiny",
        "performance": {"context_size": 512},
        "cache": {"enabled": True, "directory": str(cache)},
    }
    replace_answer = (
        "from nbllm.engine.pipeline import cache_key\n"
        "engine = nbllm.get_engine()\n"
        "request = get_ipython().magics_manager.registry['NbllmMagics'].last_request\n"
        "key = cache_key(engine, request)\n"
        "entry = dict(engine.prompt_cache.get(key))\n"
        f"entry.update(pieces=[{ANIMALS!r}], completion_tokens=8, finish_reason='length')\n"
        "engine.prompt_cache.put(key, entry)"
    )
    return [
        f"import nbllm\nnbllm.configure({settings!r})\n%load_ext nbllm",
        CELL,
        replace_answer,
        CELL,
    ]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "root").mkdir()
    model = make_tiny_model(tmp_path / "root" / "tiny.gguf", seed=1)
    with running_lab(tmp_path, "cells.ipynb", notebook_cells(model, tmp_path / "prompt-cache")) as url:
        yield url


def rendered_answer(page: Any) -> Any:
    """The Markdown output of the notebook's last cell (the answer from the cache)."""
    output = page.locator(".jp-Cell").nth(3).locator(".jp-RenderedMarkdown")
    output.last.wait_for(timeout=180_000)
    return output.last


def test_a_numbered_list_renders_line_by_line_and_a_cut_off_answer_says_so(lab: str, tmp_path: Path) -> None:
    artifacts = artifacts_dir(tmp_path)
    with browser_page(artifacts, "cells-failure.png") as page:
        page.goto(lab, wait_until="domcontentloaded", timeout=120_000)
        run_all_cells(page)
        answer = rendered_answer(page)
        page.locator(".jp-Cell").nth(3).locator(".jp-OutputArea-output", has_text="from the prompt cache").wait_for(
            timeout=60_000
        )
        wait_for_idle_kernel(page)
        lines = [line.strip() for line in answer.inner_text().splitlines() if line.strip()]
        assert lines[:5] == ["Some animals:", "3. rabbit", "4. horse", "5. sheep", "6. goat"], lines
        # What the reader sees: each item on a line of its own, below the one before.
        tops = answer.evaluate(TOPS_OF_WORDS, ["rabbit", "horse", "sheep"])
        assert None not in tops, tops
        assert tops[0] < tops[1] < tops[2], f"the items share a line: tops {tops}"
        note = "[cut off at the 8-token limit: raise max_tokens (-n in %%llm and the CLI) for the rest]"
        assert lines[-1] == note, "a cut-off answer ends with the truncation note, visibly"
        assert answer.locator("em", has_text="cut off at the 8-token limit").count() == 1
        assert answer.locator("pre code").inner_text().strip() == CODE
        screenshot = artifacts / "cells-numbered-list.png"
        page.locator(".jp-Cell").nth(3).screenshot(path=str(screenshot))
        print(f"\nscreenshot: {screenshot}")
        insert_the_code_as_a_new_cell(page)


def insert_the_code_as_a_new_cell(page: Any) -> None:
    """The answer's code block has Copy and Insert buttons; Insert makes a new cell below it."""
    cells = page.locator(".jp-Notebook .jp-Cell")
    before = cells.count()
    row = cells.nth(3).locator(".nbllm-code-row")
    row.wait_for(timeout=60_000)
    assert row.locator(".nbllm-copy").inner_text() == "Copy"
    row.locator(".nbllm-insert").click()
    page.wait_for_function(f"document.querySelectorAll('.jp-Notebook .jp-Cell').length === {before + 1}")
    inserted = cells.nth(4)
    page.wait_for_function(
        "(code) => (document.querySelectorAll('.jp-Notebook .jp-Cell')[4]"
        ".querySelector('.cm-content') || {}).textContent === code",
        arg=CODE,
    )
    assert "jp-CodeCell" in (inserted.get_attribute("class") or "")
