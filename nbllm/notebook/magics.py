"""``%%llm`` and ``%llm``: the IPython front end of the engine.

A front end parses, calls, displays — nothing else. Every answer comes from
``nbllm.get_engine()``, the same path as ``nbllm.chat`` and the CLI, so caching, residency
and stats behave the same here. This module is imported only by ``%load_ext nbllm``.

Errors are translated at this edge: an ``NbllmError`` or a bad option becomes a
``UsageError``, which IPython shows as one line without a traceback (the jupysql pattern).
"""

from __future__ import annotations

import ast
import html
import json
import keyword
import re
import shlex
import sys
import threading
import time
import uuid
from argparse import Namespace
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any, Protocol, TypeVar

from IPython.core.displaypub import DisplayPublisher
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, argument_group, magic_arguments
from IPython.display import display
from traitlets import Bool, Enum, Float, Unicode
from traitlets.config import Configurable

import nbllm
from nbllm.engine.batching import BatchInterrupted
from nbllm.core.config import describe_settings, parse_assignment
from nbllm.engine.engine import Stream
from nbllm.core.errors import NbllmError, did_you_mean
from nbllm.core.metrics import RequestStats
from nbllm.core.params import resolve_params
from nbllm.core.table import Table
from nbllm.core.units import format_bytes

_F = TypeVar("_F", bound=Callable[..., Any])


class _Decorator(Protocol):
    def __call__(self, func: _F, /) -> _F: ...


# IPython's magic_arguments and display() carry no annotations; these typed names let
# mypy --strict check everything around them.
_magic_arguments: Callable[..., _Decorator] = magic_arguments
_argument: Callable[..., _Decorator] = argument
_argument_group: Callable[..., _Decorator] = argument_group
_display: Callable[..., Any] = display

FORMATS = ("markdown", "text", "code", "json", "html")
GENERATION_OPTIONS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
)

# ----------------------------------------------------------------- {name} in prompts

_FIELD = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[[^\[\]{}]+\])*"
_PLACEHOLDER = re.compile(r"\{\{(" + _FIELD + r")\}\}|\{(" + _FIELD + r")\}")
_ACCESS = re.compile(r"\.([A-Za-z_]\w*)|\[([^\[\]{}]+)\]")


class _Unresolved(Exception):
    pass


class AnswerInterrupted(KeyboardInterrupt):
    """Raised at the end of a ``%%llm`` cell that was interrupted, once its partial output is
    shown: the cell must still count as interrupted, so that a notebook's Run All stops there
    (a cell that returns normally lets the queued cells run). IPython shows the one line from
    ``_render_traceback_`` instead of a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    """Fill ``{name}``, ``{obj.attr}`` and ``{d[key]}`` from ``namespace``; leave other braces alone.

    Prompts often carry JSON or code, so anything that is not a simple reference to an
    existing variable stays as written; ``{{name}}`` is the escape for a literal ``{name}``.
    """

    def replace(match: re.Match[str]) -> str:
        escaped, reference = match.groups()
        if escaped is not None:
            return "{" + escaped + "}"
        try:
            return str(_resolve(reference, namespace))
        except _Unresolved:
            return match.group(0)

    return _PLACEHOLDER.sub(replace, text)


def _resolve(reference: str, namespace: Mapping[str, Any]) -> Any:
    name = re.match(r"[A-Za-z_]\w*", reference)
    assert name is not None  # the placeholder pattern starts with a name
    if name.group(0) not in namespace:
        raise _Unresolved
    value = namespace[name.group(0)]
    try:
        for attribute, key in _ACCESS.findall(reference[name.end() :]):
            value = getattr(value, attribute) if attribute else value[_index(key)]
    except Exception as error:  # whatever the object raises, the braces stay as written
        raise _Unresolved from error
    return value


def _index(key: str) -> Any:
    """``[0]`` and ``['a']`` are literals; a bare ``[a]`` is the string key, as in ``str.format``."""
    try:
        value = ast.literal_eval(key.strip())
    except (ValueError, SyntaxError):
        return key.strip()
    if isinstance(value, (int, str)):
        return value
    raise _Unresolved


# ----------------------------------------------------------------- rendering an answer

_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The first fenced code block of ``text`` (an unclosed one runs to the end), else all of it."""
    match = _FENCE.search(text)
    code = match.group(1) if match else text
    return code.strip("\n")


