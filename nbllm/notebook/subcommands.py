"""``%llm SUBCOMMAND``: the line magic's model management (models, load, use, stats, bench...).

Each handler takes the ``NbllmMagics`` instance (for its default model, conversation and
usage) and the words after the subcommand's name; what it returns is the cell's result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError

import nbllm
from nbllm.core.config import describe_settings, parse_assignment
from nbllm.core.errors import did_you_mean
from nbllm.core.table import Table
from nbllm.notebook.display import display, display_widget, show_figure
from nbllm.notebook.interpolation import interpolate
from nbllm.notebook.parsers import no_arguments, one_name, parse_terminal_args, words
from nbllm.notebook.reports import Report, health_report, settings_table, stats_report

if TYPE_CHECKING:
    from nbllm.notebook.magics import NbllmMagics


def run_subcommand(magics: NbllmMagics, line: str) -> Any:
    """``%llm LINE``: the subcommand named first, with the rest of the line; none: the usage."""
    line = interpolate(line, magics.ipython.user_ns) if magics.interpolate else line
    name, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    if not name:
        return _help(magics, rest)
    if name not in SUBCOMMANDS:
        raise UsageError(
            f"Unknown subcommand {name!r}.{did_you_mean(name, SUBCOMMANDS)} Subcommands: {', '.join(SUBCOMMANDS)}. "
            "To ask a model, put the prompt in a %%llm cell. %llm? shows the usage."
        )
    return SUBCOMMANDS[name](magics, rest)


def _help(magics: NbllmMagics, rest: str) -> None:
    print(magics.usage())


def _models(magics: NbllmMagics, rest: str) -> Any:
    from nbllm.cli.models import models_command

    return models_command(words(rest))  # no words: the list; mistakes: NbllmError -> UsageError


def _bench(magics: NbllmMagics, rest: str) -> Any:
    """The terminal's ``nbllm bench`` options; results as a table, plus a figure when several."""
    from nbllm.cli.main import bench_with_args, check_bench_args

    args = parse_terminal_args(["bench", *words(rest)])
    if args.compare:
        from nbllm.measure.bench import compare, load_results

        return compare(*(load_results(path) for path in args.compare))
    from nbllm.notebook.plots import bench_figure, live_bench_chart, threads_figure

    check_bench_args(args)  # a mistake is one line, before a chart or a progress bar appears
    live, on_run = live_bench_chart()
    display_widget(live, "live benchmark chart")
    results = bench_with_args(args, on_run=on_run)
    show_figure(bench_figure(results.records))
    if len({r["settings"]["threads"] for r in results.records}) > 1:
        show_figure(threads_figure(results.records))
    if args.output:
        print(f"Saved {len(results.records)} records to {results.save(args.output)}")
    return results


def _doctor(magics: NbllmMagics, rest: str) -> Any:
    return nbllm.doctor(one_name("doctor", rest))


def _tune(magics: NbllmMagics, rest: str) -> Any:
    result = nbllm.tune(one_name("tune", rest) or magics.default_model)
    show_figure(result.figure())
    return result


def _load(magics: NbllmMagics, rest: str) -> Table:
    return nbllm.load(one_name("load", rest) or magics.default_model)


def _unload(magics: NbllmMagics, rest: str) -> None:
    name = one_name("unload", rest)
    if name is None:
        nbllm.unload()
        print("Unloaded every model.")
    elif nbllm.unload(name):
        print(f"Unloaded {name}.")
    else:
        print(f"{name} was not loaded.")


def _use(magics: NbllmMagics, rest: str) -> None:
    name = one_name("use", rest)
    if name is None:
        raise UsageError("Name the model: %llm use NAME (see %llm models).")
    spec = nbllm.get_engine().registry.resolve(name)  # an unknown name fails here, with a suggestion
    nbllm.configure(default_model=name)
    magics.default_model = name
    print(f"Default model: {spec.name} ({spec.path})")


def _stats(magics: NbllmMagics, rest: str) -> Report:
    no_arguments("stats", rest)
    return stats_report(nbllm.stats())


def _clear_cache(magics: NbllmMagics, rest: str) -> None:
    no_arguments("clear-cache", rest)
    nbllm.clear_cache()
    print("Cleared the prompt cache and the KV prefix snapshots.")


def _health(magics: NbllmMagics, rest: str) -> Report:
    no_arguments("health", rest)
    return health_report(nbllm.health())


def _config(magics: NbllmMagics, rest: str) -> Table | None:
    if not rest:
        return settings_table(nbllm.settings())
    overrides = parse_assignment(rest)
    settings = nbllm.configure(overrides)
    if "default_model" in overrides:
        magics.default_model = settings.default_model  # one default for %%llm and nbllm
    key = rest.partition("=")[0].strip()
    for row_key, value, _help in describe_settings(settings):
        if row_key == key or row_key.startswith(f"{key}."):
            print(f"{row_key} = {value!r}")
    return None


def _explain(magics: NbllmMagics, rest: str) -> None:
    magics._explain(rest)  # the options of %%llm: the answer streams as a cell's does


def _reset(magics: NbllmMagics, rest: str) -> None:
    no_arguments("reset", rest)
    forgotten = len(magics.history)
    magics.history.clear()
    magics.system_prompt = None
    print(f"Forgot the conversation ({forgotten} messages).")


def _history(magics: NbllmMagics, rest: str) -> Any:
    """``%llm history [--model M] [--search TEXT] [--since 2d] [-n N] [--clear]``: as ``nbllm history``."""
    from nbllm.cli.history import history_with_args

    result = history_with_args(parse_terminal_args(["history", *words(rest)]))
    if isinstance(result, str):
        print(result)
        return None
    return result


def _chat(magics: NbllmMagics, rest: str) -> None:
    model = one_name("chat", rest) or magics.default_model
    try:
        panel = nbllm.ChatPanel(model=model)
    except ImportError as error:
        raise UsageError(
            f"The chat panel cannot start: {error}. It needs ipywidgets (pip install ipywidgets)."
        ) from None
    magics.chat_panel = panel
    display(panel)


# In the order the "Unknown subcommand" message lists them.
SUBCOMMANDS: dict[str, Callable[[NbllmMagics, str], Any]] = {
    "help": _help,
    "models": _models,
    "load": _load,
    "unload": _unload,
    "use": _use,
    "stats": _stats,
    "clear-cache": _clear_cache,
    "health": _health,
    "config": _config,
    "reset": _reset,
    "chat": _chat,
    "explain": _explain,
    "history": _history,
    "bench": _bench,
    "doctor": _doctor,
    "tune": _tune,
}
