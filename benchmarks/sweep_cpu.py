"""The CPU recipe sweep behind `configs/cpu-small.yaml`: bits-per-byte on held-out text per CPU budget.

    python benchmarks/sweep_cpu.py --text ../shared/corpora/tinyshakespeare.txt --budget 105 \
        --grid "vocab=1024;seq=128;layers=1,2;width=128,192;lr=1.5e-3,3e-3;batch=16"

The text is cut like nanoGPT's shakespeare recipe: the first 90% (bytes, at a line boundary) to train
on, the last 10% held out. The training part is cut into ~8 kB paragraph documents, tokenized by the
project's tokenize stage (a byte-level BPE of `vocab` trained on it, rows of `seq` tokens, 2% of the
documents for its own val split), trained by the project's training loop in this process for a wall
budget (`--budget` seconds; `--cpu-budget` for CPU seconds instead) with the lr decayed over the budget,
and scored by the project's evaluator on the held-out text as one document (windows of the trained
context). One line per configuration, and a table + CSV at the end (`--out`). Not a `bench_*` file:
`make test` does not run it; `benchmarks/bench_quality.py` checks the chosen recipe end to end.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from neo_model import GPTNeo, GPTNeoConfig  # noqa: E402
from tasks.core.data_config import TokenizerConfig  # noqa: E402
from tasks.core.protocol import StageResult  # noqa: E402
from tasks.core.train_config import TrainConfig  # noqa: E402
from tasks.evaluate.evals.scoring import rolling_nll  # noqa: E402
from tasks.tokenize.bpe import load_tokenizer  # noqa: E402
from tasks.tokenize.stage import run_tokenize  # noqa: E402
from tasks.train.spec import TrainSpec  # noqa: E402
from tasks.train.trainer import train_loop  # noqa: E402

from bench_quality import split_text  # noqa: E402 - the same 90/10 cut the quality benchmark makes


def paragraphs(text: str, target: int = 8192) -> list[str]:
    """~target-character documents cut after blank lines; concatenated they give back `text`."""
    docs, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + target)
        end = len(text) if cut < 0 else cut + 2
        docs.append(text[start:end])
        start = end
    return docs


def tokens_for(train_text: str, vocab: int, seq: int, root: Path) -> StageResult:
    docs_dir = root / "docs"
    if not docs_dir.exists():
        docs_dir.mkdir(parents=True)
        docs = paragraphs(train_text)
        pq.write_table(pa.table({"id": [f"shakespeare:{i}" for i in range(len(docs))], "text": docs,
                                 "source": ["text"] * len(docs)}), docs_dir / "docs-00000.parquet")
    upstream = StageResult(stage="dedup", fingerprint="s" * 16, path=str(docs_dir))
    return run_tokenize(TokenizerConfig(vocab_size=vocab, seq_len=seq, val_fraction=0.02), upstream,
                        str(root / "ws"))


def held_out_bpb(model_dir: Path, tokens_dir: str, text: str, stride: int | None = None) -> float:
    model = GPTNeo.from_pretrained(model_dir)
    tok = load_tokenizer(tokens_dir)
    nll = rolling_nll(model, tok.encode(text).ids, model.config.eos_token_id, stride=stride, batch_size=16)
    return nll / math.log(2) / len(text.encode("utf-8"))


def run_one(point: dict, tokens: StageResult, held: str, out: Path, args) -> dict:
    mcfg = GPTNeoConfig(vocab_size=tokens.info["vocab_size"], max_position_embeddings=point["seq"],
                        hidden_size=point["width"], num_layers=point["layers"], num_heads=point["heads"],
                        window_size=min(point["window"], point["seq"]), bos_token_id=tokens.info["eos_id"],
                        eos_token_id=tokens.info["eos_id"], trained_context=point["seq"])
    budget = {"max_cpu_time": args.cpu_budget} if args.cpu_budget else {"max_time": args.budget}
    cfg = TrainConfig(batch_size=point["batch"], lr=point["lr"], warmup_steps=point["warmup"],
                      min_lr_ratio=point["floor"], weight_decay=point["wd"], log_every=10_000,
                      checkpoint_every=1_000_000, seed=1234, device="cpu", threads=args.threads,
                      in_process=True, compile=bool(point["compile"]), **budget)
    spec = TrainSpec(train=cfg, model=mcfg.to_hf_dict(), tokens_dir=tokens.path, out_dir=str(out))
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_loop(spec, emit=lambda line: None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    bpb = held_out_bpb(out / "model", tokens.path, held)
    return {**point, "params": res["num_parameters"], "steps": res["steps"], "tokens": res["tokens_seen"],
            "tok_per_s": res["tokens_seen"] / res["train_wall_s"], "train_wall_s": res["train_wall_s"],
            "train_cpu_s": res["train_cpu_s"], "wall_s": wall, "cpu_s": cpu, "bpb": bpb}


DEFAULTS = dict(vocab=1024, seq=128, layers=1, width=128, heads=4, window=128, batch=16, lr=1.5e-3,
                warmup=50, floor=0.1, wd=0.1, compile=0)


def grid(spec: str) -> list[dict]:
    axes = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, _, values = part.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"unknown grid key {key!r}; known: {', '.join(DEFAULTS)}")
        cast = type(DEFAULTS[key])
        axes[key] = [cast(float(v)) if cast is int else cast(v) for v in values.split(",")]
    keys = list(axes)
    return [{**DEFAULTS, **dict(zip(keys, combo))} for combo in itertools.product(*(axes[k] for k in keys))]


def plot(csv_path: str, png: str) -> None:
    """bits/byte on the held-out text against training CPU seconds, one line per configuration (its
    budgets joined), with nanoGPT's CPU recipe as the reference point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in DEFAULTS if len({r[k] for r in rows}) > 1]  # what the sweep varied
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        label = " ".join(f"{k}={r[k]}" for k in keys) or "default"
        series.setdefault(label, []).append((float(r["train_cpu_s"]), float(r["bpb"])))
    fig, ax = plt.subplots(figsize=(13, 6))
    colors = plt.get_cmap("tab20").colors
    for i, (label, pts) in enumerate(sorted(series.items(), key=lambda kv: min(b for _, b in kv[1]))):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^Dv"[i % 5], color=colors[i % 20],
                label=f"{min(b for _, b in pts):.3f}  {label}")
    ax.scatter([2 * 105], [1.8857 / math.log(2)], marker="*", s=160, color="black",
               label="nanoGPT CPU recipe (~105 s x 2 threads)")
    ax.axhline(2.30, color="gray", linestyle="--", linewidth=1, label="goal 2.30")
    ax.set_xlabel("training CPU seconds (2-core box)")
    ax.set_ylabel("bits/byte, last 10% of tinyshakespeare")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="best bits/byte, config")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text")
    ap.add_argument("--budget", type=float, default=105.0, help="training wall seconds per point")
    ap.add_argument("--cpu-budget", type=float, default=None, help="training CPU seconds instead")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", default="")
    ap.add_argument("--work", default="/tmp/neo-sweep")
    ap.add_argument("--out", default=None, help="CSV file to append the rows to")
    ap.add_argument("--plot", default=None, help="draw --out's rows into this PNG and exit")
    args = ap.parse_args()
    if args.plot:
        plot(args.out, args.plot)
        return 0
    if not args.text:
        ap.error("--text is required")
    torch.set_num_threads(args.threads)
    train_text, held = split_text(Path(args.text).read_text(encoding="utf-8"))
    work = Path(args.work)
    rows = []
    for i, point in enumerate(grid(args.grid)):
        tokens = tokens_for(train_text, point["vocab"], point["seq"], work / f"v{point['vocab']}-s{point['seq']}")
        out = work / "runs" / f"{time.strftime('%H%M%S')}-{i}"
        row = run_one(point, tokens, held, out, args)
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if args.out and rows:
        new = not Path(args.out).exists()
        with open(args.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
