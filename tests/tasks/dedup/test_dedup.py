"""Dedup stage: exact and near duplicates on a planted corpus, stable kept copy, ledger, resume."""
import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from planted_corpus import jaccard, planted, write_clean_upstream
from tasks.core.units import iter_parquet_docs
from tasks.core.data_config import DedupConfig
from tasks.dedup.stage import describe, plan, run_dedup, text_key
from tasks.core.units import pool_map
from tasks.core.protocol import MANIFEST, read_manifest, sha256_file

CFG = DedupConfig(workers=1)


@pytest.fixture(scope="module")
def corpus():
    return planted(seed=3)


@pytest.fixture(scope="module")
def cleaned(corpus, tmp_path_factory):
    return write_clean_upstream(corpus[0], tmp_path_factory.mktemp("dedup"), per_shard=90)


@pytest.fixture(scope="module")
def result(cleaned, tmp_path_factory):
    return run_dedup(CFG, cleaned, str(tmp_path_factory.mktemp("ws")))


def _ledger(result) -> list[dict]:
    return pq.read_table(sorted(Path(result.path).glob("duplicates/duplicates-*.parquet"))).to_pylist()


def _output_hashes(result) -> list[str]:
    return [f["sha256"] for f in read_manifest(Path(result.path))["files"]]


def test_text_key_normalization():
    assert text_key("hello world\n", CFG) == text_key("  hello \t world", CFG)
    assert text_key("Hello World", CFG) != text_key("hello world", CFG)
    assert text_key("Hello World", DedupConfig(lowercase=True)) == text_key("hello world", CFG)
    assert text_key("hello  world", DedupConfig(normalize_whitespace=False)) != text_key("hello world", CFG)


def test_recall_and_false_removals_on_planted_pairs(corpus, result):
    docs, truth = corpus
    removed = {r["id"]: r for r in _ledger(result)}
    high = [i for i, (_, j, _) in truth.items() if j >= 0.9]
    recall = sum(i in removed for i in high) / len(high)
    assert len(high) >= 80 and recall >= 0.95
    distinct = [d["id"] for d in docs if d["id"].startswith("base-")]
    false = [i for i in removed if i not in truth]
    assert len(false) <= 0.005 * len(distinct)
    # every planted exact copy is found as exact, and points at its original
    for i, (orig, _, kind) in truth.items():
        if kind == "exact":
            assert removed[i]["kind"] == "exact" and removed[i]["duplicate_of"] == orig


def test_kept_copy_is_earliest_and_ledger_is_consistent(corpus, result):
    docs, _ = corpus
    order = {d["id"]: k for k, d in enumerate(docs)}
    text = {d["id"]: d["text"] for d in docs}
    kept = {d["id"] for d in iter_parquet_docs(Path(result.path), columns=("id",))}
    for row in _ledger(result):
        assert row["kept"] in kept and row["id"] not in kept
        assert order[row["cluster"]] <= order[row["kept"]] <= order[row["duplicate_of"]] < order[row["id"]]
        if row["kind"] == "exact":  # the direct match is the same text, not a cluster's other member
            assert text_key(text[row["id"]], CFG) == text_key(text[row["duplicate_of"]], CFG)
        if row["kind"] == "near":  # verified: the signature estimate passed the threshold
            assert row["similarity"] >= CFG.threshold and jaccard(text[row["id"]], text[row["duplicate_of"]]) > 0.5
    c = result.counts
    assert c["docs_in"] == len(docs) == c["kept"] + c["duplicates"] == len(kept) + len(_ledger(result))
    assert result.info["exact"] + result.info["near"] == c["duplicates"]
    assert sum(result.info["cluster_sizes"].values()) == result.info["clusters"] > 0


def test_same_output_for_1_or_3_workers_and_any_shard_order(cleaned, result, tmp_path):
    three = run_dedup(DedupConfig(workers=3), cleaned, str(tmp_path / "w3"))

    def shuffled(fn, jobs):  # run shard units in a random order, hand results back in job order
        idx = list(range(len(jobs)))
        random.Random(5).shuffle(idx)
        done = dict(zip(idx, pool_map(fn, [jobs[i] for i in idx], 1)))
        return [done[i] for i in range(len(jobs))]

    shuffled_run = run_dedup(CFG, cleaned, str(tmp_path / "shuffled"), mapper=shuffled)
    assert _output_hashes(three) == _output_hashes(shuffled_run) == _output_hashes(result)
    assert three.fingerprint == result.fingerprint  # the worker count is not part of it


def test_verification_reduces_merges(cleaned, result, tmp_path):
    loose = run_dedup(DedupConfig(workers=1, verify=False), cleaned, str(tmp_path))
    assert loose.info["verified"] == loose.info["candidates"] >= result.info["candidates"]
    assert result.info["verified"] < result.info["candidates"]
    assert loose.counts["duplicates"] >= result.counts["duplicates"]


