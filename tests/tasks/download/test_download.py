"""Download stage: source listing, documents and ids, quarantine ledger, shards, manifest, reuse."""
import json
import os
import sysconfig
from pathlib import Path

import pytest
import zstandard

from tasks.core.data_config import CorpusConfig
from tasks.download.stage import plan, run_download
from tasks.download.readers import read_shard
from tasks.download.sources import list_sources
from flows.cli.procs import free_port
from tasks.core.protocol import MANIFEST, read_manifest, sha256_file

LINES = [
    json.dumps({"id": "doc-1", "text": "first line document", "lang": "en"}),  # 1: id kept, meta kept
    '{"text": "never closed"',                                                 # 2: malformed JSON
    json.dumps({"body": "no text field"}),                                     # 3: no text field
    "",                                                                        # 4: blank, skipped
    json.dumps({"text": "no id here"}),                                        # 5: id from file:line
    json.dumps({"text": 3}),                                                   # 6: text not a string
    '{"text": "\\ud800 lone surrogate"}',                                      # 7: not encodable
]


def write_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("alpha document\n")
    (corpus / "bad.txt").write_bytes(b"fine first line\nbroken \xff\xfe bytes\n")
    (corpus / "c.md").write_text("# a markdown title\n")
    (corpus / "d.jsonl").write_text("\n".join(LINES) + "\n")
    frame = zstandard.ZstdCompressor(level=3).compress
    # Two concatenated frames, as `cat a.zst b.zst` produces: both are read.
    (corpus / "e.jsonl.zst").write_bytes(frame(b'{"text": "zst one"}\n') + frame(b'{"text": "zst two"}\n'))
    whole = frame(b"".join(b'{"text": "row %d"}\n' % i for i in range(100)))
    (corpus / "f.jsonl.zst").write_bytes(whole[:-12])  # truncated download
    (corpus / "g.jsonl.zst").write_bytes(b"this is not zstd at all")
    (corpus / "sub" / "b.py").write_text("print('b')\n")
    (corpus / "picture.png").write_bytes(b"\x89PNG\r\n")  # not a text format: not taken
    (corpus / ".hidden.txt").write_text("hidden files are skipped")
    return corpus


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path)


def _cfg(corpus: Path, **kw) -> CorpusConfig:
    kw.setdefault("max_bad_fraction", 1.0)  # the fixture is half bad on purpose
    return CorpusConfig(sources=[str(corpus)], max_bytes=None, **kw)


def _quarantine(result) -> list[dict]:
    return [json.loads(line) for line in (Path(result.path) / "quarantine.jsonl").read_text().splitlines()]


def test_documents_counts_and_ids(corpus, tmp_path):
    result = run_download(_cfg(corpus), str(tmp_path / "ws"))
    taken = ["a.txt", "bad.txt", "c.md", "d.jsonl", "e.jsonl.zst", "f.jsonl.zst", "g.jsonl.zst", "sub/b.py"]
    size = sum((corpus / name).stat().st_size for name in taken)
    assert result.counts == {"files": 8, "docs": 7, "quarantined": 7, "bytes": size}
    assert not result.reused and result.info["capped"] is False

    docs = [d for shard in sorted(Path(result.path).glob("shard-*.jsonl.zst")) for d in read_shard(shard)]
    label = "corpus"  # the directory's name: ids do not depend on where it sits
    assert [d["id"] for d in docs] == [f"{label}:a.txt", f"{label}:c.md", "doc-1", f"{label}:d.jsonl:5",
                                       f"{label}:e.jsonl.zst:1", f"{label}:e.jsonl.zst:2",
                                       f"{label}:sub/b.py"]
    assert docs[0] == {"id": f"{label}:a.txt", "text": "alpha document\n", "source": label, "meta": {}}
    assert docs[2]["meta"] == {"lang": "en"} and docs[2]["text"] == "first line document"
    assert [d["text"] for d in docs[4:6]] == ["zst one", "zst two"]


