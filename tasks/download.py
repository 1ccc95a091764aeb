"""Download: take the corpus sources into raw `shard-NNNNN.jsonl.zst` shards of documents.

Sources are local directories (walked recursively), single files, globs, or `python-stdlib` (the
standard library .py sources of the running interpreter). Text files (.txt, .py, .md, ...) are one
document each; .jsonl and .jsonl.zst files are one document per line. Anything unreadable (malformed
JSON, a line without a string text field, invalid UTF-8, a truncated or corrupt .zst stream) goes to
`quarantine.jsonl` with file, line and reason, and never stops the stage.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import sysconfig
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import zstandard
from prefect import get_run_logger

from tasks.config import CorpusConfig
from tasks.prefect_stage import report, stage_task
from tasks.stage import (StageResult, atomic_path, check_accounting, code_version, file_entry,
                         fingerprint, prepare_dir, read_manifest, result_from_manifest, stage_dir,
                         write_manifest)

STAGE = "download"
VERSION = 1

STDLIB = "python-stdlib"
REMOTE_PREFIXES = ("http://", "https://", "s3://", "hf://")
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
QUARANTINE = "quarantine.jsonl"
INFO_KEYS = ("capped", "shards", "source_bytes")


# ---------------------------------------------------------------------------- listing sources


@dataclass(frozen=True)
class SourceFile:
    label: str
    """The `sources` entry this file came from (document ids start with it)."""
    path: Path
    rel: str
    """Path relative to the source's root, POSIX style."""
    size: int
    mtime_ns: int

    @property
    def kind(self) -> str:
        return file_kind(self.path.name) or "text"

    @property
    def doc_id(self) -> str:
        return f"{self.label}:{self.rel}"


def file_kind(name: str) -> str | None:
    """`jsonl`, `jsonl.zst`, `text`, or None for files the stage does not read."""
    if name.endswith(".jsonl.zst"):
        return "jsonl.zst"
    if name.endswith(".jsonl"):
        return "jsonl"
    return "text" if Path(name).suffix.lower() in TEXT_SUFFIXES else None


def _source_file(path: Path, label: str, root: Path) -> SourceFile:
    st = path.stat()
    rel = Path(os.path.relpath(path, root)).as_posix()
    return SourceFile(label, Path(os.path.abspath(path)), rel, st.st_size, st.st_mtime_ns)


