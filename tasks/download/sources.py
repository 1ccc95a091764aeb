"""What the download stage takes: the corpus `sources` entries expanded into a list of files.

An entry is a local directory (walked recursively), a file, a glob, `python-stdlib` (the standard
library .py sources of the running interpreter), or a remote `https://`, `s3://` or `hf://` URL. A
remote file is listed here with its place in `<workspace>/download-cache/`, where `tasks.download.fetch` puts
it before it is read. `list_sources` applies the `max_bytes` cap; `tasks.download.readers` reads the files.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

from tasks.core.data_config import CorpusConfig, SourceSpec
from tasks.core.urls import redact, split_userinfo
from tasks.download.fetch import Remote

STDLIB = "python-stdlib"
REMOTE_PREFIXES = ("http://", "https://", "s3://", "hf://")
CACHE_DIR = "download-cache"
"""Under the workspace, outside any stage directory: a rebuilt stage never re-downloads."""
TEXT_SUFFIXES = frozenset({".txt", ".py", ".pyi", ".md", ".rst", ".c", ".h", ".cpp", ".hpp", ".js",
                           ".ts", ".java", ".go", ".rs", ".sh", ".toml", ".cfg", ".ini", ".yaml",
                           ".yml", ".html", ".css", ".tex"})
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
"""Never walked: third-party packages are not the standard library, and bytecode is not text."""


@dataclass(frozen=True)
class SourceFile:
    """One file to read: where its bytes are, and the `sources` entry it came from."""

    label: str
    """Names the `sources` entry this file came from (document ids start with it; see
    `source_labels`; never has credentials)."""
    path: Path
    """Where the bytes are read from (for a remote file: its place in the download cache)."""
    rel: str
    """Path relative to the source's root, POSIX style."""
    size: int
    mtime_ns: int
    url: str | None = None
    """The remote object as shown: no userinfo, secret query values `***` (`spec.request_url`
    restores them), None for a local file."""
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
            return f"{redact(self.url)}|{self.size}|{self.sha256 or ''}"
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


def _safe_part(part: str) -> str:
    part = re.sub(r"[^A-Za-z0-9._-]", "_", unquote(part))
    return "_" + part[1:] if part.startswith(".") else part  # no `..`, no hidden names


def cache_relpath(url: str) -> PurePosixPath:
    """A relative path for a URL's cached copy: host and path segments, each reduced to
    `[A-Za-z0-9._-]` with no leading dot, so `..`, `%2e%2e`, absolute paths and backslashes cannot
    climb out of the cache directory. A query string adds a short hash of its redacted form before
    the name's first dot (`a-<hash>.jsonl.zst`: the suffix that tells the format stays; a re-signed
    URL of the same object keeps its name)."""
    parts = urlsplit(split_userinfo(url)[0])
    segments = [parts.scheme or "file", parts.netloc or "_"]
    segments += [p for p in re.split(r"[/\\]", unquote(parts.path)) if p not in ("", ".", "..")]
    safe = [_safe_part(s) or "_" for s in segments]
    if len(safe) == 2:
        safe.append("index")
    if parts.query:
        stem, dot, suffix = safe[-1].partition(".")
        digest = hashlib.sha256(redact("?" + parts.query).encode()).hexdigest()[:10]
        safe[-1] = f"{stem}-{digest}{dot}{suffix}"
    return PurePosixPath(*safe)


def safe_join(root: Path, rel: PurePosixPath | str) -> Path:
    """`root / rel`, refusing anything that resolves outside `root`."""
    root = Path(root).resolve()
    path = (root / str(rel)).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ValueError(f"refusing path {str(rel)!r}: it escapes {root}")
    return path


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


def _remote_files(spec: SourceSpec, cache: Path, remote: Remote, label: str) -> list[SourceFile]:
    url = spec.url
    if url.startswith(("http://", "https://")):
        objects = [(url, spec.size or 0)]
    else:
        objects = remote.list(url)
    single = len(objects) == 1 and objects[0][0].rstrip("/") == url.rstrip("/")
    root = url if single else url.split("*", 1)[0].rsplit("/", 1)[0] if "*" in url else url
    files = []
    for obj, size in objects:
        # The name (and so the format) comes from the URL's path, never its query string.
        name = (urlsplit(obj).path if obj.startswith(("http://", "https://")) else obj).rsplit("/", 1)[-1]
        rel = name if single else obj[len(root):].strip("/") or name
        path = safe_join(cache, cache_relpath(obj))
        expected = spec.size if single and spec.size is not None else (size if size else None)
        if url.startswith(("http://", "https://")):
            expected = spec.size
        files.append(SourceFile(label, path, "/".join(cache_relpath("x://h/" + rel).parts[2:]),
                                expected or 0, 0, url=obj, spec=spec,
                                sha256=spec.sha256 if single else None, expected_size=expected))
    return files


