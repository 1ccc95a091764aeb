"""Per-shard work units (of the clean and dedup stages), run in worker processes.

Each unit reads one input shard and writes one directory of outputs under a name derived from its
input shard's content hash, config and code version, so a grown corpus only runs units for shards
it has not seen. Files are written under temporary names and renamed; `manifest.json` is written last
and records the file sizes: a unit directory without it, or with a file of another size, is a
partial run and is redone, never trusted. Scratch directories of a stage's global step are locked
by their run and removed by the next run when a killed one left them (`scratch_dir`). Nothing here
imports Prefect (spawned workers start fast).
"""
from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.cpus import available_cpus
from tasks.core.protocol import (MANIFEST, Computed, Stage, StageResult, atomic_path, read_manifest, read_marker,
                                 run_stage, stable_hash, write_marker)

DOC_COLUMNS = ("id", "text", "source")
DOC_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])
FLUSH_ROWS = 2048
FLUSH_CHARS = 32_000_000
"""A Parquet row group is written when either bound is reached: bounded memory for any corpus."""
READ_BATCH_ROWS = 256
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
    """The summary of a complete unit directory, or None (missing, partial or damaged): its
    `manifest.json` marker, the same kind a stage directory has (`tasks/core/protocol.py`)."""
    return read_marker(Path(directory) / MANIFEST, Path(directory))


def start_unit(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)


def finish_unit(directory: Path, summary: dict, names: Sequence[str]) -> dict:
    """Write the unit's marker last: its summary plus the files it vouches for, with their sizes."""
    files = [{"path": n, "bytes": (directory / n).stat().st_size} for n in names]
    return write_marker(directory / MANIFEST, files, **summary)


def _context(module: str) -> multiprocessing.context.BaseContext:
    """forkserver: workers fork from a clean server process that imported the unit's module once,
    so they start in milliseconds without inheriting the caller's threads (Prefect's event loop)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, module])  # only the first call's list counts (one server)
    return ctx


def pool_map(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int | None) -> list[Any]:
    """`[fn(*job) for job in jobs]`, in worker processes when more than one is useful."""
    workers = min(workers or available_cpus(), len(jobs))
    if workers <= 1:
        return [fn(*job) for job in jobs]
    try:
        with ProcessPoolExecutor(workers, mp_context=_context(fn.__module__)) as pool:
            futures = [pool.submit(fn, *job) for job in jobs]
            return [f.result() for f in futures]
    except BrokenProcessPool as exc:
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        raise RuntimeError(
            f"worker processes for {fn.__name__} died ({exc}). Worker processes import the main "
            f"script{f' ({main})' if main else ''} again: a script that runs the pipeline must put its "
            "top level under `if __name__ == \"__main__\":`; or run the units in this process with "
            "clean.workers=1 and dedup.workers=1") from exc


def link(src: Path, dst: Path) -> None:
    """Hard-link an immutable file (a unit output, an unchanged input) to `dst` (copy across
    filesystems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def save_npy(directory: Path, name: str, array: np.ndarray) -> None:
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


# ---------------------------------------------------------------------------- stages made of units


Mapper = Callable[[Callable[..., Any], list[tuple]], list[Any]]
"""How per-shard units run: `mapper(fn, jobs) -> [fn(*job) for job in jobs]`, in any order of
execution (a process pool by default, Prefect tasks on Dask in `flows/data.py`)."""


def iter_parquet_docs(directory: Path, columns: Sequence[str] = DOC_COLUMNS) -> Iterator[dict[str, Any]]:
    """Documents of a clean or dedup stage directory: `docs-*.parquet` in shard order, row order."""
    for path in sorted(Path(directory).glob("docs-*.parquet")):
        yield from iter_parquet_rows(path, columns)


def upstream_entries(upstream: StageResult, prefix: str) -> list[tuple[Path, str]]:
    """(path, sha256) of a complete upstream stage's files whose path starts with `prefix`."""
    directory = Path(upstream.path)
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("fingerprint") != upstream.fingerprint:
        raise RuntimeError(f"{upstream.stage} output {directory} is incomplete or not the one "
                           f"fingerprinted {upstream.fingerprint}; rerun the {upstream.stage} stage")
    return sorted((directory / f["path"], f["sha256"]) for f in manifest["files"]
                  if f["path"].startswith(prefix))


def config_key(cfg: Any) -> dict:
    """What of a config section decides the output: everything except the worker count."""
    return cfg.model_dump(mode="json", exclude={"workers"})


def unit_outputs(cfg: Any, upstream: StageResult, code: str, prefix: str,
                 units: Path) -> list[tuple[str, str]]:
    """(input file, unit output directory) for every upstream file starting with `prefix`; a unit
    directory is named by the config, the code and its input's sha256, so unchanged shards are
    reused when the corpus grows."""
    return [(str(path), str(units / stable_hash({"config": config_key(cfg), "code": code, "input": sha})))
            for path, sha in upstream_entries(upstream, prefix)]


def unit_mapper(mapper: Mapper | None, workers: int | None) -> Mapper:
    """`mapper`, or by default a local process pool of `workers`."""
    return mapper or (lambda fn, jobs: pool_map(fn, jobs, workers))


def plan_over(stage: Stage, cfg: Any, upstream: StageResult, workspace: str) -> tuple[str, Path]:
    """(fingerprint, directory) of a stage made of units over one upstream output."""
    return stage.plan(config_key(cfg), [upstream.fingerprint], workspace)


UnitCompute = Callable[[Any, StageResult, str, Path, "Mapper | None"], Computed]


def run_over(stage: Stage, compute: UnitCompute, cfg: Any, upstream: StageResult, workspace: str,
             mapper: Mapper | None) -> StageResult:
    """`run_stage` for a stage made of units over one upstream output: `compute(cfg, upstream,
    workspace, directory, mapper)` runs (or reuses) the units and links their outputs."""
    return run_stage(stage, plan_over(stage, cfg, upstream, workspace), config=cfg,
                     inputs=[upstream.fingerprint], upstream=[upstream],
                     compute=lambda out: compute(cfg, upstream, workspace, out, mapper))
