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


class TextAssembler:
    """Token bytes -> the text to show, one token at a time.

    UTF-8 characters split across tokens are joined, stop sequences end the text without ever
    showing part of them, and with ``trim`` (chat answers) blank space at the very start and
    end is dropped: trailing whitespace is held back until something follows it.
    """

    def __init__(self, stops: Iterable[str], trim: bool) -> None:
        import codecs

        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._matcher = StopMatcher(stops)
        self._trim = trim
        self._held = ""
        self._emitted = False

    def feed(self, piece: bytes) -> tuple[str, bool]:
        """(text to show now, whether a stop sequence was reached)."""
        text = self._decoder.decode(piece)
        if not text:
            return "", False
        # Stop sequences first, trimming after: trimming first would hold back "\n\n" and then
        # release it in front of "Question", where the matcher shows the "\n" it cannot yet
        # tell from the start of "\nQuestion:" (a blank line at the end of chat answers).
        shown, stopped = self._matcher.feed(text)
        return self._trimmed(shown, final=stopped), stopped

    def finish(self) -> str:
        """The rest, once the stream ended without a stop sequence."""
        tail = self._matcher.flush() + self._decoder.decode(b"", final=True)
        return self._trimmed(tail, final=True)

    def _trimmed(self, text: str, *, final: bool) -> str:
        """With ``trim``: no blank space before the first text, and trailing blank space held
        back until something follows it (dropped at the end)."""
        if not self._trim:
            return text
        text = self._held + text if self._emitted else text.lstrip()
        shown = text.rstrip()
        self._held = "" if final else text[len(shown) :]
        self._emitted = self._emitted or bool(shown)
        return shown
