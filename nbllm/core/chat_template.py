"""Chat templates, compiled and rendered by nbllm in a sandbox with limits that nbllm sets.

A GGUF file may carry a Jinja chat template (``tokenizer.chat_template``): code written by
whoever made the file, run on every chat. llama-cpp-python renders it in jinja2's
``ImmutableSandboxedEnvironment`` (no file access, no private attributes: CVE-2024-34359), and
so does nbllm. But a sandbox bounds what a template may *touch*, not what it may *cost*: a
template that loops (``range(100000)`` nested twice) hung the kernel, and one that builds a huge
string (``'x' * 400000000``) aborted it. Here the same sandbox gets limits:

- **Source**: at most ``MAX_SOURCE_CHARS``. Real templates are a few kilobytes (the longest
  tool-calling ones some tens).
- **Time**: compiling, and each render, run on a thread of their own with a deadline
  (``SECONDS``). A template still running then is stopped by an exception raised inside that
  thread (``PyThreadState_SetAsyncExc``): a compiled template is Python bytecode, so it stops at
  its next instruction, and the caller gets ``ChatTemplateError`` at the deadline either way.
  Cost, measured on a 20-message chat with a Gemma-style template: 0.47 ms a render against
  llama-cpp-python's 0.02 ms (0.3 ms the thread, 0.13 ms the checks), once per request, where
  reading the prompt alone takes tens of milliseconds.
- **Size**: one C call (a repetition, a join, a padding) cannot be stopped half-way, so what can
  multiply a size is checked *before* it runs: ``*``, ``**``, ``+``, ``%`` and ``~``, every join of
  a block's output, the methods and filters whose arguments scale their result (``ljust``,
  ``replace``, ``join``, ``format``, ``center``, ``indent``, ``batch``...), and conversions of
  containers to text. Every call's result and the total output are checked after. The allowance
  is ``ALLOWANCE`` characters plus twice the conversation's text and ``PER_MESSAGE`` per message,
  so that whatever a real template makes of a conversation fits, and a huge string never gets
  allocated.
- **Steps**: every ``for`` loop counts its iterations against the same allowance, so a looping
  template fails in a fraction of a second instead of at the deadline.

What is an error and what falls back (the rule ``format`` follows):

- A template that does not compile is a ``ChatTemplateError`` when the model loads, naming the
  file: the file is broken and every chat with it would be wrong.
- A render that breaks a limit is a ``ChatTemplateError`` for that request: the template is
  broken or hostile, and a fallback would hide that.
- A template that *fails* on a conversation (its own ``raise_exception('System role not
  supported')``, a missing key, a type error) makes nbllm format that chat as its plain
  transcript, with a one-line ``ChatTemplateWarning`` (once per model and reason): templates
  refuse conversations their authors did not foresee (a system message for Gemma 2, roles that
  do not alternate for Mistral), and refusing the chat would break conversations that work
  with the transcript, which is what template-less models use anyway. A warning (``warnings``),
  not a log line: it shows in a notebook cell and a console with no logging set up, and its
  registry prints it once.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import json
import re
import string
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nbllm.core.chat_format import FormattedPrompt, plain_turns, transcript
from nbllm.core.errors import ChatTemplateError, ParameterError

T = TypeVar("T")

MAX_SOURCE_CHARS = 1_000_000
SECONDS = 5.0  # compile, and each render: real templates take milliseconds
ALLOWANCE = 1_000_000  # characters (and loop steps) a template may add to any conversation
PER_MESSAGE = 10_000  # ... and per message
MAX_RANGE = 100_000  # jinja2's own bound on range()
MAX_INT_BITS = 100_000  # integers beyond this make multiplication a long, unstoppable C call
MAX_JSON_INDENT = 16

_STEPS_FILTER = "nbllm_loop_steps"
_FIX = (
    "Use another file, or fix the template in a copy of this one with the gguf package's gguf-new-metadata "
    "(--chat-template-file FIXED.jinja; or --remove-metadata tokenizer.chat_template to chat in a plain transcript)."
)


class ChatTemplateWarning(UserWarning):
    """A chat template failed on a conversation; nbllm formatted it as a plain transcript."""


class _LimitExceeded(Exception):
    """A template went past one of nbllm's limits (the message says which, as "... would ...")."""


class _Deadline(BaseException):
    """Raised inside a template's thread at its deadline (a BaseException: nothing catches it)."""


class _TimedOut(Exception):
    pass


class _Limits(threading.local):
    """The allowance of the render running on this thread (class values: the defaults)."""

    chars = ALLOWANCE
    steps = ALLOWANCE


_limits = _Limits()


