"""Workspaces on shared storage: stages compute in a local working copy, an fsspec URL keeps the
durable, shared copy.

A workspace given as a URL (`s3://bucket/prefix`, `gs://...`, any fsspec protocol but `file`) is
*attached*: stages get a local directory instead, `$NEO_CACHE_DIR/workspaces/<name>-<hash>`
(default `~/.cache/neo-pipeline`), and every stage directory under it is mirrored to the same
relative path under the URL:

- `publish(directory)`: once a stage directory is complete, upload it: data files first,
  `manifest.json` last, so a reader never sees a partial upload as complete (a stale remote
  manifest is deleted before any file is replaced).
- `fetch(directory)`: before a stage computes, a complete remote copy (manifest present, every
  listed file at its recorded size) is downloaded into a temporary sibling, every file checked
  against the manifest's sha256, and renamed into place; anything else is not trusted.

`tasks/core/protocol.py` calls both (in `read_manifest` and `write_manifest`), so every stage, the Prefect
cache-key check and every downstream reader of an upstream directory see the shared copy. For a
local workspace both return at once. The mapping local root -> URL lives in the environment
(`NEO_WORKSPACE_MIRRORS`), so worker processes started later inherit it. Credentials and endpoints
come from the usual places: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ... for S3, fsspec's
`FSSPEC_<PROTOCOL>_<OPTION>` variables, or `NEO_STORAGE_OPTIONS` (JSON passed to the filesystem).
They are never written into a manifest or a path.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
ENV_MIRRORS = "NEO_WORKSPACE_MIRRORS"
ENV_CACHE = "NEO_CACHE_DIR"
ENV_OPTIONS = "NEO_STORAGE_OPTIONS"


def is_remote(workspace: str | Path) -> bool:
    """True for an fsspec URL other than a plain local path or `file://`."""
    text = str(workspace)
    return "://" in text and not text.startswith("file://")


def _clean_url(url: str) -> str:
    return url.rstrip("/")


def cache_root() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "neo-pipeline").expanduser()


def local_root(url: str) -> Path:
    """The local working copy of a remote workspace (stable for a URL and cache root)."""
    url = _clean_url(url)
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in url.split("://", 1)[1])[-60:]
    return (cache_root() / "workspaces" / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:10]}").resolve()


def _mirrors() -> dict[str, str]:
    raw = os.environ.get(ENV_MIRRORS)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_MIRRORS} is not valid JSON ({exc}): {raw[:200]!r}") from None


def attach(workspace: str | Path) -> str:
    """The directory stages compute in: a local workspace as given, or for a URL its local working
    copy, registered as a mirror of that URL for this process and the processes it starts."""
    if not is_remote(workspace):
        return str(workspace)
    url = _clean_url(str(workspace))
    filesystem(url)  # fail now, naming the URL, when the protocol or its options are unusable
    root = local_root(url)
    root.mkdir(parents=True, exist_ok=True)
    mirrors = _mirrors()
    if mirrors.get(str(root)) != url:
        mirrors[str(root)] = url
        os.environ[ENV_MIRRORS] = json.dumps(mirrors, sort_keys=True)
    return str(root)


def storage_options() -> dict[str, Any]:
    raw = os.environ.get(ENV_OPTIONS)
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_OPTIONS} is not valid JSON ({exc})") from None
    if not isinstance(options, dict):
        raise ValueError(f"{ENV_OPTIONS} must be a JSON object of filesystem options")
    return options


_FILESYSTEMS: dict[tuple, Any] = {}
_ENV_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_", "AZURE_")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; one instance per protocol, options, process
    and credential environment (fsspec's own instance cache would outlive a changed endpoint)."""
    from fsspec.core import url_to_fs

    options = storage_options()
    key = (url.split("://", 1)[0], json.dumps(options, sort_keys=True), os.getpid(),
           tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))))
    if (fs := _FILESYSTEMS.get(key)) is not None:
        return fs, fs._strip_protocol(url)
    try:
        fs, path = url_to_fs(url, skip_instance_cache=True, **options)
    except (ImportError, ValueError, TypeError) as exc:
        raise ValueError(f"workspace {url}: no usable fsspec filesystem ({exc})") from exc
    _FILESYSTEMS[key] = fs
    return fs, path


