"""Transfers of remote corpus files into a local cache: verified, resumable, retried.

`fetch()` downloads one `https://` URL (with HTTP Range resume), or an `s3://` / `hf://` object (through
fsspec: s3fs, huggingface_hub), to a `.part` file next to its final name; the file is renamed only after
its size and sha256 match what the source list promised, and a small `.ok.json` sidecar records the
verified hash so that a later run (even after the process was killed) reuses it instead of fetching it
again. Transient errors (timeouts, dropped connections, 429, 5xx) retry with exponential backoff and
jitter (or after the wait a 429/503's `Retry-After` asks, capped), resuming where the bytes stopped;
404 and auth errors fail at once; a checksum mismatch retries once from scratch, then fails naming
the URL and both hashes. URLs are recorded only through `tasks.core.urls.redact`; the cache's file
names come from `tasks.download.sources.cache_relpath`. Nothing here imports Prefect.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable

import requests

from tasks.core.urls import redact, redact_logs, split_userinfo, userinfo_auth

CHUNK = 1 << 20
SIDECAR = ".ok.json"
PART = ".part"
KILL_HOOK = "NEO_DOWNLOAD_KILL_AFTER"
"""Test hook: SIGKILL this process right after the file with this name is verified and in place."""

RETRY_AFTER_CODES = (429, 503)
"""Answers whose `Retry-After` header sets the wait before the next try (capped at max_backoff_s)."""


class TransferError(RuntimeError):
    """A transfer that failed after every retry (worth retrying later, e.g. by Prefect)."""


class PermanentTransferError(RuntimeError):
    """A transfer that retrying cannot fix: not found, not authorised, wrong checksum."""


class ChecksumError(PermanentTransferError):
    """The bytes arrived twice and twice did not match the expected sha256 or size."""


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


# ---------------------------------------------------------------------------- redaction, Retry-After


redact_url = redact_text = redact
"""The one redaction (`tasks.core.urls.redact`): userinfo removed, secret query values masked."""
redact_logs("urllib3.connectionpool", "urllib3.poolmanager", "urllib3.util.retry")


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks to wait: delay-seconds or an HTTP-date (RFC 9110
    section 10.2.3; a date in the past -> 0); None when absent or unreadable."""
    value = (value or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# ---------------------------------------------------------------------------- policy and results


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    timeout_s: float = 60.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with +/- 50% jitter (attempt 1 -> ~backoff_s)."""
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base * random.uniform(0.5, 1.5)


@dataclass
class Fetched:
    path: Path
    sha256: str
    bytes: int
    reused: bool = False
    requests: int = 0
    retries: int = 0
    restarts: int = 0
    """Times the transfer started over (server ignored Range, or a checksum mismatch)."""
    waits: list[tuple[float, str]] = field(default_factory=list)
    """(seconds slept, why) before each retry: `retry-after` (the server's, capped) or `backoff`."""


@dataclass
class Remote:
    """How to reach remote stores: credentials and endpoints (never logged)."""

    s3_endpoint: str | None = None
    s3_key: str | None = None
    s3_secret: str | None = None
    hf_token: str | None = None
    _fs: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def filesystem(self, url: str) -> tuple[Any, str]:
        import fsspec

        protocol = url.split("://", 1)[0]
        with self._lock:
            if protocol not in self._fs:
                opts: dict[str, Any] = {}
                if protocol == "s3":
                    opts = {"endpoint_url": self.s3_endpoint, "key": self.s3_key,
                            "secret": self.s3_secret, "skip_instance_cache": True}
                    if not self.s3_key:
                        opts.pop("key"), opts.pop("secret")
                elif protocol == "hf":
                    # Read at call time: huggingface_hub reads HF_ENDPOINT only once, at import.
                    opts = {"token": self.hf_token, "endpoint": os.environ.get("HF_ENDPOINT"),
                            "skip_instance_cache": True}
                self._fs[protocol] = fsspec.filesystem(protocol, **{k: v for k, v in opts.items()
                                                                    if v is not None or k == "token"})
            return self._fs[protocol], url.split("://", 1)[1]

    def list(self, url: str) -> list[tuple[str, int]]:
        """(url, size) of the objects a `s3://` or `hf://` file, directory or glob stands for."""
        import glob as _glob

        fs, path = self.filesystem(url)
        protocol = url.split("://", 1)[0]
        try:
            if _glob.has_magic(path):
                infos = [fs.info(p) for p in fs.glob(path)]
            elif fs.isdir(path):
                infos = list(fs.find(path, detail=True).values())
            else:
                infos = [fs.info(path)]
        except FileNotFoundError:
            raise FileNotFoundError(f"corpus source {redact_url(url)!r} does not exist") from None
        except PermissionError as exc:
            raise PermanentTransferError(f"{redact_url(url)}: access denied ({exc})") from None
        return sorted((f"{protocol}://{i['name']}", int(i.get("size") or 0)) for i in infos
                      if i.get("type", "file") == "file")


# ---------------------------------------------------------------------------- the transfer


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + SIDECAR)


def cached(dest: Path, sha256: str | None = None, size: int | None = None) -> Fetched | None:
    """The verified cached copy at `dest`, or None: sidecar present, size and sha256 re-checked."""
    side = _sidecar(dest)
    if not dest.is_file() or not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except ValueError:
        return None
    n = dest.stat().st_size
    if n != meta.get("bytes") or (size is not None and n != size):
        return None
    if sha256 is not None and meta.get("sha256") != sha256:
        return None
    if _hash_file(dest) != meta.get("sha256"):
        return None
    return Fetched(dest, meta["sha256"], n, reused=True)


def _hash_file(path: Path, h: Any = None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path, *, sha256: str | None = None, size: int | None = None,
          policy: RetryPolicy = RetryPolicy(), auth: str | None = None, remote: Remote | None = None,
          on_bytes: Callable[[int], None] | None = None, session: Any = None) -> Fetched:
    """Bring `url` to `dest` verified (see the module docstring); reuse a verified cached copy.
    `auth` is `user:password` for HTTP basic auth (default: the URL's userinfo, percent-decoded)."""
    dest = Path(dest)
    url, userinfo = split_userinfo(url)  # the one parser: requests would not percent-decode it all
    if auth is None and userinfo is not None:
        auth = userinfo_auth(userinfo)
    if (hit := cached(dest, sha256, size)) is not None:
        return hit
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART)
    shown = redact_url(url)
    result = Fetched(dest, "", 0)
    failures = 0
    mismatch: str | None = None
    while True:
        try:
            h = hashlib.sha256()
            have = part.stat().st_size if part.exists() else 0
            if have:
                _hash_file(part, h)
            if url.startswith(("http://", "https://")):
                n, h = _http_once(url, part, have, h, policy, auth, on_bytes, result, session)
            else:
                n, h = _fsspec_once(url, part, have, h, remote or Remote(), on_bytes, result)
        except _Transient as exc:
            failures += 1
            result.retries = failures
            if failures > policy.retries:
                raise TransferError(f"{shown}: gave up after {failures} attempts: {exc}") from None
            if exc.retry_after is not None:  # the server said when: no sooner, and at most the cap
                wait = (min(exc.retry_after, policy.max_backoff_s), "retry-after")
            else:
                wait = (policy.delay(failures), "backoff")
            result.waits.append(wait)
            time.sleep(wait[0])
            continue
        digest = h.hexdigest()
        bad_size = size is not None and n != size
        if bad_size or (sha256 is not None and digest != sha256):
            part.unlink(missing_ok=True)
            got = f"sha256 {digest} ({n:,} bytes)"
            want = f"sha256 {sha256 or '(any)'} ({size:,} bytes)" if size is not None \
                else f"sha256 {sha256}"
            if mismatch is not None:
                raise ChecksumError(f"{shown}: checksum mismatch twice: expected {want}, got {got} "
                                    f"(first try: {mismatch})")
            mismatch = got
            result.restarts += 1
            continue
        os.replace(part, dest)
        tmp = _sidecar(dest).with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": shown, "sha256": digest, "bytes": n}))
        os.replace(tmp, _sidecar(dest))
        result.sha256, result.bytes = digest, n
        if os.environ.get(KILL_HOOK) == dest.name:
            import signal
            os.kill(os.getpid(), signal.SIGKILL)
        return result


