"""A cancel flag that native code can read without Python.

``Cancel`` is a ``threading.Event`` that also keeps one byte in C memory, non-zero once the
event is set. llama.cpp asks an abort callback, between the nodes of its compute graph, whether
to stop; a Python callback there needs the GIL hundreds of times per step, and waits for it
whenever another Python thread is busy (a notebook cell, the server's event loop). Given that
byte, the callback can be a C function instead (see ``backends/llama_cpp.py``).
"""

from __future__ import annotations

import ctypes
import threading


class Cancel(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        # Two bytes, the second always NUL: a C string that is empty until the event is set.
        self.flag = ctypes.create_string_buffer(2)

    @property
    def flag_address(self) -> int:
        return ctypes.addressof(self.flag)

    def set(self) -> None:
        self.flag[0] = b"x"
        super().set()

    def clear(self) -> None:
        self.flag[0] = b"\0"
        super().clear()
