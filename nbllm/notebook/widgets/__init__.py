"""Notebook widgets (ipywidgets front ends). Imported lazily: ``import nbllm`` never loads them."""

from __future__ import annotations

from nbllm.notebook.widgets.chat import ChatPanel, Message
from nbllm.notebook.widgets.models import ModelsPanel

__all__ = ["ChatPanel", "Message", "ModelsPanel"]