def render_answer(text: str, fmt: str) -> tuple[dict[str, Any], str | None]:
    """The answer as a MIME bundle in ``fmt``, and a note when it could not be rendered so."""
    if fmt in ("markdown", "code"):
        return {"text/markdown": text, "text/plain": text}, None
    if fmt == "html":
        return {"text/html": text, "text/plain": text}, None
    if fmt == "json":
        try:
            value = json.loads(extract_code(text) if "```" in text else text)
        except ValueError as error:
            return {"text/plain": text}, f"not valid JSON ({error}), shown as text"
        return {"application/json": value, "text/plain": json.dumps(value, indent=2, ensure_ascii=False)}, None
    return {"text/plain": text}, None


def _live_bundle(text: str, fmt: str) -> dict[str, Any]:
    # Half an HTML or JSON document renders badly; Markdown degrades gracefully while it grows.
    if fmt in ("markdown", "code"):
        return {"text/markdown": text, "text/plain": text}
    return {"text/plain": text}


def _status_bundle(line: str) -> dict[str, Any]:
    return {
        "text/html": f'<div style="color: #888; font-size: 0.85em;">{html.escape(line)}</div>',
        "text/plain": line,
    }


def stats_line(stats: RequestStats | None, stopped: bool, note: str | None = None) -> str:
    """``Generated 256 tokens in 12.5s (20.5 t/s) · model X · ...``, marked when it was stopped."""
    line = "Stopped before the first token" if stats is None else stats.details()
    if stopped and stats is not None:
        line = f"[stopped] {line}"
    return f"{line} · {note}" if note else line


def provenance(stream: Stream, fmt: str, stopped: bool) -> dict[str, Any]:
    """What produced this output, kept in its metadata: enough to reproduce or audit it."""
    stats = stream.stats
    request = stream.request
    parameters = request.params.as_dict()
    if stats is not None:
        parameters["seed"] = stats.seed  # the one actually used, drawn when none was given
    return {
        "version": nbllm.__version__,
        "model": stats.model if stats is not None else request.model,
        "model_sha256": stats.model_hash if stats is not None else None,
        "mode": "completion" if request.prompt is not None else "chat",
        "parameters": parameters,
        "stats": stats.as_dict() if stats is not None else None,
        "cached": bool(stats is not None and stats.cached),
        "stopped": stopped,
        "format": fmt,
    }


class _LiveOutput:
    """The cell's output while an answer streams: redrawn at most ``rate`` times a second.

    Each redraw sends the whole text so far, so the rate bounds the cost of long answers.
    A plain terminal shell cannot redraw an output: there the pieces are printed as they come.
    """

    def __init__(self, shell: InteractiveShell, fmt: str, rate: float, show_stats: bool) -> None:
        self.fmt = fmt
        self.interval = 1.0 / rate if rate > 0 else None  # None: no redraws, only the final answer
        self.show_stats = show_stats
        self.redraws = type(shell.display_pub) is not DisplayPublisher
        self.answer_id = uuid.uuid4().hex
        self.status_id = uuid.uuid4().hex
        self._last = float("-inf")
        self._printed = 0

    def start(self) -> None:
        if self.redraws:
            _display({"text/plain": ""}, raw=True, display_id=self.answer_id)
            self._show_status("Waiting for the first token…", update=False)

    def refresh(self, stream: Stream) -> None:
        if not self.redraws:
            self._print_new_pieces(stream)
            return
        now = time.monotonic()
        if self.interval is None or now - self._last < self.interval:
            return
        self._last = now
        _display(_live_bundle(stream.text, self.fmt), raw=True, display_id=self.answer_id, update=True)
        elapsed = time.perf_counter() - (stream.started or time.perf_counter())
        tokens = stream.tokens
        self._show_status(f"Generating… {tokens} token{'' if tokens == 1 else 's'}, {elapsed:.1f}s")

    def finish(self, stream: Stream, bundle: dict[str, Any], metadata: dict[str, Any], status: str) -> None:
        if not self.redraws:
            self._print_new_pieces(stream)
            print()
            if self.show_stats:
                print(status)
            return
        _display(bundle, raw=True, display_id=self.answer_id, update=True, metadata=metadata)
        self._show_status(status)

    def fail(self, message: str) -> None:
        if self.redraws:
            self._show_status(message)

    def _show_status(self, line: str, update: bool = True) -> None:
        if self.show_stats:
            _display(_status_bundle(line), raw=True, display_id=self.status_id, update=update)

    def _print_new_pieces(self, stream: Stream) -> None:
        new = stream.pieces[self._printed :]
        self._printed += len(new)
        sys.stdout.write("".join(new))
        sys.stdout.flush()


# ----------------------------------------------------------------- reports for %llm stats / health


