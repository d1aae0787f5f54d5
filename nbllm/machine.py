"""What this machine has: CPU cores and memory (GPUs come later, through nvidia-ml-py)."""

from __future__ import annotations

import os

import psutil


def usable_cpus() -> int:
    """Logical CPUs this process may run on (affinity and cgroup-aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def default_threads() -> int:
    """Generation is memory-bound: one thread per physical core, never more than we may use.

    The guide's "cores - 1" halves the speed of a 2-core machine; hyper-threads add nothing.
    """
    return max(1, min(physical_cores(), usable_cpus()))


def available_memory() -> int:
    return int(psutil.virtual_memory().available)


def total_memory() -> int:
    return int(psutil.virtual_memory().total)
