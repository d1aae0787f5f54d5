"""The engine: one kernel-resident ``Engine`` that keeps models loaded (``registry``), answers every
request through one pipeline (``pipeline``: cache lookup, seed, run, stats and log, store) and
batches concurrent requests for one model (``batching``). Front ends import from here."""

from nbllm.engine.batching import BatchInterrupted, ManyResult
from nbllm.engine.engine import Engine
from nbllm.engine.request import Completion, Request
from nbllm.engine.stream import Stream

__all__ = ["BatchInterrupted", "Completion", "Engine", "ManyResult", "Request", "Stream"]
