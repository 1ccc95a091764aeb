"""Download stage: take the corpus sources into raw `shard-NNNNN.jsonl.zst` shards of documents.

`tasks.download.sources` lists the files the `sources` entries stand for; remote ones are brought by
`tasks.download.fetch` into `<workspace>/download-cache/` first, verified against the sha256 and size the
source list gives, in parallel, resumable, and reused by any later run. `tasks.download.readers` reads each
file once, in order; this module writes the documents into zstd shards, the unreadable records into
`quarantine.jsonl` with file, line and reason (counted per reason), and the manifest. The stage fails
only when the bad fraction exceeds the limit. The Prefect task (`task.py`) adds logging, progress
artifacts and retries.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable

import zstandard

from tasks.core.data_config import CorpusConfig
from tasks.core.urls import redact
from tasks.download.fetch import Fetched, PermanentTransferError, Remote, RetryPolicy, fetch
from tasks.download.readers import REASONS, read_records
from tasks.download.sources import SourceFile, list_sources, remote_access
from tasks.core.protocol import (Computed, Stage, StageResult, atomic_path, check_accounting, file_entry,
                                 run_stage, sha256_file)

STAGE = Stage("download", version=4, module=__name__, section="corpus",
              info_keys=("capped", "shards", "source_bytes", "quarantine_reasons"))
ZSTD_LEVEL = 3
QUARANTINE = "quarantine.jsonl"


class BadInputError(ValueError):
    """Too large a share of the records was quarantined: the source is probably not what it claims."""


def _listing(files: list[SourceFile]) -> list[str]:
    return [f.listing() for f in files]


def plan(cfg: CorpusConfig, workspace: str) -> tuple[str, Path]:
    return STAGE.plan(public_config(cfg), _listing(list_sources(cfg, workspace)[0]), workspace)


def public_config(cfg: CorpusConfig) -> dict[str, Any]:
    """The config as recorded in fingerprints and manifests: secrets masked, URLs redacted."""
    data = cfg.model_dump(mode="json")
    data["sources"] = [redact(s) if isinstance(s, str) else {**s, "url": redact(s["url"])}
                       for s in data["sources"]]
    return data


# ---------------------------------------------------------------------------- writing shards


class ShardWriter:
    """Writes jsonl lines into zstd shards, rolling over at `shard_bytes` uncompressed."""

    def __init__(self, directory: Path, shard_bytes: int):
        self.directory, self.shard_bytes = directory, shard_bytes
        self.entries: list[dict[str, Any]] = []
        self.uncompressed = 0
        self._ctx = self._out = None
        self._path: Path | None = None
        self._bytes = self._rows = 0

    def write(self, line: bytes) -> None:
        if self._out is None:
            self._path = self.directory / f"shard-{len(self.entries):05d}.jsonl.zst"
            self._ctx = atomic_path(self._path)
            tmp = self._ctx.__enter__()
            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
            self._out = cctx.stream_writer(open(tmp, "wb"))
        self._out.write(line)
        self._bytes += len(line)
        self._rows += 1
        self.uncompressed += len(line)
        if self._bytes >= self.shard_bytes:
            self.close()

    def close(self) -> None:
        if self._out is None:
            return
        self._out.close()  # flushes the frame and closes the file
        self._ctx.__exit__(None, None, None)
        self.entries.append(file_entry(self._path, self.directory, rows=self._rows))
        self._ctx = self._out = None
        self._bytes = self._rows = 0

    def abort(self) -> None:
        if self._out is not None:
            self._out.close()
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._ctx = self._out = None


# ---------------------------------------------------------------------------- the stage


class Progress:
    """Bytes and documents so far, reported to `sink(progress)` at most every `every_s` seconds."""

    def __init__(self, total_files: int, sink: Callable[[dict[str, float]], None] | None = None,
                 every_s: float = 2.0):
        self.total_files, self.sink, self.every_s = max(total_files, 1), sink, every_s
        self.started = self._last = time.monotonic()
        self.transferred = self.read = self.docs = self.files = 0
        self._lock = threading.Lock()

    def add_transferred(self, n: int) -> None:
        """Called from transfer threads; only the stage's own thread reports (Prefect's run
        context, which artifacts and the run logger need, is per thread)."""
        with self._lock:
            self.transferred += n

    def snapshot(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {"fraction": self.files / self.total_files, "files": self.files,
                "docs": self.docs, "bytes_read": self.read, "bytes_transferred": self.transferred,
                "docs_per_s": self.docs / elapsed, "read_bytes_per_s": self.read / elapsed,
                "transfer_bytes_per_s": self.transferred / elapsed, "seconds": elapsed}

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.sink is not None and (force or now - self._last >= self.every_s):
            self._last = now
            self.sink(self.snapshot())


def _fetch_one(f: SourceFile, cfg: CorpusConfig, remote: Remote, progress: Progress) -> Fetched:
    policy = RetryPolicy(retries=cfg.download_retries, backoff_s=cfg.retry_backoff_s,
                         timeout_s=cfg.timeout_s)
    auth = f.spec.auth.get_secret_value() if f.spec.auth is not None else None
    return fetch(f.spec.request_url(f.url), f.path, sha256=f.sha256, size=f.expected_size,
                 policy=policy, auth=auth, remote=remote, on_bytes=progress.add_transferred)


def _wait(future: Future, progress: Progress) -> Fetched:
    """The transfer's result, reporting progress while it runs."""
    while True:
        try:
            return future.result(timeout=progress.every_s)
        except FutureTimeout:
            progress.tick()


