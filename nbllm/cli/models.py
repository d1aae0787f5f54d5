"""``nbllm models ...``: list, recommend, download, verify, info and rm, in a terminal or a notebook.

    nbllm models [list]                        the catalog and the models folder side by side
    nbllm models recommend [--ram 16GB --cores 8 --vram 8GB]
    nbllm models download NAME [--quant Q5_K_M] [--sha256 HEX]   NAME: catalog name, URL, hf://repo/file
    nbllm models verify [NAME]                 GGUF check and checksum, one model or all
    nbllm models info NAME                     architecture, parameters, context, quantization...
    nbllm models rm NAME [--quant Q4_K_M]      delete a downloaded model

``cli/main.py`` calls ``add_models_commands(subparsers)``; the ``%llm models ...`` magic calls
``models_command(argv)``, which parses the same arguments and returns the object to display
instead of printing it. A front end only: the work is in ``nbllm.hub.manager`` and ``nbllm.hub.recommendation``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from nbllm.cli.parser import Suggesting

EXIT_OK, EXIT_ERROR = 0, 1


def _size(text: str) -> int:
    from nbllm.core.config import parse_bytes

    value = parse_bytes(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 16GB or 512MiB")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


# ---------------------------------------------------------------------------- what each subcommand does


def run_list(args: argparse.Namespace) -> Any:
    import nbllm  # the kernel's engine when run as %llm models: its loaded models show as loaded

    return nbllm.list_models()


def run_recommend(args: argparse.Namespace) -> Any:
    from nbllm.hub.recommendation import recommend

    return recommend(
        ram=args.ram,
        vram=args.vram,
        cores=args.cores,
        bandwidth=args.bandwidth,
        context=args.context,
        all_quants=args.all,
    )


def run_download(args: argparse.Namespace) -> Any:
    from nbllm.hub.manager import download, load_name

    result = download(
        args.name,
        args.quant,
        sha256=args.sha256,
        file_name=args.file_name,
        show_progress=not args.quiet,
        force=args.force,
    )
    name = load_name(result.path)
    return f'{result}\nLoad it with nbllm.load({name!r}), or use it: nbllm run -m {name} "..."'


def run_verify(args: argparse.Namespace) -> Any:
    import nbllm  # the kernel's engine under %llm models: names it was configured with count
    from nbllm.hub.manager import verify

    return verify(args.name, args.quant, progress=not args.quiet, engine=nbllm.get_engine())


def run_info(args: argparse.Namespace) -> Any:
    import nbllm

    return nbllm.model_info(args.name, args.quant)


def run_rm(args: argparse.Namespace) -> Any:
    import nbllm

    path = nbllm.remove_model(args.name, args.quant)
    return f"Removed {path}."


RUNNERS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "list": run_list,
    "recommend": run_recommend,
    "download": run_download,
    "verify": run_verify,
    "info": run_info,
    "rm": run_rm,
}


# ---------------------------------------------------------------------------- the parser


def _configure(parser: argparse.ArgumentParser) -> None:
    """The subcommands and their options, shared by the console script and the magic."""
    parser.set_defaults(models_command="list")
    commands = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND", parser_class=type(parser))

    commands.add_parser("list", help="the catalog and the models folder: downloaded, size, loaded")

    recommend = commands.add_parser(
        "recommend",
        help="which models fit this machine, how fast they will be, what to download",
        description="Without options: this machine, measured. With --ram/--cores/--vram: a machine you describe.",
    )
    recommend.add_argument("--ram", type=_size, help="RAM available, e.g. 16GB (default: measured)")
    recommend.add_argument("--vram", type=_size, help="free GPU memory, e.g. 8GB (default: measured)")
    recommend.add_argument("--cores", type=_positive, help="physical CPU cores (default: measured)")
    recommend.add_argument("--bandwidth", type=_size, help="memory read bandwidth per second, e.g. 40GB")
    recommend.add_argument("--context", type=_positive, default=4096, help="context size (default 4096)")
    recommend.add_argument("--all", action="store_true", help="every quantization, not only Q4_K_M")

    download = commands.add_parser(
        "download",
        help="download a catalog model, an https URL or hf://owner/repo/file",
        description="Resumes an interrupted download, verifies the checksum and the GGUF file, then moves it "
        "into the models folder.",
    )
    download.add_argument("name", help="catalog name (see `nbllm models list`), https URL, or hf://owner/repo/file")
    download.add_argument("--quant", "-q", default="Q4_K_M", help="quantization of a catalog model (default Q4_K_M)")
    download.add_argument("--sha256", help="the expected SHA-256 (default: the catalog's, or Hugging Face's)")
    download.add_argument("--file-name", help="save under this .gguf name (default: the URL's)")
    download.add_argument("--force", action="store_true", help="download again even if the file is there")
    download.add_argument("--quiet", action="store_true", help="no progress bar")

    verify = commands.add_parser("verify", help="check models again: GGUF file and checksum")
    verify.add_argument("name", nargs="?", help="one model (default: every file in the models folder)")
    verify.add_argument("--quant", "-q", help="quantization of a catalog model")
    verify.add_argument("--quiet", action="store_true", help="no progress bar while hashing")

    info = commands.add_parser("info", help="architecture, parameters, context, quantization, chat template, size")
    info.add_argument("name", help="catalog name, file stem in the models folder, config name or path")
    info.add_argument("--quant", "-q", help="quantization of a catalog model")

    remove = commands.add_parser("rm", help="delete a downloaded model (unloading it first)")
    remove.add_argument("name", help="catalog name or file stem in the models folder")
    remove.add_argument("--quant", "-q", help="quantization of a catalog model")


def add_models_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``models`` and its subcommands to the console script's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "models",
        help="list, recommend, download, verify, inspect and remove models",
        description="Models: the catalog, the models folder, downloads. `nbllm models` alone lists them.",
    )
    _configure(parser)
    parser.set_defaults(handler=cmd_models)
    return parser


def cmd_models(args: argparse.Namespace) -> int:
    """The console script's handler: run the subcommand and print what it returns."""
    result = RUNNERS[args.models_command or "list"](args)
    print(result)
    ok = getattr(result, "ok", True)  # `verify` fails the exit code when a file does not pass
    return EXIT_OK if ok else EXIT_ERROR


# ---------------------------------------------------------------------------- the magic's entry point


class _Done(Exception):
    """argparse wanted to exit (after --help): the magic just stops."""


class _MagicParser(Suggesting):
    """Raises instead of exiting: a notebook kernel must never be asked to exit."""

    def error(self, message: str) -> Any:
        from nbllm.core.errors import ParameterError

        usage = self.format_usage().strip().removeprefix("usage:").strip()  # argparse's own "usage: " prefix
        ending = "" if message.endswith((".", "?")) else "."
        raise ParameterError(f"{message}{ending} Usage: {usage}")

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        if message:
            print(message, file=sys.stderr)
        raise _Done


def models_command(argv: Sequence[str]) -> Any:
    """``%llm models ARGS``: parse like the console script, return what to display (None after --help).

    Bad arguments raise ``ParameterError`` (an ``NbllmError``); the magic shows it as a one-line error.
    """
    parser = _MagicParser(prog="%llm models", description="Models: the catalog, the models folder, downloads.")
    _configure(parser)
    try:
        args = parser.parse_args(list(argv))
    except _Done:
        return None
    return RUNNERS[args.models_command or "list"](args)
