"""The chat panel, driven through its widgets' callbacks on real llama.cpp (tiny generated models).

A browser test (test_browser.py) covers the same panel rendered in JupyterLab; here the
callbacks are called directly: text set on the input widget, buttons ``click()``-ed, the
worker thread awaited with ``panel.wait()``.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import nbllm
from nbllm.core.config import Settings
from nbllm.core.errors import ModelNotFoundError, NbllmError
from nbllm.engine import Engine
from nbllm.notebook.plots import STOPPED_COLOR
from nbllm.notebook.widgets import ChatPanel
from nbllm.notebook.widgets.chat import Message, _bubble
from nbllm.notebook.widgets.markdown import to_html
from nbllm.testing import make_tiny_model

LONG_REPLY = 200  # tokens; with a short question this fits the fixtures' 512-token context


@pytest.fixture
def panel(engine: Engine) -> Iterator[ChatPanel]:
    chat = ChatPanel(engine)
    yield chat
    chat.stop()
    assert chat.wait(30), "a reply was still running at the end of the test"


def type_and_send(panel: ChatPanel, text: str) -> None:
    panel.input.value = text
    panel.send_button.click()


def finish(panel: ChatPanel) -> None:
    assert panel.wait(60), "the reply did not end within a minute"


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.0005)


_long_reply_seeds: dict[tuple[object, ...], int] = {}


def use_long_reply(engine: Engine, panel: ChatPanel, question: str = "tell me everything") -> None:
    """Make the next answer to ``question`` run to LONG_REPLY tokens.

    A random-weights model ends most answers early with its end token; the seed that sends this
    exact request (same model, question and sampling settings) to the length limit is looked up
    (once per session), then configured, so that the panel's own request, which sends no seed,
    gets it.
    """
    panel.max_tokens.value = LONG_REPLY
    messages = [{"role": "user", "content": question}]
    key = (panel.model.value, question, *sorted(panel._params(None).items()))
    if key not in _long_reply_seeds:
        _long_reply_seeds[key] = next(
            (
                seed
                for seed in range(300)
                if engine.chat(messages, **panel._params(seed)).stats.finish_reason == "length"
            ),
            -1,
        )
    assert _long_reply_seeds[key] >= 0, "no seed gives a long answer from the tiny model"
    engine.configure(generation={"seed": _long_reply_seeds[key]})


# --------------------------------------------------------------------- the basics


def test_panel_is_displayable_and_offers_the_known_models(panel: ChatPanel, engine: Engine) -> None:
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert panel.model.value == "tiny-a"
    assert {"tiny-a", "tiny-b", "tiny-c", "tiny-chat"} <= set(panel.model.options)
    assert panel.busy is False
    assert "Ready" in panel.status_text


def test_nbllm_chat_panel_is_the_widget_class_and_uses_the_global_engine(global_engine: Engine) -> None:
    panel = nbllm.ChatPanel()
    assert isinstance(panel, ChatPanel)
    assert panel.engine is global_engine


def test_sampling_controls_start_from_the_configured_generation_settings(panel: ChatPanel, engine: Engine) -> None:
    generation = engine.settings.generation
    assert panel.temperature.value == pytest.approx(generation.default_temperature)
    assert panel.top_p.value == pytest.approx(generation.top_p)
    assert panel.top_k.value == generation.top_k
    assert panel.max_tokens.value == generation.default_max_tokens
    assert panel.repeat_penalty.value == pytest.approx(generation.repeat_penalty)


def test_send_streams_a_reply_into_the_history_with_stats_in_the_status(panel: ChatPanel) -> None:
    panel.max_tokens.value = 24
    type_and_send(panel, "hello there")
    assert panel.input.value == "", "the input box empties when the message is sent"
    finish(panel)
    assert [m["role"] for m in panel.history] == ["user", "assistant"]
    assert panel.history[0]["content"] == "hello there"
    reply = panel.messages[-1]
    assert reply.stats is not None
    assert panel.last_stream is not None
    assert reply.content == panel.last_stream.text
    assert 0 < reply.stats.completion_tokens <= 24
    assert panel.status_kind == "done"
    status = panel.status_text
    assert f"Generated {reply.stats.completion_tokens} tokens" in status
    assert "t/s" in status
    assert "first token" in status
    assert "tiny-a" in status
    assert "▍" not in reply.view.value, "the streaming cursor is gone once the reply ended"
    assert not panel.send_button.disabled
    assert panel.stop_button.disabled


def press_enter(panel: ChatPanel, text: str) -> None:
    """What the page does on Enter (chat_front_end.py): the text, as one message to the kernel.
    Delivered the way ipywidgets delivers a comm's custom message."""
    panel.input._handle_custom_msg({"type": "send", "text": text}, [])


def test_enter_sends_the_text_the_page_reports_and_typing_alone_sends_nothing(panel: ChatPanel) -> None:
    panel.max_tokens.value = 8
    panel.input.value = "line one\nline two\n"  # typed or pasted, newlines and all: a draft
    assert panel.history == []
    panel.input.value = ""  # the page empties the box as Enter is pressed
    press_enter(panel, "line one\nline two")
    finish(panel)
    assert panel.history[0] == {"role": "user", "content": "line one\nline two"}
    assert panel.input.value == ""


