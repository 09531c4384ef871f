"""Token bytes → text pieces, with stop sequences.

Shared by every local engine. Decodes UTF-8 incrementally (a multi-byte character split over
tokens is emitted once whole) and holds back any tail that could be the start of a stop
sequence, so a stop string never leaks to the client even when it spans tokens.
"""

from __future__ import annotations

import codecs


class TextAssembler:
    def __init__(self, stop: list[str]) -> None:
        self._stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop sequence that stopped it

    def push(self, piece: bytes) -> str:
        """Feed one token's bytes; return the text that is now safe to emit. After a stop
        sequence is found, `stopped` is True and the text before it is returned."""
        text = self._held + self._decoder.decode(piece)
        if not self._stop:
            self._held = ""
            return text
        cut, matched = -1, None
        for stop in self._stop:  # the earliest match; of two at one place, the first listed
            i = text.find(stop)
            if i >= 0 and (cut < 0 or i < cut):
                cut, matched = i, stop
        if matched is not None:
            self.stopped = True
            self.matched = matched
            self._held = ""
            return text[:cut]
        keep = self._partial_stop_len(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of generation: whatever was held back."""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return "" if self.stopped else text

    def _partial_stop_len(self, text: str) -> int:
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
