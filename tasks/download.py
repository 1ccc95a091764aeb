"""Download: take the corpus sources into raw `shard-NNNNN.jsonl.zst` shards of documents.

Sources are local directories (walked recursively), files, globs, `python-stdlib` (the standard
library .py sources of the running interpreter), or remote `https://`, `s3://` and `hf://` URLs, which
`tasks.fetch` brings into `<workspace>/download-cache/` first, verified against the sha256 and size the
source list gives, in parallel, resumable, and reused by any later run. Formats: text files (one
document each, or split by a separator), .jsonl, .jsonl.zst, .json.gz and .parquet, read streaming.
Anything unreadable (malformed JSON, a record without a string text field, invalid UTF-8, an empty
document, a truncated or corrupt compressed stream) goes to `quarantine.jsonl` with file, line and
reason, and is counted per reason; the stage fails only when the bad fraction exceeds the limit.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import sysconfig
import threading
import time
import tokenize
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import zstandard
from prefect import get_run_logger

from tasks.config import CorpusConfig, SourceSpec
from tasks.fetch import (Fetched, PermanentTransferError, Remote, RetryPolicy, cache_relpath, fetch,
                         redact_text, redact_url, safe_join)
from tasks.prefect_stage import report, stage_task
from tasks.stage import (StageResult, atomic_path, check_accounting, code_version, file_entry,
                         fingerprint, prepare_dir, read_manifest, result_from_manifest, sha256_file,
                         stage_dir, write_manifest)

STAGE = "download"
VERSION = 2

STDLIB = "python-stdlib"
REMOTE_PREFIXES = ("http://", "https://", "s3://", "hf://")
CACHE_DIR = "download-cache"
"""Under the workspace, outside any stage directory: a rebuilt stage never re-downloads."""
TEXT_SUFFIXES = frozenset({".txt", ".py", ".pyi", ".md", ".rst", ".c", ".h", ".cpp", ".hpp", ".js",
                           ".ts", ".java", ".go", ".rs", ".sh", ".toml", ".cfg", ".ini", ".yaml",
                           ".yml", ".html", ".css", ".tex"})
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
"""Never walked: third-party packages are not the standard library, and bytecode is not text."""
ZSTD_LEVEL = 3
READ_CHUNK = 1 << 20
ZSTD_READ_CHUNK = 1 << 17
"""Compressed bytes fed to zstd at a time: small, since one chunk of a highly compressible file can
expand a thousandfold."""
PARQUET_BATCH = 256
QUARANTINE = "quarantine.jsonl"
INFO_KEYS = ("capped", "shards", "source_bytes", "quarantine_reasons")
REASONS = ("malformed_json", "not_object", "no_text_field", "invalid_utf8", "empty", "unencodable",
           "truncated_stream", "corrupt_stream")


class BadInputError(ValueError):
    """Too large a share of the records was quarantined: the source is probably not what it claims."""


# ---------------------------------------------------------------------------- listing sources


@dataclass(frozen=True)
class SourceFile:
    label: str
    """The `sources` entry this file came from (document ids start with it; never has credentials)."""
    path: Path
    """Where the bytes are read from (for a remote file: its place in the download cache)."""
    rel: str
    """Path relative to the source's root, POSIX style."""
    size: int
    mtime_ns: int
    url: str | None = None
    """The remote object (credentials stripped; see `auth`), None for a local file."""
    spec: SourceSpec = field(default_factory=lambda: SourceSpec(url="-"))
    sha256: str | None = None
    """Expected sha256 (from the source list)."""
    expected_size: int | None = None
    """Expected size: from the source list, or from the store's listing for s3/hf objects."""

    @property
    def kind(self) -> str:
        fmt = self.spec.format
        if fmt != "auto":
            return "text" if fmt == "txt" else fmt
        return file_kind(self.rel.rsplit("/", 1)[-1]) or "text"

    @property
    def doc_id(self) -> str:
        return f"{self.label}:{self.rel}"

    def listing(self) -> str:
        if self.url is not None:
            return f"{redact_url(self.url)}|{self.size}|{self.sha256 or ''}"
        return f"{self.path}|{self.size}|{self.mtime_ns}"