def test_quarantine_ledger_names_file_line_and_reason(corpus, tmp_path):
    result = run_download(_cfg(corpus), str(tmp_path / "ws"))
    rows = _quarantine(result)
    assert len(rows) == result.counts["quarantined"] == 7
    by_place = {(Path(r["file"]).name, r["line"]): r["reason"] for r in rows}
    assert set(by_place) == {("bad.txt", 2), ("d.jsonl", 2), ("d.jsonl", 3), ("d.jsonl", 6),
                             ("d.jsonl", 7), ("f.jsonl.zst", 1), ("g.jsonl.zst", 1)}
    assert "invalid utf-8" in by_place[("bad.txt", 2)]
    assert "malformed JSON" in by_place[("d.jsonl", 2)]
    assert "no string field 'text'" in by_place[("d.jsonl", 3)]
    assert "no string field 'text'" in by_place[("d.jsonl", 6)]
    assert "truncated zstd stream" in by_place[("f.jsonl.zst", 1)]
    assert "unpaired surrogates" in by_place[("d.jsonl", 7)]
    assert "corrupt zstd stream" in by_place[("g.jsonl.zst", 1)]
    assert all(r["reason"].startswith(f"{r['file']}:{r['line']}: ") for r in rows)
    assert all(r["source"] == "corpus" for r in rows)


def test_manifest_records_shards_and_sources(corpus, tmp_path):
    result = run_download(_cfg(corpus, shard_bytes=1), str(tmp_path / "ws"))  # one doc per shard
    directory = Path(result.path)
    manifest = read_manifest(directory)
    shards = [f for f in manifest["files"] if f["path"].startswith("shard-")]
    assert [f["path"] for f in shards] == [f"shard-{i:05d}.jsonl.zst" for i in range(7)]
    assert all(f["rows"] == 1 for f in shards)
    for f in manifest["files"]:
        assert sha256_file(directory / f["path"]) == f["sha256"]
        assert (directory / f["path"]).stat().st_size == f["bytes"]
    ledger = next(f for f in manifest["files"] if f["path"] == "quarantine.jsonl")
    assert ledger["rows"] == 7
    sources = {Path(s["path"]).name: s for s in manifest["sources"]}
    assert sources["d.jsonl"]["sha256"] == sha256_file(corpus / "d.jsonl")
    assert sources["g.jsonl.zst"]["sha256"] == sha256_file(corpus / "g.jsonl.zst")
    assert sources["d.jsonl"]["docs"] == 2 and sources["d.jsonl"]["quarantined"] == 4
    assert manifest["capped"] is False and manifest["source_bytes"] == result.counts["bytes"]


def test_deterministic_output(corpus, tmp_path):
    one = run_download(_cfg(corpus), str(tmp_path / "ws1"))
    two = run_download(_cfg(corpus), str(tmp_path / "ws2"))
    assert one.fingerprint == two.fingerprint
    assert ([f["sha256"] for f in read_manifest(Path(one.path))["files"]]
            == [f["sha256"] for f in read_manifest(Path(two.path))["files"]])


def test_rerun_reuses_complete_output(corpus, tmp_path):
    first = run_download(_cfg(corpus), str(tmp_path / "ws"))
    manifest = Path(first.path) / MANIFEST
    before = manifest.stat().st_mtime_ns
    again = run_download(_cfg(corpus), str(tmp_path / "ws"))
    assert again.reused and again.counts == first.counts and again.fingerprint == first.fingerprint
    assert manifest.stat().st_mtime_ns == before


def test_partial_or_damaged_directory_is_rebuilt(corpus, tmp_path):
    cfg, ws = _cfg(corpus), str(tmp_path / "ws")
    _, directory = plan(cfg, ws)
    directory.mkdir(parents=True)
    (directory / "shard-00000.jsonl.zst").write_bytes(b"left over from a crash")  # no manifest
    result = run_download(cfg, ws)
    assert not result.reused and read_manifest(directory) is not None
    assert sum(1 for _ in read_shard(directory / "shard-00000.jsonl.zst")) == 7

    with open(directory / "shard-00000.jsonl.zst", "ab") as f:  # manifest there, size now wrong
        f.write(b"x")
    assert read_manifest(directory) is None
    rebuilt = run_download(cfg, ws)
    assert not rebuilt.reused and read_manifest(directory) is not None


