"""Transfers against a real local HTTP server: resume, retries, checksums, errors, names, redaction."""
import hashlib
import json
import os
from pathlib import Path, PurePosixPath

import pytest

from fake_origin import Origin
from tasks.download.fetch import (ChecksumError, PermanentTransferError, RetryPolicy, TransferError,
                         cache_relpath, cached, fetch, redact_text, redact_url, safe_join)

DATA = os.urandom(300_000) + b"tail"
SHA = hashlib.sha256(DATA).hexdigest()
FAST = RetryPolicy(retries=4, backoff_s=0.001, timeout_s=10)


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.close()


def test_plain_fetch_then_reuse(origin, tmp_path):
    url = origin.add("/a.bin", DATA)
    got = fetch(url, tmp_path / "a.bin", sha256=SHA, size=len(DATA), policy=FAST)
    assert got.sha256 == SHA and (tmp_path / "a.bin").read_bytes() == DATA and not got.reused
    assert origin.gets["/a.bin"] == 1 and not (tmp_path / "a.bin.part").exists()
    again = fetch(url, tmp_path / "a.bin", sha256=SHA, policy=FAST)
    assert again.reused and again.sha256 == SHA and origin.gets["/a.bin"] == 1  # not fetched again


def test_dropped_connection_resumes_with_range(origin, tmp_path):
    url = origin.add("/a.bin", DATA)
    origin.faults["/a.bin"] = ["drop", "drop"]
    got = fetch(url, tmp_path / "a.bin", sha256=SHA, policy=FAST)
    assert got.sha256 == SHA and got.retries == 2 and got.restarts == 0
    ranges = origin.ranges["/a.bin"]
    assert ranges[0] is None and ranges[1] == f"bytes={len(DATA) // 2}-"
    assert len(ranges) == 3 and ranges[2].startswith("bytes=")


def test_server_ignoring_range_starts_over(origin, tmp_path):
    url = origin.add("/a.bin", DATA)
    origin.faults["/a.bin"] = ["drop", "ignore_range"]
    got = fetch(url, tmp_path / "a.bin", sha256=SHA, size=len(DATA), policy=FAST)
    assert got.sha256 == SHA and got.restarts == 1 and origin.gets["/a.bin"] == 2
    assert (tmp_path / "a.bin").read_bytes() == DATA


def test_503_and_429_retry_then_succeed(origin, tmp_path):
    url = origin.add("/a.bin", DATA)
    origin.faults["/a.bin"] = ["503", "429", "503"]
    got = fetch(url, tmp_path / "a.bin", sha256=SHA, policy=FAST)
    assert got.sha256 == SHA and origin.gets["/a.bin"] == 4 and got.retries == 3


def test_persistent_503_gives_up(origin, tmp_path):
    url = origin.add("/a.bin", DATA)
    origin.faults["/a.bin"] = ["503"] * 10
    with pytest.raises(TransferError, match=r"/a.bin: gave up after 3 attempts: HTTP 503"):
        fetch(url, tmp_path / "a.bin", policy=RetryPolicy(retries=2, backoff_s=0.001))
    assert origin.gets["/a.bin"] == 3 and not (tmp_path / "a.bin").exists()


def test_corrupted_once_refetches_from_scratch(origin, tmp_path):
    url = origin.add("/a.bin", DATA)
    origin.faults["/a.bin"] = ["corrupt"]
    got = fetch(url, tmp_path / "a.bin", sha256=SHA, policy=FAST)
    assert got.sha256 == SHA and got.restarts == 1 and origin.gets["/a.bin"] == 2
    assert origin.ranges["/a.bin"] == [None, None]  # the second try did not resume the bad bytes


def test_corrupted_twice_fails_naming_url_and_hashes(origin, tmp_path):
    url = origin.add("/a.bin", DATA)
    origin.always["/a.bin"].add("corrupt")
    bad = hashlib.sha256(bytes([DATA[0] ^ 0xFF]) + DATA[1:]).hexdigest()
    with pytest.raises(ChecksumError) as err:
        fetch(url, tmp_path / "a.bin", sha256=SHA, policy=FAST)
    assert url in str(err.value) and SHA in str(err.value) and bad in str(err.value)
    assert origin.gets["/a.bin"] == 2
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "a.bin.part").exists()


