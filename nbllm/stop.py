"""Stop sequences over streamed text.

Text that might be the start of a stop sequence is held back until it is known not to be, so a
stream never shows half of "\\nUser:" and then takes it back.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to show now, whether a stop sequence was reached)."""
        if not self.stops:
            return text, False
        buffer = self._pending + text
        cut = -1
        for stop in self.stops:
            index = buffer.find(stop)
            if index != -1 and (cut == -1 or index < cut):
                cut = index
        if cut != -1:
            self._pending = ""
            return buffer[:cut], True
        keep = 0
        for stop in self.stops:
            # The longest tail of the buffer that is a proper prefix of this stop sequence.
            for length in range(min(len(stop) - 1, len(buffer)), keep, -1):
                if stop.startswith(buffer[-length:]):
                    keep = length
                    break
        self._pending = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """What was held back, once the stream has ended without reaching a stop."""
        pending, self._pending = self._pending, ""
        return pending
