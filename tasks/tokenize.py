"""Tokenize stage: train a byte-level BPE on the train split, pack both splits into fixed-length rows.

Output, `<workspace>/tokenize/<fp>/`:

    tokenizer.json                 GPT-2 style byte-level BPE with one special token, `<|endoftext|>`
    train/part-00000.parquet ...   `cfg.rows_per_file` rows each, zstd
    val/part-00000.parquet ...
    manifest.json                  written last (see tasks/stage.py)

A document is in `val` iff `int(sha256(id)[:8], 16) / 2**32 < val_fraction`, so the split depends on
the id alone, never on file order or corpus size. Each split is one token stream

    eos  doc_1  eos  doc_2  eos  ...        (eos = `<|endoftext|>`, appended after every document)

cut into rows of `seq_len + 1` tokens that overlap by one: row k is `stream[k*L : k*L + L + 1]`, its
inputs `row[:-1]`, its targets `row[1:]`. The leading eos means the first text token is a target too,
so every text token is a target exactly once; the incomplete tail is dropped and counted.

Columns: `tokens` (binary: seq_len + 1 little-endian uint16 ids, uint32 past 65536 ids) and `n_bytes`
(int32: UTF-8 bytes of text covered by the row's targets, for bits-per-byte). The stage checks that
the n_bytes of all rows plus the bytes of the dropped tail equal the bytes of the split's documents.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import get_run_logger
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tasks.config import TokenizerConfig
from tasks.prefect_stage import report, stage_task
from tasks.stage import (StageResult, atomic_path, check_accounting, code_version, file_entry,
                         fingerprint, prepare_dir, read_manifest, result_from_manifest, sha256_file,
                         stage_dir, write_manifest)

STAGE = "tokenize"
VERSION = 1
EOS = "<|endoftext|>"
SPLITS = ("train", "val")
TOKENIZER_FILE = "tokenizer.json"
INFO_KEYS = ("vocab_size", "eos_id", "seq_len", "dtype", "train_bytes", "val_bytes",
             "tokenizer_sha256", "tail_tokens_dropped")
READ_BATCH_ROWS = 256
"""Documents per Parquet read batch and per `encode_batch` call (documents can be up to ~1 MB)."""
PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"


def plan(cfg: TokenizerConfig, upstream: StageResult, workspace: str) -> tuple[str, Path]:
    code = code_version(__name__, VERSION)
    fp = fingerprint(STAGE, cfg, [upstream.fingerprint], code)
    return fp, stage_dir(workspace, "tokens", fp)


# ---------------------------------------------------------------------------- split and input


def is_val(doc_id: str, val_fraction: float) -> bool:
    """The document's split, from a hash of its id alone."""
    return int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:8], 16) / 2**32 < val_fraction


def _doc_files(directory: str | Path) -> list[Path]:
    files = sorted(Path(directory).glob("docs-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no docs-*.parquet files in {directory}")
    return files


def _iter_batches(files: list[Path], val_fraction: float) -> Iterator[tuple[np.ndarray, pa.Array]]:
    """(is_val mask, text column) per read batch, in file and row order."""
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH_ROWS, columns=["id", "text"]):
            mask = np.array([is_val(i, val_fraction) for i in batch.column("id").to_pylist()], dtype=bool)
            yield mask, batch.column("text")


def _train_sample(files: list[Path], val_fraction: float, max_bytes: int) -> Iterator[str]:
    """Train-split texts in corpus order until `max_bytes` UTF-8 bytes (the last one cut to fit)."""
    left = max_bytes
    for mask, texts in _iter_batches(files, val_fraction):
        for text in itertools.compress(texts.to_pylist(), ~mask):
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


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE trained on `texts`; `<|endoftext|>` is id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
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