def test_wrong_size_is_a_checksum_error(origin, tmp_path):
    url = origin.add("/a.bin", DATA)
    with pytest.raises(ChecksumError, match="bytes"):
        fetch(url, tmp_path / "a.bin", size=len(DATA) + 1, policy=FAST)


def test_404_and_auth_fail_at_once(origin, tmp_path):
    with pytest.raises(PermanentTransferError, match=r"/missing.bin: HTTP 404: not found"):
        fetch(f"{origin.url}/missing.bin", tmp_path / "m.bin", policy=FAST)
    assert origin.gets["/missing.bin"] == 1
    url = origin.add("/private.bin", DATA)
    origin.auth["/private.bin"] = "alice:s3cret-pw"
    with pytest.raises(PermanentTransferError, match="HTTP 401: not authorised"):
        fetch(url, tmp_path / "p.bin", policy=FAST, auth="alice:wrong")
    assert origin.gets["/private.bin"] == 1
    got = fetch(url, tmp_path / "p.bin", policy=FAST, auth="alice:s3cret-pw")
    assert got.sha256 == SHA
    assert "s3cret" not in (tmp_path / "p.bin.ok.json").read_text()


def test_interrupted_part_file_resumes_on_next_call(origin, tmp_path):
    url = origin.add("/a.bin", DATA)
    (tmp_path / "a.bin.part").write_bytes(DATA[:1000])  # left by a killed process
    got = fetch(url, tmp_path / "a.bin", sha256=SHA, policy=FAST)
    assert got.sha256 == SHA and origin.ranges["/a.bin"] == ["bytes=1000-"]


def test_cached_copy_is_rechecked(origin, tmp_path):
    url = origin.add("/a.bin", DATA)
    fetch(url, tmp_path / "a.bin", policy=FAST)
    with open(tmp_path / "a.bin", "r+b") as f:  # same size, a different first byte (DATA is random)
        f.write(bytes([DATA[0] ^ 0xFF]))
    assert cached(tmp_path / "a.bin") is None
    got = fetch(url, tmp_path / "a.bin", policy=FAST)
    assert got.sha256 == SHA and not got.reused and origin.gets["/a.bin"] == 2


def test_redaction():
    assert redact_url("https://alice:pw@host.org/a/b.jsonl?x=1&token=abc&X-Amz-Signature=zz") \
        == "https://host.org/a/b.jsonl?x=1&token=***&X-Amz-Signature=***"
    assert redact_url("s3://bucket/key.jsonl") == "s3://bucket/key.jsonl"
    assert redact_url("/local/path") == "/local/path"
    assert redact_text("failed: https://u:p@h/x and s3://k:s@b/y") == "failed: https://h/x and s3://b/y"


@pytest.mark.parametrize("url", ["https://h.org/../../etc/passwd", "https://h.org/a/%2e%2e/%2E%2E/x",
                                 "https://h.org//etc/passwd", "https://h.org/a\\..\\..\\x",
                                 "https://h.org/..%2f..%2fx", "s3://../../x", "https://h.org/"])
def test_cache_names_cannot_escape(tmp_path, url):
    rel = cache_relpath(url)
    assert not rel.is_absolute() and ".." not in rel.parts
    assert all(p and not p.startswith(".") for p in rel.parts)
    assert safe_join(tmp_path, rel).is_relative_to(tmp_path.resolve())


def test_cache_names_are_distinct_and_readable():
    assert cache_relpath("https://h.org/pile/00.jsonl.zst") == PurePosixPath("https/h.org/pile/00.jsonl.zst")
    assert cache_relpath("https://h.org/x?v=1") != cache_relpath("https://h.org/x?v=2")
    with pytest.raises(ValueError, match="escapes"):
        safe_join(Path("/tmp/cache"), "../outside")


def test_sidecar_records_redacted_url(origin, tmp_path):
    url = origin.add("/a.bin", DATA).replace("http://", "http://bob:hunter2@")
    origin.auth["/a.bin"] = "bob:hunter2"
    fetch(url, tmp_path / "a.bin", policy=FAST, auth="bob:hunter2")
    meta = json.loads((tmp_path / "a.bin.ok.json").read_text())
    assert meta == {"url": redact_url(url), "sha256": SHA, "bytes": len(DATA)}
    assert "hunter2" not in json.dumps(meta)
