"""Transfers against a real local HTTP server: resume, retries, checksums, errors, names, redaction."""
import hashlib
import json
import os
import time
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import pytest

from fake_origin import Origin
from tasks.download.fetch import (ChecksumError, PermanentTransferError, RetryPolicy, TransferError,
                                 cached, fetch, redact_text, redact_url, retry_after_s)
from tasks.download.sources import cache_relpath, safe_join

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


# ---------------------------------------------------------------------------- Retry-After, URL secrets


def test_retry_after_seconds_is_honoured(origin, tmp_path):
    url = origin.add("/a.bin", DATA)
    origin.faults["/a.bin"] = ["429@1"]
    started = time.monotonic()
    got = fetch(url, tmp_path / "a.bin", sha256=SHA, policy=FAST)
    assert got.sha256 == SHA and got.retries == 1 and origin.gets["/a.bin"] == 2
    assert got.waits == [(1.0, "retry-after")]  # the server's 1 s, not FAST's 1 ms backoff
    assert time.monotonic() - started >= 0.9


def test_retry_after_is_capped_and_reads_http_dates(origin, tmp_path):
    url = origin.add("/a.bin", DATA)
    later, earlier = formatdate(time.time() + 3600, usegmt=True), formatdate(time.time() - 3600, usegmt=True)
    origin.faults["/a.bin"] = ["503@3600", f"503@{later}", f"429@{earlier}", "503@soon", "500@7"]
    policy = RetryPolicy(retries=5, backoff_s=0.001, max_backoff_s=0.2, timeout_s=10)
    got = fetch(url, tmp_path / "a.bin", sha256=SHA, policy=policy)
    assert got.sha256 == SHA and origin.gets["/a.bin"] == 6
    assert [why for _, why in got.waits] == ["retry-after"] * 3 + ["backoff"] * 2  # unreadable; not 429/503
    assert [s for s, _ in got.waits[:3]] == [0.2, 0.2, 0.0]  # capped, capped, a date already past
    assert all(s < 0.05 for s, _ in got.waits[3:])  # FAST backoff: 1 ms doubling, +/- 50%


def test_retry_after_values():
    now = parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    assert retry_after_s("120") == 120.0 and retry_after_s(" 0 ") == 0.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:30 GMT", now=now) == 30.0
    assert retry_after_s("Wed, 21 Oct 2015 07:00:00 GMT", now=now) == 0.0
    for bad in (None, "", "soon", "-5", "1.5"):
        assert retry_after_s(bad) is None


@pytest.mark.parametrize("user,password", [("user", "p@ss"), ("j\u00fcrgen", "p\u00e4 ss:/?#@\u2713%")])
def test_url_credentials_are_percent_decoded(origin, tmp_path, user, password):
    url = origin.add("/private.bin", DATA)
    origin.auth["/private.bin"] = f"{user}:{password}"  # the server checks the Basic header (UTF-8)
    encoded = url.replace("http://", f"http://{quote(user, safe='')}:{quote(password, safe='')}@")
    got = fetch(encoded, tmp_path / "p.bin", sha256=SHA, policy=FAST)
    assert got.sha256 == SHA and origin.gets["/private.bin"] == 1
    assert quote(password, safe="") not in (tmp_path / "p.bin.ok.json").read_text()


def test_url_credentials_split_at_the_last_at(origin, tmp_path):
    url = origin.add("/private.bin", DATA)
    origin.auth["/private.bin"] = "user:p@ss"
    raw = url.replace("http://", "http://user:p@ss@")  # not encoded: the last `@` ends the userinfo
    assert fetch(raw, tmp_path / "p.bin", sha256=SHA, policy=FAST).sha256 == SHA
    assert redact_url(raw) == url and "ss@" not in (tmp_path / "p.bin.ok.json").read_text()


def test_errors_and_sidecars_never_show_query_secrets(origin, tmp_path):
    from flows.cli.procs import free_port

    secret = "?download=1&token=TOK-SECRET&X-Amz-Signature=SIG-SECRET&X-Amz-Credential=AKID-SECRET"
    url = origin.add("/signed.bin", DATA)
    got = fetch(url + secret, tmp_path / "s.bin", sha256=SHA, policy=FAST)
    assert got.sha256 == SHA and origin.queries["/signed.bin"] == [secret[1:]]  # sent as given
    errors = []
    for bad in (f"{origin.url}/missing.bin{secret}", f"http://127.0.0.1:{free_port()}/x.bin{secret}"):
        with pytest.raises((PermanentTransferError, TransferError)) as err:
            fetch(bad, tmp_path / "x.bin", policy=RetryPolicy(retries=1, backoff_s=0.001, timeout_s=5))
        errors.append(str(err.value))
    assert "HTTP 404" in errors[0] and "gave up after 2 attempts" in errors[1]
    for text in errors + [(tmp_path / "s.bin.ok.json").read_text()]:
        assert "download=1" in text and "token=***" in text and "X-Amz-Signature=***" in text
        assert "SECRET" not in text, text


def test_redaction_of_query_secrets_and_free_text():
    url = ("https://u:p@ss@h.org/a.jsonl.zst?download=1&X-Amz-Date=20240101&X-Amz-Expires=60"
           "&X-Amz-Credential=AKID&X-Amz-Security-Token=T1&X-Amz-Signature=S1&sig=S2&access_token=T2"
           "&key=K&api_key=K2&Signature=S3")
    assert redact_url(url) == ("https://h.org/a.jsonl.zst?download=1&X-Amz-Date=20240101&X-Amz-Expires=60"
                               "&X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Signature=***"
                               "&sig=***&access_token=***&key=***&api_key=***&Signature=***")
    message = "Max retries exceeded with url: /a?token=T3&v=2 (Caused by https://x:y@z.org/b)"
    assert redact_text(message) == "Max retries exceeded with url: /a?token=***&v=2 (Caused by https://z.org/b)"
    assert redact_text('{"url": "https://h/a?sig=S4"}') == '{"url": "https://h/a?sig=***"}'
    assert redact_url is redact_text  # one function for every record


def test_query_strings_keep_the_format_suffix_in_cache_names():
    name = cache_relpath("https://h.org/d/a.jsonl.zst?download=1").name
    assert name.startswith("a-") and name.endswith(".jsonl.zst")
    # a re-signed URL of the same object keeps its cached copy; another object does not share it
    assert cache_relpath("https://h.org/a.gz?token=A&v=1") == cache_relpath("https://h.org/a.gz?token=B&v=1")
    assert cache_relpath("https://h.org/a.gz?token=A&v=1") != cache_relpath("https://h.org/a.gz?token=A&v=2")
