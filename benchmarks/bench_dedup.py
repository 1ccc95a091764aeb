"""Benchmark the clean and dedup stages.

0. The dedup stage at its defaults against datasketch on a mixed corpus (stdlib code, pydoc prose,
   generated verse, WikiText and Shakespeare when `../shared/corpora` is there) with planted exact
   and near copies of known true Jaccard: recall by Jaccard bucket, false removals, CPU time of the
   whole stage (Parquet in, shards and ledger out) against datasketch's signatures + LSH alone.
1. Near-duplicate detection against datasketch MinHash + MinHashLSH with the same parameters (word
   5-grams, 14 bands x 8 rows = 112 hashes) on the same planted corpus in the same run: time, recall
   on planted pairs with Jaccard >= 0.9, false removals of distinct documents.
2. clean + dedup throughput in MB/s per core (one worker) on the full Python stdlib plus
   `../shared/corpora` (WikiText articles, Shakespeare chunks) when present.
3. Peak RSS of clean + dedup (one worker, fresh process) at two corpus sizes, and of the global
   dedup step alone (fresh process) over 1M and 3M documents of synthetic signatures: the step whose
   memory used to grow with the corpus.

    python benchmarks/bench_dedup.py            # full run (minutes)
    python benchmarks/bench_dedup.py --smoke    # seconds, tiny sizes
    python benchmarks/bench_dedup.py --profile  # where the whole dedup stage spends its time
    python benchmarks/bench_dedup.py --near-only  # only parts 0 and 1 (the datasketch comparisons)
    python benchmarks/bench_dedup.py --global-step 1000000   # peak RSS of the global step alone
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "helpers")]

import numpy as np  # noqa: E402

from planted_corpus import planted, write_clean_upstream  # noqa: E402
from tasks.core.data_config import CleanConfig, CorpusConfig, DedupConfig  # noqa: E402
from tasks.dedup.minhash import band_keys, document_hashes, oph_flat  # noqa: E402

SHARED = ROOT.parent / "shared" / "corpora"


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM): unlike ru_maxrss, which Linux carries over from
    the parent across fork + exec, it starts afresh in a new program."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _score(removed: set[str], truth: dict, docs: list[dict]) -> dict:
    high = [i for i, (_, j, _) in truth.items() if j >= 0.9]
    distinct = [d["id"] for d in docs if d["id"] not in truth]
    return {"recall_j>=0.9": sum(i in removed for i in high) / len(high),
            "false_removals": sum(i in removed for i in distinct) / len(distinct),
            "removed": len(removed)}


def datasketch_dedup(docs: list[dict], bands: int, rows: int, threshold: float | None = None) -> dict[str, str]:
    """The reference: datasketch MinHash over the same shingles, MinHashLSH with (bands, rows); a
    document is removed when the index already holds a candidate for it (with `threshold`, only a
    candidate whose MinHash Jaccard estimate reaches it, as our verification does). Returns
    {removed id: the candidate it was removed for}."""
    from datasketch import MinHash, MinHashLSH

    num_perm = bands * rows
    template = MinHash(num_perm=num_perm, seed=1)  # permutations generated once, as fast users do
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    kept: dict[str, MinHash] = {}
    removed = {}
    for d in docs:
        w = d["text"].lower().encode("utf-8").split()
        shingles = [b" ".join(w[i:i + 5]) for i in range(len(w) - 4)]
        if not shingles:
            continue
        m = MinHash(num_perm=num_perm, seed=1, permutations=template.permutations,
                    scheme=template.scheme)
        m.update_batch(shingles)
        candidates = sorted(lsh.query(m))
        if threshold is not None:
            candidates = [c for c in candidates if m.jaccard(kept[c]) >= threshold]
        if candidates:
            removed[d["id"]] = candidates[0]
        else:
            lsh.insert(d["id"], m)
            kept[d["id"]] = m
    return removed


def mixed_comparison(small: bool, tmp: Path, rounds: int) -> dict:
    """The dedup stage at its defaults against datasketch on the mixed corpus (stdlib code, pydoc
    prose, generated verse, and `../shared/corpora` text when present; planted copies at true
    Jaccard 0.5-1.0): recall by true-Jaccard bucket, false removals, CPU seconds. datasketch runs
    twice: FineWeb's 14 x 8 as people use it (any shared band removes), and our 32 x 8 with the
    same verification at 0.7. Best of `rounds` for every method, alternating, CPU seconds of this
    process (single-threaded, in process: one worker)."""
    from dedup_sweep import corpus
    from mixed_corpus import score
    from tasks.dedup.stage import run_dedup

    docs, truth = corpus(seed=7, near=60 if small else 600, exact=6 if small else 40, small=small)
    cfg = DedupConfig(workers=1)
    upstream = write_clean_upstream(docs, tmp / "mixed", per_shard=max(len(docs) // 8, 1))
    out: dict = {"docs": len(docs), "MB": round(sum(len(d["text"].encode()) for d in docs) / 1e6, 2),
                 "planted_copies": len(truth), "ours": f"{cfg.bands}x{cfg.rows}, threshold {cfg.threshold}"}
    try:
        import datasketch  # noqa: F401
    except ImportError:
        print("datasketch is not installed (pip install datasketch): reference skipped")
        datasketch = None
    cpu: dict[str, float] = {}
    for r in range(rounds):
        c = time.process_time()
        result = run_dedup(cfg, upstream, str(tmp / f"ws-mixed-{r}"))
        cpu["ours_stage"] = min(cpu.get("ours_stage", float("inf")), time.process_time() - c)
        ledger = pq_rows(Path(result.path))
        out["ours_stage"] = {"timings": result.info["timings"],
                             **score(docs, truth, {row["id"]: row["duplicate_of"] for row in ledger})}
        if datasketch is None:
            continue
        for name, args in (("datasketch_14x8", (14, 8, None)), ("datasketch_32x8_verified", (cfg.bands, cfg.rows, cfg.threshold))):
            c = time.process_time()
            removed = datasketch_dedup(docs, *args)
            cpu[name] = min(cpu.get(name, float("inf")), time.process_time() - c)
            out[name] = score(docs, truth, removed)
    for name, seconds in cpu.items():
        out[name]["cpu_s"] = round(seconds, 3)
        if name != "ours_stage":
            out[f"speedup_stage_vs_{name}"] = round(seconds / cpu["ours_stage"], 2)
    return out


def pq_rows(directory: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(sorted(directory.glob("duplicates/*.parquet"))).to_pylist()


FINEWEB = DedupConfig(workers=1, bands=14, rows=8, threshold=0.8)
"""Part 1 compares like for like with datasketch at FineWeb's 14 x 8 (the defaults before issue 14's
curve; part 0 measures the current defaults)."""


def near_dup_comparison(size: int, tmp: Path, rounds: int = 1) -> dict:
    """Our dedup stage and near-dup core against datasketch on one planted corpus; every method runs
    `rounds` times, alternating, and its best time counts, in CPU seconds of this process (the
    speedups) and wall seconds (the box is shared: best-of and CPU time keep the other jobs' bursts
    out of the comparison, for both sides alike; all three run single-threaded)."""
    from tasks.core.units import iter_parquet_docs
    from tasks.dedup.stage import decide, run_dedup

    docs, truth = planted(seed=42, distinct=size, near=size * 3 // 10, exact=size // 40)
    mb = sum(len(d["text"].encode()) for d in docs) / 1e6
    upstream = write_clean_upstream(docs, tmp / "near", per_shard=max(len(docs) // 8, 1))
    out: dict = {"docs": len(docs), "MB": round(mb, 2), "rounds": rounds,
                 "planted_j>=0.9": sum(j >= 0.9 for _, j, _ in truth.values())}
    try:
        import datasketch  # noqa: F401  (the reference: a benchmark-only dependency)
    except ImportError:
        print("datasketch is not installed (pip install datasketch): reference skipped")
        datasketch = None
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}

    def timed(name: str, fn):
        t, c = time.perf_counter(), time.process_time()
        value = fn()
        best_cpu[name] = min(best_cpu.get(name, float("inf")), time.process_time() - c)
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
        return value

    for r in range(rounds):
        for name, cfg in (("ours_verify", FINEWEB),
                          ("ours_no_verify", FINEWEB.model_copy(update={"verify": False}))):
            result = timed(name, lambda: run_dedup(cfg, upstream, str(tmp / f"ws-{name}-{r}")))
            kept = {d["id"] for d in iter_parquet_docs(Path(result.path), columns=("id",))}
            out[name] = {"timings": result.info["timings"], **_score({d["id"] for d in docs} - kept, truth, docs)}
        # like for like with datasketch: text in memory -> shingles -> signatures -> bands -> LSH
        # candidates, verification, clusters; no Parquet, no exact keys
        sig_dir = tmp / f"core-{r}"
        sig_dir.mkdir()

        def core() -> None:
            hashed = document_hashes([d["text"] for d in docs], 5, exact=False)
            sig = oph_flat(hashed.shingles, hashed.offsets, 112, 1)
            np.save(sig_dir / "signatures.npy", sig)
            np.save(sig_dir / "bands.npy", band_keys(sig, 14, 8))
            np.save(sig_dir / "near.npy", np.ones(len(docs), dtype=bool))
            np.save(sig_dir / "exact.npy", np.arange(2 * len(docs), dtype=np.uint64).reshape(-1, 2))
            decide(FINEWEB, [sig_dir], [len(docs)])

        timed("ours_near_core", core)
        if datasketch is not None:
            removed = timed("datasketch", lambda: datasketch_dedup(docs, 14, 8))
            out["datasketch"] = _score(set(removed), truth, docs)
    for name, seconds in best.items():
        out.setdefault(name, {}).update({"s": round(seconds, 3), "cpu_s": round(best_cpu[name], 3),
                                         "MB/s": round(mb / seconds, 2)})
    if datasketch is not None:  # CPU seconds of this process: what the other jobs on the box do
        ref = best_cpu["datasketch"]  # to wall-clock time (they preempt us) does not count
        out["speedup_near_core_vs_datasketch"] = round(ref / best_cpu["ours_near_core"], 2)
        out["speedup_stage_vs_datasketch"] = round(ref / best_cpu["ours_verify"], 2)
        out["speedup_wall_near_core"] = round(best["datasketch"] / best["ours_near_core"], 2)
        out["speedup_wall_stage"] = round(best["datasketch"] / best["ours_verify"], 2)
        out["recall_diff_points"] = round(100 * (out["ours_verify"]["recall_j>=0.9"]
                                                 - out["datasketch"]["recall_j>=0.9"]), 2)
    return out


def profile_stage(size: int, tmp: Path) -> None:
    """cProfile of one whole dedup stage run (one worker, warm imports) on the planted corpus."""
    import cProfile
    import pstats

    from tasks.dedup.stage import run_dedup

    docs, _ = planted(seed=42, distinct=size, near=size * 3 // 10, exact=size // 40)
    upstream = write_clean_upstream(docs, tmp / "near", per_shard=max(len(docs) // 8, 1))
    run_dedup(DedupConfig(workers=1), upstream, str(tmp / "warm-up"))
    profiler = cProfile.Profile()
    result = profiler.runcall(run_dedup, DedupConfig(workers=1), upstream, str(tmp / "profiled"))
    print("stage timings:", json.dumps(result.info["timings"]))
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def real_corpus(tmp: Path) -> list[str]:
    """Sources: the stdlib, plus WikiText articles and 4 kB Shakespeare chunks as jsonl."""
    sources = ["python-stdlib"]
    if SHARED.is_dir():
        from dedup_sweep import shared_texts

        lines = [json.dumps({"text": t}) for t in shared_texts()]
        (tmp / "shared.jsonl").write_text("\n".join(lines) + "\n")
        sources.append(str(tmp / "shared.jsonl"))
    return sources


def clean_dedup(sources: list[str], max_bytes: int | None, ws: str) -> dict:
    from tasks.clean.stage import run_clean
    from tasks.dedup.stage import run_dedup
    from tasks.download.stage import run_download

    raw = run_download(CorpusConfig(sources=sources, max_bytes=max_bytes, shard_bytes=4_000_000), ws)
    mb = raw.counts["bytes"] / 1e6
    t = time.perf_counter()
    cleaned = run_clean(CleanConfig(workers=1, profiles={**CleanConfig().profiles, "*.jsonl:*": "prose"}),
                        raw, ws)
    t_clean = time.perf_counter() - t
    t = time.perf_counter()
    deduped = run_dedup(DedupConfig(workers=1), cleaned, ws)
    t_dedup = time.perf_counter() - t
    return {"MB": round(mb, 2), "docs": cleaned.counts["docs_in"], "kept_after_clean": cleaned.counts["kept"],
            "rejected": {k[9:]: v for k, v in cleaned.counts.items() if k.startswith("rejected:") and v},
            "c4_lines_removed": cleaned.info["lines_removed"],
            "duplicates": deduped.counts["duplicates"], "near": deduped.info["near"],
            "clean_s": round(t_clean, 2), "dedup_s": round(t_dedup, 2),
            "clean_MB/s/core": round(mb / t_clean, 2), "dedup_MB/s/core": round(mb / t_dedup, 2),
            "clean+dedup_MB/s/core": round(mb / (t_clean + t_dedup), 2),
            "clean_timings": cleaned.info["timings"], "dedup_timings": deduped.info["timings"],
            "peak_rss_MB": peak_rss_mb()}


def line_rules(tmp: Path) -> dict:
    """Lines the clean stage's C4 line rules remove from the shared corpora (tinyshakespeare,
    WikiText-2 valid and test, each one source), per rule and per source: C4 exactly
    (`clean.prose.c4_unit: line`, the old default) against the default (`paragraph`)."""
    from tasks.clean.stage import run_clean
    from tasks.download.stage import run_download

    if not SHARED.is_dir():
        return {"skipped": f"{SHARED} is not there"}
    files = [str(SHARED / n) for n in ("tinyshakespeare.txt", "wikitext2-valid.txt", "wikitext2-test.txt")]
    raw = run_download(CorpusConfig(sources=files), str(tmp / "lines"))
    out = {}
    for unit in ("line", "paragraph"):
        prose = {**CleanConfig().prose, "c4_unit": unit}
        info = run_clean(CleanConfig(workers=1, prose=prose), raw, str(tmp / "lines")).info
        out[f"c4_unit={unit}"] = {src: {"lines": acc["lines"], "removed": {k: v for k, v in acc["removed"].items() if v},
                                        "removed_share": round(sum(acc["removed"].values()) / acc["lines"], 4)}
                                  for src, acc in info["lines_by_source"].items()}
    return out


def synthetic_signatures(root: Path, n: int, per_shard: int = 50_000, dup_every: int = 50) -> None:
    """Per-shard signature directories as `signature_shard` writes them, for `n` documents of random
    signatures, where every `dup_every`-th document copies its predecessor's signature (and every
    fourth of those its exact key too): the global step's input without reading any text."""
    rng = np.random.default_rng(n)
    for s, lo in enumerate(range(0, n, per_shard)):
        m = min(per_shard, n - lo)
        sig = rng.integers(0, 2**32 - 1, size=(m, 112), dtype=np.uint32)
        exact = rng.integers(0, 2**63, size=(m, 2), dtype=np.uint64)
        copies = np.arange(1, m, dup_every)
        sig[copies] = sig[copies - 1]
        exact[copies[::4]] = exact[copies[::4] - 1]
        directory = root / f"sig-{s:05d}"
        directory.mkdir(parents=True)
        for name, array in (("exact", exact), ("signatures", sig), ("bands", band_keys(sig, 14, 8)),
                            ("near", np.ones(m, dtype=bool))):
            np.save(directory / f"{name}.npy", array)


