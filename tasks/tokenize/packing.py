"""Splitting and packing: which documents a split draws, and how their tokens become rows.

A document is in `val` iff `int(sha256(f"{split_seed}:{id}")[:8], 16) / 2**32 < val_fraction`, so the
split depends on the id and the seed alone. The train split is drawn per source by `mixture` weights
(epochs): a weight w takes every document floor(w) times plus, for the fraction, the documents whose
hash with `mixture_seed` falls below w - floor(w). Each (unit, split) is one token stream

    eos  doc_1  eos  doc_2  eos  ...        (eos = `<|endoftext|>`, appended after every document)

cut into rows of `seq_len + 1` tokens that overlap by one: row k is `stream[k*L : k*L + L + 1]`, its
inputs `row[:-1]`, its targets `row[1:]`. The leading eos means the first text token is a target too,
so every text token is a target exactly once; the incomplete tail is dropped and counted.

`SplitWriter` writes the rows as Parquet parts with columns `tokens` (binary: seq_len + 1
little-endian uint16 ids, uint32 past 65536 ids; dictionary encoding off) and `n_bytes` (int32: UTF-8
bytes of text covered by the row's targets, for bits-per-byte), plus a side table per part (row ->
document ids and byte ranges), and checks that the n_bytes of all rows plus the bytes of the dropped
tail equal the bytes of the documents drawn.
"""
from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.data_config import TokenizerConfig
from tasks.core.protocol import atomic_path, file_entry
from tasks.tokenize.rows import INDEX_DIR

INDEX_SCHEMA = pa.schema([("row", pa.int32()), ("doc_id", pa.string()), ("source", pa.string()),
                          ("copy", pa.int16()), ("byte_start", pa.int64()), ("byte_end", pa.int64())])


# ---------------------------------------------------------------------------- split


def _unit_hash(seed: int, doc_id: str) -> float:
    return int(hashlib.sha256(f"{seed}:{doc_id}".encode("utf-8")).hexdigest()[:8], 16) / 2**32


def is_val(doc_id: str, val_fraction: float, seed: int = 0) -> bool:
    """The document's split, from a hash of its id and the split seed alone."""
    return _unit_hash(seed, doc_id) < val_fraction


def copies(doc_id: str, weight: float, seed: int = 0) -> int:
    """How many times a train document is drawn at `weight` epochs."""
    whole = math.floor(weight)
    return whole + (1 if weight > whole and _unit_hash(~seed, doc_id) < weight - whole else 0)


# ---------------------------------------------------------------------------- packing


def pack_rows(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [n, seq_len + 1], rest): row k = stream[k*L : k*L + L + 1]; rest = stream[n*L:] starts
    with the last row's final token, which the next row repeats as its first input."""
    n = max(0, (len(stream) - 1) // seq_len)
    if n == 0:
        return np.empty((0, seq_len + 1), dtype=stream.dtype), stream
    windows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len][:n]
    return np.ascontiguousarray(windows), stream[n * seq_len:]


def _binary_column(rows: np.ndarray) -> pa.Array:
    """One binary value per row, built over the row-major buffer without a per-row copy."""
    n, width = rows.shape[0], rows.shape[1] * rows.itemsize
    large = n * width >= 2**31  # binary offsets are int32
    offsets = np.arange(n + 1, dtype=np.int64 if large else np.int32) * width
    return pa.Array.from_buffers(pa.large_binary() if large else pa.binary(), n,
                                 [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(rows))])


