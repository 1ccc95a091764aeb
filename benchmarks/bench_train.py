"""Training-loop benchmark: tokens/s of the full train loop (tasks.train.trainer.train_loop: loader, lr
schedule, gradient clipping, the NaN check and its all-reduce, metrics, progress lines) against a bare
forward + backward + AdamW step of the same model on the same batch shape, in one run, rounds
interleaved so load on a shared machine hits both. Goal: loop overhead < 10%.

The loop's rate is its own steady-state `tokens_per_s` metric (intervals after the first, so model
construction, the first step and the final save are not counted); the bare rate is timed over the
same number of steps. On a CUDA machine (`--gpu`) the same comparison runs with bf16 autocast on the
125M preset and the loop's MFU is printed with the card's name.

    .venv/bin/python benchmarks/bench_train.py            # CPU figures for RESULTS.md
    .venv/bin/python benchmarks/bench_train.py --smoke    # seconds, tiny sizes (make test)
    PYTHONPATH=. python benchmarks/bench_train.py --gpu   # GPU with the project installed

`--gpu` needs the project's dependencies (pydantic, tokenizers, Prefect: it tokenizes a corpus and runs
the real loop). On a bare GPU machine with only torch, `benchmarks/bench_gpu_train.py` is the one-command
check: 125M tokens/s and MFU (bf16, TF32, optional compile) and an FSDP2 sanity check on one GPU.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from the source tree as well

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from neo_model import GPTNeo, GPTNeoConfig  # noqa: E402
from tasks.core.data_config import TokenizerConfig  # noqa: E402
from tasks.core.train_config import TrainConfig  # noqa: E402
from tasks.core.protocol import StageResult  # noqa: E402
from tasks.tokenize.stage import run_tokenize  # noqa: E402
from tasks.train.maths import make_optimizer  # noqa: E402
from tasks.train.spec import TrainSpec  # noqa: E402
from tasks.train.trainer import METRICS, train_loop  # noqa: E402


def make_tokens(root: Path, seq_len: int, vocab: int, docs: int) -> StageResult:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)] + "def return self import class for in if else".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(200, 800))) for _ in range(docs)]
    d = root / "docs"
    d.mkdir()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(docs)], "text": texts, "source": ["b"] * docs}),
                   d / "docs-00000.parquet")
    up = StageResult(stage="dedup", fingerprint="b" * 16, path=str(d))
    return run_tokenize(TokenizerConfig(vocab_size=vocab, seq_len=seq_len, val_fraction=0.2), up,
                        str(root / "ws"))


def bare_rate(mcfg: GPTNeoConfig, cfg: TrainConfig, seq_len: int, steps: int, intervals: int,
              device: torch.device) -> float:
    """Median tokens/s of forward + backward + AdamW step + zero_grad on one fixed batch, timed over
    `intervals` runs of `steps` steps, the first dropped."""
    torch.manual_seed(0)
    net = GPTNeo(mcfg).to(device).train()
    opt = make_optimizer(net, cfg, device)
    x = torch.randint(0, mcfg.vocab_size, (cfg.batch_size, seq_len), device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    def one():
        with autocast:
            _, loss = net(x, targets=x, return_logits=False)  # as the trainer's step_loss (no z-loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rates = []
    for _ in range(intervals):  # as the loop measures itself: per interval, the first dropped
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            one()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * cfg.batch_size * seq_len / (time.perf_counter() - t))
    return statistics.median(rates[1:])


def loop_rate(tokens: StageResult, mcfg: GPTNeoConfig, cfg: TrainConfig, out: Path) -> tuple[float, dict]:
    """Median steady-state tokens/s the loop itself reports (every interval after the first)."""
    lines: list[dict] = []

    def emit(line: str) -> None:
        if line.startswith(METRICS):
            lines.append(json.loads(line[len(METRICS):])["metrics"])

    spec = TrainSpec(train=cfg, model=mcfg.to_hf_dict(), tokens_dir=tokens.path, out_dir=str(out),
                     workspace=str(out))
    train_loop(spec, emit=emit)
    rates = [m["tokens_per_s"] for m in lines[1:]]
    return statistics.median(rates), lines[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="seconds, tiny sizes")
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, 125M preset")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu:
        preset, seq_len, vocab, batch, interval, docs = "125m", 2048, 8192, 8, 10, 3000
    elif args.smoke:
        preset, seq_len, vocab, batch, interval, docs = "debug", 64, 300, 4, 2, 40
        args.rounds = 1
    else:
        preset, seq_len, vocab, batch, interval, docs = "tiny", 256, 2048, 8, 5, 400
    threads = None if args.gpu else torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = make_tokens(tmp, seq_len, vocab, docs)
        mcfg = GPTNeoConfig.from_preset(preset, vocab_size=tokens.info["vocab_size"],
                                        bos_token_id=tokens.info["eos_id"], eos_token_id=tokens.info["eos_id"],
                                        max_position_embeddings=max(seq_len, 128))
        cfg = TrainConfig(max_steps=interval * 3, batch_size=batch, log_every=interval, warmup_steps=2,
                          checkpoint_every=10**6, device=device.type, threads=threads, seed=0)
        print(f"device {torch.cuda.get_device_name() if args.gpu else 'cpu'}, threads "
              f"{torch.get_num_threads()}, preset {preset}, seq_len {seq_len}, batch {batch}, "
              f"{interval} steps per measured interval, {args.rounds} round(s)")
        bare, loop, last = [], [], {}
        for r in range(args.rounds):
            bare.append(bare_rate(mcfg, cfg, seq_len, interval, 3, device))
            rate, last = loop_rate(tokens, mcfg, cfg, tmp / f"run{r}")
            loop.append(rate)
            print(f"round {r}: bare {bare[-1]:,.0f} tok/s, loop {loop[-1]:,.0f} tok/s, "
                  f"loop/bare {loop[-1] / bare[-1]:.3f}")
        b, lp = statistics.median(bare), statistics.median(loop)
        ratio = statistics.median(lo / ba for lo, ba in zip(loop, bare))
        print(f"median of rounds: bare fwd+bwd+step {b:,.0f} tok/s, full loop {lp:,.0f} tok/s; median "
              f"per-round loop/bare {ratio:.3f} (overhead {100 * (1 - ratio):.1f}%, goal < 10%)")
        if "mfu" in last:
            print(f"loop MFU {last['mfu']:.3f}, peak memory {last['peak_memory_mb']:,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