def global_step_rss(root: Path, n: int) -> dict:
    """Peak RSS of the global dedup step alone over `n` synthetic documents, in a fresh process."""
    synthetic_signatures(root, n)
    child = subprocess.run([sys.executable, __file__, "--decide", str(root)], capture_output=True,
                           text=True, check=True)
    return {"docs": n, **json.loads(child.stdout.strip().splitlines()[-1])}


def decide_rss(root: Path) -> dict:
    from tasks.dedup.stage import decide

    dirs = sorted(root.iterdir())
    sizes = [len(np.load(d / "near.npy", mmap_mode="r")) for d in dirs]
    base = peak_rss_mb()
    t = time.perf_counter()
    d = decide(FINEWEB, dirs, sizes)  # the synthetic signatures are 14 x 8 = 112 wide
    return {"duplicates": int(d["exact_count"] + d["near_count"]), "decide_s": round(time.perf_counter() - t, 2),
            "partitions": d["partitions"], "rss_after_imports_MB": base, "peak_rss_MB": peak_rss_mb()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    ap.add_argument("--child", nargs=2, metavar=("SOURCES_JSON", "MAX_BYTES"), help=argparse.SUPPRESS)
    ap.add_argument("--global-step", type=int, metavar="DOCS",
                    help="only: peak RSS of the global dedup step over this many synthetic documents")
    ap.add_argument("--decide", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help="only: cProfile of the whole dedup stage")
    ap.add_argument("--lines", action="store_true",
                    help="only: lines removed per C4 line rule on ../shared/corpora, c4_unit line vs paragraph")
    ap.add_argument("--near-only", action="store_true", help="only: the near-dup comparison (part 1)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp_name:
        tmp = Path(tmp_name)
        if args.profile:
            profile_stage(120 if args.smoke else 4000, tmp)
            return 0
        if args.lines:
            print(json.dumps(line_rules(tmp), indent=1))
            return 0
        if args.decide:
            print(json.dumps(decide_rss(Path(args.decide))))
            return 0
        if args.global_step:
            print(json.dumps(global_step_rss(tmp / "sig", args.global_step)))
            return 0
        if args.child:
            cap = int(args.child[1]) or None
            print(json.dumps(clean_dedup(json.loads(args.child[0]), cap, str(tmp / "ws"))))
            return 0
        print(f"loadavg: {Path('/proc/loadavg').read_text().strip()}  cpus: {os.cpu_count()}")
        mixed = mixed_comparison(args.smoke, tmp, rounds=1 if args.smoke else 3)
        print("mixed corpus vs datasketch:", json.dumps(mixed, indent=1))
        if mixed["ours_stage"]["recall_j>=0.75"] < 0.95 or mixed["ours_stage"]["false_removal_rate"] > 0.001:
            print("FAIL: the defaults miss their recall/false-removal targets on the mixed corpus")
            return 1
        near = near_dup_comparison(120 if args.smoke else 4000, tmp, rounds=1 if args.smoke else 5)
        print("near-dup vs datasketch:", json.dumps(near, indent=1))
        if args.near_only:
            print(f"loadavg at the end: {Path('/proc/loadavg').read_text().strip()}")
            return 0
        for n in (20_000,) if args.smoke else (1_000_000, 3_000_000):
            print("global dedup step, fresh process:", json.dumps(global_step_rss(tmp / f"sig-{n}", n)))
        if args.smoke:  # in this process: a fresh one per size (for RSS) costs seconds of imports
            print("clean+dedup, one worker:", json.dumps(clean_dedup(["python-stdlib"], 300_000, str(tmp / "ws"))))
            return 0 if near["ours_verify"]["recall_j>=0.9"] >= 0.9 else 1
        sources = real_corpus(tmp)
        for cap in (10_000_000, 0):  # 0: everything
            child = subprocess.run([sys.executable, __file__, "--child", json.dumps(sources), str(cap)],
                                   capture_output=True, text=True, check=True)
            print(f"clean+dedup, one worker, cap {cap or 'none'}:", child.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
