"""Reading source files into documents: text, .jsonl, .jsonl.zst, .json.gz and .parquet, streaming.

`read_records` yields, in file order, each document (`{"id", "text", "source", "meta"}`) or, for
anything unreadable (malformed JSON, a record without a string text field, invalid UTF-8, an empty
document, a truncated, empty or corrupt compressed stream), a (reason code, message) pair that the download
stage writes to its quarantine ledger. Every byte of the file passes through the caller's hasher on
the way. A text file is one document, or several cut at a separator or at paragraph boundaries
(`tasks.download.textsplit`). `read_shard` reads back the raw shards the download stage writes.
"""
from __future__ import annotations

import gzip
import io
import json
import tokenize
import zlib
from pathlib import Path
from typing import Any, Iterator

import zstandard

from tasks.download.sources import SourceFile
from tasks.download.textsplit import paragraph_pieces, separator_pieces

READ_CHUNK = 1 << 20
ZSTD_READ_CHUNK = 1 << 17
"""Compressed bytes fed to zstd at a time: small, since one chunk of a highly compressible file can
expand a thousandfold."""
PARQUET_BATCH = 256
REASONS = ("malformed_json", "not_object", "no_text_field", "invalid_utf8", "empty", "unencodable",
           "truncated_stream", "corrupt_stream")
"""Quarantine reason codes, in report order (`unencodable` is found when a shard line is written)."""


