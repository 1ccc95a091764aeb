"""Dedup: remove exact duplicates (128-bit xxh3 of normalized text) and near duplicates (MinHash +
LSH over word n-grams), keeping the earliest copy.

Three steps. (1) Per clean shard, in worker processes: exact keys, MinHash signatures and LSH band
keys, stored as .npy files under a fingerprint of that shard's content (`tasks/shards.py`), so a
grown corpus only signs its new shards. (2) Globally: candidate pairs come from sorting each band's
keys (one band at a time, 8 bytes per document, never a dict of the whole corpus); every candidate's
Jaccard estimate is checked against `threshold` before it counts (`verify`); clusters are the
connected components of the accepted pairs. (3) Per shard: the shard minus its duplicates, and a
ledger `duplicates/duplicates-NNNNN.parquet` (id, source, duplicate_of, cluster, kind, similarity).

Which copy stays: documents are ordered by (shard, row) of the upstream listing, and a document is
a duplicate iff it is equal or similar to an earlier one. The rule depends only on earlier
documents, so the output is the same for any worker count or execution order, and appending shards
never turns a kept document into a duplicate. `duplicate_of` follows earlier links to a kept
document; `cluster` is the earliest document of the connected component.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from prefect import get_run_logger

from tasks.clean import Mapper, config_key, link, upstream_entries
from tasks.config import DedupConfig
from tasks.minhash import exact_key, estimated_jaccard
from tasks.prefect_stage import report, stage_task
from tasks.shards import pool_map, signature_shard, write_dedup_shard
from tasks.stage import (StageResult, check_accounting, code_version, file_entry, fingerprint,
                         prepare_dir, read_manifest, result_from_manifest, stable_hash, stage_dir,
                         write_manifest)

STAGE = "dedup"
VERSION = 2
INFO_KEYS = ("clusters", "exact", "near", "candidates", "verified", "cluster_sizes", "shards_run",
             "shards_reused", "timings")
VERIFY_CHUNK = 1 << 16
"""Candidate pairs whose signatures are compared at a time."""
SIZE_BUCKETS = ((2, 2), (3, 4), (5, 8), (9, 16), (17, 1 << 62))


def text_key(text: str, cfg: DedupConfig) -> bytes:
    """The exact-duplicate key of a text (whitespace collapsed, optionally lowercased)."""
    return exact_key(text, cfg.normalize_whitespace, cfg.lowercase)


def _plan(cfg: DedupConfig, upstream: StageResult, workspace: str) -> tuple[str, Path, str]:
    code = code_version(__name__, VERSION)
    fp = fingerprint(STAGE, config_key(cfg), [upstream.fingerprint], code)
    return fp, stage_dir(workspace, STAGE, fp), code


def plan(cfg: DedupConfig, upstream: StageResult, workspace: str) -> tuple[str, Path]:
    return _plan(cfg, upstream, workspace)[:2]


def signature_jobs(cfg: DedupConfig, upstream: StageResult, workspace: str) -> list[tuple]:
    """One `signature_shard` job per clean shard, addressed by that shard's sha256."""
    code = code_version(__name__, VERSION)
    jobs = []
    for path, sha in upstream_entries(upstream, "docs-"):
        unit = stable_hash({"config": config_key(cfg), "code": code, "input": sha})
        jobs.append((cfg, str(path), str(Path(workspace) / STAGE / "signatures" / unit)))
    return jobs


# ---------------------------------------------------------------------------- the global step