class Report:
    """A few tables shown together: text in a terminal, HTML in a notebook; ``data`` is the raw dict."""

    def __init__(self, tables: Sequence[Table], data: Mapping[str, Any]) -> None:
        self.tables = list(tables)
        self.data = dict(data)

    def __repr__(self) -> str:
        return "\n\n".join(str(table) for table in self.tables if table)

    def _repr_html_(self) -> str:
        return "".join(table._repr_html_() for table in self.tables if table)


def _rows(pairs: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [{"what": what, "value": value} for what, value in pairs]


def _seconds(value: float) -> str:
    return f"{value:.2f}s"


def stats_report(data: Mapping[str, Any]) -> Report:
    """``nbllm.stats()`` as three short tables and the last request's line."""
    cache = data["cache"]
    cache_state = "on" if cache["enabled"] else f"off ({cache['disabled_reason'] or 'cache.enabled is false'})"
    overview = Table(
        _rows(
            [
                (
                    "requests",
                    f"{data['requests']} ({data['completed']} completed, {data['cancelled']} stopped, "
                    f"{data['errors']} failed)",
                ),
                (
                    "tokens",
                    f"{data['prompt_tokens']} prompt ({data['reused_prompt_tokens']} reused), "
                    f"{data['completion_tokens']} generated",
                ),
                (
                    "model loads",
                    f"{data['model_loads']} in {_seconds(data['model_load_seconds'])}, {data['evictions']} evictions",
                ),
                (
                    "prompt cache",
                    f"{cache_state}: {data['prompt_cache_hits']} hits, {data['prompt_cache_misses']} misses, "
                    f"{cache['entries']}/{cache['max_entries']} entries, {format_bytes(cache['bytes_on_disk'])}",
                ),
                (
                    "KV prefix snapshots",
                    f"{cache['prefix_snapshots']}, {format_bytes(cache['prefix_snapshot_bytes'])}",
                ),
                (
                    "time saved",
                    f"{_seconds(data['time_saved_seconds'])} (prompt cache "
                    f"{_seconds(data['prompt_cache_seconds_saved'])}, prefix reuse "
                    f"{_seconds(data['prefix_seconds_saved'])})",
                ),
                ("uptime", _seconds(data["uptime_seconds"])),
            ]
        ),
        title="nbllm stats",
    )
    per_model = Table(
        [{"model": name, **totals} for name, totals in data["per_model"].items()],
        columns=["model", "requests", "prompt_tokens", "completion_tokens", "tokens_per_second"],
        title="Per model",
    )
    last = data["last_request"]
    last_table = Table(_rows([("last request", _last_request_line(last))]) if last else [], title="Last request")
    return Report([overview, per_model, last_table], data)


def _last_request_line(last: Mapping[str, Any]) -> str:
    names = {f.name for f in fields(RequestStats)}
    return RequestStats(**{k: v for k, v in last.items() if k in names}).details()


def health_report(data: Mapping[str, Any]) -> Report:
    """``nbllm.health()`` as an overview and a table of the loaded models."""
    overview = Table(
        _rows(
            [
                ("status", data["status"]),
                ("default model", data["default_model"]),
                ("models loaded", data["model_cache"]),
                (
                    "memory available",
                    f"{format_bytes(data['memory_available_bytes'])} of {format_bytes(data['memory_total_bytes'])}",
                ),
                ("config", data["config_source"]),
            ]
        ),
        title="nbllm health",
    )
    models = Table(
        data["resident_models"],
        columns=[
            "name",
            "architecture",
            "quantization",
            "context_size",
            "threads",
            "gpu_layers",
            "memory_bytes",
            "busy",
        ],
        formatters={"memory_bytes": format_bytes},
        title="Loaded models",
    )
    return Report([overview, models], data)


def settings_table(settings: nbllm.Settings) -> Table:
    rows = [{"key": key, "value": value, "help": help_text} for key, value, help_text in describe_settings(settings)]
    return Table(rows, columns=["key", "value", "help"], title=f"Settings from {settings.source}")


# ----------------------------------------------------------------- the magics


@magics_class
class NbllmMagics(Magics, Configurable):
    """``%%llm`` and ``%llm``. Settings: ``%config NbllmMagics`` or ``c.NbllmMagics`` in ipython_config.py."""

    default_model = Unicode(
        None,
        allow_none=True,
        help="Model used by %%llm when --model is not given; None uses nbllm's configured default_model.",
    ).tag(config=True)
    default_format = Enum(FORMATS, default_value="markdown", help="How answers are rendered without --format.").tag(
        config=True
    )
    stream_updates_per_second = Float(
        10.0, min=0.0, help="Redraws of a streaming answer per second at most; 0 shows it once complete."
    ).tag(config=True)
    show_stats = Bool(True, help="Show the stats line (tokens, time, t/s, model) under each answer.").tag(config=True)
    interpolate = Bool(True, help="Fill {name}, {obj.attr} and {d[key]} in prompts from the notebook's variables.").tag(
        config=True
    )

    @classmethod
    def usage(cls) -> str:
        """The full usage: what ``%llm?``, ``%llm help`` and ``%%llm --help`` show."""
        # magic_arguments writes the usage as reStructuredText: a "::" literal-block marker first.
        return str(cls.__dict__["llm"].__doc__).removeprefix("::").lstrip("\n")

    @classmethod
    def option_parser(cls) -> Any:
        """The ``%%llm`` options parser that ``magic_arguments`` built (untyped in IPython)."""
        return cls.__dict__["llm"].parser

    @property
    def ipython(self) -> InteractiveShell:
        assert self.shell is not None, "NbllmMagics is created with a shell"
        return self.shell

    def __init__(self, shell: InteractiveShell) -> None:
        # Magics.__init__ makes the shell the parent (so its config applies) and adds this
        # object to shell.configurables (so %config finds it).
        super().__init__(shell=shell)
        self.history: list[dict[str, str]] = []  # the --chat conversation, without its system prompt
        self.system_prompt: str | None = None  # the --chat conversation's system prompt
        self.chat_panel: Any = None  # the panel %llm chat opened last, to reach it from code

    @no_var_expand  # {name} is filled by our own rules (see interpolate), or not at all
    @line_cell_magic
    @_magic_arguments(name="%llm")  # the usage line then reads %%llm
    @_argument_group("Answer")
    @_argument("--model", "-m", help="model name or .gguf path (default: NbllmMagics.default_model)")
    @_argument("--system", "-s", help="system prompt (kept for the conversation with --chat)")
    @_argument("--format", "-f", choices=FORMATS, metavar="FORMAT", help="markdown (default), text, code, json or html")
    @_argument("--out", "-o", metavar="NAME", help="also store the answer's text in the variable NAME")
    @_argument("--chat", action="store_true", help="continue the conversation of earlier --chat cells")
    @_argument("--raw", action="store_true", help="continue the text as a plain completion instead of chatting")
    @_argument("--no-cache", action="store_true", help="neither use nor fill the prompt cache")
    @_argument("--no-interpolate", action="store_true", help="send {braces} as written")
    @_argument(
        "--map",
        metavar="NAME",
        help="run the prompt once per element of the list / pandas Series / DataFrame NAME ({item}, {row.column}), "
        "batched; answers go to --out (a list or Series; a DataFrame gets a new --column)",
    )
    @_argument("--column", metavar="COL", default="answer", help="with --map over a DataFrame: the new column (answer)")
    @_argument_group("Generation (defaults from the config's generation section)")
    @_argument("--temperature", "-t", type=float, help="sampling temperature; 0 = greedy")
    @_argument("--top-p", type=float, help="nucleus sampling threshold")
    @_argument("--top-k", type=int, help="sample among the k most likely tokens")
    @_argument("--min-p", type=float, help="drop tokens below this fraction of the best one")
    @_argument("--max-tokens", "-n", type=int, help="tokens to generate at most")
    @_argument("--repeat-penalty", type=float, help="penalty for repeated tokens; 1 = off")
    @_argument("--presence-penalty", type=float, help="penalty for tokens already present")
    @_argument("--frequency-penalty", type=float, help="penalty growing with token frequency")
    @_argument("--seed", type=int, help="random seed, for a reproducible answer")
    @_argument("--stop", action="append", metavar="TEXT", help="stop before TEXT (repeatable)")
    def llm(self, line: str, cell: str | None = None) -> Any:
        """Ask a local GGUF model in a cell, or manage the models with a subcommand.

        %%llm [options]
        The cell body is the prompt. The answer streams into the output as it is
        produced, is then rendered in --format (markdown, text, code, json, html) and
        followed by a stats line: tokens, time, t/s, model, first token, cache.
          --format code also puts the first fenced code block (else the whole
            answer) into a new cell below.
          --chat keeps a conversation across cells; %llm reset forgets it.
          {name}, {obj.attr} and {d[key]} in the prompt and the options are filled
            from the notebook's variables. Braces that name no variable stay as
            written, so JSON and code survive; {{name}} is a literal {name};
            --no-interpolate sends everything as written.
          Interrupting the kernel stops the answer within a token: what was produced
            stays visible, marked [stopped], and nothing is cached; the cell still ends
            as interrupted, so a Run All stops there.
          The output's metadata ("nbllm") records the model, its file's SHA-256,
            the parameters with the seed used, and the stats.

        Examples:
          %%llm -t 0.2 -n 200 --seed 1
          What is Docker? Answer in two sentences.

          %%llm --chat --system "You are terse." --out summary
          Summarize: {report}

          %%llm --format code
          Write a Python function that reverses a string.

        %llm SUBCOMMAND
          help              this text (also %llm?)
          models            known models: loaded or not, size, last use
          load [NAME]       load a model now (default: the default model)
          unload [NAME]     unload a model; without NAME, every model
          use NAME          make NAME the default model of %%llm and of nbllm
          stats             requests, tokens, speed and caches since the kernel started
          clear-cache       empty the prompt cache and the KV prefix snapshots
          health            loaded models with their settings and memory
          config            the settings in effect, with their help
          config KEY=VALUE  change a setting, e.g. %llm config generation.top_k=20
          reset             forget the --chat conversation
          chat [NAME]       open the chat panel (on NAME, else the default model)
          models [list|recommend|download NAME [--quant Q]|verify [NAME]|info NAME|rm NAME]
                            the model manager (no word: the list)
          bench [OPTIONS]   llama-bench-style speed tests, as `nbllm bench` (-m, -p, -n, -r, -t 1,2, -o FILE)
          doctor [NAME]     hardware report, problems found and how to fix them
          tune [NAME]       measure the fastest threads / batch size / GPU layers, and keep them

        Settings: %config NbllmMagics (or c.NbllmMagics.NAME in ipython_config.py):
          default_model, default_format, stream_updates_per_second, show_stats,
          interpolate.
        """
        try:
            if cell is None:
                return self._subcommand(line)
            self._ask(line, cell)
            return None
        except NbllmError as error:
            raise UsageError(str(error)) from None
        except AnswerInterrupted:
            raise
        except KeyboardInterrupt:  # before an answer started (loading a model...), or a subcommand
            if cell is None:
                raise AnswerInterrupted(f"Interrupted: %llm {line.strip()}") from None
            raise AnswerInterrupted("Interrupted before any answer was shown; nothing was cached.") from None

    # ------------------------------------------------------------- %%llm

    def _ask(self, line: str, cell: str) -> None:
        args = self._parse_options(line)
        if args is None:  # -h / --help
            print(self.usage())
            return
        self._check_options(args)
        if args.map:
            self._map(args, cell)
            return
        if self.interpolate and not args.no_interpolate:
            cell = interpolate(cell, self.ipython.user_ns)
        prompt = cell.strip("\n") if args.raw else cell.strip()
        if not prompt.strip():
            raise UsageError("The cell is empty: write the prompt in the cell, below the %%llm line.")
        fmt = args.format or self.default_format
        stream = self._start(args, prompt)
        live = _LiveOutput(self.ipython, fmt, self.stream_updates_per_second, self.show_stats)
        stopped = self._consume(stream, live)
        text = stream.text
        if args.chat and text:  # a question stopped before any answer leaves no trace
            self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        if args.out:
            self.ipython.user_ns[args.out] = text
        bundle, note = render_answer(text, fmt)
        metadata = {"nbllm": provenance(stream, fmt, stopped)}
        live.finish(stream, bundle, metadata, stats_line(stream.stats, stopped, note))
        if fmt == "code" and text.strip() and not stopped:
            self.ipython.set_next_input(extract_code(text), replace=False)
        if stopped:
            raise AnswerInterrupted("Interrupted: the answer so far stays above; nothing was cached.")

    def _parse_options(self, line: str) -> Namespace | None:
        try:
            tokens = shlex.split(line)
        except ValueError as error:
            raise UsageError(f"Cannot read the options {line.strip()!r}: {error}.") from None
        if "-h" in tokens or "--help" in tokens:
            return None
        if self.interpolate and "--no-interpolate" not in tokens:
            # Each option's value, numbers included (-n {budget}), filled before parsing.
            tokens = [interpolate(token, self.ipython.user_ns) for token in tokens]
        parser = self.option_parser()
        args, extra = parser.parse_known_args(tokens)
        if extra:
            raise UsageError(_unrecognized(extra, parser))
        return args  # type: ignore[no-any-return]  # argparse's Namespace, through an untyped parser

    @staticmethod
    def _check_options(args: Namespace) -> None:
        if args.raw and args.chat:
            raise UsageError("--raw continues text and --chat continues a conversation: use one or the other.")
        if args.raw and args.system:
            raise UsageError("--system applies to a chat; with --raw, write the instructions into the text itself.")
        if args.out is not None and (not args.out.isidentifier() or keyword.iskeyword(args.out)):
            raise UsageError(f"--out {args.out!r} is not a valid variable name.")

    def _start(self, args: Namespace, prompt: str) -> Stream:
        engine = nbllm.get_engine()
        model = args.model or self.default_model
        params = {name: getattr(args, name) for name in GENERATION_OPTIONS if getattr(args, name) is not None}
        cache = not args.no_cache
        if args.raw:
            stream: Stream = engine.generate(prompt, model=model, stream=True, cache=cache, **params)
            return stream
        stream = engine.chat(self._messages(args, prompt), model=model, stream=True, cache=cache, **params)
        return stream

    def _map(self, args: Namespace, cell: str) -> None:
        """``--map NAME``: the prompt once per element, answered together (generate_many)."""
        from nbllm.core.mapping import answers_into, prompts_for

        if args.chat:
            raise UsageError("--map and --chat do not go together: each element is its own conversation.")
        namespace = self.ipython.user_ns
        if args.map not in namespace:
            raise UsageError(f"--map {args.map}: no variable {args.map!r} in this notebook.")
        data = namespace[args.map]
        # --no-interpolate leaves the notebook's names alone; the element's own ({item},
        # {row.column}, {index}) are what --map is for, so they are always filled.
        names = namespace if self.interpolate and not args.no_interpolate else {}
        prompts = prompts_for(data, cell.strip(), names, interpolate_text=interpolate)
        engine = nbllm.get_engine()
        model = args.model or self.default_model
        params = {name: getattr(args, name) for name in GENERATION_OPTIONS if getattr(args, name) is not None}
        engine.registry.resolve(model)  # mistakes are one line, before the chart appears
        resolve_params(engine.settings.generation, params)
        chart = _AggregateChart(engine, model) if prompts else None
        try:
            if args.raw:
                results = engine.generate_many(prompts, model, cache=not args.no_cache, **params)
            else:
                system = [{"role": "system", "content": args.system}] if args.system else []
                chats = [[*system, {"role": "user", "content": p}] for p in prompts]
                results = engine.chat_many(chats, model, cache=not args.no_cache, **params)
            stopped = False
        except BatchInterrupted as interrupted:
            results, stopped = interrupted.results, True
        finally:
            if chart is not None:
                chart.close()
        target = args.out or (args.map if _is_dataframe(data) else "answers")
        namespace[target] = answers_into(data, results, args.column)
        _display(_map_summary(results, target, stopped), raw=True)
        if stopped:
            raise AnswerInterrupted(f"Interrupted: the answers that finished are in {target!r}; the others are None.")

    def _messages(self, args: Namespace, prompt: str) -> list[dict[str, str]]:
        system = args.system
        history: list[dict[str, str]] = []
        if args.chat:
            if system is not None:
                self.system_prompt = system
            system = self.system_prompt
            history = self.history
        head = [{"role": "system", "content": system}] if system else []
        return [*head, *history, {"role": "user", "content": prompt}]

    @staticmethod
    def _consume(stream: Stream, live: _LiveOutput) -> bool:
        """Show the stream as it grows; True when the user interrupted it (Ctrl-C, kernel interrupt)."""
        live.start()
        try:
            for _ in stream:
                live.refresh(stream)
        except KeyboardInterrupt:
            # The engine has stopped at the current token, freed the model and cached nothing;
            # what was produced is worth keeping on screen.
            return True
        except NbllmError as error:
            live.fail(f"Failed: {error}")
            raise
        finally:
            stream.close()
        return False

    # ------------------------------------------------------------- %llm SUBCOMMAND

    def _subcommand(self, line: str) -> Any:
        line = interpolate(line, self.ipython.user_ns) if self.interpolate else line
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        handlers = {
            "help": self._help,
            "models": self._models,
            "load": self._load,
            "unload": self._unload,
            "use": self._use,
            "stats": self._stats,
            "clear-cache": self._clear_cache,
            "health": self._health,
            "config": self._config,
            "reset": self._reset,
            "chat": self._chat,
            "bench": self._bench,
            "doctor": self._doctor,
            "tune": self._tune,
        }
        if not name:
            return self._help(rest)
        if name not in handlers:
            raise UsageError(
                f"Unknown subcommand {name!r}.{did_you_mean(name, handlers)} Subcommands: {', '.join(handlers)}. "
                "To ask a model, put the prompt in a %%llm cell. %llm? shows the usage."
            )
        return handlers[name](rest)

    def _help(self, rest: str) -> None:
        print(self.usage())

    def _models(self, rest: str) -> Any:
        from nbllm.cli.models import models_command

        return models_command(_words(rest))  # no words: the list; mistakes: NbllmError -> UsageError

    def _bench(self, rest: str) -> Any:
        """The terminal's ``nbllm bench`` options; results as a table, plus a figure when several."""
        from nbllm.cli.main import bench_with_args, build_parser, check_bench_args

        args = _parse_cli(build_parser(), ["bench", *_words(rest)])
        if args.compare:
            from nbllm.measure.bench import compare, load_results

            return compare(*(load_results(path) for path in args.compare))
        from nbllm.notebook.plots import bench_figure, live_bench_chart, threads_figure

        check_bench_args(args)  # a mistake is one line, before a chart or a progress bar appears
        live, on_run = live_bench_chart()
        _display_widget(live, "live benchmark chart")
        results = bench_with_args(args, on_run=on_run)
        _show_figure(bench_figure(results.records))
        if len({r["settings"]["threads"] for r in results.records}) > 1:
            _show_figure(threads_figure(results.records))
        if args.output:
            print(f"Saved {len(results.records)} records to {results.save(args.output)}")
        return results

    def _doctor(self, rest: str) -> Any:
        return nbllm.doctor(_one_name("doctor", rest))

    def _tune(self, rest: str) -> Any:
        result = nbllm.tune(_one_name("tune", rest) or self.default_model)
        _show_figure(result.figure())
        return result

    def _load(self, rest: str) -> Table:
        return nbllm.load(_one_name("load", rest) or self.default_model)

    def _unload(self, rest: str) -> None:
        name = _one_name("unload", rest)
        if name is None:
            nbllm.unload()
            print("Unloaded every model.")
        elif nbllm.unload(name):
            print(f"Unloaded {name}.")
        else:
            print(f"{name} was not loaded.")

    def _use(self, rest: str) -> None:
        name = _one_name("use", rest)
        if name is None:
            raise UsageError("Name the model: %llm use NAME (see %llm models).")
        spec = nbllm.get_engine().registry.resolve(name)  # an unknown name fails here, with a suggestion
        nbllm.configure(default_model=name)
        self.default_model = name
        print(f"Default model: {spec.name} ({spec.path})")

    def _stats(self, rest: str) -> Report:
        _no_arguments("stats", rest)
        return stats_report(nbllm.stats())

    def _clear_cache(self, rest: str) -> None:
        _no_arguments("clear-cache", rest)
        nbllm.clear_cache()
        print("Cleared the prompt cache and the KV prefix snapshots.")

    def _health(self, rest: str) -> Report:
        _no_arguments("health", rest)
        return health_report(nbllm.health())

    def _config(self, rest: str) -> Table | None:
        if not rest:
            return settings_table(nbllm.settings())
        overrides = parse_assignment(rest)
        settings = nbllm.configure(overrides)
        if "default_model" in overrides:
            self.default_model = settings.default_model  # one default for %%llm and nbllm
        key = rest.partition("=")[0].strip()
        for row_key, value, _help in describe_settings(settings):
            if row_key == key or row_key.startswith(f"{key}."):
                print(f"{row_key} = {value!r}")
        return None

    def _reset(self, rest: str) -> None:
        _no_arguments("reset", rest)
        forgotten = len(self.history)
        self.history.clear()
        self.system_prompt = None
        print(f"Forgot the conversation ({forgotten} messages).")

    def _chat(self, rest: str) -> None:
        model = _one_name("chat", rest) or self.default_model
        try:
            panel = nbllm.ChatPanel(model=model)
        except ImportError as error:
            raise UsageError(
                f"The chat panel cannot start: {error}. It needs ipywidgets (pip install ipywidgets)."
            ) from None
        self.chat_panel = panel
        _display(panel)


def _is_dataframe(data: Any) -> bool:
    return hasattr(data, "iterrows") and hasattr(data, "columns")


class _AggregateChart:
    """Aggregate tokens/s of a --map run, drawn live (polled: the batch loop stays untouched)."""

    def __init__(self, engine: Any, model: str | None) -> None:
        from nbllm.notebook.plots import live_throughput_figure

        self._engine, self._model = engine, model
        self.figure, self._update = live_throughput_figure("tokens/s, all prompts together")
        self._done = threading.Event()
        _display_widget(self.figure, "live tokens/s chart")
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        started = time.perf_counter()
        last_tokens, last_time = 0, started
        while not self._done.wait(0.25):
            progress = self._engine.batches.progress(self._model)
            if progress is None:
                continue
            now = time.perf_counter()
            rate = (progress.tokens - last_tokens) / (now - last_time) if progress.tokens >= last_tokens else 0.0
            last_tokens, last_time = progress.tokens, now
            self._update(now - started, rate)

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=2)