def test_enter_while_a_reply_is_running_keeps_the_draft(panel: ChatPanel, engine: Engine) -> None:
    holder = engine.generate("the", stream=True, max_tokens=50, seed=1)
    next(holder)  # the model is busy with another request: the panel's reply waits for it
    panel.max_tokens.value = 4
    type_and_send(panel, "first")
    assert panel.busy
    assert "Waiting for tiny-a" in panel.status_text
    panel.input.value = "second"
    press_enter(panel, "second")  # the page knew it was busy: it kept the draft
    assert panel.input.value == "second"
    assert "Still answering" in panel.status_text
    panel.input.value = ""  # the page had not heard yet, and emptied the box
    press_enter(panel, "second")
    assert panel.input.value == "second", "the draft comes back"
    assert not panel.send(), "Send is refused too"
    holder.close()
    finish(panel)
    assert panel.status_kind == "done"
    assert [m.content for m in panel.messages if m.role == "user"] == ["first"]


def test_an_empty_message_sends_nothing(panel: ChatPanel) -> None:
    panel.input.value = "   "
    panel.send_button.click()
    press_enter(panel, "   \n")
    assert panel.history == []
    assert panel.busy is False


def test_messages_are_markdown_and_user_text_cannot_inject_markup(panel: ChatPanel) -> None:
    panel.max_tokens.value = 4
    type_and_send(panel, "<script>alert(1)</script> <img src=x onerror=alert(2)> **bold** and `code`")
    finish(panel)
    shown = panel.messages[0].view.value
    assert "<script>" not in shown
    assert "<img" not in shown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
    assert "<strong>bold</strong>" in shown
    assert ">code</code>" in shown
    assert "nbllm-user" in panel.messages[0].view._dom_classes
    assert "nbllm-assistant" in panel.messages[1].view._dom_classes


# --------------------------------------------------------------------- Markdown rendering (no model needed)

BREAK = r"<br ?/?>\s*"


def test_single_newlines_keep_lines_and_list_items_apart() -> None:
    shown = to_html("Pets:\n1. cat\n2. dog")
    assert re.findall(r"<li>(.*?)</li>", shown) == ["cat", "dog"]
    assert "<ol" in shown
    assert re.findall(r"<li>(.*?)</li>", to_html("- cat\n- dog")) == ["cat", "dog"]
    # Neither a CommonMark list ("2." cannot interrupt a paragraph) nor a poem may merge its lines.
    assert re.search(rf"We skip one:{BREAK}2\. dog{BREAK}3\. cow", to_html("We skip one:\n2. dog\n3. cow"))
    assert re.search(rf"roses are red{BREAK}violets are blue", to_html("roses are red\nviolets are blue"))
    assert re.search(rf"windows{BREAK}line", to_html("windows\r\nline"))


def test_a_fenced_code_block_is_pre_code_with_its_content_escaped() -> None:
    shown = to_html("Try:\n```python\nif a < b and c > d:\n    print('<b>&')\n```\nDone.")
    assert re.search(r"<pre[^>]*><code>if a &lt; b and c &gt; d:\n    print\('&lt;b&gt;&amp;'\)\n</code></pre>", shown)
    assert "<b>" not in shown
    in_code = to_html("```\n**not bold** _nor this_\n```")
    assert "**not bold** _nor this_" in in_code, "no Markdown inside code"
    assert "<strong>" not in in_code
    half = to_html("Here:\n```python\nx = 1 < 2")  # a fence still streaming runs to the end
    assert re.search(r"<pre[^>]*><code>x = 1 &lt; 2\n?</code></pre>", half)


def test_html_in_a_message_is_shown_as_text() -> None:
    text = "<script>alert(1)</script>\n<img src=x onerror=alert(2)>\n\n<div onclick=alert(3)>\nhi\n</div>\n\n`<b>`"
    shown = to_html(text)
    for tag in ("<script", "<img", "<div", "<b>"):
        assert tag not in shown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
    assert "&lt;img src=x onerror=alert(2)&gt;" in shown
    assert "&lt;div onclick=alert(3)&gt;" in shown
    assert ">&lt;b&gt;</code>" in shown
    assert "\x07" not in to_html("bell\x07"), "control characters are dropped"


def test_only_web_and_mail_links_are_clickable() -> None:
    for text in (
        "[x](javascript:alert(1))",
        "[x](JavaScript:alert(1))",
        "[x](&#106;avascript:alert(1))",
        "<javascript:alert(1)>",
        "[x](vbscript:msgbox(1))",
        "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
        "[x](data:image/png;base64,iVBORw0KGgo=)",
        "[x](file:///etc/passwd)",
        "[x](/api/kernels)",
    ):
        shown = to_html(text)
        assert "<a" not in shown, text
        assert "href" not in shown, text
    link = to_html("see [the docs](https://example.com/a_b_c) or <mailto:me@example.com>")
    assert '<a href="https://example.com/a_b_c" target="_blank" rel="noopener noreferrer">the docs</a>' in link
    assert '<a href="mailto:me@example.com"' in link
    sneaky = to_html('[x](https://example.com/"onmouseover="alert(1)) [y](https://example.com "t" onclick="z")')
    assert 'onmouseover="' not in sneaky
    assert 'onclick="' not in sneaky
    assert "<img" not in to_html("![pixel](https://example.com/leak?q=secret)"), "images are not fetched"


