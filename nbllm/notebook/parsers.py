"""Reading the ``%%llm`` line and the arguments of ``%llm SUBCOMMAND``.

Every mistake is a ``UsageError``, which IPython shows as one line without a traceback. The
argparse parsers raise it themselves, from ``error`` (the jupysql ``CmdParser`` pattern), and
never exit: ``sys.exit`` has no place in a kernel.

    MagicParser         argparse for a magic: ``error`` raises UsageError, ``exit`` too
    CellOptionParser    the ``%%llm`` options (``llm_option_parser``), with did-you-mean for a misspelt one
    TerminalParser      a parser that ``nbllm.cli`` built (``%llm bench``), worded as in a terminal
"""

from __future__ import annotations

import argparse
import keyword
import os
import shlex
from argparse import Namespace
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicHelpFormatter
from IPython.utils.process import arg_split  # type: ignore[attr-defined]  # public, not re-exported

from nbllm.core.errors import did_you_mean
from nbllm.notebook.interpolation import interpolate

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
    "speculation",
    "draft_model",
)

_F = TypeVar("_F", bound=Callable[..., Any])


class MagicParser(argparse.ArgumentParser):
    """argparse for a magic: a mistake raises ``UsageError`` instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        # Only --help and --version get here (a mistake raises in error), after printing: the
        # magic then stops with one line instead of ending the kernel.
        lines = (message or "").strip().splitlines()
        raise UsageError(lines[-1] if lines else "Invalid options; %llm? shows the usage.")


class CellOptionParser(MagicParser):
    """The options on a ``%%llm`` line (built by ``llm_option_parser``)."""

    def parse_line(self, line: str, namespace: Mapping[str, Any] | None) -> Namespace | None:
        """The options of ``line``; None for -h / --help (the magic prints its usage).

        With a ``namespace``, ``{name}`` in each option's value is filled from it before parsing,
        numbers included (``-n {budget}``), unless the line says --no-interpolate.
        """
        try:
            tokens = shlex.split(line)
        except ValueError as error:  # an unbalanced quote: nothing for argparse to read
            raise UsageError(f"Cannot read the options {line.strip()!r}: {error}.") from None
        if "-h" in tokens or "--help" in tokens:
            return None
        if namespace is not None and "--no-interpolate" not in tokens:
            tokens = [interpolate(token, namespace) for token in tokens]
        args, extra = self.parse_known_args(tokens)
        if extra:
            self.error(self._unrecognized(extra))
        return args

    def parse_argstring(self, argstring: str, *, partial: bool = False) -> Namespace | tuple[Namespace, list[str]]:
        """What IPython's completer calls on a magic's parser (as on ``MagicArgumentParser``)."""
        argv = arg_split(argstring, strict=not partial)
        if partial:
            return self.parse_known_args(argv)
        return self.parse_args(argv)

    def _unrecognized(self, extra: Sequence[str]) -> str:
        """argparse's message, plus a suggestion for a misspelt option and a hint for stray words."""
        message = f"unrecognized arguments: {' '.join(extra)}."
        options = [option for action in self._actions for option in action.option_strings]
        misspelt = next((token for token in extra if token.startswith("-")), None)
        if misspelt is not None:
            return message + did_you_mean(misspelt.partition("=")[0], options) + " %llm? lists the options."
        return message + " The prompt goes in the cell body, below the %%llm line."


class TerminalParser(MagicParser):
    """A parser of the console script, reused by a magic: its mistakes read as in a terminal."""

    def error(self, message: str) -> NoReturn:
        # The line a terminal shows last: "nbllm bench: error: argument --threads/-t: ..."
        super().error(f"{self.prog}: error: {message}".strip().splitlines()[-1])


# ----------------------------------------------------------------- %%llm [options]


