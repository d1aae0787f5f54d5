"""The chat panel, driven through its widgets' callbacks on real llama.cpp (tiny generated models).

A browser test (test_browser.py) covers the same panel rendered in JupyterLab; here the
callbacks are called directly: text set on the input widget, buttons ``click()``-ed, the
worker thread awaited with ``panel.wait()``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import nbllm
from nbllm.core.config import Settings
from nbllm.core.errors import ModelNotFoundError
from nbllm.engine import Engine
from nbllm.notebook.plots import STOPPED_COLOR
from nbllm.notebook.widgets import ChatPanel
from nbllm.notebook.widgets.chat import Message, _bubble, _without_typed_newline
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


def test_enter_in_the_input_box_sends_and_a_pasted_paragraph_does_not(panel: ChatPanel) -> None:
    panel.max_tokens.value = 8
    panel.input.value = "line one\nline two"  # pasted: stays a draft
    assert panel.history == []
    panel.input.value = "line one\nline two\n"  # then Enter
    finish(panel)
    assert panel.history[0] == {"role": "user", "content": "line one\nline two"}
    assert panel.input.value == ""


def test_only_a_typed_newline_counts_as_enter() -> None:
    assert _without_typed_newline("hello", "hello\n") == "hello"
    assert _without_typed_newline("hello", "hel\nlo") == "hello"
    assert _without_typed_newline("helo", "hel\nlo") is None
    assert _without_typed_newline("hello", "hello!") is None
    assert _without_typed_newline("", "a\nb") is None
    assert _without_typed_newline("hello", "") is None


def test_enter_while_a_reply_is_running_keeps_the_draft(panel: ChatPanel, engine: Engine) -> None:
    holder = engine.generate("the", stream=True, max_tokens=50, seed=1)
    next(holder)  # the model is busy with another request: the panel's reply waits for it
    panel.max_tokens.value = 4
    type_and_send(panel, "first")
    assert panel.busy
    assert "Waiting for tiny-a" in panel.status_text
    panel.input.value = "second"
    panel.input.value = "second\n"
    assert panel.input.value == "second", "the draft stays, without the newline"
    assert "Still answering" in panel.status_text
    assert not panel.send(), "Send is refused too"
    holder.close()
    finish(panel)
    assert panel.status_kind == "done"
    assert [m.content for m in panel.messages if m.role == "user"] == ["first"]


def test_an_empty_message_sends_nothing(panel: ChatPanel) -> None:
    panel.input.value = "   "
    panel.send_button.click()
    panel.input.value = "   \n"
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