def test_a_half_streamed_answer_renders_at_every_length() -> None:
    message = Message(role="assistant", content="Here is **bold", view=None, streaming=True)
    shown = _bubble(message)
    assert "Here is **bold" in shown
    assert "▍" in shown
    assert "<strong>" not in shown
    answer = "# Plan\n1. **Sort** the `list`\n2. See [docs](https://example.com)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    answer += "```py\nprint('<done>')\n```\n> _end_"
    for end in range(len(answer) + 1):
        assert isinstance(to_html(answer[:end]), str)
    final = to_html(answer)
    assert "<strong>Sort</strong>" in final
    assert "<table" in final
    assert "<em>end</em>" in final


def test_the_conversation_goes_to_the_model_as_chat_messages_with_the_system_prompt_first(
    panel: ChatPanel,
) -> None:
    panel.max_tokens.value = 6
    panel.system_prompt.value = "You answer in one word."
    type_and_send(panel, "first question")
    finish(panel)
    type_and_send(panel, "second question")
    finish(panel)
    assert panel.last_stream is not None
    sent = panel.last_stream.request.messages
    assert sent is not None
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[0]["content"] == "You answer in one word."
    assert sent[2]["content"] == panel.history[1]["content"]
    assert sent[3]["content"] == "second question"


def test_the_sampling_controls_decide_the_request_parameters(panel: ChatPanel) -> None:
    panel.temperature.value = 0.3
    panel.top_p.value = 0.8
    panel.top_k.value = 7
    panel.max_tokens.value = 5
    panel.repeat_penalty.value = 1.3
    type_and_send(panel, "hello")
    finish(panel)
    assert panel.last_stream is not None
    params = panel.last_stream.request.params
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.3, 0.8, 7, 5)
    assert params.repeat_penalty == pytest.approx(1.3)
    assert params.seed is None, "a normal message lets the engine draw (and record) the seed"


def test_json_mode_makes_every_reply_one_json_object(panel: ChatPanel) -> None:
    panel.json_mode.value = True
    panel.max_tokens.value = 400
    type_and_send(panel, "Describe a cat.")
    finish(panel)
    assert panel.last_stream is not None
    constraint = panel.last_stream.request.params.constraint
    assert constraint is not None
    assert constraint.kind == "json"
    panel.json_mode.value = False
    type_and_send(panel, "hello")
    finish(panel)
    assert panel.last_stream.request.params.constraint is None


# --------------------------------------------------------------------- stop, regenerate, clear, models


def test_stop_during_a_long_reply_keeps_the_partial_answer_and_the_model_usable(
    panel: ChatPanel, engine: Engine
) -> None:
    use_long_reply(engine, panel)
    type_and_send(panel, "tell me everything")
    assert panel.busy
    assert panel.send_button.disabled
    assert not panel.stop_button.disabled
    wait_until(lambda: panel.current_stream is not None and panel.current_stream.tokens >= 3)
    # The model's own thread counts tokens a moment before the panel's thread shows them.
    wait_until(lambda: "Generating" in panel.status_text)  # the status shows live progress while streaming
    panel.stop_button.click()
    finish(panel)

    reply = panel.messages[-1]
    assert reply.stats is not None
    assert reply.stats.finish_reason == "cancelled"
    assert 3 <= reply.stats.completion_tokens < LONG_REPLY
    assert reply.content, "the partial answer stays in the history"
    assert panel.status_kind == "stopped"
    assert "Stopped" in panel.status_text
    assert "stopped" in reply.view.value

    panel.max_tokens.value = 8
    type_and_send(panel, "still there?")
    finish(panel)
    assert panel.status_kind == "done"
    assert len(panel.history) == 4


def test_stop_while_the_model_is_busy_elsewhere_ends_the_reply_at_once(panel: ChatPanel, engine: Engine) -> None:
    holder = engine.generate("the", stream=True, max_tokens=50, seed=1)
    next(holder)  # the model is busy: the panel's reply waits, and is stopped while it waits
    type_and_send(panel, "hello")
    panel.stop_button.click()
    assert "Stopping" in panel.status_text
    holder.close()
    finish(panel)
    assert panel.status_kind == "stopped"
    assert panel.last_stream is not None
    assert panel.last_stream.tokens <= 1, "the stop lands at the first token"
    panel.max_tokens.value = 4
    panel.regenerate_button.click()
    finish(panel)
    assert panel.status_kind == "done"
    assert [m["role"] for m in panel.history] == ["user", "assistant"]


def test_choosing_another_model_answers_the_next_message_with_it(panel: ChatPanel) -> None:
    panel.max_tokens.value = 6
    type_and_send(panel, "hello")
    finish(panel)
    panel.model.value = "tiny-b"
    assert "tiny-b" in panel.status_text
    type_and_send(panel, "hello again")
    finish(panel)
    first, second = panel.messages[1].stats, panel.messages[3].stats
    assert first is not None
    assert second is not None
    assert (first.model, second.model) == ("tiny-a", "tiny-b")
    assert "tiny-b" in panel.status_text
    assert "tiny-b" in panel.messages[3].view.value, "the answer is labelled with its model"


