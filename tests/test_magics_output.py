"""How a ``%%llm`` answer reads on screen: lines that stay lines, code shown as code, and a
cut-off answer that says so — the transforms on their own, then through a real IPython shell
on real llama.cpp with a tiny model.

The Markdown checks render with markdown-it in CommonMark mode: a renderer that follows the
spec merges single newlines exactly as JupyterLab's does (the browser test,
``test_browser_cells.py``, checks JupyterLab itself).
"""

from __future__ import annotations

import re

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from markdown_it import MarkdownIt

from nbllm.core.metrics import RequestStats
from nbllm.notebook.answer_markdown import as_code_block, code_blocks, hard_line_breaks, open_fence, with_note
from nbllm.notebook.code_buttons import CodeButtons
from nbllm.notebook.live_output import answer_code, render_answer
from tests.test_magics import answer_text, final_answer, provenance, run

NOTE = RequestStats(model="m", completion_tokens=12, finish_reason="length").truncation_note()
assert NOTE is not None


def soft_breaks(markdown: str) -> int:
    """Newlines inside a paragraph that the renderer shows as a space (line merged into the one before)."""
    html = MarkdownIt("commonmark").render(markdown)
    paragraphs = re.findall(r"<p>(.*?)</p>", html, re.DOTALL)
    return sum(len(re.findall(r"(?<!<br />)\n", paragraph)) for paragraph in paragraphs)


# ----------------------------------------------------------------- single newlines survive


@pytest.mark.parametrize(
    "answer",
    [
        "Some animals:\n3. rabbit\n4. horse\n5. sheep",  # a list CommonMark will not start mid-paragraph
        "Roses are red,\nViolets are blue,\nSugar is sweet.",  # a poem
        "Step one: open it\nStep two: close it",
    ],
)
def test_markdown_answers_keep_their_single_newlines(answer: str) -> None:
    assert soft_breaks(answer) > 0, "CommonMark merges these lines as written"
    bundle, _ = render_answer(answer, "markdown")
    assert soft_breaks(bundle["text/markdown"]) == 0
    html = MarkdownIt("commonmark").render(bundle["text/markdown"])
    assert html.count("<br />") == answer.count("\n")
    assert bundle["text/plain"] == answer, "text/plain keeps the model's text"


def test_code_blocks_blank_lines_and_tables_are_left_as_written() -> None:
    answer = (
        "Here:\n```python\ndef f():\n    return 1\n```\nThen\nthis.\n\nNew paragraph.\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n~~~\nx = 1\ny = 2\n~~~"
    )
    converted = hard_line_breaks(answer)
    assert "def f():\n    return 1\n```\n" in converted, "inside the fence nothing changes"
    assert "~~~\nx = 1\ny = 2\n~~~" in converted
    assert "Then  \nthis.\n\nNew paragraph." in converted
    assert "| a | b |\n|---|---|\n| 1 | 2 |" in converted
    assert "<table>" in MarkdownIt("commonmark").enable("table").render(converted)


def test_an_indented_fence_in_a_list_is_still_a_code_block() -> None:
    answer = "1. Run:\n   ```\n   a\n   b\n   ```\n2. Done"
    assert "   a\n   b\n" in hard_line_breaks(answer)


# ----------------------------------------------------------------- --format code


def test_code_without_a_fence_is_shown_as_a_code_block() -> None:
    code = "def reverse(s):\n    return s[::-1]\n\nprint(reverse('abc'))"
    bundle, _ = render_answer(code, "code")
    html = MarkdownIt("commonmark").render(bundle["text/markdown"])
    assert html.startswith("<pre><code>def reverse(s):\n    return s[::-1]\n\nprint(")
    assert bundle["text/plain"] == code


def test_a_fence_inside_the_code_cannot_close_its_block_early() -> None:
    block = as_code_block('s = """```"""\nprint(s)')
    assert block.startswith("````\n")
    assert block.endswith("\n````")
    assert as_code_block("Use:\n```\nx\n```") == "Use:\n```\nx\n```", "already fenced: as written"


def test_a_note_after_an_open_code_block_closes_it_first() -> None:
    cut = "```python\nfor i in range(3):\n    print("
    assert open_fence(cut) == "```"
    marked = with_note(cut, NOTE)
    assert open_fence(marked) is None
    html = MarkdownIt("commonmark").render(marked)
    assert f"<p><em>{NOTE}</em></p>" in html.replace("&quot;", '"'), "the note is prose, not code"


# ----------------------------------------------------------------- cut-off answers, in a shell

CUT = "-n 6 -t 0 --repeat-penalty 1 --raw"  # the tiny model writes on: 6 tokens always hit the limit
PROMPT = "once upon a time"


