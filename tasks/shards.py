"""Per-shard work units of the clean and dedup stages, run in worker processes.

Each unit reads one input shard and writes one directory of outputs under a name derived from its
input shard's content hash, config and code version, so a grown corpus only runs units for shards
it has not seen. Files are written under temporary names and renamed; `shard.json` is written last
and records the file sizes: a unit directory without it, or with a file of another size, is a
partial run and is redone, never trusted. Scratch directories of a stage's global step are locked
by their run and removed by the next run when a killed one left them (`scratch_dir`). Nothing here
imports Prefect (spawned workers start fast).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.config import CleanConfig, DedupConfig
from tasks.filters import LINE_RULES, clean_document, fixer_config
from tasks.minhash import band_keys, document_hashes, hash_params, oph_flat, signatures
from tasks.readers import read_shard
from tasks.stage import atomic_path, write_json_atomic

DOC_COLUMNS = ("id", "text", "source")
DOC_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])
REJECT_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                           ("value", pa.float64()), ("n_chars", pa.int64()), ("profile", pa.string())])
DUPLICATE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()),
                              ("duplicate_of", pa.string()), ("cluster", pa.string()),
                              ("kind", pa.string()), ("similarity", pa.float64())])
FLUSH_ROWS = 2048
FLUSH_CHARS = 32_000_000
"""A Parquet row group is written when either bound is reached: bounded memory for any corpus."""
READ_BATCH_ROWS = 256
DONE = "shard.json"
SCRATCH_LOCK = ".lock"
"""In a scratch directory: flocked by its run while it lives (`remove_stale_scratch`)."""
IMPORTED = time.time()


# ---------------------------------------------------------------------------- Parquet helpers


class ParquetSink:
    """Rows into one zstd Parquet file in bounded batches, under a temporary name until closed."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema, self.rows = Path(path), schema, 0
        self._columns: dict[str, list] = {name: [] for name in schema.names}
        self._chars = 0

    def __enter__(self) -> ParquetSink:
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._writer = self._stack.enter_context(pq.ParquetWriter(tmp, self.schema, compression="zstd"))
        return self

    def add(self, **row: Any) -> None:
        for name, values in self._columns.items():
            value = row[name]
            values.append(value)
            if isinstance(value, str):
                self._chars += len(value)
        self.rows += 1
        if len(self._columns[self.schema.names[0]]) >= FLUSH_ROWS or self._chars >= FLUSH_CHARS:
            self._flush()

    def _flush(self) -> None:
        if self._columns[self.schema.names[0]]:
            self._writer.write_table(pa.Table.from_pydict(self._columns, schema=self.schema))
            self._columns = {name: [] for name in self.schema.names}
            self._chars = 0

    def __exit__(self, *exc: Any) -> bool | None:
        if exc[0] is None:
            self._flush()
        return self._stack.__exit__(*exc)


def iter_parquet_rows(path: Path, columns: Sequence[str] = DOC_COLUMNS) -> Iterator[dict[str, Any]]:
    """Rows of one Parquet file as dicts, read in small batches."""
    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=list(columns)):
            yield from batch.to_pylist()


# ---------------------------------------------------------------------------- unit directories


def read_done(directory: Path) -> dict | None:
    """The summary of a complete unit directory, or None (missing, partial or damaged)."""
    path = Path(directory) / DONE
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for name, size in summary.get("bytes", {}).items():
        p = Path(directory) / name
        if not p.is_file() or p.stat().st_size != size:
            return None
    return summary


def _start(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)


def _finish(directory: Path, summary: dict, names: Sequence[str]) -> dict:
    summary["bytes"] = {n: (directory / n).stat().st_size for n in names}
    write_json_atomic(directory / DONE, summary)
    return summary


