"""Dedup: remove exact duplicates (128-bit xxh3 of normalized text) and near duplicates (MinHash +
LSH over word n-grams), keeping the earliest copy.

Three steps. (1) Per clean shard, in worker processes: exact keys, MinHash signatures and LSH band
keys, stored as .npy files under a fingerprint of that shard's content (`tasks/core/units.py`), so a
grown corpus only signs its new shards. (2) Globally, in bounded memory: one pass over the shards
spills (exact key, document) and (band key, document) records into hash partitions on disk, sized
so that a partition holds about `PARTITION_RECORDS` records (keys are hashes; only a key shared by
a huge number of documents would crowd one partition); each partition is then sorted on
its own and runs of equal keys give candidate pairs (every band in one sort: band keys are salted
per band). Pairs are spilled again by their later document, and each such range of documents is
verified (every candidate's Jaccard estimate is checked against `threshold`, `verify`) and decided
on its own. Only the duplicates themselves (a few words each) are held for the clusters, the
connected components of the accepted pairs. A larger corpus means more partition files, not more
memory (benchmarks/RESULTS.md). The partitions live in `<workspace>/dedup/scratch/dedup-*`, locked
by their run and removed when it ends; one that a killed run left is removed by the next run, and a
concurrent run's (its lock held) never is (`tasks.core.units.scratch_dir`). (3) Per shard: the shard
minus its duplicates, and a ledger `duplicates/duplicates-NNNNN.parquet` (id, source,
duplicate_of, kind, similarity, kept, cluster).

Which copy stays: documents are ordered by (shard, row) of the upstream listing, and a document is
a duplicate iff it is equal or similar to an earlier one. The rule depends only on earlier
documents, so the output is the same for any worker count or execution order, and appending shards
never turns a kept document into a duplicate. A ledger row names the direct match: `duplicate_of`
is the earlier document this one was matched against (its earliest exact copy, else its earliest
verified near match), `kind` and `similarity` describe that match; `kept` is the surviving document
reached by following such matches back (an exact copy of a near copy names the near copy's original
there, not as its exact twin); `cluster` is the earliest document of the connected component.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from tasks.core.data_config import DedupConfig
from tasks.core.protocol import Computed, Stage, StageResult, check_accounting, file_entry, stable_hash
from tasks.core.units import (Mapper, link, plan_over, run_over, scratch_dir, unit_mapper, unit_outputs,
                              upstream_entries)
from tasks.dedup.minhash import estimated_jaccard, exact_key, fmix64
from tasks.dedup.shard import signature_shard, write_dedup_shard

STAGE = Stage("dedup", version=3, module=__name__, section="dedup", inputs=("clean",),
              info_keys=("clusters", "exact", "near", "candidates", "verified", "cluster_sizes",
                         "partitions", "shards_run", "shards_reused", "timings"))
VERIFY_CHUNK = 1 << 15
"""Candidate pairs whose signatures are compared at a time."""
PARTITION_RECORDS = 1 << 20
"""Records the global step sorts in memory at a time (~16-24 bytes each): its memory bound. The key
records are spread over ceil(records / this) hash partitions, so more documents mean more
partitions on disk, not more memory."""
EXACT_DTYPE = np.dtype([("k0", "<u8"), ("k1", "<u8"), ("g", "<i8")])
BAND_DTYPE = np.dtype([("key", "<u8"), ("g", "<i8")])
EDGE_DTYPE = np.dtype([("a", "<i8"), ("b", "<i8")])
DUP_DTYPE = np.dtype([("g", "<i8"), ("of", "<i8"), ("kept_of", "<i8"), ("label", "<i8"), ("sim", "<f8"),
                      ("exact", "?")])
"""A duplicate `g`: its direct match `of` (with `sim`, `exact`), the kept document `kept_of` that
following direct matches reaches, and its cluster `label`."""
SIZE_BUCKETS = ((2, 2), (3, 4), (5, 8), (9, 16), (17, 1 << 62))


def text_key(text: str, cfg: DedupConfig) -> bytes:
    """The exact-duplicate key of a text (whitespace collapsed, optionally lowercased)."""
    return exact_key(text, cfg.normalize_whitespace, cfg.lowercase)


def plan(cfg: DedupConfig, upstream: StageResult, workspace: str) -> tuple[str, Path]:
    return plan_over(STAGE, cfg, upstream, workspace)


def signature_jobs(cfg: DedupConfig, upstream: StageResult, workspace: str, code: str) -> list[tuple]:
    """One `signature_shard` job per clean shard, addressed by that shard's sha256."""
    return [(cfg, path, out) for path, out in
            unit_outputs(cfg, upstream, code, "docs-", Path(workspace) / STAGE.name / "signatures")]