def llm_option_parser(description: str | None = None) -> CellOptionParser:
    """The ``%%llm`` options; ``description`` heads its help (the magic's docstring)."""
    parser = CellOptionParser(
        prog="%llm",  # the help's usage line then reads %%llm (MagicHelpFormatter adds a %)
        description=description,
        formatter_class=MagicHelpFormatter,
        add_help=False,
    )
    answer = parser.add_argument_group("Answer")
    answer.add_argument("--model", "-m", help="model name or .gguf path (default: NbllmMagics.default_model)")
    answer.add_argument("--system", "-s", help="system prompt (kept for the conversation with --chat)")
    answer.add_argument(
        "--format", "-f", choices=FORMATS, metavar="FORMAT", help="markdown (default), text, code, json or html"
    )
    answer.add_argument("--out", "-o", metavar="NAME", help="also store the answer (its data with --schema) in NAME")
    answer.add_argument(
        "--schema",
        metavar="NAME",
        help="answer as data fitting NAME: a pydantic class or JSON Schema dict; 'json': any",
    )
    answer.add_argument("--choices", metavar="A,B,C", help="answer with exactly one of these (classification)")
    answer.add_argument("--tools", metavar="F,G", help="functions from the notebook the model may call")
    answer.add_argument(
        "--docs",
        metavar="NAME",
        help="answer from your documents: a variable (texts, a Series, an nbllm.Index) or a file or folder path; "
        "the passages used are listed below the answer",
    )
    answer.add_argument(
        "--run-tools", action="store_true", help="with --tools: run the calls and answer from their results"
    )
    answer.add_argument("--chat", action="store_true", help="continue the conversation of earlier --chat cells")
    answer.add_argument(
        "--raw", action="store_true", help="continue the text as a plain completion instead of chatting"
    )
    answer.add_argument(
        "--context",
        type=int,
        metavar="N",
        help="put the source of the previous N code cells (llm magic cells skipped) before the prompt",
    )
    answer.add_argument("--no-cache", action="store_true", help="neither use nor fill the prompt cache")
    answer.add_argument("--no-interpolate", action="store_true", help="send {braces} as written")
    answer.add_argument(
        "--map",
        metavar="NAME",
        help="run the prompt once per element of the list / pandas Series / DataFrame NAME ({item}, {row.column}), "
        "batched; answers go to --out (a list or Series; a DataFrame gets a new --column)",
    )
    answer.add_argument(
        "--column", metavar="COL", default="answer", help="with --map over a DataFrame: the new column (answer)"
    )
    generation = parser.add_argument_group("Generation (defaults from the config's generation section)")
    generation.add_argument("--temperature", "-t", type=float, help="sampling temperature; 0 = greedy")
    generation.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    generation.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    generation.add_argument("--min-p", type=float, help="drop tokens below this fraction of the best one")
    generation.add_argument("--max-tokens", "-n", type=int, help="tokens to generate at most")
    generation.add_argument("--repeat-penalty", type=float, help="penalty for repeated tokens; 1 = off")
    generation.add_argument("--presence-penalty", type=float, help="penalty for tokens already present")
    generation.add_argument("--frequency-penalty", type=float, help="penalty growing with token frequency")
    generation.add_argument("--seed", type=int, help="random seed, for a reproducible answer")
    generation.add_argument("--stop", action="append", metavar="TEXT", help="stop before TEXT (repeatable)")
    generation.add_argument(
        "--speculation", choices=("auto", "off"), help="drafts from the text so far (same answers, sooner)"
    )
    generation.add_argument(
        "--draft-model", metavar="MODEL", help="a smaller model of the same vocabulary drafts instead"
    )
    return parser


def llm_options(magic: _F) -> _F:
    """Give the ``%%llm`` magic its options, as IPython's ``@magic_arguments`` does: the parser,
    headed by the magic's docstring, becomes ``magic.parser`` and its full help the docstring
    (what ``%llm?`` shows)."""
    parser = llm_option_parser(magic.__doc__)
    magic.__doc__ = parser.format_help()
    # Where @magic_arguments keeps them too: IPython's completer reads both.
    magic.__dict__.update(parser=parser, has_arguments=True)
    return magic