def test_regenerate_replaces_the_last_answer_with_a_new_seed(panel: ChatPanel) -> None:
    panel.max_tokens.value = 16
    panel.temperature.value = 1.0
    type_and_send(panel, "hello")
    finish(panel)
    first = panel.messages[-1].stats
    panel.regenerate_button.click()
    finish(panel)
    assert [m["role"] for m in panel.history] == ["user", "assistant"]
    second = panel.messages[-1].stats
    assert first is not None
    assert second is not None
    assert second.seed != first.seed
    assert panel.last_stream is not None
    assert panel.last_stream.request.params.seed == second.seed, "the new seed was chosen by the panel"
    assert len(panel.history_box.children) == 2


def test_regenerate_with_nothing_to_answer_says_so(panel: ChatPanel) -> None:
    panel.regenerate_button.click()
    assert panel.busy is False
    assert "Nothing to regenerate" in panel.status_text


def test_clear_empties_the_conversation_and_keeps_the_speed_record(panel: ChatPanel) -> None:
    panel.max_tokens.value = 6
    type_and_send(panel, "hello")
    finish(panel)
    panel.clear_button.click()
    assert panel.history == []
    assert panel.history_box.children == (panel._empty_hint,)
    assert "Cleared" in panel.status_text
    assert len(panel.chart.figure.data[2].y) == 1, "the per-reply bars stay, to compare with the next answers"
    type_and_send(panel, "hello")
    finish(panel)
    assert panel.history[0] == {"role": "user", "content": "hello"}
    assert len(panel.history) == 2, "the earlier conversation is not sent again"
    assert len(panel.chart.figure.data[2].y) == 2


def test_clear_during_a_reply_stops_it_first(panel: ChatPanel, engine: Engine) -> None:
    use_long_reply(engine, panel)
    type_and_send(panel, "tell me everything")
    wait_until(lambda: panel.current_stream is not None and panel.current_stream.tokens >= 2)
    panel.clear_button.click()
    assert not panel.busy
    assert panel.history == []


# --------------------------------------------------------------------- errors


def test_a_deleted_model_file_is_a_red_status_line_and_the_panel_stays_usable(engine: Engine, tmp_path: Path) -> None:
    doomed = make_tiny_model(tmp_path / "doomed.gguf", seed=9)
    engine.configure(models={**engine.settings.models, "doomed": str(doomed)})
    panel = ChatPanel(engine)
    panel.max_tokens.value = 6
    panel.model.value = "doomed"
    doomed.unlink()
    type_and_send(panel, "hello")
    finish(panel)
    assert panel.status_kind == "error"
    assert "does not exist" in panel.status_text
    assert "#dc2626" in panel.status.value, "errors are red"
    assert "Traceback" not in panel.status_text
    assert panel.history == [{"role": "user", "content": "hello"}], "no empty answer is left behind"

    panel.model.value = "tiny-a"
    panel.regenerate_button.click()  # answers the question that failed
    finish(panel)
    assert panel.status_kind == "done"
    assert [m["role"] for m in panel.history] == ["user", "assistant"]


