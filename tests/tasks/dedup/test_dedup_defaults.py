"""The dedup stage at its default settings on a mixed corpus (stdlib code, pydoc prose, generated verse)
with planted copies of known true Jaccard: the recall and false-removal targets the defaults were
chosen for (benchmarks/dedup_sweep.py, benchmarks/RESULTS.md "Dedup defaults")."""
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mixed_corpus import mixed_corpus, score
from planted_corpus import jaccard, write_clean_upstream
from tasks.core.data_config import DedupConfig
from tasks.core.units import iter_parquet_docs
from tasks.dedup.stage import run_dedup


@pytest.fixture(scope="module")
def corpus():
    return mixed_corpus(seed=5, code=150, prose=50, verse=40, near=160, exact=12, j_range=(0.6, 1.0))


def _run(cfg, corpus, tmp: Path):
    docs, _ = corpus
    upstream = write_clean_upstream(docs, tmp / "up", per_shard=70)
    result = run_dedup(cfg, upstream, str(tmp / "ws"))
    ledger = pq.read_table(sorted(Path(result.path).glob("duplicates/*.parquet"))).to_pylist()
    kept = {d["id"] for d in iter_parquet_docs(Path(result.path), columns=("id",))}
    return result, ledger, kept


def test_defaults_find_near_copies_above_075_and_remove_nothing_unrelated(corpus, tmp_path):
    docs, truth = corpus
    result, ledger, kept = _run(DedupConfig(workers=1), corpus, tmp_path)
    removed = {r["id"]: r["duplicate_of"] for r in ledger}
    assert set(removed) | kept == {d["id"] for d in docs} and not set(removed) & kept
    s = score(docs, truth, removed)
    assert s["n_0.75-0.80"] + s["n_0.80-0.90"] + s["n_0.90-1.00"] >= 60  # enough copies to measure
    assert s["recall_j>=0.75"] >= 0.95, s
    assert s["exact_found"] == "12/12"
    assert s["false_removal_rate"] <= 0.001, s
    # every near row's similarity is the estimate of its direct match, close to the true Jaccard
    text = {d["id"]: d["text"] for d in docs}
    for row in ledger:
        if row["kind"] == "near":
            true = jaccard(text[row["id"]], text[row["duplicate_of"]])
            assert row["similarity"] >= 0.7 and abs(row["similarity"] - true) < 0.12, (row, true)


def test_fineweb_settings_miss_copies_the_defaults_find(corpus, tmp_path):
    """The old defaults (14 x 8, threshold 0.8) on the same documents: what the change bought."""
    docs, truth = corpus
    _, old_ledger, _ = _run(DedupConfig(workers=1, bands=14, rows=8, threshold=0.8), corpus, tmp_path / "old")
    _, new_ledger, _ = _run(DedupConfig(workers=1), corpus, tmp_path / "new")
    old = score(docs, truth, {r["id"]: r["duplicate_of"] for r in old_ledger})
    new = score(docs, truth, {r["id"]: r["duplicate_of"] for r in new_ledger})
    assert old["recall_j>=0.75"] < 0.95 <= new["recall_j>=0.75"], (old, new)
    assert new["recall_0.75-0.80"] > old["recall_0.75-0.80"]