def segments(start: int, lengths: np.ndarray, cum_bytes: np.ndarray, seq_len: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which rows each document reaches: (doc index, row, byte_start, byte_end) per (doc, row) pair.

    Documents occupy consecutive stream positions from `start` (their eos last); row k's targets are
    positions kL+1 .. kL+L. `cum_bytes[j]` = text bytes of this batch's tokens before position
    start + j. Byte offsets are within the document."""
    s = start + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    e = s + lengths - 1  # the eos position, inclusive
    k0, k1 = (s - 1) // seq_len, (e - 1) // seq_len
    per = k1 - k0 + 1
    doc = np.repeat(np.arange(len(lengths)), per)
    row = k0[doc] + np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)
    a = np.maximum(s[doc], row * seq_len + 1)
    b = np.minimum(e[doc], row * seq_len + seq_len)
    base = cum_bytes[s[doc] - start]
    return doc, row, cum_bytes[a - start] - base, cum_bytes[b + 1 - start] - base


class SplitWriter:
    """Packs one (unit, split) stream into rows; writes token parts and their side tables."""

    def __init__(self, out: Path, split: str, unit: int, cfg: TokenizerConfig, eos_id: int,
                 dtype: np.dtype, byte_len: np.ndarray, metadata: dict[bytes, bytes]) -> None:
        self.out, self.split, self.unit, self.cfg, self.byte_len = out, split, unit, cfg, byte_len
        self.metadata = {**metadata, b"neo.split": split.encode()}
        self.rest = np.array([eos_id], dtype=dtype)  # the leading eos: context for the first document
        self.pos = 1  # stream position of the next token
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.seg: list[tuple] = []
        self.files: list[dict] = []
        self.draws = self.doc_bytes = self.tokens = self.rows = self.row_bytes = 0
        self.by_source: dict[str, dict[str, int]] = defaultdict(lambda: {"docs": 0, "bytes": 0, "tokens": 0})
        self.group_rows = max(1, cfg.row_group_tokens // (cfg.seq_len + 1))

    def add(self, ids: np.ndarray, lengths: np.ndarray, doc_ids: list[str], sources: list[str],
            sizes: np.ndarray, copy: int) -> None:
        self.draws += len(doc_ids)
        self.doc_bytes += int(sizes.sum())
        self.tokens += len(ids)
        for src, size, n in zip(sources, sizes.tolist(), lengths.tolist()):
            acc = self.by_source[src]
            acc["docs"] += 1
            acc["bytes"] += size
            acc["tokens"] += n
        cum = np.concatenate([[0], np.cumsum(self.byte_len[ids])])
        doc, row, b0, b1 = segments(self.pos, lengths, cum, self.cfg.seq_len)
        self.seg.append((row, pa.array(doc_ids).take(pa.array(doc)), pa.array(sources).take(pa.array(doc)),
                         np.full(len(row), copy, np.int16), b0, b1))
        self.pos += len(ids)
        rows, self.rest = pack_rows(np.concatenate([self.rest, ids]), self.cfg.seq_len)
        if len(rows):
            self.pending.append(rows)
            self.pending_rows += len(rows)
        while self.pending_rows >= self.cfg.rows_per_file:
            self._flush(self.cfg.rows_per_file)

    def _take_segments(self, end_row: int) -> pa.Table:
        """The side-table entries of rows [self.rows, end_row), rows renumbered within the file."""
        row = np.concatenate([s[0] for s in self.seg])
        cols = [pa.chunked_array([s[i] for s in self.seg]).combine_chunks() for i in (1, 2)]
        rest = [np.concatenate([s[i] for s in self.seg]) for i in (3, 4, 5)]
        cut = int(np.searchsorted(row, end_row))  # segments come in row order
        table = pa.table([pa.array(row[:cut] - self.rows, pa.int32()), cols[0][:cut], cols[1][:cut],
                          pa.array(rest[0][:cut]), pa.array(rest[1][:cut]), pa.array(rest[2][:cut])],
                         schema=INDEX_SCHEMA)
        self.seg = [(row[cut:], cols[0][cut:], cols[1][cut:], rest[0][cut:], rest[1][cut:], rest[2][cut:])]
        return table

    def _flush(self, n: int) -> None:
        rows = np.concatenate(self.pending)
        head, tail = rows[:n], rows[n:]
        self.pending, self.pending_rows = ([tail] if len(tail) else []), len(tail)
        n_bytes = self.byte_len[head[:, 1:]].sum(axis=1)
        table = pa.table({"tokens": _binary_column(head), "n_bytes": pa.array(n_bytes, pa.int32())})
        name = f"part-{self.unit:05d}-{len(self.files) // 2:04d}.parquet"
        path = self.out / self.split / name
        with atomic_path(path) as tmp:
            pq.write_table(table.replace_schema_metadata(self.metadata), tmp, compression="zstd",
                           use_dictionary=False, write_statistics=["n_bytes"],
                           row_group_size=self.group_rows)
        index = self._take_segments(self.rows + n)
        index_path = self.out / INDEX_DIR / self.split / name
        with atomic_path(index_path) as tmp:
            pq.write_table(index, tmp, compression="zstd")
        self.files += [file_entry(path, self.out, rows=n), file_entry(index_path, self.out, rows=len(index))]
        self.rows += n
        self.row_bytes += int(n_bytes.sum())

    def finish(self) -> dict:
        """Write the last, short file; check the accounting; the (unit, split) record."""
        if self.pending_rows:
            self._flush(self.pending_rows)
        tail = self.rest[1:]  # rest[0] is already the target of the last row (or the leading eos)
        tail_bytes = int(self.byte_len[tail].sum())
        where = f"tokenize/{self.split}/unit {self.unit}"
        if self.row_bytes + tail_bytes != self.doc_bytes:
            raise RuntimeError(f"{where}: byte accounting broken: rows cover {self.row_bytes} bytes, "
                               f"dropped tail {tail_bytes}, documents hold {self.doc_bytes}")
        if self.rows * self.cfg.seq_len + len(tail) != self.tokens:
            raise RuntimeError(f"{where}: token accounting broken: {self.rows} rows x {self.cfg.seq_len} "
                               f"+ tail {len(tail)} != {self.tokens} tokens")
        return {"draws": self.draws, "bytes": self.doc_bytes, "tokens": self.tokens, "rows": self.rows,
                "tail_tokens": len(tail), "tail_bytes": tail_bytes, "files": self.files,
                "sources": dict(self.by_source)}