def test_a_broken_model_file_fails_in_the_worker_and_shows_in_the_status(engine: Engine, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    engine.configure(models={**engine.settings.models, "broken": str(broken)})
    panel = ChatPanel(engine, model="broken")
    type_and_send(panel, "hello")
    finish(panel)
    assert panel.status_kind == "error"
    assert "broken.gguf" in panel.status_text
    assert not panel.busy
    assert not panel.send_button.disabled
    assert panel.history == [{"role": "user", "content": "hello"}]


def test_an_unknown_model_is_refused_when_the_panel_is_made(engine: Engine) -> None:
    with pytest.raises(ModelNotFoundError, match="Did you mean 'tiny-a'"):
        ChatPanel(engine, model="tiny-aa")


def test_send_says_whether_a_reply_started(panel: ChatPanel, engine: Engine, tmp_path: Path) -> None:
    doomed = make_tiny_model(tmp_path / "gone.gguf", seed=9)
    engine.configure(models={**engine.settings.models, "gone": str(doomed)})
    panel.model.options = [*panel.model.options, "gone"]
    panel.model.value = "gone"
    doomed.unlink()
    assert panel.send("hello") is False, "the reply could not start"
    assert panel.status_kind == "error"
    with pytest.raises(TypeError, match="as a string, not int"):
        panel.send(123)  # type: ignore[arg-type]


def test_an_out_of_range_setting_is_reported_not_raised(panel: ChatPanel) -> None:
    panel.max_tokens.value = 6
    panel.top_p.max = 2.0  # the widget would allow it; the engine's validation must not crash the panel
    panel.top_p.value = 1.5
    type_and_send(panel, "hello")
    finish(panel)
    assert panel.status_kind == "error"
    assert "top_p" in panel.status_text
    assert panel.busy is False


# --------------------------------------------------------------------- the live chart and throttling


def test_each_reply_adds_its_throughput_to_the_chart(panel: ChatPanel, engine: Engine) -> None:
    use_long_reply(engine, panel)
    type_and_send(panel, "tell me everything")
    finish(panel)
    panel.max_tokens.value = 8
    panel.regenerate_button.click()  # a second reply (the first one's 200 tokens would overflow the context)
    finish(panel)
    chart = panel.chart
    assert [r.label for r in chart.replies] == ["#1", "#2"]
    first = chart.replies[0]
    assert first.tokens == LONG_REPLY
    assert first.tokens_per_second is not None
    assert first.tokens_per_second > 0
    assert first.times
    assert all(rate > 0 for rate in first.rates)
    bars = chart.figure.data[2]
    assert list(bars.x) == ["#1", "#2"]
    assert bars.y[0] == pytest.approx(first.tokens_per_second)
    past = chart.figure.data[0]
    assert list(past.x)[: len(first.times)] == first.times, "the earlier reply stays as a faded curve"


def test_redraws_are_throttled_while_tokens_stream(engine: Engine) -> None:
    panel = ChatPanel(engine, update_interval=0.01)
    use_long_reply(engine, panel)
    type_and_send(panel, "tell me everything")
    finish(panel)
    stats = panel.messages[-1].stats
    assert stats is not None
    assert stats.completion_tokens == LONG_REPLY
    allowed = 2 + stats.total_seconds / panel.update_interval  # not one redraw per token
    assert 1 <= panel.renders <= allowed
    # start + one push per interval + the final one
    assert panel.chart.updates <= allowed + 2


def test_the_default_redraw_rate_is_ten_a_second(panel: ChatPanel) -> None:
    assert panel.update_interval == pytest.approx(0.1)
    assert panel.chart.interval == pytest.approx(0.1)


def test_a_cached_answer_says_so_in_the_status(settings: nbllm.Settings) -> None:
    engine = Engine(settings.merged({"cache": {"enabled": True}}))
    try:
        engine.configure(generation={"seed": 3})
        panel = ChatPanel(engine)
        panel.max_tokens.value = 8
        type_and_send(panel, "hello")
        finish(panel)
        panel.clear_button.click()
        type_and_send(panel, "hello")
        finish(panel)
        assert "from the prompt cache" in panel.status_text
        assert panel.chart.figure.data[2].text[-1] == "cache"
    finally:
        engine.close()


def test_a_stopped_reply_is_marked_in_the_chart(panel: ChatPanel, engine: Engine) -> None:
    use_long_reply(engine, panel)
    type_and_send(panel, "tell me everything")
    wait_until(lambda: panel.current_stream is not None and panel.current_stream.tokens >= 2)
    panel.stop()
    finish(panel)
    assert panel.chart.replies[-1].stopped
    assert list(panel.chart.figure.data[2].marker.color) == [STOPPED_COLOR]


def test_tools_run_and_show_collapsed_with_their_results(settings: Settings) -> None:
    seen: list[tuple[int, int]] = []

    def add(a: int, b: int) -> int:
        """Add two integers."""
        seen.append((a, b))
        return a + b

    engine = Engine(settings.merged({"performance": {"context_size": 2048}}))
    panel = ChatPanel(engine, tools=[add], tool_choice="required", max_steps=2)
    panel.max_tokens.value = 600
    try:
        type_and_send(panel, "Add two numbers.")
        finish(panel)
        tools = [m for m in panel.messages if m.role == "tool"]
        assert tools, panel.status_text
        assert len(seen) == len(tools), "each call ran once"
        assert tools[0].content == str(sum(seen[0]))
        assert "<details" in tools[0].view.value
        calling = [m for m in panel.messages if m.extra.get("tool_calls")]
        assert "add(" in calling[0].view.value
        history = panel.history
        assert history[1]["tool_calls"][0]["function"]["name"] == "add"
        assert history[2]["role"] == "tool"
        assert panel.messages[-1].role == "assistant", "the model went on from the results"
    finally:
        engine.close()


# --------------------------------------------------------------------- marks, speed, model menu


def test_a_cut_off_answer_ends_with_the_truncation_note(panel: ChatPanel, engine: Engine) -> None:
    use_long_reply(engine, panel)
    type_and_send(panel, "tell me everything")
    finish(panel)
    stats = panel.messages[-1].stats
    assert stats is not None
    assert stats.truncated
    note = stats.truncation_note()
    assert note is not None
    shown = panel.messages[-1].view.value
    assert 'class="nbllm-truncated"' in shown
    assert html.escape(note) in shown
    assert shown.index(html.escape(note)) > shown.index('class="nbllm-text"'), "after the answer"

    panel.max_tokens.value = 8
    panel.regenerate_button.click()
    finish(panel)
    stats = panel.messages[-1].stats
    assert stats is not None
    if not stats.truncated:  # an answer that ended by itself has no mark
        assert "nbllm-truncated" not in panel.messages[-1].view.value


def test_the_status_line_the_answer_and_the_chart_show_one_speed(panel: ChatPanel, engine: Engine) -> None:
    use_long_reply(engine, panel)
    type_and_send(panel, "tell me everything")
    finish(panel)
    stats = panel.messages[-1].stats
    assert stats is not None
    speed = f"{stats.tokens_per_second:.1f}"
    status = re.search(r"\((\d+\.\d) t/s\)", panel.status_text)
    assert status is not None, panel.status_text
    footer = re.search(r"(\d+\.\d) t/s", re.sub(r"<[^>]+>", "", panel.messages[-1].view.value))
    assert footer is not None
    bars = panel.chart.figure.data[2]
    assert (status.group(1), footer.group(1), bars.text[-1]) == (speed, speed, speed)
    assert bars.y[-1] == pytest.approx(stats.tokens_per_second)
    titles = [a.text for a in panel.chart.figure.layout.annotations]
    assert titles[0].startswith("instantaneous"), "the live curve says it is not the reply's speed"


def test_the_model_menu_offers_a_model_added_after_the_panel_was_made(
    home: Path, engine: Engine, tmp_path: Path
) -> None:
    panel = ChatPanel(engine)
    assert "dropped-in" not in panel.model.options
    make_tiny_model(home / "models" / "dropped-in.gguf", seed=11)
    engine.configure(models={**engine.settings.models, "registered": str(make_tiny_model(tmp_path / "r.gguf"))})
    panel.behaviour._handle_custom_msg({"type": "refresh-models"}, [])  # the pointer over the menu
    assert {"dropped-in", "registered"} <= set(panel.model.options)
    assert panel.model.value == "tiny-a", "the chosen model stays chosen"
    assert "Ready" in panel.status_text, "refreshing the list is not a change of model"
    make_tiny_model(home / "models" / "later.gguf", seed=12)
    panel.max_tokens.value = 4
    type_and_send(panel, "hello")  # each message refreshes it too
    finish(panel)
    assert "later" in panel.model.options


# --------------------------------------------------------------------- conversations that survive


def test_the_conversation_is_saved_and_a_new_panel_on_the_same_file_brings_it_back(
    engine: Engine, tmp_path: Path
) -> None:
    saved = tmp_path / "chat.json"
    panel = ChatPanel(engine, save_to=saved, system_prompt="Be brief.")
    panel.max_tokens.value = 6
    type_and_send(panel, "first")
    finish(panel)
    type_and_send(panel, "second")
    finish(panel)
    assert saved.is_file()
    again = ChatPanel(engine, save_to=saved)
    assert again.history == [{"role": m["role"], "content": m["content"]} for m in panel.history]
    assert again.system_prompt.value == "Be brief."
    assert [m.model for m in again.messages if m.role == "assistant"] == ["tiny-a", "tiny-a"]
    assert "restored (4 messages)" in again.status_text
    assert len(again.history_box.children) == 4
    again.clear()
    assert ChatPanel(engine, save_to=saved).history == [], "a cleared conversation stays cleared"


def test_a_damaged_saved_conversation_is_ignored_not_run(engine: Engine, tmp_path: Path) -> None:
    saved = tmp_path / "chat.json"
    for text in ("{not json", '{"messages": [{"role": "wizard", "content": "x"}]}', '["a"]', "\x80\x81"):
        saved.write_bytes(text.encode("latin-1"))
        panel = ChatPanel(engine, save_to=saved)
        assert panel.history == []
        assert "Ready" in panel.status_text


def test_a_saved_conversation_is_readable_by_its_owner_alone(engine: Engine, tmp_path: Path) -> None:
    import os
    import stat

    saved = tmp_path / ".nbllm" / "nb.ipynb.chat-x.json"
    old = os.umask(0o022)  # the usual umask: files world-readable unless made otherwise
    try:
        panel = ChatPanel(engine, save_to=saved)
        panel.max_tokens.value = 4
        type_and_send(panel, "a private question")
        finish(panel)
    finally:
        os.umask(old)
    assert "a private question" in saved.read_text(encoding="utf-8")
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert stat.S_IMODE(saved.parent.stat().st_mode) == 0o700
    assert [p.name for p in saved.parent.iterdir()] == [saved.name], "no temporary file left"


def test_your_message_is_saved_when_sent_not_only_when_the_answer_ends(engine: Engine, tmp_path: Path) -> None:
    saved = tmp_path / "chat.json"
    panel = ChatPanel(engine, save_to=saved)
    use_long_reply(engine, panel)
    type_and_send(panel, "tell me everything")
    try:
        assert panel.busy, "the reply is still being written"
        from nbllm.notebook.widgets.chat_store import read_conversation

        on_disk = read_conversation(saved)["messages"]
        assert on_disk == [{"role": "user", "content": "tell me everything"}], "a kernel crash now keeps the question"
    finally:
        panel.stop()
        finish(panel)


def test_concurrent_saves_leave_the_newest_conversation_on_disk(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from nbllm.notebook.widgets import chat_store

    saved = tmp_path / "chat.json"
    panel = ChatPanel(engine, save_to=saved)
    real_write = chat_store.write_conversation
    first_started = threading.Event()

    def slow_first_write(path: Path, data: dict[str, Any]) -> None:
        if not first_started.is_set():  # the first writer is slow (a busy disk): the second overtakes it
            first_started.set()
            time.sleep(0.5)
        real_write(path, data)

    monkeypatch.setattr(chat_store, "write_conversation", slow_first_write)
    panel._replace_conversation("", [{"role": "user", "content": "old"}])
    older = threading.Thread(target=panel._save)
    older.start()
    assert first_started.wait(10)
    panel._replace_conversation("", [{"role": "user", "content": "new"}])
    panel._save()
    older.join(10)
    assert chat_store.read_conversation(saved)["messages"] == [{"role": "user", "content": "new"}]


def test_a_saved_message_without_text_is_refused_not_a_crash(engine: Engine, tmp_path: Path) -> None:
    from nbllm.notebook.widgets.chat_store import read_conversation

    saved = tmp_path / "chat.json"
    for message in ('{"role": "user"}', '{"role": "user", "content": null}', '{"role": "user", "content": 3}'):
        saved.write_text('{"messages": [{"role": "user", "content": "fine"}, ' + message + "]}")
        with pytest.raises(ValueError, match="not role and text"):
            read_conversation(saved)
        panel = ChatPanel(engine, save_to=saved)
        assert panel.history == []
        assert "Ready" in panel.status_text


def test_a_saved_conversation_file_that_would_hang_or_overflow_is_refused(tmp_path: Path) -> None:
    import os

    from nbllm.notebook.widgets.chat_store import read_conversation

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # a reader that opened it plainly would wait forever for a writer
    with pytest.raises(ValueError, match="not a regular file"):
        read_conversation(fifo)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="not a saved chat"):
        read_conversation(deep)


def test_a_notebook_panel_keeps_its_conversation_beside_the_notebook(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from nbllm.notebook.widgets.chat_store import conversation_file

    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert conversation_file("notes") is None, "outside a notebook nothing is saved"
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "work" / "analysis.ipynb"))
    assert conversation_file("my notes/1") == tmp_path / "work" / ".nbllm" / "analysis.ipynb.chat-my_notes_1.json"
    assert conversation_file(None) is None, "no cell id (not a kernel): no key, no file"


