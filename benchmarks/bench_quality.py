"""Quality per CPU-minute: a user's `neo run -c cpu-small` on one text file, scored on held-out text.

    .venv/bin/python benchmarks/bench_quality.py --text ../shared/corpora/tinyshakespeare.txt
    .venv/bin/python benchmarks/bench_quality.py --smoke     # generated verse, a seconds-long budget

The text is cut like nanoGPT's shakespeare recipe (the reference: its README's CPU run ends at val loss
1.8857 nats/char = 2.72 bits/byte in ~105 s on the 2-core box): the first 90% is the corpus, the last
10% is held out. The corpus goes through the whole pipeline exactly as a user runs it (the `neo` CLI in a
subprocess: download, clean, dedup, tokenize, train for the preset's time budget, evaluate, register),
then `neo eval` scores the trained model on the held-out text as one document (the project's evaluator,
windows of the trained context). Printed: bits/byte on the held-out text, training wall and CPU seconds
(the train stage's own clocks), tokens/s, and the whole run's wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NANOGPT_BPB = 1.8857 / 0.6931471805599453  # nats/char -> bits/byte (tinyshakespeare is ASCII)


def split_text(text: str, held_out: float = 0.1) -> tuple[str, str]:
    """(first 1-held_out, last held_out) of the text, cut at the line boundary before the cut."""
    cut = int(len(text) * (1 - held_out))
    cut = text.rfind("\n", 0, cut) + 1 or cut
    return text[:cut], text[cut:]


def generated_verse(n_lines: int = 3000, seed: int = 0) -> str:
    """Play-like text for the smoke run: speakers, short verse lines, blank lines between speeches."""
    rng = random.Random(seed)
    words = ("the the to of and that with be have thou thee thy love night day king lord fair sweet heart death life grace honour blood "
             "crown sword eyes tongue soul heaven earth time shall will doth hath not what come go speak "
             "hear see know make good noble gentle cousin brother father mother").split()
    speakers = ["KING", "QUEEN", "ROMEO", "JULIET", "HAMLET", "FIRST CITIZEN"]
    out = []
    while len(out) < n_lines:
        out.append(rng.choice(speakers) + ":")
        for _ in range(rng.randint(1, 6)):
            line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 9)))
            out.append(line[0].upper() + line[1:] + rng.choice([",", ".", ";", "!", "?", ""]))
        out.append("")
    return "\n".join(out) + "\n"


def neo(*args: str, env: dict) -> str:
    """Run the `neo` CLI of this checkout's venv; its output, or exit with it when the command fails."""
    exe = Path(sys.executable).with_name("neo")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"neo {args[0]} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", help="the text file (e.g. ../shared/corpora/tinyshakespeare.txt)")
    ap.add_argument("--config", default="cpu-small", help="preset (configs/) or YAML path")
    ap.add_argument("--set", action="append", default=[], help="extra neo --set overrides")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--smoke", action="store_true", help="generated text, a 4 s training budget")
    args = ap.parse_args()
    if not args.smoke and not args.text:
        ap.error("--text is required (or --smoke)")
    text = generated_verse() if args.smoke else Path(args.text).read_text(encoding="utf-8")
    corpus, held = split_text(text)
    work = Path(args.work or tempfile.mkdtemp(prefix="neo-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    name = "corpus.txt" if args.smoke else Path(args.text).name
    (work / name).write_text(corpus, encoding="utf-8")
    (work / "held_out.txt").write_text(held, encoding="utf-8")
    sets = [f"corpus.sources=[{json.dumps(str(work / name))}]", *args.set]
    if args.smoke:
        sets += ["train.max_time=4", "tokenizer.vocab_size=300", "tokenizer.val_fraction=0.3",
                 "registry.model_name=quality-smoke"]
    env = {**os.environ, "NEO_HOME": str(work / "home")}
    flags = [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    out = neo("run", "-c", args.config, *flags, "-w", str(work / "ws"), env=env)
    run_wall = time.perf_counter() - t0
    train_dir = Path(re.search(r"^stage train\s*: (.+)$", out, re.M).group(1).strip())
    info = json.loads((train_dir / "manifest.json").read_text())  # the train stage's result fields
    task = json.dumps([{"name": "heldout", "kind": "perplexity", "path": str(work / "held_out.txt")}])
    scored = neo("eval", str(train_dir / "model"), "-c", args.config, *flags, "--set", f"eval.tasks={task}",
                 env=env)
    metrics = {k: float(v) for k, v in re.findall(r"^(\S+)\s+([-\d.eE+]+)$", scored, re.M)}
    bpb = metrics["heldout.bits_per_byte"]
    tokens_per_s = info["tokens_seen"] / info["train_wall_s"]
    print(f"held-out text        : {len(held.encode()):,} bytes (last 10% of {name}), one document, "
          f"windows of {metrics['heldout.window']:.0f} tokens")
    print(f"bits/byte (held out) : {bpb:.4f}" + ("" if args.smoke else
          f"   (nanoGPT CPU recipe: {NANOGPT_BPB:.4f}; ours / nanoGPT = {bpb / NANOGPT_BPB:.3f})"))
    print(f"training             : {info['steps']} steps, {info['tokens_seen']:,} tokens, "
          f"{info['train_wall_s']:.1f} s wall, {info['train_cpu_s']:.1f} s CPU, {tokens_per_s:,.0f} tokens/s")
    print(f"whole neo run        : {run_wall:.1f} s wall (server start, data stages, evaluate, register)")
    if not (0 < bpb < 8.0):
        sys.exit(f"implausible bits/byte {bpb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