def encode_docs(tokenizer: Tokenizer, texts: list[str], eos_id: int, dtype: np.dtype) -> np.ndarray:
    """The ids of each text followed by eos, concatenated."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    total = sum(map(len, ids)) + len(ids)
    return np.fromiter(itertools.chain.from_iterable(x for doc in ids for x in (doc, (eos_id,))),
                       dtype=dtype, count=total)


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


class _SplitWriter:
    """Packs one split's stream into rows and writes `<split>/part-NNNNN.parquet` files."""

    def __init__(self, out: Path, split: str, cfg: TokenizerConfig, eos_id: int,
                 dtype: np.dtype, byte_len: np.ndarray) -> None:
        self.out, self.split, self.cfg, self.byte_len = out, split, cfg, byte_len
        self.rest = np.array([eos_id], dtype=dtype)  # the leading eos: context for the first document
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.files: list[dict] = []
        self.docs = self.doc_bytes = self.tokens = self.rows = self.row_bytes = 0

    def add(self, ids: np.ndarray, docs: int, doc_bytes: int) -> None:
        self.docs += docs
        self.doc_bytes += doc_bytes
        self.tokens += len(ids)
        rows, self.rest = pack_rows(np.concatenate([self.rest, ids]), self.cfg.seq_len)
        if len(rows):
            self.pending.append(rows)
            self.pending_rows += len(rows)
        while self.pending_rows >= self.cfg.rows_per_file:
            self._flush(self.cfg.rows_per_file)

    def _flush(self, n: int) -> None:
        rows = np.concatenate(self.pending)
        head, tail = rows[:n], rows[n:]
        self.pending, self.pending_rows = ([tail] if len(tail) else []), len(tail)
        n_bytes = self.byte_len[head[:, 1:]].sum(axis=1)
        table = pa.table({"tokens": _binary_column(head), "n_bytes": pa.array(n_bytes, pa.int32())})
        path = self.out / self.split / f"part-{len(self.files):05d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        self.files.append(file_entry(path, self.out, rows=n))
        self.rows += n
        self.row_bytes += int(n_bytes.sum())

    def finish(self) -> tuple[int, int]:
        """Write the last, short file; return (tail tokens dropped, their bytes)."""
        if self.pending_rows:
            self._flush(self.pending_rows)
        tail = self.rest[1:]  # rest[0] is already the target of the last row (or the leading eos)
        tail_bytes = int(self.byte_len[tail].sum())
        where = f"tokenize/{self.split}"
        if self.row_bytes + tail_bytes != self.doc_bytes:
            raise RuntimeError(f"{where}: byte accounting broken: rows cover {self.row_bytes} bytes, "
                               f"dropped tail {tail_bytes}, documents hold {self.doc_bytes}")
        if self.rows * self.cfg.seq_len + len(tail) != self.tokens:
            raise RuntimeError(f"{where}: token accounting broken: {self.rows} rows x {self.cfg.seq_len} "
                               f"+ tail {len(tail)} != {self.tokens} tokens")
        return len(tail), tail_bytes


# ---------------------------------------------------------------------------- reading rows


def _rows_from_binary(chunk: pa.Array, dtype: np.dtype, width: int) -> np.ndarray:
    """[n, width] ids viewing the chunk's data buffer (zero copy, read-only)."""
    if chunk.null_count:
        raise ValueError("tokens column has nulls")
    n = len(chunk)
    offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
    offsets = np.frombuffer(chunk.buffers()[1], dtype=offset_type)[chunk.offset: chunk.offset + n + 1]
    row_bytes = width * dtype.itemsize
    if n and not np.all(np.diff(offsets) == row_bytes):
        raise ValueError(f"tokens rows are not all {width} ids of {dtype}")
    if n == 0:
        return np.empty((0, width), dtype=dtype)
    return np.frombuffer(chunk.buffers()[2], dtype=dtype, count=n * width,
                         offset=int(offsets[0])).reshape(n, width)


