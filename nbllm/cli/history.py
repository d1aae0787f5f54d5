"""``nbllm history`` (and ``%llm history``, which parses with the same parser): past answers
from the history log, as a table; ``--clear`` empties the log."""

from __future__ import annotations

import argparse
from typing import Any

from nbllm.core.history import ORIGINS


def add_history_command(commands: Any) -> None:
    history = commands.add_parser(
        "history",
        help="past answers from the history log (newest first)",
        description="Past answers from the history log, newest first. Turn the log off with "
        "'history: {enabled: false}' in the config, or NBLLM_HISTORY=0.",
    )
    history.add_argument("--model", "-m", help="only this model's answers")
    history.add_argument("--search", "-s", help="only answers whose prompt, messages or answer hold this text")
    history.add_argument("--since", help="only answers since a date (2026-12-01), a time, or an age (30m, 1h, 2d)")
    history.add_argument("--origin", choices=ORIGINS, help="only answers asked from here")
    history.add_argument("-n", "--limit", type=int, default=20, help="rows at most (default 20)")
    history.add_argument("--clear", action="store_true", help="delete every answer in the log")
    history.set_defaults(handler=cmd_history)


def history_with_args(args: argparse.Namespace) -> Any:
    """The table the arguments ask for, or with ``--clear`` the line saying what was deleted."""
    import nbllm
    from nbllm.core.history import table

    history = nbllm.get_engine().history
    if args.clear:
        if any(getattr(args, name) is not None for name in ("model", "search", "since", "origin")):
            raise nbllm.ParameterError("--clear deletes the whole log: give it without filters.")
        return f"Deleted {nbllm.history_clear()} answers from the history log {history.path}."
    if args.limit < 1:
        raise nbllm.ParameterError(f"-n {args.limit}: give a positive number of rows.")
    rows = history.query(model=args.model, search=args.search, since=args.since, origin=args.origin, limit=args.limit)
    if not rows:
        return f"No answers in the history log {history.path} match."
    return table(rows)


def cmd_history(args: argparse.Namespace) -> int:
    import nbllm

    print(history_with_args(args))
    history = nbllm.get_engine().history
    if not history.active:
        print("(The history log is off: nothing new is recorded.)")
    return 0
