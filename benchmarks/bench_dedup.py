"""Benchmark the clean and dedup stages.

1. Near-duplicate detection against datasketch MinHash + MinHashLSH with the same parameters (word
   5-grams, 14 bands x 8 rows = 112 hashes) on the same planted corpus in the same run: time, recall
   on planted pairs with Jaccard >= 0.9, false removals of distinct documents.
2. clean + dedup throughput in MB/s per core (one worker) on the full Python stdlib plus
   `../shared/corpora` (WikiText articles, Shakespeare chunks) when present.
3. Peak RSS of clean + dedup (one worker, fresh process) at two corpus sizes.

    python benchmarks/bench_dedup.py            # full run (minutes)
    python benchmarks/bench_dedup.py --smoke    # seconds, tiny sizes
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "tasks")]

from planted_corpus import planted, write_clean_upstream  # noqa: E402
from tasks.config import CleanConfig, CorpusConfig, DedupConfig  # noqa: E402
from tasks.minhash import band_keys, oph_signatures, shingle_hashes_batch  # noqa: E402

SHARED = ROOT.parent / "shared" / "corpora"


def _score(removed: set[str], truth: dict, docs: list[dict]) -> dict:
    high = [i for i, (_, j, _) in truth.items() if j >= 0.9]
    distinct = [d["id"] for d in docs if d["id"] not in truth]
    return {"recall_j>=0.9": sum(i in removed for i in high) / len(high),
            "false_removals": sum(i in removed for i in distinct) / len(distinct),
            "removed": len(removed)}


def datasketch_dedup(docs: list[dict], bands: int, rows: int) -> set[str]:
    """The reference: datasketch MinHash over the same shingles, MinHashLSH with (bands, rows);
    a document is removed when the index already holds a candidate for it."""
    from datasketch import MinHash, MinHashLSH

    num_perm = bands * rows
    template = MinHash(num_perm=num_perm, seed=1)  # permutations generated once, as fast users do
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    removed = set()
    for d in docs:
        w = d["text"].lower().encode("utf-8").split()
        shingles = [b" ".join(w[i:i + 5]) for i in range(len(w) - 4)]
        if not shingles:
            continue
        m = MinHash(num_perm=num_perm, seed=1, permutations=template.permutations,
                    scheme=template.scheme)
        m.update_batch(shingles)
        if lsh.query(m):
            removed.add(d["id"])
        else:
            lsh.insert(d["id"], m)
    return removed


def near_dup_comparison(size: int, tmp: Path) -> dict:
    from tasks.clean import iter_parquet_docs
    from tasks.dedup import run_dedup

    docs, truth = planted(seed=42, distinct=size, near=size * 3 // 10, exact=size // 40)
    mb = sum(len(d["text"].encode()) for d in docs) / 1e6
    upstream = write_clean_upstream(docs, tmp / "near", per_shard=max(len(docs) // 8, 1))
    out = {"docs": len(docs), "MB": round(mb, 2), "planted_j>=0.9": sum(j >= 0.9 for _, j, _ in truth.values())}
    for name, cfg in (("ours_verify", DedupConfig(workers=1)),
                      ("ours_no_verify", DedupConfig(workers=1, verify=False))):
        t = time.perf_counter()
        result = run_dedup(cfg, upstream, str(tmp / f"ws-{name}"))
        seconds = time.perf_counter() - t
        kept = {d["id"] for d in iter_parquet_docs(Path(result.path), columns=("id",))}
        out[name] = {"s": round(seconds, 3), "MB/s": round(mb / seconds, 2), "timings": result.info["timings"],
                     **_score({d["id"] for d in docs} - kept, truth, docs)}
    try:
        import datasketch  # noqa: F401  (the reference: a benchmark-only dependency)
    except ImportError:
        print("datasketch is not installed (pip install datasketch): reference skipped")
        return out
    t = time.perf_counter()
    removed = datasketch_dedup(docs, 14, 8)
    seconds = time.perf_counter() - t
    out["datasketch"] = {"s": round(seconds, 3), "MB/s": round(mb / seconds, 2), **_score(removed, truth, docs)}
    t = time.perf_counter()
    shingles = shingle_hashes_batch([d["text"] for d in docs], 5)
    out["ours_shingle_hashing_s"] = round(time.perf_counter() - t, 3)
    band_keys(oph_signatures(shingles, 112, 1), 14, 8)
    core = time.perf_counter() - t + out["ours_verify"]["timings"]["decide_s"]
    # like for like with datasketch: text in memory -> shingles -> signatures -> LSH -> decisions,
    # no Parquet reading or writing, no exact-duplicate keys
    out["ours_near_core_s"] = round(core, 3)
    out["speedup_near_core_vs_datasketch"] = round(out["datasketch"]["s"] / core, 2)
    out["speedup_vs_datasketch"] = round(out["datasketch"]["s"] / out["ours_verify"]["s"], 2)
    out["recall_diff_points"] = round(100 * (out["ours_verify"]["recall_j>=0.9"]
                                             - out["datasketch"]["recall_j>=0.9"]), 2)
    return out


def real_corpus(tmp: Path) -> list[str]:
    """Sources: the stdlib, plus WikiText articles and 4 kB Shakespeare chunks as jsonl."""
    sources = ["python-stdlib"]
    if SHARED.is_dir():
        lines = []
        for name in ("wikitext2-valid.txt", "wikitext2-test.txt"):
            article: list[str] = []
            for line in (SHARED / name).read_text(encoding="utf-8").splitlines(keepends=True):
                if line.startswith(" = ") and not line.startswith(" = = ") and article:
                    lines.append(json.dumps({"text": "".join(article)}))
                    article = []
                article.append(line)
            lines.append(json.dumps({"text": "".join(article)}))
        text = (SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8")
        lines += [json.dumps({"text": text[i:i + 4000]}) for i in range(0, len(text), 4000)]
        (tmp / "shared.jsonl").write_text("\n".join(lines) + "\n")
        sources.append(str(tmp / "shared.jsonl"))
    return sources


def clean_dedup(sources: list[str], max_bytes: int | None, ws: str) -> dict:
    from tasks.clean import run_clean
    from tasks.dedup import run_dedup
    from tasks.download import run_download

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
            "duplicates": deduped.counts["duplicates"], "near": deduped.info["near"],
            "clean_s": round(t_clean, 2), "dedup_s": round(t_dedup, 2),
            "clean_MB/s/core": round(mb / t_clean, 2), "dedup_MB/s/core": round(mb / t_dedup, 2),
            "clean+dedup_MB/s/core": round(mb / (t_clean + t_dedup), 2),
            "clean_timings": cleaned.info["timings"], "dedup_timings": deduped.info["timings"],
            "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    ap.add_argument("--child", nargs=2, metavar=("SOURCES_JSON", "MAX_BYTES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp_name:
        tmp = Path(tmp_name)
        if args.child:
            cap = int(args.child[1]) or None
            print(json.dumps(clean_dedup(json.loads(args.child[0]), cap, str(tmp / "ws"))))
            return 0
        print(f"loadavg: {Path('/proc/loadavg').read_text().strip()}  cpus: {os.cpu_count()}")
        near = near_dup_comparison(120 if args.smoke else 4000, tmp)
        print("near-dup vs datasketch:", json.dumps(near, indent=1))
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
