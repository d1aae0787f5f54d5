"""The ``nbllm`` command's argparse parser: every mistake is one line, with a suggestion, exit 1.

argparse's own way — the top-level usage, a message that names no subcommand, exit code 2 — is
what users of the magic never see: there a misspelt option reads
``unrecognized arguments: --temprature. Did you mean '--temperature'?``. The terminal says the
same, naming the (sub)command it was given to:

    nbllm run: error: unrecognized arguments: --temprature. Did you mean '--temperature'?
    nbllm run --help lists the options.            (on the same line)

``Suggesting`` holds the wording (shared with the ``%llm models`` parser); ``CliParser`` prints
it and exits 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn

from nbllm.core.errors import did_you_mean

EXIT_USAGE_ERROR = 1  # as every other error of the CLI: README, "In a terminal"


class Suggesting(argparse.ArgumentParser):
    """Unknown options and choices come with the closest known one."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # A subcommand's parser reports its own unknown options (argparse hands them up to the
        # top-level parser, whose message then names neither the subcommand nor its options).
        parsed, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(self.unrecognized(extra))
        return parsed, extra

    def unrecognized(self, extra: Sequence[str]) -> str:
        message = f"unrecognized arguments: {' '.join(extra)}."
        misspelt = next((word for word in extra if word.startswith("-") and len(word) > 1), None)
        if misspelt is None:
            return message
        options = [option for action in self._actions for option in action.option_strings]
        return message + did_you_mean(misspelt.partition("=")[0], options)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is None or value in choices:
            return
        names = [str(choice) for choice in choices]
        hint = did_you_mean(str(value), names)
        if isinstance(action, argparse._SubParsersAction):
            kind = "subcommand" if self.prog.count(" ") else "command"
            raise argparse.ArgumentError(
                None, f"unknown {kind} {value!r}.{hint} {kind.capitalize()}s: {', '.join(names)}."
            )
        raise argparse.ArgumentError(action, f"invalid choice: {value!r}.{hint} Choose from: {', '.join(names)}.")


class CliParser(Suggesting):
    """The console script's parser: one line on stderr and exit code 1 for any mistake."""

    def error(self, message: str) -> NoReturn:
        message = message.strip()
        ending = "" if message.endswith((".", "?")) else "."
        what = (
            "commands" if any(isinstance(action, argparse._SubParsersAction) for action in self._actions) else "options"
        )
        self.exit(EXIT_USAGE_ERROR, f"{self.prog}: error: {message}{ending} {self.prog} --help lists the {what}.\n")
