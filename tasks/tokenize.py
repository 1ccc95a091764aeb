"""Tokenize stage: a byte-level BPE (trained here or loaded), a deterministic split, packed token rows.

Output, `<workspace>/tokens/<fp>/`:

    tokenizer.json                         the tokenizer every row was encoded with
    train/part-UUUUU-KKKK.parquet ...      packed rows (columns `tokens`, `n_bytes`), zstd
    val/part-UUUUU-KKKK.parquet ...
    index/<split>/part-UUUUU-KKKK.parquet  side table: row -> document ids and byte ranges
    .units/unit-UUUUU.json                 per-input-file completion records (resume)
    manifest.json                          written last (see tasks/stage.py)

Input unit U is the U-th `docs-*.parquet` of the upstream stage. A document is in `val` iff
`int(sha256(f"{split_seed}:{id}")[:8], 16) / 2**32 < val_fraction`, so the split depends on the id
and the seed alone. The train split is drawn per source by `mixture` weights (epochs): a weight w
takes every document floor(w) times plus, for the fraction, the documents whose hash with
`mixture_seed` falls below w - floor(w); copy c of a unit comes in pass c over the unit, so copies of a
document are a whole unit apart. Each (unit, split) is one token stream

    eos  doc_1  eos  doc_2  eos  ...        (eos = `<|endoftext|>`, appended after every document)

cut into rows of `seq_len + 1` tokens that overlap by one: row k is `stream[k*L : k*L + L + 1]`, its
inputs `row[:-1]`, its targets `row[1:]`. The leading eos means the first text token is a target too,
so every text token is a target exactly once; the incomplete tail of each unit is dropped and counted.
Units are independent, so a rerun after a crash keeps the units whose record and files are intact.

Columns: `tokens` (binary: seq_len + 1 little-endian uint16 ids, uint32 past 65536 ids; dictionary
encoding off) and `n_bytes` (int32: UTF-8 bytes of text covered by the row's targets, for
bits-per-byte). Schema metadata `neo.*` names the schema, tokenizer, vocab size, eos id and context
length. The stage checks that the n_bytes of all rows plus the bytes of the dropped tails equal the
bytes of the drawn documents.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import get_run_logger
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from tasks.config import TokenizerConfig
from tasks.prefect_stage import report, stage_task
from tasks.stage import (StageResult, atomic_path, check_accounting, code_version, file_entry,
                         fingerprint, prepare_dir, read_manifest, result_from_manifest, sha256_file,
                         stage_dir, write_json_atomic, write_manifest)
from tasks.token_rows import (INDEX_DIR, SPLITS, STAGE, _complete_manifest,  # noqa: F401 (re-exported)
                              _rows_from_binary, read_chunks, read_rows, rows_of_documents, split_parts)

VERSION = 2
EOS = "<|endoftext|>"
SCHEMA_NAME = "neo-tokens/1"
TOKENIZER_FILE = "tokenizer.json"
UNITS_DIR = ".units"
INFO_KEYS = ("vocab_size", "eos_id", "seq_len", "dtype", "train_bytes", "val_bytes",
             "tokenizer_sha256", "tokenizer_name", "tail_tokens_dropped", "sources")
READ_BATCH_ROWS = 256
"""Documents per Parquet read batch and per `encode_batch` call (documents can be up to ~1 MB)."""
PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"
INDEX_SCHEMA = pa.schema([("row", pa.int32()), ("doc_id", pa.string()), ("source", pa.string()),
                          ("copy", pa.int16()), ("byte_start", pa.int64()), ("byte_end", pa.int64())])


# ---------------------------------------------------------------------------- tokenizer source


_FETCHED: dict[str, dict[str, bytes]] = {}
"""URL sources fetched by this process (plan() runs more than once per stage); paths are reread."""


def _read_location(location: str) -> bytes:
    if location.startswith(("http://", "https://")):
        with urllib.request.urlopen(location, timeout=60) as response:  # noqa: S310 (user's config)
            return response.read()
    return Path(location).expanduser().read_bytes()


def fetch_tokenizer_source(source: str) -> dict[str, bytes]:
    """{file name: bytes}: `tokenizer.json`, or GPT-2 `vocab.json` + `merges.txt`, from a path or URL."""
    is_url = source.startswith(("http://", "https://"))
    if is_url and source in _FETCHED:
        return _FETCHED[source]
    if source.endswith(".json") and not source.endswith("vocab.json"):
        files = {TOKENIZER_FILE: _read_location(source)}
    else:
        base = source if is_url else str(Path(source).expanduser())
        if source.endswith("vocab.json"):  # the vocab file itself: merges.txt sits beside it
            base = base[: -len("vocab.json")]
        join = (lambda n: base + n) if is_url else (lambda n: str(Path(base) / n))
        if not is_url and (Path(base) / TOKENIZER_FILE).is_file():
            files = {TOKENIZER_FILE: _read_location(join(TOKENIZER_FILE))}
        else:
            files = {"vocab.json": _read_location(join("vocab.json")),
                     "merges.txt": _read_location(join("merges.txt"))}
    if is_url:
        _FETCHED[source] = files
    return files


def source_sha256(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def tokenizer_from_files(files: dict[str, bytes], eos: str = EOS) -> Tokenizer:
    """A Tokenizer from fetched files; GPT-2 vocab/merges become a byte-level BPE with `eos` special."""
    if TOKENIZER_FILE in files:
        tokenizer = Tokenizer.from_str(files[TOKENIZER_FILE].decode("utf-8"))
    else:
        vocab = json.loads(files["vocab.json"].decode("utf-8"))
        merges = [tuple(line.split(" ")) for line in files["merges.txt"].decode("utf-8").splitlines()
                  if line and not line.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            raise ValueError("merges.txt: every line must hold two space-separated tokens")
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
    if tokenizer.token_to_id(eos) is None:
        raise ValueError(f"tokenizer.eos_token {eos!r} is not in the loaded tokenizer's vocabulary")
    tokenizer.add_special_tokens([AddedToken(eos, special=True)])  # keeps its id when in the vocab
    return tokenizer


def plan(cfg: TokenizerConfig, upstream: StageResult, workspace: str) -> tuple[str, Path]:
    code = code_version(__name__, VERSION)
    inputs = [upstream.fingerprint]
    if cfg.tokenizer_source is not None:
        inputs.append(f"tokenizer:{source_sha256(fetch_tokenizer_source(cfg.tokenizer_source))}")
    fp = fingerprint(STAGE, cfg, inputs, code)
    return fp, stage_dir(workspace, "tokens", fp)


# ---------------------------------------------------------------------------- split and input


def _unit_hash(seed: int, doc_id: str) -> float:
    return int(hashlib.sha256(f"{seed}:{doc_id}".encode("utf-8")).hexdigest()[:8], 16) / 2**32


def is_val(doc_id: str, val_fraction: float, seed: int = 0) -> bool:
    """The document's split, from a hash of its id and the split seed alone."""
    return _unit_hash(seed, doc_id) < val_fraction