def file_kind(name: str) -> str | None:
    """`jsonl`, `jsonl.zst`, `json.gz`, `parquet`, `text`, or None for files the stage does not read."""
    name = name.lower()
    if name.endswith(".jsonl.zst"):
        return "jsonl.zst"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith((".json.gz", ".jsonl.gz")):
        return "json.gz"
    if name.endswith(".parquet"):
        return "parquet"
    return "text" if Path(name).suffix in TEXT_SUFFIXES else None


def _spec(source: str | SourceSpec) -> SourceSpec:
    return source if isinstance(source, SourceSpec) else SourceSpec(url=source)


def _source_file(path: Path, label: str, root: Path, spec: SourceSpec) -> SourceFile:
    st = path.stat()
    rel = Path(os.path.relpath(path, root)).as_posix()
    return SourceFile(label, Path(os.path.abspath(path)), rel, st.st_size, st.st_mtime_ns, spec=spec,
                      sha256=spec.sha256)


def _walk(root: Path, label: str, spec: SourceSpec, suffixes: frozenset[str] | None = None,
          base: Path | None = None) -> Iterator[SourceFile]:
    """Readable files under `root`, named relative to `base` (default: `root`)."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruned in place so os.walk never descends into site-packages (huge) or hidden dirs.
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or file_kind(name) is None:
                continue
            if suffixes is not None and Path(name).suffix not in suffixes:
                continue
            yield _source_file(Path(dirpath) / name, label, base or root, spec)


def _glob_root(pattern: str) -> Path:
    """The directory part of a glob before its first wildcard: matches are named relative to it."""
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return Path(*fixed) if fixed else Path(".")


def _remote_files(spec: SourceSpec, cache: Path, remote: Remote) -> list[SourceFile]:
    url, label = spec.url, redact_url(spec.url)
    if url.startswith(("http://", "https://")):
        objects = [(url, spec.size or 0)]
    else:
        objects = remote.list(url)
    single = len(objects) == 1 and objects[0][0].rstrip("/") == url.rstrip("/")
    root = url if single else url.split("*", 1)[0].rsplit("/", 1)[0] if "*" in url else url
    files = []
    for obj, size in objects:
        rel = obj.rsplit("/", 1)[-1] if single else obj[len(root):].strip("/") or obj.rsplit("/", 1)[-1]
        path = safe_join(cache, cache_relpath(obj))
        expected = spec.size if single and spec.size is not None else (size if size else None)
        if url.startswith(("http://", "https://")):
            expected = spec.size
        files.append(SourceFile(label, path, "/".join(cache_relpath("x://h/" + rel).parts[2:]),
                                expected or 0, 0, url=obj, spec=spec,
                                sha256=spec.sha256 if single else None, expected_size=expected))
    return files


def expand_source(source: str | SourceSpec, cache: Path | None = None,
                  remote: Remote | None = None) -> list[SourceFile]:
    """The files one `sources` entry stands for, sorted by relative path."""
    spec = _spec(source)
    text = spec.url
    if text.startswith(REMOTE_PREFIXES):
        files = _remote_files(spec, Path(cache or CACHE_DIR), remote or Remote())
    elif text == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = list(_walk(root, STDLIB, spec, frozenset({".py"})))
    elif glob.has_magic(text):
        pattern = os.path.expanduser(text)
        root, files = _glob_root(pattern), []
        for match in glob.glob(pattern, recursive=True):
            p = Path(match)
            if p.is_dir():
                files += _walk(p, text, spec, base=root)
            elif p.is_file() and (file_kind(p.name) or spec.format != "auto") \
                    and not p.name.startswith("."):
                files.append(_source_file(p, text, root, spec))
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            files = list(_walk(path, text, spec))
        elif path.is_file():
            if file_kind(path.name) is None and spec.format == "auto":
                raise ValueError(f"corpus source {text!r}: unsupported file type; expected .jsonl, "
                                 f".jsonl.zst, .json.gz, .parquet or one of {sorted(TEXT_SUFFIXES)}")
            files = [_source_file(path, text, path.parent, spec)]
        else:
            raise FileNotFoundError(f"corpus source {text!r} does not exist")
    if not files:
        raise FileNotFoundError(f"corpus source {redact_url(text)!r} matched no readable files "
                                "(.jsonl, .jsonl.zst, .json.gz, .parquet or text files)")
    return sorted({(f.url or f.path): f for f in files}.values(), key=lambda f: f.rel)


def remote_access(cfg: CorpusConfig) -> Remote:
    secret = lambda s: s.get_secret_value() if s is not None else None  # noqa: E731
    return Remote(s3_endpoint=cfg.s3_endpoint, s3_key=secret(cfg.s3_access_key),
                  s3_secret=secret(cfg.s3_secret_key), hf_token=secret(cfg.hf_token))


def list_sources(cfg: CorpusConfig, workspace: str | Path | None = None,
                 remote: Remote | None = None) -> tuple[list[SourceFile], bool]:
    """The files to take, in order, and whether `max_bytes` left some out (whole files only:
    files are taken until their total reaches the cap; a remote file of unknown size counts 0)."""
    cache = Path(workspace or ".") / CACHE_DIR
    remote = remote or remote_access(cfg)
    taken: list[SourceFile] = []
    seen: set[Any] = set()
    total, capped = 0, False
    for source in cfg.sources:
        for f in expand_source(source, cache, remote):  # every source expanded: a missing one fails
            key = f.url or f.path
            if key in seen:
                continue
            if cfg.max_bytes is not None and total >= cfg.max_bytes:
                capped = True
                break
            seen.add(key)
            taken.append(f)
            total += f.size
    return taken, capped


def _listing(files: list[SourceFile]) -> list[str]:
    return [f.listing() for f in files]


def plan(cfg: CorpusConfig, workspace: str) -> tuple[str, Path]:
    code = code_version(__name__, VERSION)
    fp = fingerprint(STAGE, public_config(cfg), _listing(list_sources(cfg, workspace)[0]), code)
    return fp, stage_dir(workspace, "raw", fp)


def public_config(cfg: CorpusConfig) -> dict[str, Any]:
    """The config as recorded in fingerprints and manifests: secrets masked, URLs redacted."""
    data = cfg.model_dump(mode="json")
    data["sources"] = [redact_url(s) if isinstance(s, str) else {**s, "url": redact_url(s["url"])}
                       for s in data["sources"]]
    return data


# ---------------------------------------------------------------------------- reading sources


class BrokenStream(Exception):
    """A compressed stream that ends early or cannot be decoded (message starts with its reason)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def zst_lines(path: Path, hasher: Any = None) -> Iterator[bytes]:
    """Lines of a zstd file (several frames allowed), streaming. Raises BrokenStream on a corrupt
    or truncated stream, after the complete lines before the damage; `hasher` sees every file byte."""
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