def test_exact_only_mode_keeps_near_duplicates(cleaned, corpus, tmp_path):
    exact = run_dedup(DedupConfig(workers=1, near=False), cleaned, str(tmp_path))
    assert exact.counts["duplicates"] == sum(k == "exact" for _, _, k in corpus[1].values())


def test_grown_corpus_reuses_old_shards_and_keeps_kept_documents(corpus, tmp_path):
    docs, _ = corpus
    old = write_clean_upstream(docs[:360], tmp_path / "old", per_shard=90)
    grown = write_clean_upstream(docs, tmp_path / "grown", per_shard=90)
    for i in range(4):  # the first four shards hold the same documents, byte for byte
        assert sha256_file(Path(old.path) / f"docs-{i:05d}.parquet") == sha256_file(
            Path(grown.path) / f"docs-{i:05d}.parquet")
    ws = str(tmp_path / "ws")
    first = run_dedup(CFG, old, ws)
    second = run_dedup(CFG, grown, ws)
    assert second.info["shards_reused"] >= 4
    kept_before = {d["id"] for d in iter_parquet_docs(Path(first.path), columns=("id",))}
    kept_after = {d["id"] for d in iter_parquet_docs(Path(second.path), columns=("id",))}
    assert kept_before <= kept_after


def test_one_output_and_ledger_per_input_shard_and_resume(cleaned, tmp_path):
    ws = str(tmp_path)
    _, directory = plan(CFG, cleaned, ws)
    (directory / "duplicates").mkdir(parents=True)
    (directory / "duplicates" / "duplicates-00001.parquet").write_bytes(b"crashed mid-write")
    first = run_dedup(CFG, cleaned, ws)
    assert not first.reused
    manifest = read_manifest(directory)
    n_shards = len(list(Path(cleaned.path).glob("docs-*.parquet")))
    assert sorted(f["path"] for f in manifest["files"]) == sorted(
        [f"docs-{i:05d}.parquet" for i in range(n_shards)]
        + [f"duplicates/duplicates-{i:05d}.parquet" for i in range(n_shards)])
    for f in manifest["files"]:
        assert sha256_file(directory / f["path"]) == f["sha256"]
        assert pq.ParquetFile(directory / f["path"]).metadata.num_rows == f["rows"]
    before = (directory / MANIFEST).stat().st_mtime_ns
    again = run_dedup(CFG, cleaned, ws)
    assert again.reused and again.counts == first.counts
    assert (directory / MANIFEST).stat().st_mtime_ns == before


def test_partial_signature_file_is_never_trusted(cleaned, result, tmp_path):
    ws = tmp_path / "ws"
    run_dedup(CFG, cleaned, str(ws))
    units = sorted((ws / "dedup" / "signatures").iterdir())
    with open(units[0] / "signatures.npy", "r+b") as f:  # a torn write: same name, fewer bytes
        f.truncate(100)
    shutil.rmtree(Path(plan(CFG, cleaned, str(ws))[1]))
    rerun = run_dedup(CFG, cleaned, str(ws))
    assert rerun.info["shards_reused"] == 2 * len(units) - 1
    assert _output_hashes(rerun) == _output_hashes(result)


def test_kept_documents_are_unchanged_rows(cleaned, result):
    inputs = {d["id"]: d for d in iter_parquet_docs(Path(cleaned.path))}
    out = list(iter_parquet_docs(Path(result.path)))
    assert out and all(inputs[d["id"]] == d for d in out)
    assert hashlib.sha256(b"".join(d["id"].encode() for d in out)).hexdigest()


def test_global_step_in_many_small_partitions_gives_the_same_output(cleaned, result, tmp_path, monkeypatch):
    import tasks.dedup.stage as dedup_module

    monkeypatch.setattr(dedup_module, "PARTITION_RECORDS", 64)  # ~130 band partitions, not one
    small = run_dedup(CFG, cleaned, str(tmp_path))
    assert small.info["partitions"]["bands"] > 100 and small.info["partitions"]["exact"] > 5
    assert result.info["partitions"] == {"exact": 1, "bands": 1, "edges": 1}
    assert _output_hashes(small) == _output_hashes(result)
    for key in ("candidates", "verified", "clusters", "cluster_sizes", "exact", "near"):
        assert small.info[key] == result.info[key], key
    assert not any((tmp_path / "dedup" / "scratch").iterdir())  # spilled partitions removed