def _walk(root: Path, label: str, suffixes: frozenset[str] | None = None,
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
            yield _source_file(Path(dirpath) / name, label, base or root)


def _glob_root(pattern: str) -> Path:
    """The directory part of a glob before its first wildcard: matches are named relative to it."""
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return Path(*fixed) if fixed else Path(".")


def expand_source(source: str) -> list[SourceFile]:
    """The files one `sources` entry stands for, sorted by relative path."""
    if source.startswith(REMOTE_PREFIXES):
        raise ValueError(f"corpus source {source!r}: remote sources (http, https, s3, hf) are not "
                         "supported yet; download the files and list the local paths instead")
    if source == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = list(_walk(root, STDLIB, frozenset({".py"})))
    elif glob.has_magic(source):
        pattern = os.path.expanduser(source)
        root, files = _glob_root(pattern), []
        for match in glob.glob(pattern, recursive=True):
            p = Path(match)
            if p.is_dir():
                files += _walk(p, source, base=root)
            elif p.is_file() and file_kind(p.name) and not p.name.startswith("."):
                files.append(_source_file(p, source, root))
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = list(_walk(path, source))
        elif path.is_file():
            if file_kind(path.name) is None:
                raise ValueError(f"corpus source {source!r}: unsupported file type; expected "
                                 f".jsonl, .jsonl.zst or one of {sorted(TEXT_SUFFIXES)}")
            files = [_source_file(path, source, path.parent)]
        else:
            raise FileNotFoundError(f"corpus source {source!r} does not exist")
    if not files:
        raise FileNotFoundError(f"corpus source {source!r} matched no readable files "
                                "(.jsonl, .jsonl.zst or text files)")
    return sorted({f.path: f for f in files}.values(), key=lambda f: f.rel)


def list_sources(cfg: CorpusConfig) -> tuple[list[SourceFile], bool]:
    """The files to take, in order, and whether `max_bytes` left some out (whole files only:
    files are taken until their total reaches the cap)."""
    taken: list[SourceFile] = []
    seen: set[Path] = set()
    total, capped = 0, False
    for source in cfg.sources:
        for f in expand_source(source):  # every source is expanded, so a missing one always fails
            if f.path in seen:
                continue
            if cfg.max_bytes is not None and total >= cfg.max_bytes:
                capped = True
                break
            seen.add(f.path)
            taken.append(f)
            total += f.size
    return taken, capped


def _listing(files: list[SourceFile]) -> list[str]:
    return [f"{f.path}|{f.size}|{f.mtime_ns}" for f in files]


def plan(cfg: CorpusConfig, workspace: str) -> tuple[str, Path]:
    code = code_version(__name__, VERSION)
    fp = fingerprint(STAGE, cfg, _listing(list_sources(cfg)[0]), code)
    return fp, stage_dir(workspace, "raw", fp)


# ---------------------------------------------------------------------------- reading sources


class BrokenStream(Exception):
    """A compressed stream that ends early or cannot be decoded."""


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
            raise BrokenStream(f"corrupt zstd stream ({exc})") from None
        if pending:
            raise BrokenStream("truncated zstd stream (file ends inside a frame)")
    if tail:
        yield tail


def _drain(fh: io.BufferedReader, hasher: Any) -> None:
    while hasher is not None and (chunk := fh.read(READ_CHUNK)):
        hasher.update(chunk)


def _file_lines(path: Path, hasher: Any) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        for line in fh:
            hasher.update(line)
            yield line


def _decode_text(f: SourceFile, data: bytes) -> str:
    encoding = "utf-8"
    if f.path.suffix == ".py":  # PEP 263: a Python file may declare its own encoding
        try:
            encoding = tokenize.detect_encoding(io.BytesIO(data).readline)[0]
        except SyntaxError:  # a bad or unknown declaration: judge the bytes as UTF-8
            pass
    return data.decode(encoding)


Record = tuple[int | None, "dict[str, Any] | str"]
"""(line number, document) or (line number, why it was quarantined)."""


def _text_records(f: SourceFile, hasher: Any) -> Iterator[Record]:
    data = f.path.read_bytes()
    hasher.update(data)
    try:
        text = _decode_text(f, data)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        yield line, f"invalid {exc.encoding} at byte {exc.start}"
        return
    yield None, {"id": f.doc_id, "text": text, "source": f.label, "meta": {}}


def _jsonl_records(f: SourceFile, lines: Iterator[bytes], text_field: str) -> Iterator[Record]:
    lineno = 0
    try:
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield lineno, f"invalid utf-8 at byte {exc.start} of the line"
                continue
            except json.JSONDecodeError as exc:
                yield lineno, f"malformed JSON ({exc.msg} at column {exc.colno})"
                continue
            if not isinstance(obj, dict):
                yield lineno, f"not a JSON object ({type(obj).__name__})"
                continue
            text = obj.pop(text_field, None)
            if not isinstance(text, str):
                yield lineno, f"no string field {text_field!r}"
                continue
            doc_id = obj.pop("id", None)
            doc_id = f"{f.doc_id}:{lineno}" if doc_id is None else str(doc_id)
            yield lineno, {"id": doc_id, "text": text, "source": f.label, "meta": obj}
    except BrokenStream as exc:
        yield lineno + 1, f"{exc}; lines from {lineno + 1} on are lost"


def read_records(f: SourceFile, text_field: str, hasher: Any) -> Iterator[Record]:
    """Every document and every quarantined record of one source file, in file order."""
    if f.kind == "text":
        return _text_records(f, hasher)
    lines = zst_lines(f.path, hasher) if f.kind == "jsonl.zst" else _file_lines(f.path, hasher)
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


def run_download(cfg: CorpusConfig, workspace: str) -> StageResult:
    """Read every source file once and write raw shards, a quarantine ledger and the manifest."""
    started = time.time()
    files, capped = list_sources(cfg)
    code = code_version(__name__, VERSION)
    fp = fingerprint(STAGE, cfg, _listing(files), code)
    directory = stage_dir(workspace, "raw", fp)
    if (manifest := read_manifest(directory)) is not None:
        return result_from_manifest(directory, manifest, reused=True, info_keys=INFO_KEYS)
    prepare_dir(directory)

    counts = {"files": 0, "docs": 0, "quarantined": 0, "bytes": 0}
    records, sources = 0, []
    shards = ShardWriter(directory, cfg.shard_bytes)
    try:
        with atomic_path(directory / QUARANTINE) as qtmp, open(qtmp, "w", encoding="utf-8") as ledger:
            for f in files:
                hasher, docs, bad = hashlib.sha256(), 0, 0
                for line, item in read_records(f, cfg.text_field, hasher):
                    records += 1
                    if isinstance(item, dict):
                        try:
                            shards.write(json.dumps(item, ensure_ascii=False).encode("utf-8") + b"\n")
                            docs += 1
                            continue
                        except UnicodeEncodeError:
                            item = "text contains unpaired surrogates (not encodable as UTF-8)"
                    where = f"{f.path}:{line}" if line is not None else str(f.path)
                    ledger.write(json.dumps({"source": f.label, "file": str(f.path), "line": line,
                                             "reason": f"{where}: {item}"}) + "\n")
                    bad += 1
                size = f.path.stat().st_size
                sources.append({"path": str(f.path), "source": f.label, "bytes": size,
                                "sha256": hasher.hexdigest(), "docs": docs, "quarantined": bad})
                counts["files"] += 1
                counts["docs"] += docs
                counts["quarantined"] += bad
                counts["bytes"] += size
        shards.close()
    except BaseException:
        shards.abort()
        raise

    check_accounting(counts, records, ["docs", "quarantined"], f"download {directory}")
    entries = shards.entries + [file_entry(directory / QUARANTINE, directory,
                                           rows=counts["quarantined"])]
    manifest = write_manifest(directory, stage=STAGE, fp=fp, code=code, config=cfg,
                              inputs=_listing(files), counts=counts, files=entries, started=started,
                              capped=capped, source_bytes=counts["bytes"], shards=len(shards.entries),
                              uncompressed_bytes=shards.uncompressed, sources=sources)
    return result_from_manifest(directory, manifest, reused=False, info_keys=INFO_KEYS)


@stage_task(STAGE, plan, retries=3)
def download(cfg: CorpusConfig, workspace: str) -> StageResult:
    """Take the corpus sources into raw jsonl.zst shards (quarantining unreadable records)."""
    result = run_download(cfg, workspace)
    c = result.counts
    capped = " (capped at max_bytes)" if result.info.get("capped") else ""
    get_run_logger().info(f"download: {c['files']} files, {c['docs']} docs, {c['quarantined']} "
                          f"quarantined, {c['bytes']:,} source bytes{capped} -> {result.path}")
    report(STAGE, result, [f"- raw shards: {result.info.get('shards', 0)}",
                           f"- capped at max_bytes: {bool(result.info.get('capped'))}",
                           f"- quarantine ledger: `{Path(result.path) / QUARANTINE}`"])
    return result