def gz_lines(path: Path, hasher: Any = None) -> Iterator[bytes]:
    """Lines of a gzip file, streaming; BrokenStream on a corrupt or truncated stream."""
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


def _text_records(f: SourceFile, hasher: Any) -> Iterator[Record]:
    sep = f.spec.separator
    if not sep:  # one document per file (a text file is one document: read whole)
        data = f.path.read_bytes()
        hasher.update(data)
        line, doc = _text_doc(f, data, f.doc_id, 1)
        yield (None if isinstance(doc, dict) or doc[0] == "empty" else line), doc
        return
    # Split streaming: one document per separator, numbered from 1, located by its first line.
    token, buf, line, index = sep.encode("utf-8"), b"", 1, 0
    with open(f.path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            hasher.update(chunk)
            *pieces, buf = (buf + chunk).split(token)
            for piece in pieces:
                index += 1
                yield _text_doc(f, piece, f"{f.doc_id}:{index}", line)
                line += piece.count(b"\n") + token.count(b"\n")
    if buf.strip() or index == 0:  # what follows the last separator (a trailing newline is not a doc)
        yield _text_doc(f, buf, f"{f.doc_id}:{index + 1}", line)


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
        yield lineno + 1, (exc.reason, f"{exc}; lines from {lineno + 1} on are lost")


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
    """The documents of one raw shard, streaming (used by the clean stage)."""
    for line in zst_lines(Path(path)):
        yield json.loads(line)


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
    return fetch(f.url, f.path, sha256=f.sha256, size=f.expected_size, policy=policy, auth=auth,
                 remote=remote, on_bytes=progress.add_transferred)


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
    started = time.time()
    remote = remote_access(cfg)
    files, capped = list_sources(cfg, workspace, remote)
    code = code_version(__name__, VERSION)
    public = public_config(cfg)
    fp = fingerprint(STAGE, public, _listing(files), code)
    directory = stage_dir(workspace, "raw", fp)
    if (manifest := read_manifest(directory)) is not None:
        return result_from_manifest(directory, manifest, reused=True, info_keys=INFO_KEYS)
    prepare_dir(directory)

    progress = Progress(len(files), on_progress)
    counts = {"files": 0, "docs": 0, "quarantined": 0, "bytes": 0}
    reasons = dict.fromkeys(REASONS, 0)
    records, sources, transfers = 0, [], {"fetched": 0, "reused": 0, "retries": 0, "restarts": 0}
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
                    shown = f.url and redact_url(f.url) or str(f.path)
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
                sources.append({"path": redact_url(f.url) if f.url else str(f.path),
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
    manifest = write_manifest(directory, stage=STAGE, fp=fp, code=code, config=public,
                              inputs=_listing(files), counts=counts, files=entries, started=started,
                              capped=capped, source_bytes=counts["bytes"], shards=len(shards.entries),
                              uncompressed_bytes=shards.uncompressed, sources=sources,
                              records_read=records, quarantine_reasons=reasons,
                              transfers=transfers)
    return result_from_manifest(directory, manifest, reused=False, info_keys=INFO_KEYS)


def _retry_worth_it(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retries the stage only when a later attempt can succeed (not 404, auth, checksum,
    bad input or a missing local source)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return True
    return not isinstance(exc, (PermanentTransferError, BadInputError, FileNotFoundError))


PROGRESS_HOOKS: list[Callable[[dict[str, float]], None]] = []
"""Extra listeners for download progress (the CLI's progress bar registers one)."""


def _progress_sink(logger: Any) -> Callable[[dict[str, float]], None]:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    state: dict[str, Any] = {}

    def sink(p: dict[str, float]) -> None:
        line = (f"download: {p['files']:,.0f} files, {p['docs']:,.0f} docs, "
                f"{p['docs_per_s']:,.0f} docs/s, read {p['read_bytes_per_s'] / 1e6:,.1f} MB/s, "
                f"transfer {p['transfer_bytes_per_s'] / 1e6:,.1f} MB/s")
        logger.info(line)
        for hook in PROGRESS_HOOKS:
            hook(p)
        try:
            if "id" not in state:
                state["id"] = create_progress_artifact(progress=100 * p["fraction"],
                                                       key="download-progress", description=line)
            else:
                update_progress_artifact(state["id"], progress=100 * p["fraction"], description=line)
        except Exception as exc:  # progress must never fail the stage (e.g. no API reachable)
            logger.debug(f"progress artifact not updated: {redact_text(str(exc))}")

    return sink


@stage_task(STAGE, plan, retries=3, retry_condition_fn=_retry_worth_it)
def download(cfg: CorpusConfig, workspace: str) -> StageResult:
    """Take the corpus sources into raw jsonl.zst shards (quarantining unreadable records)."""
    logger = get_run_logger()
    result = run_download(cfg, workspace, on_progress=_progress_sink(logger))
    c = result.counts
    capped = " (capped at max_bytes)" if result.info.get("capped") else ""
    logger.info(f"download: {c['files']} files, {c['docs']} docs, {c['quarantined']} "
                f"quarantined, {c['bytes']:,} source bytes{capped} -> {result.path}")
    report(STAGE, result, [f"- raw shards: {result.info.get('shards', 0)}",
                           f"- capped at max_bytes: {bool(result.info.get('capped'))}",
                           f"- quarantined by reason: {result.info.get('quarantine_reasons', {})}",
                           f"- quarantine ledger: `{Path(result.path) / QUARANTINE}`"])
    return result