def check_options(args: Namespace) -> None:
    """Options that parse but do not go together."""
    if args.docs is not None:
        clash = next((o for o, on in (("--raw", args.raw), ("--map", args.map), ("--tools", args.tools),
                                      ("--chat", args.chat), ("--schema", args.schema), ("--choices", args.choices),
                                      ("--system", args.system), ("--context", args.context is not None))
                      if on), None)  # fmt: skip
        if clash:
            raise UsageError(f"--docs answers one question from your documents; it does not go with {clash}.")
    if args.context is not None and args.context < 0:
        raise UsageError(f"--context {args.context}: give the number of previous cells to include, 0 or more.")
    if args.context is not None and args.map:
        raise UsageError("--context does not go with --map: it would repeat the cells in every item's prompt.")
    if args.raw and args.chat:
        raise UsageError("--raw continues text and --chat continues a conversation: use one or the other.")
    if args.raw and args.system:
        raise UsageError("--system applies to a chat; with --raw, write the instructions into the text itself.")
    if args.out is not None and (not args.out.isidentifier() or keyword.iskeyword(args.out)):
        raise UsageError(f"--out {args.out!r} is not a valid variable name.")


def documents_named(name: str, namespace: Mapping[str, Any]) -> Any:
    """--docs NAME: the notebook's variable NAME, else a file or folder of that name."""
    if name in namespace:
        return namespace[name]
    if os.path.exists(os.path.expanduser(name)):
        return name
    known = [key for key in namespace if not key.startswith("_") and not callable(namespace[key])]
    raise UsageError(f"--docs: no variable, file or folder named {name!r}.{did_you_mean(name, known)}")


def structure_params(args: Namespace, namespace: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """``schema=`` / ``choices=`` from --schema NAME (looked up in the notebook), --choices and
    --format json (JSON mode: a grammar, so the answer always parses)."""
    if args.schema is not None and args.choices is not None:
        raise UsageError("--schema and --choices do not go together: give one of them.")
    if args.run_tools and not args.tools:
        raise UsageError("--run-tools needs --tools f,g: the functions the model may call.")
    if args.tools is not None:
        if args.schema is not None or args.choices is not None:
            raise UsageError("--tools does not go with --schema or --choices.")
        functions = []
        for name in (part.strip() for part in args.tools.split(",")):
            if name not in namespace:
                known = [key for key in namespace if not key.startswith("_") and callable(namespace[key])]
                raise UsageError(f"--tools: no function {name!r} in this notebook.{did_you_mean(name, known)}")
            functions.append(namespace[name])
        return {"tools": functions}
    if args.choices is not None:
        return {"choices": [choice.strip() for choice in args.choices.split(",")]}
    if args.schema is not None:
        name = args.schema.strip()
        if name.lower() == "json":
            return {"schema": "json"}
        if name not in namespace:
            known = [key for key in namespace if not key.startswith("_")]
            raise UsageError(
                f"--schema {name}: no variable {name!r} in this notebook.{did_you_mean(name, known)} Define a pydantic "
                "class or a JSON Schema dict first, or use --schema json."
            )
        return {"schema": namespace[name]}
    return {"schema": "json"} if fmt == "json" else {}


def generation_params(args: Namespace) -> dict[str, Any]:
    """The generation options the line gave (the others come from the config)."""
    return {name: getattr(args, name) for name in GENERATION_OPTIONS if getattr(args, name) is not None}


# ----------------------------------------------------------------- %llm SUBCOMMAND arguments


def parse_terminal_args(argv: Sequence[str]) -> Namespace:
    """``argv`` parsed by the ``nbllm`` command's own parser (``nbllm.cli``), built of
    ``TerminalParser``s: the terminal's wording, but a mistake is a one-line UsageError."""
    from nbllm.cli.main import build_parser

    return build_parser(TerminalParser).parse_args(list(argv))


def words(rest: str) -> list[str]:
    """A subcommand's arguments, split as a shell does."""
    try:
        return shlex.split(rest)
    except ValueError as error:
        raise UsageError(f"Cannot read {rest!r}: {error}.") from None


def one_name(subcommand: str, rest: str) -> str | None:
    """The model name a subcommand takes, if given."""
    names = words(rest)
    if len(names) > 1:
        raise UsageError(f"%llm {subcommand} takes one model name, got {len(names)}: {rest!r}.")
    return names[0] if names else None


def no_arguments(subcommand: str, rest: str) -> None:
    if rest:
        raise UsageError(f"%llm {subcommand} takes no arguments, got {rest!r}.")
