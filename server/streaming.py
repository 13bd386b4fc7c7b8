"""Pure text assembly: token bytes → text deltas, with UTF-8 and stop-sequence holdback."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field


class TextAssembler:
    """Turns token bytes into text; never splits a UTF-8 character, never leaks a stop sequence."""

    def __init__(self, stops: list[str] | None = None) -> None:
        self.stops = [s for s in (stops or []) if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not yet released (may start a stop sequence)
        self.stopped = False  # a stop sequence was found
        self.released = 0  # characters released so far
        self.decoded = 0  # characters decoded so far (released + held + dropped)

    def feed(self, data: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to send."""
        if self.stopped:
            return ""
        text = self._decoder.decode(data)
        self.decoded += len(text)
        return self._release(self._held + text, final=False)

    def finish(self) -> str:
        """End of generation: release whatever is held (cut at a stop sequence if one completes)."""
        if self.stopped:
            return ""
        text = self._decoder.decode(b"", final=True)
        self.decoded += len(text)
        return self._release(self._held + text, final=True)

    def _release(self, text: str, final: bool) -> str:
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return self._out(text[:cut])
        keep = 0 if final else self._partial_stop(text)
        self._held = text[len(text) - keep:] if keep else ""
        return self._out(text[: len(text) - keep])

    def _out(self, text: str) -> str:
        self.released += len(text)
        return text

    def _find_stop(self, text: str) -> int | None:
        """Earliest position where a stop sequence starts, if any is complete in text."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop sequence."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


@dataclass
class TokenRecord:
    """A generated token with its place in the decoded text."""

    piece: bytes
    end: int  # decoded characters after this token
    logprob: object | None = None
    start: int = 0  # decoded characters before this token (its text offset, without an echoed prompt)


@dataclass
class ChoiceState:
    """Running state of one choice: assembled text, token records, counts, finish reason."""

    index: int
    assembler: TextAssembler
    records: list[TokenRecord] = field(default_factory=list)
    sent_records: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    text: list[str] = field(default_factory=list)
    echo: str = ""  # the prompt, when the client asked for echo

    def add(self, piece: bytes, logprob: object | None) -> str:
        """Feed one token; return the text released by it."""
        self.completion_tokens += 1
        start = self.assembler.decoded
        delta = self.assembler.feed(piece)
        self.records.append(TokenRecord(piece, self.assembler.decoded, logprob, start))
        self.text.append(delta)
        return delta

    def close(self) -> str:
        """Flush held text at the end of generation."""
        delta = self.assembler.finish()
        self.text.append(delta)
        return delta

    def take_records(self, final: bool = False) -> list[TokenRecord]:
        """Token records whose text has been released (at the end: every token that shows)."""
        released = self.assembler.released
        out = []
        start = self.records[self.sent_records - 1].end if self.sent_records else 0
        while self.sent_records < len(self.records):
            rec = self.records[self.sent_records]
            visible = rec.end <= released or (final and start < released)
            if not visible:
                break
            out.append(rec)
            start = rec.end
            self.sent_records += 1
        return out

    @property
    def full_text(self) -> str:
        """All text released so far."""
        return "".join(self.text)
