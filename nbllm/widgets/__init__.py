"""Notebook widgets (ipywidgets front ends). Imported lazily: ``import nbllm`` never loads them."""

from __future__ import annotations

from nbllm.widgets.chat import ChatPanel, Message

__all__ = ["ChatPanel", "Message"]