def read_rows(tokens_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, seq_len + 1] in the stage's dtype, n_bytes [N] int64) of one split, files in order.

    Zero copy (and then read-only) when the split is a single Parquet chunk; callers cast batches
    with `.astype(np.int64)`."""
    tokens_dir = Path(tokens_dir)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    manifest = read_manifest(tokens_dir)
    if manifest is None or manifest.get("stage") != STAGE:
        raise FileNotFoundError(f"{tokens_dir} is not a complete tokenize stage directory")
    dtype, width = np.dtype(manifest["dtype"]).newbyteorder("<"), manifest["seq_len"] + 1
    paths = [f["path"] for f in manifest["files"] if f["path"].startswith(f"{split}/")]  # write order
    tokens, n_bytes = [], []
    for rel in paths:
        table = pq.read_table(tokens_dir / rel, columns=["tokens", "n_bytes"])
        tokens += [_rows_from_binary(c, dtype, width) for c in table.column("tokens").chunks]
        n_bytes.append(table.column("n_bytes").to_numpy().astype(np.int64))
    if not tokens:
        return np.empty((0, width), dtype=dtype), np.empty(0, dtype=np.int64)
    rows = tokens[0] if len(tokens) == 1 else np.concatenate(tokens)
    return rows, np.concatenate(n_bytes)


# ---------------------------------------------------------------------------- the stage


def run_tokenize(cfg: TokenizerConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Train the tokenizer and write packed rows, unless a complete output directory exists."""
    fp, out = plan(cfg, upstream, workspace)
    if (m := read_manifest(out)) is not None:
        return result_from_manifest(out, m, reused=True, info_keys=INFO_KEYS)
    started = time.time()
    files = _doc_files(upstream.path)
    prepare_dir(out)
    with _parallelism():
        tokenizer = train_tokenizer(_train_sample(files, cfg.val_fraction, cfg.train_sample_bytes),
                                    cfg.vocab_size)
        with atomic_path(out / TOKENIZER_FILE) as tmp:
            tokenizer.save(str(tmp))
        tokenizer = load_tokenizer(out)  # encode with exactly what was saved
        vocab_size, eos_id = tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS)
        dtype, byte_len = token_dtype(vocab_size), token_byte_lengths(tokenizer)
        writers = {s: _SplitWriter(out, s, cfg, eos_id, dtype, byte_len) for s in SPLITS}
        docs_in = 0
        for mask, texts in _iter_batches(files, cfg.val_fraction):
            docs_in += len(texts)
            sizes = pc.binary_length(texts).to_numpy(zero_copy_only=False)
            batch = texts.to_pylist()
            for split, sel in (("train", ~mask), ("val", mask)):
                if sel.any():
                    chosen = list(itertools.compress(batch, sel))
                    writers[split].add(encode_docs(tokenizer, chosen, eos_id, dtype),
                                       len(chosen), int(sizes[sel].sum()))
        tails = {s: w.finish() for s, w in writers.items()}

    train, val = writers["train"], writers["val"]
    counts = {"docs_in": docs_in, "train_docs": train.docs, "val_docs": val.docs,
              "train_rows": train.rows, "val_rows": val.rows,
              "train_tokens": train.tokens, "val_tokens": val.tokens}
    check_accounting(counts, docs_in, ["train_docs", "val_docs"], STAGE)
    for split, w in writers.items():
        if w.rows == 0:
            raise ValueError(
                f"tokenize: the {split} split has no rows of tokenizer.seq_len={cfg.seq_len} + 1 tokens "
                f"({w.docs} of {counts['docs_in']} documents, {w.tokens} tokens at "
                f"tokenizer.val_fraction={cfg.val_fraction}); raise tokenizer.val_fraction, lower "
                f"tokenizer.seq_len or add documents")
    entries = [file_entry(out / TOKENIZER_FILE, out)] + train.files + val.files
    manifest = write_manifest(
        out, stage=STAGE, fp=fp, code=code_version(__name__, VERSION), config=cfg,
        inputs=[upstream.fingerprint], counts=counts, files=entries, started=started,
        vocab_size=vocab_size, eos_id=eos_id, seq_len=cfg.seq_len, dtype=dtype.name,
        train_bytes=train.doc_bytes, val_bytes=val.doc_bytes,
        tokenizer_sha256=sha256_file(out / TOKENIZER_FILE),
        tail_tokens_dropped={s: t[0] for s, t in tails.items()},
        tail_bytes_dropped={s: t[1] for s, t in tails.items()})
    return result_from_manifest(out, manifest, reused=False, info_keys=INFO_KEYS)


@stage_task(STAGE, plan)
def tokenize(cfg: TokenizerConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Train a byte-level BPE and pack the corpus into fixed-length token rows."""
    result = run_tokenize(cfg, upstream, workspace)
    c, info = result.counts, result.info
    get_run_logger().info(
        f"tokenize: {c['train_rows']:,} train / {c['val_rows']:,} val rows of {info['seq_len']} "
        f"from {c['docs_in']:,} documents, vocab {info['vocab_size']:,} (reused: {result.reused})")
    report(STAGE, result, [
        f"- vocabulary: {info['vocab_size']:,} ({info['dtype']}), eos id {info['eos_id']}",
        f"- bytes per token: train {info['train_bytes'] / max(c['train_tokens'], 1):.2f}, "
        f"val {info['val_bytes'] / max(c['val_tokens'], 1):.2f}",
        f"- tail tokens dropped: {info['tail_tokens_dropped']}",
        f"- tokenizer.json sha256: `{info['tokenizer_sha256']}`"])
    return result
