"""The ``nbllm`` console script: what belongs in a terminal.

    nbllm lab                            JupyterLab at the quickstart notebook
    nbllm run "What is Docker?"          stream an answer, then the stats line
    nbllm models [list|recommend|download|verify|info|rm]   the model manager
    nbllm bench [-o results.json]        llama-bench-style speed tests
    nbllm doctor / nbllm tune            hardware report and fixes / measured tuning
    nbllm serve [--host H] [--port P] [--api-key K]   OpenAI-compatible server on these models
    nbllm config [--check FILE]          the settings in effect, or validate a file

Errors are translated here, at the edge: an ``NbllmError`` or a usage mistake prints one line
(with a "did you mean" where one fits: ``cli/parser.py``) and exits 1; Ctrl-C stops the answer,
keeps what was printed and exits 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from nbllm.cli.parser import CliParser

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a program stopped by SIGPIPE


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (defaults from the config's generation section)")
    group.add_argument("--model", "-m", help="model name or .gguf path (default: the configured default)")
    group.add_argument("--max-tokens", "-n", type=int, help="tokens to generate at most")
    group.add_argument("--temperature", "-t", type=float)
    group.add_argument("--top-p", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--min-p", type=float)
    group.add_argument("--repeat-penalty", type=float)
    group.add_argument("--presence-penalty", type=float)
    group.add_argument("--frequency-penalty", type=float)
    group.add_argument("--seed", type=int, help="random seed, for a reproducible answer")
    group.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    group.add_argument("--speculation", choices=("auto", "off"), help="drafts from the text so far")
    group.add_argument("--draft-model", metavar="MODEL", help="a smaller model of the same vocabulary drafts instead")


def _generation_params(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
        "speculation",
        "draft_model",
    )
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _stderr_line(text: str) -> None:
    dim = sys.stderr.isatty()
    print(f"\x1b[2m{text}\x1b[0m" if dim else text, file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    import nbllm

    if not args.prompt and sys.stdin.isatty():  # reading the terminal would wait, silently, for Ctrl-D
        raise nbllm.ParameterError('No prompt: give it as an argument (nbllm run "What is Docker?") or pipe it in.')
    prompt = " ".join(args.prompt) if args.prompt else sys.stdin.read()
    if not prompt.strip():
        raise nbllm.ParameterError("The prompt is empty. Pass it as an argument or on standard input.")
    params = _generation_params(args)
    if args.raw and args.system:
        raise nbllm.ParameterError("--system applies to a chat; with --raw, write the instructions into the text.")
    if args.raw:
        stream = nbllm.get_engine().generate(prompt, args.model, True, not args.no_cache, origin="cli", **params)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        stream = nbllm.get_engine().chat(messages, args.model, True, not args.no_cache, origin="cli", **params)
    interrupted = False
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
            _AnswerLine.open = True
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stream.close()
    if _AnswerLine.open or not sys.stdout.isatty():
        sys.stdout.write("\n")
        sys.stdout.flush()
    _AnswerLine.open = False
    stats = stream.stats
    note = stats.truncation_note() if stats is not None else None
    if note is not None:
        # On stderr, as the stats line: `nbllm run ... > answer.txt` keeps only the answer.
        _stderr_line(note)
    if stats is not None:
        _stderr_line(("[stopped] " if interrupted else "") + stats.details())
    elif interrupted:  # while the model was loading
        _stderr_line("[stopped] before the first token; nothing was generated")
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


def _warn_if_default_model_unknown(settings: Any) -> None:
    """Valid YAML may still name a model that is not here (yet): every run would fail on it."""
    from nbllm.core.errors import ModelNotFoundError
    from nbllm.engine import Engine

    try:
        Engine(settings).registry.resolve(None)
    except ModelNotFoundError as error:
        _stderr_line(f"warning: default_model: {error}")


def cmd_config(args: argparse.Namespace) -> int:
    import nbllm
    from nbllm.core.config import describe_settings, load_file

    if args.check:
        from pathlib import Path

        settings = load_file(Path(args.check))
        print(f"{args.check}: valid")
        _warn_if_default_model_unknown(settings)
    else:
        settings = nbllm.settings()
    print(f"# source: {settings.source}")
    for key, value, help_text in describe_settings(settings):
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        print(f"{key} = {shown}    # {help_text}" if help_text else f"{key} = {shown}")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    import nbllm

    report = nbllm.doctor(args.model)
    print(report)
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_tune(args: argparse.Namespace) -> int:
    import nbllm

    result = nbllm.tune(args.model, save=not args.dry_run, progress=not args.quiet)
    print(result)
    if not args.dry_run:
        print("Saved: used automatically whenever the config leaves these settings on auto (null / -1).")
    return EXIT_OK


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or a comma-separated list such as 1,2,4, got {text!r}"
        ) from None


def check_bench_args(args: argparse.Namespace) -> None:
    """Mistakes in ``nbllm bench``'s options, found before anything runs or is drawn."""
    import nbllm
    from nbllm.measure.bench import check_output_path, check_plan

    if args.output:
        check_output_path(args.output)
    sweep = {name: getattr(args, name) for name in ("threads", "batch_size", "context_size", "gpu_layers")}
    check_plan(nbllm.get_engine(), args.model, sweep)