def test_changed_source_changes_fingerprint(corpus, tmp_path):
    cfg, ws = _cfg(corpus), str(tmp_path / "ws")
    fp0, _ = plan(cfg, ws)
    assert plan(cfg, ws)[0] == fp0
    (corpus / "a.txt").write_text("alpha document, edited\n")
    fp1, _ = plan(cfg, ws)
    st = (corpus / "a.txt").stat()
    os.utime(corpus / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched only
    fp2, _ = plan(cfg, ws)
    (corpus / "new.txt").write_text("a new file")
    fp3, _ = plan(cfg, ws)
    assert len({fp0, fp1, fp2, fp3}) == 4


def test_max_bytes_takes_whole_files_and_records_cap(corpus, tmp_path):
    cap = (corpus / "a.txt").stat().st_size + 1  # a.txt is under the cap, so bad.txt is taken too
    result = run_download(_cfg(corpus).model_copy(update={"max_bytes": cap}), str(tmp_path / "ws"))
    assert result.counts["files"] == 2 and result.info["capped"] is True
    assert result.counts["bytes"] == sum((corpus / n).stat().st_size for n in ("a.txt", "bad.txt"))
    assert read_manifest(Path(result.path))["capped"] is True


def test_globs_files_and_python_encoding(corpus, tmp_path):
    (corpus / "latin.py").write_bytes("# -*- coding: latin-1 -*-\ns = 'café'\n".encode("latin-1"))
    files, _ = list_sources(CorpusConfig(sources=[str(corpus / "**" / "*.py"), str(corpus / "a.txt"),
                                                  str(corpus / "sub")], max_bytes=None))
    assert [f.rel for f in files] == ["latin.py", "sub/b.py", "a.txt"]  # sub/b.py taken once
    result = run_download(CorpusConfig(sources=[str(corpus / "latin.py")]), str(tmp_path / "ws"))
    [doc] = read_shard(Path(result.path) / "shard-00000.jsonl.zst")
    assert "s = 'café'" in doc["text"] and doc["id"] == "latin.py:latin.py"


def test_source_errors_are_clear(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_sources(CorpusConfig(sources=[str(tmp_path / "nowhere")]))
    with pytest.raises(FileNotFoundError, match=r"\*\.parquet"):
        list_sources(CorpusConfig(sources=[str(corpus / "*.parquet")]))
    with pytest.raises(ValueError, match="unsupported file type"):
        list_sources(CorpusConfig(sources=[str(corpus / "picture.png")]))
    # A missing source fails even after the byte cap was reached by an earlier one.
    with pytest.raises(FileNotFoundError, match="missing"):
        list_sources(CorpusConfig(sources=[str(corpus), str(tmp_path / "missing")], max_bytes=1))


def test_python_stdlib_source():
    files, capped = list_sources(CorpusConfig(sources=["python-stdlib"], max_bytes=200_000))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert capped and files and sum(f.size for f in files[:-1]) < 200_000 <= sum(f.size for f in files)
    assert all(f.label == "python-stdlib" and f.path.suffix == ".py" for f in files)
    assert all(f.path.is_relative_to(stdlib) for f in files)
    assert not any({"site-packages", "dist-packages", "__pycache__"} & set(f.path.parts) for f in files)
    assert [f.rel for f in files] == sorted(f.rel for f in files)


# ---------------------------------------------------------------------------- remote sources and formats

import gzip  # noqa: E402
import hashlib  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from fake_origin import Origin  # noqa: E402
from tasks.core.data_config import SourceSpec  # noqa: E402
from tasks.download.stage import BadInputError  # noqa: E402
from tasks.download.fetch import KILL_HOOK, ChecksumError, PermanentTransferError  # noqa: E402
from tasks.download.sources import CACHE_DIR  # noqa: E402

FAST = {"retry_backoff_s": 0.001, "timeout_s": 10, "max_bytes": None}


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.close()


def _docs(result) -> list[dict]:
    return [d for s in sorted(Path(result.path).glob("shard-*.jsonl.zst")) for d in read_shard(s)]


def _pile(n: int, start: int = 0) -> bytes:
    rows = [json.dumps({"text": f"document {i}", "meta": {"pile_set_name": "Github"}})
            for i in range(start, start + n)]
    return zstandard.ZstdCompressor().compress(("\n".join(rows) + "\n").encode())


def test_https_sources_verified_parallel_and_redacted(origin, tmp_path):
    blobs = {f"/pile/{i:02d}.jsonl.zst": _pile(50, 50 * i) for i in range(4)}
    for path, data in blobs.items():
        origin.add(path, data)
        origin.auth[path] = "alice:pa55word"
    origin.faults["/pile/01.jsonl.zst"] = ["drop", "503"]
    secret_url = origin.url.replace("http://", "http://alice:pa55word@")
    sources = [{"url": secret_url + p, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
               for p, d in blobs.items()]
    cfg = CorpusConfig(sources=sources, parallel_downloads=3, **FAST)
    assert all(isinstance(s, SourceSpec) and "pa55word" not in s.url for s in cfg.sources)
    result = run_download(cfg, str(tmp_path / "ws"))
    assert result.counts["files"] == 4 and result.counts["docs"] == 200
    docs = _docs(result)
    assert [d["text"] for d in docs] == [f"document {i}" for i in range(200)]
    assert docs[0]["meta"] == {"pile_set_name": "Github"}  # Pile meta object kept as meta
    manifest = read_manifest(Path(result.path))
    assert manifest["records_read"] == manifest["counts"]["docs"] + manifest["counts"]["quarantined"]
    assert [s["sha256"] for s in manifest["sources"]] == [s["sha256"] for s in sources]
    assert manifest["transfers"]["fetched"] == 4 and manifest["transfers"]["retries"] >= 2
    # The password is nowhere in what the stage wrote (manifest, ledger, cache sidecars).
    for p in (tmp_path / "ws").rglob("*"):
        if p.is_file() and not p.name.endswith(".zst"):
            assert b"pa55word" not in p.read_bytes(), p
    assert all(c.is_relative_to(tmp_path / "ws" / CACHE_DIR)
               for c in (tmp_path / "ws").rglob("*.jsonl.zst") if "download" not in c.parts)


def test_https_checksum_mismatch_and_404_fail_clearly(origin, tmp_path):
    data = _pile(3)
    url = origin.add("/x.jsonl.zst", data)
    origin.always["/x.jsonl.zst"].add("corrupt")
    cfg = CorpusConfig(sources=[{"url": url, "sha256": hashlib.sha256(data).hexdigest()}], **FAST)
    with pytest.raises(ChecksumError, match=hashlib.sha256(data).hexdigest()):
        run_download(cfg, str(tmp_path / "ws"))
    with pytest.raises(PermanentTransferError, match="404"):
        run_download(CorpusConfig(sources=[origin.url + "/nope.jsonl"], **FAST), str(tmp_path / "ws"))


def test_formats_and_field_mapping(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = [{"content": "gz one", "uid": "g1", "lang": "en"}, {"content": ""}, {"other": 1}]
    with gzip.open(src / "a.json.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    whole = gzip.compress(b"".join(b'{"content": "row %d"}\n' % i for i in range(50)))
    (src / "b.json.gz").write_bytes(whole[: len(whole) // 2])  # truncated gzip
    pq.write_table(pa.table({"content": ["pq one", "pq two", "  "], "uid": ["p1", "p2", "p3"],
                             "lang": ["de", "fr", "en"]}), src / "c.parquet")
    (src / "d.txt").write_text("first doc\n<END>\nsecond\ndoc\n<END>\n<END>\nthird\n")
    cfg = CorpusConfig(sources=[
        {"url": str(src / "a.json.gz"), "text_field": "content", "id_field": "uid"},
        {"url": str(src / "b.json.gz"), "text_field": "content"},
        {"url": str(src / "c.parquet"), "text_field": "content", "id_field": "uid",
         "meta_fields": ["lang"]},
        {"url": str(src / "d.txt"), "separator": "<END>\n"}], max_bytes=None, max_bad_fraction=1.0)
    result = run_download(cfg, str(tmp_path / "ws"))
    docs = _docs(result)
    assert [(d["id"], d["text"]) for d in docs if d["id"] in ("g1", "p1", "p2")] == \
        [("g1", "gz one"), ("p1", "pq one"), ("p2", "pq two")]
    assert next(d for d in docs if d["id"] == "p1")["meta"] == {"lang": "de"}
    assert next(d for d in docs if d["id"] == "g1")["meta"] == {"lang": "en"}
    # the separator stays in the text; a piece of nothing but the separator joins the one before
    assert [d["text"] for d in docs if d["source"] == "d.txt"] == \
        ["first doc\n<END>\n", "second\ndoc\n<END>\n<END>\n", "third\n"]
    assert [d["id"] for d in docs if d["source"] == "d.txt"] == [f"d.txt:d.txt:{i}" for i in (1, 2, 3)]
    rows = _quarantine(result)
    got = sorted((Path(r["file"]).name, r["line"], r["reason_code"]) for r in rows)
    truncated = [g for g in got if g[0] == "b.json.gz"]
    assert truncated and truncated[-1][2] == "truncated_stream"
    assert [g for g in got if g[0] != "b.json.gz"] == [
        ("a.json.gz", 2, "empty"), ("a.json.gz", 3, "no_text_field"), ("a.json.gz", 4, "malformed_json"),
        ("c.parquet", 3, "empty")]
    manifest = read_manifest(Path(result.path))
    assert manifest["records_read"] == len(docs) + len(rows)
    assert sum(manifest["quarantine_reasons"].values()) == len(rows)
    assert manifest["quarantine_reasons"]["empty"] == 2


def test_bad_fraction_limit_fails_with_counts(corpus, tmp_path):
    with pytest.raises(BadInputError, match=r"7 of 14 records quarantined \(50.0% > max_bad_fraction "
                                            r"40.0%\).*'malformed_json': 1"):
        run_download(_cfg(corpus, max_bad_fraction=0.4), str(tmp_path / "ws"))
    ok = run_download(_cfg(corpus, max_bad_fraction=0.5), str(tmp_path / "ws"))
    assert ok.counts["quarantined"] == 7


def test_local_sha256_is_verified(corpus, tmp_path):
    cfg = CorpusConfig(sources=[{"url": str(corpus / "a.txt"), "sha256": "0" * 64}], max_bytes=None)
    with pytest.raises(PermanentTransferError, match="sha256 mismatch"):
        run_download(cfg, str(tmp_path / "ws"))


_KILL_SCRIPT = """
import json, sys
from tasks.core.data_config import CorpusConfig
from tasks.download.stage import run_download
cfg = CorpusConfig.model_validate(json.loads(sys.argv[1]))
r = run_download(cfg, sys.argv[2])
print(json.dumps(r.counts))
"""


def test_rerun_after_kill_fetches_nothing_completed(origin, tmp_path):
    names = [f"/k/{i}.jsonl.zst" for i in range(4)]
    for i, n in enumerate(names):
        origin.add(n, _pile(20, 20 * i))
    cfg = {"sources": [origin.url + n for n in names], "parallel_downloads": 1, **FAST}
    ws = str(tmp_path / "ws")
    cmd = [sys.executable, "-c", _KILL_SCRIPT, json.dumps(cfg), ws]
    env = {**os.environ, KILL_HOOK: "1.jsonl.zst"}  # SIGKILL right after 1.jsonl.zst is verified
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert origin.gets[names[0]] == 1 and origin.gets[names[1]] == 1
    # The rerun happens here (one Prefect import fewer than a second subprocess).
    again = run_download(CorpusConfig.model_validate(cfg), ws)
    assert again.counts["docs"] == 80 and not again.reused
    assert read_manifest(Path(again.path))["transfers"]["reused"] == 2
    # Completed files were not fetched again; the rest were fetched exactly once in all.
    assert origin.gets[names[0]] == 1 and origin.gets[names[1]] == 1
    assert sum(origin.gets[n] for n in names[2:]) <= 4 and origin.gets[names[3]] == 1


def test_s3_sources_through_moto_server(tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed")
    boto3 = pytest.importorskip("boto3")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="AKIDTEST",
                          aws_secret_access_key="very-secret-key", region_name="us-east-1")
        s3.create_bucket(Bucket="corpus")
        blobs = {f"pile/{i:02d}.jsonl.zst": _pile(10, 10 * i) for i in range(3)}
        for key, data in blobs.items():
            s3.put_object(Bucket="corpus", Key=key, Body=data)
        s3.put_object(Bucket="corpus", Key="single.jsonl", Body=b'{"text": "alone"}\n')
        one = b'{"text": "alone"}\n'
        cfg = CorpusConfig(sources=["s3://corpus/pile/", {"url": "s3://corpus/single.jsonl",
                                                          "sha256": hashlib.sha256(one).hexdigest()}],
                           s3_endpoint=endpoint, s3_access_key="AKIDTEST",
                           s3_secret_key="very-secret-key", **FAST)
        result = run_download(cfg, str(tmp_path / "ws"))
        assert result.counts["files"] == 4 and result.counts["docs"] == 31
        assert [d["text"] for d in _docs(result)][:2] == ["document 0", "document 1"]
        manifest = read_manifest(Path(result.path))
        assert [s["path"] for s in manifest["sources"]] == [
            "s3://corpus/pile/00.jsonl.zst", "s3://corpus/pile/01.jsonl.zst",
            "s3://corpus/pile/02.jsonl.zst", "s3://corpus/single.jsonl"]
        assert manifest["sources"][0]["sha256"] == hashlib.sha256(blobs["pile/00.jsonl.zst"]).hexdigest()
        text = (Path(result.path) / "manifest.json").read_text()
        assert "very-secret-key" not in text and "AKIDTEST" not in text
        with pytest.raises(FileNotFoundError, match="s3://corpus/nothing-here"):
            run_download(cfg.model_copy(update={"sources": ["s3://corpus/nothing-here"]}),
                         str(tmp_path / "ws"))
    finally:
        server.stop()


def test_hf_dataset_through_local_hub_endpoint(origin, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_ENDPOINT", origin.url)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    origin.hf["eleuther/tiny-pile"] = {"data/train-00.jsonl.zst": _pile(5),
                                       "data/train-01.jsonl.zst": _pile(5, 5),
                                       "README.md": b"# tiny pile\n"}
    cfg = CorpusConfig(sources=["hf://datasets/eleuther/tiny-pile/data/*.jsonl.zst"], **FAST)
    result = run_download(cfg, str(tmp_path / "ws"))
    assert result.counts["files"] == 2 and result.counts["docs"] == 10
    assert [d["text"] for d in _docs(result)] == [f"document {i}" for i in range(10)]
    gets = [p for p in origin.gets if "/resolve/" in p]
    assert sorted(gets) == ["/datasets/eleuther/tiny-pile/resolve/main/data/train-00.jsonl.zst",
                            "/datasets/eleuther/tiny-pile/resolve/main/data/train-01.jsonl.zst"]


def test_progress_reports_rates_and_final_counts(corpus, tmp_path):
    seen: list[dict] = []
    result = run_download(_cfg(corpus), str(tmp_path / "ws"), on_progress=seen.append)
    last = seen[-1]
    assert last["fraction"] == 1.0 and last["docs"] == result.counts["docs"]
    assert last["bytes_read"] == result.counts["bytes"] and last["docs_per_s"] > 0


def test_prefect_retries_only_what_can_succeed():
    from tasks.download.task import _retry_worth_it
    from tasks.download.fetch import TransferError

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self, raise_on_failure=True):
            return self.exc

    assert _retry_worth_it(None, None, State(TransferError("503 five times")))
    for exc in (PermanentTransferError("404"), BadInputError("60% bad"), FileNotFoundError("x")):
        assert not _retry_worth_it(None, None, State(exc))


def test_credentials_never_reach_params_or_fingerprint_inputs(tmp_path):
    from tasks.core.config import load_config, redacted_params
    from tasks.download.stage import public_config

    cfg = load_config("debug", ['corpus.sources=["https://bob:hunter2@example.org/pile/00.jsonl.zst"]',
                                "corpus.s3_secret_key=AWS-SECRET-1", "corpus.s3_access_key=AKID-1",
                                "corpus.hf_token=hf_TOKEN_1"])
    blobs = [json.dumps(redacted_params(cfg)), json.dumps(public_config(cfg.corpus)),
             cfg.model_dump_json(), repr(cfg.corpus)]
    for blob in blobs:
        for secret in ("hunter2", "AWS-SECRET-1", "AKID-1", "hf_TOKEN_1"):
            assert secret not in blob
    assert cfg.corpus.sources[0].auth.get_secret_value() == "bob:hunter2"  # still usable
    assert cfg.corpus.sources[0].url == "https://example.org/pile/00.jsonl.zst"