def _runs(keys: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For sorted `keys[order]`: (later, first of its run, previous in its run) for every position
    that is not the first of a run of equal keys."""
    ks = keys[order]
    same = ks[1:] == ks[:-1] if ks.ndim == 1 else (ks[1:] == ks[:-1]).all(axis=1)
    pos = np.flatnonzero(same) + 1
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    first = order[starts[np.searchsorted(starts, pos, side="right") - 1]]
    return order[pos], first, order[pos - 1]


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label of every document: the smallest index of its connected component (union-find by
    vectorized min-label propagation with pointer jumping)."""
    label = np.arange(n, dtype=np.int64)
    while len(a):
        m = np.minimum(label[a], label[b])
        before = label.copy()
        np.minimum.at(label, a, m)
        np.minimum.at(label, b, m)
        while not np.array_equal(label, label[label]):
            label = label[label]
        if np.array_equal(label, before):
            break
    return label


def decide(cfg: DedupConfig, sig_dirs: list[Path], sizes: list[int]) -> dict[str, Any]:
    """Which documents are duplicates of which, from the per-shard signature files."""
    t0 = time.time()
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    earliest = np.full(n, n, dtype=np.int64)  # earliest earlier document it matches (n: none)
    exact_of = np.full(n, n, dtype=np.int64)
    sim = np.zeros(n, dtype=np.float64)
    ex = np.concatenate([np.load(d / "exact.npy") for d in sig_dirs]) if n else np.zeros((0, 2), np.uint64)
    later, first, _ = _runs(ex, np.lexsort((ex[:, 1], ex[:, 0])))  # lexsort is stable: ties by index
    del ex
    exact_of[later] = first
    edges_a, edges_b = [later], [first]
    stats = {"candidates": 0, "verified": 0}
    t1 = time.time()
    if cfg.near and n:
        near = np.concatenate([np.load(d / "near.npy") for d in sig_dirs])
        idx = np.flatnonzero(near)
        bands = [np.load(d / "bands.npy", mmap_mode="r") for d in sig_dirs]
        pairs = []
        for band in range(cfg.bands):
            keys = np.concatenate([b[:, band] for b in bands])[idx]
            later_b, first_b, prev_b = _runs(keys, np.argsort(keys, kind="stable"))
            pairs += [np.stack([idx[later_b], idx[first_b]], 1), np.stack([idx[later_b], idx[prev_b]], 1)]
        cand = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.int64)
        stats["candidates"] = len(cand)
        sigs = [np.load(d / "signatures.npy", mmap_mode="r") for d in sig_dirs]

        def rows(g: np.ndarray) -> np.ndarray:
            shard = np.searchsorted(offsets, g, side="right") - 1
            out = np.empty((len(g), cfg.bands * cfg.rows), dtype=np.uint32)
            for s in np.unique(shard):
                sel = shard == s
                out[sel] = sigs[s][g[sel] - offsets[s]]
            return out

        ok, est = np.zeros(len(cand), dtype=bool), np.zeros(len(cand))
        for start in range(0, len(cand), VERIFY_CHUNK):
            part = cand[start:start + VERIFY_CHUNK]
            est[start:start + len(part)] = estimated_jaccard(rows(part[:, 0]), rows(part[:, 1]))
        ok = est >= cfg.threshold if cfg.verify else np.ones(len(cand), dtype=bool)
        acc, acc_est = cand[ok], est[ok]
        stats["verified"] = int(ok.sum())
        edges_a.append(acc[:, 0])
        edges_b.append(acc[:, 1])
        np.minimum.at(earliest, acc[:, 0], acc[:, 1])
        chosen = acc[:, 1] == earliest[acc[:, 0]]
        np.maximum.at(sim, acc[chosen, 0], acc_est[chosen])
    t2 = time.time()
    is_exact = exact_of < n
    earliest = np.where(is_exact, exact_of, earliest)
    sim[is_exact] = 1.0
    dup = earliest < n
    kept_of = np.where(dup, earliest, np.arange(n))
    while (step := dup[kept_of]).any():  # follow earlier links until a kept document
        kept_of = np.where(step, earliest[kept_of], kept_of)
    label = _components(n, np.concatenate(edges_a), np.concatenate(edges_b))
    sizes_all = np.bincount(label, minlength=n)
    cluster_sizes = sizes_all[sizes_all > 1]
    hist = {f"{lo}" if lo == hi else (f"{lo}+" if hi > n else f"{lo}-{hi}"):
            int(((cluster_sizes >= lo) & (cluster_sizes <= hi)).sum()) for lo, hi in SIZE_BUCKETS}
    return {"offsets": offsets, "dup": dup, "kept_of": kept_of, "label": label, "exact": is_exact,
            "sim": sim, "clusters": int(len(cluster_sizes)), "cluster_sizes": hist,
            "exact_count": int(is_exact.sum()), "near_count": int((dup & ~is_exact).sum()),
            "timings": {"exact_s": round(t1 - t0, 3), "near_candidates_verify_s": round(t2 - t1, 3),
                        "clusters_s": round(time.time() - t2, 3)}, **stats}


def write_jobs(upstream_docs: list[tuple[str, str]], workspace: str, d: dict[str, Any]) -> list[tuple]:
    """One `write_dedup_shard` job per clean shard, addressed by its input and its decisions."""
    code = code_version(__name__, VERSION)
    offsets, dup = d["offsets"], d["dup"]
    referenced = np.unique(np.concatenate([np.flatnonzero(dup), d["kept_of"][dup], d["label"][dup]]))
    ids: dict[int, str] = {}
    sources: dict[int, str] = {}
    for s, (path, _) in enumerate(upstream_docs):
        lo, hi = offsets[s], offsets[s + 1]
        want = referenced[(referenced >= lo) & (referenced < hi)]
        if len(want):
            table = pq.read_table(path, columns=["id", "source"])
            col_id, col_src = table.column("id"), table.column("source")
            for g in want.tolist():
                ids[g], sources[g] = col_id[g - lo].as_py(), col_src[g - lo].as_py()
    jobs = []
    for s, (path, sha) in enumerate(upstream_docs):
        lo = int(offsets[s])
        rows = (np.flatnonzero(dup[lo:offsets[s + 1]])).tolist()
        ledger = [{"id": ids[lo + r], "source": sources[lo + r], "duplicate_of": ids[int(d["kept_of"][lo + r])],
                   "cluster": ids[int(d["label"][lo + r])],
                   "kind": "exact" if d["exact"][lo + r] else "near",
                   "similarity": round(float(d["sim"][lo + r]), 6)} for r in rows]
        unit = stable_hash({"code": code, "input": sha, "rows": rows, "ledger": ledger})
        jobs.append((path, str(Path(workspace) / STAGE / "shards" / unit), rows, ledger))
    return jobs