def _context() -> multiprocessing.context.BaseContext:
    """forkserver: workers fork from a clean server process that imported this module once, so
    they start in milliseconds without inheriting the caller's threads (Prefect's event loop)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def pool_map(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int | None) -> list[Any]:
    """`[fn(*job) for job in jobs]`, in worker processes when more than one is useful."""
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        return [fn(*job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=_context()) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in futures]


def link(src: Path, dst: Path) -> None:
    """Hard-link an immutable file (a unit output, an unchanged input) to `dst` (copy across
    filesystems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _npy(directory: Path, name: str, array: np.ndarray) -> None:
    with atomic_path(directory / name) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


# ---------------------------------------------------------------------------- scratch directories


def _process_started() -> float:
    """When this process started (Linux /proc), else when this module was imported."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK") - 1.0  # btime is whole seconds: err early
    except (OSError, ValueError, IndexError, StopIteration):
        return IMPORTED


def remove_stale_scratch(parent: Path, prefix: str) -> list[str]:
    """Remove the `<prefix>-*` scratch directories under `parent` that killed runs left, and return
    their names. A run holds an exclusive flock on its directory's `SCRATCH_LOCK` for as long as
    it lives, and the kernel releases it when the process dies, however it dies: a directory whose
    lock can be taken is stale, one whose lock is held belongs to a concurrent run and stays. A
    directory without a lock file (left by older code, or by a run killed between creating the
    directory and its lock) goes only if nothing in it changed since this process started."""
    removed, started = [], _process_started()
    for directory in sorted(parent.glob(f"{prefix}-*")):
        try:
            fd = os.open(directory / SCRATCH_LOCK, os.O_RDWR)
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                changed = max(p.stat().st_mtime for p in [directory, *directory.iterdir()])
                if changed < started:
                    shutil.rmtree(directory, ignore_errors=True)
                    removed.append(directory.name)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live run
            os.close(fd)
            continue
        try:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory.name)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def scratch_dir(parent: Path | None, prefix: str) -> Iterator[Path]:
    """A new scratch directory, removed on exit. Under a stage's `parent`, stale ones are removed
    first (`remove_stale_scratch`) and the new one is locked while in use; without a `parent`, a
    plain temporary directory."""
    if parent is None:
        with tempfile.TemporaryDirectory(prefix=f"{prefix}-") as tmp:
            yield Path(tmp)
        return
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=parent))
    try:
        with open(tmp / SCRATCH_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- clean unit


def clean_shard(cfg: CleanConfig, shard: str, out: str, reasons: Sequence[str]) -> dict:
    """Repair, normalize and filter one raw shard into `docs.parquet` + `rejected.parquet`."""
    directory = Path(out)
    if (done := read_done(directory)) is not None:
        return {**done, "reused": True}
    started = time.time()
    _start(directory)
    fixer = fixer_config(cfg)
    counts = {"docs_in": 0, "kept": 0, **{f"rejected:{r}": 0 for r in reasons}}
    stats = {"repaired": 0, "ast_reverted": 0}
    lines_removed = dict.fromkeys(LINE_RULES, 0)
    profiles: dict[str, int] = {}
    cleaning = 0.0  # seconds in repair, normalization, line rules and filters; the rest is I/O
    with ParquetSink(directory / "docs.parquet", DOC_SCHEMA) as docs, \
            ParquetSink(directory / "rejected.parquet", REJECT_SCHEMA) as rejected:
        for doc in read_shard(Path(shard)):  # a truncated shard raises BrokenStream
            counts["docs_in"] += 1
            t = time.perf_counter()
            out = clean_document(doc["text"], doc["id"], cfg, fixer)
            cleaning += time.perf_counter() - t
            profiles[out.profile] = profiles.get(out.profile, 0) + 1
            stats["repaired"] += out.repaired
            stats["ast_reverted"] += out.ast_reverted
            for rule, n in out.lines_removed.items():
                lines_removed[rule] += n
            if out.rejection is None:
                docs.add(id=doc["id"], text=out.text, source=doc["source"])
                counts["kept"] += 1
            else:
                reason, value = out.rejection
                rejected.add(id=doc["id"], source=doc["source"], reason=reason, value=float(value),
                             n_chars=len(out.text), profile=out.profile)
                counts[f"rejected:{reason}"] += 1
    summary = {"counts": counts, **stats, "lines_removed": lines_removed, "profiles": profiles,
               "seconds": time.time() - started, "cleaning_seconds": cleaning}
    return {**_finish(directory, summary, ["docs.parquet", "rejected.parquet"]), "reused": False}


# ---------------------------------------------------------------------------- dedup units


def signature_shard(cfg: DedupConfig, docs: str, out: str) -> dict:
    """Exact keys, MinHash signatures and LSH band keys of one clean shard, as .npy files."""
    directory = Path(out)
    if (done := read_done(directory)) is not None:
        return {**done, "reused": True}
    started = time.time()
    _start(directory)
    texts = pq.read_table(docs, columns=["text"], use_threads=False).column("text").to_pylist()
    hashed = document_hashes(texts, cfg.ngram, cfg.near, cfg.normalize_whitespace, cfg.lowercase)
    del texts
    exact, num_perm = hashed.exact, cfg.bands * cfg.rows
    if not cfg.near:
        sig = np.zeros((len(exact), num_perm), dtype=np.uint32)
    elif cfg.method == "oph":
        sig = oph_flat(hashed.shingles, hashed.offsets, num_perm, cfg.seed)
    else:
        shingles = np.split(hashed.shingles, hashed.offsets[1:-1])
        sig = signatures(shingles, *hash_params(num_perm, cfg.seed))
    near = np.diff(hashed.offsets) > 0
    _npy(directory, "exact.npy", exact)
    _npy(directory, "signatures.npy", sig)
    _npy(directory, "bands.npy", band_keys(sig, cfg.bands, cfg.rows))
    _npy(directory, "near.npy", near)
    summary = {"rows": int(len(exact)), "near": int(near.sum()), "seconds": time.time() - started}
    names = ["exact.npy", "signatures.npy", "bands.npy", "near.npy"]
    return {**_finish(directory, summary, names), "reused": False}


def write_dedup_shard(docs: str, out: str, duplicate_rows: list[int], ledger: list[dict]) -> dict:
    """One clean shard minus its duplicate rows into `docs.parquet`, its ledger rows into
    `duplicates.parquet`."""
    directory = Path(out)
    if (done := read_done(directory)) is not None:
        return {**done, "reused": True}
    started = time.time()
    _start(directory)
    source = pq.ParquetFile(docs)
    if duplicate_rows or source.schema_arrow.names != list(DOC_COLUMNS):
        table = source.read(use_threads=False)  # the shards themselves run in parallel
        keep = np.ones(table.num_rows, dtype=bool)
        keep[duplicate_rows] = False
        with atomic_path(directory / "docs.parquet") as tmp:
            pq.write_table(table.filter(pa.array(keep)).select(list(DOC_COLUMNS)), tmp,
                           compression="zstd", row_group_size=FLUSH_ROWS)
    else:  # nothing removed: the clean shard itself (same columns, immutable), not a rewrite
        link(Path(docs), directory / "docs.parquet")
        keep = np.ones(source.metadata.num_rows, dtype=bool)
    source.close()
    with atomic_path(directory / "duplicates.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(ledger, schema=DUPLICATE_SCHEMA), tmp, compression="zstd")
    summary = {"kept": int(keep.sum()), "duplicates": len(duplicate_rows),
               "seconds": time.time() - started}
    return {**_finish(directory, summary, ["docs.parquet", "duplicates.parquet"]), "reused": False}
