"""Tokenize stage and loader throughput, side by side with their references in one run.

(Named bench_tokenize.py, not tokenize.py: run as a script, a file named like the stdlib `tokenize`
module would shadow it for everything the interpreter imports.)

1. stage: `run_tokenize` (read docs Parquet, split, encode, pack, write token shards + side tables +
   manifest) vs bare `Tokenizer.encode_batch` (and `encode_batch_fast`) over the same texts in the
   same batches, same tokenizer, same thread setting; MB/s of UTF-8 text and the ratio (goal >= 0.70).
2. bytes per token on disk (token shards; the side tables separately).
3. loader: `TokenLoader` (inputs, targets) int64 batches per second on one core (the process is pinned
   to one CPU), vs the floor of fancy-indexing one contiguous uint16 array (goal >= 20M tokens/s).

Text: the Python standard library sources, plus /work/shared/corpora/*.txt when present (cut into
~4 KB documents at paragraph breaks). `--smoke` uses a little stdlib text and tiny sizes.

    .venv/bin/python benchmarks/bench_tokenize.py [--smoke] [--mb 16] [--vocab 8192] [--seq-len 1024]
"""
from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the same setting for the bare encoder and the stage

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from tasks.core.data_config import TokenizerConfig  # noqa: E402
from tasks.train.loader import TokenLoader  # noqa: E402
from tasks.core.protocol import StageResult  # noqa: E402
from tasks.tokenize.bpe import load_tokenizer, train_tokenizer  # noqa: E402
from tasks.tokenize.stage import READ_BATCH_ROWS, run_tokenize  # noqa: E402

SHARED = ROOT.parent / "shared" / "corpora"


def stdlib_docs(max_bytes: int) -> list[tuple[str, str, str]]:
    docs, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        docs.append((f"stdlib/{path.name}/{len(docs)}", text, "python-stdlib"))
        total += len(text.encode())
        if total >= max_bytes:
            break
    return docs


def shared_docs(max_bytes: int) -> list[tuple[str, str, str]]:
    docs, total = [], 0
    for path in sorted(SHARED.glob("*.txt")):
        buf = []
        for para in path.read_text(encoding="utf-8").split("\n\n"):
            buf.append(para)
            if sum(map(len, buf)) >= 4000:
                docs.append((f"{path.stem}/{len(docs)}", "\n\n".join(buf), path.stem))
                total += len(docs[-1][1].encode())
                buf = []
            if total >= max_bytes:
                return docs
        if buf:
            docs.append((f"{path.stem}/{len(docs)}", "\n\n".join(buf), path.stem))
    return docs