def run_dedup(cfg: DedupConfig, upstream: StageResult, workspace: str,
              mapper: Mapper | None = None) -> StageResult:
    """Keep the earliest of every group of equal or similar documents; ledger the others."""
    started = time.time()
    fp, directory, code = _plan(cfg, upstream, workspace)
    if (manifest := read_manifest(directory)) is not None:
        return result_from_manifest(directory, manifest, reused=True, info_keys=INFO_KEYS)
    mapper = mapper or (lambda fn, js: pool_map(fn, js, cfg.workers))
    t0 = time.time()
    sig_jobs = signature_jobs(cfg, upstream, workspace)
    sig_summaries = mapper(signature_shard, sig_jobs)
    t1 = time.time()
    decisions = decide(cfg, [Path(j[2]) for j in sig_jobs], [s["rows"] for s in sig_summaries])
    t2 = time.time()
    docs = [(str(path), sha) for path, sha in upstream_entries(upstream, "docs-")]
    jobs = write_jobs(docs, workspace, decisions)
    summaries = mapper(write_dedup_shard, jobs)
    t3 = time.time()
    return assemble(cfg, upstream, workspace, jobs, sig_summaries, summaries, decisions, started,
                    {"signatures_s": round(t1 - t0, 3), "decide_s": round(t2 - t1, 3),
                     "write_s": round(t3 - t2, 3)})


def assemble(cfg: DedupConfig, upstream: StageResult, workspace: str, jobs: list[tuple],
             sig_summaries: list[dict], summaries: list[dict], decisions: dict[str, Any],
             started: float, timings: dict[str, float]) -> StageResult:
    """Link unit outputs into the stage directory, check the accounting, write the manifest."""
    fp, directory, code = _plan(cfg, upstream, workspace)
    if (manifest := read_manifest(directory)) is not None:
        return result_from_manifest(directory, manifest, reused=True, info_keys=INFO_KEYS)
    prepare_dir(directory)
    counts = {"docs_in": int(decisions["offsets"][-1]), "kept": 0, "duplicates": 0}
    entries = []
    for i, (job, summary) in enumerate(zip(jobs, summaries)):
        counts["kept"] += summary["kept"]
        counts["duplicates"] += summary["duplicates"]
        docs, dups = directory / f"docs-{i:05d}.parquet", directory / "duplicates" / f"duplicates-{i:05d}.parquet"
        link(Path(job[1]) / "docs.parquet", docs)
        link(Path(job[1]) / "duplicates.parquet", dups)
        entries += [file_entry(docs, directory, rows=summary["kept"]),
                    file_entry(dups, directory, rows=summary["duplicates"])]
    check_accounting(counts, counts["docs_in"], ["kept", "duplicates"], f"dedup {directory}")
    reused = sum(s["reused"] for s in sig_summaries) + sum(s["reused"] for s in summaries)
    info = {"clusters": decisions["clusters"], "exact": decisions["exact_count"],
            "near": decisions["near_count"], "candidates": decisions["candidates"],
            "verified": decisions["verified"], "cluster_sizes": decisions["cluster_sizes"],
            "shards_run": 2 * len(jobs) - reused, "shards_reused": reused,
            "timings": {**timings, **decisions["timings"]}}
    manifest = write_manifest(directory, stage=STAGE, fp=fp, code=code, config=cfg,
                              inputs=[upstream.fingerprint], counts=counts, files=entries,
                              started=started, **info)
    return result_from_manifest(directory, manifest, reused=False, info_keys=INFO_KEYS)


def report_lines(result: StageResult) -> list[str]:
    c, info = result.counts, result.info
    rate = c["duplicates"] / c["docs_in"] if c["docs_in"] else 0.0
    hist = info.get("cluster_sizes", {})
    return [f"- duplicate rate: {rate:.1%} ({info.get('exact', 0)} exact, {info.get('near', 0)} near)",
            f"- clusters with duplicates: {info.get('clusters', 0)}",
            f"- LSH candidate pairs: {info.get('candidates', 0)}, accepted after verification: "
            f"{info.get('verified', 0)}",
            f"- unit jobs run: {info.get('shards_run', 0)}, reused: {info.get('shards_reused', 0)}",
            f"- time per sub-step: {info.get('timings', {})}",
            f"- duplicates ledger: `{Path(result.path) / 'duplicates'}`",
            "", "| cluster size | clusters |", "|---|---|", *(f"| {k} | {v} |" for k, v in hist.items())]


@stage_task(STAGE, plan)
def dedup(cfg: DedupConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Drop exact and near duplicate documents, keeping the earliest, with a duplicates ledger."""
    result = run_dedup(cfg, upstream, workspace)
    c = result.counts
    get_run_logger().info(f"dedup: {c['docs_in']} docs in, {c['kept']} kept, {c['duplicates']} "
                          f"duplicates in {result.info.get('clusters', 0)} clusters -> {result.path}")
    report(STAGE, result, report_lines(result))
    return result
