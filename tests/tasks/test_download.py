"""Download stage: source listing, documents and ids, quarantine ledger, shards, manifest, reuse."""
import json
import os
import sysconfig
from pathlib import Path

import pytest
import zstandard

from tasks.config import CorpusConfig
from tasks.download import list_sources, plan, read_shard, run_download
from tasks.stage import MANIFEST, read_manifest, sha256_file

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
    label = str(corpus)
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
    assert all(r["source"] == str(corpus) for r in rows)


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
    assert "s = 'café'" in doc["text"] and doc["id"] == f"{corpus / 'latin.py'}:latin.py"


def test_source_errors_are_clear(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_sources(CorpusConfig(sources=[str(tmp_path / "nowhere")]))
    with pytest.raises(FileNotFoundError, match=r"\*\.parquet"):
        list_sources(CorpusConfig(sources=[str(corpus / "*.parquet")]))
    with pytest.raises(ValueError, match="unsupported file type"):
        list_sources(CorpusConfig(sources=[str(corpus / "picture.png")]))
    for url in ("https://example.com/corpus.jsonl", "s3://bucket/corpus", "hf://datasets/x/y"):
        with pytest.raises(ValueError, match="not supported yet"):
            list_sources(CorpusConfig(sources=[url]))
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