@pytest.mark.parametrize("fmt", ["markdown", "text", "html", "code"])
def test_a_cut_off_answer_ends_with_the_truncation_note_in_every_format(ip: InteractiveShell, fmt: str) -> None:
    with capture_output() as captured:
        run(ip, f"%%llm {CUT} -f {fmt} --out kept\n{PROMPT}")
    record = provenance(captured)
    assert record["stats"]["finish_reason"] == "length"
    assert record["truncated"] is True
    note = RequestStats(**{k: record["stats"][k] for k in ("model", "completion_tokens", "finish_reason")})
    expected = note.truncation_note()
    assert expected is not None
    data = final_answer(captured).data
    raw = ip.user_ns["kept"]
    assert "cut off" not in raw, "--out keeps the model's answer, unmarked"
    assert data["text/plain"] == f"{raw.rstrip()}\n\n{expected}"
    rich = {"markdown": "text/markdown", "code": "text/markdown", "html": "text/html"}.get(fmt)
    if rich == "text/markdown":
        assert data[rich].endswith(f"*{expected}*")
    elif rich == "text/html":
        assert data[rich].endswith(f"<p><em>{expected}</em></p>".replace('"', "&quot;"))


def test_an_answer_that_finished_carries_no_note(ip: InteractiveShell) -> None:
    with capture_output() as captured:
        run(ip, "%%llm -n 200 --seed 1 --stop e\nQuestion: What is a GPU?\nAnswer:")
    assert provenance(captured)["truncated"] is False
    assert "cut off" not in answer_text(captured)


def test_a_cut_off_code_answer_goes_into_the_new_cell_marked_as_cut_off(ip: InteractiveShell) -> None:
    with capture_output() as captured:
        run(ip, f"%%llm {CUT} -f code --out kept\n{PROMPT}")
    stats = provenance(captured)["stats"]
    note = RequestStats(model=stats["model"], completion_tokens=stats["completion_tokens"], finish_reason="length")
    assert ip.rl_next_input is not None
    assert ip.rl_next_input.endswith(f"\n# {note.truncation_note()}")
    assert ip.rl_next_input.startswith(ip.user_ns["kept"].strip("\n")[:10])


def test_a_cut_off_json_answer_is_marked_even_without_the_stats_line(ip: InteractiveShell) -> None:
    """Review of issue 18: a JSON view has no room for the note, which went only into the stats
    line, so with ``show_stats = False`` a cut-off answer that still parsed ("12" of the choice
    "12345678") was shown as a whole one."""
    run(ip, "%config NbllmMagics.show_stats = False")
    try:
        with capture_output() as captured:
            result = ip.run_cell(f"%%llm -n 2 --seed 1 -f json --choices 12345678,87654321\n{PROMPT}")
    finally:
        run(ip, "%config NbllmMagics.show_stats = True")
    assert result.error_in_exec is not None, "the cut-off choice is the cell's error"
    record = provenance(captured)
    assert record["truncated"] is True
    assert "application/json" in final_answer(captured).data, "the cut-off answer parsed: shown as JSON"
    shown = [o.data.get("text/plain", "") for o in captured.outputs]
    expected = RequestStats(model=record["model"], completion_tokens=2, finish_reason="length").truncation_note()
    assert expected in shown, shown
    assert not any(line.startswith("Generated ") for line in shown), "still no stats line"


def test_a_terminal_shell_prints_the_note_after_the_answer(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    run(ip, f"%%llm {CUT} --out kept\n{PROMPT}")
    printed = capsys.readouterr().out
    assert printed.startswith(ip.user_ns["kept"])
    assert "[cut off at the 6-token limit" in printed.splitlines()[-2]


# ----------------------------------------------------------------- Copy / Insert as new cell


def test_code_blocks_are_found_in_order_without_fences_or_list_indentation() -> None:
    answer = "Try:\n```python\nx = 1\n```\n1. then\n   ```\n   if x:\n       y = 2\n   ```\nand ```inline``` text"
    assert code_blocks(answer) == ["x = 1", "if x:\n    y = 2"]
    assert code_blocks("```\nunclosed = (") == ["unclosed = ("]


def test_the_buttons_insert_a_cut_off_block_with_the_note_and_whole_code_as_it_is() -> None:
    assert answer_code("Use:\n```\na = 1\n```\nDone.", "markdown", NOTE) == ["a = 1"], "the cut came after it"
    assert answer_code("Use:\n```\na = (1,", "markdown", NOTE) == [f"a = (1,\n# {NOTE}"]
    assert answer_code("def f():\n    return", "code", NOTE) == [f"def f():\n    return\n# {NOTE}"]
    assert answer_code("No code here.", "markdown", None) == []


def test_an_answer_with_code_gets_a_copy_and_insert_widget_below_it(ip: InteractiveShell) -> None:
    with capture_output() as captured:
        run(ip, f"%%llm {CUT} -f code --out kept\n{PROMPT}")
    widgets = [o for o in captured.outputs if "application/vnd.jupyter.widget-view+json" in o.data]
    assert len(widgets) == 1
    model_id = widgets[0].data["application/vnd.jupyter.widget-view+json"]["model_id"]
    from ipywidgets import Widget

    buttons = Widget.widgets[model_id]
    assert isinstance(buttons, CodeButtons)
    assert buttons.blocks == [ip.rl_next_input], "the same code as the cell --format code inserts"


def test_an_answer_without_code_gets_no_buttons(ip: InteractiveShell) -> None:
    with capture_output() as captured:
        run(ip, f"%%llm {CUT}\n{PROMPT}")
    assert not [o for o in captured.outputs if "application/vnd.jupyter.widget-view+json" in o.data]