def _map_summary(results: Sequence[Any], target: str, stopped: bool) -> dict[str, str]:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    cached = sum(1 for r in ok if r.stats and r.stats.cached)
    # Speed counts what was generated now: answers from the prompt cache took no decoding.
    generated = [r.stats for r in ok if r.stats and not r.stats.cached]
    tokens = sum(s.completion_tokens for s in generated)
    seconds = max((s.total_seconds for s in generated), default=0.0)
    speed = f"{tokens} tokens in {seconds:.2f}s ({tokens / seconds if seconds else 0:.1f} t/s together)"
    how = ", ".join(([speed] if generated else []) + ([f"{cached} from the prompt cache"] if cached else []))
    lines = [
        f"{'[stopped] ' if stopped else ''}Answered {len(ok)} of {len(results)} prompts into {target!r}"
        + (f": {how}" if how else "")
    ]
    for result in failed[:5]:
        lines.append(f"  #{result.index}: {result.error}")
    if len(failed) > 5:
        lines.append(f"  ... and {len(failed) - 5} more failed")
    text = "\n".join(lines)
    return {"text/plain": text, "text/html": f"<pre style='color:#6b7280'>{html.escape(text)}</pre>"}


def _display_widget(widget: Any, label: str) -> None:
    """A widget, with a one-line text form: a terminal IPython shows ``<label>`` instead of the
    widget's repr (a plotly FigureWidget's runs to dozens of lines of figure data)."""
    bundle = dict(widget._repr_mimebundle_())
    bundle["text/plain"] = f"<{label}>"
    _display(bundle, raw=True)