def test_export_and_load_markdown_round_trip_exactly(engine: Engine, tmp_path: Path) -> None:
    panel = ChatPanel(engine, system_prompt="You are terse.\n  Really.")
    tricky = "Line one\n\n#### You <!-- nbllm-chat:user -->\n\\#### x <!-- nbllm-chat:assistant -->\n```py\nx\n```\n"
    panel._replace_conversation(
        panel.system_prompt.value,
        [
            {"role": "user", "content": tricky},
            {"role": "assistant", "content": "  spaced\n\n\n", "model": "tiny-a"},
            {"role": "user", "content": "é ✓ <b>"},
            {"role": "assistant", "content": "", "model": "tiny-b"},
        ],
    )
    path = tmp_path / "chat.md"
    text = panel.export_markdown(path)
    assert path.read_text(encoding="utf-8") == text
    assert "#### You <!-- nbllm-chat:user -->" in text
    other = ChatPanel(engine)
    assert other.load_markdown(path) == 4
    assert other.history == panel.history
    assert other.system_prompt.value == "You are terse.\n  Really."
    assert [m.model for m in other.messages] == ["", "tiny-a", "", "tiny-b"]
    assert other.load_markdown(text) == 4, "the text itself loads too"
    with pytest.raises(NbllmError, match="no messages found"):
        other.load_markdown("# just a title\n")
    with pytest.raises(NbllmError, match="No transcript at"):
        other.load_markdown(tmp_path / "missing.md")