class BrokenStream(Exception):
    """A compressed stream that ends early or cannot be decoded (message starts with its reason)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def zst_lines(path: Path, hasher: Any = None) -> Iterator[bytes]:
    """Lines of a zstd file (several frames allowed), streaming. Raises BrokenStream on a corrupt
    or truncated stream, after the complete lines before the damage; `hasher` sees every file byte."""
    _not_empty(path, "zstd")
    dctx = zstandard.ZstdDecompressor()
    with open(path, "rb") as fh:
        dobj, pending, tail = dctx.decompressobj(), False, b""
        try:
            while chunk := fh.read(ZSTD_READ_CHUNK):
                if hasher is not None:
                    hasher.update(chunk)
                while chunk:
                    pending = True
                    out = tail + dobj.decompress(chunk)
                    chunk = b""
                    if dobj.eof:  # end of one frame; the rest of the chunk starts the next
                        chunk, dobj, pending = dobj.unused_data, dctx.decompressobj(), False
                    *lines, tail = out.split(b"\n")
                    for line in lines:
                        yield line + b"\n"
        except zstandard.ZstdError as exc:
            _drain(fh, hasher)
            raise BrokenStream("corrupt_stream", f"corrupt zstd stream ({exc})") from None
        if pending:
            raise BrokenStream("truncated_stream", "truncated zstd stream (file ends inside a frame)")
    if tail:
        yield tail


def _not_empty(path: Path, kind: str) -> None:
    """A 0-byte compressed file has not even a header: a transfer that failed or was cut short."""
    if Path(path).stat().st_size == 0:
        raise BrokenStream("truncated_stream", f"empty file (0 bytes), not a {kind} stream "
                                               "(a failed or truncated transfer?)")


def gz_lines(path: Path, hasher: Any = None) -> Iterator[bytes]:
    """Lines of a gzip file, streaming; BrokenStream on a corrupt or truncated stream."""
    _not_empty(path, "gzip")
    with open(path, "rb") as raw:
        source = _Hashing(raw, hasher) if hasher is not None else raw
        try:
            with gzip.GzipFile(fileobj=source, mode="rb") as gz:
                yield from gz
        except EOFError:
            raise BrokenStream("truncated_stream", "truncated gzip stream (file ends inside a "
                                                   "member)") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            _drain(raw, hasher)
            raise BrokenStream("corrupt_stream", f"corrupt gzip stream ({exc})") from None


class _Hashing(io.RawIOBase):
    """A read-only file that shows every byte read to a hasher."""

    def __init__(self, fh: Any, hasher: Any):
        self.fh, self.hasher = fh, hasher

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = self.fh.readinto(buf)
        self.hasher.update(memoryview(buf)[:n])
        return n


def _drain(fh: Any, hasher: Any) -> None:
    while hasher is not None and (chunk := fh.read(READ_CHUNK)):
        hasher.update(chunk)


def _file_lines(path: Path, hasher: Any) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        for line in fh:
            hasher.update(line)
            yield line


def _decode_text(f: SourceFile, data: bytes) -> str:
    encoding = "utf-8"
    if f.rel.endswith(".py"):  # PEP 263: a Python file may declare its own encoding
        try:
            encoding = tokenize.detect_encoding(io.BytesIO(data).readline)[0]
        except SyntaxError:  # a bad or unknown declaration: judge the bytes as UTF-8
            pass
    return data.decode(encoding)


Bad = tuple[str, str]
"""(reason code, message) of a quarantined record."""
Record = tuple["int | None", "dict[str, Any] | Bad"]
"""(line number, document) or (line number, why it was quarantined)."""


def _text_doc(f: SourceFile, data: bytes, doc_id: str, start_line: int) -> Record:
    try:
        text = _decode_text(f, data)
    except UnicodeDecodeError as exc:
        line = start_line + data.count(b"\n", 0, exc.start)
        return line, ("invalid_utf8", f"invalid {exc.encoding} at byte {exc.start}")
    if not text.strip():
        return start_line, ("empty", "empty document")
    return start_line, {"id": doc_id, "text": text, "source": f.label, "meta": {}}


def _splits_paragraphs(f: SourceFile) -> bool:
    """Whether `doc_bytes` cuts this file: plain text (never code) larger than it."""
    spec = f.spec
    plain = spec.format == "txt" or (spec.format == "auto" and f.rel.lower().endswith(".txt"))
    return spec.doc_bytes is not None and plain and f.path.stat().st_size > spec.doc_bytes


def _text_records(f: SourceFile, hasher: Any) -> Iterator[Record]:
    sep = f.spec.separator
    if not sep and not _splits_paragraphs(f):  # one document per file: read whole
        data = f.path.read_bytes()
        hasher.update(data)
        line, doc = _text_doc(f, data, f.doc_id, 1)
        yield (None if isinstance(doc, dict) or doc[0] == "empty" else line), doc
        return
    # Split streaming (tasks/download/textsplit.py): documents numbered from 1, located by first line.
    with open(f.path, "rb") as fh:
        pieces = (separator_pieces(fh, sep, f.spec.keep_separator, hasher) if sep
                  else paragraph_pieces(fh, f.spec.doc_bytes, hasher))
        for index, (piece, line) in enumerate(pieces, 1):
            yield _text_doc(f, piece, f"{f.doc_id}:{index}", line)


def _make_doc(f: SourceFile, obj: Any, lineno: int, text_field: str) -> dict[str, Any] | Bad:
    if not isinstance(obj, dict):
        return "not_object", f"not a JSON object ({type(obj).__name__})"
    spec = f.spec
    field_name = spec.text_field or text_field
    text = obj.get(field_name)
    if not isinstance(text, str):
        return "no_text_field", f"no string field {field_name!r}"
    if not text.strip():
        return "empty", "empty document"
    doc_id = obj.get(spec.id_field) if spec.id_field else None
    if spec.meta_fields is not None:
        meta = {k: obj[k] for k in spec.meta_fields if k in obj}
    else:
        meta = {k: v for k, v in obj.items() if k not in (field_name, spec.id_field)}
        if isinstance(meta.get("meta"), dict):  # Pile: {"text", "meta": {...}} keeps meta as is
            meta = {**meta.pop("meta"), **meta}
    doc_id = f"{f.doc_id}:{lineno}" if doc_id is None else str(doc_id)
    return {"id": doc_id, "text": text, "source": f.label, "meta": meta}


def _jsonl_records(f: SourceFile, lines: Iterator[bytes], text_field: str) -> Iterator[Record]:
    lineno = 0
    try:
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield lineno, ("invalid_utf8", f"invalid utf-8 at byte {exc.start} of the line")
                continue
            except json.JSONDecodeError as exc:
                yield lineno, ("malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})")
                continue
            yield lineno, _make_doc(f, obj, lineno, text_field)
    except BrokenStream as exc:
        lost = f"lines from {lineno + 1} on are lost" if lineno else "no line could be read"
        yield lineno + 1, (exc.reason, f"{exc}; {lost}")


def _parquet_records(f: SourceFile, text_field: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    row = 0
    try:
        with pq.ParquetFile(f.path) as pf:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH):
                for obj in batch.to_pylist():
                    row += 1
                    yield row, _make_doc(f, obj, row, text_field)
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        yield row + 1, ("corrupt_stream", f"unreadable parquet ({exc}); rows from {row + 1} on are lost")


def read_records(f: SourceFile, text_field: str, hasher: Any) -> Iterator[Record]:
    """Every document and every quarantined record of one source file, in file order."""
    kind = f.kind
    if kind == "text":
        return _text_records(f, hasher)
    if kind == "parquet":
        hasher.update(b"")  # hashed separately (pyarrow reads by offset): see run_download
        return _parquet_records(f, text_field)
    if kind == "json.gz":
        return _jsonl_records(f, gz_lines(f.path, hasher), text_field)
    lines = zst_lines(f.path, hasher) if kind == "jsonl.zst" else _file_lines(f.path, hasher)
    return _jsonl_records(f, lines, text_field)


def read_shard(path: Path) -> Iterator[dict[str, Any]]:
    """The documents of one raw shard, streaming."""
    for line in zst_lines(Path(path)):
        yield json.loads(line)