def _local_root(text: str) -> tuple[str, ...] | None:
    """The folders of a local entry's root (a directory, the file itself, or a glob's fixed part),
    absolute, without the leading `/`; None for remote and `python-stdlib` entries."""
    if text.startswith(REMOTE_PREFIXES) or text == STDLIB:
        return None
    path = os.path.expanduser(text)
    root = _glob_root(path) if glob.has_magic(path) else Path(path)
    return Path(os.path.abspath(root)).parts[1:] or ("root",)


def source_labels(sources: list[str | SourceSpec]) -> list[str]:
    """The label of each `sources` entry, which document ids start with and the `source` column
    holds. A local entry is named by its root's base name (`/data/books` -> `books`, a file by its
    file name), so ids, and the train/val split hashed from them, do not depend on where the corpus
    sits or how its path was typed. Entries sharing a base name take parent folders until they
    differ (`a/books`, `b/books`), then a glob's pattern (`dump/*.jsonl`), then `#2`, `#3`. A
    remote entry is its URL without credentials; `python-stdlib` is itself."""
    texts = [_spec(s).url for s in sources]
    roots = [_local_root(t) for t in texts]
    labels = [redact(t) if r is None else r[-1] for t, r in zip(texts, roots)]
    for i, root in enumerate(roots):
        if root is None:
            continue
        others = [r for r in roots if r is not None and r != root and r[-1] == root[-1]]
        k = 1
        while k < len(root) and any(o[-k:] == root[-k:] for o in others):
            k += 1
        labels[i] = "/".join(root[-k:])
    shared = {label for label in labels if labels.count(label) > 1}
    for i, (text, root) in enumerate(zip(texts, roots)):
        if root is not None and glob.has_magic(text) and labels[i] in shared:
            tail = Path(os.path.expanduser(text)).parts[len(_glob_root(os.path.expanduser(text)).parts):]
            labels[i] += "/" + "/".join(tail)
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label}#{seen[label]}"
    return labels


def expand_source(source: str | SourceSpec, cache: Path | None = None,
                  remote: Remote | None = None, label: str | None = None) -> list[SourceFile]:
    """The files one `sources` entry stands for, sorted by relative path; `label` names them
    (default: the entry's label on its own, see `source_labels`)."""
    spec = _spec(source)
    text = spec.url
    label = label or source_labels([spec])[0]
    if text.startswith(REMOTE_PREFIXES):
        files = _remote_files(spec, Path(cache or CACHE_DIR), remote or Remote(), label)
    elif text == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = list(_walk(root, STDLIB, spec, frozenset({".py"})))
    elif glob.has_magic(text):
        pattern = os.path.expanduser(text)
        root, files = _glob_root(pattern), []
        for match in glob.glob(pattern, recursive=True):
            p = Path(match)
            if p.is_dir():
                files += _walk(p, label, spec, base=root)
            elif p.is_file() and (file_kind(p.name) or spec.format != "auto") \
                    and not p.name.startswith("."):
                files.append(_source_file(p, label, root, spec))
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            files = list(_walk(path, label, spec))
        elif path.is_file():
            if file_kind(path.name) is None and spec.format == "auto":
                raise ValueError(f"corpus source {text!r}: unsupported file type; expected .jsonl, "
                                 f".jsonl.zst, .json.gz, .parquet or one of {sorted(TEXT_SUFFIXES)}")
            files = [_source_file(path, label, path.parent, spec)]
        else:
            raise FileNotFoundError(f"corpus source {text!r} does not exist")
    if not files:
        raise FileNotFoundError(f"corpus source {redact(text)!r} matched no readable files "
                                "(.jsonl, .jsonl.zst, .json.gz, .parquet or text files)")
    return sorted({(f.url or f.path): f for f in files}.values(), key=lambda f: f.rel)


def check_local_sources(cfg: CorpusConfig) -> None:
    """Fail now, naming the source, when a local path or glob is missing or holds no readable file
    (remote sources are checked by the download stage, which may retry them)."""
    for source in cfg.sources:
        text = _spec(source).url
        if not text.startswith(REMOTE_PREFIXES):
            expand_source(source)


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
    for source, label in zip(cfg.sources, source_labels(cfg.sources)):
        for f in expand_source(source, cache, remote, label):  # each expanded: a missing one fails
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
