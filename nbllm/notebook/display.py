"""Publishing outputs from the magics: typed ``display``, widgets and plotly figures with a short text form."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from IPython.display import display as _ipython_display

# IPython's display() carries no annotations; this typed name lets mypy --strict check its callers.
display: Callable[..., Any] = _ipython_display


def display_widget(widget: Any, label: str) -> None:
    """A widget, with a one-line text form: a terminal IPython shows ``<label>`` instead of the
    widget's repr (a plotly FigureWidget's runs to dozens of lines of figure data)."""
    bundle = dict(widget._repr_mimebundle_())
    bundle["text/plain"] = f"<{label}>"
    display(bundle, raw=True)


def show_figure(figure: Any) -> None:
    """A plotly figure as its own MIME type, whatever plotly's renderer setting says (in a plain
    IPython shell it may be "browser", which would open a web browser from a magic)."""
    title = figure.layout.title.text or "plotly figure"
    display({"application/vnd.plotly.v1+json": json.loads(figure.to_json()), "text/plain": f"<{title}>"}, raw=True)
