"""The recall/precision curve behind the dedup defaults: bands x rows x threshold on a mixed corpus.

    python benchmarks/dedup_sweep.py                     # the full grid (a few minutes)
    python benchmarks/dedup_sweep.py --plot benchmarks/dedup_curve.png --out benchmarks/dedup_curve.csv

The corpus is `tests/helpers/mixed_corpus.py`'s: the whole Python stdlib (code), the pydoc topics
(prose), generated verse, plus WikiText articles and Shakespeare chunks from `../shared/corpora` when
present, with planted near copies of true word-5-gram Jaccard 0.5-1.0 (four kinds of edit) and exact
copies. Every configuration runs the dedup stage's own code: the shard signatures (`document_hashes`,
`oph_flat`, `band_keys`) and its global decision step (`tasks.dedup.stage.decide`, LSH candidates,
verification against `threshold`, clusters). Each configuration reports recall per true-Jaccard
bucket of the planted copies and false removals: documents removed for one whose true Jaccard with
them is below 0.7 (`mixed_corpus.score`). Not a `bench_*` file: `make test` does not run it;
`benchmarks/bench_dedup.py` checks the chosen defaults.
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "helpers")]

import numpy as np  # noqa: E402

from mixed_corpus import BUCKETS, mixed_corpus, score  # noqa: E402
from tasks.core.data_config import DedupConfig  # noqa: E402
from tasks.dedup.minhash import band_keys, document_hashes, oph_flat  # noqa: E402
from tasks.dedup.stage import decide  # noqa: E402

SHARED = ROOT.parent / "shared" / "corpora"
GRID = [(14, 8), (16, 8), (9, 13), (20, 5), (24, 5), (25, 4), (20, 6), (32, 4), (16, 6), (32, 8), (40, 6),
        (64, 4), (16, 16)]
THRESHOLDS = [None, 0.6, 0.65, 0.7, 0.75, 0.8]
"""None: no verification (any shared band removes, as datatrove and datasketch do)."""


def shared_texts(limit_bytes: int = 4000) -> list[str]:
    """WikiText-2 valid/test articles (split at top-level ` = Title = ` lines) and tinyshakespeare cut
    every `limit_bytes` characters, when `../shared/corpora` is there (also bench_dedup's corpus)."""
    if not SHARED.is_dir():
        return []
    out = []
    for name in ("wikitext2-valid.txt", "wikitext2-test.txt"):
        article: list[str] = []
        for line in (SHARED / name).read_text(encoding="utf-8").splitlines(keepends=True):
            if line.startswith(" = ") and not line.startswith(" = = ") and article:
                out.append("".join(article))
                article = []
            article.append(line)
        out.append("".join(article))
    text = (SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return out + [text[i:i + limit_bytes] for i in range(0, len(text), limit_bytes)]


def shared_documents(limit_bytes: int = 4000) -> list[dict]:
    """`shared_texts` as documents, blank ones left out."""
    return [{"id": f"shared/{i:05d}", "text": t, "source": "shared"}
            for i, t in enumerate(shared_texts(limit_bytes)) if t.strip()]


def corpus(seed: int, near: int, exact: int, small: bool) -> tuple[list[dict], dict]:
    if small:
        return mixed_corpus(seed=seed, code=80, prose=30, verse=20, near=near, exact=exact)
    return mixed_corpus(seed=seed, code=None, prose=None, verse=200, near=near, exact=exact,
                        extra=shared_documents())


def sweep(docs: list[dict], truth: dict, grid: list[tuple[int, int]], thresholds: list,
          tmp: Path) -> list[dict]:
    hashed = document_hashes([d["text"] for d in docs], 5)
    near_mask = np.diff(hashed.offsets) > 0
    ids = [d["id"] for d in docs]
    rows_out = []
    for bands, rows in grid:
        sig = oph_flat(hashed.shingles, hashed.offsets, bands * rows, 1)
        directory = tmp / f"sig-{bands}x{rows}"
        directory.mkdir()
        for name, array in (("exact", hashed.exact), ("signatures", sig), ("near", near_mask),
                            ("bands", band_keys(sig, bands, rows))):
            np.save(directory / f"{name}.npy", array)
        for threshold in thresholds:
            cfg = DedupConfig(bands=bands, rows=rows, threshold=threshold or 1.0, verify=threshold is not None,
                              workers=1)
            t = time.process_time()
            d = decide(cfg, [directory], [len(docs)], scratch=tmp)
            seconds = time.process_time() - t
            removed = {ids[g]: ids[of] for g, of in zip(d["dups"]["g"].tolist(), d["dups"]["of"].tolist())}
            s = score(docs, truth, removed)
            row = {"bands": bands, "rows": rows, "hashes": bands * rows,
                   "threshold": threshold if threshold is not None else "none",
                   "candidates": d["candidates"], "decide_cpu_s": round(seconds, 3),
                   **{k: v for k, v in s.items() if k != "false_examples"}}
            rows_out.append(row)
            print(f"{bands:>3}x{rows:<2} t={row['threshold']!s:<5} recall>=0.75 {s['recall_j>=0.75']:.3f} "
                  f"buckets {[s[f'recall_{lo:.2f}-{min(hi, 1):.2f}'] for lo, hi in BUCKETS]} "
                  f"false {s['false_removals']} ({s['false_removal_rate']:.3%}) {s['false_examples'][:2]}",
                  flush=True)
    return rows_out


def plot(rows: list[dict], path: Path, chosen: tuple[int, int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mids = [(lo + min(hi, 1)) / 2 for lo, hi in BUCKETS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    show = [(14, 8, 0.8), (14, 8, "none"), (20, 5, 0.7), (32, 4, 0.7), (chosen[0], chosen[1], chosen[2])]
    for bands, rows_, threshold in dict.fromkeys(show):
        r = next((r for r in rows if (r["bands"], r["rows"], r["threshold"]) == (bands, rows_, threshold)), None)
        if r is None:
            continue
        ys = [r[f"recall_{lo:.2f}-{min(hi, 1):.2f}"] for lo, hi in BUCKETS]
        label = f"{bands}x{rows_}, threshold {threshold}" + (" (default)" if (bands, rows_, threshold) == chosen else "")
        left.plot(mids, ys, marker="o", label=label, linewidth=2.5 if (bands, rows_, threshold) == chosen else 1.2)
    left.axvline(0.75, color="grey", linestyle=":")
    left.axhline(0.95, color="grey", linestyle=":")
    left.set_xlabel("true word-5-gram Jaccard of the planted copy (bucket middle)")
    left.set_ylabel("share of planted copies removed")
    left.set_title("Recall by similarity")
    left.legend(fontsize=8)
    for threshold in sorted({r["threshold"] for r in rows}, key=str):
        pts = [r for r in rows if r["threshold"] == threshold]
        right.scatter([100 * r["false_removal_rate"] for r in pts], [r["recall_j>=0.75"] for r in pts],
                      label=f"threshold {threshold}", s=18)
    right.axhline(0.95, color="grey", linestyle=":")
    right.axvline(0.1, color="grey", linestyle=":")
    right.set_xscale("symlog", linthresh=0.01)
    right.set_xlim(0, None)
    right.set_xlabel("false removals, % of distinct documents")
    right.set_ylabel("recall, planted copies with J >= 0.75")
    right.set_title("Every bands x rows x threshold")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--near", type=int, default=800)
    ap.add_argument("--exact", type=int, default=40)
    ap.add_argument("--small", action="store_true", help="a small corpus and grid (seconds)")
    ap.add_argument("--out", type=Path, help="CSV of every configuration")
    ap.add_argument("--plot", type=Path, help="PNG: recall by Jaccard bucket, recall vs false removals")
    ap.add_argument("--grid", help="bands x rows to try, e.g. 32x8,64x4 (default: the built-in grid)")
    ap.add_argument("--thresholds", help="e.g. none,0.7,0.75 (default: none and 0.6-0.8)")
    ap.add_argument("--chosen", default="20x5:0.7", help="the configuration the plot highlights, BxR:T")
    args = ap.parse_args()
    t = time.time()
    docs, truth = corpus(args.seed, args.near if not args.small else 60, args.exact, args.small)
    print(f"{len(docs)} documents, {sum(len(d['text'].encode()) for d in docs) / 1e6:.1f} MB, "
          f"{len(truth)} planted copies ({time.time() - t:.1f} s to build)", flush=True)
    grid = [tuple(map(int, g.split("x"))) for g in args.grid.split(",")] if args.grid else \
        GRID[:3] if args.small else GRID
    thresholds = [None if t == "none" else float(t) for t in args.thresholds.split(",")] \
        if args.thresholds else THRESHOLDS
    with tempfile.TemporaryDirectory(prefix="dedup-sweep-") as tmp:
        rows = sweep(docs, truth, grid, thresholds, Path(tmp))
    if args.out:
        with args.out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if args.plot:
        shape, threshold = args.chosen.split(":")
        bands, rows_ = map(int, shape.split("x"))
        plot(rows, args.plot, (bands, rows_, float(threshold)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