class _Pipe:
    """Writes and hashes chunk k on a helper thread while chunk k+1 arrives: hashlib and file
    writes release the GIL, so receiving, hashing and writing overlap (sha256 alone runs at about
    the speed of a local network; see benchmarks/bench_download.py)."""

    def __init__(self, out: Any, h: Any):
        from concurrent.futures import ThreadPoolExecutor

        self.out, self.h = out, h
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fetch-sink")
        self._pending: Any = None

    def _sink(self, chunk: bytes) -> None:
        self.out.write(chunk)
        self.h.update(chunk)

    def put(self, chunk: bytes) -> None:
        if self._pending is not None:
            self._pending.result()  # one chunk in flight: order kept, memory bounded
        self._pending = self._pool.submit(self._sink, chunk)

    def __enter__(self) -> _Pipe:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._pending is not None:
                self._pending.result()  # what arrived before an error is kept, for resuming
        finally:
            self._pool.shutdown(wait=True)


_SESSIONS = threading.local()


def _session() -> Any:
    if getattr(_SESSIONS, "s", None) is None:
        _SESSIONS.s = requests.Session()
    return _SESSIONS.s


def _http_once(url: str, part: Path, have: int, h: Any, policy: RetryPolicy, auth: str | None,
               on_bytes: Callable[[int], None] | None, result: Fetched,
               session: Any) -> tuple[int, Any]:
    """One GET (Range from `have`), appending to `part`: (bytes now in `part`, their running hash)."""
    session = session or _session()
    headers = {"Accept-Encoding": "identity"}  # the file as stored: its sha256 is of those bytes
    if have:
        headers["Range"] = f"bytes={have}-"
    user, _, password = (auth or "").partition(":")  # RFC 7617: the user-id has no colon
    basic = (user.encode(), password.encode()) if auth else None  # UTF-8, any characters
    shown = redact_url(url)
    result.requests += 1
    try:
        with session.get(url, headers=headers, stream=True, auth=basic,
                         timeout=(policy.timeout_s, policy.timeout_s)) as r:
            code = r.status_code
            if code == 416 and have:  # nothing after `have`: the part file is complete (or too long)
                return have, h
            if code in (401, 403):
                raise PermanentTransferError(f"{shown}: HTTP {code}: not authorised (check the "
                                             "source's credentials)")
            if code in (404, 410):
                raise PermanentTransferError(f"{shown}: HTTP {code}: not found")
            if code in (408, 425, 429) or code >= 500:
                after = retry_after_s(r.headers.get("Retry-After")) if code in RETRY_AFTER_CODES else None
                raise _Transient(f"HTTP {code}" + (f" (Retry-After: {after:g} s)" if after is not None
                                                   else ""), after)
            if code not in (200, 206):
                raise PermanentTransferError(f"{shown}: unexpected HTTP {code}")
            start = 0
            if code == 206:
                m = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
                start = int(m.group(1)) if m else -1
            if start != have:  # Range ignored (200) or answered from elsewhere: start over
                if have:
                    result.restarts += 1
                have, h = 0, hashlib.sha256()
            with open(part, "ab" if have else "wb") as out, _Pipe(out, h) as pipe:
                for chunk in r.raw.stream(CHUNK, decode_content=False):
                    pipe.put(chunk)
                    have += len(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
            return have, h
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
            OSError) as exc:
        if isinstance(exc, PermanentTransferError):
            raise
        raise _Transient(redact_text(f"{type(exc).__name__}: {exc}")) from None
    except Exception as exc:  # urllib3 protocol errors (connection dropped mid-body) and the like
        if isinstance(exc, (PermanentTransferError, _Transient)):
            raise
        if type(exc).__module__.startswith("urllib3"):
            raise _Transient(redact_text(f"{type(exc).__name__}: {exc}")) from None
        if type(exc).__module__.startswith("requests"):  # InvalidURL and the like quote the URL
            raise PermanentTransferError(redact_text(f"{shown}: {type(exc).__name__}: {exc}")) from None
        raise


def _fsspec_once(url: str, part: Path, have: int, h: Any, remote: Remote,
                 on_bytes: Callable[[int], None] | None, result: Fetched) -> tuple[int, Any]:
    """One read of an s3/hf object from offset `have` (fsspec turns the seek into a Range read)."""
    shown = redact_url(url)
    fs, path = remote.filesystem(url)
    result.requests += 1
    try:
        with fs.open(path, "rb", block_size=CHUNK) as src, open(part, "ab" if have else "wb") as out:
            if have:
                src.seek(have)
            while chunk := src.read(CHUNK):
                out.write(chunk)
                h.update(chunk)
                have += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
        return have, h
    except FileNotFoundError:
        raise PermanentTransferError(f"{shown}: not found") from None
    except PermissionError as exc:
        raise PermanentTransferError(f"{shown}: not authorised ({redact_text(str(exc))})") from None
    except Exception as exc:  # s3fs/aiohttp/huggingface_hub errors: timeouts, 5xx, dropped connections
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403, 404):
            raise PermanentTransferError(f"{shown}: HTTP {status}") from None
        raise _Transient(redact_text(f"{type(exc).__name__}: {exc}")) from None