def _show_figure(figure: Any) -> None:
    """A plotly figure as its own MIME type, whatever plotly's renderer setting says (in a plain
    IPython shell it may be "browser", which would open a web browser from a magic)."""
    title = figure.layout.title.text or "plotly figure"
    _display({"application/vnd.plotly.v1+json": json.loads(figure.to_json()), "text/plain": f"<{title}>"}, raw=True)


def _words(rest: str) -> list[str]:
    try:
        return shlex.split(rest)
    except ValueError as error:
        raise UsageError(f"Cannot read {rest!r}: {error}.") from None


def _parse_cli(parser: Any, argv: list[str]) -> Namespace:
    """The terminal's own parser, with its complaints turned into a one-line UsageError."""
    import contextlib
    import io

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args: Namespace = parser.parse_args(argv)
    except SystemExit:
        message = errors.getvalue().strip().splitlines()
        raise UsageError(message[-1] if message else "Invalid options; %llm? shows the usage.") from None
    return args


def _unrecognized(extra: Sequence[str], parser: Any) -> str:
    """argparse's message, plus a suggestion for a misspelt option and a hint for stray words."""
    message = f"unrecognized arguments: {' '.join(extra)}."
    options = [option for action in parser._actions for option in action.option_strings]
    misspelt = next((token for token in extra if token.startswith("-")), None)
    if misspelt is not None:
        return message + did_you_mean(misspelt.partition("=")[0], options) + " %llm? lists the options."
    return message + " The prompt goes in the cell body, below the %%llm line."


def _no_arguments(subcommand: str, rest: str) -> None:
    if rest:
        raise UsageError(f"%llm {subcommand} takes no arguments, got {rest!r}.")


def _one_name(subcommand: str, rest: str) -> str | None:
    try:
        words = shlex.split(rest)
    except ValueError as error:
        raise UsageError(f"Cannot read {rest!r}: {error}.") from None
    if len(words) > 1:
        raise UsageError(f"%llm {subcommand} takes one model name, got {len(words)}: {rest!r}.")
    return words[0] if words else None


# ----------------------------------------------------------------- the extension


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """Register ``%llm`` / ``%%llm`` (``%load_ext nbllm`` calls this through ``nbllm``)."""
    ipython.register_magics(NbllmMagics(ipython))


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """Remove the magics and their settings object, so ``%reload_ext nbllm`` starts clean."""
    manager = ipython.magics_manager
    magics = manager.registry.pop(NbllmMagics.__name__, None)
    for kind in ("line", "cell"):
        manager.magics[kind].pop("llm", None)
    if magics is not None and magics in ipython.configurables:
        ipython.configurables.remove(magics)
