"""The chat panel's browser-side behaviour in a real JupyterLab and Chromium (Playwright).

One JupyterLab serves several notebooks (one per test, each with its own kernel and panel), so
the lab starts once for the module: following the newest message, Enter typed fast, Markdown
lists, the truncation mark, the model menu seeing a new file, one speed, a conversation that
survives a reload, and a code block's Insert button.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbllm.testing import make_tiny_model
from tests.browser_support import (
    artifacts_dir,
    browser_page,
    poll,
    running_lab,
    start_kernel,
    wait_for_idle_kernel,
    write_notebook,
)
from tests.test_bootstrap_widget_state import load_bootstrap

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 12  # short replies: many of them, quickly


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """JupyterLab on a folder with a tiny model; yields (the URL of a notebook named X, the root)."""
    tmp_path = tmp_path_factory.mktemp("browser-chat")
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    make_tiny_model(root / "models" / "tiny-chat.gguf", seed=5)
    write_notebook(root / "first.ipynb", notebook_cells(root))
    with running_lab(tmp_path, "first.ipynb") as url:
        yield url.replace("first.ipynb", "{name}"), root


def notebook_cells(root: Path, extra: str = "") -> list[str]:
    settings = {
        "models": {"tiny-chat": str(root / "models" / "tiny-chat.gguf")},
        "default_model": "tiny-chat",
        "performance": {"context_size": 1024},
        "cache": {"enabled": False},
        "generation": {"seed": 7, "default_max_tokens": MAX_TOKENS},
    }
    return [f"import nbllm\n\nsettings = nbllm.configure({settings!r})", f"panel = nbllm.ChatPanel()\n{extra}panel"]


def open_notebook(page: Any, lab: tuple[str, Path], name: str, extra: str = "", ready: str = "Ready") -> None:
    """Write notebook ``name`` (unless it exists), open it, run it, wait for the panel."""
    url, root = lab
    if not (root / name).exists():
        write_notebook(root / name, notebook_cells(root, extra))
        base, token = url.split("/lab/tree/")[0], url.split("token=")[1]
        start_kernel(base, token, name)  # so that the page never asks which kernel to use
    # reset: a workspace of its own, not the tabs earlier tests left open (their panels match too)
    page.goto(url.format(name=name) + "&reset", wait_until="domcontentloaded", timeout=120_000)
    run_all(page)
    page.locator(".nbllm-chat").wait_for(timeout=180_000)
    page.locator(".nbllm-status", has_text=ready).wait_for()


def run_all(page: Any) -> None:
    page.locator(".jp-Notebook").first.wait_for(timeout=120_000)
    choose_kernel = page.locator(".jp-Dialog", has_text="Select Kernel")
    # JupyterLab may ask for a kernel although one runs for the notebook: answer whenever it does.
    poll(lambda: choose_kernel.count() > 0, 5)
    dismiss_kernel_dialog(page)
    wait_for_idle_kernel(page)
    dismiss_kernel_dialog(page)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    poll(lambda: choose_kernel.count() > 0, 3)
    dismiss_kernel_dialog(page)


def dismiss_kernel_dialog(page: Any) -> None:
    choose_kernel = page.locator(".jp-Dialog", has_text="Select Kernel")
    if choose_kernel.count():
        choose_kernel.get_by_role("button", name="Select").click()
        choose_kernel.wait_for(state="detached")


def reply_done(page: Any, users: int) -> bool:
    """``users`` messages sent and the reply to the last one ended (each ended reply has a footer;
    the status alone may still show the previous reply's end for a moment)."""
    if page.locator(".nbllm-user").count() != users or page.locator(".nbllm-footer").count() != users:
        return False
    status = page.locator(".nbllm-status").inner_text()
    return "Generated" in status and page.locator(".nbllm-send[disabled]").count() == 0


def scroll_metrics(page: Any) -> dict[str, float]:
    return page.evaluate(
        "() => { const box = document.querySelector('.nbllm-history').parentElement;"
        " return {top: box.scrollTop, client: box.clientHeight, height: box.scrollHeight}; }"
    )


def at_bottom(metrics: dict[str, float]) -> bool:
    return abs(metrics["top"] + metrics["client"] - metrics["height"]) <= 4


# --------------------------------------------------------------------- 1. the newest message stays in view


def test_the_message_list_follows_the_newest_message(lab: tuple[str, Path], tmp_path: Path) -> None:
    with browser_page(artifacts_dir(tmp_path), "chat-scroll-failure.png") as page:
        open_notebook(page, lab, "scroll.ipynb")
        box = page.locator(".nbllm-input textarea")
        for i in range(7):
            box.fill(f"Question number {i}: tell me about item {i}")
            page.locator(".nbllm-send").click()
            assert poll(lambda i=i: reply_done(page, i + 1), 60), f"reply {i} did not end"
            page.wait_for_timeout(300)  # the last redraw reaches the page
        metrics = scroll_metrics(page)
        assert metrics["height"] > metrics["client"] + 100, f"the conversation overflows its box: {metrics}"
        assert at_bottom(metrics), f"the newest message is below the fold: {metrics}"
        assert page.locator(".nbllm-user").last.is_visible()

        # Scrolled up to read: a new reply does not pull the reader back down.
        page.evaluate("() => { document.querySelector('.nbllm-history').parentElement.scrollTop = 0; }")
        page.wait_for_timeout(200)
        box.fill("One more question")
        page.locator(".nbllm-send").click()
        assert poll(lambda: reply_done(page, 8), 60)
        page.wait_for_timeout(300)
        assert scroll_metrics(page)["top"] < 50, "the reader who scrolled up stays where they were"


# --------------------------------------------------------------------- 2. Enter typed fast always sends


def test_twenty_messages_typed_fast_with_enter_all_send(lab: tuple[str, Path], tmp_path: Path) -> None:
    with browser_page(artifacts_dir(tmp_path), "chat-enter-failure.png") as page:
        open_notebook(page, lab, "enter.ipynb")
        box = page.locator(".nbllm-input textarea")
        for i in range(20):
            box.click()
            page.keyboard.type(f"fast message {i}", delay=5)
            page.keyboard.press("Enter")
            sent = poll(lambda i=i: reply_done(page, i + 1), 30)
            assert sent, f"message {i} was not sent; the box holds {box.input_value()!r}"
        users = page.locator(".nbllm-user .nbllm-text").all_inner_texts()
        assert [u.strip() for u in users] == [f"fast message {i}" for i in range(20)]
        assert box.input_value() == "", "the box is empty after the last Enter"

        box.click()
        page.keyboard.type("two", delay=5)
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("lines", delay=5)
        assert box.input_value() == "two\nlines", "Shift+Enter is a newline"
        page.keyboard.press("Enter")
        assert poll(lambda: reply_done(page, 21), 30)
        assert page.locator(".nbllm-user .nbllm-text").last.inner_text().split() == ["two", "lines"]


# --------------------------------------------------------------------- 3. Markdown lists keep their lines

LISTS = (
    "1. cat\n2. dog\n3. rabbit\n4. horse",
    "Here are four:\n1. cat\n2. dog\n3. rabbit\n4. horse",
    "We skip one:\n2. dog\n3. rabbit\n4. horse",
)


def transcript(answers: tuple[str, ...]) -> str:
    """A conversation with these answers, as load_markdown reads it (a model's answer cannot be chosen)."""
    from nbllm.core.conversation import to_markdown

    messages = []
    for i, answer in enumerate(answers):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": answer}]
    return to_markdown(messages)


def test_a_numbered_list_in_an_answer_shows_one_item_per_line(lab: tuple[str, Path], tmp_path: Path) -> None:
    loading = f"panel.load_markdown({transcript(LISTS)!r})\n"
    with browser_page(artifacts_dir(tmp_path), "chat-markdown-failure.png") as page:
        open_notebook(page, lab, "lists.ipynb", extra=loading, ready="Loaded")
        answers = page.locator(".nbllm-assistant .nbllm-text")
        answers.nth(len(LISTS) - 1).wait_for()
        for i in range(len(LISTS)):
            answer = answers.nth(i)
            lines = [line.strip() for line in answer.inner_text().splitlines() if line.strip()]
            words = [line.split()[-1] for line in lines]
            assert words[-3:] == ["dog", "rabbit", "horse"], lines
            assert not any("rabbit" in line and "horse" in line for line in lines), f"merged lines: {lines}"
            tops = answer.evaluate(
                "(el) => [...el.querySelectorAll('li')].map((li) => li.getBoundingClientRect().top)"
                " .concat([...el.querySelectorAll('br')].map((br) => br.getBoundingClientRect().top))"
            )
            assert len({round(t) for t in tops}) == len(tops), f"items share a line: {tops}"
        markers = answers.first.evaluate(
            "(el) => [...el.querySelectorAll('li')].map((li) => getComputedStyle(li).listStyleType)"
        )
        assert markers == ["decimal"] * 4, f"the numbers are shown: {markers}"


# --------------------------------------------------------------------- 4. a cut-off answer says so


def test_a_cut_off_answer_is_marked_in_the_panel(lab: tuple[str, Path], tmp_path: Path) -> None:
    with browser_page(artifacts_dir(tmp_path), "chat-truncated-failure.png") as page:
        open_notebook(page, lab, "truncated.ipynb", extra="panel.max_tokens.value = 3\n")
        page.locator(".nbllm-input textarea").fill("Tell me a long story")
        page.locator(".nbllm-send").click()
        assert poll(lambda: reply_done(page, 1), 60)
        mark = page.locator(".nbllm-assistant .nbllm-truncated").last
        mark.wait_for()
        assert mark.is_visible()
        assert "cut off at the 3-token limit" in mark.inner_text()


# --------------------------------------------------------------------- 5. the model menu sees new models


def test_the_model_menu_offers_a_model_file_added_after_the_panel_was_made(
    lab: tuple[str, Path], tmp_path: Path
) -> None:
    _, root = lab
    with browser_page(artifacts_dir(tmp_path), "chat-models-failure.png") as page:
        open_notebook(page, lab, "models.ipynb")
        menu = page.locator(".nbllm-model select")
        assert "dropped-in" not in menu.locator("option").all_inner_texts()
        models = root.parent / "nbllm-home" / "models"
        models.mkdir(parents=True, exist_ok=True)
        make_tiny_model(models / "dropped-in.gguf", seed=21)
        menu.hover()  # on the way to opening it
        assert poll(lambda: "dropped-in" in menu.locator("option").all_inner_texts(), 20), menu.locator(
            "option"
        ).all_inner_texts()
        menu.select_option("dropped-in")
        page.locator(".nbllm-status", has_text="dropped-in answers").wait_for()


# --------------------------------------------------------------------- 6. one speed


def test_the_status_line_and_the_chart_bar_show_the_same_speed(lab: tuple[str, Path], tmp_path: Path) -> None:
    with browser_page(artifacts_dir(tmp_path), "chat-speed-failure.png") as page:
        open_notebook(page, lab, "speed.ipynb")
        page.locator(".nbllm-input textarea").fill("How fast are you?")
        page.locator(".nbllm-send").click()
        assert poll(lambda: reply_done(page, 1), 60)
        status = page.locator(".nbllm-status").inner_text()
        speed = status.split("(")[1].split(" t/s")[0]
        bar = page.locator(".nbllm-chart .barlayer .bartext").last
        assert poll(lambda: bar.count() > 0 and bar.text_content() == speed, 20), (status, bar.text_content())
        footer = page.locator(".nbllm-assistant .nbllm-footer").last.inner_text()
        assert f"{speed} t/s" in footer


# --------------------------------------------------------------------- 7. a conversation survives a reload


def test_a_reopened_notebook_shows_its_conversation(lab: tuple[str, Path], tmp_path: Path) -> None:
    with browser_page(artifacts_dir(tmp_path), "chat-reopen-failure.png") as page:
        open_notebook(page, lab, "reopen.ipynb")
        box = page.locator(".nbllm-input textarea")
        for i, question in enumerate(["Remember the word banana", "What did I ask?"]):
            box.fill(question)
            page.locator(".nbllm-send").click()
            assert poll(lambda i=i: reply_done(page, i + 1), 60)
        before = page.locator(".nbllm-message .nbllm-text").all_inner_texts()
        page.keyboard.press("Control+s")
        page.reload(wait_until="domcontentloaded")
        run_all(page)
        page.locator(".nbllm-status", has_text="Conversation restored (4 messages)").wait_for(timeout=180_000)
        after = page.locator(".nbllm-message .nbllm-text").all_inner_texts()
        assert [a.replace("▍", "").strip() for a in after] == [b.replace("▍", "").strip() for b in before]
        assert page.locator(".nbllm-user").first.inner_text().count("Remember the word banana") == 1


# --------------------------------------------------------------------- 8. code blocks: Copy and Insert


def test_insert_puts_a_code_block_into_a_new_cell_and_copy_copies_it(lab: tuple[str, Path], tmp_path: Path) -> None:
    code = "total = 40 + 2\nprint(total)"
    answer = "Try this:\n```python\n" + code + "\n```"
    loading = f"panel.load_markdown({transcript((answer,))!r})\n"
    with browser_page(artifacts_dir(tmp_path), "chat-insert-failure.png") as page:
        page.context.grant_permissions(["clipboard-read", "clipboard-write"])
        open_notebook(page, lab, "insert.ipynb", extra=loading, ready="Loaded")
        cells = page.locator(".jp-Notebook .jp-Cell")
        assert cells.count() == 2
        page.locator(".nbllm-code .nbllm-copy").click()
        assert poll(lambda: page.evaluate("() => navigator.clipboard.readText()") == code, 10)
        page.locator(".nbllm-code .nbllm-insert").click()
        assert poll(lambda: cells.count() == 3, 20), "a new cell"
        inserted = cells.nth(2).locator(".jp-InputArea-editor")
        assert poll(lambda: inserted.inner_text().strip() == code, 20), inserted.inner_text()


# --------------------------------------------------------------------- 9. the conversation is in the notebook itself


def saved_widget_state(notebook: Path) -> str:
    """The widget state saved in ``notebook``'s metadata, as JSON text ("" when none)."""
    try:
        metadata = json.loads(notebook.read_text(encoding="utf-8"))["metadata"]
    except (OSError, ValueError):  # being written just now
        return ""
    return json.dumps(metadata.get("widgets", {}), ensure_ascii=False)


def test_the_conversation_is_saved_in_the_notebook_and_shown_when_reopened_without_running_it(
    tmp_path: Path,
) -> None:
    # The environment's JupyterLab settings as scripts/bootstrap.py writes them (here into a
    # settings folder of this test's own, beside a setting that was there before).
    prefix = tmp_path / "prefix"
    settings = prefix / "share" / "jupyter" / "lab" / "settings"
    (prefix / "share" / "jupyter" / "lab" / "static").mkdir(parents=True)
    settings.mkdir()
    theirs = {"@jupyterlab/notebook-extension:tracker": {"recordTiming": True}}
    (settings / "overrides.json").write_text(json.dumps(theirs), encoding="utf-8")
    load_bootstrap().save_widget_state_by_default(prefix)
    assert json.loads((settings / "overrides.json").read_text(encoding="utf-8")) == {
        **theirs,
        "@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": True},
    }
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    make_tiny_model(root / "models" / "tiny-chat.gguf", seed=5)
    notebook = root / "saved.ipynb"
    write_notebook(notebook, notebook_cells(root))
    question = "Remember the word pomegranate"
    lab_args = [f"--LabApp.app_settings_dir={settings}"]
    with browser_page(artifacts_dir(tmp_path), "chat-saved-state-failure.png") as page:
        with running_lab(tmp_path, "saved.ipynb", extra_args=lab_args) as url:
            page.goto(url + "&reset", wait_until="domcontentloaded", timeout=120_000)
            run_all(page)
            page.locator(".nbllm-status", has_text="Ready").wait_for(timeout=180_000)
            page.locator(".nbllm-input textarea").fill(question)
            page.locator(".nbllm-send").click()
            assert poll(lambda: reply_done(page, 1), 60)
            page.wait_for_timeout(500)  # the last redraw reaches the page's widget models
            answer = page.locator(".nbllm-assistant .nbllm-text").inner_text().replace("▍", "").strip()
            page.keyboard.press("Control+s")
            assert poll(lambda: question in saved_widget_state(notebook), 30), "the notebook holds the conversation"
        # A new JupyterLab and a new kernel that never ran the cell: only the notebook knows the chat.
        with running_lab(tmp_path, "saved.ipynb", extra_args=lab_args) as url:
            page.goto(url + "&reset", wait_until="domcontentloaded", timeout=120_000)
            page.locator(".jp-Notebook").first.wait_for(timeout=120_000)
            dismiss_kernel_dialog(page)
            page.locator(".nbllm-user", has_text=question).wait_for(timeout=60_000)
            shown = page.locator(".nbllm-assistant .nbllm-text").inner_text().replace("▍", "").strip()
            assert shown == answer
            assert "Conversation restored" not in page.locator(".nbllm-status").inner_text(), "no cell ran"