def write_docs(directory: Path, docs: list[tuple[str, str, str]], files: int = 2) -> None:
    directory.mkdir(parents=True)
    per = -(-len(docs) // files)
    for k in range(files):
        part = docs[k * per:(k + 1) * per]
        pq.write_table(pa.table({"id": [d[0] for d in part], "text": [d[1] for d in part],
                                 "source": [d[2] for d in part]}),
                       directory / f"docs-{k:05d}.parquet", compression="zstd")


def bare_encode(tokenizer, texts: list[str], fast: bool) -> float:
    encode = tokenizer.encode_batch_fast if fast else tokenizer.encode_batch
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), READ_BATCH_ROWS):
        n += sum(len(e.ids) for e in encode(texts[i:i + READ_BATCH_ROWS], add_special_tokens=False))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    ap.add_argument("--mb", type=float, default=16.0, help="MB of text")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32, help="loader rows per batch")
    ap.add_argument("--rounds", type=int, default=2, help="alternating bare/stage rounds")
    args = ap.parse_args()
    if args.smoke:
        args.mb, args.vocab, args.seq_len, args.rounds = 0.3, 400, 64, 1
    budget = int(args.mb * 1e6)
    docs = stdlib_docs(budget if args.smoke or not SHARED.is_dir() else budget * 3 // 4)
    if not args.smoke and SHARED.is_dir():
        docs += shared_docs(budget - sum(len(d[1].encode()) for d in docs))
    texts = [d[1] for d in docs]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    sources = sorted({d[2] for d in docs})
    print(f"text: {mb:.2f} MB in {len(docs):,} documents from {sources}; "
          f"TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}, cpus={os.cpu_count()}, "
          f"loadavg {open('/proc/loadavg').read().split()[:3]}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_docs(tmp / "dedup", docs)
        up = StageResult(stage="dedup", fingerprint="bench", path=str(tmp / "dedup"))
        t0 = time.perf_counter()
        tok = train_tokenizer(iter(texts), args.vocab)
        tok.save(str(tmp / "tokenizer.json"))
        print(f"tokenizer: byte-level BPE, vocab {tok.get_vocab_size():,}, trained in "
              f"{time.perf_counter() - t0:.1f} s (not part of either timing)")
        tok = load_tokenizer(tmp)  # the stage's settings (special-token text encoded as text)

        cfg = TokenizerConfig(vocab_size=args.vocab, seq_len=args.seq_len,
                              val_fraction=0.4 if args.smoke else 0.01,
                              tokenizer_source=str(tmp / "tokenizer.json"))
        bare, fast, stage, result = [], [], [], None
        for r in range(args.rounds):
            bare.append(bare_encode(tok, texts, fast=False))
            fast.append(bare_encode(tok, texts, fast=True))
            t0 = time.perf_counter()
            result = run_tokenize(cfg, up, str(tmp / f"ws{r}"))
            stage.append(time.perf_counter() - t0)
            assert not result.reused
            print(f"round {r}: bare encode_batch {mb / bare[-1]:.2f} MB/s, encode_batch_fast "
                  f"{mb / fast[-1]:.2f} MB/s, stage {mb / stage[-1]:.2f} MB/s "
                  f"(ratio vs encode_batch {bare[-1] / stage[-1]:.3f}, vs fast {fast[-1] / stage[-1]:.3f})")
        b, f, s = min(bare), min(fast), min(stage)
        print(f"best of {args.rounds}: bare encode_batch {mb / b:.2f} MB/s | encode_batch_fast "
              f"{mb / f:.2f} MB/s | stage {mb / s:.2f} MB/s")
        print(f"RATIO stage / bare encode_batch = {b / s:.3f} (goal >= 0.70); "
              f"stage / encode_batch_fast = {f / s:.3f}")

        out = Path(result.path)
        c = result.counts
        stored = (c["train_rows"] + c["val_rows"]) * (args.seq_len + 1)
        shard_bytes = sum(p.stat().st_size for s_ in ("train", "val") for p in (out / s_).glob("*.parquet"))
        index_bytes = sum(p.stat().st_size for p in (out / "index").rglob("*.parquet"))
        stream_tokens = c["train_tokens"] + c["val_tokens"]
        print(f"disk: token shards {shard_bytes:,} B for {stored:,} stored tokens = "
              f"{shard_bytes / stored:.3f} B/token ({shard_bytes / stream_tokens:.3f} per stream token); "
              f"side tables {index_bytes:,} B = {index_bytes / stream_tokens:.4f} B/token; "
              f"text {mb * 1e6 / stream_tokens:.2f} B/token")

        # loader, one core
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        torch.set_num_threads(1)
        loader = TokenLoader(out, "train", args.batch_size, seed=0)
        n_batches = 20 if args.smoke else 3000
        it = loader.stream()
        next(it)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            x, y = next(it)
        dt = time.perf_counter() - t0
        loader_tps = n_batches * x.numel() / dt
        flat = np.ascontiguousarray(np.concatenate(loader.chunks))
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            rows = flat[rng.integers(0, len(flat), args.batch_size)]
            xs, ys = rows[:, :-1].astype(np.int64), rows[:, 1:].astype(np.int64)
        floor_tps = n_batches * xs.size / (time.perf_counter() - t0)
        print(f"loader (1 core, batch {args.batch_size} x {args.seq_len}, {loader.num_rows:,} rows, "
              f"{len(loader.chunks)} chunks): {loader_tps / 1e6:.1f} M tokens/s (goal >= 20); "
              f"numpy gather floor {floor_tps / 1e6:.1f} M tokens/s; ratio {loader_tps / floor_tps:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