# ---------------------------------------------------------------------------- the global step


class Spill:
    """Fixed-size records appended to `parts` files under a scratch directory by partition number,
    read back one partition at a time: what keeps the global step's memory bounded."""

    def __init__(self, directory: Path, name: str, parts: int, dtype: np.dtype):
        self.directory, self.name, self.parts, self.dtype = directory, name, parts, dtype

    def path(self, part: int) -> Path:
        return self.directory / f"{self.name}-{part:05d}.bin"

    def add(self, part: np.ndarray, records: np.ndarray) -> None:
        if not len(records):
            return
        small = part.astype(np.uint16) if self.parts <= 1 << 16 else part  # radix-sorted by numpy
        order = np.argsort(small, kind="stable")
        part, records = part[order], records[order]
        bounds = np.searchsorted(part, np.arange(self.parts + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            with open(self.path(int(p)), "ab") as f:
                records[bounds[p]:bounds[p + 1]].tofile(f)

    def read(self, part: int) -> np.ndarray:
        path = self.path(part)
        return np.fromfile(path, dtype=self.dtype) if path.exists() else np.zeros(0, self.dtype)


def _bucket(keys: np.ndarray, parts: int) -> np.ndarray:
    """Partition of every 64-bit key: the high bits of a mixed key, scaled to `parts`."""
    return (((fmix64(keys) >> np.uint64(32)) * np.uint64(parts)) >> np.uint64(32)).astype(np.int64)


def _band_salt(bands: int) -> np.ndarray:
    """A random-looking 64-bit constant per band, XORed into its keys so that one sort serves every
    band (keys of two bands then agree with probability 2^-64, like two band keys by chance)."""
    return fmix64(np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def _stable_order(*keys: np.ndarray) -> np.ndarray:
    """Indices sorting by `keys` (most significant first), ties kept in input order."""
    order = np.argsort(keys[-1], kind="stable")
    for key in reversed(keys[:-1]):
        order = order[np.argsort(key[order], kind="stable")]
    return order


def _runs(keys: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For sorted `keys[order]`: (later, first of its run, previous in its run) for every position
    that is not the first of a run of equal keys (rows of a 2-d `keys` compare whole)."""
    ks = keys[order]
    same = ks[1:] == ks[:-1] if ks.ndim == 1 else (ks[1:] == ks[:-1]).all(axis=1)
    pos = np.flatnonzero(same) + 1
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    first = order[starts[np.searchsorted(starts, pos, side="right") - 1]]
    return order[pos], first, order[pos - 1]


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label of every node: the smallest index of its connected component (union-find by
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


def _unique_edges(e: np.ndarray, lo: int, n: int) -> np.ndarray:
    """Distinct edges sorted by (a, b), for edges whose `a` lies in [lo, lo + span)."""
    code = np.unique((e["a"] - lo) * n + e["b"])
    return _edges(code // n + lo, code % n)


def _edges(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.empty(len(a), EDGE_DTYPE)
    out["a"], out["b"] = a, b
    return out


def _spill_keys(cfg: DedupConfig, sig_dirs: list[Path], offsets: np.ndarray, tmp: Path,
                parts: int, band_parts: int) -> tuple[Spill, Spill]:
    """Pass 1, one shard at a time: (exact key, document) and (salted band key, document) records
    into hash partitions, in document order within each band (a stable sort keeps it)."""
    exact, band = Spill(tmp, "exact", parts, EXACT_DTYPE), Spill(tmp, "band", band_parts, BAND_DTYPE)
    for s, d in enumerate(sig_dirs):
        g = np.arange(offsets[s], offsets[s + 1], dtype=np.int64)
        ex = np.load(d / "exact.npy")
        rec = np.empty(len(g), EXACT_DTYPE)
        rec["k0"], rec["k1"], rec["g"] = ex[:, 0], ex[:, 1], g
        exact.add(_bucket(rec["k0"], parts), rec)
        if cfg.near:
            near = np.load(d / "near.npy")
            keys = np.load(d / "bands.npy")[near] ^ _band_salt(cfg.bands)  # equal only in one band
            rec = np.empty(keys.size, BAND_DTYPE)
            rec["key"] = keys.T.reshape(-1)  # band-major: within a band, records stay in document order
            rec["g"] = np.tile(g[near], cfg.bands)
            band.add(_bucket(rec["key"], band_parts), rec)
    return exact, band


def _signature_rows(sig_dirs: list[Path], offsets: np.ndarray, g: np.ndarray, width: int) -> np.ndarray:
    """Signatures of documents `g`, read from the shards' files (mapped only while read)."""
    shard = np.searchsorted(offsets, g, side="right") - 1
    out = np.empty((len(g), width), dtype=np.uint32)
    for s in np.unique(shard):
        sel = shard == s
        out[sel] = np.load(sig_dirs[s] / "signatures.npy", mmap_mode="r")[g[sel] - offsets[s]]
    return out


def decide(cfg: DedupConfig, sig_dirs: list[Path], sizes: list[int],
           scratch: Path | None = None) -> dict[str, Any]:
    """Which documents are duplicates of which, from the per-shard signature files, in memory
    bounded by `PARTITION_RECORDS` (plus a few words per duplicate): keys are spilled to hash
    partitions in a scratch directory under `scratch` (`scratch_dir`) and each partition is sorted
    on its own."""
    with scratch_dir(scratch, STAGE.name) as tmp:
        return _decide(cfg, sig_dirs, sizes, tmp)


def _decide(cfg: DedupConfig, sig_dirs: list[Path], sizes: list[int], tmp: Path) -> dict[str, Any]:
    t0 = time.time()
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    parts = max(1, -(-n // PARTITION_RECORDS))
    band_parts = max(1, -(-n * cfg.bands // PARTITION_RECORDS)) if cfg.near else 1
    edge_parts = max(parts, band_parts)
    span = max(1, -(-n // edge_parts))  # documents per edge partition: edges go by their later end
    exact, band = _spill_keys(cfg, sig_dirs, offsets, tmp, parts, band_parts)
    t1 = time.time()
    exact_edges = Spill(tmp, "exact-edges", edge_parts, EDGE_DTYPE)
    candidates = Spill(tmp, "candidates", edge_parts, EDGE_DTYPE)
    for p in range(parts):  # records are in document order: a stable sort keeps the earliest first
        if not len(r := exact.read(p)):
            continue
        later, first, _ = _runs(np.stack([r["k0"], r["k1"]], 1), _stable_order(r["k0"], r["k1"]))
        exact_edges.add(r["g"][later] // span, _edges(r["g"][later], r["g"][first]))
    for p in range(band_parts if cfg.near else 0):
        if not len(r := band.read(p)):
            continue
        later, first, prev = _runs(r["key"], np.argsort(r["key"], kind="stable"))
        a = np.concatenate([r["g"][later], r["g"][later]])
        candidates.add(a // span, _edges(a, np.concatenate([r["g"][first], r["g"][prev]])))
    t2 = time.time()
    stats = {"candidates": 0, "verified": 0}
    width = cfg.bands * cfg.rows
    dups, edges = [], []
    for q in range(edge_parts):  # documents [q * span, (q + 1) * span): their duplicate decisions
        ex, cand = exact_edges.read(q), _unique_edges(candidates.read(q), q * span, n)
        est = np.zeros(len(cand))
        for start in range(0, len(cand), VERIFY_CHUNK):
            part = cand[start:start + VERIFY_CHUNK]
            est[start:start + len(part)] = estimated_jaccard(
                _signature_rows(sig_dirs, offsets, part["a"], width),
                _signature_rows(sig_dirs, offsets, part["b"], width))
        ok = est >= cfg.threshold if cfg.verify else np.ones(len(cand), dtype=bool)
        acc, acc_est = cand[ok], est[ok]
        stats["candidates"] += len(cand)
        stats["verified"] += len(acc)
        edges += [ex, acc]
        # the earliest accepted match of each document: the first of its run (sorted by b)
        head = np.flatnonzero(np.concatenate([[True], acc["a"][1:] != acc["a"][:-1]])) if len(acc) else []
        head = np.asarray(head, dtype=np.int64)[~np.isin(acc["a"][head], ex["a"])]  # exact wins
        rec = np.empty(len(ex) + len(head), DUP_DTYPE)
        rec["g"] = np.concatenate([ex["a"], acc["a"][head]])
        rec["of"] = np.concatenate([ex["b"], acc["b"][head]])
        rec["sim"] = np.concatenate([np.ones(len(ex)), acc_est[head]])
        rec["exact"] = np.arange(len(rec)) < len(ex)
        dups.append(rec[np.argsort(rec["g"])])
    t3 = time.time()
    dups = np.concatenate(dups) if dups else np.zeros(0, DUP_DTYPE)
    dups["kept_of"] = earliest = dups["of"]
    while len(dups):  # follow direct matches back until a kept document
        pos = np.minimum(np.searchsorted(dups["g"], dups["kept_of"]), len(dups) - 1)
        step = dups["g"][pos] == dups["kept_of"]
        if not step.any():
            break
        dups["kept_of"][step] = earliest[pos[step]]
    every = np.concatenate(edges) if edges else np.zeros(0, EDGE_DTYPE)
    nodes = np.unique(np.concatenate([every["a"], every["b"]]))
    label = _components(len(nodes), np.searchsorted(nodes, every["a"]), np.searchsorted(nodes, every["b"]))
    dups["label"] = nodes[label[np.searchsorted(nodes, dups["g"])]]
    sizes_all = np.bincount(label, minlength=len(nodes))
    cluster_sizes = sizes_all[sizes_all > 1]
    hist = {f"{lo}" if lo == hi else (f"{lo}+" if hi > n else f"{lo}-{hi}"):
            int(((cluster_sizes >= lo) & (cluster_sizes <= hi)).sum()) for lo, hi in SIZE_BUCKETS}
    return {"offsets": offsets, "dups": dups, "clusters": int(len(cluster_sizes)), "cluster_sizes": hist,
            "exact_count": int(dups["exact"].sum()), "near_count": int((~dups["exact"]).sum()),
            "partitions": {"exact": parts, "bands": band_parts, "edges": edge_parts},
            "timings": {"spill_keys_s": round(t1 - t0, 3), "sort_partitions_s": round(t2 - t1, 3),
                        "verify_s": round(t3 - t2, 3), "clusters_s": round(time.time() - t3, 3)},
            **stats}


def write_jobs(upstream_docs: list[tuple[str, str]], workspace: str, d: dict[str, Any],
               code: str) -> list[tuple]:
    """One `write_dedup_shard` job per clean shard, addressed by its input and its decisions."""
    offsets, dups = d["offsets"], d["dups"]
    referenced = np.unique(np.concatenate([dups["g"], dups["of"], dups["kept_of"], dups["label"]]))
    ids: dict[int, str] = {}
    sources: dict[int, str] = {}
    for s, (path, _) in enumerate(upstream_docs):
        lo, hi = offsets[s], offsets[s + 1]
        want = referenced[(referenced >= lo) & (referenced < hi)]
        if len(want):
            table = pq.read_table(path, columns=["id", "source"], use_threads=False).take(want - lo)
            ids.update(zip(want.tolist(), table.column("id").to_pylist()))
            sources.update(zip(want.tolist(), table.column("source").to_pylist()))
    bounds = np.searchsorted(dups["g"], offsets)
    jobs = []
    for s, (path, sha) in enumerate(upstream_docs):
        lo, mine = int(offsets[s]), dups[bounds[s]:bounds[s + 1]]
        rows = (mine["g"] - lo).tolist()
        ledger = [{"id": ids[g], "source": sources[g], "duplicate_of": ids[of],
                   "kind": "exact" if exact else "near", "similarity": round(sim, 6),
                   "kept": ids[kept], "cluster": ids[label]}
                  for g, of, kept, label, exact, sim in zip(
                      mine["g"].tolist(), mine["of"].tolist(), mine["kept_of"].tolist(),
                      mine["label"].tolist(), mine["exact"].tolist(), mine["sim"].tolist())]
        unit = stable_hash({"code": code, "input": sha, "rows": rows, "ledger": ledger})
        jobs.append((path, str(Path(workspace) / STAGE.name / "shards" / unit), rows, ledger))
    return jobs


def run_dedup(cfg: DedupConfig, upstream: StageResult, workspace: str,
              mapper: Mapper | None = None) -> StageResult:
    """Keep the earliest of every group of equal or similar documents; ledger the others."""
    return run_over(STAGE, _dedup, cfg, upstream, workspace, mapper)


def _dedup(cfg: DedupConfig, upstream: StageResult, workspace: str, directory: Path,
           mapper: Mapper | None) -> Computed:
    """Sign every shard (units), decide globally, write every shard minus its duplicates (units),
    then link the unit outputs into the stage directory."""
    t0, code = time.time(), STAGE.code()
    mapper = unit_mapper(mapper, cfg.workers)
    sig_jobs = signature_jobs(cfg, upstream, workspace, code)
    sig_summaries = mapper(signature_shard, sig_jobs)
    t1 = time.time()
    decisions = decide(cfg, [Path(j[2]) for j in sig_jobs], [s["rows"] for s in sig_summaries],
                       scratch=Path(workspace) / STAGE.name / "scratch")
    t2 = time.time()
    docs = [(str(path), sha) for path, sha in upstream_entries(upstream, "docs-")]
    jobs = write_jobs(docs, workspace, decisions, code)
    summaries = mapper(write_dedup_shard, jobs)
    t3 = time.time()
    counts = {"docs_in": int(decisions["offsets"][-1]), "kept": 0, "duplicates": 0}
    entries = []
    for i, (job, summary) in enumerate(zip(jobs, summaries)):
        counts["kept"] += summary["kept"]
        counts["duplicates"] += summary["duplicates"]
        docs_out, dups = directory / f"docs-{i:05d}.parquet", directory / "duplicates" / f"duplicates-{i:05d}.parquet"
        link(Path(job[1]) / "docs.parquet", docs_out)
        link(Path(job[1]) / "duplicates.parquet", dups)
        entries += [file_entry(docs_out, directory, rows=summary["kept"]),
                    file_entry(dups, directory, rows=summary["duplicates"])]
    check_accounting(counts, counts["docs_in"], ["kept", "duplicates"], f"dedup {directory}")
    reused = sum(s["reused"] for s in sig_summaries) + sum(s["reused"] for s in summaries)
    timings = {"signatures_s": round(t1 - t0, 3), "decide_s": round(t2 - t1, 3), "write_s": round(t3 - t2, 3)}
    return Computed(counts, entries, info={
        "clusters": decisions["clusters"], "exact": decisions["exact_count"],
        "near": decisions["near_count"], "candidates": decisions["candidates"],
        "verified": decisions["verified"], "cluster_sizes": decisions["cluster_sizes"],
        "partitions": decisions["partitions"], "shards_run": 2 * len(jobs) - reused,
        "shards_reused": reused, "timings": {**timings, **decisions["timings"]}})


def describe(result: StageResult) -> tuple[str, list[str]]:
    """The log line and report lines of a dedup result (non-zero counts only)."""
    c, info = result.counts, result.info
    rate = c["duplicates"] / c["docs_in"] if c["docs_in"] else 0.0
    hist = info.get("cluster_sizes", {})
    line = (f"dedup: {c['docs_in']} docs in, {c['kept']} kept, {c['duplicates']} duplicates in "
            f"{info.get('clusters', 0)} clusters -> {result.path}")
    return line, [f"- duplicate rate: {rate:.1%} ({info.get('exact', 0)} exact, {info.get('near', 0)} near)",
            f"- clusters with duplicates: {info.get('clusters', 0)}",
            f"- LSH candidate pairs: {info.get('candidates', 0)}, accepted after verification: "
            f"{info.get('verified', 0)}",
            f"- unit jobs run: {info.get('shards_run', 0)}, reused: {info.get('shards_reused', 0)}",
            f"- global step: hash partitions {info.get('partitions', {})}",
            f"- time per sub-step: {info.get('timings', {})}",
            f"- duplicates ledger: `{Path(result.path) / 'duplicates'}`",
            "", "| documents | count |", "|---|---|", f"| kept | {c['kept']:,} |",
            *(f"| removed: {kind} duplicate | {n:,} |" for kind in ("exact", "near") if (n := info.get(kind, 0))),
            "", "| cluster size | clusters |", "|---|---|",
            *([f"| {k} | {v} |" for k, v in hist.items() if v] or ["| (none) | 0 |"])]