def test_stage_report_has_rate_kinds_histogram_and_timings(result):
    lines = describe(result)[1]
    c, info = result.counts, result.info
    assert lines[0].startswith(f"- duplicate rate: {c['duplicates'] / c['docs_in']:.1%} ")
    assert f"| removed: exact duplicate | {info['exact']:,} |" in lines
    assert f"| removed: near duplicate | {info['near']:,} |" in lines and f"| kept | {c['kept']:,} |" in lines
    assert all(f"| {size} | {n} |" in lines for size, n in info["cluster_sizes"].items() if n)
    assert not any(f"| {size} | 0 |" in lines for size in info["cluster_sizes"])  # non-zero rows only
    assert {"signatures_s", "decide_s", "write_s", "spill_keys_s", "sort_partitions_s", "verify_s",
            "clusters_s"} == set(info["timings"])


HOLD_SCRATCH = """
import sys, time
from pathlib import Path
from tasks.core.units import scratch_dir
with scratch_dir(Path(sys.argv[1]), "dedup") as tmp:  # what decide() does around the global step
    (tmp / "band-00000.bin").write_bytes(b"spilled")
    print(tmp, flush=True)
    time.sleep(300)
"""


def test_killed_runs_scratch_is_removed_by_the_next_run_and_a_live_runs_is_kept(cleaned, tmp_path):
    ws = tmp_path / "ws"
    scratch = ws / "dedup" / "scratch"
    root = Path(__file__).resolve().parents[3]
    child = subprocess.Popen([sys.executable, "-c", HOLD_SCRATCH, str(scratch)], stdout=subprocess.PIPE,
                             text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        held = Path(child.stdout.readline().strip())  # a concurrent run, inside its global step
        assert held.parent == scratch and (held / "band-00000.bin").is_file()
        legacy = scratch / "dedup-legacy"  # no lock file, untouched for an hour: left by older code
        legacy.mkdir()
        (legacy / "band-00000.bin").write_bytes(b"x")
        for p in (legacy / "band-00000.bin", legacy):
            os.utime(p, (time.time() - 3600, time.time() - 3600))
        recent = scratch / "dedup-recent"  # no lock file, but written since this process started
        recent.mkdir()
        run_dedup(CFG, cleaned, str(ws))
        assert sorted(p.name for p in scratch.iterdir()) == sorted([held.name, "dedup-recent"])
    finally:
        child.kill()
        child.wait(timeout=60)
    assert held.is_dir()  # SIGKILL: the scratch directory stays behind, its lock released
    run_dedup(DedupConfig(workers=1, verify=False), cleaned, str(ws))  # the next run's global step
    assert [p.name for p in scratch.iterdir()] == ["dedup-recent"]


def _three(seed: int = 11) -> dict[str, str]:
    """A, A' (A re-spaced: an exact copy), B (A with two words replaced: a near copy, J ~0.95)."""
    from planted_corpus import base_doc, edit, vocabulary

    rng = random.Random(seed)
    vocab = vocabulary(rng)
    a = base_doc(rng, vocab, 240)
    return {"A": a, "A2": "  " + a.replace(" ", "  "), "B": edit(rng, vocab, a, 2)}


@pytest.mark.parametrize("order,expected", [
    # the cluster keeps B: A is B's near copy, and A2 is A's exact copy (not B's, whose text differs)
    (["B", "A", "A2"], {"A": ("B", "near", "B"), "A2": ("A", "exact", "B")}),
    # the cluster keeps A: both copies matched A itself
    (["A", "A2", "B"], {"A2": ("A", "exact", "A"), "B": ("A", "near", "A")}),
    (["A", "B", "A2"], {"B": ("A", "near", "A"), "A2": ("A", "exact", "A")}),
    # the cluster keeps A2: A is its exact copy, B its near copy
    (["A2", "B", "A"], {"B": ("A2", "near", "A2"), "A": ("A2", "exact", "A2")}),
])
@pytest.mark.parametrize("per_shard", [1, 3])
def test_ledger_rows_name_the_direct_match_and_the_kept_document(tmp_path, order, expected, per_shard):
    texts = _three()
    docs = [{"id": name, "text": texts[name], "source": "gen"} for name in order]
    result = run_dedup(CFG, write_clean_upstream(docs, tmp_path / "up", per_shard), str(tmp_path / "ws"))
    rows = {r["id"]: r for r in _ledger(result)}
    assert {i: (r["duplicate_of"], r["kind"], r["kept"]) for i, r in rows.items()} == expected
    kept = {d["id"] for d in iter_parquet_docs(Path(result.path), columns=("id",))}
    assert kept == {order[0]} and {r["cluster"] for r in rows.values()} == {order[0]}
    for row in rows.values():  # each row's kind and similarity are those of its own match
        same = text_key(texts[row["id"]], CFG) == text_key(texts[row["duplicate_of"]], CFG)
        assert same == (row["kind"] == "exact")
        if same:
            assert row["similarity"] == 1.0
        else:
            assert CFG.threshold <= row["similarity"] <= 1.0  # the estimate for THIS pair
            assert jaccard(texts[row["id"]], texts[row["duplicate_of"]]) > 0.9
    assert result.info["exact"] == 1 and result.info["near"] == 1 and result.info["clusters"] == 1
