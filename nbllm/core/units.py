"""Human-readable sizes and times, shared by every display."""

from __future__ import annotations

import time


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_age(timestamp: float | None, now: float | None = None) -> str:
    """``12s ago``, ``3m ago``, ``2h ago``; ``-`` for never."""
    if timestamp is None:
        return "-"
    seconds = max((now or time.time()) - timestamp, 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"
