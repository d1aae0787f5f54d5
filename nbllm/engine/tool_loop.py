"""``chat(..., tools=[f, g], run_tools=True)``: the model calls the kernel's functions, their
results go back to it as tool messages, until it answers in text or ``max_steps`` is reached.

Only the functions given can run, with arguments validated against their signatures; nothing
the model writes is evaluated. ``confirm(call)`` may refuse a call (the model is told). A tool
that raises tells the model its error; one that runs past ``timeout`` is abandoned (its thread
cannot be killed: it finishes in the background) and the model is told it timed out. A step
whose conversation holds tool results is never cached: the results may differ next time.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbllm.core.chat_format import normalize_messages
from nbllm.core.errors import GenerationError, ParameterError
from nbllm.core.tools import ToolCall, ToolSet, make_toolset
from nbllm.engine.request import Completion

if TYPE_CHECKING:
    from nbllm.engine.engine import Engine

MAX_RESULT_CHARS = 8_000  # what goes back to the model of one result (the run keeps all of it)


@dataclass(frozen=True)
class ToolRun:
    """One call as it ran: its result, or why it did not give one."""

    call: ToolCall
    result: Any = None
    error: str | None = None
    seconds: float = 0.0
    refused: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


class ToolLoopError(GenerationError):
    """The loop could not end with an answer; ``messages`` and ``runs`` keep the exchange so far."""

    def __init__(self, message: str, messages: list[dict[str, Any]], runs: list[ToolRun]) -> None:
        super().__init__(message)
        self.messages = messages
        self.runs = runs


def run_tool_loop(
    engine: Engine,
    messages: Any,
    model: str | None,
    params: Mapping[str, Any],
    *,
    cache: bool,
    max_steps: int,
    confirm: Callable[[ToolCall], bool] | None,
    timeout: float,
) -> Completion:
    tools = make_toolset(params.get("tools"), params.get("tool_choice"))
    if tools is None:
        raise ParameterError("run_tools=True needs tools=[...]: the functions the model may call.")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or not 1 <= max_steps <= 100:
        raise ParameterError(f"max_steps = {max_steps!r}: must be an integer from 1 to 100.")
    if not timeout > 0:
        raise ParameterError(f"tool_timeout = {timeout!r}: must be a positive number of seconds.")
    missing = [t.name for t in tools.tools if t.function is None]
    if missing:
        raise ParameterError(
            f"run_tools=True runs Python functions; {', '.join(missing)} is a tool description without one. Give "
            "the function itself, or run the calls yourself (result.tool_calls)."
        )
    exchange: list[dict[str, Any]] = [dict(m) for m in ([{"role": "user", "content": messages}]
                                                        if isinstance(messages, str) else messages)]  # fmt: skip
    normalize_messages(exchange)  # the caller's mistakes, before any model work
    runs: list[ToolRun] = []
    answered_before = _assistant_turns(exchange)
    try:
        return _loop(engine, exchange, model, dict(params), tools, runs, cache, max_steps, confirm, timeout)
    finally:  # counted however the loop ended: nbllm.stats() shows the calls, steps and tool time
        steps = _assistant_turns(exchange) - answered_before
        engine.stats.record_tools(len(runs), sum(1 for r in runs if not r.ok), steps, sum(r.seconds for r in runs))


def _assistant_turns(exchange: list[dict[str, Any]]) -> int:
    return sum(1 for message in exchange if message.get("role") == "assistant")


def _loop(
    engine: Engine,
    exchange: list[dict[str, Any]],
    model: str | None,
    step_params: dict[str, Any],
    tools: ToolSet,
    runs: list[ToolRun],
    cache: bool,
    max_steps: int,
    confirm: Callable[[ToolCall], bool] | None,
    timeout: float,
) -> Completion:
    for step in range(1, max_steps + 1):
        ran = any(m.get("role") == "tool" for m in exchange)
        try:
            completion: Completion = engine.chat(exchange, model=model, cache=cache and not ran, **step_params)
        except GenerationError as error:
            raise ToolLoopError(f"Step {step}: {error}", exchange, runs) from error
        if not completion.tool_calls:
            exchange.append({"role": "assistant", "content": completion.text})
            return dataclasses.replace(completion, messages=tuple(exchange), tool_runs=tuple(runs), steps=step)
        exchange.append(
            {"role": "assistant", "content": "", "tool_calls": [c.as_openai() for c in completion.tool_calls]}
        )
        for call in completion.tool_calls:
            run = run_call(tools, call, confirm, timeout)
            runs.append(run)
            exchange.append(
                {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result_for_model(run)}
            )
        if step_params.get("tool_choice") not in (None, "auto", "none"):
            step_params["tool_choice"] = "auto"  # a forced call is made once; then the model may answer
    raise ToolLoopError(
        f"The model was still calling tools after max_steps={max_steps} steps ({len(runs)} calls). Raise max_steps, "
        "or see the exchange so far in the error's .messages and .runs.",
        exchange,
        runs,
    )


def run_call(tools: ToolSet, call: ToolCall, confirm: Callable[[ToolCall], bool] | None, timeout: float) -> ToolRun:
    tool = tools.by_name(call.name)
    assert tool is not None  # parse() accepts only the set's tools
    assert tool.function is not None  # run_tool_loop checked that each has one
    if confirm is not None:
        try:
            approved = bool(confirm(call))
        except Exception as error:  # a confirm callback that fails refuses
            return ToolRun(
                call, error=f"The call could not be confirmed: {type(error).__name__}: {error}", refused=True
            )
        if not approved:
            return ToolRun(call, error="The user refused this call.", refused=True)
    outcome: dict[str, Any] = {}
    function = tool.function

    def body() -> None:
        try:
            outcome["result"] = function(**call.arguments)
        except BaseException as error:  # told to the model, never raised into the kernel
            outcome["error"] = f"{type(error).__name__}: {error}"

    started = time.perf_counter()
    thread = threading.Thread(target=body, name=f"nbllm-tool-{call.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    seconds = time.perf_counter() - started
    if thread.is_alive():
        return ToolRun(call, error=f"Timed out after {timeout:g} s.", seconds=seconds)
    if "error" in outcome:
        return ToolRun(call, error=outcome["error"], seconds=seconds)
    return ToolRun(call, result=outcome.get("result"), seconds=seconds)


def result_for_model(run: ToolRun) -> str:
    """What the model is told of a call: its result as JSON, or its error."""
    text = json.dumps({"error": run.error}) if run.error is not None else _as_json(run.result)
    return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + " ...(cut)"


def _as_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return json.dumps(str(value))
