"""One chart per data stage, read at a glance: PNG bytes drawn from a stage result's counts and info.

download and clean: documents per outcome (kept, then each quarantine or rejection reason that
happened); dedup: clusters per size bucket and kept vs exact/near duplicates; tokenize: tokens per
source in each split; clean also its document length histogram before/after (power-of-two bins of
characters, counted by its units as they go). Only non-zero outcomes are drawn.

matplotlib (Agg) loads only when a chart is drawn; nothing here imports Prefect or MLflow, so the
charts are testable alone. `tasks/core/stage_report.py` writes them next to the stage output and
logs them to MLflow.
"""
from __future__ import annotations

import io
from typing import Any, Callable

from tasks.core.protocol import StageResult

CHART_FILE = "report.png"
"""The chart's name in the stage directory (written after the manifest, listed in no manifest)."""


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def _bars(ax: Any, values: dict[str, int], title: str, xlabel: str) -> None:
    """Horizontal bars, first item on top, each labelled with its value."""
    labels = list(values) or ["(none)"]
    numbers = list(values.values()) or [0]
    bars = ax.barh(range(len(labels)), numbers, color=["tab:green" if k == "kept" else "tab:red"
                                                        if k.startswith(("quarantined", "rejected", "removed"))
                                                        else "tab:blue" for k in labels])
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.bar_label(bars, labels=[f"{n:,}" for n in numbers], padding=3)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.margins(x=0.15)


def outcomes_chart(title: str, outcomes: dict[str, int]) -> bytes:
    """Documents per outcome: one bar per non-zero outcome."""
    outcomes = nonzero(outcomes)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * max(len(outcomes), 1)))
    _bars(ax, outcomes, title, "documents")
    return _png(fig)


def download_chart(result: StageResult) -> bytes:
    c, reasons = result.counts, result.info.get("quarantine_reasons") or {}
    outcomes = {"kept": c.get("docs", 0), **{f"quarantined: {r}": n for r, n in reasons.items()}}
    if not reasons and c.get("quarantined"):
        outcomes["quarantined"] = c["quarantined"]
    return outcomes_chart(f"download: {c.get('docs', 0) + c.get('quarantined', 0):,} records read",
                          outcomes)


def clean_chart(result: StageResult) -> bytes:
    """Documents per outcome, and beside it the document length histogram before (as read) and after
    (the kept documents, as cleaned), in power-of-two bins of characters."""
    c = result.counts
    outcomes = nonzero({"kept": c.get("kept", 0), **{f"rejected: {k.split(':', 1)[1]}": v for k, v in c.items()
                                                    if k.startswith("rejected:")}})
    hist = result.info.get("length_hist")
    if not hist:
        return outcomes_chart(f"clean: {c.get('docs_in', 0):,} documents in", outcomes)
    plt = _pyplot()
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(13, 1.6 + 0.45 * max(len(outcomes), 4)))
    _bars(ax, outcomes, f"clean: {c.get('docs_in', 0):,} documents in", "documents")
    used = [k for k, (a, b) in enumerate(zip(hist["in"], hist["kept"])) if a or b]
    lo, hi = (min(used), max(used)) if used else (0, 0)
    xs = list(range(lo, hi + 1))
    hx.bar([x - 0.2 for x in xs], [hist["in"][x] for x in xs], width=0.4, label="before (as read)", color="tab:gray")
    hx.bar([x + 0.2 for x in xs], [hist["kept"][x] for x in xs], width=0.4, label="after (kept)", color="tab:green")
    hx.set_xticks(xs, [f"{2 ** x:,}" for x in xs], rotation=45, ha="right")
    hx.set_xlabel("document length, characters (bin start, x2 per bin)")
    hx.set_ylabel("documents")
    hx.set_title("length before / after")
    hx.legend()
    return _png(fig)


def dedup_chart(result: StageResult) -> bytes:
    """Clusters per size (documents in a group of equal or similar ones) and kept vs removed."""
    c, info = result.counts, result.info
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    sizes = dict(info.get("cluster_sizes") or {})
    while sizes and not sizes[list(sizes)[-1]]:  # up to the largest size bucket that happened
        sizes.pop(list(sizes)[-1])
    bars = left.bar(list(sizes) or ["(none)"], list(sizes.values()) or [0], color="tab:blue")
    left.bar_label(bars, labels=[f"{n:,}" for n in sizes.values()] or ["0"], padding=2)
    left.set_xlabel("cluster size (documents)")
    left.set_ylabel("clusters")
    left.set_title(f"{info.get('clusters', 0):,} clusters with duplicates")
    left.margins(y=0.15)
    outcomes = nonzero({"kept": c.get("kept", 0), "removed: exact duplicate": info.get("exact", 0),
                        "removed: near duplicate": info.get("near", 0)})
    _bars(right, outcomes, f"dedup: {c.get('docs_in', 0):,} documents in", "documents")
    return _png(fig)


def tokenize_chart(result: StageResult) -> bytes:
    """Tokens per source, one bar per split (train, val) for each source."""
    sources: dict[str, dict[str, dict[str, int]]] = result.info.get("sources") or {}
    names = sorted({src for by in sources.values() for src in by})
    splits = list(sources) or ["train", "val"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.5 * max(len(names), 1) * len(splits)))
    height = 0.8 / len(splits)
    for i, split in enumerate(splits):
        tokens = [sources.get(split, {}).get(src, {}).get("tokens", 0) for src in names]
        bars = ax.barh([j + i * height for j in range(len(names))], tokens, height=height, label=split)
        ax.bar_label(bars, labels=[f"{n:,}" for n in tokens], padding=3)
    ax.set_yticks([j + height * (len(splits) - 1) / 2 for j in range(len(names))], names)
    ax.invert_yaxis()
    ax.set_xlabel("tokens")
    ax.set_title(f"tokenize: {result.counts.get('train_tokens', 0):,} train / "
                 f"{result.counts.get('val_tokens', 0):,} val tokens per source")
    ax.legend(loc="best")
    ax.margins(x=0.15)
    return _png(fig)


CHARTS: dict[str, Callable[[StageResult], bytes]] = {
    "download": download_chart, "clean": clean_chart, "dedup": dedup_chart, "tokenize": tokenize_chart}
"""The stages that have a chart: the data stages (training draws its loss curve itself)."""


def draw(result: StageResult) -> bytes | None:
    """The stage's chart as PNG bytes; None for a stage without one."""
    chart = CHARTS.get(result.stage)
    return None if chart is None else chart(result)