# ---------------------------------------------------------------------------- size checks


def _allow(size: int, how: str) -> None:
    if size > _limits.chars:
        raise _LimitExceeded(
            f"would make a value of {size:,} characters or items ({how}; nbllm's limit for this chat is "
            f"{_limits.chars:,})"
        )


def _checked(value: T, how: str) -> T:
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        _allow(len(value), how)
    return value


def _text_size(value: Any) -> int:
    """About ``len(str(value))``, counted without building it; stops once past the allowance
    (shared references are counted each time, as ``str`` would print them)."""
    budget = _limits.chars
    total = 0
    stack = [value]
    while stack and total <= budget:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, (bytes, bytearray)):
            total += 4 * len(item) + 3
        elif isinstance(item, Mapping):
            total += 2 + 4 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(item)
            stack.extend(item)
        elif isinstance(item, jinja2.utils.Namespace):
            stack.append(getattr(item, "_Namespace__attrs", {}))
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 2
        else:
            total += 40  # floats, None, booleans, undefined values, macros: short reprs
    return total


def _as_int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _ints(values: Iterable[Any]) -> int:
    return sum(v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0)


def _arguments(args: Any) -> list[Any]:
    """The values a ``%`` or ``format`` would print."""
    if isinstance(args, Mapping):
        return list(args.values())
    if isinstance(args, (tuple, list)):
        return list(args)
    return [args]


def _numbers_cost(spec: str) -> int:
    """The sum of the numbers in a format spec (widths, precisions): what they can add."""
    total = 0
    for digits in re.findall(r"\d+", spec):
        if len(digits) > 12:
            return 1 << 62
        total += int(digits)
    return total


_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def _percent_cost(text: str, args: Any) -> int:
    values = _arguments(args)
    longest = max((_text_size(v) for v in values), default=0)
    total = len(text)
    for match in _PERCENT.finditer(text):
        total += longest + _numbers_cost("".join(g for g in match.groups() if g and g != "*"))
        if "*" in match.group(0):
            total += _ints(values)
    return total