def bench_with_args(args: argparse.Namespace, **callbacks: Any) -> Any:
    """``nbllm bench``'s options, run (shared with ``%llm bench``)."""
    import nbllm

    check_bench_args(args)
    return nbllm.bench(
        args.model or None,
        pp=args.pp,
        tg=args.tg,
        repetitions=args.repetitions,
        threads=args.threads,
        batch_size=args.batch_size,
        context_size=args.context_size,
        gpu_layers=args.gpu_layers,
        progress=not args.quiet,
        **callbacks,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from nbllm.measure.bench import compare, load_results

    if args.compare:
        first, second = (load_results(path) for path in args.compare)
        print(compare(first, second))
        return EXIT_OK
    results = bench_with_args(args)
    print(results)
    if args.output:
        print(f"Saved {len(results.records)} records to {results.save(args.output)}")
    return EXIT_OK


def cmd_lab(args: argparse.Namespace) -> int:
    """JupyterLab at the quickstart notebook (the README's main job)."""
    import importlib.util
    from pathlib import Path

    from nbllm.core.errors import NbllmError

    if importlib.util.find_spec("jupyterlab") is None:
        raise NbllmError(
            "JupyterLab is not installed: python3 scripts/bootstrap.py --extras lab (or pip install jupyterlab)."
        )
    notebooks = Path(__file__).resolve().parents[2] / "notebooks"
    target = notebooks / "01_quickstart.ipynb" if notebooks.is_dir() else Path.cwd()
    command = [sys.executable, "-m", "jupyterlab", str(target), *args.jupyter_args]
    if os.name == "posix" and os.geteuid() == 0 and "--allow-root" not in command:
        command.append("--allow-root")  # containers and CI run as root; JupyterLab refuses that otherwise
    print(f"Starting JupyterLab at {target} (Ctrl-C to stop)", file=sys.stderr)
    os.execv(sys.executable, command)  # replaces this process: JupyterLab's exit is ours


def build_parser(parser_class: type[argparse.ArgumentParser] = CliParser) -> argparse.ArgumentParser:
    """The ``nbllm`` command's parser. ``parser_class``: what every (sub)parser is — the magics
    pass one whose mistakes are a ``UsageError`` instead of an exit."""
    from nbllm._version import __version__

    parser = parser_class(
        prog="nbllm", description="Local GGUF language models: run, inspect and configure from a terminal."
    )
    parser.add_argument("--version", action="version", version=f"nbllm {__version__}")
    parser.add_argument("--config", "-c", help="config file (default: $NBLLM_CONFIG, ./nbllm.yaml, user file)")
    parser.add_argument("--verbose", "-v", action="count", default=0, help="log lines (-vv: llama.cpp's too)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=parser_class)

    run = commands.add_parser(
        "run", help="stream an answer to a prompt", description="Stream an answer, then the stats line."
    )
    run.add_argument("prompt", nargs="*", help="the prompt (default: read standard input)")
    run.add_argument("--system", "-s", help="system prompt")
    run.add_argument("--raw", action="store_true", help="continue the prompt as plain text instead of chatting")
    run.add_argument("--no-cache", action="store_true", help="neither use nor fill the prompt cache")
    _add_generation_options(run)
    run.set_defaults(handler=cmd_run)

    from nbllm.cli.models import add_models_commands
    from nbllm.cli.serve import add_serve_command

    add_models_commands(commands)
    add_serve_command(commands)
    from nbllm.cli.history import add_history_command

    add_history_command(commands)

    config = commands.add_parser("config", help="show the settings in effect, or check a file")
    config.add_argument("--check", metavar="FILE", help="validate FILE and show what it sets")
    config.set_defaults(handler=cmd_config)
    lab = commands.add_parser("lab", help="open JupyterLab at the quickstart notebook")
    lab.add_argument("jupyter_args", nargs=argparse.REMAINDER, help="passed on to JupyterLab, e.g. --port 8889")
    lab.set_defaults(handler=cmd_lab)

    bench = commands.add_parser(
        "bench",
        help="llama-bench-style speed tests (pp/tg), saved as JSON",
        description="Prompt processing (pp) and generation (tg) speed, mean ± std over repetitions, "
        "for every combination of the models and settings given (comma-separated lists).",
    )
    bench.add_argument("--model", "-m", action="append", help="model (repeatable; default: the default model)")
    bench.add_argument("--pp", "-p", type=int, default=512, help="prompt tokens (0 = skip)")
    bench.add_argument("--tg", "-n", type=int, default=128, help="generated tokens (0 = skip)")
    bench.add_argument("--repetitions", "-r", type=int, default=5)
    bench.add_argument("--threads", "-t", type=_int_list, help="e.g. 1,2,4")
    bench.add_argument("--batch-size", "-b", type=_int_list)
    bench.add_argument("--context-size", "-c", type=_int_list)
    bench.add_argument("--gpu-layers", "-ngl", type=_int_list)
    bench.add_argument("--output", "-o", help="write the records to this JSON file")
    bench.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two result files")
    bench.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    bench.set_defaults(handler=cmd_bench)

    doctor = commands.add_parser("doctor", help="hardware report, problems found and how to fix them")
    doctor.add_argument("--model", "-m", help="model to check (default: the configured default)")
    doctor.set_defaults(handler=cmd_doctor)

    tune = commands.add_parser("tune", help="measure the fastest threads / batch size / GPU layers here")
    tune.add_argument("--model", "-m", help="model to tune (default: the configured default)")
    tune.add_argument("--dry-run", action="store_true", help="measure and show, but do not save")
    tune.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    tune.set_defaults(handler=cmd_tune)
    return parser


class _AnswerLine:
    """Whether an answer is being written to the terminal without its final newline yet."""

    open = False


class _OwnLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines (``-v``) start on a line of their own, also in the middle of a streamed answer
    (stdout and stderr share the terminal; the answer's newline only comes at its end)."""

    def emit(self, record: logging.LogRecord) -> None:
        if _AnswerLine.open and sys.stdout.isatty() and sys.stderr.isatty():
            sys.stdout.write("\n")
            sys.stdout.flush()
            _AnswerLine.open = False
        super().emit(record)


def _setup_logging(verbosity: int) -> None:
    handler = _OwnLineHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("nbllm")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbosity else logging.WARNING)


def _split_lab_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``nbllm [options] lab ARGS...`` -> (the arguments for nbllm, ARGS for JupyterLab).

    argparse cannot pass on options it does not know: ``REMAINDER`` refuses one that comes
    first (``nbllm lab --port 8889`` failed) and ``parse_known_args`` reorders them. So
    everything after the ``lab`` command goes to JupyterLab untouched, except a lone --help."""
    takes_value = {"--config", "-c"}
    index = 0
    while index < len(argv):
        word = argv[index]
        if word in takes_value:
            index += 2
        elif word.startswith("-"):
            index += 1
        else:
            break
    if index >= len(argv) or argv[index] != "lab" or argv[index + 1 :] in (["-h"], ["--help"]):
        return list(argv), []
    return list(argv[: index + 1]), list(argv[index + 1 :])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    own, jupyter_args = _split_lab_arguments(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    if jupyter_args:
        args.jupyter_args = jupyter_args
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:  # `nbllm` alone: what it can do, but no work done
        parser.print_help()
        return EXIT_ERROR
    _setup_logging(args.verbose)
    from nbllm.core.errors import NbllmError

    try:
        import nbllm

        if args.config is not None:  # -c "" is a mistake, not "no config file"
            nbllm.configure(args.config)
        if args.verbose > 1:
            nbllm.configure(logging={"llama_cpp": "INFO"})
        return handler(args)
    except NbllmError as error:
        print(f"nbllm: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nnbllm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def entry_point() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`nbllm run ... | head`): not an error worth a traceback. Point
        # stdout at /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    sys.exit(code)