def run_download(cfg: CorpusConfig, workspace: str,
                 on_progress: Callable[[dict[str, float]], None] | None = None) -> StageResult:
    """Fetch remote files, read every source file once, write raw shards, a quarantine ledger and
    the manifest."""
    remote = remote_access(cfg)
    files, capped = list_sources(cfg, workspace, remote)
    public, listing = public_config(cfg), _listing(files)
    return run_stage(STAGE, STAGE.plan(public, listing, workspace), config=public, inputs=listing,
                     compute=lambda out: _download(cfg, files, capped, remote, out, on_progress))


def _download(cfg: CorpusConfig, files: list[SourceFile], capped: bool, remote: Remote, directory: Path,
              on_progress: Callable[[dict[str, float]], None] | None) -> Computed:
    progress = Progress(len(files), on_progress)
    counts = {"files": 0, "docs": 0, "quarantined": 0, "bytes": 0}
    reasons = dict.fromkeys(REASONS, 0)
    records, sources = 0, []
    transfers = {"fetched": 0, "reused": 0, "retries": 0, "restarts": 0, "retry_after": 0, "waited_s": 0.0}
    shards = ShardWriter(directory, cfg.shard_bytes)
    pool = ThreadPoolExecutor(max_workers=cfg.parallel_downloads, thread_name_prefix="fetch")
    try:
        # Every transfer is queued in file order; the pool bounds how many run at once, and files
        # are read in order as their transfers finish, so the shards do not depend on timing.
        pending: dict[int, Future] = {i: pool.submit(_fetch_one, f, cfg, remote, progress)
                                      for i, f in enumerate(files) if f.url is not None}
        with atomic_path(directory / QUARANTINE) as qtmp, open(qtmp, "w", encoding="utf-8") as ledger:
            for i, f in enumerate(files):
                fetched = _wait(pending.pop(i), progress) if i in pending else None
                if fetched is not None:
                    transfers["reused" if fetched.reused else "fetched"] += 1
                    transfers["retries"] += fetched.retries
                    transfers["restarts"] += fetched.restarts
                    transfers["retry_after"] += sum(why == "retry-after" for _, why in fetched.waits)
                    transfers["waited_s"] = round(transfers["waited_s"] + sum(s for s, _ in fetched.waits), 3)
                hasher, docs, bad = hashlib.sha256(), 0, 0
                for line, item in read_records(f, cfg.text_field, hasher):
                    records += 1
                    if isinstance(item, dict):
                        try:
                            shards.write(json.dumps(item, ensure_ascii=False).encode("utf-8") + b"\n")
                            docs += 1
                            if docs % 10_000 == 0:
                                progress.docs = counts["docs"] + docs
                                progress.tick()
                            continue
                        except UnicodeEncodeError:
                            item = ("unencodable", "text contains unpaired surrogates (not "
                                                   "encodable as UTF-8)")
                    reason, message = item
                    shown = f.url and redact(f.url) or str(f.path)
                    where = f"{shown}:{line}" if line is not None else shown
                    ledger.write(json.dumps({"source": f.label, "file": shown, "line": line,
                                             "reason_code": reason,
                                             "reason": f"{where}: {message}"}) + "\n")
                    reasons[reason] += 1
                    bad += 1
                size = f.path.stat().st_size
                digest = fetched.sha256 if fetched is not None else (
                    sha256_file(f.path) if f.kind == "parquet" else hasher.hexdigest())
                if f.url is None and f.sha256 is not None and digest != f.sha256:
                    raise PermanentTransferError(f"{f.path}: sha256 mismatch: expected {f.sha256}, "
                                                 f"got {digest}")
                sources.append({"path": redact(f.url) if f.url else str(f.path),
                                "source": f.label, "bytes": size, "sha256": digest, "docs": docs,
                                "quarantined": bad, "weight": f.spec.weight})
                counts["files"] += 1
                counts["docs"] += docs
                counts["quarantined"] += bad
                counts["bytes"] += size
                progress.files, progress.docs = counts["files"], counts["docs"]
                progress.read += size
                progress.tick()
        shards.close()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        shards.abort()
        raise
    pool.shutdown(wait=True)
    progress.tick(force=True)

    check_accounting(counts, records, ["docs", "quarantined"], f"download {directory}")
    reasons = {k: v for k, v in reasons.items() if v}
    if records and counts["quarantined"] / records > cfg.max_bad_fraction:
        raise BadInputError(f"download: {counts['quarantined']} of {records} records quarantined "
                            f"({counts['quarantined'] / records:.1%} > max_bad_fraction "
                            f"{cfg.max_bad_fraction:.1%}); by reason: {reasons}; ledger: "
                            f"{directory / QUARANTINE}")
    entries = shards.entries + [file_entry(directory / QUARANTINE, directory,
                                           rows=counts["quarantined"])]
    return Computed(counts, entries, info=dict(
        capped=capped, source_bytes=counts["bytes"], shards=len(shards.entries),
        uncompressed_bytes=shards.uncompressed, sources=sources, records_read=records,
        quarantine_reasons=reasons, transfers=transfers))


def describe(result: StageResult) -> tuple[str, list[str]]:
    """The log line and report lines of a download result."""
    c, info = result.counts, result.info
    capped = " (capped at max_bytes)" if info.get("capped") else ""
    return (f"download: {c['files']} files, {c['docs']} docs, {c['quarantined']} quarantined, "
            f"{c['bytes']:,} source bytes{capped} -> {result.path}",
            [f"- raw shards: {info.get('shards', 0)}", f"- capped at max_bytes: {bool(info.get('capped'))}",
             f"- quarantined by reason: {info.get('quarantine_reasons', {})}",
             f"- quarantine ledger: `{Path(result.path) / QUARANTINE}`"])


PROGRESS_HOOKS: list[Callable[[dict[str, float]], None]] = []
"""Extra listeners for download progress (the CLI's progress bar registers one)."""
