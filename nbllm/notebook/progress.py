"""tqdm's bars for the layers below (see ``core/progress.py``): a widget in a notebook, a text bar
in a terminal. tqdm is imported when the first bar is drawn, not when nbllm is."""

from __future__ import annotations

from nbllm.core.progress import ProgressBar


def tqdm_bar(
    total: int | None, description: str, unit: str, *, initial: int = 0, in_bytes: bool = False, leave: bool = True
) -> ProgressBar:
    from tqdm.auto import tqdm

    bar: ProgressBar = tqdm(
        total=total,
        initial=initial,
        desc=description,
        unit=unit,
        leave=leave,
        unit_scale=in_bytes,  # KiB, MiB... for bytes
        unit_divisor=1024 if in_bytes else 1000,
    )
    return bar