def test_a_long_conversation_is_trimmed_to_fit_the_context(engine: Engine) -> None:
    panel = ChatPanel(engine, system_prompt="Stay calm.")
    long = "word " * 60
    turns = [{"role": r, "content": f"{i}: {long}"} for i in range(12) for r in ("user", "assistant")]
    panel._replace_conversation("Stay calm.", turns[:-1])  # ends with a question: 12 * 2 - 1 messages
    panel.max_tokens.value = 8
    assert panel.regenerate(), panel.status_text
    finish(panel)
    assert panel.status_kind == "done", panel.status_text
    assert panel.last_stream is not None
    sent = panel.last_stream.request.messages
    assert sent is not None
    assert sent[0] == {"role": "system", "content": "Stay calm."}, "the system prompt is kept"
    assert sent[1]["role"] == "user"
    assert sent[-1]["content"].startswith("11: "), f"the newest question is sent: {sent[-1]}"
    left_out = len(turns) - 1 - (len(sent) - 1)
    assert left_out > 0
    assert f"{left_out} earlier messages left out to fit the context" in panel.messages[-1].view.value
    assert len(panel.history) == len(turns), "the page still shows the whole conversation"


def test_trim_to_fit_keeps_the_system_prompt_and_drops_whole_turns_oldest_first() -> None:
    from nbllm.core.conversation import trim_to_fit

    def words(messages: list[Any]) -> int:
        return sum(len(str(m["content"]).split()) for m in messages)

    conversation = [
        {"role": "system", "content": "s s"},
        {"role": "user", "content": "u1 u1 u1"},
        {"role": "assistant", "content": "a1 a1 a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2", "tool_calls": []},
        {"role": "tool", "content": "t2"},
        {"role": "user", "content": "u3 u3"},
    ]
    assert trim_to_fit(conversation, words, 100).left_out == 0
    trimmed = trim_to_fit(conversation, words, 8)
    assert trimmed.messages == [conversation[0], *conversation[3:]]
    assert (trimmed.left_out, trimmed.tokens) == (2, 7)
    alone = trim_to_fit(conversation, words, 1)
    assert alone.messages == [conversation[0], conversation[-1]], "the newest question is always sent"
    assert alone.tokens == 4


