"""``python -m nbllm.cli``: the ``nbllm`` console script without its entry point installed."""

from nbllm.cli.main import entry_point

entry_point()