def copies(doc_id: str, weight: float, seed: int = 0) -> int:
    """How many times a train document is drawn at `weight` epochs."""
    whole = math.floor(weight)
    return whole + (1 if weight > whole and _unit_hash(~seed, doc_id) < weight - whole else 0)


def _doc_files(directory: str | Path) -> list[Path]:
    files = sorted(Path(directory).glob("docs-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no docs-*.parquet files in {directory}")
    return files


def _iter_batches(path: Path) -> Iterator[tuple[list[str], list[str], pa.Array]]:
    """(ids, source labels, text column) per read batch of one docs file."""
    pf = pq.ParquetFile(path)
    has_source = "source" in pf.schema_arrow.names
    columns = ["id", "text"] + (["source"] if has_source else [])
    for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
        ids = batch.column("id").to_pylist()
        sources = [s or "" for s in batch.column("source").to_pylist()] if has_source else [""] * len(ids)
        yield ids, sources, batch.column("text")


def _train_sample(files: list[Path], cfg: TokenizerConfig) -> Iterator[str]:
    """Train-split texts in corpus order until `train_sample_bytes` UTF-8 bytes (the last one cut)."""
    left = cfg.train_sample_bytes
    for path in files:
        for ids, _, texts in _iter_batches(path):
            for doc_id, text in zip(ids, texts.to_pylist()):
                if is_val(doc_id, cfg.val_fraction, cfg.split_seed):
                    continue
                data = text.encode("utf-8")
                if len(data) >= left:
                    yield data[:left].decode("utf-8", errors="ignore")  # cut on a character boundary
                    return
                left -= len(data)
                yield text


# ---------------------------------------------------------------------------- tokenizer


@contextlib.contextmanager
def _parallelism() -> Iterator[None]:
    """Let tokenizers use every core for training and encode_batch, unless the user chose already.

    Merges and ids do not depend on the thread count (the BPE trainer breaks count ties by pair id;
    tests compare tokenizer.json across both settings), so this is only about speed: 1.87 vs 3.32 MB/s
    on two cores (REFERENCE.md section 5). The variable is set for the stage's duration only: left set,
    it counts as "configured" and tokenizers would no longer turn parallelism off in processes forked
    later, which can deadlock them.
    """
    if os.environ.get(PARALLELISM_ENV) is not None:
        yield
        return
    os.environ[PARALLELISM_ENV] = "true"
    try:
        yield
    finally:
        os.environ.pop(PARALLELISM_ENV, None)


def train_tokenizer(texts: Iterable[str], vocab_size: int, eos: str = EOS) -> Tokenizer:
    """A GPT-2 style byte-level BPE trained on `texts`; `eos` is id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _text_only(tokenizer: Tokenizer) -> Tokenizer:
    # A literal "<|endoftext|>" inside a document is text: encode it as bytes, not as the eos id, or
    # the document would not round-trip and its bytes would vanish from n_bytes.
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(tokens_dir: str | Path) -> Tokenizer:
    """The stage's tokenizer; special-token text in the input is encoded as plain text."""
    return _text_only(Tokenizer.from_file(str(Path(tokens_dir) / TOKENIZER_FILE)))


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id decodes to, shape [vocab]; special tokens count 0.

    In a byte-level vocabulary every character of a token string stands for exactly one byte."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if token in special:
            continue
        if not alphabet.issuperset(token):
            raise ValueError(f"token {i} ({token!r}) is not in the byte-level alphabet")
        lengths[i] = len(token)
    return lengths


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 while every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def encode_docs(tokenizer: Tokenizer, texts: list[str], eos_id: int,
                dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(the ids of each text followed by eos, concatenated; tokens per document including its eos)."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
    stream = np.fromiter(itertools.chain.from_iterable(x for doc in ids for x in (doc, (eos_id,))),
                         dtype=dtype, count=int(lengths.sum()))
    return stream, lengths


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


class _SplitWriter:
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


# ---------------------------------------------------------------------------- the stage


def _unit_record_path(out: Path, unit: int) -> Path:
    return out / UNITS_DIR / f"unit-{unit:05d}.json"


def _valid_unit(out: Path, record: dict, tokenizer_sha: str) -> bool:
    if record.get("tokenizer_sha256") != tokenizer_sha:
        return False
    return all((out / f["path"]).is_file() and (out / f["path"]).stat().st_size == f["bytes"]
               for s in SPLITS for f in record[s]["files"])


def _resume(out: Path, n_units: int) -> dict[int, dict]:
    """Keep the finished units of a partial run (same fingerprint, same tokenizer.json); delete the
    rest. Without a usable tokenizer.json the directory starts afresh."""
    tok, mark = out / TOKENIZER_FILE, out / UNITS_DIR / "tokenizer.sha256"
    if not (tok.is_file() and mark.is_file() and mark.read_text().strip() == sha256_file(tok)):
        prepare_dir(out)
        return {}
    sha, done = mark.read_text().strip(), {}
    for unit in range(n_units):
        path = _unit_record_path(out, unit)
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(path.read_text())
            if _valid_unit(out, record, sha):
                done[unit] = record
    keep = {tok, mark, out / UNITS_DIR / "tokenizer.name"} | {_unit_record_path(out, u) for u in done}
    keep |= {out / f["path"] for r in done.values() for s in SPLITS for f in r[s]["files"]}
    for path in sorted(out.rglob("*"), reverse=True):
        if path.is_file() and path not in keep:
            path.unlink()
    return done


def _tokenizer_for(cfg: TokenizerConfig, files: list[Path]) -> tuple[Tokenizer, str]:
    """(the tokenizer to save, its name) - loaded from `tokenizer_source` or trained here."""
    if cfg.tokenizer_source is not None:
        fetched = fetch_tokenizer_source(cfg.tokenizer_source)
        name = f"{cfg.tokenizer_source} ({'+'.join(sorted(fetched))})"
        return tokenizer_from_files(fetched, cfg.eos_token), name
    return (train_tokenizer(_train_sample(files, cfg), cfg.vocab_size, cfg.eos_token),
            f"byte-level BPE trained here, vocab {cfg.vocab_size}")


def _weight(cfg: TokenizerConfig, source: str) -> float:
    return cfg.mixture.get(source, 1.0)


def _encode_unit(out: Path, unit: int, path: Path, cfg: TokenizerConfig, tokenizer: Tokenizer,
                 tokenizer_sha: str, metadata: dict[bytes, bytes]) -> dict:
    """Tokenize one docs file into its own rows; its record is written last."""
    eos_id = tokenizer.token_to_id(cfg.eos_token)
    dtype, byte_len = token_dtype(tokenizer.get_vocab_size()), token_byte_lengths(tokenizer)
    writers = {s: _SplitWriter(out, s, unit, cfg, eos_id, dtype, byte_len, metadata) for s in SPLITS}
    docs = {"docs_in": 0, "train": 0, "val": 0, "train_unused": 0}
    passes = max(1, math.ceil(max([1.0, *cfg.mixture.values()])))
    for copy in range(passes):
        for ids, sources, texts in _iter_batches(path):
            is_v = [is_val(i, cfg.val_fraction, cfg.split_seed) for i in ids]
            n = [0 if v else copies(i, _weight(cfg, s), cfg.mixture_seed)
                 for i, s, v in zip(ids, sources, is_v)]
            if copy == 0:
                docs["docs_in"] += len(ids)
                docs["val"] += sum(is_v)
                docs["train"] += len(ids) - sum(is_v)
                docs["train_unused"] += sum(1 for v, k in zip(is_v, n) if not v and k == 0)
            sizes = pc.binary_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
            batch = None
            for split in SPLITS:
                sel = np.array(is_v, bool) if split == "val" else np.array(n, np.int64) > copy
                if split == "val" and copy > 0 or not sel.any():
                    continue
                batch = texts.to_pylist() if batch is None else batch
                pick = np.flatnonzero(sel)
                stream, lengths = encode_docs(tokenizer, [batch[j] for j in pick], eos_id, dtype)
                writers[split].add(stream, lengths, [ids[j] for j in pick], [sources[j] for j in pick],
                                   sizes[pick], copy)
    record = {"unit": unit, "input": path.name, "tokenizer_sha256": tokenizer_sha, "docs": docs,
              **{s: w.finish() for s, w in writers.items()}}
    write_json_atomic(_unit_record_path(out, unit), record)
    return record


def _sum_sources(records: list[dict], split: str) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for r in records:
        for src, acc in r[split]["sources"].items():
            into = total.setdefault(src, {"docs": 0, "bytes": 0, "tokens": 0})
            for k, v in acc.items():
                into[k] += v
    return dict(sorted(total.items()))


def run_tokenize(cfg: TokenizerConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Load or train the tokenizer and write packed rows, unless a complete output directory exists;
    a partial one keeps its finished units."""
    fp, out = plan(cfg, upstream, workspace)
    if (m := read_manifest(out)) is not None:
        return result_from_manifest(out, m, reused=True, info_keys=INFO_KEYS)
    started = time.time()
    files = _doc_files(upstream.path)
    out.mkdir(parents=True, exist_ok=True)
    done = _resume(out, len(files))
    with _parallelism():
        if (out / TOKENIZER_FILE).is_file() and (out / UNITS_DIR / "tokenizer.sha256").is_file():
            name = json.loads((out / UNITS_DIR / "tokenizer.name").read_text())
        else:
            tokenizer, name = _tokenizer_for(cfg, files)
            with atomic_path(out / TOKENIZER_FILE) as tmp:
                tokenizer.save(str(tmp))
            write_json_atomic(out / UNITS_DIR / "tokenizer.name", name)
            with atomic_path(out / UNITS_DIR / "tokenizer.sha256") as tmp:
                tmp.write_text(sha256_file(out / TOKENIZER_FILE))
        tokenizer = load_tokenizer(out)  # encode with exactly what was saved
        tokenizer_sha = sha256_file(out / TOKENIZER_FILE)
        vocab_size, eos_id = tokenizer.get_vocab_size(), tokenizer.token_to_id(cfg.eos_token)
        dtype = token_dtype(vocab_size)
        metadata = {f"neo.{k}".encode(): str(v).encode() for k, v in {
            "schema": SCHEMA_NAME, "tokenizer": name, "tokenizer_sha256": tokenizer_sha,
            "vocab_size": vocab_size, "eos_id": eos_id, "eos_token": cfg.eos_token,
            "seq_len": cfg.seq_len, "dtype": dtype.name}.items()}
        records = [done[u] if u in done else
                   _encode_unit(out, u, path, cfg, tokenizer, tokenizer_sha, metadata)
                   for u, path in enumerate(files)]

    split = {s: {k: sum(r[s][k] for r in records) for k in ("draws", "bytes", "tokens", "rows",
                                                            "tail_tokens", "tail_bytes")} for s in SPLITS}
    docs = {k: sum(r["docs"][k] for r in records) for k in ("docs_in", "train", "val", "train_unused")}
    counts = {"docs_in": docs["docs_in"], "train_docs": docs["train"], "val_docs": docs["val"],
              "train_docs_unused": docs["train_unused"], "train_draws": split["train"]["draws"],
              "train_rows": split["train"]["rows"], "val_rows": split["val"]["rows"],
              "train_tokens": split["train"]["tokens"], "val_tokens": split["val"]["tokens"]}
    check_accounting(counts, docs["docs_in"], ["train_docs", "val_docs"], STAGE)
    for s in SPLITS:
        if split[s]["rows"] == 0:
            raise ValueError(
                f"tokenize: the {s} split has no rows of tokenizer.seq_len={cfg.seq_len} + 1 tokens "
                f"({docs[s]} of {docs['docs_in']} documents, {split[s]['tokens']} tokens at "
                f"tokenizer.val_fraction={cfg.val_fraction}); raise tokenizer.val_fraction, lower "
                f"tokenizer.seq_len or add documents")
    entries = [file_entry(out / TOKENIZER_FILE, out)]
    for s in SPLITS:
        entries += [f for r in records for f in r[s]["files"] if f["path"].startswith(f"{s}/")]
    entries += [f for s in SPLITS for r in records for f in r[s]["files"] if f["path"].startswith(INDEX_DIR)]
    manifest = write_manifest(
        out, stage=STAGE, fp=fp, code=code_version(__name__, VERSION), config=cfg,
        inputs=[upstream.fingerprint], counts=counts, files=entries, started=started,
        schema=SCHEMA_NAME, tokenizer_name=name, vocab_size=vocab_size, eos_id=eos_id,
        seq_len=cfg.seq_len, dtype=dtype.name,
        train_bytes=split["train"]["bytes"], val_bytes=split["val"]["bytes"],
        tokenizer_sha256=tokenizer_sha,
        tail_tokens_dropped={s: split[s]["tail_tokens"] for s in SPLITS},
        tail_bytes_dropped={s: split[s]["tail_bytes"] for s in SPLITS},
        sources={s: _sum_sources(records, s) for s in SPLITS})
    return result_from_manifest(out, manifest, reused=False, info_keys=INFO_KEYS)


@stage_task(STAGE, plan)
def tokenize(cfg: TokenizerConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Tokenize the corpus into fixed-length token rows (tokenizer trained here or loaded)."""
    result = run_tokenize(cfg, upstream, workspace)
    c, info = result.counts, result.info
    get_run_logger().info(
        f"tokenize: {c['train_rows']:,} train / {c['val_rows']:,} val rows of {info['seq_len']} "
        f"from {c['docs_in']:,} documents, vocab {info['vocab_size']:,} (reused: {result.reused})")
    per_source = [f"- {s} {src}: {a['docs']:,} docs drawn, {a['bytes']:,} bytes, {a['tokens']:,} tokens"
                  for s, by in info.get("sources", {}).items() for src, a in by.items()]
    report(STAGE, result, [
        f"- tokenizer: {info.get('tokenizer_name', '')}",
        f"- vocabulary: {info['vocab_size']:,} ({info['dtype']}), eos id {info['eos_id']}",
        f"- bytes per token: train {info['train_bytes'] / max(c['train_tokens'], 1):.2f}, "
        f"val {info['val_bytes'] / max(c['val_tokens'], 1):.2f}",
        f"- tail tokens dropped: {info['tail_tokens_dropped']}",
        f"- tokenizer.json sha256: `{info['tokenizer_sha256']}`", *per_source])
    return result
