"""Dedup stage: exact duplicates by normalized-text hash, first occurrence kept, ledger, reuse."""
import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.clean import iter_parquet_docs, run_clean
from tasks.config import CleanConfig, CorpusConfig, DedupConfig
from tasks.dedup import plan, run_dedup, text_key
from tasks.download import run_download
from tasks.stage import MANIFEST, StageResult, read_manifest, sha256_file

TEXTS = {
    "a.txt": "hello world\n",      # first of its cluster: kept
    "b.txt": "hello world\n",      # exact copy of a
    "c.txt": "  hello \t world",   # a with other whitespace
    "d.txt": "Hello World\n",      # a with other case
    "e.txt": "something else entirely\n",
}


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory) -> StageResult:
    root = tmp_path_factory.mktemp("dedup")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in TEXTS.items():
        (corpus / name).write_text(text)
    ws = str(root / "ws")
    # shard_bytes=1: one document per shard, so duplicates sit in later shards than their originals.
    raw = run_download(CorpusConfig(sources=[str(corpus)], max_bytes=None, shard_bytes=1), ws)
    return run_clean(CleanConfig(min_chars=1, max_chars=100), raw, ws)


def _name(doc_id: str) -> str:
    return doc_id.rsplit(":", 1)[1]


def _ledger(result: StageResult) -> list[dict]:
    return pq.read_table(sorted(Path(result.path).glob("duplicates/duplicates-*.parquet"))).to_pylist()


def test_text_key_normalization():
    cfg = DedupConfig()
    assert text_key("hello world\n", cfg) == text_key("  hello \t world", cfg) \
        == hashlib.sha256(b"hello world").digest()
    assert text_key("Hello World", cfg) != text_key("hello world", cfg)
    assert text_key("Hello World", DedupConfig(lowercase=True)) == text_key("hello world", cfg)
    assert text_key("hello  world", DedupConfig(normalize_whitespace=False)) != text_key("hello world", cfg)


def test_first_occurrence_kept_and_ledger_points_to_it(cleaned, tmp_path):
    result = run_dedup(DedupConfig(), cleaned, str(tmp_path))
    assert result.counts == {"docs_in": 5, "kept": 3, "duplicates": 2}
    assert result.info["clusters"] == 1
    kept = [_name(d["id"]) for d in iter_parquet_docs(Path(result.path))]
    assert kept == ["a.txt", "d.txt", "e.txt"]
    ledger = _ledger(result)
    cluster = hashlib.sha256(b"hello world").hexdigest()
    assert [(_name(r["id"]), _name(r["duplicate_of"]), r["cluster"]) for r in ledger] == [
        ("b.txt", "a.txt", cluster), ("c.txt", "a.txt", cluster)]
    # Kept documents are unchanged copies of their input rows.
    inputs = {d["id"]: d for d in iter_parquet_docs(Path(cleaned.path))}
    assert all(inputs[d["id"]] == d for d in iter_parquet_docs(Path(result.path)))


def test_config_changes_what_counts_as_duplicate(cleaned, tmp_path):
    lower = run_dedup(DedupConfig(lowercase=True), cleaned, str(tmp_path))
    assert lower.counts == {"docs_in": 5, "kept": 2, "duplicates": 3}
    assert {_name(r["id"]) for r in _ledger(lower)} == {"b.txt", "c.txt", "d.txt"}
    exact = run_dedup(DedupConfig(normalize_whitespace=False), cleaned, str(tmp_path))
    assert exact.counts == {"docs_in": 5, "kept": 4, "duplicates": 1}
    assert [_name(r["id"]) for r in _ledger(exact)] == ["b.txt"]
    assert len({lower.fingerprint, exact.fingerprint}) == 2


def test_one_output_and_ledger_per_input_shard(cleaned, tmp_path):
    result = run_dedup(DedupConfig(), cleaned, str(tmp_path))
    directory = Path(result.path)
    manifest = read_manifest(directory)
    rows = {f["path"]: f["rows"] for f in manifest["files"]}
    assert rows == {**{f"docs-{i:05d}.parquet": int(i in (0, 3, 4)) for i in range(5)},
                    **{f"duplicates/duplicates-{i:05d}.parquet": int(i in (1, 2)) for i in range(5)}}
    for f in manifest["files"]:
        assert sha256_file(directory / f["path"]) == f["sha256"]
    c = result.counts
    assert c["docs_in"] == c["kept"] + c["duplicates"] == cleaned.counts["kept"]


def test_deterministic_across_runs(cleaned, tmp_path):
    one = run_dedup(DedupConfig(), cleaned, str(tmp_path / "ws1"))
    two = run_dedup(DedupConfig(), cleaned, str(tmp_path / "ws2"))
    assert ([f["sha256"] for f in read_manifest(Path(one.path))["files"]]
            == [f["sha256"] for f in read_manifest(Path(two.path))["files"]])


def test_rerun_reuses_and_partial_directory_is_rebuilt(cleaned, tmp_path):
    ws = str(tmp_path)
    _, directory = plan(DedupConfig(), cleaned, ws)
    (directory / "duplicates").mkdir(parents=True)
    (directory / "duplicates" / "duplicates-00001.parquet").write_bytes(b"crashed mid-write")
    first = run_dedup(DedupConfig(), cleaned, ws)
    assert not first.reused
    assert pq.ParquetFile(directory / "duplicates" / "duplicates-00001.parquet").metadata.num_rows == 1
    before = (directory / MANIFEST).stat().st_mtime_ns
    again = run_dedup(DedupConfig(), cleaned, ws)
    assert again.reused and again.counts == first.counts
    assert (directory / MANIFEST).stat().st_mtime_ns == before