def test_edit_takes_a_message_back_into_the_box_and_drops_what_followed(panel: ChatPanel) -> None:
    panel.max_tokens.value = 6
    type_and_send(panel, "first")
    finish(panel)
    type_and_send(panel, "second")
    finish(panel)
    second = panel.messages[2]
    assert f'data-message="{second.id}"' in second.view.value, "an Edit button on your own message"
    panel.behaviour._handle_custom_msg({"type": "edit", "message": second.id}, [])  # its click
    assert panel.input.value == "second"
    assert [m["content"] for m in panel.history] == ["first", panel.history[1]["content"]]
    press_enter(panel, "second, better")
    finish(panel)
    assert [m["role"] for m in panel.history] == ["user", "assistant", "user", "assistant"]
    assert panel.history[2]["content"] == "second, better"
    with pytest.raises(ValueError, match="only your own messages"):
        panel.edit(1)


def test_code_blocks_in_answers_get_copy_and_insert_buttons() -> None:
    answer = Message(role="assistant", content="Run:\n```python\nprint('hi')\n```", view=None)
    shown = _bubble(answer)
    assert re.search(r'<div class="nbllm-code"><pre[^>]*><code>print\(&#x27;hi&#x27;\)|print\(\'hi\'\)', shown)
    assert 'class="nbllm-copy"' in shown
    assert 'class="nbllm-insert"' in shown
    question = Message(role="user", content="```\nmine\n```", view=None)
    assert "nbllm-insert" not in _bubble(question), "your own code needs no Insert"
    assert "nbllm-copy" not in to_html("```\nx\n```"), "plain Markdown has no buttons"


# --------------------------------------------------------------------- a conversation near the context's end


def padded_conversation(engine: Engine, tokens: int, *, system: str = "") -> list[dict[str, str]]:
    """Turns of filler, ending with a question, as long as possible while at most ``tokens``
    tokens as tiny-a counts them."""
    turns: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": "0: " + "word " * 30})
    i = 1
    while True:
        grown = [
            *turns,
            {"role": "assistant", "content": f"{i}: " + "word " * 30},
            {"role": "user", "content": f"{i}?"},
        ]
        if engine.count_chat_tokens(grown, "tiny-a") > tokens:
            break
        turns = grown
        i += 1
    while True:  # then word by word, in the last question
        longer = [*turns[:-1], {"role": "user", "content": turns[-1]["content"] + " word"}]
        if engine.count_chat_tokens(longer, "tiny-a") > tokens:
            return turns
        turns = longer


def test_count_chat_tokens_is_the_prompt_the_model_is_sent(engine: Engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there, model"}]
    counted = engine.count_chat_tokens(messages, "tiny-a")
    answer = engine.chat(messages, "tiny-a", max_tokens=2)
    assert counted == answer.stats.prompt_tokens > 4
    assert engine.count_chat_tokens([*messages, {"role": "assistant", "content": "word " * 20}]) > counted + 15


def test_a_conversation_near_the_context_end_is_trimmed_before_sending_with_room_for_the_answer(
    engine: Engine,
) -> None:
    context = 512  # the fixtures' context
    conversation = padded_conversation(engine, 440, system="Stay calm.")  # fits, but leaves < 100 for the answer
    assert engine.count_chat_tokens(conversation, "tiny-a") + 100 > context
    panel = ChatPanel(engine)
    panel._replace_conversation("Stay calm.", conversation[1:])
    panel.max_tokens.value = 100
    assert panel.regenerate(), panel.status_text
    finish(panel)
    assert panel.status_kind == "done", panel.status_text
    stats = panel.messages[-1].stats
    assert stats is not None
    assert stats.prompt_tokens + 100 <= context, "room for a max_tokens answer was kept"
    assert panel.last_stream is not None
    assert panel.last_stream.request.messages is not None
    sent = panel.last_stream.request.messages
    assert sent[0] == {"role": "system", "content": "Stay calm."}
    left_out = len(conversation) - len(sent)
    assert left_out > 0
    assert f"{left_out} earlier message" in panel.messages[-1].view.value
    assert not stats.context_full, "an answer cut short is cut at max_tokens, not by a full context"


def test_an_answer_cut_by_a_full_context_says_so_not_raise_max_tokens(engine: Engine) -> None:
    conversation = padded_conversation(engine, 508)
    prompt = engine.count_chat_tokens(conversation, "tiny-a")
    assert 500 <= prompt <= 508
    for seed in range(50):  # a seed whose answer runs into the context's end (not its end token)
        stats = engine.chat(conversation, "tiny-a", max_tokens=100, seed=seed).stats
        if stats.finish_reason == "length":
            break
    assert stats.truncated
    assert stats.completion_tokens == 512 - prompt
    assert stats.truncation_note() == (
        "[cut off: the context (512 tokens) is full — start a new conversation or use a model with a longer context]"
    )
    plain = engine.chat([{"role": "user", "content": "hi"}], "tiny-a", max_tokens=1).stats
    assert plain.truncated
    assert plain.truncation_note() == (
        "[cut off at the 1-token limit: raise max_tokens (-n in %%llm and the CLI) for the rest]"
    )