def _format_cost(text: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    values = [*args, *kwargs.values()]
    if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:  # format_map
        values += list(args[0].values())
    longest = max((_text_size(v) for v in values), default=0)
    total = len(text)
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError:
        return total  # not a valid format string: calling it raises
    for _literal, field, spec, _conversion in fields:
        if field is None:
            continue
        total += longest + _numbers_cost(spec or "")
        if "{" in (spec or ""):
            total += _ints(values)
    return total


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for sequence, times in ((left, right), (right, left)):
            if isinstance(sequence, (str, bytes, list, tuple)) and isinstance(times, int):
                _allow(len(sequence) * max(times, 0), "with *")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _LimitExceeded(f"would multiply integers past {MAX_INT_BITS:,} bits")
    elif operator == "**":
        integers = isinstance(left, int) and isinstance(right, int)
        if integers and right > 0 and abs(left) > 1 and right * left.bit_length() > MAX_INT_BITS:
            raise _LimitExceeded(f"would raise an integer to a power past {MAX_INT_BITS:,} bits")
    elif operator == "+":
        if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
            _allow(len(left) + len(right), "with +")
    elif operator == "%" and isinstance(left, (str, bytes)):
        text = left if isinstance(left, str) else left.decode("latin-1")
        _allow(_percent_cost(text, right), "with %")


def _check_method(owner: str | bytes, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a str/bytes method call whose arguments would make its result too big; returns the
    arguments to call it with (``join`` gets its items as a list, measured once)."""
    size = len(owner)
    if name in ("ljust", "rjust", "center", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        _allow(max(size, _as_int(width)), f"with .{name}()")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        tabs = _occurrences(owner, "\t") + _occurrences(owner, b"\t")
        _allow(size + tabs * max(_as_int(tab), 0), "with .expandtabs()")
    elif name == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        if isinstance(old, (str, bytes)) and isinstance(new, (str, bytes)):
            count = _as_int(args[2]) if len(args) > 2 else _as_int(kwargs.get("count", -1))
            found = _occurrences(owner, old) if old else size + 1
            if count >= 0:
                found = min(found, count)
            _allow(size + found * max(len(new) - len(old), 0), "with replace")
    elif name == "join" and args:
        items = list(args[0])
        _allow(len(items), "with .join()")
        text = sum(len(i) if isinstance(i, (str, bytes)) else 0 for i in items)
        _allow(text + size * max(len(items) - 1, 0), "with .join()")
        return (items, *args[1:])
    elif name in ("format", "format_map") and isinstance(owner, str):
        _allow(_format_cost(owner, args, kwargs), f"with .{name}()")
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        _allow(size * max(longest, 1), "with .translate()")
    return args


def _occurrences(owner: str | bytes, part: str | bytes) -> int:
    if isinstance(owner, str) and isinstance(part, str):
        return owner.count(part)
    if isinstance(owner, bytes) and isinstance(part, bytes):
        return owner.count(part)
    return 0  # mismatched types: the call raises


def _owner(function: Any) -> tuple[str | bytes | None, str]:
    """The string a method is bound to (also through the sandbox's ``format`` wrapper) and its name."""
    name = getattr(function, "__name__", "")
    bound = getattr(function, "__wrapped__", function)  # the sandbox wraps str.format
    owner = getattr(bound, "__self__", None)
    if isinstance(owner, (str, bytes)) and isinstance(function, (types.BuiltinMethodType, types.MethodType)):
        return owner, name
    if isinstance(owner, str) and name in ("format", "format_map"):
        return owner, name
    return None, name


# ---------------------------------------------------------------------------- filters


def _center(value: Any, width: Any = 80, *_: Any, **__: Any) -> None:
    _allow(max(len(str(value)), _as_int(width)), "with |center")


def _indent(value: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    text = str(value)
    step = len(width) if isinstance(width, str) else _as_int(width)
    _allow(len(text) + (text.count("\n") + 1) * max(step, 0), "with |indent")


def _count_argument(value: Any, count: Any = 1, *_: Any, **__: Any) -> None:
    _allow(_as_int(count), "with |batch or |slice")


def _wordwrap(value: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None, **_: Any) -> None:
    _allow(len(str(value)) * (1 + (len(wrapstring) if isinstance(wrapstring, str) else 1)), "with |wordwrap")


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> None:
    _allow(_percent_cost(str(value), kwargs or args), "with |format")


def _replace_filter(value: Any, old: Any = "", new: Any = "", count: Any = None, **_: Any) -> None:
    _check_method(str(value), "replace", (str(old), str(new), -1 if count is None else count), {})


def _tojson_check(value: Any, *args: Any, indent: Any = None, **_: Any) -> None:
    indent = args[1] if len(args) > 1 else indent
    width = len(indent) if isinstance(indent, str) else _as_int(indent)
    if width > MAX_JSON_INDENT:
        raise _LimitExceeded(f"would indent JSON by {width:,} (at most {MAX_JSON_INDENT})")
    _allow(_text_size(value), "with |tojson")


def _to_text(value: Any, *_: Any, **__: Any) -> None:
    _allow(_text_size(value), "writing a value as text")


def _sum(value: Any, attribute: Any = None, start: Any = 0, **_: Any) -> None:
    if isinstance(start, (str, bytes, list, tuple)) and isinstance(value, (list, tuple)):
        _allow(len(start) + sum(len(v) for v in value if isinstance(v, (str, bytes, list, tuple))), "with |sum")


_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": _center,
    "indent": _indent,
    "batch": _count_argument,
    "slice": _count_argument,
    "wordwrap": _wordwrap,
    "format": _format_filter,
    "replace": _replace_filter,
    "tojson": _tojson_check,
    "pprint": _to_text,
    "string": _to_text,
    "sum": _sum,
}


def _join_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def join(eval_ctx: Any, value: Any, d: Any = "", attribute: Any = None) -> Any:
        items = list(value)
        _allow(len(items), "with |join")
        separator = len(str(d)) * max(len(items) - 1, 0)
        _allow(sum(_text_size(i) for i in items) + separator, "with |join")
        return _checked(function(eval_ctx, items, d, attribute), "with |join")

    return join


def _guard_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    if name == "join":
        return _join_filter(function)
    check = _FILTER_CHECKS.get(name)
    # Filters that receive the environment or context first (jinja2's pass_* decorators, whose
    # mark functools.wraps copies onto the wrapper) have their value second.
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if check is not None:
            check(*args[skip:], **kwargs)
        return _checked(function(*args, **kwargs), f"with |{name}")

    return guarded


def _loop_steps(iterable: Iterable[T]) -> Iterator[T]:
    """Every ``for`` loop iterates through this (see ``_Sandbox._parse``)."""
    for item in iterable:
        _limits.steps -= 1
        if _limits.steps < 0:
            raise _LimitExceeded(f"would loop more than {_limits.chars:,} times")
        yield item


def _range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise _LimitExceeded(f"would build a range of {len(numbers):,} numbers (at most {MAX_RANGE:,})")
    return numbers


def _raise_exception(message: Any) -> NoReturn:
    raise jinja2.TemplateError(str(message))


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # As llama-cpp-python and Transformers render templates: non-ASCII text stays as it is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _IgnoreGenerationTags(jinja2.ext.Extension):
    """Transformers' ``{% generation %}`` tag (marks assistant text for training): rendered as its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's own attribute

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


# ---------------------------------------------------------------------------- the sandbox


class _CodeGenerator(CodeGenerator):
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        """``a ~ b`` through ``_Sandbox.checked_concat`` (jinja2 joins unchecked)."""
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            super().visit_Concat(node, frame)
            return
        self.write("environment.checked_concat((")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, set up as llama-cpp-python and Transformers set it up for chat
    templates, with nbllm's limits (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _CodeGenerator

    def __init__(self) -> None:
        super().__init__(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols],
            finalize=self._finalize,
        )
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, function) for name, function in self.filters.items()}
        self.filters[_STEPS_FILTER] = _loop_steps
        self.globals["range"] = _range
        self.globals.pop("lipsum", None)  # n paragraphs of lorem ipsum: no template needs it
        self.concat = self._concat  # type: ignore[method-assign]

    @staticmethod
    def _finalize(value: Any) -> Any:
        """Every ``{{ value }}``, before jinja2 turns it into text."""
        if not isinstance(value, str):
            _allow(_text_size(value), "printing a value")
        return value

    @staticmethod
    def _concat(parts: Iterable[str]) -> str:
        """The joins of a block's output (``{% set %}`` blocks, macros, filter blocks)."""
        pieces = parts if isinstance(parts, list) else list(parts)
        _allow(sum(map(len, pieces)), "joining a block's output")
        return "".join(pieces)

    @staticmethod
    def checked_concat(parts: tuple[Any, ...]) -> str:
        _allow(sum(len(p) if isinstance(p, str) else _text_size(p) for p in parts), "with ~")
        return "".join(map(str, parts))

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):  # every loop counts its steps
            loop.iter = nodes.Filter(loop.iter, _STEPS_FILTER, [], [], None, None, lineno=loop.lineno)
            loop.iter.set_environment(self)
        return tree

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return _checked(self.binop_table[operator](left, right), f"with {operator}")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # jinja2's signature
        owner, name = _owner(__obj)
        if owner is not None:
            args = _check_method(owner, name, args, kwargs)
        return _checked(super().call(__context, __obj, *args, **kwargs), f"as what {name or 'a call'}() returned")


# ---------------------------------------------------------------------------- deadlines


def _raise_in_thread(ident: int) -> None:
    set_async_exc = getattr(getattr(ctypes, "pythonapi", None), "PyThreadState_SetAsyncExc", None)
    if set_async_exc is not None:  # CPython: the thread stops at its next bytecode
        set_async_exc(ctypes.c_ulong(ident), ctypes.py_object(_Deadline))


class _Worker(threading.Thread):
    """Runs one function; ``stop`` raises ``_Deadline`` in it unless it has finished."""

    def __init__(self, function: Callable[[], Any]) -> None:
        super().__init__(name="nbllm-chat-template", daemon=True)
        self._function = function
        self._lock = threading.Lock()
        self._stopped = False
        self.finished = threading.Event()
        self.outcome: tuple[bool, Any] = (False, None)

    def run(self) -> None:
        # One try around everything: a _Deadline sent by stop() lands inside it wherever this
        # thread is, and never in threading's own code (which would print a traceback).
        try:
            try:
                outcome: tuple[bool, Any] = (True, self._function())
            except _Deadline:
                raise
            except BaseException as error:
                outcome = (False, error)
            with self._lock:
                if not self._stopped:  # stop() will not send anything now
                    self.outcome = outcome
                    self.finished.set()
                    return
            while True:  # stopped: the _Deadline on its way lands here
                time.sleep(0.01)
        except _Deadline:
            pass

    def stop(self) -> bool:
        """Stop the function if it is still running; False if it finished first."""
        with self._lock:
            if self.finished.is_set():
                return False
            self._stopped = True
            if self.ident is not None:
                _raise_in_thread(self.ident)
            return True


def _with_deadline(function: Callable[[], T], seconds: float) -> T:
    """``function()`` on a thread of its own, stopped at ``seconds`` (then ``_TimedOut``)."""
    worker = _Worker(function)
    worker.start()
    try:
        done = worker.finished.wait(seconds)
    except BaseException:  # Ctrl-C while waiting: the template stops too
        worker.stop()
        raise
    if not done and worker.stop():
        raise _TimedOut
    ok, value = worker.outcome
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


# ---------------------------------------------------------------------------- templates


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _template_line(error: BaseException) -> int:
    """The template line an error was raised at (jinja2 rewrites tracebacks to show them)."""
    line = getattr(error, "lineno", None)
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == "<template>":
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return line if isinstance(line, int) else 0


class ChatTemplate:
    """A model's chat template, compiled once (at load) and rendered under nbllm's limits."""

    def __init__(self, source: str, *, name: str, bos_token: str = "", eos_token: str = "") -> None:
        """Compile ``source``; ``ChatTemplateError`` naming ``name`` (the model file) if it does not."""
        self.name = name
        self._bos, self._eos = bos_token, eos_token
        self._warned: dict[Any, Any] = {}  # warnings' registry: each fallback reason once
        if len(source) > MAX_SOURCE_CHARS:
            raise ChatTemplateError(
                f"The chat template in {name} is {len(source):,} characters long; nbllm compiles templates of at "
                f"most {MAX_SOURCE_CHARS:,}. {_FIX}"
            )
        try:
            self._template = _with_deadline(lambda: _Sandbox().from_string(source), SECONDS)
        except _TimedOut:
            raise ChatTemplateError(
                f"The chat template in {name} did not compile within {SECONDS:g} s. {_FIX}"
            ) from None
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(
                f"The chat template in {name} does not compile: {_one_line(error.message)} (template line "
                f"{error.lineno}). {_FIX}"
            ) from None
        except Exception as error:  # Python's own compile refuses deep nesting, memory can run out...
            reason = error.msg if isinstance(error, SyntaxError) else str(error)
            raise ChatTemplateError(
                f"The chat template in {name} does not compile: {_one_line(reason) or type(error).__name__}. {_FIX}"
            ) from None

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt text; ``ChatTemplateError`` past a limit, the template's own error if it fails.

        ``tools`` (OpenAI tool dicts) go to templates that describe tools themselves."""
        conversation = [dict(message) for message in messages]
        # What the template may write grows with what it is given: the messages' text, their
        # tool calls and the tools' descriptions (JSON, maybe indented: counted twice over).
        given = sum(
            len(m.get("content") or "") + len(json.dumps(m.get("tool_calls") or "", default=str)) for m in conversation
        )
        given += len(json.dumps(list(tools), default=str)) if tools else 0
        allowance = ALLOWANCE + 2 * given + PER_MESSAGE * len(conversation)

        def render_here() -> str:
            _limits.chars = _limits.steps = allowance
            pieces, size = [], 0
            for piece in self._template.generate(
                messages=conversation,
                bos_token=self._bos,
                eos_token=self._eos,
                add_generation_prompt=True,
                raise_exception=_raise_exception,
                strftime_now=_strftime_now,
                functions=None,
                function_call=None,
                tools=[dict(tool) for tool in tools] if tools else None,
                tool_choice=None,
            ):
                size += len(piece)
                if size > allowance:
                    raise _LimitExceeded(f"would write a prompt of more than {allowance:,} characters")
                pieces.append(piece)
            return "".join(pieces)

        try:
            return _with_deadline(render_here, SECONDS)
        except _TimedOut:
            raise ChatTemplateError(
                f"The chat template in {self.name} did not finish within {SECONDS:g} s (nbllm's limit for "
                f"templates): it loops or works far too hard. {_FIX}"
            ) from None
        except _LimitExceeded as error:
            raise ChatTemplateError(f"The chat template in {self.name} {error}. {_FIX}") from None
        except MemoryError:
            raise ChatTemplateError(f"The chat template in {self.name} ran out of memory. {_FIX}") from None

    def format(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> FormattedPrompt:
        """The chat as this template writes it, or, if the template fails on it, as nbllm's plain
        transcript with a one-line warning (see the module docstring for why)."""
        try:
            text = self.render(messages, tools)
        except ChatTemplateError:
            raise
        except Exception as error:
            line = _template_line(error)
            reason = _one_line(error) or type(error).__name__
            if tools:  # the transcript would lose the tools, and the call format the grammar keeps
                raise ParameterError(
                    f"{self.name}'s chat template cannot write this conversation with tools: {reason}"
                ) from None
            warnings.warn_explicit(
                f"{self.name}'s chat template failed ({reason}); this chat is formatted as a plain transcript instead.",
                ChatTemplateWarning,
                f"<{self.name} chat template>",  # <...>: linecache reads no file of that name
                line,
                registry=self._warned,
            )
            return transcript(plain_turns(messages))
        stops = (self._eos,) if self._eos else ()
        # A chat answer is a message: blank space around it (Gemma often ends with a newline
        # before its end-of-turn token) is trimmed, as for the transcript format.
        return FormattedPrompt(text, stops, special=True, add_bos=False, trim_whitespace=True)
