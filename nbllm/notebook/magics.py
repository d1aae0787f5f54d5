"""``%%llm`` and ``%llm``: the IPython front end of the engine.

A front end parses, calls, displays — nothing else. Every answer comes from
``nbllm.get_engine()``, the same path as ``nbllm.chat`` and the CLI, so caching, residency
and stats behave the same here. This module is imported only by ``%load_ext nbllm``.

Errors are translated at this edge: an ``NbllmError`` or a bad option becomes a
``UsageError``, which IPython shows as one line without a traceback (the jupysql pattern).
The work is done beside it: ``parsers`` (the options), ``interpolation`` ({name} in prompts),
``live_output`` (the streamed answer), ``map_cell`` (--map), ``subcommands`` (%llm SUBCOMMAND)
and ``reports`` (what stats, health and config show).
"""

from __future__ import annotations

import sys
from argparse import Namespace
from typing import Any

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from traitlets import Bool, Enum, Float, Int, Unicode
from traitlets.config import Configurable

import nbllm
from nbllm.core.errors import NbllmError
from nbllm.engine import Stream
from nbllm.engine.request import Request
from nbllm.notebook.cell_context import explain_prompt, last_error, previous_cells, with_context
from nbllm.notebook.display import display
from nbllm.notebook.interpolation import MAX_VALUE_CHARS, interpolate
from nbllm.notebook.live_output import (
    AnswerInterrupted,
    LiveOutput,
    answer_code,
    consume,
    extract_code,
    provenance,
    render_answer,
    stats_line,
)
from nbllm.notebook.map_cell import run_map_cell
from nbllm.notebook.parsers import (
    FORMATS,
    CellOptionParser,
    check_options,
    documents_named,
    generation_params,
    llm_options,
    structure_params,
)
from nbllm.notebook.reports import sources_bundle, tool_runs_bundle
from nbllm.notebook.subcommands import run_subcommand


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
    max_interpolated_chars = Int(
        MAX_VALUE_CHARS,
        min=0,
        help="Longest text one {name} may put into a prompt; a longer one is cut, with a note. 0: no limit.",
    ).tag(config=True)

    @classmethod
    def usage(cls) -> str:
        """The full usage: what ``%llm?``, ``%llm help`` and ``%%llm --help`` show."""
        # The help is written as reStructuredText: a "::" literal-block marker first.
        return str(cls.__dict__["llm"].__doc__).removeprefix("::").lstrip("\n")

    @classmethod
    def option_parser(cls) -> CellOptionParser:
        """The ``%%llm`` options parser (``parsers.llm_options`` built it from ``llm``'s docstring)."""
        parser: CellOptionParser = cls.__dict__["llm"].parser
        return parser

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
        self.last_request: Request | None = None  # what the last %%llm sent: model, messages, parameters

    @no_var_expand  # {name} is filled by our own rules (see interpolate), or not at all
    @line_cell_magic
    @llm_options  # the options (parsers.py); the usage line reads %%llm
    def llm(self, line: str, cell: str | None = None) -> Any:
        """Ask a local GGUF model in a cell, or manage the models with a subcommand.

        %%llm [options]
        The cell body is the prompt. The answer streams into the output as it is
        produced, is then rendered in --format (markdown, text, code, json, html) and
        followed by a stats line: tokens, time, t/s, model, first token, cache.
          Single newlines stay line breaks (lists and poems keep their lines).
          --format code shows the answer as code and also puts the first fenced code
            block (else the whole answer) into a new cell below. Each code block of
            an answer gets Copy and "Insert as new cell" buttons.
          An answer cut at the token limit (-n) ends with a note saying so, in the
            output and in the inserted cell; --out keeps the answer as written.
          --context N puts the source of the previous N code cells (not the %%llm
            ones) before the prompt, newest kept first when they are long.
          --schema NAME answers as data that fits NAME (a pydantic class or a JSON
            Schema dict from the notebook; 'json' for any JSON object), guaranteed
            by a grammar; --out keeps the data. --choices a,b,c answers with exactly
            one of them. --format json is JSON mode. With --map, one typed column
            per field.
          --chat keeps a conversation across cells; %llm reset forgets it.
          {name}, {obj.attr} and {d[key]} in the prompt and the options are filled
            from the notebook's variables. Braces that name no variable stay as
            written, so JSON and code survive; {{name}} is a literal {name};
            --no-interpolate sends everything as written. A pandas DataFrame or
            Series becomes a summary (shape, dtypes, first 5 rows); an object with
            an _llm_repr_() method is described by it; a value longer than
            max_interpolated_chars (20,000) is cut, with a note.
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

          %%llm --schema Person --out person
          Invent a person who lives in Lima.

          %%llm --map reviews --choices positive,negative,neutral
          Is this review positive, negative or neutral? {item}

          %%llm --context 3
          Why is my loop above so slow?

          %%llm
          Which columns of {sales} could hold dates?

        %llm SUBCOMMAND
          help              this text (also %llm?)
          models            known models: loaded or not, size, last use
          load [NAME]       load a model now (default: the default model)
          unload [NAME]     unload a model; without NAME, every model
          use NAME          make NAME the default model of %%llm and of nbllm
          stats             requests, tokens, speed and caches since the kernel started
          history [OPTIONS] past answers, newest first (--model M, --search TEXT, --since 2d,
                            --origin magic, -n N; --clear deletes them all)
          clear-cache       empty the prompt cache and the KV prefix snapshots
          health            loaded models with their settings and memory
          config            the settings in effect, with their help
          config KEY=VALUE  change a setting, e.g. %llm config generation.top_k=20
          reset             forget the --chat conversation
          chat [NAME]       open the chat panel (on NAME, else the default model)
          explain [OPTIONS] explain the last exception, with the code of the cells
                            that raised it (options as %%llm: -m, -n, -t...)
          models [list|recommend|download NAME [--quant Q]|verify [NAME]|info NAME|rm NAME]
                            the model manager (no word: the list)
          bench [OPTIONS]   llama-bench-style speed tests, as `nbllm bench` (-m, -p, -n, -r, -t 1,2, -o FILE)
          doctor [NAME]     hardware report, problems found and how to fix them
          tune [NAME]       measure the fastest threads / batch size / GPU layers, and keep them

        Settings: %config NbllmMagics (or c.NbllmMagics.NAME in ipython_config.py):
          default_model, default_format, stream_updates_per_second, show_stats,
          interpolate, max_interpolated_chars.
        """
        try:
            if cell is None:
                return run_subcommand(self, line)
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
        namespace = self.ipython.user_ns
        args = self.option_parser().parse_line(line, namespace if self.interpolate else None)
        if args is None:  # -h / --help
            print(self.usage())
            return
        check_options(args)
        if args.map:
            run_map_cell(
                args,
                cell,
                namespace,
                interpolate_names=self.interpolate and not args.no_interpolate,
                default_model=self.default_model,
            )
            return
        if self.interpolate and not args.no_interpolate:
            notes: list[str] = []
            cell = interpolate(cell, namespace, limit=self.max_interpolated_chars, notes=notes)
            for note in notes:  # a value cut to fit: the user must know the model saw only part of it
                print(note, file=sys.stderr)
        prompt = cell.strip("\n") if args.raw else cell.strip()
        if not prompt.strip():
            raise UsageError("The cell is empty: write the prompt in the cell, below the %%llm line.")
        if args.context:
            prompt = with_context(prompt, previous_cells(self.ipython, args.context))
        self._answer(args, prompt)

    def _explain(self, line: str) -> None:
        """``%llm explain [options]``: the last exception, with the code that raised it."""
        args = self.option_parser().parse_line(line, None)
        if args is None:
            print(self.usage())
            return
        check_options(args)
        clash = next((o for o, on in (("--map", args.map), ("--docs", args.docs), ("--context", args.context),
                                      ("--raw", args.raw), ("--schema", args.schema), ("--choices", args.choices),
                                      ("--tools", args.tools)) if on), None)  # fmt: skip
        if clash:
            raise UsageError(f"%llm explain does not go with {clash}; it asks about the last exception.")
        last = last_error()
        if last is None:
            print("No exception to explain yet: %llm explain explains the last error a cell raised.")
            return
        self._answer(args, explain_prompt(self.ipython, last))

    def _answer(self, args: Namespace, prompt: str) -> None:
        """Ask ``prompt`` with the options of the line, and show the answer as it streams."""
        namespace = self.ipython.user_ns
        # With --schema the answer is JSON, with --choices one word: shown as such unless asked.
        fmt = args.format or ("json" if args.schema else "text" if args.choices else self.default_format)
        structure = structure_params(args, namespace, fmt)
        if args.run_tools:
            self._run_tools(args, prompt, structure, fmt)
            return
        stream = self._start(args, prompt, structure)
        self.last_request = stream.request
        live = LiveOutput(self.ipython, fmt, self.stream_updates_per_second, self.show_stats)
        stopped = consume(stream, live)
        text = stream.text
        if args.chat and text:  # a question stopped before any answer leaves no trace
            self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        truncation = stream.stats.truncation_note() if stream.stats is not None else None
        bundle, note = render_answer(text, fmt, truncation)
        metadata = {"nbllm": provenance(stream, fmt, stopped)}
        live.finish(stream, bundle, metadata, stats_line(stream.stats, stopped, note), note)
        blocks = answer_code(text, fmt, truncation) if live.redraws and fmt in ("markdown", "code") else []
        if blocks:  # a rich front end: Copy / Insert as new cell under the answer
            from nbllm.notebook.code_buttons import CodeButtons  # widgets: imported when needed

            display(CodeButtons(blocks))
        if stream.sources:
            display(sources_bundle(stream.sources), raw=True)
        if stopped:
            raise AnswerInterrupted("Interrupted: the answer so far stays above; nothing was cached.")
        # With a schema, the answer as data (a pydantic object, a dict, the choice): one that did
        # not complete (max_tokens) stays above, and its error is the cell's one line.
        data = stream.data if structure else None
        if args.out:
            namespace[args.out] = data if structure else text
        if fmt == "code" and text.strip():
            code = extract_code(text)
            if truncation is not None:  # the new cell says it is incomplete, not only the output
                code = f"{code}\n# {truncation}"
            self.ipython.set_next_input(code, replace=False)

    def _run_tools(self, args: Namespace, prompt: str, structure: dict[str, Any], fmt: str) -> None:
        """--run-tools: the model calls the functions until it answers; each call is shown
        collapsed with its arguments and result, then the answer."""
        engine = nbllm.get_engine()
        model = args.model or self.default_model
        completion = engine.chat(
            self._messages(args, prompt), model=model, cache=not args.no_cache, run_tools=True, origin="magic",
            **{**generation_params(args), **structure},
        )  # fmt: skip
        display(tool_runs_bundle(completion.tool_runs), raw=True)
        bundle, note = render_answer(completion.text, fmt, completion.stats.truncation_note())
        display(bundle, raw=True, metadata={"nbllm": {"tools": [r.call.name for r in completion.tool_runs],
                                                       "steps": completion.steps}})  # fmt: skip
        if self.show_stats:
            print(stats_line(completion.stats, False, note))
        elif note is not None:  # the mark of a cut-off JSON answer: shown even without the stats line
            print(note)
        if args.out:
            self.ipython.user_ns[args.out] = completion

    def _start(self, args: Namespace, prompt: str, structure: dict[str, Any]) -> Stream:
        engine = nbllm.get_engine()
        model = args.model or self.default_model
        params = {**generation_params(args), **structure}
        cache = not args.no_cache
        if args.docs is not None:
            docs = documents_named(args.docs, self.ipython.user_ns)
            answer = engine.ask(prompt, docs, model, stream=True, cache=cache, origin="magic", **params)
            assert isinstance(answer, Stream)
            return answer
        if args.raw:
            stream: Stream = engine.generate(prompt, model=model, stream=True, cache=cache, origin="magic", **params)
            return stream
        stream = engine.chat(
            self._messages(args, prompt), model=model, stream=True, cache=cache, origin="magic", **params
        )
        return stream

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