def remote_url(directory: str | Path) -> str | None:
    """The URL mirroring a local directory of an attached workspace, else None."""
    mirrors = _mirrors()
    if not mirrors:
        return None
    path = Path(directory).resolve()
    for root, url in mirrors.items():
        if path == Path(root) or Path(root) in path.parents:
            rel = path.relative_to(root).as_posix()
            return url if rel == "." else f"{url}/{rel}"
    return None


def localize(path: str | Path) -> Path:
    """A local path for a path or a URL under an attached workspace (e.g. a `tokens_dir` handed to
    another machine's flow). Fails, naming the URL, when no attached workspace contains it."""
    if not is_remote(path):
        return Path(path)
    url = _clean_url(str(path))
    for root, base in _mirrors().items():
        if url == base or url.startswith(base + "/"):
            return Path(root) / url[len(base):].lstrip("/")
    raise ValueError(f"{url} is not under an attached workspace ({sorted(_mirrors().values())}); "
                     "pass the workspace URL too")


def shared_path(directory: str | Path) -> str:
    """What to hand to another machine for a local stage directory: its URL when mirrored."""
    return remote_url(directory) or str(directory)


# ---------------------------------------------------------------------------- remote directories


def _complete(manifest: Any, sizes: dict[str, int]) -> bool:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return False
    return all(sizes.get(f.get("path")) == f.get("bytes") for f in manifest["files"])


def _listing(fs, rdir: str) -> dict[str, int]:
    """Relative path -> size of every file under a remote directory."""
    base = fs._strip_protocol(rdir).rstrip("/")
    found = fs.find(rdir, detail=True)
    return {p[len(base) + 1:]: int(info.get("size") or 0) for p, info in found.items()
            if info.get("type") != "directory" and p.startswith(base + "/")}


def remote_manifest(url: str) -> tuple[dict, dict[str, int]] | None:
    """(manifest, listing) of a complete remote stage directory, else None (missing manifest,
    unreadable manifest, or a listed file missing or of another size)."""
    fs, rdir = filesystem(url)
    fs.invalidate_cache(rdir)  # another machine may have written since this process last looked
    try:
        manifest = json.loads(fs.cat_file(f"{rdir}/{MANIFEST}"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    sizes = _listing(fs, rdir)
    return (manifest, sizes) if _complete(manifest, sizes) else None


def fetch(directory: str | Path) -> bool:
    """Download the complete remote copy of a mirrored stage directory into place. False when the
    directory is not mirrored or has no complete remote copy (then the stage computes it)."""
    from tasks.core.protocol import sha256_file  # tasks.core.protocol imports this module

    url = remote_url(directory)
    if url is None:
        return False
    found = remote_manifest(url)
    if found is None:
        return False
    manifest, sizes = found
    directory = Path(directory)
    fs, rdir = filesystem(url)
    tmp = directory.with_name(f".{directory.name}.fetch-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        names = sorted(n for n in sizes if n != MANIFEST)
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        if names:
            fs.get([f"{rdir}/{n}" for n in names], [str(tmp / n) for n in names])
        for f in manifest["files"]:
            local = tmp / f["path"]
            if local.stat().st_size != f["bytes"] or ("sha256" in f and sha256_file(local) != f["sha256"]):
                return False  # replaced while we read it, or a mixed upload: not trusted
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        if directory.exists():
            shutil.rmtree(directory)  # a partial local run
        try:
            os.rename(tmp, directory)
        except OSError:  # another process on this machine put it in place first
            if not (directory / MANIFEST).is_file():
                raise
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(directory: str | Path) -> bool:
    """Upload a complete local stage directory to its mirror unless a complete copy is there:
    every file but the manifest first, the manifest last. True when something was uploaded."""
    url = remote_url(directory)
    if url is None:
        return False
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; only complete stage directories are published")
    if remote_manifest(url) is not None:
        return False
    fs, rdir = filesystem(url)
    if fs.exists(f"{rdir}/{MANIFEST}"):
        fs.rm_file(f"{rdir}/{MANIFEST}")  # a stale or partial copy: incomplete until we finish
    names = sorted(rel for p in directory.rglob("*") if p.is_file() and ".tmp-" not in p.name
                   and (rel := p.relative_to(directory).as_posix()) != MANIFEST)
    if names:
        fs.put([str(directory / n) for n in names], [f"{rdir}/{n}" for n in names])
    fs.put_file(str(directory / MANIFEST), f"{rdir}/{MANIFEST}")
    fs.invalidate_cache(rdir)
    return True
