"""Cutting one text file into documents, streaming: at a separator, or at paragraph boundaries.

Both generators yield `(bytes, first line number)` pieces whose concatenation is the file, byte for
byte (a separator dropped with `keep=False` excepted), and show every byte read to the caller's
hasher. Neither holds more than about two documents in memory, whatever the file's size.

- `separator_pieces`: one piece per separator occurrence, the separator kept at the end of the piece
  before it. A piece with nothing but whitespace besides its separator joins the piece before it
  (at the start of the file, the piece after it), so blank runs never make empty documents.
- `paragraph_pieces`: pieces of about `target` bytes. A piece ends at the first paragraph boundary
  (a non-blank line after blank lines; the blank lines stay with the piece before) once it holds
  `target` bytes. When a piece would pass `HARD_FACTOR * target` bytes it ends at the boundary
  before instead, and a paragraph longer than that on its own is cut at line ends (a line longer
  than that, at a UTF-8 character boundary). A last piece under half of `target` joins the one
  before it when the two fit under the hard limit.
"""
from __future__ import annotations

from typing import Any, BinaryIO, Iterator

READ_CHUNK = 1 << 20
HARD_FACTOR = 4
"""A paragraph is cut inside only when it alone exceeds HARD_FACTOR * target bytes."""

Piece = tuple[bytes, int]


def _char_start(data: bytes) -> int:
    """Where the last complete UTF-8 character of `data` ends: the offset to cut at so that no
    character is split (invalid bytes count as one-byte characters)."""
    last = len(data) - 1
    start = last
    while start > 0 and last - start < 3 and data[start] & 0xC0 == 0x80:
        start -= 1
    lead = data[start]
    need = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 1
    return len(data) if start + need <= len(data) else start


def _lines(fh: BinaryIO, limit: int, hasher: Any) -> Iterator[bytes]:
    """The file's lines, none longer than `limit` bytes: a longer line comes in several pieces."""
    carry = b""
    while True:
        read = fh.readline(limit - len(carry))
        hasher.update(read)
        line, carry = carry + read, b""
        if not line:
            return
        if not line.endswith(b"\n") and len(line) >= limit:
            cut = _char_start(line) or len(line)
            line, carry = line[:cut], line[cut:]
        yield line


def separator_pieces(fh: BinaryIO, separator: str, keep: bool, hasher: Any) -> Iterator[Piece]:
    token = separator.encode("utf-8")
    tail = token if keep else b""
    held: Piece | None = None  # the last piece with text, until we know no blank piece follows
    lead = b""  # blank pieces before the first piece with text (which then starts at line 1)
    buf, line = b"", 1

    def take(piece: bytes, last: bool) -> Iterator[Piece]:
        nonlocal held, lead, line
        data = piece + (b"" if last else tail)
        start, line = line, line + piece.count(b"\n") + (0 if last else token.count(b"\n"))
        if not piece.strip():
            if held is not None:
                held = (held[0] + data, held[1])
            else:
                lead += data
            return
        if held is not None:
            yield held
        held, lead = (lead + data, 1 if lead else start), b""

    while chunk := fh.read(READ_CHUNK):
        hasher.update(chunk)
        *pieces, buf = (buf + chunk).split(token)
        for piece in pieces:
            yield from take(piece, last=False)
    yield from take(buf, last=True)
    yield held if held is not None else (lead, 1)  # all whitespace: one piece, for the caller to judge


class _Paragraphs:
    """The state of `paragraph_pieces`: the piece being built and the one held back."""

    def __init__(self, target: int):
        self.target, self.hard = target, HARD_FACTOR * target
        self.cur = bytearray()
        self.start = 1  # line number of cur's first line
        self.para = 0  # offset in cur where the current paragraph starts (0: cur is one paragraph)
        self.ends: list[int] = []  # offsets in cur where the current paragraph's lines end
        self.blank = False  # blank lines have followed the current paragraph's text
        self.held: Piece | None = None

    def feed(self, line: bytes) -> list[Piece]:
        out: list[Piece] = []
        if not line.strip():
            self.cur += line
            self.blank = bool(self.ends)
            return out
        if self.blank:  # a new paragraph starts here
            if len(self.cur) >= self.target:
                out += self._cut(len(self.cur))
            self.para, self.ends, self.blank = len(self.cur), [], False
        self.cur += line
        self.ends.append(len(self.cur))
        while len(self.cur) > self.hard:
            if self.para:  # end the piece before this paragraph
                out += self._cut(self.para)
                continue
            # The paragraph alone is too long: cut at the first line end past target (or the last
            # one before the hard limit, when that comes first).
            fits = [e for e in self.ends if e <= self.hard]
            past = [e for e in fits if e >= self.target]
            out += self._cut(past[0] if past else fits[-1])
        return out

    def _cut(self, at: int) -> list[Piece]:
        data = bytes(self.cur[:at])
        del self.cur[:at]
        piece, self.start = (data, self.start), self.start + data.count(b"\n")
        self.para = max(self.para - at, 0)
        self.ends = [e - at for e in self.ends if e > at]
        held, self.held = self.held, piece
        return [held] if held is not None else []

    def finish(self) -> list[Piece]:
        tail, held = bytes(self.cur), self.held
        if held is None:
            return [(tail, self.start)] if tail else []
        if tail and (not tail.strip() or (len(tail) < self.target // 2
                                          and len(held[0]) + len(tail) <= self.hard)):
            return [(held[0] + tail, held[1])]
        return [held] + ([(tail, self.start)] if tail else [])


def paragraph_pieces(fh: BinaryIO, target: int, hasher: Any) -> Iterator[Piece]:
    state = _Paragraphs(target)
    for line in _lines(fh, state.hard, hasher):
        yield from state.feed(line)
    yield from state.finish()
